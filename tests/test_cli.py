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


def _one_line_error(r, script: str) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert lines[0].startswith(f"{script}: error: "), lines
    return lines[0]


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_bad_override_is_one_line(script):
    args = ["--config", REPO / "configs" / ("tiny.py" if script == "train.py" else "eval_davis.py")]
    for bad, needle in (("--config.optim.nope=1" if script == "train.py" else "--config.metrics.nope=1",
                         "has no field"),
                        ("--no_such_flag", "no_such_flag")):
        r = _run(REPO / script, *args, bad, "--print_config")
        assert needle in _one_line_error(r, script)
    r = _run(REPO / script, "--config", REPO / "no_such_config.py", "--print_config")
    assert _one_line_error(r, script) == (f"{script}: error: cannot load the config: [Errno 2] No such file or "
                                          f"directory: '{REPO / 'no_such_config.py'}'")


def test_train_typo_did_you_mean(tmp_path):
    """The issue's example: ``--config.train.step=5`` (for ``steps``) is one line with the right field."""
    r = _run(REPO / "train.py", "--config", "configs/tiny.py", "--config.train.step=5", "--workdir", tmp_path / "w")
    assert _one_line_error(r, "train.py") == (
        "train.py: error: --config.train.step=5: the config has no field 'train.step'; did you mean "
        "--config.train.steps? (--print_config lists every field)")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("bad,want", [
    ("--config.trian.steps=5", "did you mean --config.train.steps?"),          # a wrong section
    ("--config.optim.lr_=5", "did you mean --config.optim.lr?"),
    ("--config.mesh.shape.dta=2", "did you mean --config.mesh.shape.data?"),   # nested
    ("--config.optim.steps=5", "did you mean --config.preview.steps or --config.train.steps?"),  # elsewhere
    ("--config.data.dir.x=1", "data.dir is a str value, not a section"),
    ("--config.zzzz=1", "the config has no field 'zzzz' (--print_config lists every field)"),  # nothing close
])
def test_unknown_field_suggestions(bad, want):
    r = _run(REPO / "train.py", "--config", "configs/tiny.py", bad, "--print_config")
    assert want in _one_line_error(r, "train.py")


def test_eval_typo_did_you_mean():
    # with an explicit --config the override is applied while flags are parsed (cli_common's parser)
    r = _run(REPO / "eval.py", "--config", "configs/eval_davis.py", "--config.stpes=3", "--print_config")
    assert "--config.stpes=3: the config has no field 'stpes'; did you mean --config.steps?" in _one_line_error(
        r, "eval.py")
    # with eval.py's default config file, ml_collections applies it while the flag is being defined
    r = _run(REPO / "eval.py", "--config.metrics.lpip=1", "--print_config")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "the config has no field 'metrics.lpip'; did you mean --config.metrics.lpips?" in lines[0]


@pytest.mark.parametrize("bad,want", [
    ("--config.train.steps=abc", "--config.train.steps=abc: train.steps takes an int (now 20), got 'abc'"),
    ("--config.optim.lr=fast", "--config.optim.lr=fast: optim.lr takes a float (now 0.001), got 'fast'"),
    ("--config.model.remat=maybe", "model.remat takes True or False (now False), got 'maybe'"),
    ("--config.train.batch_size=1.5", "train.batch_size takes an int (now 2), got '1.5'"),
])
def test_unparsable_value_is_one_line(bad, want):
    r = _run(REPO / "train.py", "--config", "configs/tiny.py", bad, "--print_config")
    assert want in _one_line_error(r, "train.py")


def test_bad_values_are_one_line(tmp_path):
    """Values that parse but cannot work: one line naming the field, before any model is built (they used to
    be a ZeroDivisionError after the first step's compile, or a traceback from deep inside). Every rule is
    covered in-process by tests/test_train.py::test_check_config_rejects_bad_values; these go through train.py."""
    cases = [("--config.checkpoint.every=0", "train.py: error: checkpoint.every must be >= 1, got 0"),
             ("--config.mask.probs=foo", "train.py: error: mask.probs must be a tuple of numbers")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, REPO / "train.py", "--config", REPO / "configs" / "tiny.py", bad,
                               "--config.mask.preset=", f"--config.data.dir={tmp_path}", "--workdir",
                               tmp_path / f"w{i}"], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for i, (bad, _) in enumerate(cases)]
    for (bad, want), p in zip(cases, procs):
        out, err = p.communicate(timeout=600)
        line = _one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), "train.py")
        assert line.startswith(want), (bad, line)
    assert not list(tmp_path.glob("w*"))  # nothing written
