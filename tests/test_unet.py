"""The Flax M3DDM 3D U-Net against the PyTorch reference (golden fixtures) and its PyTorch <-> Flax conversion.

Fixtures: ``fixtures/m3ddm_tiny`` (tiny random reference model, inputs, outputs, intermediates) and
``fixtures/m3ddm_full_keys.json`` (every key/shape of the released model). Layout at the test boundary:
reference video tensors are ``(B, C, F, H, W)``, ours ``(B, F, H, W, C)``.
"""
from __future__ import annotations

import gzip
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3ddm_jax.assets import TINY_UNET
from m3ddm_jax.errors import CheckpointError, ConfigError
from m3ddm_jax.interop.flax_io import load_flax_folder
from m3ddm_jax.interop.torch_io import read_state_dict, write_state_dict
from m3ddm_jax.interop.unet import (
    abstract_unet,
    build_unet,
    export_unet_torch,
    load_unet,
    load_unet_flat,
    save_unet_flax,
    unet_flat,
    unet_flax_to_torch,
    unet_key_table,
    unet_torch_to_flax,
)
from m3ddm_jax.models.layers import BatchNorm, ComputeOptions
from m3ddm_jax.models.unet3d import (
    CrossAttention,
    DownBlock,
    UNet3DConfig,
    param_count,
    unet_from_config,
)

FULL_PARAMS = 1_299_279_320
CASES = {"train": 1, "cfg4": 4, "cfg2": 2}  # case -> guidance (do_classfier)
REL_TOL = 1e-4  # max abs error <= 1e-4 * max |reference|


def to_flax_video(a):  # (B, C, F, H, W) -> (B, F, H, W, C)
    return np.transpose(a, (0, 2, 3, 4, 1))


def to_torch_layout(a, ndim):
    a = np.asarray(a)
    if ndim == 5:
        return np.transpose(a, (0, 4, 1, 2, 3))
    if ndim == 4:
        return np.transpose(a, (0, 3, 1, 2))
    return a


# -- module-scoped fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(fixtures_dir):
    return fixtures_dir / "m3ddm_tiny"


@pytest.fixture(scope="module")
def io(tiny_dir):
    with np.load(tiny_dir / "io.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tiny_cfg():
    return UNet3DConfig.from_json_file(TINY_UNET / "config.json")


@pytest.fixture(scope="module")
def sd_safetensors():
    return read_state_dict(TINY_UNET / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def sd_bin(tiny_unet_bin):
    return read_state_dict(tiny_unet_bin / "diffusion_pytorch_model.bin")


@pytest.fixture(scope="module")
def flat_safetensors(sd_safetensors, tiny_cfg):
    return unet_torch_to_flax(sd_safetensors, tiny_cfg, "safetensors")


@pytest.fixture(scope="module")
def flat_bin(sd_bin, tiny_cfg):
    return unet_torch_to_flax(sd_bin, tiny_cfg, "bin")


@pytest.fixture(scope="module")
def tiny_models(tiny_cfg, flat_safetensors, flat_bin):
    return {"safetensors": build_unet(tiny_cfg, flat_safetensors), "bin": build_unet(tiny_cfg, flat_bin)}


@pytest.fixture(scope="module")
def forward(tiny_models):
    """One jitted forward per (guidance, shapes); returns (noise_pred, captured intermediates)."""
    graphdef, _ = nnx.split(tiny_models["safetensors"])

    @jax.jit
    def fwd_capture(state, sample, t, glat, fps):
        cap = {}
        out = nnx.merge(graphdef, state)(sample, t, glat, fps, guidance=1, capture=cap)
        return out, cap

    def make(guidance):
        return jax.jit(lambda state, sample, t, glat, fps: nnx.merge(graphdef, state)(
            sample, t, glat, fps, guidance=guidance))

    return {"capture": fwd_capture, 4: make(4), 2: make(2), "graphdef": graphdef}


def case_inputs(io, case):
    return (
        jnp.asarray(to_flax_video(io[f"{case}.sample"])),
        jnp.asarray(io[f"{case}.timestep"]),
        jnp.asarray(np.transpose(io[f"{case}.encoder_hidden_states"], (0, 2, 3, 1))),
        jnp.asarray(io[f"{case}.fps"]),
    )


def check(name, got, ref, rel=REL_TOL):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    err, scale = float(np.max(np.abs(got - ref))), float(np.max(np.abs(ref)))
    print(f"  {name:62s} max|err| {err:.3e}  max|ref| {scale:.3f}  rel {err / scale:.2e}")
    assert err <= rel * scale, f"{name}: max abs error {err:.3e} > {rel} * {scale:.3f}"
    return err


# -- golden parity ------------------------------------------------------------------------------------------

def test_bin_and_safetensors_convert_identically(flat_safetensors, flat_bin):
    assert flat_safetensors.keys() == flat_bin.keys()
    for p in flat_safetensors:
        assert flat_safetensors[p].dtype == flat_bin[p].dtype
        assert np.array_equal(flat_safetensors[p], flat_bin[p]), p


@pytest.mark.parametrize("source", ["safetensors", "bin"])
def test_golden_parity_train_with_intermediates(io, tiny_models, forward, source):
    model = tiny_models[source]
    graphdef, state = nnx.split(model)
    assert graphdef == forward["graphdef"]  # the same compiled function serves both sources
    out, cap = forward["capture"](state, *case_inputs(io, "train"))
    print(f"\n[{source}] train (guidance 1, b=2, g=3, F=4, 8x8):")
    check("noise_pred", to_torch_layout(out, 5), io["train.noise_pred"])
    n_checked = 0
    for key in sorted(k for k in io if k.startswith("train.act.")):
        name = key[len("train.act."):]
        assert name in cap, f"intermediate {name} not captured"
        ref = io[key]
        check(name, to_torch_layout(cap[name], ref.ndim), ref)
        n_checked += 1
    assert n_checked == 15


@pytest.mark.parametrize("case", ["cfg4", "cfg2"])
def test_golden_parity_guidance(io, tiny_models, forward, case):
    _, state = nnx.split(tiny_models["safetensors"])
    out = forward[CASES[case]](state, *case_inputs(io, case))
    print(f"\n{case} (guidance {CASES[case]}, b=1):")
    check("noise_pred", to_torch_layout(out, 5), io[f"{case}.noise_pred"])


# -- key coverage of the released model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_keys(fixtures_dir):
    return json.loads(gzip.decompress((fixtures_dir / "m3ddm_full_keys.json.gz").read_bytes()))


@pytest.fixture(scope="module")
def full_abstract():
    return abstract_unet(UNet3DConfig())


def test_full_model_key_coverage(full_keys, full_abstract):
    cfg = UNet3DConfig.from_dict(full_keys["config"])
    assert cfg == UNet3DConfig(sample_size=32)
    table = unet_key_table(cfg)
    ref = {k["key"]: (tuple(k["shape"]), k["dtype"]) for k in full_keys["keys"]}
    assert len(ref) == full_keys["n_keys"] == 1516
    ours = {e.torch_key: e for e in table.entries}
    assert sorted(set(ref) - set(ours)) == [], "released keys without a Flax variable"
    assert sorted(set(ours) - set(ref)) == [], "Flax variables without a released key"
    for key, (shape, dtype) in ref.items():
        e = ours[key]
        assert e.torch_shape == shape, f"{key}: {e.torch_shape} != {shape}"
        assert e.is_int == (dtype == "int64"), key
        assert math.prod(e.flax_shape) == math.prod(shape), key

    flat_vars = dict(nnx.to_flat_state(nnx.state(full_abstract)))
    kinds = {}
    for e in table.entries:
        var = flat_vars[e.flax_path]
        kinds[type(var).__name__] = kinds.get(type(var).__name__, 0) + 1
        if e.is_int:
            assert isinstance(var, nnx.BatchStat) and var.get_value().shape == () and var.get_value().dtype == jnp.int32
    print(f"\nfull model: {len(table)} keys, variable kinds {kinds}")
    assert kinds == {"Param": 1516 - 3 * 35, "BatchStat": 3 * 35}
    n = param_count(full_abstract)
    print(f"full model parameters (nnx.Param): {n:,}")
    assert n == FULL_PARAMS == full_keys["total_parameters"]


def test_full_model_window_forward_compiles(full_abstract):
    """The released model's guidance window step lowers and compiles on CPU without allocating weights."""
    graphdef, state = nnx.split(full_abstract)
    S = jax.ShapeDtypeStruct
    args = (state, S((4, 16, 32, 32, 9), jnp.float32), S((), jnp.int32), S((16, 32, 32, 4), jnp.float32),
            S((), jnp.int32))

    def step(state, sample, t, glat, fps):
        return nnx.merge(graphdef, state)(sample, t, glat, fps, guidance=4)

    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    n_params = param_count(full_abstract)
    n_all = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state))
    out = jax.eval_shape(step, *args)
    print(f"\nfull model window step (B'=4 guidance 4, F=16, 32x32 latents, 16 global frames 32x32): "
          f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    print(f"  XLA cost analysis: {cost['flops'] / 1e12:.2f} TFLOP per step")
    print(f"  parameters {n_params:,}: {n_params * 4 / 2**30:.2f} GiB fp32, {n_params * 2 / 2**30:.2f} GiB bf16 "
          f"({n_params * 4:,} / {n_params * 2:,} bytes); all variables incl. BN stats {n_all:,}")
    if mem is not None:
        print(f"  compiled memory: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, "
              f"temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB")
    assert out.shape == (4, 16, 32, 32, 4) and out.dtype == jnp.float32
    assert cost["flops"] > 1e13


# -- round trips ---------------------------------------------------------------------------------------------

def assert_same_state_dict(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{k}: {a[k].dtype} != {b[k].dtype}"
        assert a[k].shape == b[k].shape, f"{k}: {a[k].shape} != {b[k].shape}"
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def test_round_trip_fp32_bit_exact(tmp_path, tiny_dir, tiny_cfg, sd_safetensors, flat_safetensors, tiny_models):
    # in memory
    assert_same_state_dict(sd_safetensors, unet_flax_to_torch(flat_safetensors, tiny_cfg))
    # from the model's variables
    assert_same_state_dict(sd_safetensors, unet_flax_to_torch(unet_flat(tiny_models["safetensors"]), tiny_cfg))
    # through the on-disk Flax folder
    folder = save_unet_flax(tiny_models["safetensors"], tmp_path / "flax")
    kind, cfg_dict, flat = load_flax_folder(folder)
    assert kind == "unet" and UNet3DConfig.from_dict(cfg_dict) == tiny_cfg
    assert_same_state_dict(sd_safetensors, unet_flax_to_torch(flat, tiny_cfg))
    # export to the released PyTorch layout, both formats, from the Flax folder and from the model
    for fmt, src in (("safetensors", folder), ("bin", tiny_models["bin"])):
        out = export_unet_torch(src, tmp_path / f"torch_{fmt}", fmt=fmt)
        assert_same_state_dict(sd_safetensors, read_state_dict(out / f"diffusion_pytorch_model.{fmt}"))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["_class_name"] == "UNet3DConditionModel"
        ref_cfg = json.loads((TINY_UNET / "config.json").read_text())
        assert cfg == ref_cfg, "exported config.json differs from the reference's"
    # load_unet accepts a PyTorch folder (converted on the fly) and the Flax folder, with the same weights
    m_torch = load_unet(tmp_path / "torch_bin")
    m_flax = load_unet(folder)
    a, b = unet_flat(m_torch), unet_flat(m_flax)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)


def test_round_trip_fp16_stays_fp16(tmp_path, tiny_cfg, sd_safetensors):
    sd16 = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in sd_safetensors.items()}
    flat = unet_torch_to_flax(sd16, tiny_cfg)
    assert {a.dtype for a in flat.values()} == {np.dtype(np.float16), np.dtype(np.int32)}
    assert_same_state_dict(sd16, unet_flax_to_torch(flat, tiny_cfg))
    # on disk: fp16 .bin -> Flax folder (kept fp16) -> export safetensors
    src = tmp_path / "src16"
    src.mkdir()
    write_state_dict(sd16, src / "diffusion_pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(tiny_cfg.to_dict()))
    cfg, flat16 = load_unet_flat(src)
    folder = save_unet_flax(flat16, tmp_path / "flax16", config=cfg)
    _, _, flat_disk = load_flax_folder(folder)
    assert all(flat_disk[p].dtype == flat16[p].dtype for p in flat16)
    out = export_unet_torch(folder, tmp_path / "out16", fmt="safetensors")
    assert_same_state_dict(sd16, read_state_dict(out / "diffusion_pytorch_model.safetensors"))
    # explicit dtype conversion on export; loading casts to the requested dtype
    out32 = export_unet_torch(folder, tmp_path / "out32", fmt="safetensors", dtype="float32")
    sd32 = read_state_dict(out32 / "diffusion_pytorch_model.safetensors")
    assert sd32["conv_in.weight"].dtype == np.float32 and sd32[
        "global_img_encoder.resnet_layer.0.layers.0.layer.0.normalization.num_batches_tracked"].dtype == np.int64
    model = load_unet(src, dtype=jnp.float32)
    assert model.conv_in.kernel[...].dtype == jnp.float32


# -- errors -----------------------------------------------------------------------------------------------

def test_checkpoint_key_errors_name_the_key(tiny_cfg, sd_safetensors, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks2.0.attn2.to_k.weight"
    sd = dict(sd_safetensors)
    del sd[key]
    with pytest.raises(CheckpointError, match=r"missing.*" + key.replace(".", r"\.")):
        unet_torch_to_flax(sd, tiny_cfg)
    sd = dict(sd_safetensors)
    sd["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected.*down_blocks\.0\.resnets\.0\.extra\.weight"):
        unet_torch_to_flax(sd, tiny_cfg)
    sd = dict(sd_safetensors)
    sd["conv_in.weight"] = np.zeros((8, 9, 3, 3), np.float32)  # Conv2d layout instead of (8, 9, 1, 3, 3)
    with pytest.raises(CheckpointError, match=r"conv_in\.weight.*\[8, 9, 3, 3\].*\[8, 9, 1, 3, 3\]"):
        unet_torch_to_flax(sd, tiny_cfg)
    # through a folder on disk: the message names the file and the key
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = dict(sd_safetensors)
    del sd["conv_out.temporal_conv.bias"]
    write_state_dict(sd, bad / "diffusion_pytorch_model.safetensors")
    (bad / "config.json").write_text(json.dumps(tiny_cfg.to_dict()))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*conv_out\.temporal_conv\.bias"):
        load_unet(bad)


BAD_CONFIGS = [
    ("down_block_types", ["CrossAttnDownBlock3D", "DownBlock3D"]),
    ("up_block_types", ["UpBlock3D", "CrossAttnUpBlock3D"]),
    ("act_fn", "gelu"),
    ("center_input_sample", True),
    ("cross_attention_dim", 768),
    ("cross_attention_dim", None),
    ("attention_head_dim", 3),
    ("norm_num_groups", 3),
    ("downsample_padding", 2),
    ("block_out_channels", [8, 0]),
    ("block_out_channels", [8, 12, 16], "block_out_channels"),  # length differs from the block type lists
    ("layers_per_block", 0),
    ("norm_eps", -1.0),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=lambda b: f"{b[0]}={b[1]}")
def test_unsupported_config_values_name_the_field(tiny_cfg, bad):
    field, value, *named = bad
    d = tiny_cfg.to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=named[0] if named else repr(field)) as e:
        UNet3DConfig.from_dict(d)
    print(f"\n  {field}={value!r}: {e.value}")


def test_config_defaults_and_layers_per_block_one():
    assert UNet3DConfig.from_dict({"in_channels": 9, "cross_attention_dim": 320, "down_block_types": [
        "CrossAttnDownBlock3D"] * 3 + ["DownBlockP3D"], "up_block_types": ["UpBlockP3D"] + ["CrossAttnUpBlock3D"] * 3}
    ) == UNet3DConfig()
    with pytest.raises(ConfigError, match="'down_block_types'"):  # code default DownBlock3D is not a real block
        UNet3DConfig.from_dict({"in_channels": 9, "cross_attention_dim": 320})
    with pytest.raises(ConfigError, match="'layers_per_block'"):
        UNet3DConfig(layers_per_block=1)
    UNet3DConfig(layers_per_block=1, block_out_channels=(320, 320, 320, 320))


def test_forward_shape_errors(tiny_cfg):
    model = abstract_unet(tiny_cfg)
    g = jnp.zeros((3, 8, 8, 4))
    with pytest.raises(ConfigError, match="sample.*divisible by 2"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 4, 7, 8, 9)), 1, g, 1), model)
    with pytest.raises(ConfigError, match="guidance"):
        nnx.eval_shape(lambda m: m(jnp.zeros((5, 4, 8, 8, 9)), 1, g, 1, guidance=5), model)  # 1-4 exist
    out = nnx.eval_shape(lambda m: m(jnp.zeros((4, 4, 8, 8, 9)), jnp.array([5.9]), g, 2.7, guidance=4), model)
    assert out.shape == (4, 4, 8, 8, 4)


# -- pieces: train-mode BatchNorm, shared context, chunking, remat, bf16, init ------------------------------

def test_batchnorm_train_mode_matches_torch():
    import torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 5, 7)).astype(np.float32) * 2 + 0.5
    tbn = torch.nn.BatchNorm2d(7, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.standard_normal(7).astype(np.float32)))
        tbn.bias.copy_(torch.from_numpy(rng.standard_normal(7).astype(np.float32)))
        tbn.running_mean.copy_(torch.from_numpy(rng.standard_normal(7).astype(np.float32)))
        tbn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 7).astype(np.float32)))
    bn = BatchNorm(7)
    bn.scale[...] = jnp.asarray(tbn.weight.detach().numpy())
    bn.bias[...] = jnp.asarray(tbn.bias.detach().numpy())
    bn.mean[...] = jnp.asarray(tbn.running_mean.numpy())
    bn.var[...] = jnp.asarray(tbn.running_var.numpy())
    tbn.train()
    for _ in range(2):
        ref = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
        out = bn(jnp.asarray(x), train=True)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), tbn.running_var.numpy(), rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked[...]) == int(tbn.num_batches_tracked) == 2
    tbn.eval()
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x), train=False)),
                               tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)


def test_train_mode_context_uses_guidance_batch_statistics(tiny_cfg, flat_safetensors):
    """train=True runs the encoder on the replicated [0, 0, G, G] batch (batch statistics) and updates BN stats;
    eval mode's deduplicated encoder calls equal the replicated batch."""
    model = build_unet(tiny_cfg, flat_safetensors)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 8, 4)).astype(np.float32))

    @nnx.jit
    def run(m, g):
        z = jnp.zeros_like(g)
        enc = nnx.clone(m.global_img_encoder)  # replicated batch through a copy of the encoder
        ref_train = enc(jnp.concatenate([z, z, g, g]), train=True).reshape(4, -1, 320)
        ref_eval = m.global_img_encoder(jnp.concatenate([z, g]), train=False).reshape(2, -1, 320)
        ctx_eval = m.global_context(g, 1, 2)
        ctx_train = m.global_context(g, 1, 4, train=True)  # updates m's running statistics
        return ref_train, ctx_train, ref_eval, ctx_eval

    ref_train, ctx_train, ref_eval, ctx_eval = run(model, g)
    np.testing.assert_allclose(np.asarray(ctx_train), np.asarray(ref_train), rtol=1e-6, atol=1e-6)
    # (batch-size dependent conv kernels round differently: ulp-level differences)
    np.testing.assert_allclose(np.asarray(ctx_eval), np.asarray(ref_eval), rtol=1e-5, atol=1e-5)
    bn = model.global_img_encoder.resnet_layer[0].layers[0].layer[0].normalization
    assert int(bn.num_batches_tracked[...]) == 1
    assert not np.array_equal(np.asarray(bn.mean[...]), flat_safetensors[
        ("global_img_encoder", "resnet_layer", 0, "layers", 0, "layer", 0, "normalization", "mean")])


def test_cross_attention_shared_context_and_chunking():
    attn = CrossAttention(16, 4, 20, opts=ComputeOptions(attention_budget_mib=None), rngs=nnx.Rngs(0))
    attn.to_out[0].kernel[...] = jnp.asarray(np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32))
    chunked = nnx.clone(attn)
    chunked.opts = ComputeOptions(attention_budget_mib=1e-4)  # forces query chunks (with padding)
    b, f, l, t = 2, 3, 10, 7
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((b * f, l, 16)).astype(np.float32))
    ctx = jnp.asarray(rng.standard_normal((b, t, 20)).astype(np.float32))

    @nnx.jit
    def run(attn, chunked, x, ctx):
        return attn(x, ctx), attn(x, jnp.repeat(ctx, f, axis=0)), chunked(x, ctx)

    shared, repeated, chunk = run(attn, chunked, x, ctx)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(repeated), rtol=1e-5, atol=1e-6)  # per-frame context
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(shared), rtol=1e-5, atol=1e-6)


def test_remat_and_bf16_compute():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 3, 4, 4, 8)).astype(np.float32))
    emb = jnp.asarray(rng.standard_normal((1, 32)).astype(np.float32))
    ctx = jnp.asarray(rng.standard_normal((1, 5, 320)).astype(np.float32))

    def make(o):
        return DownBlock("CrossAttnDownBlock3D", 8, 8, 1, 32, 4, 1e-5, 2, 320, False, 1, opts=o,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    gd, state = nnx.split(make(ComputeOptions()))
    gd_remat, _ = nnx.split(make(ComputeOptions(remat=True)))
    gd_bf16, _ = nnx.split(make(ComputeOptions(dtype=jnp.bfloat16)))

    @jax.jit
    def run(state):
        def loss(graphdef):
            return lambda s: jnp.sum(nnx.merge(graphdef, s)(x, emb, emb, ctx)[0] ** 2)
        y32 = nnx.merge(gd, state)(x, emb, emb, ctx)[0]
        y16 = nnx.merge(gd_bf16, state)(x.astype(jnp.bfloat16), emb, emb, ctx)[0]  # bf16 as after conv_in
        return jax.grad(loss(gd))(state), jax.grad(loss(gd_remat))(state), y32, y16

    g0, g1, y32, y16 = run(state)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):  # same math, other fusion
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32)))
    print(f"\n  bf16 compute vs fp32 (one cross-attention down block): max rel error {err:.2e}")
    assert err < 3e-2, err


def test_random_init_matches_reference_init(tiny_cfg):
    model = unet_from_config(tiny_cfg, 0)
    st = model.down_blocks[0].attentions[0]
    assert np.array_equal(np.asarray(st.proj_in2.kernel[...]), np.eye(8))
    assert not np.any(np.asarray(st.proj_in2.bias[...]))
    assert np.array_equal(np.asarray(st.proj_out2.kernel[...]), np.eye(8))
    assert not np.any(np.asarray(st.transformer_blocks[0].attn1.to_out[0].kernel[...]))
    k = np.asarray(model.conv_out.temporal_conv.kernel[...])
    assert np.array_equal(k[1], np.eye(4)) and not np.any(k[0]) and not np.any(k[2])
    assert param_count(model) == 550_860
