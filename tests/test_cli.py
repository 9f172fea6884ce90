"""Entry scripts: ``--help`` exits 0 with the usage, ``--print_config`` prints the resolved config (overrides
applied) and exits 0, a bad flag or override is one line on stderr."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=300)


@pytest.mark.parametrize("script,flag", [("train.py", "--help"), ("train.py", "-h"), ("eval.py", "--help"),
                                         ("eval.py", "--helpfull")])
def test_help_exits_zero(script, flag, tmp_path):
    r = _run(REPO / script, flag, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--config" in r.stdout and "--print_config" in r.stdout and "Traceback" not in r.stderr
    assert "python " + script in r.stdout  # the module docstring's usage lines


def test_download_help_exits_zero():
    r = _run("-m", "m3ddm_jax.download", "--help")
    assert r.returncode == 0 and "DIR/unet and DIR/vae" in r.stdout and "--overwrite" in r.stdout


def test_print_config_shows_overrides(tmp_path):
    r = _run(REPO / "train.py", "--config", REPO / "configs" / "tiny.py", "--config.optim.lr=0.25",
             "--config.data.dir=/my/videos", "--print_config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "optim.lr = 0.25" in lines and "data.dir = '/my/videos'" in lines and "name = 'tiny'" in lines
    assert not list(tmp_path.iterdir())  # printing the config writes nothing

    r = _run(REPO / "eval.py", "--config.steps=7", "--config.data.dir=/x", "--print_config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "steps = 7" in lines and "data.dir = '/x'" in lines
    assert "data.sequences = 'auto'" in lines and "output_dir = ''" in lines  # the eval defaults


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_bad_override_is_one_line(script):
    args = ["--config", REPO / "configs" / ("tiny.py" if script == "train.py" else "eval_davis.py")]
    for bad, needle in (("--config.optim.nope=1" if script == "train.py" else "--config.metrics.nope=1",
                         "has no field 'nope'"),
                        ("--no_such_flag", "no_such_flag")):
        r = _run(REPO / script, *args, bad, "--print_config")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith(f"{script}: error: ") and needle in lines[0]
    r = _run(REPO / script, "--config", REPO / "no_such_config.py", "--print_config")
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"{script}: error: cannot load the config: [Errno 2] No such file or "
                                             f"directory: '{REPO / 'no_such_config.py'}'"]
