"""TPU-compiler AOT compiles (``m3ddm_jax.aot``): the real programs, compiled for TPU topologies on this host.

Skipped only when libtpu (extra ``.[tpu-aot]``) is not installed. The compiles themselves are runs of the real
command line, ``python -m m3ddm_jax.aot``, started in the background at the end of collection
(``tests/aot_jobs.py``, ``tests/conftest.py``) so that their minutes overlap the rest of the suite; these tests
run last and read their results. The mid-config programs use short clips (4 frames at 64 px) to keep their
compiles to a few minutes; the full-size rows compile exactly what users run.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from m3ddm_jax import aot

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not aot.libtpu_available(),
                                reason="libtpu (the TPU compiler) is not installed: pip install -e '.[tpu-aot]'")
GIB = 2**30


@pytest.fixture(scope="module")
def mid_config():
    sys.path.insert(0, str(REPO))
    from bench.common import UNET_CONFIGS

    from m3ddm_jax.models.unet3d import UNet3DConfig

    return UNet3DConfig.from_dict(json.loads(json.dumps(UNET_CONFIGS["mid"])))


def _param_count(unet_config) -> int:
    import jax
    from flax import nnx

    from m3ddm_jax.interop.unet import abstract_unet

    state = nnx.state(abstract_unet(unet_config), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def _ok(job):
    rc, res, out, err = job
    tail = "\n".join(err.strip().splitlines()[-5:])
    assert rc == 0 and res is not None, f"compile failed (exit {rc}): {tail}"
    print(f"\n{out.strip().splitlines()[-1]}")
    return res


def test_topologies():
    t = aot.get_topology("v5e:2x4")
    assert (t.n, t.hosts, t.chip.hbm_gib) == (8, 1, 15.75)
    assert aot.get_topology("v4:2x2x1").n == 4  # megacore: one device per chip
    big = aot.get_topology("v5e:16x16")
    assert big.n == 256 and big.hosts > 1
    with pytest.raises(aot.ConfigError, match="unknown TPU generation"):
        aot.get_topology("v9x:2x2")


def test_train_batch_must_divide_over_the_batch_mesh(tmp_path):
    """The train program checks the batch against the mesh before compiling anything."""
    sys.path.insert(0, str(REPO))
    from tests.aot_jobs import argv_of

    overrides = [a for a in argv_of("mid-train-v5e8", tmp_path) if a.startswith("--config.")]
    program = aot.TrainProgram(aot.load_config(None, overrides), aot.get_topology("v5e:2x4"))
    assert program.divisor == 8  # data 2 x fsdp 4
    with pytest.raises(aot.ConfigError, match="multiple of the batch mesh size 8"):
        program.compile(4)


@pytest.mark.aot_job("mid-train-v5e8")
def test_mid_train_step_compiles_for_v5e8(aot_jobs, mid_config):
    r = _ok(aot_jobs.wait("mid-train-v5e8"))
    assert (r["topology"], r["what"], r["devices"], r["batch"]) == ("v5e:2x4", "train", 8, 8)
    # parameters + Adam moments (fp32) are sharded over fsdp = 4: each device holds about a quarter of them
    state_bytes = 12 * _param_count(mid_config)
    assert state_bytes / 4 <= r["argument_bytes"] < state_bytes / 4 + 0.2 * GIB
    assert r["alias_bytes"] > 0.9 * state_bytes / 4  # the state is donated
    assert 0 < r["peak_bytes"] < r["limit_bytes"] == 15.75 * GIB and r["flops"] > 0


@pytest.mark.aot_job("mid-infer-v5e8")
def test_mid_inference_window_compiles_for_v5e8(aot_jobs, mid_config):
    r = _ok(aot_jobs.wait("mid-infer-v5e8"))
    assert (r["topology"], r["what"], r["devices"]) == ("v5e:2x4", "infer", 8)
    # bf16 parameters sharded over the 8 chips
    n = _param_count(mid_config)
    assert 2 * n / 8 <= r["argument_bytes"] < 2 * n / 8 + 0.05 * GIB
    assert 0 < r["peak_bytes"] < r["limit_bytes"] and r["flops"] > 0


@pytest.mark.aot_job("full-infer-v5e1-fp32-unchunked")
def test_full_size_that_does_not_fit_is_one_line(aot_jobs):
    """fp32, four guidance rows, unchunked attention, one v5e chip: the command's whole stderr is one line."""
    rc, res, out, err = aot_jobs.wait("full-infer-v5e1-fp32-unchunked")
    print(f"\n{err.strip()}")
    assert rc == 1 and res is None
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("m3ddm_jax.aot: error: infer") and "does not fit on v5e:1x1 (TPU v5e)" in err
    assert " needs " in err and "GiB per device, limit 15.75 GiB" in err
    need = float(err.split(" needs ")[1].split(" GiB")[0])
    assert need > 15.75


@pytest.mark.aot_job("full-infer-v5e1-bf16")
def test_full_size_inference_window_fits_one_v5e_in_bf16(aot_jobs):
    """The default window (three guidance rows, 16 frames at 256 px, 16 global frames, 50 PLMS steps), bf16
    parameters and compute, chunked attention: compiles for ONE v5e chip."""
    r = _ok(aot_jobs.wait("full-infer-v5e1-bf16"))
    assert (r["topology"], r["devices"], r["batch"]) == ("v5e:1x1", 1, 1)
    assert "3 guidance rows, 16 frames at 256 px, 16 global frames, bfloat16" in r["settings"]
    assert "50 plms steps" in r["settings"]
    assert r["peak_bytes"] <= 15.75 * GIB
    assert 2.3 * GIB < r["argument_bytes"] < 2.6 * GIB  # the 1.3 B parameters in bf16


def test_parse_oom_and_overrides():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (83.83G) "
           "exceeds available HBM (15.75G).")
    need, limit = aot.parse_oom(msg)
    assert aot.is_oom(msg) and need == pytest.approx(83.83 * GIB) and limit == pytest.approx(15.75 * GIB)
    config = aot.load_config(None, ["--config.model.remat=True", "--config.train.batch_size=64",
                                    "--config.mesh.axes=('data', 'fsdp')"])
    assert config.model.remat is True and config.train.batch_size == 64
    with pytest.raises(aot.ConfigError, match="no field"):
        aot.load_config(None, ["--config.model.nope=1"])
    with pytest.raises(aot.ConfigError, match="not a int"):
        aot.load_config(None, ["--config.train.batch_size=many"])
