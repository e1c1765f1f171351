"""Test helper: a tiny ``samcp synth`` set converted into each benchmark's prepared layout.

The conversions write exactly what the upstream preparation scripts write (folder and file names,
8-bit PNG / 16-bit TIFF labels, the benchmark's ignore label, Cityscapes' label ids and segment-id
encoding), with the 11 synthetic classes mapped onto benchmark class ids (:data:`CLASS_IDS`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from samcp.pipeline.benchmarks import CITYSCAPES_LABEL_IDS, CITYSCAPES_NAMES, CITYSCAPES_THINGS
from samcp.pipeline.evaluation.formats import id_to_rgb, read_panoptic_png

# Synthetic class index (position in the synthetic set's categories, sorted by id: ball, box,
# triangle sign, starfish, donut, kite, pill, sky, grass, wall, water) -> benchmark class id.
CLASS_IDS: dict[str, list[int]] = {
    "ade20k_150": [3 + 10 * i for i in range(11)],
    # things -> person, rider, car, truck, bus, train, motorcycle; stuff -> road, sidewalk,
    # building, sky (train ids)
    "cityscapes": [11, 12, 13, 14, 15, 16, 17, 0, 1, 2, 10],
    "ade20k_847": [300 + 50 * i for i in range(11)],
    "pascal_context_59": [5 * i for i in range(11)],
    "pascal_context_459": [250 + 20 * i for i in range(11)],
    "pascal_voc_20": list(range(11)),
    "coco_stuff_171": [15 * i for i in range(11)],
}


def _synth(synth: Path) -> tuple[dict, list[dict]]:
    doc = json.loads((synth / "annotations" / "panoptic_val2017.json").read_text())
    return doc, doc["categories"]


def _semantic(synth: Path, ann: dict, ids: list[int], ignore: int, dtype) -> np.ndarray:
    """The synthetic semantic PNG (contiguous index, 255 void) mapped to benchmark ids."""
    sem = np.asarray(Image.open(synth / "semantic_val2017" / ann["file_name"]))
    lut = np.full(256, ignore, np.int64)
    lut[: len(ids)] = ids
    return lut[sem].astype(dtype)


def vocabulary_file(path: Path, synth: Path, name: str) -> Path:
    """An FC-CLIP class file of the synthetic classes' names under the benchmark's class ids."""
    lines = (synth / "classes.txt").read_text().strip().splitlines()
    out = [f"{bid}:{line.split(':', 1)[1]}" for bid, line in zip(CLASS_IDS[name], lines, strict=True)]
    path.write_text("\n".join(out) + "\n")
    return path


def write_semantic_layout(name: str, synth: Path, root: Path) -> Path:
    """Writes the synthetic val split in the FC-CLIP/ODISE (SAN for COCO-Stuff) layout of a
    semantic benchmark under ``root`` (a datasets root); returns ``root``."""
    ids = CLASS_IDS[name]
    sixteen = name in ("ade20k_847", "pascal_context_459")
    ignore, dtype, ext = (65535, np.uint16, ".tif") if sixteen else (255, np.uint8, ".png")
    images, labels, prefix = {
        "ade20k_847": ("ADE20K_2021_17_01/images_detectron2/validation",
                       "ADE20K_2021_17_01/annotations_detectron2/validation", "ADE_val_"),
        "pascal_context_59": ("pascal_ctx_d2/images/validation",
                              "pascal_ctx_d2/annotations_ctx59/validation", "2008_"),
        "pascal_context_459": ("pascal_ctx_d2/images/validation",
                               "pascal_ctx_d2/annotations_ctx459/validation", "2008_"),
        "pascal_voc_20": ("pascal_voc_d2/images/validation",
                          "pascal_voc_d2/annotations_pascal20/validation", "2007_"),
        "coco_stuff_171": ("coco/val2017", "coco/stuffthingmaps_detectron2/val2017", ""),
    }[name]
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / labels).mkdir(parents=True, exist_ok=True)
    doc, _ = _synth(synth)
    for i, ann in enumerate(doc["annotations"]):
        stem = Path(ann["file_name"]).stem if not prefix else f"{prefix}{i + 1:08d}"
        shutil.copy(synth / "val2017" / f"{Path(ann['file_name']).stem}.jpg",
                    root / images / f"{stem}.jpg")
        label = _semantic(synth, ann, ids, ignore, dtype)
        Image.fromarray(label).save(root / labels / f"{stem}{ext}")
    return root


def write_ade20k_150(synth: Path, root: Path, semantic: bool = True) -> Path:
    """Mask2Former's ADE20K layout: images/validation, ade20k_panoptic_val.json + PNGs (category
    ids 0..149, string image ids), annotations_detectron2/validation (uint8, 255 ignore)."""
    ids = CLASS_IDS["ade20k_150"]
    base = root / "ADEChallengeData2016"
    img_dir, pan_dir = base / "images" / "validation", base / "ade20k_panoptic_val"
    sem_dir = base / "annotations_detectron2" / "validation"
    for d in (img_dir, pan_dir) + ((sem_dir,) if semantic else ()):
        d.mkdir(parents=True, exist_ok=True)
    doc, cats = _synth(synth)
    index = {c["id"]: i for i, c in enumerate(cats)}
    thing = {ids[index[c["id"]]] for c in cats if c["isthing"]}
    categories = [{"id": i, "name": f"ade class {i}", "isthing": int(i in thing)}
                  for i in range(150)]
    images, anns = [], []
    for i, (im, ann) in enumerate(zip(doc["images"], doc["annotations"], strict=True)):
        stem = f"ADE_val_{i + 1:08d}"
        shutil.copy(synth / "val2017" / im["file_name"], img_dir / f"{stem}.jpg")
        shutil.copy(synth / "annotations" / "panoptic_val2017" / ann["file_name"],
                    pan_dir / f"{stem}.png")
        if semantic:
            Image.fromarray(_semantic(synth, ann, ids, 255, np.uint8)).save(sem_dir / f"{stem}.png")
        images.append({"id": stem, "file_name": f"{stem}.jpg", "width": im["width"],
                       "height": im["height"]})
        segs = [{**s, "category_id": ids[index[s["category_id"]]]} for s in ann["segments_info"]]
        anns.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segs})
    (base / "ade20k_panoptic_val.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    return root


def write_cityscapes(synth: Path, root: Path, label_train_ids: bool = True) -> Path:
    """cityscapesscripts' panoptic layout: leftImg8bit/val/<city>/*_leftImg8bit.png and
    gtFine/cityscapes_panoptic_val.json + PNGs with Cityscapes label ids (stuff and crowd segment
    id = label id, things label id * 1000 + k); optional gtFine/val/<city>/*_labelTrainIds.png."""
    train_ids = CLASS_IDS["cityscapes"]
    base = root / "cityscapes"
    img_dir = base / "leftImg8bit" / "val" / "frankfurt"
    pan_dir = base / "gtFine" / "cityscapes_panoptic_val"
    lab_dir = base / "gtFine" / "val" / "frankfurt"
    for d in (img_dir, pan_dir, lab_dir):
        d.mkdir(parents=True, exist_ok=True)
    doc, cats = _synth(synth)
    index = {c["id"]: i for i, c in enumerate(cats)}
    categories = [
        {"id": lid, "name": CITYSCAPES_NAMES[t], "isthing": int(t in CITYSCAPES_THINGS),
         "color": [0, 0, 0], "supercategory": "x"}
        for t, lid in enumerate(CITYSCAPES_LABEL_IDS)
    ]
    images, anns = [], []
    for i, (im, ann) in enumerate(zip(doc["images"], doc["annotations"], strict=True)):
        image_id = f"frankfurt_000000_{i:06d}"
        Image.open(synth / "val2017" / im["file_name"]).save(img_dir / f"{image_id}_leftImg8bit.png")
        old = read_panoptic_png(synth / "annotations" / "panoptic_val2017" / ann["file_name"])
        new = np.zeros(old.shape, np.int64)
        k = 0
        for s in ann["segments_info"]:
            t = train_ids[index[s["category_id"]]]
            lid = CITYSCAPES_LABEL_IDS[t]
            if t in CITYSCAPES_THINGS and not s.get("iscrowd"):
                k += 1
                new[old == s["id"]] = lid * 1000 + k
            else:
                new[old == s["id"]] = lid
        segs = []
        for sid in np.unique(new).tolist():
            if sid == 0:
                continue
            lid = sid if sid < 1000 else sid // 1000
            t = CITYSCAPES_LABEL_IDS.index(lid)
            ys, xs = np.nonzero(new == sid)
            segs.append({
                "id": sid, "category_id": lid, "area": len(ys),
                "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                "iscrowd": int(sid < 1000 and t in CITYSCAPES_THINGS),
            })
        Image.fromarray(id_to_rgb(new)).save(pan_dir / f"{image_id}_gtFine_panoptic.png")
        if label_train_ids:
            Image.fromarray(_semantic(synth, ann, train_ids, 255, np.uint8)).save(
                lab_dir / f"{image_id}_gtFine_labelTrainIds.png"
            )
        images.append({"id": image_id, "file_name": f"{image_id}_leftImg8bit.png",
                       "width": im["width"], "height": im["height"]})
        anns.append({"image_id": image_id, "file_name": f"{image_id}_gtFine_panoptic.png",
                     "segments_info": segs})
    (base / "gtFine" / "cityscapes_panoptic_val.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    return root


def write_layout(name: str, synth: Path, root: Path) -> Path:
    """Any benchmark's layout under ``root`` (coco_panoptic: a copy of the synthetic set as
    ``root/coco``)."""
    if name == "ade20k_150":
        return write_ade20k_150(synth, root)
    if name == "cityscapes":
        return write_cityscapes(synth, root)
    if name == "coco_panoptic":
        shutil.copytree(synth, root / "coco")
        return root
    return write_semantic_layout(name, synth, root)
