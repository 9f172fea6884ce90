"""What fits where: TPU-compiler AOT compiles of the full model (not run by CI; needs ``.[tpu-aot]``).

Each row is one ``python -m m3ddm_jax.aot`` run in its own process (``--json`` into ``--out``); the table is
built from the JSON files, so rows can be (re)run one at a time (``--only NAME``) and the table printed from
what is there (``--table``).

    python bench/aot.py                       # every row, then the table
    python bench/aot.py --only train-v5e-8    # one row
    python bench/aot.py --table               # the table from the saved rows

Training rows: the full model, the paper's clips (16 frames + 16 global frames at 128 px), bf16 compute
with fp32 Adam master weights, remat, FSDP over the host's chips (v5e-256: data 32 x fsdp 8). ``batch N`` rows
are full compiles (code generated: per-device bytes, FLOPs, compile time); ``max`` rows search the largest
global batch with memory probes (``--memory-probe``: the compiler stops at memory assignment and states the
need, about 1/5 of a full compile), which is where the search by real compiles starts: a probe's need is
not a real compile's (more on v5p, less on v5e). ``fit`` rows run that search (``--max-batch --start N``):
batches that do not fit fail at memory assignment as cheaply as probes, those that fit are full compiles,
and the answer is bracketed by a failure at the next batch. Inference rows: one window, 50 PLMS steps, 16 frames at 256 px (32x32
latents), 16 global frames, on ONE chip.

Cost on the host (2 cores, 24 GiB + swap): the full-size inference window compiles in about 10 CPU-minutes
(6.7 GiB resident), the full-size training step in about 21 (20 GiB resident: add swap on a 24 GiB machine),
a training memory probe in about 5.

Columns: per-device peak (arguments + outputs - aliased + temporaries; for probes the compiler's stated need)
and the compiler's limit, FLOPs per device (XLA cost analysis; a ``fori_loop``/``lax.map`` body counts once,
so inference FLOPs are per denoising step; probe rows scale the full compile's FLOPs per clip), the step-time
lower bound (FLOPs / the chip's bf16 peak), and for training the loader workers each host needs so that
input keeps up with that bound (clips per host per step / bound / clips per second of one worker, from
``bench/data.py --json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--what", "train", "--config", "configs/m3ddm_plus.py", "--config.model.init=",
         "--config.model.compute_dtype=bfloat16", "--config.model.remat=True"]
FSDP8 = ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=8"]
FSDP4 = ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=4"]
PROBE_MAX = ["--memory-probe", "--max-batch"]
ROWS = {
    "infer-v5e-1-bf16": ["--topology", "v5e:1x1", "--what", "infer", "--dtype", "bfloat16"],
    "infer-v5e-1-fp32-4rows-unchunked": ["--topology", "v5e:1x1", "--what", "infer", "--dtype", "float32",
                                         "--rows", "4", "--attention-budget-mib", "none"],
    "train-v5e-8": ["--topology", "v5e:2x4", *TRAIN, *FSDP8, "--batch", "8"],
    "train-v5e-8-max": ["--topology", "v5e:2x4", *TRAIN, *FSDP8, *PROBE_MAX],
    "train-v4-8-max": ["--topology", "v4:2x2x1", *TRAIN, *FSDP4, *PROBE_MAX],
    "train-v6e-8-max": ["--topology", "v6e:2x4", *TRAIN, *FSDP8, *PROBE_MAX],
    "train-v5p-8-max": ["--topology", "v5p:2x2x1", *TRAIN, *FSDP4, *PROBE_MAX],
    "train-v5e-8-fit": ["--topology", "v5e:2x4", *TRAIN, *FSDP8, "--max-batch"],
    "train-v4-8-fit": ["--topology", "v4:2x2x1", *TRAIN, *FSDP4, "--max-batch"],
    "train-v6e-8-fit": ["--topology", "v6e:2x4", *TRAIN, *FSDP8, "--max-batch"],
    "train-v5p-8-fit": ["--topology", "v5p:2x2x1", *TRAIN, *FSDP4, "--max-batch"],
    "train-v5e-256": ["--topology", "v5e:16x16", *TRAIN, "--config.mesh.shape.data=32",
                      "--config.mesh.shape.fsdp=8", "--batch", "256"],
}


def run_row(name: str, out: Path, extra: list[str]) -> None:
    dest = out / f"{name}.json"
    if name.endswith("-fit"):  # real compiles from the probe search's answer (run first if not saved)
        probe = out / f"{name[:-len('-fit')]}-max.json"
        if not probe.exists():
            run_row(probe.stem, out, [])
        r = json.loads(probe.read_text())
        if "max_batch" not in r:
            print(f"== {name}: skipped, the probe search {probe.stem} found no batch", flush=True)
            return
        extra = [*extra, "--start", str(r["max_batch"])]
    cmd = [sys.executable, "-m", "m3ddm_jax.aot", *ROWS[name], *extra, "--json", str(dest)]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(("infer", "train", "  batch", "max",
                                                                                "m3ddm_jax.aot"))]
    print("\n".join(lines), flush=True)
    if p.returncode != 0:  # record the one-line error (e.g. does not fit) as the row's result
        err = next((ln for ln in lines if ln.startswith("m3ddm_jax.aot: error")), p.stderr.strip()[-300:])
        dest.write_text(json.dumps({"error": err, "wall_s": time.perf_counter() - t}))


def _gib(b) -> str:
    return f"{b / 2**30:.2f}"


def _train_flops_per_clip(out: Path) -> float | None:
    """FLOPs per clip of the full training compiles (per device x devices / global batch)."""
    for name in ("train-v5e-8", "train-v5e-256"):
        f = out / f"{name}.json"
        if f.exists():
            r = json.loads(f.read_text())
            if "error" not in r and r.get("flops"):
                return r["flops"] * r["devices"] / r["batch"]
    return None


def table(out: Path, clips_per_worker: float) -> str:
    rows = ["| row | topology | task, settings | per-device peak / limit (GiB) | batch | TFLOP/device | "
            "step >= (ms) | loader workers/host | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
    per_clip = _train_flops_per_clip(out)
    for name, argv in ROWS.items():
        f = out / f"{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        topo = argv[argv.index("--topology") + 1]
        if "error" in r:
            rows.append(f"| {name} | {topo} | {' '.join(argv[2:])} | {r['error'].split('error: ', 1)[-1]} | - | - | "
                        f"- | - | - |")
            continue
        batch = f"max {r['max_batch']}" if "max_batch" in r else str(r["batch"])
        flops, derived = r["flops"], ""
        if r.get("probe") and r["what"] == "train" and per_clip:  # probes generate no code: scale the FLOPs
            flops, derived = per_clip * r["batch"] / r["devices"], " (from the full compile's FLOPs per clip)"
        bound = flops / (r["peak_tflops"] * 1e12)
        workers = "-"
        if r["what"] == "train" and bound > 0:
            hosts = r.get("hosts") or 1
            workers = str(math.ceil(r["batch"] / hosts / bound / clips_per_worker))
        compile_s = f"{r['compile_s']:.0f}" + (" (memory probe)" if r.get("probe") else "")
        if "tried" in r:
            search = ", ".join(f"{b}:{'ok' if ok else 'no'}" for b, ok, _ in r["tried"])
            compile_s += f"; search {search}"
        peak = f"{'needs ' if r.get('probe') else ''}{_gib(r['peak_bytes'])} / {_gib(r['limit_bytes'])}"
        rows.append(f"| {name} | {topo} | {r['what']}: {r['settings']} | {peak} | {batch} | "
                    f"{flops / 1e12:.2f}{derived} | {bound * 1e3:.0f} | {workers} | {compile_s} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/m3ddm_aot", help="folder of the per-row JSON results")
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--table", action="store_true", help="only print the table from saved rows")
    ap.add_argument("--data-json", default=None, help="bench/data.py --json output (clips/s per worker)")
    ap.add_argument("--clips-per-worker", type=float, default=None,
                    help="clips/s of one loader worker (default: --data-json's, else 1.98 measured here)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not args.table:
        names = [n for n in args.only.split(",") if n] or list(ROWS)
        for n in names:
            if n not in ROWS:
                print(f"unknown row {n!r}; rows: {', '.join(ROWS)}", file=sys.stderr)
                return 2
            run_row(n, out, [])
    cpw = args.clips_per_worker
    if cpw is None and args.data_json:
        cpw = json.loads(Path(args.data_json).read_text())["clips_per_cpu_s"]
    print(table(out, cpw or 1.98))
    return 0


if __name__ == "__main__":
    sys.exit(main())
