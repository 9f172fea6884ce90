"""``python -m convert``: both directions, both model kinds, dtype kept, errors named, nothing half-written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m3ddm_jax.interop.cli import main as convert_main
from m3ddm_jax.interop.torch_io import read_state_dict, write_state_dict
from m3ddm_jax.assets import TINY_UNET, TINY_VAE

REPO = Path(__file__).resolve().parents[1]


def _assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kind, fmt", [("unet", "bin"), ("vae", "safetensors")])
def test_round_trip_is_bit_exact(tmp_path, kind, fmt, capsys):
    src = {"unet": TINY_UNET, "vae": TINY_VAE}[kind]
    assert convert_main([str(src), str(tmp_path / "flax")]) == 0
    assert convert_main([str(tmp_path / "flax"), str(tmp_path / "pt"), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert "PyTorch -> Flax" in out and "Flax -> PyTorch" in out
    orig = read_state_dict(next(src.glob("diffusion_pytorch_model.safetensors")))
    _assert_same_state(orig, read_state_dict(tmp_path / "pt" / f"diffusion_pytorch_model.{fmt}"))
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert cfg_out["_class_name"] == cfg_in["_class_name"]
    for k, v in cfg_in.items():
        if not k.startswith("_") and k in cfg_out:
            assert cfg_out[k] == v, k


def test_fp16_stays_fp16_through_a_pipeline_folder(tmp_path):
    pipe = tmp_path / "pipe"
    for sub, d in (("unet", TINY_UNET), ("vae", TINY_VAE)):
        (pipe / sub).mkdir(parents=True)
        shutil.copy(d / "config.json", pipe / sub / "config.json")
        sd = read_state_dict(d / "diffusion_pytorch_model.safetensors")
        sd = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in sd.items()}
        write_state_dict(sd, pipe / sub / "diffusion_pytorch_model.safetensors")
    p = subprocess.run([sys.executable, "-m", "convert", str(pipe), str(tmp_path / "flax")], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert convert_main([str(tmp_path / "flax"), str(tmp_path / "back")]) == 0
    for sub in ("unet", "vae"):
        _assert_same_state(read_state_dict(pipe / sub / "diffusion_pytorch_model.safetensors"),
                           read_state_dict(tmp_path / "back" / sub / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("damage", ["remove", "rename", "reshape"])
def test_bad_checkpoint_names_the_key(tmp_path, damage, capsys):
    src = tmp_path / "unet"
    src.mkdir()
    shutil.copy(TINY_UNET / "config.json", src)
    sd = read_state_dict(TINY_UNET / "diffusion_pytorch_model.safetensors")
    key = "down_blocks.0.attentions.0.transformer_blocks2.0.attn1.to_q.weight"
    if damage == "remove":
        del sd[key]
    elif damage == "rename":
        sd[key.replace("to_q", "to_query")] = sd.pop(key)
    else:
        sd[key] = sd[key][:, :-1].copy()
    write_state_dict(sd, src / "diffusion_pytorch_model.safetensors")
    assert convert_main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    print(err)
    assert len(err) == 1 and key in err[0]
    assert not (tmp_path / "out").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"_class_name": "CLIPTextModel"}))
    assert convert_main([str(tmp_path / "x"), str(tmp_path / "y")]) == 1
    assert "neither an M3DDM U-Net nor an AutoencoderKL" in capsys.readouterr().err


# -- never delete or overwrite what the user did not ask for (issue 11, item 1) ---------------------------------------

def _tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (symlinks not followed)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _leftovers(*folders: Path) -> list:
    return [f for d in folders if d.exists() for f in d.rglob(".*")]


def test_non_empty_destination_is_refused_and_kept(tmp_path, capsys):
    dst = tmp_path / "models"
    (dst / "notes").mkdir(parents=True)
    (dst / "README.txt").write_text("my own notes\n")
    (dst / "notes" / "a.txt").write_text("keep me\n")
    (dst / "config.json").write_text('{"mine": true}\n')
    before = _tree(dst)
    assert convert_main([str(TINY_VAE), str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0] and "README.txt" in err[0]
    assert _tree(dst) == before and not _leftovers(tmp_path)
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert convert_main([str(TINY_VAE), str(tmp_path / "empty")]) == 0
    assert sorted(f.name for f in (tmp_path / "empty").iterdir()) == ["config.json", "flax_model.safetensors"]


def test_overwrite_replaces_only_its_files(tmp_path, capsys):
    import os

    dst = tmp_path / "pipe"
    (dst / "vae").mkdir(parents=True)
    (dst / "README.txt").write_text("my own notes\n")
    (dst / "vae" / "extra.txt").write_text("keep me\n")
    (dst / "vae" / "config.json").write_text("stale\n")
    (dst / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"an older torch copy")
    src = tmp_path / "src"
    src.mkdir()
    (src / "vae").symlink_to(TINY_VAE)
    old = os.umask(0o027)
    try:
        assert convert_main([str(src), str(dst), "--overwrite"]) == 0
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    assert f"{dst / 'vae'}: vae, PyTorch -> Flax" in captured.out
    # the stale torch weights are kept (not ours to delete) and named, since loaders could pick them up
    assert "diffusion_pytorch_model.safetensors" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert (dst / "README.txt").read_text() == "my own notes\n" and (dst / "vae" / "extra.txt").read_text() == "keep me\n"
    assert (dst / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == b"an older torch copy"
    assert json.loads((dst / "vae" / "config.json").read_text())["_m3ddm_jax"]["kind"] == "vae"
    assert sorted(f.name for f in dst.iterdir()) == ["README.txt", "vae"]  # no unet/ invented, no temporaries
    from m3ddm_jax.interop.vae import load_vae

    load_vae(dst / "vae")  # the replaced files form a loadable model
    assert (dst / "vae" / "flax_model.safetensors").stat().st_mode & 0o777 == 0o640  # the user's umask
    assert not _leftovers(tmp_path)


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)         # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (__LIMIT__, __LIMIT__))
from m3ddm_jax.interop.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("direction", ["to_flax", "to_torch_bin"])
def test_full_disk_leaves_no_partial_file_and_the_destination_untouched(tmp_path, direction):
    """A file-size limit (RLIMIT_FSIZE, no root needed) makes the weights write fail mid-file: one line, exit 1,
    the destination's previous files byte-identical, no temporary left anywhere."""
    dst = tmp_path / "dst"
    src = TINY_UNET
    if direction == "to_torch_bin":
        assert convert_main([str(TINY_UNET), str(tmp_path / "flax")]) == 0
        src = tmp_path / "flax"
    assert convert_main([str(src), str(dst)] + (["--format", "bin"] if direction == "to_torch_bin" else [])) == 0
    (dst / "mine.txt").write_text("keep\n")
    before = _tree(dst)
    big = max(len(v) for v in before.values())
    assert big > 1_000_000  # the tiny U-Net's weights: the limit below cuts them mid-write
    script = FULL_DISK.replace("__LIMIT__", str(big // 2))
    args = [str(src), str(dst), "--overwrite"] + (["--format", "bin"] if direction == "to_torch_bin" else [])
    p = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    err = p.stderr.strip().splitlines()
    print(p.stderr)
    assert p.returncode == 1 and len(err) == 1 and "Traceback" not in p.stderr
    assert err[0].startswith("convert: error: cannot write") and "File too large" in err[0]
    assert _tree(dst) == before and not _leftovers(tmp_path)
    if direction != "to_flax":
        return
    # into a new folder: nothing is created
    p = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "new")] + args[3:], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists() and not _leftovers(tmp_path)


def test_killed_conversion_leaves_only_a_dot_folder_that_the_next_run_removes(tmp_path):
    import os
    import signal
    import time

    dst = tmp_path / "dst"
    # SIGKILL while the weights are being written: a test-only wrapper pauses inside the writer
    script = r"""
import sys, time
import safetensors.numpy as st
real = st.save_file
def slow(arrays, path, *a, **k):
    real(arrays, path, *a, **k)
    print("WRITING", path, flush=True)
    time.sleep(600)
st.save_file = slow
from m3ddm_jax.interop.cli import main
sys.exit(main(sys.argv[1:]))
"""
    p = subprocess.Popen([sys.executable, "-c", script, str(TINY_VAE), str(dst)], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("WRITING"), line
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not dst.exists()
    left = [f.name for f in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".dst.partial-")  # only a dot-named temporary remains
    assert convert_main([str(TINY_VAE), str(dst)]) == 0
    assert [f.name for f in tmp_path.iterdir()] == ["dst"]  # the rerun removed the dead run's temporary


ENOSPC = r"""
import hashlib, json, shutil, subprocess, sys
from pathlib import Path
disk, src, prepared = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
shutil.copytree(prepared, disk / "dst")                  # an earlier conversion, on the small disk
before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (disk / "dst").iterdir()}
(disk / "filler").write_bytes(bytes(900_000 - 350_000))   # of 1 MiB: less room than the VAE's weights
p = subprocess.run([sys.executable, "-m", "convert", src, str(disk / "dst"), "--overwrite"], capture_output=True, text=True)
after = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (disk / "dst").iterdir()}
print(json.dumps({"rc": p.returncode, "err": p.stderr, "same": before == after,
                  "top": sorted(f.name for f in disk.iterdir()), "dst": sorted(after)}))
"""


def test_real_full_disk_leaves_the_destination_untouched(tmp_path):
    """ENOSPC for real: a 1 MiB tmpfs in a user namespace (skipped where unshare cannot mount one)."""
    import shutil

    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no user-namespace tmpfs here (unshare -rm + mount); the RLIMIT_FSIZE test covers this")
    assert convert_main([str(TINY_VAE), str(tmp_path / "prepared")]) == 0
    cmd = (f"mount -t tmpfs -o size=1m tmpfs {disk} && cd {REPO} && "
           f"{sys.executable} -c \"$0\" {disk} {TINY_VAE} {tmp_path / 'prepared'}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", cmd, ENOSPC], capture_output=True, text=True, timeout=600)
    print(p.stdout, p.stderr)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    err = got["err"].strip().splitlines()
    assert got["rc"] == 1 and len(err) == 1 and "Traceback" not in got["err"]
    assert err[0] == f"convert: error: cannot write {disk / 'dst'}: No space left on device"
    assert got["same"] and got["dst"] == ["config.json", "flax_model.safetensors"]  # untouched, no temporary
    assert got["top"] == ["dst", "filler"]
