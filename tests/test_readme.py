"""Every ```python snippet in README.md runs, against the tiny weights that ship in the package.

The snippets are written for a user who ran ``python -m m3ddm_jax.download weights`` in the repository root.
Here ``weights/`` holds the tiny models (``m3ddm_jax/assets/tiny``), step counts shrink to 2 and outputs to
64 px (the README's 256 px cost minutes on 2 cores even for the tiny model); nothing else of the text changes."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from m3ddm_jax.assets import TINY_UNET, TINY_VAE

REPO = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
FAST = [(r"num_inference_steps=\d+", "num_inference_steps=2, output_size=64"), (r"\bsteps=\d+", "steps=2, output_size=64")]


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "weights").mkdir()
    (d / "weights" / "unet").symlink_to(TINY_UNET)
    (d / "weights" / "vae").symlink_to(TINY_VAE)
    (d / "examples").symlink_to(REPO / "examples")
    return d


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_readme_snippet_runs(i, user_dir, monkeypatch):
    code = SNIPPETS[i]
    for pat, rep in FAST:
        code = re.sub(pat, rep, code)
    monkeypatch.chdir(user_dir)
    t = time.perf_counter()
    exec(compile(code, f"README.md snippet {i + 1}", "exec"), {"__name__": f"readme_snippet_{i + 1}"})
    print(f"\nREADME snippet {i + 1}: ran in {time.perf_counter() - t:.1f} s")
    written = [p.name for p in user_dir.iterdir() if p.is_file()]
    print(f"files in the user's folder: {sorted(written)}")
