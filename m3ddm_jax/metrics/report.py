"""Evaluation results: the per-video store, the summary table in the paper's layout, atomic writes.

Used by ``eval.py``; importable without absl flags (tests, notebooks, training validation reports).

* :class:`Store` - ``per_video.jsonl`` (one JSON row per scored video, rewritten atomically after every
  video) and ``features/`` (I3D clip embeddings as ``.npy``, so FVD over a whole set survives a resume).
  A row's id holds the :class:`Settings` signature, the model (name and weights), dataset, mask ratio
  and sequence: rerunning with the same settings skips it, changed settings score anew.
* :func:`summarize` / :func:`render_markdown` / :func:`write_reports` - one table row per (dataset, mask
  ratio, model) with MSE, PSNR, SSIM, LPIPS, FVD, BMSE (means over videos; FVD over the pooled clips of all
  videos of the row against the same videos' ground truth), several models side by side; the ``clean``
  protocol adds a table for the generated region alone. ``summary.md``, ``summary.json``, ``per_video.csv``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

from m3ddm_jax.metrics.protocol import FRAME_METRICS

DATASET_LABELS = {"davis": "", "davis_static": " Static"}


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npy_atomic(path: Path, arr) -> None:
    import numpy as np  # noqa: PLC0415

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def pct(ratio: float) -> str:
    return f"{ratio * 100:g}%"



@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    spec: str      # weights spec as given ("" = default release)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The evaluation settings that shape the numbers (see :meth:`signature`)."""

    protocol: str
    target_ratio: str
    output_size: int
    canvas: str
    strides: tuple[int, ...]
    limit: int | None
    steps: int
    seed: int
    dtype: str
    axis: str
    ratios: tuple[float, ...]
    datasets: tuple[str, ...]
    source: str
    resolution: str
    lpips: str | None          # net name, or None when LPIPS is off
    fvd: tuple[int, int] | None  # (size, clip length), or None when FVD is off
    psnr_max: float

    def signature(self) -> str:
        """Everything that changes a row's numbers, except the model, dataset, ratio and sequence."""
        d = dataclasses.asdict(self)
        for k in ("ratios", "datasets"):
            d.pop(k)
        return short_hash(json.dumps(d, sort_keys=True), 12)


class Store:
    """``per_video.jsonl`` (rewritten atomically on every add) plus the I3D features under ``features/``."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir
        self.path = out_dir / "per_video.jsonl"
        self.features = out_dir / "features"
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.rows[row["id"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a damaged line is recomputed

    @staticmethod
    def row_id(sig: str, model: Model, dataset: str, ratio: float, seq: str) -> str:
        return f"{sig}|{model.name}|{model.spec}|{dataset}|{ratio:g}|{seq}"

    def has(self, rid: str) -> bool:
        row = self.rows.get(rid)
        return row is not None and all((self.features / row[k]).exists() for k in ("fvd_file", "gt_fvd_file") if row.get(k))

    def add(self, row: dict) -> None:
        self.rows[row["id"]] = row
        write_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows.values()))

    def feature_path(self, name: str) -> Path:
        self.features.mkdir(parents=True, exist_ok=True)
        return self.features / name

    def load_features(self, name: str | None):
        import numpy as np  # noqa: PLC0415

        if not name or not (self.features / name).exists():
            return None
        return np.load(self.features / name)


COLUMNS = (("mse", "MSE", "{:.5f}"), ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
           ("lpips", "LPIPS", "{:.4f}"), ("fvd", "FVD", "{:.0f}"), ("bmse", "BMSE", "{:.5f}"))


def summarize(store: Store, settings: Settings, models: list[Model], label: str, sequences: list[str]) -> list[dict]:
    """One entry per (dataset, ratio, model) over the rows of the current settings and sequences."""
    import numpy as np  # noqa: PLC0415

    from m3ddm_jax.metrics.fvd import fvd_from_features  # noqa: PLC0415

    sig = settings.signature()
    out = []
    for ds in settings.datasets:
        for r in settings.ratios:
            for m in models:
                rows = [store.rows[rid] for seq in sequences
                        if (rid := Store.row_id(sig, m, ds, r, seq)) in store.rows]
                entry = {"dataset": f"{label}{DATASET_LABELS[ds]}", "dataset_key": ds, "mask_ratio": r, "model": m.name,
                         "weights": m.spec, "videos": len(rows), "frames": int(sum(x["frames"] for x in rows))}
                keys = [k + sfx for sfx in ("", "_gen") for k in FRAME_METRICS if any(k + sfx in x for x in rows)]
                for k in keys:
                    vals = [x[k] for x in rows if k in x]
                    entry[k] = float(np.mean(vals)) if vals else None
                entry["fvd"] = None
                if settings.fvd and rows:
                    gen = [store.load_features(x.get("fvd_file")) for x in rows]
                    gt = [store.load_features(x.get("gt_fvd_file")) for x in rows]
                    if all(g is not None for g in gen + gt):
                        v = fvd_from_features(np.concatenate(gen), np.concatenate(gt))
                        entry["fvd"] = None if math.isnan(v) else v
                        entry["fvd_clips"] = int(sum(len(g) for g in gen))
                out.append(entry)
    return out


def _fmt(v, pattern: str) -> str:
    if v is None:
        return "–"
    return pattern.format(v)


def render_markdown(entries: list[dict], settings: Settings, protocol_text: str, box: tuple[int, int]) -> str:
    lines = [
        "# DAVIS / DAVIS Static video outpainting evaluation",
        "",
        f"- protocol: **{settings.protocol}** ({protocol_text})",
        f"- target {settings.target_ratio} at {box[1]}x{box[0]}, {settings.axis} masks, strides "
        f"{','.join(map(str, settings.strides))}, frames {'all' if settings.limit is None else settings.limit}, "
        f"{settings.steps} steps, seed {settings.seed}, canvas {settings.canvas}, {settings.dtype}",
        f"- PSNR per frame capped at {settings.psnr_max:g} dB; LPIPS {settings.lpips or 'off'}; FVD "
        + (f"I3D Kinetics-400 logits, {settings.fvd[1]}-frame clips at {settings.fvd[0]}x{settings.fvd[0]}, "
           f"pooled over all videos of a row" if settings.fvd else "off"),
        f"- settings signature {settings.signature()}",
        "",
    ]

    def table(suffix: str, cols):
        head = "| dataset | mask ratio | model | " + " | ".join(c[1] for c in cols) + " | videos |"
        rows = [head, "|" + "---|" * (len(cols) + 4)]
        prev = (None, None)
        for e in entries:
            ds = e["dataset"] if e["dataset"] != prev[0] else ""
            rt = pct(e["mask_ratio"]) if (e["dataset"], e["mask_ratio"]) != prev else ""
            prev = (e["dataset"], e["mask_ratio"])
            cells = [_fmt(e.get(k if k == "fvd" else k + suffix), p) for k, _, p in cols]
            rows.append(f"| {ds} | {rt} | {e['model']} | " + " | ".join(cells) + f" | {e['videos']} |")
        return rows

    lines += table("", COLUMNS)
    if any(k.endswith("_gen") for e in entries for k in e):
        lines += ["", "Generated region only (pixels outside the kept centre; FVD is whole-frame only):", ""]
        lines += table("_gen", [c for c in COLUMNS if c[0] != "fvd"])
    return "\n".join(lines) + "\n"


def write_reports(store: Store, settings: Settings, models: list[Model], label: str, sequences: list[str],
                  protocol_text: str, box) -> Path:
    entries = summarize(store, settings, models, label, sequences)
    md = store.dir / "summary.md"
    write_atomic(md, render_markdown(entries, settings, protocol_text, box))
    write_atomic(store.dir / "summary.json", json.dumps(
        {"protocol": settings.protocol, "protocol_description": protocol_text, "settings": dataclasses.asdict(settings),
         "signature": settings.signature(), "sequences": sequences, "rows": entries}, indent=1, default=list) + "\n")
    sig = settings.signature()
    rows = [r for r in store.rows.values() if r.get("signature") == sig]
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
        write_atomic(store.dir / "per_video.csv", buf.getvalue())
    return md
