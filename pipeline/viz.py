"""`samcp viz`: draw cached proposals, panoptic predictions and ground truth over their images.

:func:`render_overlay` is the one drawing routine: masks become a single coloured layer blended over
the image, with each mask's boundary as an outline. Larger masks are drawn first so that small ones
stay visible on top; colours are a deterministic function of the mask index, or given per mask with
optional text labels.

Panoptic segments (a prediction folder, a ground truth) are not coloured by their class's colour:
on a dataset whose classes are painted in those colours (the synthetic set) the overlay would
vanish. :func:`contrast_colors` picks, per segment, a palette colour far from the image's mean
colour under that segment instead, and the class name is written on the segment.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from samcp.pipeline.cache import STATUS_OK, CachedImage, CacheReader
from samcp.pipeline.datasets import load_image_rgb, open_image_source
from samcp.pipeline.errors import SamcpError

CANVAS_GREY = 128  # the background used when an image file cannot be found
_GOLDEN = 0.618033988749895
PANEL_GAP = 8  # pixels between the panels of a side-by-side picture
CAPTION_HEIGHT = 16  # the strip above side-by-side panels that holds their captions
_BACKDROP = (24, 24, 24)  # sheet colour of grids and side-by-side pictures
_CONTRAST_PALETTE = 24  # candidate colours for contrast_colors
# CIELAB distance a reused palette colour costs in contrast_colors: two segments of one picture
# should not share a colour while a nearly as contrasting unused one exists.
_REUSE_PENALTY = 30.0


def mask_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct, saturated colours; colour i depends on i only (golden-ratio hues)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        h = (0.13 + i * _GOLDEN) % 1.0
        s = 0.85 - 0.25 * ((i // 7) % 2)  # alternate saturation/value so neighbours in hue differ
        v = 0.95 - 0.2 * ((i // 3) % 2)
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out


def paint_order(masks: np.ndarray) -> np.ndarray:
    """Mask indices in drawing order: largest area first, ties by index (so small masks end on top)."""
    areas = masks.reshape(len(masks), -1).sum(1) if len(masks) else np.zeros(0, np.int64)
    return np.lexsort((np.arange(len(masks)), -areas))


def render_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    alpha: float = 0.5,
    outline: bool = True,
    colors: np.ndarray | None = None,
    labels: list[str] | None = None,
) -> np.ndarray:
    """Draws masks over an image as one coloured overlay with outlines.

    Masks are painted largest first; where masks overlap, the pixel takes the colour of the last
    (topmost, i.e. smallest) one. The overlay is blended once: an overlaid pixel is
    ``(1 - alpha) * image + alpha * colour``; pixels outside every mask keep the image's value.

    Args:
        image: (H, W, 3) uint8 RGB image (a (H, W) grey image is broadcast to RGB).
        masks: (M, H, W) bool masks.
        alpha: opacity of the fill, 0 (invisible) to 1 (opaque).
        outline: draw each mask's boundary (inner boundary pixels) in its colour, fully opaque.
        colors: (M, 3) uint8 colour per mask (e.g. per class for predictions); default
            :func:`mask_colors` by mask index.
        labels: optional text per mask, written at the mask's most interior point.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    from skimage.segmentation import find_boundaries

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    masks = np.asarray(masks, bool)
    h, w = image.shape[:2]
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise ValueError(f"masks must be (M, {h}, {w}), got {masks.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = len(masks)
    colors = mask_colors(m) if colors is None else np.asarray(colors, np.uint8).reshape(m, 3)
    if labels is not None and len(labels) != m:
        raise ValueError(f"{len(labels)} labels for {m} masks")

    top = np.full((h, w), -1, np.int64)  # index of the topmost mask at each pixel
    edge = np.full((h, w), -1, np.int64)  # index of the mask whose outline is visible there
    for i in paint_order(masks):
        mk = masks[i]
        if not mk.any():
            continue
        top[mk] = i
        if outline:
            # Work on the mask's box (plus a pixel) so cost scales with the mask, not the image.
            ys, xs = np.nonzero(mk.any(1))[0], np.nonzero(mk.any(0))[0]
            y0, y1 = max(ys[0] - 1, 0), min(ys[-1] + 2, h)
            x0, x1 = max(xs[0] - 1, 0), min(xs[-1] + 2, w)
            crop = mk[y0:y1, x0:x1]
            b = find_boundaries(crop, mode="inner") & crop
            sub = edge[y0:y1, x0:x1]
            sub[crop] = -1  # this mask hides the outlines of masks below it
            sub[b] = i

    out = image.astype(np.float64)
    fill = top >= 0
    out[fill] = (1.0 - alpha) * out[fill] + alpha * colors[top[fill]].astype(np.float64)
    lines = edge >= 0
    out[lines] = colors[edge[lines]]
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if labels is not None:
        out = _draw_labels(out, masks, labels, colors)
    return out


def _draw_labels(
    image: np.ndarray, masks: np.ndarray, labels: list[str], colors: np.ndarray
) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for i, text in enumerate(labels):
        if not text or not masks[i].any():
            continue
        # The most interior point of the mask: the label sits on the mask even for non-convex ones.
        dist = distance_transform_edt(np.pad(masks[i], 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        box = draw.textbbox((int(x), int(y)), text, font=font, anchor="mm")
        draw.rectangle(box, fill=tuple(int(c) // 3 for c in colors[i]))
        draw.text((int(x), int(y)), text, fill=(255, 255, 255), font=font, anchor="mm")
    return np.asarray(pil)


@dataclass
class VizResult:
    """A rendered picture and what the user should know about it."""

    image: np.ndarray  # (H, W, 3) uint8
    image_ids: list[str]
    num_masks: int  # masks drawn
    total_masks: int  # masks in the cache for these images (more than drawn with max_masks)
    warnings: list[str] = field(default_factory=list)


def find_image(
    reader: CacheReader, row: CachedImage, image_root: str | Path | None = None
) -> tuple[np.ndarray | None, str]:
    """Loads the pixels of a cached image.

    The image is looked up in the cache's ``dataset_source``: a COCO-layout root and split, a
    JSONL manifest, or the root of the benchmark a cache made with ``precompute --dataset NAME``
    records (read with that benchmark's reader). ``image_root`` overrides that: another dataset
    root (of the cache's benchmark, for a benchmark cache) or manifest (same split), or a plain
    folder holding the file under its original name, its id, or COCO's 12-digit name.

    Returns:
        ``(pixels, "")``, or ``(None, what was tried)`` when no matching file was found.
    """
    src = reader.attrs.get("dataset_source") or {}
    benchmark = src.get("benchmark") or None
    split = src.get("split") or ("val" if benchmark else "val2017")
    tried: list[str] = []
    original = (
        _lookup(src["path"], split, row.image_id, tried, benchmark) if src.get("path") else None
    )
    candidates: list[Path] = []
    if image_root is None:
        if original is not None:
            candidates.append(Path(original))
    else:
        root = Path(image_root)
        found = None
        if benchmark is not None and root.is_dir():
            found = _lookup(str(root), split, row.image_id, [], benchmark)
        if found is not None:
            candidates.append(Path(found))
        elif root.suffix == ".jsonl" or (root / "annotations").is_dir():
            found = _lookup(str(root), split, row.image_id, tried)
            if found is not None:
                candidates.append(Path(found))
        elif root.is_dir():
            if original is not None:
                candidates.append(root / Path(original).name)
            stems = [row.image_id]
            if row.image_id.isdigit():
                stems.append(f"{int(row.image_id):012d}")
            candidates += [p for stem in stems for p in sorted(root.glob(f"{stem}.*"))]
            if not candidates:
                tried.append(f"no file for image {row.image_id} in {root}")
        else:
            tried.append(f"{root} does not exist")
    for path in candidates:
        try:
            pixels = load_image_rgb(path)
        except OSError as exc:
            tried.append(f"{path}: {type(exc).__name__}")
            continue
        if pixels.shape[:2] != (row.height, row.width):
            tried.append(
                f"{path} is {pixels.shape[1]}x{pixels.shape[0]} but the cache says "
                f"{row.width}x{row.height}"
            )
            continue
        return pixels, ""
    if not tried:
        tried.append("the cache records no dataset_source")
    return None, "; ".join(tried)


def _lookup(
    path: str, split: str, image_id: str, tried: list[str], benchmark: str | None = None
) -> str | None:
    """The file name of ``image_id`` in a dataset source (a benchmark's root when ``benchmark``
    is given), or None (saying why in ``tried``)."""
    try:
        index = _file_names(str(path), split, benchmark)
    except (SamcpError, OSError, ValueError) as exc:
        tried.append(str(exc))
        return None
    if image_id not in index:
        what = f"{benchmark} at {path}" if benchmark else str(path)
        tried.append(f"{what} [{split}] does not list image {image_id}")
        return None
    return index[image_id]


@functools.lru_cache(maxsize=4)
def _file_names(path: str, split: str, benchmark: str | None = None) -> dict[str, str]:
    # Parsed once per process: a grid of images from COCO train would otherwise re-read its JSON.
    if benchmark is not None:
        from samcp.pipeline.benchmarks import open_benchmark

        bench = open_benchmark(benchmark, path, split)
        if hasattr(bench, "items"):  # semantic: no need to read every image's header
            return {it.image_id: str(it.image) for it in bench.items}
        return {r.image_id: r.file_name for r in bench.records}
    return {r.image_id: r.file_name for r in open_image_source(path, split)}


def render_cached_image(
    cache: str | Path,
    image_id: str,
    image_root: str | Path | None = None,
    max_masks: int | None = 200,
    alpha: float = 0.5,
    outline: bool = True,
    reader: CacheReader | None = None,
) -> VizResult:
    """Renders one cached image with its proposals.

    Args:
        cache: the cache location.
        image_id: the image's id as stored (COCO ids as decimal strings).
        image_root: where to find the image instead of the cache's ``dataset_source``.
        max_masks: draw only the first N proposals in cache order (for SAM: best predicted IoU
            first); None draws all.
        alpha: fill opacity.
        outline: draw mask boundaries.
        reader: an open reader of ``cache`` (saves re-opening it when rendering many images).

    Raises:
        SamcpError: the cache cannot be read or has no such image (with nearby ids as a hint).
    """
    reader = reader or CacheReader(cache)
    row, pixels, warnings = _cached_row_and_pixels(reader, image_id, image_root)
    if row.status != STATUS_OK:
        warnings.append(f"image {row.image_id} failed in precompute ({row.error}); no proposals")
    props = row.proposals
    n = len(props) if max_masks is None else min(len(props), max_masks)
    masks = props.decode()[:n] if n else np.zeros((0, row.height, row.width), bool)
    return VizResult(
        render_overlay(pixels, masks, alpha, outline), [row.image_id], n, len(props), warnings
    )


def _cached_row_and_pixels(
    reader: CacheReader, image_id: str, image_root: str | Path | None
) -> tuple[CachedImage, np.ndarray, list[str]]:
    """A cached image's row and pixels (a grey canvas, with a warning, when the file is not found).

    Raises:
        SamcpError: the cache has no such image (with nearby ids as a hint).
    """
    try:
        row = reader.get(str(image_id))
    except SamcpError:
        raise SamcpError(
            f"image id {image_id!r} is not in cache {reader.path} ({_id_hint(reader)}); "
            "`samcp inspect` lists what is there"
        ) from None
    warnings: list[str] = []
    pixels, why = find_image(reader, row, image_root)
    if pixels is None:
        warnings.append(
            f"image {row.image_id} not found ({why}); drawing on a grey canvas "
            "(pass --image-root DIR to say where the images are)"
        )
        pixels = np.full((row.height, row.width, 3), CANVAS_GREY, np.uint8)
    return row, pixels, warnings


def render_grid(
    cache: str | Path,
    num: int = 9,
    image_ids: list[str] | None = None,
    image_root: str | Path | None = None,
    max_masks: int | None = 200,
    alpha: float = 0.5,
    outline: bool = True,
    tile: int = 256,
) -> VizResult:
    """Several cached images with their proposals, tiled with their ids written on them.

    Args:
        cache: the cache location.
        num: how many images (the first ``num`` ok images in cache order) when ``image_ids`` is None.
        image_ids: these images instead.
        tile: each picture is scaled to fit a ``tile`` x ``tile`` cell.
        image_root, max_masks, alpha, outline: as for :func:`render_cached_image`.
    """
    reader = CacheReader(cache)
    if image_ids is None:
        image_ids = []
        for row in reader.iter_images(prefetch=0):
            image_ids.append(row.image_id)
            if len(image_ids) >= num:
                break
    if not image_ids:
        raise SamcpError(f"cache {reader.path} has no successfully processed images to draw")
    pictures, warnings, drawn, total = [], [], 0, 0
    for iid in image_ids:
        r = render_cached_image(cache, iid, image_root, max_masks, alpha, outline, reader=reader)
        pictures.append(r.image)
        warnings += r.warnings
        drawn += r.num_masks
        total += r.total_masks
    return VizResult(
        tile_images(pictures, image_ids, tile), list(image_ids), drawn, total, warnings
    )


def tile_images(images: list[np.ndarray], captions: list[str], tile: int = 256) -> np.ndarray:
    """Tiles pictures in a near-square grid of ``tile`` px cells, each captioned top-left."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    pad = 4
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + pad) + pad), _BACKDROP)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (img, cap) in enumerate(zip(images, captions)):
        pil = Image.fromarray(img)
        scale = min(tile / pil.width, tile / pil.height)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(
            size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        )
        x = pad + (k % cols) * (tile + pad) + (tile - size[0]) // 2
        y = pad + (k // cols) * (tile + pad) + (tile - size[1]) // 2
        sheet.paste(pil, (x, y))
        box = draw.textbbox((x + 3, y + 3), cap, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((x + 3, y + 3), cap, fill=(255, 255, 255), font=font)
    return np.asarray(sheet)


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Writes an RGB PNG atomically (a temporary file renamed into place), creating its folder.

    Raises:
        SamcpError: the file or its folder cannot be written (a folder in the way, no permission).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        raise SamcpError(
            f"cannot write {path} ({exc.strerror or exc}); choose another path"
        ) from None
    finally:
        with contextlib.suppress(OSError):  # under a file, even unlink fails
            tmp.unlink(missing_ok=True)
    return path


def _id_hint(reader: CacheReader, n: int = 5) -> str:
    ids: list[str] = []
    for sid in reader.shard_ids:
        ids += [str(i) for i in reader.root["shards"][sid]["image_id"][...]]
        if len(ids) >= n:
            break
    if not ids:
        return "it has no complete shards"
    return f"{len(reader)} images, e.g. {', '.join(ids[:n])}"


def contrast_colors(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A colour per mask that stands out against the image under that mask.

    Each mask, in order, takes the colour of a fixed saturated palette (:func:`mask_colors`) that
    is farthest in CIELAB from the image's mean colour under the mask; a colour already given to
    another mask counts as ``_REUSE_PENALTY`` closer, so neighbours rarely share one. The result
    depends only on the image and the masks.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (M, H, W) bool.

    Returns:
        (M, 3) uint8 RGB.
    """
    from skimage.color import rgb2lab

    masks = np.asarray(masks, bool)
    palette = mask_colors(_CONTRAST_PALETTE)
    pal_lab = rgb2lab(palette[None].astype(np.float64) / 255.0)[0]
    img = np.asarray(image).astype(np.float64) / 255.0
    uses = np.zeros(len(palette))
    out = np.zeros((len(masks), 3), np.uint8)
    for i, m in enumerate(masks):
        mean = img[m].mean(0) if m.any() else np.full(3, 0.5)
        mean_lab = rgb2lab(mean[None, None])[0, 0]
        score = np.linalg.norm(pal_lab - mean_lab, axis=1) - _REUSE_PENALTY * uses
        k = int(np.argmax(score))  # ties: the first palette colour
        uses[k] += 1
        out[i] = palette[k]
    return out


@dataclass
class Segments:
    """The panoptic segments of one image, as masks with the names of their classes."""

    masks: np.ndarray  # (S, H, W) bool, void excluded
    labels: list[str]  # class name per segment


def _segments_from_png(
    png: Path, segments_info: list[dict], names: dict[int, str], where: str
) -> Segments:
    from samcp.pipeline.evaluation.formats import read_panoptic_png

    ids = read_panoptic_png(png)
    try:
        segs = [s for s in segments_info if int(s["id"]) != 0 and (ids == int(s["id"])).any()]
        labels = [names.get(int(s["category_id"]), str(s["category_id"])) for s in segs]
    except (KeyError, TypeError, ValueError):
        raise SamcpError(
            f"{where}: every segments_info entry needs an integer id and category_id"
        ) from None
    masks = (
        np.stack([ids == int(s["id"]) for s in segs]) if segs else np.zeros((0, *ids.shape), bool)
    )
    return Segments(masks, labels)


def prediction_segments(
    pred_dir: str | Path, image_id: str, names: dict[int, str] | None = None
) -> Segments:
    """The segments ``samcp predict`` (or ``samcp eval --oracle-out``) wrote for one image.

    Args:
        pred_dir: a prediction folder (panoptic.json and panoptic/).
        image_id: the image's id (compared as a string).
        names: class names by category id, used where panoptic.json lists no categories.

    Raises:
        SamcpError: the folder is not a prediction folder or has no prediction of the image.
    """
    from samcp.pipeline.evaluation.formats import load_predictions

    pred = load_predictions(Path(pred_dir))
    ann = pred.annotations.get(str(image_id))
    if ann is None:
        raise SamcpError(f"image {image_id} has no prediction in {pred_dir}")
    data = json.loads((pred.root / "panoptic.json").read_text(encoding="utf-8"))
    cats = data.get("categories") or []
    try:
        own = {int(c["id"]): str(c.get("name", c["id"])) for c in cats if "id" in c}
    except (AttributeError, TypeError, ValueError):
        raise SamcpError(
            f"{pred.root / 'panoptic.json'}: 'categories' must be a list of {{id, name}} objects"
        ) from None
    names = {**(names or {}), **own}
    segs = _segments_from_png(
        pred.png_dir / ann["file_name"], ann["segments_info"], names, str(pred.root)
    )
    return segs


def ground_truth_segments(
    gt: str | Path, image_id: str, split: str = "val2017", benchmark: str | None = None
) -> tuple[Segments, dict[int, str]]:
    """The ground-truth segments of one image and the dataset's class names by category id.

    Args:
        gt: a COCO panoptic dataset root (annotations/panoptic_<split>.json) or a panoptic JSON
            file whose PNGs are in the folder of the same name; with ``benchmark``, that
            benchmark's root.
        image_id: the image's id (compared as a string).
        split: the split, when ``gt`` is a dataset root.
        benchmark: read ``gt`` with this benchmark's reader (samcp.pipeline.benchmarks): its
            panoptic segments, or for a semantic benchmark one segment per class present.

    Raises:
        SamcpError: the ground truth cannot be read or does not annotate the image.
    """
    from samcp.pipeline.evaluation.formats import load_ground_truth, resolve_ground_truth

    if benchmark is not None and benchmark != "coco_panoptic":
        from samcp.pipeline.benchmarks import open_benchmark

        bench = open_benchmark(benchmark, gt, split)
        names = {int(c["id"]): str(c["name"]) for c in bench.categories}
        try:
            ids, segments_info = bench.load_panoptic(str(image_id))
        except KeyError:
            raise SamcpError(f"image {image_id} is not annotated in {benchmark} at {gt}") from None
        segs = [s for s in segments_info if (ids == int(s["id"])).any()]
        masks = (
            np.stack([ids == int(s["id"]) for s in segs])
            if segs
            else np.zeros((0, *ids.shape), bool)
        )
        labels = [names.get(int(s["category_id"]), str(s["category_id"])) for s in segs]
        return Segments(masks, labels), names
    json_path, png_dir = resolve_ground_truth(Path(gt), split)
    truth = load_ground_truth(json_path, png_dir)
    names = {c.id: c.name for c in truth.categories}
    ann = next((a for a in truth.annotations if str(a.get("image_id")) == str(image_id)), None)
    if ann is None:
        raise SamcpError(f"image {image_id} is not annotated in {json_path}")
    if "file_name" not in ann or "segments_info" not in ann:
        raise SamcpError(f"{json_path}: the annotation of image {image_id} lacks file_name")
    segs = _segments_from_png(
        png_dir / ann["file_name"], ann["segments_info"], names, str(json_path)
    )
    return segs, names


def render_segments(
    image: np.ndarray, segments: Segments, alpha: float = 0.5, outline: bool = True
) -> np.ndarray:
    """Panoptic segments over an image in contrasting colours, each labelled with its class.

    Args:
        image: (H, W, 3) uint8 RGB.
        segments: the segments, of the image's size.
        alpha: fill opacity.
        outline: draw segment boundaries.

    Raises:
        SamcpError: the segments are not of the image's size.
    """
    image = np.asarray(image)
    if segments.masks.shape[1:] != image.shape[:2]:
        raise SamcpError(
            f"image is {image.shape[1]}x{image.shape[0]} but its segments are "
            f"{segments.masks.shape[2]}x{segments.masks.shape[1]}"
        )
    colors = contrast_colors(image, segments.masks)
    return render_overlay(
        image, segments.masks, alpha=alpha, outline=outline, colors=colors, labels=segments.labels
    )


def side_by_side(panels: list[np.ndarray], captions: list[str]) -> np.ndarray:
    """Pictures of equal height in a row, ``PANEL_GAP`` px apart, captioned in a strip above.

    Panel ``k`` occupies rows ``CAPTION_HEIGHT:`` and columns from ``k * (W + PANEL_GAP)`` on
    (for panels of width W), unscaled.
    """
    if not panels or len(panels) != len(captions):
        raise ValueError("give one caption per panel, and at least one panel")
    h = panels[0].shape[0]
    if any(p.shape[0] != h for p in panels):
        raise ValueError("side-by-side panels must have the same height")
    width = sum(p.shape[1] for p in panels) + PANEL_GAP * (len(panels) - 1)
    sheet = Image.new("RGB", (width, h + CAPTION_HEIGHT), _BACKDROP)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x = 0
    for panel, caption in zip(panels, captions):
        sheet.paste(Image.fromarray(np.asarray(panel, np.uint8)), (x, CAPTION_HEIGHT))
        draw.text(
            (x + 3, CAPTION_HEIGHT // 2), caption, fill=(255, 255, 255), font=font, anchor="lm"
        )
        x += panel.shape[1] + PANEL_GAP
    return np.asarray(sheet)


def render_cached_segments(
    cache: str | Path,
    image_id: str,
    pred_dir: str | Path | None = None,
    gt: str | Path | None = None,
    image_root: str | Path | None = None,
    alpha: float = 0.5,
    outline: bool = True,
    split: str | None = None,
) -> VizResult:
    """A prediction, a ground truth, or both side by side, over the pixels of a cached image.

    With both, the picture is the ground truth on the left and the prediction on the right
    (:func:`side_by_side`). Segments get contrasting colours and their class names; a prediction
    folder without categories borrows the ground truth's names.

    Args:
        cache: the cache the image was precomputed into (it says where the pixels are).
        image_id: the image's id.
        pred_dir: a prediction folder.
        gt: a COCO panoptic dataset root or panoptic JSON file; for a cache made with
            ``precompute --dataset NAME``, that benchmark's root (read with its reader).
        image_root: where to find the image instead of the cache's ``dataset_source``.
        alpha: fill opacity.
        outline: draw segment boundaries.
        split: the split of a ``gt`` dataset root; default the split the cache was made from.

    Raises:
        SamcpError: neither ``pred_dir`` nor ``gt`` is given, the image is not in the cache or
            not in them, or they cannot be read.
    """
    if pred_dir is None and gt is None:
        raise SamcpError("give a prediction folder, a ground truth, or both")
    reader = CacheReader(cache)
    row, image, warnings = _cached_row_and_pixels(reader, image_id, image_root)
    panels, captions, drawn = [], [], 0
    names: dict[int, str] = {}
    if gt is not None:
        src = reader.attrs.get("dataset_source") or {}
        benchmark = src.get("benchmark") or None
        default_split = "val" if benchmark else "val2017"
        gt_segs, names = ground_truth_segments(
            gt, row.image_id, split or src.get("split") or default_split, benchmark
        )
        panels.append(render_segments(image, gt_segs, alpha, outline))
        captions.append(f"ground truth: {len(gt_segs.labels)} segments")
        drawn += len(gt_segs.labels)
    if pred_dir is not None:
        pred_segs = prediction_segments(pred_dir, row.image_id, names)
        panels.append(render_segments(image, pred_segs, alpha, outline))
        captions.append(f"prediction: {len(pred_segs.labels)} segments")
        drawn += len(pred_segs.labels)
    picture = panels[0] if len(panels) == 1 else side_by_side(panels, captions)
    return VizResult(picture, [row.image_id], drawn, drawn, warnings)


def render_cached_prediction(
    pred_dir: str | Path,
    cache: str | Path,
    image_id: str,
    image_root: str | Path | None = None,
    alpha: float = 0.5,
) -> VizResult:
    """The panoptic prediction of one cached image over its pixels (see
    :func:`render_cached_segments`)."""
    return render_cached_segments(
        cache, image_id, pred_dir=pred_dir, image_root=image_root, alpha=alpha
    )
