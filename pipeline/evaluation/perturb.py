"""Prediction folders made from a ground truth, exact or randomly perturbed.

They serve the randomized evaluation tests and the evaluation benchmark: an exact copy must score
PQ 100, and perturbed copies exercise every matching rule with numbers that must obey invariants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from samcp.pipeline.evaluation.formats import (
    IGNORE_LABEL,
    load_ground_truth,
    png_stem,
    read_panoptic_png,
    write_json_atomic,
    write_panoptic_png,
)
from samcp.pipeline.evaluation.instance import encode_mask


def write_perturbed_predictions(
    gt_json: Path,
    gt_png_dir: Path | None,
    out_dir: Path,
    *,
    seed: int = 0,
    p_drop: float = 0.0,
    p_relabel: float = 0.0,
    p_shift: float = 0.0,
    max_shift: int = 6,
    semantic: bool = False,
    instances: bool = True,
) -> Path:
    """Writes a prediction folder derived from the ground truth.

    Each ground-truth segment is, independently: dropped (its pixels become void) with
    probability ``p_drop``, given a random other category with ``p_relabel``, and translated by up
    to ``max_shift`` pixels with ``p_shift`` (painted over its neighbours). With all probabilities 0
    the prediction equals the ground truth. Crowd segments are copied like any other segment.

    Args:
        gt_json: Ground-truth COCO panoptic JSON.
        gt_png_dir: Its PNG folder (default: the JSON's path without ``.json``).
        out_dir: Prediction folder to create.
        seed: Random seed; the same seed gives the same folder.
        p_drop: Probability of dropping a segment.
        p_relabel: Probability of changing a segment's category.
        p_shift: Probability of translating a segment.
        max_shift: Largest translation in pixels along each axis.
        semantic: Also write semantic/ PNGs derived from the predicted panoptic map.
        instances: Write instances.json (non-crowd thing segments, random scores).

    Returns:
        ``out_dir``.
    """
    gt = load_ground_truth(Path(gt_json), gt_png_dir)
    cats = gt.category_by_id
    cat_ids = [c.id for c in gt.categories]
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    (out_dir / "panoptic").mkdir(parents=True, exist_ok=True)
    if semantic:
        (out_dir / "semantic").mkdir(exist_ok=True)
    annotations = []
    results = []
    for ann in gt.annotations:
        ids = read_panoptic_png(gt.png_dir / ann["file_name"])
        pred = np.zeros_like(ids)
        category = {}
        for s in ann["segments_info"]:
            sid = int(s["id"])
            mask = ids == sid
            cat = int(s["category_id"])
            if rng.random() < p_drop:
                continue
            if rng.random() < p_relabel and len(cat_ids) > 1:
                cat = int(rng.choice([c for c in cat_ids if c != cat]))
            if rng.random() < p_shift:
                dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
                mask = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
            pred[mask] = sid
            category[sid] = cat
        present = set(np.unique(pred).tolist()) - {0}
        segments = [{"id": sid, "category_id": category[sid]} for sid in sorted(present)]
        write_panoptic_png(out_dir / "panoptic" / ann["file_name"], pred)
        annotations.append(
            {"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segments}
        )
        if semantic:
            sem = np.full(ids.shape, IGNORE_LABEL, dtype=np.uint8)
            for s in segments:
                sem[pred == s["id"]] = cats[s["category_id"]].index
            Image.fromarray(sem).save(out_dir / "semantic" / f"{png_stem(ann['file_name'])}.png")
        if instances:
            crowd = {int(s["id"]) for s in ann["segments_info"] if int(s.get("iscrowd", 0)) == 1}
            for s in segments:
                if s["id"] in crowd or not cats[s["category_id"]].isthing:
                    continue
                results.append(
                    {
                        "image_id": ann["image_id"],
                        "category_id": s["category_id"],
                        "segmentation": encode_mask(pred == s["id"]),
                        "score": float(rng.uniform(0.05, 1.0)),
                    }
                )
    write_json_atomic(out_dir / "panoptic.json", {"annotations": annotations})
    if instances:
        write_json_atomic(out_dir / "instances.json", results)
    return out_dir
