"""Image sources: COCO panoptic 2017 folders, JSONL manifests for unlabelled sets, and sharding.

Every stage sees images as :class:`ImageRecord` lists. Labelled data is read from the exact COCO
panoptic layout (``root/annotations/panoptic_val2017.json``, ``root/annotations/panoptic_val2017/``,
``root/val2017/``), so the synthetic set (:mod:`samcp.pipeline.synth`) and real COCO go through
the same code. Unlabelled sets are listed in a JSONL manifest, one image per line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from samcp.pipeline.errors import SamcpError

VOID_LABEL = 255  # semantic label of void / unlabelled pixels (detectron2's ignore value)
MANIFEST_KEYS = ("image_id", "file_name", "width", "height")


@dataclass(frozen=True)
class ImageRecord:
    """One input image.

    Attributes:
        image_id: Image id, always a string in samcp (``str(coco_id)`` for COCO).
        file_name: Absolute path of the image file.
        height: Image height in pixels as stored (no EXIF rotation applied).
        width: Image width in pixels as stored.
    """

    image_id: str
    file_name: str
    height: int
    width: int


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as an HxWx3 uint8 RGB array.

    EXIF orientation is deliberately *not* applied: COCO annotations refer to the stored pixel
    orientation.

    Args:
        path: Image file.

    Returns:
        The image as an HxWx3 uint8 array.

    Raises:
        OSError: The file is missing or cannot be decoded (callers record a failed row).
    """
    with Image.open(path) as im:
        # load() forces decoding here, so a truncated file fails now rather than later.
        im.load()
        if im.mode.startswith("I;16") or im.mode == "I":
            # 16-bit greyscale: Pillow's convert("RGB") clips values above 255 to white, so
            # rescale 0..65535 to 0..255 first.
            grey = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
            return np.repeat(((grey + 128) // 257).astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Decode a COCO panoptic PNG payload: id = R + 256 G + 256^2 B, as int32."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _id_sort_key(image_id: object) -> tuple[int, int, str]:
    # COCO ids are ints; sort them numerically, and anything else after them as text.
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return (0, image_id, "")
    return (1, 0, str(image_id))


class CocoPanopticDataset:
    """A COCO-panoptic-format dataset split (real COCO 2017 or ``samcp synth`` output).

    Args:
        root: Dataset root (the folder holding ``annotations/`` and the image folders).
        split: Split folder name exactly as on disk, e.g. ``"val2017"`` or ``"train2017"``.
        json_path: Override for ``root/annotations/panoptic_{split}.json``.
        image_dir: Override for ``root/{split}``.
        panoptic_dir: Override for ``root/annotations/panoptic_{split}``.
        semantic_dir: Override for the semantic label PNG folder; by default
            ``root/semantic_{split}`` or, failing that, Mask2Former's ``root/panoptic_semseg_{split}``.
            When none exists, semantic labels are derived from the panoptic PNGs.

    Raises:
        SamcpError: The JSON or the image folder is missing, or the JSON is not COCO panoptic.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val2017",
        *,
        json_path: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        panoptic_dir: str | os.PathLike | None = None,
        semantic_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.split = split
        self.json_path = Path(json_path or self.root / "annotations" / f"panoptic_{split}.json")
        self.image_dir = Path(image_dir or self.root / split).absolute()
        self.panoptic_dir = Path(
            panoptic_dir or self.root / "annotations" / f"panoptic_{split}"
        ).absolute()
        if semantic_dir is not None:
            self.semantic_dir: Path | None = Path(semantic_dir).absolute()
        else:
            candidates = [self.root / f"semantic_{split}", self.root / f"panoptic_semseg_{split}"]
            self.semantic_dir = next((c for c in candidates if c.is_dir()), None)

        if not self.json_path.is_file():
            raise SamcpError(
                f"panoptic annotations {self.json_path} not found; expected the COCO panoptic layout "
                f"<root>/annotations/panoptic_{split}.json (check the root and --split)"
            )
        if not self.image_dir.is_dir():
            raise SamcpError(
                f"image folder {self.image_dir} not found; expected <root>/{split}/ "
                "(check the root and --split)"
            )
        try:
            doc = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SamcpError(f"{self.json_path} is not valid JSON ({exc}); re-download it") from exc
        keys = ("images", "annotations", "categories")
        missing = [k for k in keys if k not in doc] if isinstance(doc, dict) else list(keys)
        if missing:
            raise SamcpError(
                f"{self.json_path} is not a COCO panoptic file (missing {missing}); "
                "pass a panoptic_*.json, not an instances_*.json"
            )
        try:
            self.categories: list[dict] = list(doc["categories"])
            # Contiguous class index in category order, as Mask2Former's semantic converter uses.
            self.category_index: dict[int, int] = {
                int(c["id"]): i for i, c in enumerate(self.categories)
            }
            images = sorted(doc["images"], key=lambda im: _id_sort_key(im["id"]))
            self._images = {str(im["id"]): im for im in images}
            self._annotations = {str(a["image_id"]): a for a in doc["annotations"]}
            self.records: list[ImageRecord] = [
                ImageRecord(
                    image_id=str(im["id"]),
                    file_name=str(self.image_dir / im["file_name"]),
                    height=int(im["height"]),
                    width=int(im["width"]),
                )
                for im in images
            ]
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise SamcpError(
                f"{self.json_path}: malformed categories/images/annotations entry ({what[:120]}); "
                "each needs id (and images file_name, height, width; annotations image_id): "
                "fix or re-create the JSON"
            ) from None

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, image_id: str | int) -> dict:
        try:
            return self._images[str(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.json_path}") from None

    def image_path(self, image_id: str | int) -> Path:
        """Return the absolute path of an image file."""
        return self.image_dir / self._image(image_id)["file_name"]

    def annotation(self, image_id: str | int) -> dict:
        """Return the raw COCO panoptic annotation (``file_name``, ``segments_info``) of an image.

        Raises:
            KeyError: The image has no annotation in the JSON.
        """
        self._image(image_id)
        try:
            return self._annotations[str(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id!r} has no annotation in {self.json_path}") from None

    def load_panoptic(self, image_id: str | int) -> tuple[np.ndarray, list[dict]]:
        """Load the panoptic ground truth of an image.

        Returns:
            ``(segment_id_map, segments_info)``: an HxW int32 map of segment ids (0 = void) and
            the segments' COCO dicts.

        Raises:
            SamcpError: The PNG is missing or its size differs from the image's.
        """
        ann = self.annotation(image_id)
        png = self.panoptic_dir / ann["file_name"]
        if not png.is_file():
            raise SamcpError(
                f"panoptic PNG {png} not found; unpack panoptic_{self.split}.zip into {self.panoptic_dir}"
            )
        with Image.open(png) as im:
            id_map = rgb_to_id(np.asarray(im.convert("RGB")))
        self._check_size(image_id, id_map, png)
        return id_map, list(ann["segments_info"])

    def load_semantic(self, image_id: str | int) -> np.ndarray:
        """Load the semantic labels of an image: HxW uint8 contiguous class index, 255 = void.

        Read from the semantic PNG folder when there is one, otherwise derived from the panoptic
        PNG (crowd segments keep their class, like Mask2Former's converter).
        """
        if self.semantic_dir is not None:
            stem = Path(self._image(image_id)["file_name"]).stem
            png = self.semantic_dir / f"{stem}.png"
            if png.is_file():
                with Image.open(png) as im:
                    sem = np.asarray(im, dtype=np.uint8).copy()
                self._check_size(image_id, sem, png)
                return sem
        id_map, segments = self.load_panoptic(image_id)
        ids, inverse = np.unique(id_map, return_inverse=True)
        seg_class = {int(s["id"]): self.category_index[int(s["category_id"])] for s in segments}
        # Ids in the PNG without a segments_info entry are treated as void, as panopticapi does.
        lut = np.array([seg_class.get(int(i), VOID_LABEL) for i in ids], dtype=np.uint8)
        return lut[inverse.reshape(id_map.shape)]

    def _check_size(self, image_id: str | int, arr: np.ndarray, path: Path) -> None:
        im = self._image(image_id)
        if arr.shape[:2] != (int(im["height"]), int(im["width"])):
            raise SamcpError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but image {image_id} is "
                f"{im['width']}x{im['height']}; the annotation folder does not match the JSON"
            )


# --------------------------------------------------------------------------------------------
# JSONL manifests.


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """Read and validate a JSONL image manifest.

    Each non-blank line is a JSON object with ``image_id`` (string or integer), ``file_name``
    (relative to the manifest's folder, or absolute), ``width`` and ``height`` (positive ints).

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The records in file order, with absolute ``file_name`` and string ``image_id``.

    Raises:
        SamcpError: The file is missing or empty, or a line is malformed; the message names the
            file, the line number and what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise SamcpError(f"manifest {path} not found; pass an existing .jsonl file")
    base = path.absolute().parent
    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                # utf-8-sig on the first line: editors on Windows start UTF-8 files with a BOM.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise SamcpError(
                    f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); save the manifest as UTF-8 (file names included)"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SamcpError(f"{where}: not valid JSON ({exc.msg}); write one object per line") \
                    from None
            if not isinstance(obj, dict):
                raise SamcpError(f"{where}: expected a JSON object with keys {', '.join(MANIFEST_KEYS)}")
            missing = [k for k in MANIFEST_KEYS if k not in obj]
            if missing:
                raise SamcpError(f"{where}: missing key(s) {', '.join(missing)}; every line needs "
                                 f"{', '.join(MANIFEST_KEYS)}")
            image_id = obj["image_id"]
            if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or image_id == "":
                raise SamcpError(f"{where}: image_id must be a non-empty string or an integer, "
                                 f"got {image_id!r}")
            file_name = obj["file_name"]
            if not isinstance(file_name, str) or not file_name:
                raise SamcpError(f"{where}: file_name must be a non-empty string path, got {file_name!r}")
            for key in ("width", "height"):
                v = obj[key]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise SamcpError(f"{where}: {key} must be a positive integer, got {v!r}")
            image_id = str(image_id)
            if image_id in seen:
                raise SamcpError(f"{where}: duplicate image_id {image_id!r} (first on line "
                                 f"{seen[image_id]}); image ids must be unique")
            seen[image_id] = lineno
            records.append(ImageRecord(image_id=image_id,
                                       file_name=str(base / Path(file_name)),
                                       height=obj["height"], width=obj["width"]))
    if not records:
        raise SamcpError(f"manifest {path} lists no images; add one JSON object per line")
    return records


def write_manifest(records: Iterable[ImageRecord], path: str | os.PathLike) -> Path:
    """Write records as a JSONL manifest (atomically: a temporary file renamed into place).

    Image paths inside the manifest's folder are written relative to it, so the manifest and its
    images can be moved together; others stay absolute.

    Args:
        records: Images to list.
        path: Destination ``.jsonl`` file.

    Returns:
        The manifest path.
    """
    path = Path(path)
    base = path.absolute().parent
    lines = []
    for r in records:
        fn = Path(r.file_name)
        try:
            fn_out = fn.relative_to(base).as_posix()
        except ValueError:
            fn_out = str(fn)
        lines.append(json.dumps({"image_id": str(r.image_id), "file_name": fn_out,
                                 "width": int(r.width), "height": int(r.height)}))
    base.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def open_image_source(path: str | os.PathLike, split: str = "val2017") -> list[ImageRecord]:
    """Resolve an input to a list of images.

    Args:
        path: A ``.jsonl`` manifest, or a COCO-panoptic-layout dataset root.
        split: Split folder name used when ``path`` is a dataset root.

    Returns:
        The image records.

    Raises:
        SamcpError: ``path`` is neither a manifest nor a dataset folder.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return read_manifest(path)
    if path.is_dir():
        return CocoPanopticDataset(path, split).records
    if not path.exists():
        raise SamcpError(f"{path} does not exist; pass a .jsonl manifest or a COCO-layout dataset folder")
    raise SamcpError(f"{path} is neither a .jsonl manifest nor a dataset folder; pass one of those")


def shard_records(
    records: Sequence[ImageRecord], shard_size: int
) -> list[tuple[str, list[ImageRecord]]]:
    """Split records into consecutive shards of ``shard_size`` (the last may be shorter).

    The input order is kept and shard ids are the zero-padded chunk index ("00000", "00001",
    ...), so the same input and size always give the same shards, which is what resume relies on.

    Raises:
        SamcpError: ``shard_size`` < 1.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise SamcpError(f"shard size {shard_size!r} is invalid; use a positive integer")
    records = list(records)
    return [
        (f"{i // shard_size:05d}", records[i : i + shard_size])
        for i in range(0, len(records), shard_size)
    ]
