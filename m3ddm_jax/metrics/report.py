"""Evaluation results: the per-video store, the summary table in the paper's layout, atomic writes.

Used by ``eval.py``; importable without absl flags (tests, notebooks, training validation reports).

* :class:`Store` - ``per_video.jsonl`` (one JSON row per scored video, keys sorted, rows in id order, rewritten
  atomically after every video; with several processes each writes ``per_video.process<k>.jsonl``, merged at
  the end), ``timings.jsonl`` (seconds per video, kept out of the rows so that a table does not
  depend on how fast or in how many sittings it was computed) and ``features/`` (I3D clip embeddings as
  ``.npy``, so FVD over a whole set survives a resume). A row's id holds the :class:`Settings` signature,
  the model (name and content identity: hashes of its U-Net and VAE files), dataset, mask ratio and
  sequence: rerunning with the same settings skips it, changed settings score anew.
* :func:`summarize` / :func:`render_markdown` / :func:`write_reports` - one table row per (dataset, mask
  ratio, model) with MSE, PSNR, SSIM, LPIPS, FVD, BMSE (means over videos; FVD over the pooled clips of all
  videos of the row against the same videos' ground truth), several models side by side; the ``clean``
  protocol adds a table for the generated region alone. ``summary.md``, ``summary.json``, ``per_video.csv``
  (fixed columns, rows in table order: the same bytes however the rows were computed).

Every file is written atomically (a temporary name in the destination folder, flushed and synced, then
renamed; the user's umask applies): a run killed at any moment leaves whole files and whole rows only.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import tempfile
from pathlib import Path

from m3ddm_jax.errors import UserError
from m3ddm_jax.metrics.protocol import FRAME_METRICS, get_protocol, metric_names

DATASET_LABELS = {"davis": "", "davis_static": " Static"}


TMP_SUFFIX = ".tmp"  # temporary files of the atomic writers: ".<name>.<random>.tmp" next to the destination
FAULT_ENV = "M3DDM_JAX_FAULT"  # fault injection for tests: "<file name>:<n>" = SIGKILL halfway through its n-th write
_fault_counts: dict[str, int] = {}


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _maybe_fault(name: str, f, data: bytes) -> None:
    """Test hook (:data:`FAULT_ENV`): die by SIGKILL with half of ``data`` in the temporary file."""
    spec = os.environ.get(FAULT_ENV, "")
    target, _, count = spec.rpartition(":")
    if not spec or target != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if str(_fault_counts[name]) == count:
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def write_bytes_atomic(path: Path, data: bytes, *, skip_same: bool = False) -> bool:
    """Write ``data`` to ``path`` atomically; ``skip_same``: leave an identical file untouched. True if written."""
    path = Path(path)
    if skip_same:
        try:
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return False
        except OSError:
            pass
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            _maybe_fault(path.name, f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only or vanished folder: one line, the old file kept
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return True


def write_atomic(path: Path, text: str, *, skip_same: bool = False) -> bool:
    return write_bytes_atomic(path, text.encode("utf-8"), skip_same=skip_same)


def save_npy_atomic(path: Path, arr) -> None:
    import numpy as np  # noqa: PLC0415

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    write_bytes_atomic(path, buf.getvalue())


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files that a killed run left behind (only this module's ``.<name>.<random>.tmp`` pattern)."""
    try:
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
    except OSError:
        pass


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def pct(ratio: float) -> str:
    return f"{ratio * 100:g}%"



@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    spec: str           # weights spec as given ("" = default release)
    identity: str = ""  # content identity, "unet:<sha256[:16]> vae:<sha256[:16]>" (see :func:`model_identity`)


def model_identity(unet_digest: str, vae_digest: str) -> str:
    return f"unet:{unet_digest[:16]} vae:{vae_digest[:16]}"


#: OutpaintConfig fields that do not enter the settings signature: windows per call, call padding, devices, what
#: the result keeps (the same videos, batched differently: equal up to float rounding)
LAYOUT_FIELDS = ("window_batch", "pad_calls", "devices", "return_latents")


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
    fps: float | None = None   # the frame rate a DAVIS source is read at (None: each video's own, a video folder)
    # ((role, sha256), ...) of the metric weight files: lpips_trunk, lpips_heads, i3d
    metric_weights: tuple[tuple[str, str], ...] = ()

    def outpaint_config(self):
        """The sampler configuration every video is outpainted with (sampler, guidance scales, global frames
        and the other defaults included, so that a changed default changes the signature too)."""
        from m3ddm_jax.outpaint.pipeline import OutpaintConfig  # noqa: PLC0415

        return OutpaintConfig(ratio=self.target_ratio, output_size=self.output_size, canvas=self.canvas,
                              strides=tuple(self.strides), limit=self.limit, steps=self.steps, seed=self.seed)

    def signature(self) -> str:
        """Everything that changes a row's numbers, except the model, dataset, ratio and sequence: these
        settings, the complete sampler configuration, the protocol's definition and the metric weights'
        content hashes. (The model's content identity is part of each row's id.) Left out: the sampler fields in
        :data:`LAYOUT_FIELDS`, which say how the work is laid out on the devices, not what is computed."""
        d = dataclasses.asdict(self)
        for k in ("ratios", "datasets"):
            d.pop(k)
        d["outpaint_config"] = {k: v for k, v in dataclasses.asdict(self.outpaint_config()).items()
                                if k not in LAYOUT_FIELDS}
        d["protocol_definition"] = dataclasses.asdict(get_protocol(self.protocol))
        return short_hash(json.dumps(d, sort_keys=True, default=list), 12)

    def metric_names(self) -> tuple[str, ...]:
        return metric_names(get_protocol(self.protocol), self.lpips is not None)


class Store:
    """``per_video.jsonl`` and ``timings.jsonl`` (rewritten atomically on every add; rows in id order, so the bytes
    do not depend on the order videos were scored in) plus the I3D features under ``features/``.

    Several processes scoring into one folder never write the same file: after :meth:`use_part` a process adds its
    rows to ``per_video.<part>.jsonl`` and ``timings.<part>.jsonl``; reading takes the main files and every part
    file; :meth:`consolidate` (one process, when the others are done) merges the parts into the main files."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir
        self.path = out_dir / "per_video.jsonl"
        self.timings_path = out_dir / "timings.jsonl"
        self.features = out_dir / "features"
        self.part: str | None = None
        self.reload()

    def reload(self) -> None:
        """Read the rows (and timings) of the main files and of every process's part file."""
        self.rows = self._read_all(self.path)
        self.timings = self._read_all(self.timings_path)

    def _parts(self, main: Path) -> list[Path]:
        return sorted(main.parent.glob(f"{main.stem}.*{main.suffix}")) if main.parent.is_dir() else []

    def _read_all(self, main: Path) -> dict[str, dict]:
        rows = self._read(main)
        for part in self._parts(main):
            rows.update(self._read(part))
        return rows

    def _part_path(self, main: Path) -> Path:
        return main.with_name(f"{main.stem}.{self.part}{main.suffix}")

    def use_part(self, part: str) -> None:
        """From now on write rows to ``per_video.<part>.jsonl`` (keeping the rows it already holds: an earlier,
        killed run's)."""
        if not part or not all(ch.isalnum() or ch in "-_" for ch in part):
            raise ValueError(f"bad part name {part!r}")
        self.part = part
        self._own_rows = self._read(self._part_path(self.path))
        self._own_timings = self._read(self._part_path(self.timings_path))

    def consolidate(self) -> bool:
        """Merge every part file into ``per_video.jsonl`` / ``timings.jsonl`` (re-read from disk) and remove the
        parts; only when no other process writes. A kill in between leaves rows twice, which read as once.
        Returns True if there was anything to merge."""
        self.reload()
        parts = self._parts(self.path) + self._parts(self.timings_path)
        if not parts:
            return False
        write_atomic(self.path, self._jsonl(self.rows), skip_same=True)
        write_atomic(self.timings_path, self._jsonl(self.timings), skip_same=True)
        for p in parts:
            p.unlink(missing_ok=True)
        return True

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    rows[row["id"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a damaged line (not written by this version's atomic writer) is recomputed
        return rows

    def clean(self) -> None:
        """Drop the temporary files of a run that was killed while writing (call before writing)."""
        remove_stale_temporaries(self.dir)
        remove_stale_temporaries(self.features)

    @staticmethod
    def row_id(sig: str, model: Model, dataset: str, ratio: float, seq: str) -> str:
        return f"{sig}|{model.name}|{model.identity or model.spec}|{dataset}|{ratio:g}|{seq}"

    def has(self, rid: str) -> bool:
        row = self.rows.get(rid)
        return row is not None and all((self.features / row[k]).exists() for k in ("fvd_file", "gt_fvd_file") if row.get(k))

    @staticmethod
    def _jsonl(rows: dict[str, dict]) -> str:
        return "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows))

    def add(self, row: dict, timing: dict | None = None) -> None:
        """Record a scored video: the row first (atomically), then its timing (to this process's part files after
        :meth:`use_part`)."""
        self.rows[row["id"]] = row
        if self.part is None:
            write_atomic(self.path, self._jsonl(self.rows))
        else:
            self._own_rows[row["id"]] = row
            write_atomic(self._part_path(self.path), self._jsonl(self._own_rows))
        if timing is not None:
            entry = {"id": row["id"], **timing}
            self.timings[row["id"]] = entry
            if self.part is None:
                write_atomic(self.timings_path, self._jsonl(self.timings))
            else:
                self._own_timings[row["id"]] = entry
                write_atomic(self._part_path(self.timings_path), self._jsonl(self._own_timings))

    def feature_path(self, name: str) -> Path:
        self.features.mkdir(parents=True, exist_ok=True)
        return self.features / name

    def load_features(self, name: str | None):
        import numpy as np  # noqa: PLC0415

        if not name or not (self.features / name).exists():
            return None
        return np.load(self.features / name)


#: per_video.csv's columns, in this order (metric columns in between: see :func:`csv_columns`)
CSV_HEAD = ("id", "signature", "protocol", "model", "weights", "model_id", "dataset", "mask_ratio", "axis", "sequence",
            "frames", "fps")
CSV_TAIL = ("fvd_clips", "fvd_file", "gt_fvd_file")


def csv_columns(settings: Settings) -> tuple[str, ...]:
    """The columns of ``per_video.csv``: fixed by the settings, whichever rows exist or in what order they came."""
    return CSV_HEAD + settings.metric_names() + CSV_TAIL


def table_rows(store: Store, settings: Settings, models: list[Model], sequences: list[str]) -> list[dict]:
    """The rows behind the table, in table order: dataset, mask ratio, model, then sequence."""
    sig = settings.signature()
    return [store.rows[rid] for ds in settings.datasets for r in settings.ratios for m in models for seq in sequences
            if (rid := Store.row_id(sig, m, ds, r, seq)) in store.rows]


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
                         "weights": m.spec, "model_id": m.identity, "videos": len(rows), "frames": int(sum(x["frames"] for x in rows))}
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
        f"{settings.steps} steps, seed {settings.seed}, canvas {settings.canvas}, {settings.dtype}, "
        f"{'fps ' + format(settings.fps, 'g') if settings.fps else 'each video at its own frame rate'}",
        f"- PSNR per frame capped at {settings.psnr_max:g} dB; LPIPS {settings.lpips or 'off'}; FVD "
        + (f"I3D Kinetics-400 logits, {settings.fvd[1]}-frame clips at {settings.fvd[0]}x{settings.fvd[0]}, "
           f"pooled over all videos of a row" if settings.fvd else "off"),
        f"- settings signature {settings.signature()}"
        + "".join(f"; {role} {digest[:16]}" for role, digest in settings.metric_weights),
    ]
    models = list(dict.fromkeys((e["model"], e["weights"], e.get("model_id", "")) for e in entries))
    lines += [f"- model {name}: {spec or 'default release'}" + (f" ({ident})" if ident else "") for name, spec, ident in models]
    lines.append("")

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
    write_atomic(md, render_markdown(entries, settings, protocol_text, box), skip_same=True)
    write_atomic(store.dir / "summary.json", json.dumps(
        {"protocol": settings.protocol, "protocol_description": protocol_text, "settings": dataclasses.asdict(settings),
         "signature": settings.signature(), "sequences": sequences, "rows": entries}, indent=1, default=list) + "\n", skip_same=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(settings), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table_rows(store, settings, models, sequences))
    write_atomic(store.dir / "per_video.csv", buf.getvalue(), skip_same=True)
    return md
