"""``python -m m3ddm_jax.download DIR`` against a mocked Hugging Face hub (no network), the offline messages of
weight resolution (every missing piece in one line, naming the download command), and the local folder
layouts (a vae-only or unet-only folder, ``--vae DIR``, ``--weights tiny``)."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import m3ddm_jax.weights as W
from m3ddm_jax import download as D
from m3ddm_jax.assets import TINY_UNET, TINY_VAE
from m3ddm_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
ST = "diffusion_pytorch_model.safetensors"

# the release repos as laid out on the hub (file name in the repo -> local file); the M3DDM release keeps its
# U-Net under unet/, M3DDM+ at the root, SD-1.5 its VAE under vae/ next to other pipeline parts
HUB = {
    W.DEFAULT_UNET_REPO: {"config.json": TINY_UNET / "config.json", ST: TINY_UNET / ST, "README.md": None},
    W.M3DDM_UNET_REPO: {"unet/config.json": TINY_UNET / "config.json", f"unet/{ST}": TINY_UNET / ST},
    W.DEFAULT_VAE_REPO: {"vae/config.json": TINY_VAE / "config.json", f"vae/{ST}": TINY_VAE / ST,
                         "unet/config.json": None, "text_encoder/model.safetensors": None, "model_index.json": None},
}


class FakeHub:
    """``list_repo_files`` / ``snapshot_download`` over :data:`HUB`, with a local cache that survives 'offline'."""

    def __init__(self, root: Path):
        self.root, self.online, self.fetched = root, True, []

    def list_repo_files(self, repo_id, **_):
        if repo_id not in HUB:
            raise RuntimeError(f"404 Client Error: repository {repo_id} not found")
        return sorted(HUB[repo_id])

    def snapshot_download(self, repo_id, *, allow_patterns=None, local_files_only=False, **_):
        from huggingface_hub.errors import LocalEntryNotFoundError

        snap = self.root / repo_id.replace("/", "--")
        if local_files_only:
            if not snap.is_dir():
                raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
            return str(snap)
        assert self.online, "a download was attempted while offline"
        for name, src in HUB[repo_id].items():
            if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            self.fetched.append((repo_id, name))
            dst = snap / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src is None:
                dst.write_text("{}")
            else:
                shutil.copyfile(src, dst)
        return str(snap)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(W, "_hub_reachable", lambda timeout=3.0: fake.online)
    monkeypatch.setenv("M3DDM_JAX_CACHE", str(tmp_path / "m3ddm-cache"))
    return fake


def _leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model))


def _same_models(a, b):
    for x, y in zip(a, b):
        la, lb = _leaves(x), _leaves(y)
        assert len(la) == len(lb) > 0
        for u, v in zip(la, lb):
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(np.asarray(u), np.asarray(v))


def _tmp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".download-" in p.name]


def test_download_end_to_end_with_mocked_hub(hub, tmp_path, capsys):
    """One command -> DIR/unet + DIR/vae (converted Flax), loadable with load_models and bit-identical to the
    PyTorch files; only the U-Net's and the VAE's files are fetched."""
    import m3ddm_jax

    dest = tmp_path / "weights"
    assert D.main([str(dest)]) == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in dest.iterdir()) == ["unet", "vae"]
    for piece in ("unet", "vae"):
        assert sorted(p.name for p in (dest / piece).iterdir()) == ["config.json", "flax_model.safetensors"]
    assert {n for _, n in hub.fetched} == {"config.json", ST, "vae/config.json", f"vae/{ST}"}  # nothing else
    assert "fetching the U-Net MurakawaTakuya/M3DDM-Plus" in err and "converting the VAE to Flax" in err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"wrote {re.escape(str(dest))}: unet/ [\d.]+ MB \(MurakawaTakuya/M3DDM-Plus\) \+ vae/ [\d.]+ KB "
        rf"\(stable-diffusion-v1-5/stable-diffusion-v1-5\) = [\d.]+ MB, converted to Flax, in \d+ s; "
        rf"use it: python infer.py INPUT --ratio 16:9 --weights {re.escape(str(dest))}", lines[0]), lines
    assert not _tmp_leftovers(tmp_path)

    _same_models(m3ddm_jax.load_models(dest), m3ddm_jax.load_models(TINY_UNET, TINY_VAE))
    from m3ddm_jax.interop.unet import load_unet_flat

    (_, a), (_, b) = load_unet_flat(dest / "unet"), load_unet_flat(TINY_UNET)  # as stored, no cast on loading
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert W.resolve_weights(dest) == (dest / "unet", dest / "vae")

    # the original M3DDM release keeps its U-Net under unet/; --dtype casts while converting
    assert D.main([str(tmp_path / "m3ddm"), "--model", "m3ddm", "--dtype", "float16"]) == 0
    from m3ddm_jax.interop.flax_io import load_flax_folder

    _, _, flat = load_flax_folder(tmp_path / "m3ddm" / "unet")
    assert {a.dtype for a in flat.values() if a.dtype.kind == "f"} == {np.dtype("float16")}

    # offline afterwards: the local hub cache is enough, nothing is fetched again
    hub.online, n = False, len(hub.fetched)
    assert D.main([str(tmp_path / "again")]) == 0
    assert D.main([str(tmp_path / "again_m3ddm"), "--model", "m3ddm", "--only", "unet"]) == 0  # found under unet/
    assert len(hub.fetched) == n
    _same_models(m3ddm_jax.load_models(tmp_path / "again"), m3ddm_jax.load_models(dest))


def test_download_refuses_non_empty_dir_and_overwrite_keeps_other_files(hub, tmp_path, capsys):
    dest = tmp_path / "mine"
    (dest / "unet").mkdir(parents=True)
    (dest / "unet" / "notes.txt").write_text("my notes")
    (dest / "keep.txt").write_text("keep me")
    assert D.main([str(dest)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0]
    assert (dest / "unet" / "notes.txt").read_text() == "my notes" and (dest / "keep.txt").read_text() == "keep me"
    assert not hub.fetched  # refused before any download
    assert D.main([str(dest), "--overwrite"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt", "unet", "vae"]
    assert (dest / "keep.txt").read_text() == "keep me"
    assert W.is_flax_folder(dest / "unet") and not (dest / "unet" / "notes.txt").exists()
    assert not _tmp_leftovers(tmp_path)
    # an empty folder is fine without --overwrite
    (tmp_path / "empty").mkdir()
    assert D.main([str(tmp_path / "empty"), "--only", "vae"]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["vae"]
    assert f"--vae {tmp_path / 'empty'}" in capsys.readouterr().out


def test_failed_conversion_leaves_nothing(hub, tmp_path, monkeypatch, capsys):
    from m3ddm_jax.interop import cli

    real = cli.convert_folder

    def failing(src, dst, *a, **k):
        if "vae" in str(dst):
            raise CheckpointError("simulated corrupt VAE file")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(cli, "convert_folder", failing)
    assert D.main([str(tmp_path / "w")]) == 1
    assert "simulated corrupt VAE file" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not _tmp_leftovers(tmp_path)


def test_download_offline_reports_everything_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), M3DDM_JAX_CACHE=str(tmp_path / "c"))
    p = subprocess.run([sys.executable, "-m", "m3ddm_jax.download", str(tmp_path / "w")], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert err[0].startswith("m3ddm-download: error: ")
    assert W.DEFAULT_UNET_REPO in err[0] and W.DEFAULT_VAE_REPO in err[0] and "unreachable" in err[0]
    assert not (tmp_path / "w").exists() and not _tmp_leftovers(tmp_path)


def test_infer_offline_message_names_the_download_command(tmp_path):
    """infer.py --weights m3ddm+ offline with empty caches: one line, both pieces, the command and the layout."""
    from m3ddm_jax.video import write_video

    src = write_video(tmp_path / "in.mp4", np.zeros((2, 32, 18, 3), np.uint8), 24, lossless=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), M3DDM_JAX_CACHE=str(tmp_path / "c"),
               TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, str(REPO / "infer.py"), str(src), "--ratio", "16:9", "--weights", "m3ddm+",
                        "--output", str(tmp_path / "out.mp4")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    line = err[0]
    assert line.startswith("infer.py: error: ")
    assert "the U-Net MurakawaTakuya/M3DDM-Plus and the SD-1.5 VAE" in line
    assert "`python -m m3ddm_jax.download DIR --model m3ddm+`" in line
    assert "DIR/unet and DIR/vae" in line and "--weights DIR" in line
    assert "huggingface-cli" not in line and not (tmp_path / "out.mp4").exists()


def test_offline_messages_for_partial_folders(hub, tmp_path):
    hub.online = False
    # a folder holding only vae/: refused with what to do; the same folder works as --vae
    only_vae = tmp_path / "only_vae"
    only_vae.mkdir()
    (only_vae / "vae").symlink_to(TINY_VAE, target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"holds vae/ but no unet/.*--vae .*only_vae") as e:
        W.resolve_weights(only_vae)
    assert "python -m m3ddm_jax.download DIR --model m3ddm+ --only unet" in str(e.value)
    assert W.resolve_weights(TINY_UNET, vae=only_vae) == (TINY_UNET, only_vae / "vae")
    # a folder holding only unet/: the VAE is missing, named with its command and where it can go
    only_unet = tmp_path / "only_unet"
    only_unet.mkdir()
    (only_unet / "unet").symlink_to(TINY_UNET, target_is_directory=True)
    with pytest.raises(CheckpointError) as e:
        W.resolve_weights(only_unet)
    msg = str(e.value)
    assert msg.startswith("the SD-1.5 VAE (stable-diffusion-v1-5/stable-diffusion-v1-5, subfolder vae) is not on this machine")
    assert "`python -m m3ddm_jax.download DIR --only vae`" in msg and "--vae DIR" in msg and str(only_unet) in msg
    assert "U-Net" not in msg
    # a hub U-Net with a local VAE: only the U-Net is missing
    with pytest.raises(CheckpointError, match=r"^the U-Net alimama-creative/M3DDM-Video-Outpainting is not on this "
                                              r"machine.*--model m3ddm --only unet"):
        W.resolve_weights("m3ddm", vae=only_vae)
    # eval.py names its own options
    with pytest.raises(CheckpointError, match=r"--config\.weights DIR"):
        W.resolve_weights(None, weights_flag="--config.weights", vae_flag="--config.vae")
    # a VAE folder passed as the U-Net
    with pytest.raises(CheckpointError, match="is a VAE folder, not a U-Net"):
        W.resolve_weights(TINY_VAE)


def test_weights_tiny_is_the_shipped_model():
    assert W.resolve_weights("tiny") == (TINY_UNET, TINY_VAE)
    assert W.resolve_weights("TINY", vae=TINY_VAE) == (TINY_UNET, TINY_VAE)
    assert "'tiny'" in W.WEIGHTS_HELP and "noise" in W.WEIGHTS_HELP


def test_console_script_is_declared():
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["m3ddm-download"].split(":")
    assert getattr(importlib.import_module(module), func) is D.main
