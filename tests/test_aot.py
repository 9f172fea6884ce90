"""TPU-compiler AOT compiles (``m3ddm_jax.aot``): the real programs, compiled for TPU topologies on this host.

Skipped only when libtpu (extra ``.[tpu-aot]``) is not installed. Compiles are shared through module
fixtures. The mid-config programs use short clips (4 frames at 64 px) to keep compile times small; the
full-size rows compile exactly what users run.
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
def mid_config_json(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO))
    from bench.common import UNET_CONFIGS

    p = tmp_path_factory.mktemp("aot") / "mid_unet.json"
    p.write_text(json.dumps(UNET_CONFIGS["mid"]))
    return p


@pytest.fixture(scope="module")
def v5e8():
    return aot.get_topology("v5e:2x4")


@pytest.fixture(scope="module")
def v5e1():
    return aot.get_topology("v5e:1x1")


def _param_count(unet_config) -> int:
    from flax import nnx

    from m3ddm_jax.interop.unet import abstract_unet

    state = nnx.state(abstract_unet(unet_config), nnx.Param)
    return sum(math.prod(x.shape) for x in __import__("jax").tree.leaves(state))


def test_topologies():
    t = aot.get_topology("v5e:2x4")
    assert (t.n, t.hosts, t.chip.hbm_gib) == (8, 1, 15.75)
    assert aot.get_topology("v4:2x2x1").n == 4  # megacore: one device per chip
    big = aot.get_topology("v5e:16x16")
    assert big.n == 256 and big.hosts > 1
    with pytest.raises(aot.ConfigError, match="unknown TPU generation"):
        aot.get_topology("v9x:2x2")


def test_mid_train_step_compiles_for_v5e8(v5e8, mid_config_json):
    from m3ddm_jax.assets import TINY_VAE

    config = aot.load_config(None, [
        f"--config.model.unet_config={mid_config_json}", f"--config.model.vae={TINY_VAE}",
        "--config.model.compute_dtype=bfloat16", "--config.data.num_frames=4", "--config.data.num_global_frames=4",
        "--config.data.min_frames=4", "--config.data.size=64", "--config.data.global_size=64",
        "--config.mesh.shape.data=2", "--config.mesh.shape.fsdp=4"])
    program = aot.TrainProgram(config, v5e8)
    assert program.divisor == 8
    with pytest.raises(aot.ConfigError, match="multiple of the batch mesh size 8"):
        program.compile(4)
    r = program.compile(8)
    print(f"\n{r.summary()}")
    # parameters + Adam moments (fp32) are sharded over fsdp = 4: each device holds about a quarter of them
    state_bytes = 12 * _param_count(aot.unet_config_of(config))
    assert state_bytes / 4 <= r.argument_bytes < state_bytes / 4 + 0.2 * GIB
    assert r.alias_bytes > 0.9 * state_bytes / 4  # the state is donated
    assert 0 < r.peak_bytes < r.limit_bytes and r.flops > 0


def test_mid_inference_window_compiles_for_v5e8(v5e8, mid_config_json):
    from m3ddm_jax.models.unet3d import UNet3DConfig

    cfg = UNet3DConfig.from_json_file(mid_config_json)
    program = aot.InferProgram(v5e8, cfg, dtype="bfloat16", rows=3, frames=4, size=64, global_frames=4,
                               global_size=64, steps=2)
    r = program.compile()
    print(f"\n{r.summary()}")
    # bf16 parameters sharded over the 8 chips
    assert 2 * _param_count(cfg) / 8 <= r.argument_bytes < 2 * _param_count(cfg) / 8 + 0.05 * GIB
    assert 0 < r.peak_bytes < r.limit_bytes and r.flops > 0


def test_full_size_that_does_not_fit_is_one_line(capsys):
    """fp32, four guidance rows, unchunked attention, one v5e chip: the CLI's one-line error."""
    rc = aot.main(["--topology", "v5e:1x1", "--what", "infer", "--dtype", "float32", "--rows", "4",
                   "--attention-budget-mib", "none", "--steps", "2"])
    err = capsys.readouterr().err.strip()
    print(f"\n{err}")
    assert rc == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("m3ddm_jax.aot: error: infer") and "does not fit on v5e:1x1" in err
    assert " needs " in err and "GiB per device, limit 15.75 GiB" in err
    need = float(err.split(" needs ")[1].split(" GiB")[0])
    assert need > 15.75


def test_full_size_inference_window_fits_one_v5e_in_bf16(v5e1):
    """The default window (three guidance rows, 16 frames at 256 px, 16 global frames, 50 PLMS steps), bf16
    parameters and compute, chunked attention: compiles for ONE v5e chip."""
    program = aot.InferProgram(v5e1, dtype="bfloat16", rows=3)
    r = program.compile()
    print(f"\n{r.summary()}")
    assert r.peak_bytes <= 15.75 * GIB
    assert 2.3 * GIB < r.argument_bytes < 2.6 * GIB  # the 1.3 B parameters in bf16


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
