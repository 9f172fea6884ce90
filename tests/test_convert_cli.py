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
