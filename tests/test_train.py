"""Training (issue 5): overfitting, exact resume, corrupt-video skipping, the train.py CLI, and one sharded
step on a (data=2, fsdp=4) mesh of 8 host devices equal to the single-device step.

Compile time dominates on CPU, so the two subprocesses (the CLI run and the 8-device sharding check) start
first and run while the in-process tests use one shared compiled step (tiny config, 48 px, 4 frames).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from m3ddm_jax.data.synthetic import write_synthetic_videos  # noqa: E402

SUBPROCESS_TIMEOUT = 900


def _write_dataset(root: Path) -> Path:
    write_synthetic_videos(root / "train" / "a", 2, num_frames=16, height=56, width=72, seed=1)
    write_synthetic_videos(root / "train" / "b", 1, num_frames=20, height=64, width=64, seed=2)
    write_synthetic_videos(root / "train", 1, num_frames=5, height=56, width=72, seed=3, prefix="short")  # too short
    (root / "train" / "corrupt.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + os.urandom(2000))
    write_synthetic_videos(root / "val", 1, num_frames=16, height=56, width=72, seed=4)
    return root


def tiny_config(data_dir: Path, **sections):
    from configs import tiny

    c = tiny.get_config()
    c.data.dir = str(data_dir)
    c.val.every = 0
    c.export.at_end = False
    c.log.tensorboard = False
    c.checkpoint.async_save = True
    for dotted, value in sections.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    # the subprocesses only check behaviour: XLA's cheapest CPU code generation halves their compile time
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    return env


SHARDED_SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, os.environ["REPO"])
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from configs import tiny
    from m3ddm_jax.train.sharding import make_mesh, describe_shardings
    from m3ddm_jax.train.trainer import Trainer

    data, work = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8, jax.devices()

    def cfg():
        c = tiny.get_config()
        c.data.dir = data
        c.train.batch_size = 8
        c.train.steps = 1
        # Adam divides by sqrt(v) + eps: with eps = 1e-8 a gradient entry that is ~0 up to float rounding
        # (cancellation) becomes +-lr in either run. eps = 1e-4 keeps the update a smooth function of the
        # gradient, so the comparison measures the sharding, not rounding amplified 1e5 times.
        c.optim.eps = 1e-4
        # BatchNorm on running statistics: train-mode BN of 4 near-identical synthetic global latents divides
        # by a tiny batch variance and turns float rounding into ~1e-4 gradient differences in the global
        # encoder (per_video: 2e-4, batch: 4e-5 here, with the sharded loss equal to 1e-6); "frozen" keeps
        # every other part of the step (VAE, masks, U-Net, Adam, the fsdp gathers and gradient reductions).
        c.model.batchnorm = "frozen"
        c.val.every = 0
        c.export.at_end = False
        c.log.tensorboard = False
        return c

    out = {}
    sharded = Trainer(cfg(), work + "/sharded", mesh=make_mesh({"data": 2, "fsdp": 4}, ("data", "fsdp")))
    p_sh = sharded.state["params"]
    out["counts"] = describe_shardings(p_sh, jax.tree.map(lambda a: a.sharding, p_sh))
    k = p_sh["conv_in"]["kernel"]
    out["conv_in_spec"] = str(k.sharding.spec)
    out["conv_in_shape"] = list(k.shape)
    out["conv_in_shard_shape"] = list(k.addressable_shards[0].data.shape)
    out["conv_in_devices"] = len(k.sharding.device_set)
    mu = jax.tree.leaves(sharded.state["opt_state"])
    out["opt_sharded_leaves"] = sum(1 for a in mu if any(s is not None for s in a.sharding.spec))
    h_sh = sharded.run()
    sharded.close()

    one = make_mesh({"data": 1, "fsdp": 1}, ("data", "fsdp"), devices=jax.devices()[:1])
    single = Trainer(cfg(), work + "/single", mesh=one)
    h_one = single.run()
    single.close()

    a = jax.tree.leaves(jax.device_get(sharded.state["params"]))
    b = jax.tree.leaves(jax.device_get(single.state["params"]))
    out["loss_sharded"], out["loss_single"] = h_sh.losses[0], h_one.losses[0]
    out["max_param_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    mu_a = jax.tree.leaves(jax.device_get(sharded.state["opt_state"]))
    mu_b = jax.tree.leaves(jax.device_get(single.state["opt_state"]))
    out["max_opt_diff"] = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                              for x, y in zip(mu_a, mu_b))
    out["data_same"] = h_sh.data_indices == h_one.data_indices

    # restore the (data=2, fsdp=4) checkpoint onto a different mesh (one device)
    restored = Trainer(cfg(), work + "/sharded", mesh=one)
    r = jax.tree.leaves(jax.device_get(restored.state["params"]))
    out["restored_step"] = restored.step
    out["restore_max_diff"] = max(float(np.max(np.abs(x - y))) for x, y in zip(r, a))
    out["restored_devices"] = len(jax.tree.leaves(restored.state["params"])[0].sharding.device_set)
    restored.close()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def background(dataset, tmp_path_factory):
    """Start the two subprocess checks now; tests collect their results at the end."""
    work = tmp_path_factory.mktemp("bg")
    env = _env()
    env["REPO"] = str(REPO)
    procs = {}
    procs["sharded"] = subprocess.Popen([sys.executable, "-c", SHARDED_SCRIPT, str(dataset), str(work / "mesh")],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    cli_work = work / "cli"
    procs["cli"] = subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/tiny.py", f"--config.data.dir={dataset}",
         "--workdir", str(cli_work), "--config.train.steps=4", "--config.data.worker_count=1",
         "--config.val.every=2", "--config.checkpoint.every=2", "--config.log.every=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    yield {"procs": procs, "cli_work": cli_work}
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def _finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    return proc.returncode, out, err


def test_start_background(background):
    assert all(p.poll() in (None, 0) for p in background["procs"].values())


def test_bad_data_folder_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py",
                        f"--config.data.dir={tmp_path / 'missing'}", "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("train.py: error:") and "not found" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_loader_skips_corrupt_and_short(dataset):
    from m3ddm_jax.data.video_folder import ClipSpec, find_videos, make_loader

    files = find_videos(dataset, "train")
    assert len(files) == 5 and len(set(files)) == 5
    spec = ClipSpec(num_frames=4, num_global_frames=4, size=48, global_size=48, min_frames=8, max_stride=4)
    it = iter(make_loader(files, spec, batch_size=2, seed=0))
    skipped = []
    for _ in range(8):
        b = next(it)
        assert b["frames"].shape == (2, 4, 48, 48, 3) and b["global_frames"].shape == (2, 4, 48, 48, 3)
        assert b["frames"].std() > 5  # real pixels, never a dummy element
        ids = b["skipped"][b["skipped"] >= 0].tolist()
        skipped += [Path(files[i]).name for i in ids]
        assert all(Path(files[i]).name not in ("corrupt.mp4", "short000.mp4") for i in b["index"])
    assert {"corrupt.mp4", "short000.mp4"} & set(skipped)


@pytest.fixture(scope="module")
def overfit(dataset, tmp_path_factory):
    from m3ddm_jax.train.trainer import Trainer

    # the classic overfitting check: the same masks/timesteps/noise every step (train.repeat_noise)
    c = tiny_config(dataset, train__steps=60, checkpoint__every=1000, train__repeat_noise=True)
    t = Trainer(c, tmp_path_factory.mktemp("overfit"))
    hist = t.run()
    t.close()
    return hist


def test_overfit_lowers_loss(overfit):
    losses = np.asarray(overfit.losses)
    first, last = losses[:5].mean(), losses[-10:].mean()
    print(f"\noverfit: first 5 steps {first:.4f}, last 10 steps {last:.4f} ({len(losses)} steps): "
          + " ".join(f"{x:.3f}" for x in losses))
    assert np.isfinite(losses).all()
    assert last < 0.85 * first and losses[-10:].max() < losses[:5].min(), (first, last)


def test_corrupt_video_skipped_and_counted(overfit):
    assert overfit.skipped > 0
    names = {Path(f).name for f in overfit.skipped_files}
    assert names <= {"corrupt.mp4", "short000.mp4"} and names
    assert len(overfit.losses) == 60


def test_resume_is_exact(dataset, tmp_path, caplog):
    from m3ddm_jax.train.trainer import Trainer

    c = tiny_config(dataset, train__steps=6, checkpoint__every=1000)
    straight = Trainer(c, tmp_path / "straight")
    h_all = straight.run()
    straight.close()

    first = Trainer(c, tmp_path / "resumed")
    h1 = first.run(stop_at=3)
    first.close()
    assert first.step == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = Trainer(c, tmp_path / "resumed")
    assert second.restored_step == 3
    # orbax restores every item through its own handler: no "could not be restored" warnings (issue 11)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    h2 = second.run()
    second.close()

    assert h1.losses + h2.losses == h_all.losses
    assert h1.data_indices + h2.data_indices == h_all.data_indices
    a = jax.tree.leaves(jax.device_get(straight.state))
    b = jax.tree.leaves(jax.device_get(second.state))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert h1.skipped + (h2.skipped - h1.skipped) == h_all.skipped  # the counter is checkpointed too


def test_sharded_step_matches_single_device(background):
    rc, out, err = _finish(background["procs"]["sharded"])
    assert rc == 0, err[-4000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    print(f"\nsharded (data=2, fsdp=4) vs single device: loss {r['loss_sharded']:.7f} vs {r['loss_single']:.7f}, "
          f"max |param diff| {r['max_param_diff']:.2e}, max |opt-state diff| {r['max_opt_diff']:.2e}, "
          f"shardings {r['counts']}, conv_in {r['conv_in_shape']} -> shard {r['conv_in_shard_shape']} "
          f"spec {r['conv_in_spec']}; restore onto 1 device: step {r['restored_step']}, diff {r['restore_max_diff']}")
    assert r["counts"]["sharded"] > 0 and r["counts"]["sharded_elements"] > r["counts"]["replicated_elements"]
    assert "fsdp" in r["conv_in_spec"] and r["conv_in_devices"] == 8
    assert np.prod(r["conv_in_shard_shape"]) * 4 == np.prod(r["conv_in_shape"])
    assert r["opt_sharded_leaves"] > 0
    assert r["data_same"]
    assert abs(r["loss_sharded"] - r["loss_single"]) < 1e-5
    assert r["max_param_diff"] < 1e-5
    assert r["restored_step"] == 1 and r["restore_max_diff"] == 0.0 and r["restored_devices"] == 1


def test_cli_end_to_end(background):
    rc, out, err = _finish(background["procs"]["cli"])
    assert rc == 0, (out[-3000:], err[-3000:])
    work = background["cli_work"]
    assert "done: step 4" in out, out[-3000:]
    assert "validation loss" in out and "skipped" in out
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in rows) and any("train/clips_per_s" in r for r in rows)
    if importlib.util.find_spec("tensorboardX") is not None:  # the TensorBoard writer (no TensorFlow)
        assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    exp = work / "export" / "unet"
    assert (exp / "config.json").is_file() and (exp / "diffusion_pytorch_model.safetensors").is_file()
    from m3ddm_jax.interop.unet import load_unet_flat

    cfg, flat = load_unet_flat(exp)  # the converter reads the exported PyTorch layout back
    assert cfg.block_out_channels == (8, 12) and len(flat) > 100


# -- config values, checkpoints (issue 11) --------------------------------------------------------------

@pytest.mark.parametrize("field,value,want", [
    ("checkpoint.every", 0, "checkpoint.every must be >= 1, got 0"),
    ("log.every", 0, "log.every must be >= 1, got 0"),
    ("train.steps", -3, "train.steps must be >= 1, got -3"),
    ("train.grad_accum", 0, "train.grad_accum must be >= 1"),
    ("val.every", -1, "val.every must be >= 0 (0 = never), got -1"),
    ("data.worker_count", -2, "data.worker_count must be >= 0"),
    ("optim.name", "sgd", "optim.name must be one of adam, adamw, got 'sgd'"),
    ("optim.b1", 1.0, "optim.b1 must be in [0, 1), got 1.0"),
    ("optim.eps", float("nan"), "optim.eps must be a number, got nan"),
    ("mask.drop_local", 1.5, "mask.drop_local must be in [0, 1], got 1.5"),
    ("model.compute_dtype", "fp8", "model.compute_dtype must be one of float32, fp32, bfloat16"),
    ("model.attention_impl", "flash", "model.attention_impl must be one of xla, dot_product, cudnn"),
    ("export.format", "pt", "export.format must be one of safetensors, bin, got 'pt'"),
    ("mask.probs", ("foo",), "mask.probs must be a tuple of numbers"),
    ("data.crop_ratio", (0.75,), "data.crop_ratio must be a tuple of 2 numbers, got (0.75,)"),
])
def test_check_config_rejects_bad_values(dataset, field, value, want):
    from m3ddm_jax.errors import ConfigError
    from m3ddm_jax.train.trainer import check_config

    check_config(tiny_config(dataset))  # the shipped config passes
    c = tiny_config(dataset)
    section, leaf = field.split(".")
    with c.unlocked() if hasattr(c, "unlocked") else contextlib.nullcontext():
        c[section][leaf] = value
    with pytest.raises(ConfigError) as e:
        check_config(c)
    assert str(e.value).startswith(want) and "\n" not in str(e.value), str(e.value)


def _small_state(v: int) -> dict:
    import jax.numpy as jnp

    rng = np.random.default_rng(v)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 48)).astype(np.float32)),
                       "b": jnp.asarray(rng.normal(size=(48,)).astype(np.float32)).astype(jnp.bfloat16)},
            "step": jnp.int32(v), "ema": None, "rng": jax.random.key_data(jax.random.key(v))}


def _target(state: dict) -> dict:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {k: (None if v is None else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), v))
            for k, v in state.items()}


def _same(a: dict, b: dict) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def _largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("damage", ["flip", "truncate", "metadata"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog, damage):
    """A damaged newest step: restore warns, sets it aside as <step>.corrupt and resumes from the previous
    step; the step can be saved again. A flipped byte in array data is restored silently by orbax: the
    checksums recorded at save time catch it."""
    from m3ddm_jax.train.checkpoint import Checkpointer

    s1, s2 = _small_state(1), _small_state(2)
    ck = Checkpointer(tmp_path)
    ck.save(1, s1, b'{"pos": 1}', {"step": 1})
    ck.save(2, s2, b'{"pos": 2}', {"step": 2})
    ck.close()
    if damage == "flip":
        _flip(_largest_array_file(tmp_path / "2"))
    elif damage == "truncate":
        _truncate(_largest_array_file(tmp_path / "2"))
    else:
        _truncate(tmp_path / "2" / "state" / "_METADATA")
    caplog.clear()
    ck = Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        state, data, meta = ck.restore(_target(s1))
    assert meta["step"] == 1 and data == b'{"pos": 1}' and _same(state, s1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    mine = [w for w in warnings if w.startswith(f"cannot restore checkpoint {tmp_path / '2'}")]
    assert len(mine) == 1 and mine[0].endswith("moved aside to 2.corrupt; resuming from step 1 instead"), warnings
    if damage == "flip":
        assert "checksum mismatch in 1 array(s) (params/w)" in mine[0]
    assert not [w for w in warnings if "could not be restored" in w]
    assert (tmp_path / "2.corrupt").is_dir() and ck.all_steps() == [1]
    ck.save(2, s2, b'{"pos": 2}', {"step": 2})  # the step number is free again
    ck.wait()
    state, data, meta = ck.restore(_target(s2))
    assert meta["step"] == 2 and _same(state, s2)
    ck.close()


def test_every_checkpoint_corrupt_is_one_error_and_nothing_moved(tmp_path):
    from m3ddm_jax.errors import CheckpointError
    from m3ddm_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path)
    for v in (1, 2):
        ck.save(v, _small_state(v), None, {"step": v})
    ck.close()
    for v in (1, 2):
        _flip(_largest_array_file(tmp_path / str(v)))
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as e:  # never a silent restart from scratch
        ck.restore(_target(_small_state(1)))
    assert str(e.value).startswith(f"no readable checkpoint in {tmp_path} (tried steps 2, 1; newest: ")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved when nothing restores
    ck.close()


def test_checkpoint_without_checksums_restores(tmp_path):
    """Checkpoints written before checksums existed (meta without them) restore unchanged."""
    import orbax.checkpoint as ocp

    from m3ddm_jax.train.checkpoint import Checkpointer, _without_none

    s1 = _small_state(1)
    mgr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_without_none(s1)),
                                        meta=ocp.args.JsonSave({"step": 1})))
    mgr.wait_until_finished()
    mgr.close()
    ck = Checkpointer(tmp_path)
    state, data, meta = ck.restore(_target(s1))
    assert meta == {"step": 1} and data is None and _same(state, s1)
    ck.close()


def test_killed_save_leaves_no_step(tmp_path):
    """A save killed before orbax's final rename leaves only a temporary folder: not a step, and removed when
    the next Checkpointer starts."""
    from m3ddm_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path)
    ck.save(1, _small_state(1), None, {"step": 1})
    ck.close()
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text('{"tree_metadata": {')
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 1
    ck.wait()
    state, _, meta = ck.restore(_target(_small_state(1)))
    assert meta["step"] == 1
    ck.close()
    assert not partial.exists()


def test_state_checksums_see_every_change():
    from m3ddm_jax.train.checkpoint import state_checksums

    s = _small_state(3)
    base = state_checksums(s)
    assert set(base) == {"params/w", "params/b", "step", "rng"}
    w = np.asarray(s["params"]["w"]).copy()
    flipped = w.view(np.uint32).copy()
    flipped[5, 7] ^= 1  # one bit of one element
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    for changed in (flipped.view(np.float32), swapped):
        t = dict(s, params=dict(s["params"], w=jax.numpy.asarray(changed)))
        now = state_checksums(t)
        assert now["params/w"] != base["params/w"] and now["params/b"] == base["params/b"]
    assert state_checksums(_small_state(3)) == base  # deterministic
