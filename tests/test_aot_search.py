"""``m3ddm_jax.aot.max_batch`` (the search over compile results) and the one-line error, without a compiler:
a fake program whose memory is linear (or not) in the batch."""
from __future__ import annotations

import pytest

from m3ddm_jax import aot

GIB = 2**30


class FakeProgram:
    what = "train"

    def __init__(self, divisor, fixed_gib, per_clip_gib, limit_gib=15.75, bump=None):
        self.divisor, self.fixed, self.per, self.limit, self.bump = divisor, fixed_gib, per_clip_gib, limit_gib, bump
        self.compiled = []

    def need(self, batch):
        extra = self.bump(batch) if self.bump else 0.0
        return (self.fixed + self.per * batch + extra) * GIB

    def compile(self, batch):
        self.compiled.append(batch)
        need = self.need(batch)
        if need > self.limit * GIB:
            raise aot.DoesNotFitError(f"train (batch {batch}) does not fit on v5e:2x4 (TPU v5e): needs "
                                      f"{need / GIB:.2f} GiB per device, limit {self.limit:.2f} GiB",
                                      need, self.limit * GIB)
        return aot.CompileResult(topology="v5e:2x4", what="train", batch=batch, devices=8, argument_bytes=int(need),
                                 output_bytes=0, alias_bytes=0, temp_bytes=0, flops=1e12, compile_s=0.0,
                                 limit_bytes=self.limit * GIB, peak_tflops=197.0)


def brute_force(p: FakeProgram) -> int:
    k = 0
    while p.need((k + 1) * p.divisor) <= p.limit * GIB:
        k += 1
    return k * p.divisor


@pytest.mark.parametrize("divisor,fixed,per,bump", [
    (8, 3.0, 0.11, None),                                  # linear: the slope's guess is right
    (8, 3.0, 0.11, lambda b: 0.9 * (b > 64)),              # a step the slope does not see
    (4, 1.0, 0.013, lambda b: 1e-4 * b * b),               # superlinear: the guess overshoots
    (8, 15.0, 0.05, None),                                 # only the smallest batch fits
])
def test_max_batch_finds_the_largest_fitting_batch(divisor, fixed, per, bump):
    p = FakeProgram(divisor, fixed, per, bump=bump)
    batch, res, tried = aot.max_batch(p, log=lambda s: None)
    assert batch == brute_force(p) and res.batch == batch
    assert len(p.compiled) <= (4 if bump is None else 12)  # linear memory: k=1, 2, the guess, the next one
    assert any(b == batch + divisor and not ok for b, ok, _ in tried)  # the next batch was seen to fail


def test_max_batch_nothing_fits():
    p = FakeProgram(8, 16.0, 0.1)
    batch, res, tried = aot.max_batch(p, log=lambda s: None)
    assert (batch, res) == (0, None) and tried == [(8, False, pytest.approx(16.8 * GIB))]


def test_compile_result_numbers():
    r = aot.CompileResult(topology="v5e:2x4", what="train", batch=8, devices=8, argument_bytes=3 * GIB,
                          output_bytes=3 * GIB, alias_bytes=3 * GIB, temp_bytes=5 * GIB, flops=1.97e14,
                          compile_s=1.0, limit_bytes=15.75 * GIB, peak_tflops=197.0)
    assert r.peak_bytes == 8 * GIB and r.step_lower_bound_s == pytest.approx(1.0)
    assert "peak 8.00 GiB of 15.75 GiB" in r.summary()


class ProbedProgram(FakeProgram):
    """A program compiled under the memory probe's 1 MiB limit: every compile fails, stating its need."""

    topo = aot.Topology(name="v5e:2x4", chip=aot.CHIPS["v5e"], devices=list(range(8)), hosts=1)
    settings = "fake"

    def compile(self, batch):
        self.compiled.append(batch)
        need = self.need(batch)
        raise aot.DoesNotFitError(f"train (batch {batch}) does not fit on v5e:2x4 (TPU v5e): needs "
                                  f"{need / GIB:.2f} GiB per device, limit 0.00 GiB", need, 2**20)


def test_memory_probe_judges_the_need_against_the_chip_and_searches():
    inner = ProbedProgram(8, 3.0, 0.11)
    probe = aot.MemoryProbe(inner)
    r = probe.compile(16)
    assert r.probe and r.peak_bytes == pytest.approx((3.0 + 0.11 * 16) * GIB) and r.limit_bytes == 15.75 * GIB
    assert "needs 4.76 GiB per device of 15.75 GiB (memory probe" in r.summary()
    with pytest.raises(aot.DoesNotFitError, match=r"needs 16.\d\d GiB per device, limit 15.75 GiB \(memory probe\)"):
        probe.compile(8 * 15)
    batch, res, _ = aot.max_batch(probe, log=lambda s: None)
    assert batch == brute_force(inner) and res.probe


def test_memory_probe_must_come_before_libtpu(monkeypatch):
    monkeypatch.setattr(aot, "_LIBTPU_LOADED", True)
    with pytest.raises(RuntimeError, match="before libtpu is loaded"):
        aot.enable_memory_probe()
    monkeypatch.setattr(aot, "_LIBTPU_LOADED", False)
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_foo=1")
    aot.enable_memory_probe()
    import os

    assert os.environ["LIBTPU_INIT_ARGS"] == f"--xla_foo=1 --xla_tpu_max_hbm_size_mib={aot.PROBE_HBM_MIB}"


class RealLimitProgram(FakeProgram):
    """A real compile whose need is ``probe_ratio`` above what the memory probe states (as the compiler's:
    batch 144 on v5e-8 probed 15.43 GiB and needed 17.41); failures are cheap, successes are counted."""

    def __init__(self, *a, probe_ratio=1.13, **k):
        super().__init__(*a, **k)
        self.ratio = probe_ratio

    def need(self, batch):
        return super().need(batch) * self.ratio


@pytest.mark.parametrize("divisor,fixed,per,bump", [
    (8, 2.7, 0.085, None),                              # the v5e-8 numbers, roughly
    (4, 1.0, 0.2, None),
    (8, 3.0, 0.06, lambda b: 1e-4 * b * b),             # superlinear
    (8, 3.0, 0.11, lambda b: 0.9 * (b > 64)),           # a step
])
def test_max_batch_from_descends_from_the_probe_bound_to_the_real_maximum(divisor, fixed, per, bump):
    real = RealLimitProgram(divisor, fixed, per, bump=bump)
    probed = aot.MemoryProbe(ProbedProgram(divisor, fixed, per, bump=bump))
    bound, _, _ = aot.max_batch(probed, log=lambda s: None)
    truth = brute_force(real)
    assert bound > truth  # the probe's answer is above what a real compile fits
    batch, res, tried = aot.max_batch_from(real, bound, log=lambda s: None)
    fits = [b for b, ok, _ in tried if ok]
    print(f"\nprobe bound {bound}, real maximum {truth}: compiled {[(b, ok) for b, ok, _ in tried]}")
    assert batch == truth and res.batch == truth
    assert any(b == truth + divisor and not ok for b, ok, _ in tried)  # bracketed
    assert len(fits) == 1 and len(tried) <= 6  # one full compile; the failures are cheap


def test_max_batch_from_nothing_fits():
    p = FakeProgram(8, 16.0, 0.1)
    batch, res, tried = aot.max_batch_from(p, 64, log=lambda s: None)
    assert (batch, res) == (0, None) and all(not ok for _, ok, _ in tried) and tried[-1][0] == 8


def test_max_batch_from_concave_memory_climbs_back():
    """Memory that grows more slowly near the top (the real v5e-8 needs: 16.35 GiB at 120, 17.11 at 136, 17.41
    at 144) makes the secant overshoot: the search then climbs with full compiles until one fails."""
    import math

    real = RealLimitProgram(8, 1.0, 0.0, probe_ratio=1.0, bump=lambda b: 1.45 * math.sqrt(b))
    truth = brute_force(real)
    batch, res, tried = aot.max_batch_from(real, 160, log=lambda s: None)
    print(f"\nreal maximum {truth}: compiled {[(b, ok) for b, ok, _ in tried]}")
    assert batch == truth and any(b == truth + 8 and not ok for b, ok, _ in tried)


def test_max_batch_from_climbs_when_the_start_fits():
    """The probe can understate too (v5p-8: 93.62 GiB probed at 408, 90.79 GiB real): from a start that fits
    the search goes up with full compiles until one does not."""
    real = RealLimitProgram(4, 1.0, 0.2, probe_ratio=0.97)
    truth = brute_force(real)
    batch, res, tried = aot.max_batch_from(real, truth - 8, log=lambda s: None)
    assert batch == truth and [ok for _, ok, _ in tried] == [True, True, True, False]
