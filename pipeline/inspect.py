"""`samcp inspect`: whole-cache statistics of a proposal cache, computed with Dask over the shards.

Each complete shard is summarised by one ``dask.delayed`` task that reads only the small arrays
(``image_id``, ``status``, ``error``, ``height``, ``width``, ``mask_offset``, ``area``) and measures the
bytes each array takes on disk; the per-shard partials are then reduced in the driver. The default
scheduler is Dask's threaded one (zarr releases the GIL while decompressing), so this works
everywhere without a Dask cluster; ``scheduler="synchronous"`` runs it in one thread for debugging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samcp.pipeline import cache as cache_io
from samcp.pipeline.errors import SamcpError

# Mask area as a fraction of the image area: fixed, roughly logarithmic bins so that histograms of
# different caches line up (COCO's "small" objects are < 32^2 px, about 0.3% of a 640x480 image).
AREA_BIN_EDGES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.25, 0.5, 1.0)
AREA_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
MAX_COUNT_BINS = 10  # masks-per-image histogram: at most this many integer-width bins


@dataclass
class ShardStats:
    """What one Dask task reports about one complete shard."""

    shard_id: str
    num_images: int
    failures: list[tuple[str, str]]  # (image_id, error) of failed rows
    masks_per_image: np.ndarray  # (ok rows,) int64
    area_fraction: np.ndarray  # (masks of ok rows,) float32
    bytes_by_array: dict[str, int]


@dataclass
class CacheSummary:
    """The content of `samcp inspect`; :meth:`to_dict` is its ``--json`` form."""

    path: str
    attrs: dict
    shards_complete: int
    shards_planned: int | None
    incomplete_shards: list[str]
    missing_shards: list[str]
    images: int
    images_ok: int
    failed_count: int
    failed: list[dict]  # up to max_failures of {"image_id", "shard", "error"}
    masks: int
    masks_per_image: dict  # min, median, mean, max, histogram [{lo, hi, count}]
    mask_area_fraction: dict  # percentiles {p: v}, mean, histogram [{lo, hi, count}]
    bytes_by_array: dict[str, int]  # on-disk bytes per array name, summed over complete shards
    bytes_source: str  # "files" (local walk) or "nbytes_stored" (zarr's own count)
    bytes_total: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_image(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {k: v / n for k, v in self.bytes_by_array.items()}

    def to_dict(self) -> dict:
        """JSON-ready summary (the same content as the text report)."""
        a = self.attrs
        return {
            "cache": self.path,
            "samcp_cache_version": a.get("samcp_cache_version"),
            "created": a.get("created"),
            "models": {
                "proposals": a.get("proposals"),
                "sam": a.get("sam"),
                "clip": a.get("clip"),
                "sam_embed": a.get("sam_embed", False),
            },
            "dataset": a.get("dataset"),
            "dataset_source": a.get("dataset_source"),
            "shards": {
                "complete": self.shards_complete,
                "planned": self.shards_planned,
                "incomplete": self.incomplete_shards,
                "missing": self.missing_shards,
            },
            "images": {
                "total": self.images,
                "ok": self.images_ok,
                "failed": self.failed_count,
                "failed_listed": self.failed,
            },
            "masks": {"total": self.masks, "per_image": self.masks_per_image},
            "mask_area_fraction": self.mask_area_fraction,
            "bytes": {
                "source": self.bytes_source,
                "total": self.bytes_total,
                "by_array": self.bytes_by_array,
                "per_image_by_array": self.bytes_per_image,
            },
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """The human-readable report, aligned for a terminal."""
        return _format(self)


def summarize_cache(
    path: str | Path, max_failures: int = 20, scheduler: str = "threads"
) -> CacheSummary:
    """Computes the `samcp inspect` summary of a cache.

    Args:
        path: the cache location (``samcp precompute --out``).
        max_failures: how many failed images to list with their reasons (all are counted).
        scheduler: Dask scheduler for the per-shard tasks: ``"threads"`` (default) or
            ``"synchronous"`` (one thread, for debugging).

    Raises:
        SamcpError: nothing at ``path``, not a samcp cache, or another format version.
    """
    import dask

    if scheduler not in ("threads", "synchronous"):
        raise SamcpError(f"unknown Dask scheduler {scheduler!r}; use threads or synchronous")
    reader = cache_io.CacheReader(path)
    local = "://" not in str(path)
    tasks = [
        dask.delayed(_shard_stats, pure=True)(
            reader.shard_group(sid),
            sid,
            str(Path(path) / "shards" / sid) if local else None,
            dask_key_name=f"shard-stats-{sid}",
        )
        for sid in reader.shard_ids
    ]
    parts: list[ShardStats] = list(dask.compute(*tasks, scheduler=scheduler)) if tasks else []
    return _reduce(reader, parts, max_failures, local)


def _shard_stats(g, shard_id: str, local_dir: str | None) -> ShardStats:
    """One shard's partial statistics (runs as a Dask task)."""
    status = g["status"][...]
    off = g["mask_offset"][...].astype(np.int64)
    height = g["height"][...].astype(np.int64)
    width = g["width"][...].astype(np.int64)
    area = g["area"][...]
    ok = status == cache_io.STATUS_OK
    failures: list[tuple[str, str]] = []
    if (~ok).any():
        ids = g["image_id"][...]
        errors = g["error"][...]
        failures = [(str(ids[i]), str(errors[i])) for i in np.flatnonzero(~ok)]
    counts = np.diff(off)
    # Area fraction of every mask of an ok row: mask row j belongs to image row owner[j].
    owner = np.repeat(np.arange(len(counts)), counts)
    pixels = (height * width)[owner]
    # Failed rows have no masks, so every mask here belongs to an ok row.
    frac = (area[: len(owner)] / np.maximum(pixels, 1)).astype(np.float32)
    return ShardStats(
        shard_id=shard_id,
        num_images=int(len(status)),
        failures=failures,
        masks_per_image=counts[ok].astype(np.int64),
        area_fraction=frac,
        bytes_by_array=_array_bytes(g, local_dir),
    )


def _array_bytes(g, local_dir: str | None) -> dict[str, int]:
    """On-disk bytes of every array in a shard group: file sizes when local, else zarr's count."""
    out: dict[str, int] = {}
    if local_dir is not None and Path(local_dir).is_dir():
        for child in sorted(Path(local_dir).iterdir()):
            if child.is_dir():
                out[child.name] = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
        return out
    for name, arr in g.arrays():
        try:
            out[name] = int(arr.nbytes_stored())
        except Exception:  # a store that cannot list its keys: report what we can
            out[name] = 0
    return out


def _reduce(
    reader: cache_io.CacheReader, parts: list[ShardStats], max_failures: int, local: bool
) -> CacheSummary:
    attrs = reader.attrs
    present = set(reader.shard_ids) | set(reader.incomplete_shard_ids)
    planned_ids: list[str] | None = None
    ds = attrs.get("dataset") or {}
    if ds.get("num_images") and ds.get("shard_size"):
        n_planned = math.ceil(int(ds["num_images"]) / int(ds["shard_size"]))
        planned_ids = [f"{i:05d}" for i in range(n_planned)]
    missing = [s for s in planned_ids or [] if s not in present]

    images = sum(p.num_images for p in parts)
    failures = [(p.shard_id, iid, err) for p in parts for iid, err in p.failures]
    counts = np.concatenate([p.masks_per_image for p in parts]) if parts else np.zeros(0, np.int64)
    fracs = np.concatenate([p.area_fraction for p in parts]) if parts else np.zeros(0, np.float32)
    bytes_by_array: dict[str, int] = {}
    for p in parts:
        for k, v in p.bytes_by_array.items():
            bytes_by_array[k] = bytes_by_array.get(k, 0) + v
    bytes_by_array = dict(sorted(bytes_by_array.items(), key=lambda kv: (-kv[1], kv[0])))
    notes = []
    if reader.incomplete_shard_ids:
        notes.append(
            f"{len(reader.incomplete_shard_ids)} incomplete shard(s) are ignored by readers; "
            "re-run the same `samcp precompute` command to redo them"
        )
    if missing:
        notes.append(
            f"{len(missing)} planned shard(s) were never started; re-run `samcp precompute` "
            "to finish the cache"
        )
    return CacheSummary(
        path=reader.path,
        attrs=attrs,
        shards_complete=len(reader.shard_ids),
        shards_planned=len(planned_ids) if planned_ids is not None else None,
        incomplete_shards=reader.incomplete_shard_ids,
        missing_shards=missing,
        images=images,
        images_ok=images - len(failures),
        failed_count=len(failures),
        failed=[
            {"image_id": iid, "shard": sid, "error": err}
            for sid, iid, err in failures[: max(max_failures, 0)]
        ],
        masks=int(counts.sum()),
        masks_per_image=_count_stats(counts),
        mask_area_fraction=_area_stats(fracs),
        bytes_by_array=bytes_by_array,
        bytes_source="files" if local else "nbytes_stored",
        bytes_total=sum(bytes_by_array.values()),
        notes=notes,
    )


def _count_stats(counts: np.ndarray) -> dict:
    if counts.size == 0:
        return {"min": None, "median": None, "mean": None, "max": None, "histogram": []}
    lo, hi = int(counts.min()), int(counts.max())
    width = max(1, math.ceil((hi - lo + 1) / MAX_COUNT_BINS))
    edges = np.arange(lo, hi + width + 1, width)
    hist, _ = np.histogram(counts, bins=edges)
    return {
        "min": lo,
        "median": float(np.median(counts)),
        "mean": float(counts.mean()),
        "max": hi,
        # Integer bins [lo, hi] inclusive.
        "histogram": [
            {"lo": int(edges[i]), "hi": int(edges[i + 1] - 1), "count": int(c)}
            for i, c in enumerate(hist)
        ],
    }


def _area_stats(fracs: np.ndarray) -> dict:
    if fracs.size == 0:
        return {"percentiles": {}, "mean": None, "histogram": []}
    pct = np.percentile(fracs.astype(np.float64), AREA_PERCENTILES)
    hist, _ = np.histogram(np.clip(fracs, 0.0, 1.0), bins=np.asarray(AREA_BIN_EDGES))
    return {
        "percentiles": {f"p{p}": float(v) for p, v in zip(AREA_PERCENTILES, pct)},
        "mean": float(fracs.mean()),
        "histogram": [
            {"lo": AREA_BIN_EDGES[i], "hi": AREA_BIN_EDGES[i + 1], "count": int(c)}
            for i, c in enumerate(hist)
        ],
    }


# ---------------------------------------------------------------------------------------------
# Text report.

_KEY_WIDTH = 14
_BAR_WIDTH = 40


def _format(s: CacheSummary) -> list[str]:
    a = s.attrs
    out: list[str] = []

    def row(key: str, value: str) -> None:
        out.append(f"{key:<{_KEY_WIDTH}}{value}")

    row("cache", f"{s.path}  (format {a.get('samcp_cache_version')}, created {a.get('created')})")
    props = a.get("proposals") or {}
    row("proposals", f"{props.get('source', '?')}  {_params(props.get('params'))}")
    sam = a.get("sam")
    row(
        "sam",
        "-"
        if not sam
        else f"{sam.get('model')}  sha256 {str(sam.get('checkpoint_sha256'))[:12]}  "
        f"{_params(sam.get('params'))}",
    )
    clip = a.get("clip")
    row(
        "clip",
        "-"
        if not clip
        else f"{clip.get('model')}  sha256 {str(clip.get('checkpoint_sha256'))[:12]}  "
        f"{_params({k: v for k, v in clip.items() if k not in ('model', 'checkpoint_sha256')})}",
    )
    if "sam_embed" in a:
        row("sam_embed", "stored" if a.get("sam_embed") else "not stored")
    ds = a.get("dataset") or {}
    src = a.get("dataset_source") or {}
    row(
        "dataset",
        f"{src.get('path', '?')} [{src.get('split', '?')}]  {ds.get('num_images', '?')} images, "
        f"shard size {ds.get('shard_size', '?')}, "
        f"image list sha256 {str(ds.get('image_list_sha256', '?'))[:12]}",
    )
    planned = f" of {s.shards_planned} planned" if s.shards_planned is not None else ""
    row(
        "shards",
        f"{s.shards_complete} complete, {len(s.incomplete_shards)} incomplete, "
        f"{len(s.missing_shards)} not started{planned}",
    )
    if s.incomplete_shards:
        row("  incomplete", _id_list(s.incomplete_shards))
    if s.missing_shards:
        row("  not started", _id_list(s.missing_shards))
    row("images", f"{s.images} in complete shards: {s.images_ok} ok, {s.failed_count} failed")
    if s.failed_count:
        shown = len(s.failed)
        more = f" (first {shown} shown)" if shown < s.failed_count else ""
        row("failed", f"{s.failed_count} image(s){more}")
        w = max(len(f["image_id"]) for f in s.failed) if s.failed else 0
        for f in s.failed:
            out.append(
                f"{'':<{_KEY_WIDTH}}  {f['image_id']:<{w}}  shard {f['shard']}  {f['error']}"
            )
    mpi = s.masks_per_image
    if mpi["min"] is None:
        row("masks", f"{s.masks} (no ok images)")
    else:
        row(
            "masks",
            f"{s.masks} total; per ok image min {mpi['min']}  median {mpi['median']:g}  "
            f"mean {mpi['mean']:.1f}  max {mpi['max']}",
        )
        labels = [
            f"{b['lo']}" if b["lo"] == b["hi"] else f"{b['lo']}-{b['hi']}" for b in mpi["histogram"]
        ]
        out.extend(_histogram("masks/image", labels, [b["count"] for b in mpi["histogram"]]))
    area = s.mask_area_fraction
    if area["percentiles"]:
        pct = "  ".join(f"{k} {_frac(v)}" for k, v in area["percentiles"].items())
        row("mask area", f"fraction of image: {pct}")
        labels = [f"{_frac(b['lo'])}-{_frac(b['hi'])}" for b in area["histogram"]]
        out.extend(_histogram("area/image", labels, [b["count"] for b in area["histogram"]]))
    if s.bytes_by_array:
        how = "files on disk" if s.bytes_source == "files" else "zarr nbytes_stored"
        row(
            "bytes",
            f"{_size(s.bytes_total)} in complete shards ({how}), "
            f"{_size(s.bytes_total / max(s.images, 1))} per image",
        )
        w = max(len(k) for k in s.bytes_by_array)
        out.append(f"{'':<{_KEY_WIDTH}}  {'array':<{w}}  {'per image':>10}  {'total':>10}  share")
        for k, v in s.bytes_by_array.items():
            share = v / max(s.bytes_total, 1)
            out.append(
                f"{'':<{_KEY_WIDTH}}  {k:<{w}}  {_size(v / max(s.images, 1)):>10}  "
                f"{_size(v):>10}  {share:6.1%}"
            )
    for note in s.notes:
        row("note", note)
    return out


def _histogram(title: str, labels: list[str], counts: list[int]) -> list[str]:
    peak = max(counts) if counts else 0
    w = max(len(lab) for lab in labels) if labels else 0
    cw = len(str(peak))
    lines = [f"{'':<{_KEY_WIDTH}}{title}"]
    for lab, c in zip(labels, counts):
        bar = "#" * (round(_BAR_WIDTH * c / peak) if peak else 0)
        if c and not bar:
            bar = "."  # a non-empty bin never looks empty
        lines.append(f"{'':<{_KEY_WIDTH}}  {lab:>{w}}  {c:>{cw}}  {bar}".rstrip())
    return lines


def _params(p) -> str:
    if not p:
        return ""
    if isinstance(p, dict):
        return " ".join(f"{k}={v}" for k, v in p.items())
    return str(p)


def _id_list(ids: list[str], n: int = 12) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def _frac(v: float) -> str:
    """An area fraction as a percentage: 0.0123 -> '1.23%'."""
    return f"{v * 100:.3g}%"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
