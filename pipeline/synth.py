"""A deterministic synthetic dataset in the exact COCO panoptic 2017 layout.

The dataset lets every stage (proposals, cache, heads, eval) run end to end without downloading
COCO, and lets tests check numbers against a ground truth that is known exactly. The layout is
COCO's own, so the same readers work on real COCO unchanged::

    OUT/train2017/000000000001.jpg              images (JPEG, quality 95)
    OUT/val2017/...
    OUT/annotations/panoptic_train2017.json     COCO panoptic JSON
    OUT/annotations/panoptic_train2017/<n>.png  RGB panoptic PNGs, id = R + 256 G + 256^2 B, 0 = void
    OUT/annotations/panoptic_val2017.json, OUT/annotations/panoptic_val2017/
    OUT/semantic_train2017/<n>.png              uint8 contiguous class index, 255 = void
    OUT/semantic_val2017/<n>.png
    OUT/classes.txt                             FC-CLIP class file: ``id:name,synonym,...``
    OUT/classes_seen.txt                        the seen classes of the open-vocabulary split

Images are stuff bands (sky, grass, wall, water) overlaid with thing instances (balls, boxes, signs,
starfish, donuts, kites, pills) that touch and occlude one another, a few crowd regions and some
void pixels. Every class has its own colour *and* texture, so a classifier on pooled features can
tell classes apart while superpixels still find region boundaries.

Determinism: every image is drawn from its own generator seeded by (seed, split, index), so one
seed gives byte-identical files, and changing ``num_train`` does not change the val images.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon2mask

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.outputs import prepare_output_dir, staging_path, write_marker

DEFAULT_NUM_TRAIN = 40
DEFAULT_NUM_VAL = 20
DEFAULT_HEIGHT = 240
DEFAULT_WIDTH = 320
DEFAULT_MIN_INSTANCES = 3
DEFAULT_MAX_INSTANCES = 8
DEFAULT_CROWD_FRACTION = 0.25
JPEG_QUALITY = 95

# Val ids live in their own range (COCO's splits have disjoint ids too), and a reader that
# confuses row index with image id fails on them.
_SPLIT_ID_OFFSET = {"train2017": 0, "val2017": 500_000}
_SPLIT_SEED_CODE = {"train2017": 1, "val2017": 2}


@dataclass(frozen=True)
class SynthClass:
    """One synthetic category.

    Attributes:
        id: COCO category id (deliberately non-contiguous, as in COCO).
        name: Primary class name, a real word so that CLIP text embeddings are meaningful.
        synonyms: Extra names written to classes.txt (FC-CLIP prompt style).
        isthing: 1 for countable objects, 0 for stuff.
        color: Base RGB colour; also written as the category's ``color``.
        texture: Name of the texture pattern drawn on top of the base colour.
        shape: For things, the shape drawn for an instance; "" for stuff.
    """

    id: int
    name: str
    synonyms: tuple[str, ...]
    isthing: int
    color: tuple[int, int, int]
    texture: str
    shape: str = ""


# Ids have gaps on purpose: consumers must map category ids to contiguous indices explicitly.
SYNTH_CLASSES: tuple[SynthClass, ...] = (
    SynthClass(1, "ball", ("sphere", "orb"), 1, (220, 60, 50), "radial", "ellipse"),
    SynthClass(2, "box", ("crate", "carton"), 1, (190, 140, 70), "grain", "rectangle"),
    SynthClass(4, "triangle sign", ("warning sign", "road sign"), 1, (245, 215, 40), "flat",
               "triangle"),
    SynthClass(5, "starfish", ("sea star", "star"), 1, (240, 120, 170), "dots", "star"),
    SynthClass(7, "donut", ("doughnut", "ring"), 1, (150, 90, 50), "speckle", "ring"),
    SynthClass(8, "kite", ("diamond", "rhombus"), 1, (130, 60, 200), "diagonal", "diamond"),
    SynthClass(11, "pill", ("capsule", "tablet"), 1, (250, 250, 245), "halves", "capsule"),
    SynthClass(101, "sky", ("clouds",), 0, (120, 175, 235), "vgradient"),
    SynthClass(105, "grass", ("lawn", "meadow"), 0, (70, 150, 50), "blades"),
    SynthClass(110, "wall", ("brick wall", "bricks"), 0, (165, 85, 70), "bricks"),
    SynthClass(120, "water", ("sea", "lake"), 0, (30, 90, 140), "waves"),
)
_THINGS = [c for c in SYNTH_CLASSES if c.isthing]
_STUFF = [c for c in SYNTH_CLASSES if not c.isthing]
# Stuff bands are stacked top to bottom in this order, so sky is never below grass.
_STUFF_ORDER = {"sky": 0, "wall": 1, "water": 2, "grass": 3}


def synth_categories() -> list[dict]:
    """Return the COCO panoptic ``categories`` list of the synthetic dataset, in id order."""
    return [
        {
            "id": c.id,
            "name": c.name,
            "isthing": c.isthing,
            "color": list(c.color),
            "supercategory": "object" if c.isthing else "background",
        }
        for c in SYNTH_CLASSES
    ]


def classes_txt(classes: tuple[SynthClass, ...] = SYNTH_CLASSES) -> str:
    """Return the FC-CLIP style class file: one ``id:name,synonym,...`` line per category.

    Args:
        classes: The categories to list, in this order (default: all of them).
    """
    return "".join(f"{c.id}:{','.join((c.name, *c.synonyms))}\n" for c in classes)


# The fixed open-vocabulary split, the synthetic analogue of COCO -> ADE20K (docs/datasets.md):
# heads train on the seen classes only (unseen segments are void, as ADE-only classes are
# unlabelled in COCO) and are evaluated on all classes, reported for all, seen and unseen.
# Unseen: kite, pill (things), wall, water (stuff). Each has a colour + texture + shape no seen
# class shares (kite: purple striped diamond vs the brown grained box; pill: white two-tone
# capsule vs the red ball; wall: red-brown bricks; water: dark blue waves vs the light blue sky
# gradient), so recognising one takes transfer, not a copy of a seen look; and none of their
# names or synonyms is a name of a seen class, so the text side gives nothing away either. The
# ids of both groups are interleaved, so a class-index / category-id mix-up shows.
UNSEEN_CLASS_IDS: tuple[int, ...] = (8, 11, 110, 120)
SEEN_CLASS_IDS: tuple[int, ...] = tuple(c.id for c in SYNTH_CLASSES if c.id not in UNSEEN_CLASS_IDS)


def seen_classes() -> tuple[SynthClass, ...]:
    """Return the seen classes of the fixed open-vocabulary split (5 things, 2 stuff), id order."""
    return tuple(c for c in SYNTH_CLASSES if c.id in SEEN_CLASS_IDS)


def seen_classes_txt() -> str:
    """Return the FC-CLIP class file of the seen classes (written as ``classes_seen.txt``)."""
    return classes_txt(seen_classes())


# --------------------------------------------------------------------------------------------
# Shapes: boolean HxW masks from full-image coordinate grids. Images are small, so a full-grid
# evaluation per shape is both simpler and faster than per-pixel loops.


@dataclass(frozen=True)
class _Grid:
    yy: np.ndarray  # float32 HxW row coordinate of each pixel centre
    xx: np.ndarray  # float32 HxW column coordinate


def _rotated(grid: _Grid, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = grid.yy - cy, grid.xx - cx
    return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(shape: str, grid: _Grid, cy: float, cx: float, r: float, rng) -> np.ndarray:
    """Draw one thing of the given shape centred at (cy, cx) with characteristic radius r."""
    angle = float(rng.uniform(0, np.pi))
    aspect = float(rng.uniform(0.6, 1.0))
    u, v = _rotated(grid, cy, cx, angle)
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (r * max(aspect, 0.8))) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    if shape == "diamond":
        return np.abs(u) / r + np.abs(v) / (r * 0.6) <= 1.0
    if shape == "ring":
        rho = np.sqrt((u / r) ** 2 + (v / (r * max(aspect, 0.8))) ** 2)
        return (rho <= 1.0) & (rho >= 0.5)
    if shape == "capsule":
        half = r * 0.55
        w = r * 0.4
        along = np.clip(u, -half, half)
        return (u - along) ** 2 + v**2 <= w**2
    if shape in ("triangle", "star"):
        n = 3 if shape == "triangle" else 10
        t = angle + np.arange(n) * 2 * np.pi / n
        radii = np.full(n, r) if shape == "triangle" else np.where(np.arange(n) % 2, r * 0.45, r)
        poly = np.stack([cy + radii * np.sin(t), cx + radii * np.cos(t)], axis=1)
        return polygon2mask(grid.yy.shape, poly)
    raise ValueError(f"unknown shape {shape!r}")


# --------------------------------------------------------------------------------------------
# Textures: per-class appearance over the whole image; pixels of a class copy from it.


def _texture(name: str, grid: _Grid, rng) -> np.ndarray:
    """Return an HxW float32 luminance modulation in roughly [-1, 1] for the texture ``name``."""
    yy, xx = grid.yy, grid.xx
    h, w = yy.shape
    phase = float(rng.uniform(0, 2 * np.pi))
    if name == "flat":
        return np.zeros_like(yy)
    if name == "radial":
        # A lit sphere look: brightness falls off from a highlight (rough, but not flat).
        return np.cos(np.hypot(yy % 24 - 8, xx % 24 - 8) / 6.0)
    if name == "grain":
        return 0.8 * np.sin(xx * 0.9 + 2.0 * np.sin(yy * 0.15 + phase))
    if name == "dots":
        return np.where(np.hypot(yy % 6 - 3, xx % 6 - 3) < 1.5, -1.0, 0.3).astype(np.float32)
    if name == "speckle":
        return rng.uniform(-1, 1, size=(h, w)).astype(np.float32)
    if name == "diagonal":
        return np.sign(np.sin((xx + yy) * 0.6 + phase)).astype(np.float32)
    if name == "halves":
        return np.sign(np.sin(xx * 0.25 + phase)).astype(np.float32) * 0.7
    if name == "vgradient":
        return (1.0 - 2.0 * yy / max(h - 1, 1)) * 0.8 + 0.2 * np.sin(xx * 0.05 + phase)
    if name == "blades":
        return 0.6 * np.sin(xx * 1.7 + phase) + 0.4 * rng.uniform(-1, 1, size=(h, w))
    if name == "bricks":
        row = (yy // 8).astype(np.int32)
        mortar = (yy % 8 < 1.5) | (((xx + 8 * (row % 2)) % 16) < 1.5)
        return np.where(mortar, 1.0, -0.2).astype(np.float32)
    if name == "waves":
        return np.sin(yy * 0.8 + 1.5 * np.sin(xx * 0.12 + phase))
    raise ValueError(f"unknown texture {name!r}")


# Texture amplitude (0..255 scale) per texture: strong enough to tell classes apart, weak enough
# that a region stays one colour to a superpixel algorithm.
_TEXTURE_AMPLITUDE = {
    "flat": 0.0, "radial": 35.0, "grain": 25.0, "dots": 40.0, "speckle": 30.0, "diagonal": 30.0,
    "halves": 45.0, "vgradient": 30.0, "blades": 30.0, "bricks": 45.0, "waves": 25.0,
}


# --------------------------------------------------------------------------------------------
# One image.


@dataclass
class _Segment:
    category: SynthClass
    iscrowd: int


@dataclass
class SynthImage:
    """One generated sample before encoding.

    Attributes:
        image: HxWx3 uint8 RGB image.
        segment_index: HxW int32 index into ``segments`` plus one; 0 is void.
        categories: Category id per segment (len = number of segments).
        iscrowd: iscrowd flag per segment.
    """

    image: np.ndarray
    segment_index: np.ndarray
    categories: list[int]
    iscrowd: list[int]


def _draw_stuff(grid: _Grid, rng, seg: np.ndarray, segments: list[_Segment]) -> np.ndarray:
    """Tile the whole image with 2-3 wavy horizontal stuff bands; return a void-border mask."""
    h, w = seg.shape
    n_bands = int(rng.integers(2, min(3, len(_STUFF)) + 1))
    picks = rng.choice(len(_STUFF), size=n_bands, replace=False)
    classes = sorted((_STUFF[i] for i in picks), key=lambda c: _STUFF_ORDER.get(c.name, 99))
    # Boundary k is a sine wave around a sorted random base height.
    bases = np.sort(rng.uniform(0.25, 0.8, size=n_bands - 1)) * h
    x = grid.xx[0]
    band = np.zeros((h, w), dtype=np.int32)
    border = np.zeros((h, w), dtype=bool)
    for base in bases:
        amp = float(rng.uniform(2, 0.08 * h))
        curve = base + amp * np.sin(x * rng.uniform(0.01, 0.05) + rng.uniform(0, 2 * np.pi))
        band += grid.yy > curve[None, :]
        # Some boundaries are unlabelled, like the thin void seams in COCO's annotations.
        if rng.random() < 0.5:
            border |= np.abs(grid.yy - curve[None, :]) < 1.0
    for k, cls in enumerate(classes):
        segments.append(_Segment(cls, 0))
        seg[band == k] = len(segments)
    return border


def _random_centre(h: int, w: int, r: float, rng, anchors: list[tuple[float, float, float]]):
    """Pick a centre; often next to an earlier instance so that things touch and occlude."""
    if anchors and rng.random() < 0.5:
        ay, ax, ar = anchors[int(rng.integers(len(anchors)))]
        t = rng.uniform(0, 2 * np.pi)
        d = (ar + r) * rng.uniform(0.6, 1.05)
        return float(np.clip(ay + d * np.sin(t), 0, h - 1)), float(np.clip(ax + d * np.cos(t), 0, w - 1))
    return float(rng.uniform(r * 0.5, h - r * 0.5)), float(rng.uniform(r * 0.5, w - r * 0.5))


def generate_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    min_instances: int = DEFAULT_MIN_INSTANCES,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    crowd: bool = False,
) -> SynthImage:
    """Generate one synthetic image and its panoptic ground truth.

    Args:
        rng: Generator that fully determines the sample.
        height: Image height in pixels.
        width: Image width in pixels.
        min_instances: Fewest thing instances drawn (before occlusion may remove some).
        max_instances: Most thing instances drawn.
        crowd: Whether to draw one crowd region (a clump of same-class things, one segment).

    Returns:
        The image and its segments; segments fully hidden by later ones are already dropped.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    grid = _Grid(yy, xx)
    seg = np.zeros((height, width), dtype=np.int32)
    segments: list[_Segment] = []
    border = _draw_stuff(grid, rng, seg, segments)

    n_inst = int(rng.integers(min_instances, max_instances + 1))
    scale = min(height, width)
    # The crowd goes in at a random depth among the instances so that it is sometimes occluded.
    crowd_at = int(rng.integers(0, n_inst + 1)) if crowd else -1
    anchors: list[tuple[float, float, float]] = []
    for i in range(n_inst + 1):
        if i == crowd_at:
            cls = _THINGS[int(rng.integers(len(_THINGS)))]
            r_clump = scale * float(rng.uniform(0.12, 0.2))
            cy, cx = _random_centre(height, width, r_clump, rng, [])
            mask = np.zeros((height, width), dtype=bool)
            for _ in range(int(rng.integers(4, 8))):
                oy, ox = rng.uniform(-r_clump, r_clump, size=2)
                r = r_clump * float(rng.uniform(0.3, 0.45))
                mask |= _shape_mask(cls.shape, grid, cy + oy, cx + ox, r, rng)
            segments.append(_Segment(cls, 1))
            seg[mask] = len(segments)
        if i == n_inst:
            break
        cls = _THINGS[int(rng.integers(len(_THINGS)))]
        r = scale * float(rng.uniform(0.07, 0.18))
        cy, cx = _random_centre(height, width, r, rng, anchors)
        anchors.append((cy, cx, r))
        segments.append(_Segment(cls, 0))
        seg[_shape_mask(cls.shape, grid, cy, cx, r, rng)] = len(segments)

    # Void: seams between some stuff bands (not over things) and one or two unlabelled blobs.
    void = border & np.isin(seg, [k + 1 for k, s in enumerate(segments) if not s.category.isthing])
    for _ in range(int(rng.integers(1, 3))):
        r = scale * float(rng.uniform(0.03, 0.06))
        cy, cx = float(rng.uniform(0, height)), float(rng.uniform(0, width))
        void |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    seg[void] = 0

    image = _render(grid, seg, segments, void, rng)

    # Occlusion may hide a segment completely; drop it and renumber densely.
    present = np.bincount(seg.ravel(), minlength=len(segments) + 1)[1:] > 0
    remap = np.zeros(len(segments) + 1, dtype=np.int32)
    remap[1:][present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    kept = [s for s, p in zip(segments, present) if p]
    return SynthImage(
        image=image,
        segment_index=remap[seg],
        categories=[s.category.id for s in kept],
        iscrowd=[s.iscrowd for s in kept],
    )


def _render(grid: _Grid, seg: np.ndarray, segments: list[_Segment], void: np.ndarray, rng):
    h, w = seg.shape
    img = np.zeros((h, w, 3), dtype=np.float32)
    seg_class = np.array([-1] + [SYNTH_CLASSES.index(s.category) for s in segments])
    pixel_class = seg_class[seg]
    for ci in np.unique(pixel_class):
        if ci < 0:
            continue
        cls = SYNTH_CLASSES[int(ci)]
        where = pixel_class == ci
        tex = _texture(cls.texture, grid, rng)[where] * _TEXTURE_AMPLITUDE[cls.texture]
        img[where] = np.asarray(cls.color, dtype=np.float32) + tex[:, None]
    # Per-segment brightness and a soft shading gradient, so that two touching instances of the
    # same class still differ a little, as real objects do.
    offset = np.concatenate([[0.0], rng.uniform(-18, 18, size=len(segments))]).astype(np.float32)
    img += offset[seg][..., None]
    shade = 10.0 * np.sin(grid.xx * 0.02 + rng.uniform(0, 6)) * np.cos(grid.yy * 0.02)
    img += shade[..., None]
    # Void pixels: neutral grey with noise, unlike any class colour.
    img[void] = rng.uniform(60, 110) + rng.normal(0, 12, size=(int(void.sum()), 1))
    img += rng.normal(0, 5, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Encoding and the dataset on disk.


def segments_info(segment_index: np.ndarray, ids: np.ndarray, categories, iscrowd) -> list[dict]:
    """Build COCO ``segments_info`` (area = pixel count, bbox XYWH from pixels).

    Args:
        segment_index: HxW int32, 0 void, k+1 for segment k.
        ids: Panoptic id per segment.
        categories: Category id per segment.
        iscrowd: Crowd flag per segment.
    """
    n = len(categories)
    areas = np.bincount(segment_index.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(segment_index, max_label=n)
    info = []
    for k in range(n):
        sy, sx = boxes[k]
        info.append({
            "id": int(ids[k]),
            "category_id": int(categories[k]),
            "area": int(areas[k]),
            "bbox": [int(sx.start), int(sy.start), int(sx.stop - sx.start), int(sy.stop - sy.start)],
            "iscrowd": int(iscrowd[k]),
        })
    return info


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """Encode an HxW panoptic id map as the COCO RGB PNG payload (id = R + 256 G + 256^2 B)."""
    id_map = id_map.astype(np.uint32)
    return np.stack([id_map & 255, (id_map >> 8) & 255, (id_map >> 16) & 255], -1).astype(np.uint8)


def _write_split(out: Path, split: str, seed: int, num: int, height: int, width: int,
                 min_instances: int, max_instances: int, crowd_fraction: float) -> None:
    img_dir = out / split
    pan_dir = out / "annotations" / f"panoptic_{split}"
    sem_dir = out / f"semantic_{split}"
    for d in (img_dir, pan_dir, sem_dir):
        d.mkdir(parents=True, exist_ok=True)
    split_rng = np.random.default_rng([seed, _SPLIT_SEED_CODE[split]])
    # Crowds go into a fixed fraction of the images (at least one when the fraction is > 0), so
    # that even small sets exercise the iscrowd path.
    n_crowd = min(num, max(1, round(crowd_fraction * num))) if crowd_fraction > 0 else 0
    crowd_images = set(split_rng.choice(num, size=n_crowd, replace=False).tolist()) if num else set()
    contiguous = {c.id: i for i, c in enumerate(SYNTH_CLASSES)}
    images, annotations = [], []
    for i in range(num):
        rng = np.random.default_rng([seed, _SPLIT_SEED_CODE[split], i])
        sample = generate_image(rng, height, width, min_instances=min_instances,
                                max_instances=max_instances, crowd=i in crowd_images)
        image_id = _SPLIT_ID_OFFSET[split] + i + 1
        stem = f"{image_id:012d}"
        n = len(sample.categories)
        # Distinct ids spread over all three channels, as COCO's are (readers must decode all 24
        # bits); drawn from the image's generator so they are deterministic too.
        ids = _distinct_ids(rng, n)
        lut = np.concatenate([[0], ids]).astype(np.uint32)
        Image.fromarray(sample.image).save(img_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(id_to_rgb(lut[sample.segment_index])).save(pan_dir / f"{stem}.png")
        sem_lut = np.array([255] + [contiguous[c] for c in sample.categories], dtype=np.uint8)
        Image.fromarray(sem_lut[sample.segment_index]).save(sem_dir / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width,
                       "height": height})
        annotations.append({
            "image_id": image_id,
            "file_name": f"{stem}.png",
            "segments_info": segments_info(sample.segment_index, ids, sample.categories,
                                           sample.iscrowd),
        })
    doc = {
        "info": {"description": f"samcp synthetic panoptic dataset (seed {seed})",
                 "version": "1.0", "year": 2017, "contributor": "samcp",
                 "date_created": "2017-01-01"},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": synth_categories(),
    }
    (out / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(doc))


def _distinct_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    ids: set[int] = set()
    while len(ids) < n:
        ids.update(int(v) for v in rng.integers(1, 256**3, size=n - len(ids)))
    return np.array(sorted(ids), dtype=np.int64)


def make_synthetic_dataset(
    out: Path,
    *,
    seed: int = 0,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    min_instances: int = DEFAULT_MIN_INSTANCES,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    crowd_fraction: float = DEFAULT_CROWD_FRACTION,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a synthetic COCO-panoptic-2017-layout dataset to ``out``.

    The dataset is built in a sibling temporary folder and renamed into place at the end, so an
    interrupted run never leaves something at ``out`` that looks complete.

    Args:
        out: Destination folder. Must not exist or be empty, unless ``overwrite`` and it holds
            a synthetic dataset made by samcp (nothing else is ever replaced).
        seed: Seed; the same seed gives byte-identical files.
        num_train: Number of train2017 images.
        num_val: Number of val2017 images.
        height: Image height in pixels (>= 32).
        width: Image width in pixels (>= 32).
        min_instances: Fewest thing instances drawn per image (occlusion may remove some).
        max_instances: Most thing instances drawn per image.
        crowd_fraction: Fraction of images per split that get one crowd region (iscrowd=1);
            at least one image per split gets one when this is > 0.
        overwrite: Replace an existing synthetic dataset at ``out``.
        progress: Optional callback receiving one short line per finished split.

    Returns:
        ``out`` as an absolute path.

    Raises:
        SamcpError: Bad parameters, or ``out`` is a file / non-empty without ``overwrite``.
    """
    out = Path(out).absolute()
    _validate(num_train, num_val, height, width, min_instances, max_instances, crowd_fraction)
    prepare_output_dir(out, "dataset", overwrite=overwrite, option="OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(out, "tmp")
    tmp.mkdir()
    try:
        for split, num in (("train2017", num_train), ("val2017", num_val)):
            _write_split(tmp, split, seed, num, height, width, min_instances, max_instances,
                         crowd_fraction)
            if progress is not None:
                progress(f"{split}: {num} images")
        (tmp / "classes.txt").write_text(classes_txt())
        (tmp / "classes_seen.txt").write_text(seen_classes_txt())
        write_marker(tmp, "dataset")
        if out.exists():
            # Move the old folder aside first so the swap is two renames, not a slow delete
            # during which `out` is half gone.
            old = staging_path(out, "old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _validate(num_train, num_val, height, width, min_instances, max_instances, crowd_fraction):
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise SamcpError("--num-train and --num-val must be >= 0 and not both 0")
    if height < 32 or width < 32:
        raise SamcpError(f"image size {width}x{height} is too small; use --height/--width >= 32")
    if min_instances < 0 or max_instances < min_instances:
        raise SamcpError(
            f"instances range [{min_instances}, {max_instances}] is invalid; "
            "need 0 <= --min-instances <= --max-instances"
        )
    if not 0.0 <= crowd_fraction <= 1.0:
        raise SamcpError(f"--crowd-fraction {crowd_fraction} must be between 0 and 1")
