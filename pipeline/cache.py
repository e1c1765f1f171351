"""The proposal cache: a Zarr v3 group of shards (format version 1, see docs/cache-format.md).

One writer function (:func:`write_shard`, called by exactly one worker per shard) and one reader class
(:class:`CacheReader`) that everything downstream goes through. A shard exists for readers only once
its ``complete`` attribute is true; that attribute is written last.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.files import file_sha256
from samcp.pipeline.outputs import prepare_output_dir
from samcp.pipeline.proposals.base import Proposals

CACHE_VERSION = 1
STATUS_OK = 0
STATUS_FAILED = 1

# Root attributes that decide a cache's content. Resuming with any of them changed is refused.
FINGERPRINT_KEYS = ("samcp_cache_version", "proposals", "sam", "clip", "sam_embed", "dataset")

# Per-mask arrays and their dtypes (rle is variable-length bytes).
MASK_ARRAYS = {
    "bbox": ("float32", (4,)),
    "area": ("int64", ()),
    "predicted_iou": ("float32", ()),
    "stability_score": ("float32", ()),
    "point_coords": ("float32", (2,)),
}


def _zarr():
    import zarr

    # zarr warns that variable-length strings are not yet in the v3 spec; the format doc says so.
    warnings.filterwarnings("ignore", module="zarr")
    warnings.filterwarnings("ignore", message=".*string.*", category=UserWarning)
    return zarr


@dataclass
class ImageResult:
    """What a worker produced for one image: proposals, or a failure with its reason.

    ``image_arrays`` holds per-image extras (e.g. ``clip_res5`` (C,h,w), ``sam_embed``), and
    ``mask_arrays`` per-mask extras (e.g. ``clip_mask_embed`` (M,D)).
    """

    image_id: str
    height: int
    width: int
    proposals: Proposals | None = None
    error: str = ""
    image_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    mask_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.proposals is not None


@dataclass
class CachedImage:
    """One image's row as read back from the cache."""

    image_id: str
    height: int
    width: int
    status: int
    error: str
    proposals: Proposals
    image_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    mask_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rles(self) -> list[dict]:
        """COCO RLE dicts of the proposals (pycocotools' format)."""
        return self.proposals.coco_rles()


def init_cache(path: str | Path, attrs: dict, overwrite: bool = False) -> set[str]:
    """Creates the cache root, or checks that an existing one was made with the same settings.

    Only a samcp cache is ever resumed or replaced: an existing non-empty folder that is not one
    (a dataset, a folder of caches, the source folder itself) is refused, ``overwrite`` included.

    Args:
        path: cache location (a local folder, or any URL zarr understands).
        attrs: root attributes; the keys in FINGERPRINT_KEYS decide whether a resume is allowed.
        overwrite: replace an existing samcp cache.

    Returns:
        The ids of shards already complete (to be skipped).

    Raises:
        SamcpError: ``path`` holds something other than a samcp cache, or an existing cache was
            made with other models, parameters or image list.
    """
    zarr = _zarr()
    attrs = {"samcp_cache_version": CACHE_VERSION, **attrs}
    local = "://" not in str(path)
    if local:
        exists = prepare_output_dir(path, "cache", overwrite=overwrite, reuse=True)
    else:
        exists = _exists(path)
        if exists:
            _open_root(path)  # refuses a Zarr group that is not a samcp cache
    if exists and not overwrite:
        root = _open_root(path, mode="r+")
        old = dict(root.attrs)
        for key in FINGERPRINT_KEYS:
            if _norm(old.get(key)) != _norm(attrs.get(key)):
                raise SamcpError(
                    f"cache {path} was made with a different {key} "
                    f"({_difference(_norm(old.get(key)), _norm(attrs.get(key)))}); "
                    "use another --out, or --overwrite to start it again"
                )
        return set(complete_shards(root))
    # zarr's mode="w" empties the whole folder or prefix: never used. Only what a cache consists
    # of is removed, and a new cache is created only where nothing is stored yet.
    if exists and local:
        import shutil

        for name in _CACHE_ENTRIES:
            p = Path(path) / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        root = zarr.open_group(str(path), mode="a", zarr_format=3)
    elif exists:
        root = _open_root(path, mode="r+")
        if "shards" in root:
            del root["shards"]
        root.attrs.put({})
    else:
        try:
            root = zarr.open_group(str(path), mode="a" if local else "w-", zarr_format=3)
        except FileExistsError:
            raise SamcpError(
                f"--out {path} already holds data that is not a samcp cache; samcp never writes "
                "into or deletes it (--overwrite included): choose a new, empty location"
            ) from None
    root.attrs.update(
        {**attrs, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    )
    root.require_group("shards")
    return set()


# What a local cache folder holds besides lock files: replaced together by --overwrite.
_CACHE_ENTRIES = ("shards", "clip_head", "zarr.json", "runs.jsonl")


def dataset_source_attrs(source: str | Path, split: str) -> dict:
    """The cache's ``dataset_source`` attribute: where its images came from.

    ``annotations_sha256`` (of the COCO panoptic JSON of the split, or of the JSONL manifest)
    identifies the dataset wherever it is moved; train, predict and eval compare it with the
    dataset they are given (:func:`check_cache_source`).
    """
    src = Path(source).absolute()
    if src.is_file():
        kind, ann = "manifest", src
    else:
        kind, ann = "coco_panoptic", src / "annotations" / f"panoptic_{split}.json"
    return {
        "path": str(src),
        "split": split,
        "kind": kind,
        "annotations_sha256": file_sha256(ann) if ann.is_file() else None,
    }


def check_cache_source(
    reader: CacheReader,
    annotations: str | Path,
    image_sizes: dict[str, tuple[int, int]],
    *,
    allow_other: bool = False,
    option: str = "--dataset",
) -> None:
    """Refuses a cache made from other data than the dataset a command was given.

    Two checks: the dataset's identity (the sha256 of its panoptic JSON against the one recorded
    by precompute; for caches without it, path and split) unless ``allow_other`` (a deliberate move
    or re-export of the same images); and always the images themselves: the cache's images must be
    in the dataset with the same sizes.

    Args:
        reader: the cache.
        annotations: the COCO panoptic JSON the command reads its ground truth from.
        image_sizes: ``image_id -> (height, width)`` of that dataset.
        allow_other: skip the identity check (sizes are still checked).
        option: the option that named the dataset, for messages.

    Raises:
        SamcpError: a mismatch, naming both sides and the override.
    """
    annotations = Path(annotations)
    src = reader.attrs.get("dataset_source") or {}
    override = "--allow-other-dataset"
    # A cache that records no source (written by other tools) can only be checked by its images.
    # Caches written before `kind` was recorded: a .jsonl path was a manifest.
    kind = src.get("kind") or (
        "manifest" if str(src.get("path", "")).endswith(".jsonl") else "coco_panoptic"
    )
    if src and not allow_other and kind == "coco_panoptic":
        recorded = src.get("annotations_sha256")
        if recorded is not None:
            same = file_sha256(annotations) == recorded
        else:  # caches written before the sha was recorded
            rec_json = Path(src.get("path", "")) / "annotations" / f"panoptic_{src.get('split')}.json"
            same = rec_json.absolute() == annotations.absolute()
        if not same:
            raise SamcpError(
                f"cache {reader.path} was made from {src.get('path')} (split "
                f"{src.get('split')}), not from {annotations} given by {option} (their "
                f"annotations differ); pass the dataset the cache was made from, or {override} "
                "if these are the same images (moved, or a re-exported or cut-down annotation file)"
            )
    sizes = reader.image_sizes()
    missing = [i for i in sizes if i not in image_sizes]
    if len(missing) == len(sizes) and sizes:
        raise SamcpError(
            f"none of the {len(sizes)} images of cache {reader.path} is in {annotations}; "
            f"pass the dataset and split the cache was made from ({src.get('path')}, "
            f"split {src.get('split')})"
        )
    for image_id, hw in sizes.items():
        if image_id in image_sizes and tuple(image_sizes[image_id]) != hw:
            h, w = image_sizes[image_id]
            raise SamcpError(
                f"image {image_id} is {hw[1]}x{hw[0]} in cache {reader.path} but {w}x{h} in "
                f"{annotations}: the cache was made from other images; pass the dataset it was "
                "made from or re-run precompute"
            )


def check_cache_matches_annotations(
    cache: str | Path, annotations: str | Path, *, allow_other: bool = False, option: str = "--gt"
) -> None:
    """:func:`check_cache_source` against a COCO panoptic JSON (its ``images`` give the sizes)."""
    import json

    doc = json.loads(Path(annotations).read_text(encoding="utf-8"))
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise SamcpError(f"{annotations} has no images list; pass a COCO panoptic JSON")
    sizes = {}
    for im in images:
        try:
            sizes[str(im["id"])] = (int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError):
            raise SamcpError(
                f"{annotations}: an image entry lacks integer id/height/width ({str(im)[:80]}); "
                "fix the ground-truth JSON"
            ) from None
    check_cache_source(
        CacheReader(cache), annotations, sizes, allow_other=allow_other, option=option
    )


def check_cache_complete(reader: CacheReader, allow_incomplete: bool = False) -> str | None:
    """Refuses an unfinished cache (shards missing or not complete) unless ``allow_incomplete``.

    Returns:
        None for a finished cache, else a one-line note on what is missing (to print when the
        command goes on with ``allow_incomplete``).

    Raises:
        SamcpError: the cache is unfinished and ``allow_incomplete`` is False.
    """
    note = reader.unfinished_note()
    if note is None:
        return None
    if not allow_incomplete:
        raise SamcpError(
            f"{note}; re-run the same `samcp precompute` to finish it, or pass "
            "--allow-incomplete to go on without the missing images"
        )
    return note


def _norm(v):
    # JSON round trip makes tuples lists and ints/floats compare as stored.
    import json

    return json.loads(json.dumps(v, sort_keys=True))


def _difference(old, new) -> str:
    """``old vs now new``, led by the path of the first differing entry when both are mappings
    (``features: 'sam2clip' vs now None``), so that a long attribute's change stays readable."""
    path = []
    while isinstance(old, dict) and isinstance(new, dict):
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if not diff:
            break
        path.append(diff[0])
        old, new = old.get(diff[0]), new.get(diff[0])
    lead = f"{'.'.join(path)}: " if path else ""
    return f"{lead}{_short(repr(old))} vs now {_short(repr(new))}"


def _short(v, n: int = 90) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _exists(path: str | Path) -> bool:
    if "://" not in str(path):
        return (Path(path) / "zarr.json").exists()
    try:
        _zarr().open_group(str(path), mode="r")
        return True
    except Exception:
        return False


def _open_root(path: str | Path, mode: str = "r"):
    zarr = _zarr()
    try:
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as exc:
        raise SamcpError(
            f"no samcp cache at {path} ({type(exc).__name__}); run `samcp precompute` first"
        ) from None
    version = root.attrs.get("samcp_cache_version")
    if version is None:
        raise SamcpError(f"{path} is a Zarr group but not a samcp cache (no samcp_cache_version)")
    if version != CACHE_VERSION:
        raise SamcpError(
            f"cache {path} has format version {version}, this samcp reads version {CACHE_VERSION}; "
            "re-run precompute or use a matching samcp"
        )
    return root


def write_clip_head(path: str | Path, weights) -> bool:
    """Stores the cache CLIP's frozen head (``clip_head/``: one float32 array per tensor, attrs
    ``kind``, ``norm_eps``, ``input_size``, ``level``; ``complete`` written last) unless a complete
    one is there. Idempotent, so a resumed precompute adds it to a cache made before it existed.

    Args:
        path: the cache root.
        weights: :class:`samcp.models.cliphead.ClipHeadWeights`.

    Returns:
        True when it was written now.
    """
    root = _open_root(path, mode="r+")
    if "clip_head" in root:
        g = root["clip_head"]
        if g.attrs.get("complete"):
            return False
        del root["clip_head"]
    g = root.create_group("clip_head")
    for name, arr in weights.tensors.items():
        a = np.asarray(arr, np.float32)
        g.create_array(name, shape=a.shape, dtype="float32")[...] = a
    g.attrs.update(
        {
            "kind": weights.kind,
            "norm_eps": float(weights.norm_eps),
            "input_size": int(weights.input_size),
            "level": weights.level,
        }
    )
    g.attrs["complete"] = True
    return True


def read_clip_head(root):
    """The cache's :class:`~samcp.models.cliphead.ClipHeadWeights`, or None (no complete
    ``clip_head`` group: a cache without CLIP, or made before samcp stored it)."""
    from samcp.models.cliphead import ClipHeadWeights

    if "clip_head" not in root:
        return None
    g = root["clip_head"]
    if not g.attrs.get("complete"):
        return None
    tensors = {name: np.asarray(a[...]) for name, a in g.arrays()}
    return ClipHeadWeights(
        str(g.attrs["kind"]),
        float(g.attrs["norm_eps"]),
        tensors,
        int(g.attrs["input_size"]),
        str(g.attrs.get("level", "clip_res5")),
    )


def complete_shards(root) -> list[str]:
    """Sorted ids of the shards whose ``complete`` attribute is true."""
    if "shards" not in root:
        return []
    shards = root["shards"]
    return sorted(k for k, g in shards.groups() if g.attrs.get("complete") is True)


def incomplete_shards(root) -> list[str]:
    """Sorted ids of shard groups present but not marked complete (an interrupted write)."""
    if "shards" not in root:
        return []
    return sorted(k for k, g in root["shards"].groups() if g.attrs.get("complete") is not True)


def shards_with_failed_rows(path: str | Path, shard_ids) -> list[str]:
    """The given complete shards that hold at least one failed row."""
    root = _open_root(path)
    return sorted(s for s in shard_ids if (root["shards"][s]["status"][...] != STATUS_OK).any())


def write_shard(path: str | Path, shard_id: str, rows: list[ImageResult]) -> int:
    """Writes one shard from scratch and marks it complete last. Returns the number of masks.

    Any earlier partial write of the same shard is deleted first, so a redone shard never mixes
    two attempts.
    """
    zarr = _zarr()
    from zarr.core.dtype import VariableLengthBytes, VariableLengthUTF8

    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    shards = root.require_group("shards")
    if shard_id in shards:
        del shards[shard_id]
    g = shards.create_group(shard_id)
    g.attrs["complete"] = False

    n = len(rows)
    counts = [len(r.proposals) if r.ok else 0 for r in rows]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    m = int(offsets[-1])

    def put(name, data, dtype=None, chunks=None):
        data = (
            np.asarray(data)
            if dtype is None or not isinstance(dtype, str)
            else np.asarray(data, dtype)
        )
        shape = data.shape
        if chunks is None:
            chunks = tuple(max(1, s) for s in shape)
        arr = g.create_array(name, shape=shape, dtype=dtype or data.dtype, chunks=chunks)
        if data.size:
            arr[...] = data

    put("image_id", np.array([r.image_id for r in rows], dtype=object), VariableLengthUTF8())
    put("error", np.array([r.error for r in rows], dtype=object), VariableLengthUTF8())
    put("height", [r.height for r in rows], "int32")
    put("width", [r.width for r in rows], "int32")
    put("status", [STATUS_OK if r.ok else STATUS_FAILED for r in rows], "uint8")
    put("mask_offset", offsets, "int64")
    ok = [r for r in rows if r.ok]
    rles = [c for r in ok for c in r.proposals.rles]
    put("rle", np.array(rles, dtype=object).reshape(m), VariableLengthBytes())
    for name, (dtype, tail) in MASK_ARRAYS.items():
        parts = [getattr(r.proposals, name) for r in ok]
        data = np.concatenate(parts) if parts else np.zeros((0, *tail), dtype)
        put(name, data.astype(dtype).reshape(m, *tail), dtype)
    image_names, mask_names = _put_extras(put, rows, ok, m)
    g.attrs.update({"image_arrays": image_names, "mask_arrays": mask_names})
    # Last: from here on the shard exists for readers.
    g.attrs.update({"complete": True, "num_images": n, "num_masks": m})
    return m


def _put_extras(
    put, rows: list[ImageResult], ok: list[ImageResult], m: int
) -> tuple[list[str], list[str]]:
    """Per-image and per-mask extra arrays; failed rows get zeros so that rows stay aligned."""
    image_names = sorted({k for r in ok for k in r.image_arrays})
    for name in image_names:
        ref = next(r.image_arrays[name] for r in ok if name in r.image_arrays)
        stack = np.zeros((len(rows), *ref.shape), ref.dtype)
        for i, r in enumerate(rows):
            if name in r.image_arrays:
                stack[i] = r.image_arrays[name]
        put(name, stack, chunks=(1, *ref.shape))
    mask_names = sorted({k for r in ok for k in r.mask_arrays})
    for name in mask_names:
        if any(name not in r.mask_arrays for r in ok):
            raise ValueError(f"per-mask array {name} missing for some images of the shard")
        data = np.concatenate([r.mask_arrays[name] for r in ok])
        if data.shape[0] != m:
            raise ValueError(f"per-mask array {name} has {data.shape[0]} rows for {m} masks")
        put(name, data, chunks=(max(1, min(m, 4096)), *data.shape[1:]))
    return image_names, mask_names


class CacheReader:
    """Reads a samcp proposal cache. The only way downstream code reads one.

    Args:
        path: the cache location given to ``samcp precompute --out``.

    Raises:
        SamcpError: nothing there, not a samcp cache, or another format version.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.root = _open_root(path)
        self.attrs = dict(self.root.attrs)
        try:
            self.shard_ids = complete_shards(self.root)
        except Exception as exc:  # a shard's zarr.json is not valid JSON / metadata
            reason = (str(exc).strip().splitlines() or [""])[0][:160]
            where = _unreadable_shard_dirs(path) or ["that shard's folder"]
            raise SamcpError(
                f"cache {path}: shard metadata cannot be read ({type(exc).__name__}: "
                f"{reason}); delete {', '.join(where)} and re-run the same "
                "`samcp precompute` to redo it"
            ) from None
        self._index: dict[str, tuple[str, int]] | None = None

    def clip_head(self):
        """The frozen CLIP head stored with the cache (None when it has none); see
        :func:`read_clip_head`."""
        return read_clip_head(self.root)

    @property
    def incomplete_shard_ids(self) -> list[str]:
        return incomplete_shards(self.root)

    @property
    def expected_images(self) -> int | None:
        """How many images precompute planned for this cache (None for old caches)."""
        n = (self.attrs.get("dataset") or {}).get("num_images")
        return int(n) if n is not None else None

    def unfinished_note(self) -> str | None:
        """None if every planned image is in a complete shard, else what is missing, in words."""
        have = len(self)
        want = self.expected_images
        bad = self.incomplete_shard_ids
        if not bad and (want is None or have >= want):
            return None
        missing = f"{want - have} of {want} images" if want is not None else "some images"
        parts = f"{len(bad)} shard(s) interrupted, " if bad else ""
        return (
            f"cache {self.path} is unfinished (precompute did not complete: {parts}{missing} "
            "not cached)"
        )

    def image_sizes(self) -> dict[str, tuple[int, int]]:
        """``image_id -> (height, width)`` of every row of the complete shards (failed ones too)."""
        out: dict[str, tuple[int, int]] = {}
        for sid in self.shard_ids:
            g = self._shard(sid)
            ids, hs, ws = (self._array(sid, g, n) for n in ("image_id", "height", "width"))
            out.update({str(i): (int(h), int(w)) for i, h, w in zip(ids, hs, ws, strict=True)})
        return out

    def _shard(self, shard_id: str):
        try:
            return self.root["shards"][shard_id]
        except Exception as exc:
            raise self._damaged(shard_id, exc) from None

    def shard_group(self, shard_id: str):
        """The Zarr group of a complete shard, checked to hold every array its rows need.

        Raises:
            SamcpError: the shard lacks an array (a damaged or hand-edited cache).
        """
        g = self._shard(shard_id)
        try:
            present = set(g.array_keys())
        except Exception as exc:
            raise self._damaged(shard_id, exc) from None
        declared = set(g.attrs.get("image_arrays", [])) | set(g.attrs.get("mask_arrays", []))
        for name in (*_CORE_ARRAYS, *sorted(declared)):
            if name not in present:
                raise self._damaged(shard_id, KeyError(f"no array {name}"), name)
        return g

    def _array(self, shard_id: str, group, name: str) -> np.ndarray:
        try:
            return group[name][...]
        except Exception as exc:
            raise self._damaged(shard_id, exc, name) from None

    def _damaged(self, shard_id: str, exc: BaseException, array: str = "") -> SamcpError:
        what = f"array {array} of shard {shard_id}" if array else f"shard {shard_id}"
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        return SamcpError(
            f"cache {self.path}: {what} cannot be read ({type(exc).__name__}: {reason}); delete "
            f"{self.path}/shards/{shard_id} and re-run the same `samcp precompute` to redo it"
        )

    def __len__(self) -> int:
        return sum(int(self._shard(s).attrs.get("num_images", 0)) for s in self.shard_ids)

    def read_shard(self, shard_id: str, arrays: list[str] | None = None) -> list[CachedImage]:
        """All rows of one complete shard.

        Args:
            shard_id: a shard id from ``shard_ids``.
            arrays: extra arrays (e.g. ``clip_mask_embed``, ``clip_res5``) to load besides the
                proposals; None loads every extra array present.
        """
        g = self._shard(shard_id)
        data = {name: self._array(shard_id, g, name) for name in _CORE_ARRAYS}
        image_names = set(g.attrs.get("image_arrays", []))
        mask_names = set(g.attrs.get("mask_arrays", []))
        wanted = sorted(image_names | mask_names) if arrays is None else arrays
        extra = {
            name: self._array(shard_id, g, name)
            for name in wanted
            if name in image_names | mask_names
        }
        out = []
        off = data["mask_offset"]
        for i in range(len(data["image_id"])):
            a, b = int(off[i]), int(off[i + 1])
            h, w = int(data["height"][i]), int(data["width"][i])
            props = Proposals(
                h,
                w,
                [bytes(c) for c in data["rle"][a:b]],
                data["bbox"][a:b],
                data["area"][a:b],
                data["predicted_iou"][a:b],
                data["stability_score"][a:b],
                data["point_coords"][a:b],
            )
            per_mask = {k: v[a:b] for k, v in extra.items() if k in mask_names}
            per_image = {k: v[i] for k, v in extra.items() if k in image_names}
            out.append(
                CachedImage(
                    str(data["image_id"][i]),
                    h,
                    w,
                    int(data["status"][i]),
                    str(data["error"][i]),
                    props,
                    per_image,
                    per_mask,
                )
            )
        return out

    def iter_images(
        self, include_failed: bool = False, arrays: list[str] | None = None, prefetch: int = 2
    ) -> Iterator[CachedImage]:
        """Every image, shard by shard in shard order, reading the next shards in the background."""
        for rows in self.iter_shards(arrays=arrays, prefetch=prefetch):
            for row in rows:
                if include_failed or row.status == STATUS_OK:
                    yield row

    def iter_shards(
        self, arrays: list[str] | None = None, prefetch: int = 2
    ) -> Iterator[list[CachedImage]]:
        """Shards in order; a background thread keeps up to ``prefetch`` shards read ahead."""
        if prefetch <= 0:
            for s in self.shard_ids:
                yield self.read_shard(s, arrays)
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def work():
            try:
                for s in self.shard_ids:
                    if stop.is_set():
                        return
                    q.put(self.read_shard(s, arrays))
                q.put(None)
            except BaseException as exc:  # surface reader errors in the consumer
                q.put(exc)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def get(self, image_id: str) -> CachedImage:
        """One image by id (builds an id index on first use)."""
        if self._index is None:
            self._index = {}
            for s in self.shard_ids:
                for i, iid in enumerate(self.root["shards"][s]["image_id"][...]):
                    self._index[str(iid)] = (s, i)
        if image_id not in self._index:
            raise SamcpError(f"image id {image_id!r} is not in cache {self.path}")
        s, i = self._index[image_id]
        return self.read_shard(s)[i]


def _unreadable_shard_dirs(path: str | Path) -> list[str]:
    """Local shard folders whose zarr.json is not a JSON object (to name them in messages)."""
    import json

    shards = Path(path) / "shards"
    if "://" in str(path) or not shards.is_dir():
        return []
    bad = []
    for d in sorted(p for p in shards.iterdir() if p.is_dir()):
        try:
            ok = isinstance(json.loads((d / "zarr.json").read_text()), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            bad.append(str(d))
    return bad


_CORE_ARRAYS = (
    "image_id",
    "error",
    "height",
    "width",
    "status",
    "mask_offset",
    "rle",
    *MASK_ARRAYS,
)
