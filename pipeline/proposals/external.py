"""Proposals made elsewhere: SA-1B-style per-image JSON (segment-anything's amg.py) or COCO results.

Two layouts are accepted:

* a folder of per-image JSON files named after the image file's stem, each either a list of
  annotation records (what ``scripts/amg.py --convert-to-rle`` writes) or an SA-1B object
  ``{"image": {...}, "annotations": [...]}``; records carry ``segmentation`` as COCO RLE and
  optionally ``predicted_iou``, ``stability_score`` and ``point_coords``;
* one COCO results JSON file: a list of ``{"image_id", "segmentation", "score", ...}``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.proposals.base import Proposals


class ExternalGenerator:
    """Reads proposals for an image from files instead of computing them."""

    name = "external"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SamcpError(
                f"external proposals not found: {self.path}; pass a folder or JSON file"
            )
        self._by_image: dict[str, list[dict]] | None = None
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise SamcpError(f"cannot read {self.path} as JSON ({exc})") from None
            if not isinstance(data, list):
                raise SamcpError(
                    f"{self.path} is not a COCO results list; give a list of "
                    "{image_id, segmentation, score} records or a folder of per-image files"
                )
            self._by_image = defaultdict(list)
            for rec in data:
                self._by_image[str(rec["image_id"])].append(rec)

    def cache_params(self) -> dict:
        return {"path": str(self.path)}

    def records_for(self, image_id: str, file_name: str) -> list[dict]:
        if self._by_image is not None:
            return self._by_image.get(str(image_id), [])
        f = self.path / (Path(file_name).stem + ".json")
        if not f.exists():
            raise FileNotFoundError(f"no external proposals file {f}")
        data = json.loads(f.read_text())
        return data["annotations"] if isinstance(data, dict) else data

    def generate_for(self, image_id: str, file_name: str, height: int, width: int) -> Proposals:
        recs = self.records_for(image_id, file_name)
        rles, ious, stabs, pts = [], [], [], []
        for r in recs:
            seg = r["segmentation"]
            if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                seg = mask_utils.frPyObjects(seg, *seg["size"])
            elif isinstance(seg, list):  # polygons
                seg = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
            if list(seg["size"]) != [height, width]:
                raise ValueError(
                    f"external mask size {seg['size']} differs from the image size {[height, width]}"
                )
            counts = seg["counts"]
            rles.append(counts.encode() if isinstance(counts, str) else counts)
            ious.append(r.get("predicted_iou", r.get("score", 1.0)))
            stabs.append(r.get("stability_score", 1.0))
            pc = r.get("point_coords")
            pts.append(pc[0] if pc else None)
        point_coords = None
        if rles and all(p is not None for p in pts):
            point_coords = np.asarray(pts, np.float32)
        return Proposals.from_rles(
            height, width, rles, np.asarray(ious), np.asarray(stabs), point_coords
        )
