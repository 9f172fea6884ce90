"""The Flax VAE against diffusers' ``AutoencoderKL``: numerics, key coverage, conversion round trips, errors, videos.

Run with ``-s`` to see the measured errors.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3ddm_jax.errors import CheckpointError, ConfigError
from m3ddm_jax.interop.flax_io import load_flax_folder
from m3ddm_jax.interop.keymap import torch_to_flax_array
from m3ddm_jax.interop.torch_io import read_state_dict, write_state_dict
from m3ddm_jax.interop.vae import (
    abstract_vae,
    export_vae_torch,
    load_vae,
    save_vae_flax,
    vae_flax_to_torch,
    vae_key_table,
    vae_torch_to_flax,
)
from m3ddm_jax.models import vae as vae_mod
from m3ddm_jax.models.vae import VAEConfig, decode_video, encode_video

import torch
import diffusers
from m3ddm_jax.assets import TINY_UNET, TINY_VAE

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],  # two down blocks: a downsampler and channel-changing shortcut convs
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
TOL = 1e-4


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _assert_same_state_dict(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == v.dtype, (k, g.dtype, v.dtype)
        assert g.shape == v.shape, (k, g.shape, v.shape)
        assert np.array_equal(g.view(np.uint8), np.ascontiguousarray(v).view(np.uint8)), k  # bit-exact


# --------------------------------------------------------------------------------------------------
# Fixtures: one tiny diffusers VAE with every parameter perturbed, saved once, loaded once.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # no zero / one init left to hide a layout bug (norm scales, biases, ...)
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("torch_vae")
    model.save_pretrained(folder, safe_serialization=True)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, folder, sd


@pytest.fixture(scope="module")
def flax_vae(torch_vae):
    _, folder, _ = torch_vae
    return load_vae(folder)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(7)
    return rng.uniform(-1, 1, size=(2, 3, 32, 32, 3)).astype(np.float32)  # (B, F, H, W, C)


# --------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------

def test_parity_with_diffusers(torch_vae, flax_vae):
    model, _, _ = torch_vae
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        dec = model.decode(z).sample
        rec = model(x, sample_posterior=False).sample

    dist = jax.jit(flax_vae.encode)(jnp.asarray(_nhwc(x)))
    out = jax.jit(flax_vae.decode)(jnp.asarray(_nhwc(z)))
    full = jax.jit(flax_vae.__call__)(jnp.asarray(_nhwc(x)))

    errs = {
        "encode mean": float(np.abs(np.asarray(dist.mean) - _nhwc(post.mean)).max()),
        "encode logvar": float(np.abs(np.asarray(dist.logvar) - _nhwc(post.logvar)).max()),
        "encode std": float(np.abs(np.asarray(dist.std) - _nhwc(post.std)).max()),
        "decode": float(np.abs(np.asarray(out) - _nhwc(dec)).max()),
        "reconstruct (mode)": float(np.abs(np.asarray(full) - _nhwc(rec)).max()),
    }
    scale = {"|mean|": float(post.mean.abs().max()), "|decode|": float(dec.abs().max())}
    print(f"\nVAE fp32 parity vs diffusers, max abs error: {errs}  (magnitudes {scale})")
    assert dist.mean.shape == (2, 16, 16, 4) and out.shape == (2, 32, 32, 3)
    for name, err in errs.items():
        assert err < TOL, f"{name}: max abs error {err:.3g} >= {TOL}"


def test_reference_golden_vae(fixtures_dir):
    """The recorded reference run (window_sampler fixture): encode of the global frames, decode of z0."""
    data = np.load(fixtures_dir / "window_sampler" / "sampler.npz")
    vae = load_vae(TINY_VAE)
    dist = jax.jit(vae.encode)(jnp.asarray(data["in.global_frames"].transpose(0, 2, 3, 1)))
    z0 = data["out.z0"][0].transpose(1, 2, 3, 0)  # (C, F, h, w) -> (F, h, w, C), scaled latents
    out = jax.jit(vae.decode_latents)(jnp.asarray(z0))
    errs = {
        "enc.global.mean": float(np.abs(np.asarray(dist.mean) - data["enc.global.mean"].transpose(0, 2, 3, 1)).max()),
        "enc.global.std": float(np.abs(np.asarray(dist.std) - data["enc.global.std"].transpose(0, 2, 3, 1)).max()),
        "out.vae_decode": float(np.abs(np.asarray(out) - data["out.vae_decode"].transpose(0, 2, 3, 1)).max()),
    }
    print(f"\nVAE vs recorded reference run, max abs error: {errs}")
    assert errs["enc.global.mean"] < 5e-5 and errs["enc.global.std"] < 5e-5 and errs["out.vae_decode"] < 1e-4


def test_posterior_sampling_and_scaling(flax_vae):
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32))
    key = jax.random.key(0)
    dist = flax_vae.encode(x)
    np.testing.assert_array_equal(dist.sample(key), dist.sample(key))
    eps = jax.random.normal(key, dist.mean.shape)
    np.testing.assert_allclose(dist.sample(key), dist.mean + jnp.exp(0.5 * dist.logvar) * eps, rtol=0, atol=1e-6)
    assert float(jnp.max(dist.logvar)) <= 20.0 and float(jnp.min(dist.logvar)) >= -30.0
    s = flax_vae.config.scaling_factor
    assert s == vae_mod.SCALING_FACTOR
    np.testing.assert_allclose(flax_vae.encode_latents(x), dist.mode() * s, rtol=1e-6, atol=0)
    np.testing.assert_allclose(flax_vae.encode_latents(x, key), dist.sample(key) * s, rtol=1e-6, atol=0)
    z = dist.mode() * s
    np.testing.assert_allclose(flax_vae.decode_latents(z), flax_vae.decode(z / s), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The real SD-1.5 VAE, on abstract shapes only
# --------------------------------------------------------------------------------------------------

def test_sd15_key_coverage(fixtures_dir):
    fx = json.loads((fixtures_dir / "sd15_vae_keys.json").read_text())
    cfg = VAEConfig.from_dict(fx["config"])
    assert cfg == VAEConfig.sd15()
    _, abstract_state = nnx.split(abstract_vae(cfg))
    flax_shapes = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(abstract_state)}
    table = vae_key_table(cfg)
    assert len(fx["keys"]) == fx["n_keys"] == 248 == len(table) == len(flax_shapes)
    for item in fx["keys"]:
        entry = table.by_torch[item["key"]]  # KeyError names an unmapped key
        assert entry.torch_shape == tuple(item["shape"]), item["key"]
        # The Flax variable exists and has the shape the layout rule gives for the PyTorch shape.
        expected = torch_to_flax_array(np.empty(item["shape"], np.float32), entry.flax_shape).shape
        assert flax_shapes[entry.flax_path] == expected == entry.flax_shape, item["key"]
    n_params = sum(int(np.prod(s)) for s in flax_shapes.values())
    print(f"\nSD-1.5 VAE: {len(table)} keys, {n_params:,} parameters (fixture {fx['total_parameters']:,})")
    assert n_params == fx["total_parameters"] == 83_653_863


@pytest.mark.parametrize("variant", [
    dict(layers_per_block=2, block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
         up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=8, in_channels=4, out_channels=2),
    dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
], ids=["3blocks-lpb2", "no-quant-no-attn"])
def test_key_table_matches_diffusers_variants(variant):
    cfg = {**TINY, **variant}
    want = {k: tuple(v.shape) for k, v in diffusers.AutoencoderKL(**cfg).state_dict().items()}
    assert vae_key_table(cfg).torch_shapes() == want


def test_latent_scale_defined_once():
    pattern = re.compile(r"0\.18215")
    hits = [
        str(p.relative_to(REPO))
        for root in ("m3ddm_jax", "convert")
        for p in (REPO / root).rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert hits == ["m3ddm_jax/models/vae.py"], hits
    assert len(pattern.findall((REPO / "m3ddm_jax/models/vae.py").read_text())) == 1


# --------------------------------------------------------------------------------------------------
# Conversion round trips
# --------------------------------------------------------------------------------------------------

def test_roundtrip_in_memory_bit_exact(torch_vae):
    _, _, sd = torch_vae
    cfg = VAEConfig.from_dict(TINY)
    for dtype in (np.float32, np.float16):
        src = {k: v.astype(dtype) for k, v in sd.items()}
        flat = vae_torch_to_flax(src, cfg)
        assert all(a.dtype == dtype for a in flat.values())
        back = vae_flax_to_torch(flat, cfg)
        assert set(back) == set(sd)
        _assert_same_state_dict(back, src)
    half = vae_flax_to_torch(vae_torch_to_flax(sd, cfg), cfg, dtype=np.float16)
    _assert_same_state_dict(half, {k: v.astype(np.float16) for k, v in sd.items()})


def test_roundtrip_through_folders_fp32(torch_vae, tmp_path):
    _, folder, sd = torch_vae
    model = load_vae(folder, dtype=None)
    flax_dir = save_vae_flax(model, None, tmp_path / "flax")
    kind, cfg, flat = load_flax_folder(flax_dir)
    assert kind == "vae" and cfg["_m3ddm_jax"]["kind"] == "vae"
    assert VAEConfig.from_dict(cfg) == VAEConfig.from_dict(TINY)

    st_dir = export_vae_torch(flax_dir, tmp_path / "pt_st", fmt="safetensors")
    bin_dir = export_vae_torch(model, tmp_path / "pt_bin", fmt="bin")
    _assert_same_state_dict(read_state_dict(st_dir / "diffusion_pytorch_model.safetensors"), sd)
    _assert_same_state_dict(read_state_dict(bin_dir / "diffusion_pytorch_model.bin"), sd)
    exported_cfg = json.loads((st_dir / "config.json").read_text())
    assert exported_cfg["_class_name"] == "AutoencoderKL" and "_m3ddm_jax" not in exported_cfg

    # diffusers itself loads the exported folders with nothing missing or unexpected.
    for d in (st_dir, bin_dir):
        reloaded, info = diffusers.AutoencoderKL.from_pretrained(d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        _assert_same_state_dict({k: v.numpy() for k, v in reloaded.state_dict().items()}, sd)

    # A diffusers pipeline folder (with a vae/ subfolder) works too.
    pipe = tmp_path / "pipeline"
    shutil.copytree(st_dir, pipe / "vae")
    _assert_same_state_dict(vae_flax_to_torch(_flat(load_vae(pipe, dtype=None)), TINY), sd)

    # The Flax folder loads back to the same weights.
    again = load_vae(flax_dir, dtype=None)
    _assert_same_state_dict(vae_flax_to_torch(_flat(again), again.config), sd)


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_roundtrip_through_folders_fp16(torch_vae, tmp_path):
    _, folder, sd = torch_vae
    sd16 = {k: v.astype(np.float16) for k, v in sd.items()}
    src = tmp_path / "pt16"
    src.mkdir()
    shutil.copy(folder / "config.json", src / "config.json")
    write_state_dict(sd16, src / "diffusion_pytorch_model.safetensors")

    model = load_vae(src, dtype=None)  # keeps the stored dtype
    assert all(a.dtype == np.float16 for a in _flat(model).values())
    flax_dir = save_vae_flax(model, None, tmp_path / "flax16")
    _, _, flat = load_flax_folder(flax_dir)
    assert all(a.dtype == np.float16 for a in flat.values())
    out = export_vae_torch(flax_dir, tmp_path / "pt16_out")
    _assert_same_state_dict(read_state_dict(out / "diffusion_pytorch_model.safetensors"), sd16)

    # fp32 weights exported as fp16 on request.
    out32 = export_vae_torch(load_vae(folder, dtype=None), tmp_path / "pt16_cast", dtype=np.float16)
    _assert_same_state_dict(read_state_dict(out32 / "diffusion_pytorch_model.safetensors"), sd16)


def test_legacy_attention_keys(torch_vae):
    _, _, sd = torch_vae
    cfg = VAEConfig.from_dict(TINY)
    ref = vae_torch_to_flax(sd, cfg)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for conv_shaped in (False, True):
        legacy = {}
        for k, v in sd.items():
            m = re.match(r"^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
            if m:
                k = f"{m[1]}.{renames[m[2]]}.{m[3]}"
                if conv_shaped and v.ndim == 2:
                    v = v[:, :, None, None]  # 1x1 conv layout of the first SD releases
            legacy[k] = v
        assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
        got = vae_torch_to_flax(legacy, cfg)
        assert set(got) == set(ref)
        for p in ref:
            assert np.array_equal(got[p], ref[p]), p
        back = vae_flax_to_torch(got, cfg)  # exported with the current names
        assert set(back) == set(sd)


# --------------------------------------------------------------------------------------------------
# Broken checkpoints name the key
# --------------------------------------------------------------------------------------------------

def _broken_folder(torch_vae, tmp_path, edit) -> Path:
    _, folder, sd = torch_vae
    sd = dict(sd)
    edit(sd)
    out = tmp_path / "broken"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    write_state_dict(sd, out / "diffusion_pytorch_model.safetensors")
    return out


KEY = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"


def test_missing_key_is_named(torch_vae, tmp_path):
    folder = _broken_folder(torch_vae, tmp_path, lambda sd: sd.pop(KEY))
    with pytest.raises(CheckpointError, match=re.escape(KEY)) as e:
        load_vae(folder)
    print(f"\nmissing key -> {e.value}")
    assert "missing" in str(e.value)


def test_renamed_key_is_named(torch_vae, tmp_path):
    bad = "decoder.up_blocks.1.resnets.0.shortcut.weight"
    folder = _broken_folder(torch_vae, tmp_path, lambda sd: sd.__setitem__(bad, sd.pop(KEY)))
    with pytest.raises(CheckpointError) as e:
        load_vae(folder)
    print(f"\nrenamed key -> {e.value}")
    assert KEY in str(e.value) and bad in str(e.value)


def test_reshaped_key_is_named(torch_vae, tmp_path):
    key = "encoder.mid_block.attentions.0.to_k.weight"
    folder = _broken_folder(torch_vae, tmp_path, lambda sd: sd.__setitem__(key, sd[key].reshape(32, -1)))
    with pytest.raises(CheckpointError, match=re.escape(key)) as e:
        load_vae(folder)
    print(f"\nreshaped key -> {e.value}")


def test_config_errors_name_the_field(tmp_path):
    for field, value in [
        ("act_fn", "gelu"),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("norm_num_groups", 12),
        ("shift_factor", 0.1),
        ("some_new_field", 1),
    ]:
        with pytest.raises(ConfigError, match=field):
            VAEConfig.from_dict({**TINY, field: value})
    with pytest.raises(ConfigError, match="_class_name"):
        VAEConfig.from_dict({**TINY, "_class_name": "AutoencoderTiny"})
    with pytest.raises(CheckpointError):
        load_vae(tmp_path / "does-not-exist")


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------

def test_video_chunking_and_sampling(flax_vae, frames):
    b, f = frames.shape[:2]
    key = jax.random.key(42)
    graphdef, state = nnx.split(flax_vae)

    per_frame = encode_video(flax_vae, frames, chunk=1)  # one frame per call
    chunked = encode_video(flax_vae, frames, chunk=4)  # 6 frames -> 4 + (2 padded to 4)
    whole = encode_video((graphdef, state), frames, chunk=b * f)
    assert chunked.shape == (b, f, 16, 16, 4)
    n_compiled = vae_mod._encode_chunk._cache_size()
    again = encode_video(flax_vae, frames, chunk=4)
    assert vae_mod._encode_chunk._cache_size() == n_compiled  # cached: no recompilation
    np.testing.assert_array_equal(again, chunked)

    s1 = encode_video(flax_vae, frames, key=key, chunk=4)
    s2 = encode_video(flax_vae, frames, key=key, chunk=4)
    s_whole = encode_video(flax_vae, frames, key=key, chunk=b * f)
    s_other = encode_video(flax_vae, frames, key=jax.random.key(43), chunk=4)

    # Frame (b, f) of the video: encode alone (batch of one, its own key), as the chunked path promises.
    ref_mode = np.stack([np.asarray(flax_vae.encode_latents(jnp.asarray(frames[i, j][None])))[0]
                         for i in range(b) for j in range(f)]).reshape(chunked.shape)
    ref_sample = np.stack([
        np.asarray(flax_vae.encode_latents(jnp.asarray(frames[i, j][None]),
                                           per_item_keys=jax.random.fold_in(key, i * f + j)[None]))[0]
        for i in range(b) for j in range(f)
    ]).reshape(chunked.shape)

    dec_per_frame = decode_video(flax_vae, chunked, chunk=1)
    dec_chunked = decode_video(flax_vae, chunked, chunk=4)
    assert dec_chunked.shape == frames.shape

    errs = {
        "encode chunk=4 vs per-frame": float(jnp.abs(chunked - per_frame).max()),
        "encode chunk=4 vs one chunk": float(jnp.abs(chunked - whole).max()),
        "encode chunk=4 vs eager single frames": float(np.abs(np.asarray(chunked) - ref_mode).max()),
        "sample chunk=4 vs one chunk": float(jnp.abs(s1 - s_whole).max()),
        "sample chunk=4 vs eager single frames": float(np.abs(np.asarray(s1) - ref_sample).max()),
        "decode chunk=4 vs per-frame": float(jnp.abs(dec_chunked - dec_per_frame).max()),
    }
    print(f"\nvideo chunking, max abs difference: {errs}")
    for name, err in errs.items():
        assert err < 1e-5, f"{name}: {err}"
    np.testing.assert_array_equal(s1, s2)  # same key -> identical
    assert float(jnp.abs(s1 - s_other).max()) > 1e-3  # another key -> another draw
    assert float(jnp.abs(s1 - chunked).max()) > 1e-3  # a sample, not the mode


def test_bfloat16_compute(torch_vae, flax_vae, tmp_path):
    """bf16 parameters and compute: the posterior stays float32, the output is close to fp32; bf16 exports."""
    model, folder, _ = torch_vae
    bf16 = load_vae(folder, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in _flat(bf16).values())
    want = {k: v.to(torch.bfloat16).view(torch.int16).numpy() for k, v in model.state_dict().items()}
    for fmt in ("safetensors", "bin"):
        out = export_vae_torch(bf16, tmp_path / fmt, fmt=fmt)
        got = read_state_dict(out / f"diffusion_pytorch_model.{fmt}")
        assert all(got[k].dtype.name == "bfloat16" for k in want)
        _assert_same_state_dict({k: v.view(np.int16) for k, v in got.items()}, want)
    x = jnp.asarray(np.random.default_rng(11).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32))
    dist = jax.jit(bf16.encode)(x)
    assert dist.mean.dtype == jnp.float32
    ref = jax.jit(flax_vae.encode)(x)
    err = float(jnp.abs(dist.mean - ref.mean).max())
    print(f"\nbf16 encode mean vs fp32: max abs error {err:.3g} (|mean| {float(jnp.abs(ref.mean).max()):.3g})")
    assert err < 0.1
