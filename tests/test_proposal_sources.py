"""slic and external proposal sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from skimage.segmentation import slic

from samcp.pipeline.datasets import ImageRecord
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.proposals.external import ExternalGenerator
from samcp.pipeline.proposals.slic import SlicGenerator, SlicParams


def _image(h=60, w=80):
    img = np.full((h, w, 3), 40, np.uint8)
    img[:, w // 2 :] = [200, 200, 30]
    img[h // 3 : 2 * h // 3, w // 5 : w // 3] = [20, 20, 220]
    return img


def test_slic_masks_partition_the_image_per_run():
    out = SlicGenerator(SlicParams(n_segments=(8, 20))).generate(_image())
    masks = out.decode()
    assert masks.shape[1:] == (60, 80)
    labels = slic(
        _image(), n_segments=8, compactness=10.0, sigma=1.0, start_label=0, channel_axis=-1
    )
    n8 = len(np.unique(labels))
    # Each run's superpixels cover every pixel exactly once.
    np.testing.assert_array_equal(masks[:n8].sum(0), 1)
    np.testing.assert_array_equal(masks[n8:].sum(0), 1)
    np.testing.assert_array_equal(out.area, masks.sum((1, 2)))
    assert np.all(out.predicted_iou == 1.0)


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def test_external_amg_folder_and_coco_results(tmp_path):
    h, w = 30, 40
    m1 = np.zeros((h, w), bool)
    m1[5:20, 3:30] = True
    m2 = np.zeros((h, w), bool)
    m2[:, :10] = True
    folder = tmp_path / "amg"
    folder.mkdir()
    # amg.py style list, and an SA-1B style object.
    (folder / "img1.json").write_text(
        json.dumps(
            [
                {
                    "segmentation": _rle(m1),
                    "predicted_iou": 0.9,
                    "stability_score": 0.95,
                    "point_coords": [[10.0, 12.0]],
                    "bbox": [3, 5, 26, 14],
                    "area": int(m1.sum()),
                },
            ]
        )
    )
    (folder / "img2.json").write_text(
        json.dumps(
            {
                "image": {},
                "annotations": [
                    {
                        "segmentation": _rle(m2),
                        "predicted_iou": 0.5,
                        "stability_score": 0.6,
                        "point_coords": [[1.0, 2.0]],
                    }
                ],
            }
        )
    )
    gen = ExternalGenerator(folder)
    p1 = gen.generate_for("1", "/x/img1.jpg", h, w)
    np.testing.assert_array_equal(p1.decode()[0], m1)
    assert p1.predicted_iou[0] == pytest.approx(0.9) and p1.stability_score[0] == pytest.approx(
        0.95
    )
    np.testing.assert_allclose(p1.point_coords[0], [10, 12])
    assert gen.generate_for("2", "/x/img2.png", h, w).area[0] == m2.sum()
    with pytest.raises(FileNotFoundError):
        gen.generate_for("3", "/x/img3.png", h, w)
    with pytest.raises(ValueError, match="differs from the image size"):
        gen.generate_for("1", "/x/img1.jpg", h + 1, w)

    results = tmp_path / "res.json"
    results.write_text(
        json.dumps(
            [
                {"image_id": 7, "category_id": 1, "segmentation": _rle(m1), "score": 0.3},
                {"image_id": 7, "category_id": 2, "segmentation": _rle(m2), "score": 0.8},
            ]
        )
    )
    p = ExternalGenerator(results).generate_for("7", "a.jpg", h, w)
    assert len(p) == 2 and list(p.predicted_iou) == pytest.approx([0.3, 0.8])
    assert len(ExternalGenerator(results).generate_for("8", "b.jpg", h, w)) == 0


def test_external_errors(tmp_path):
    with pytest.raises(SamcpError, match="not found"):
        ExternalGenerator(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SamcpError, match="cannot read"):
        ExternalGenerator(bad)
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    with pytest.raises(SamcpError, match="not a COCO results list"):
        ExternalGenerator(obj)


def test_external_through_precompute(tmp_path):
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.datasets import write_manifest
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig

    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    results = tmp_path / "res.json"
    results.write_text(json.dumps([{"image_id": "a", "segmentation": _rle(m), "score": 1.0}]))
    write_manifest(
        [
            ImageRecord("a", str(tmp_path / "a.jpg"), 10, 12),
            ImageRecord("b", str(tmp_path / "b.jpg"), 10, 12),
        ],
        tmp_path / "m.jsonl",
    )
    props = ProposalConfig(source="external", external_path=str(results))
    run_precompute(
        PrecomputeConfig(
            source=str(tmp_path / "m.jsonl"),
            out=str(tmp_path / "c"),
            proposals=props,
            num_workers=0,
            progress=False,
        )
    )
    rows = {r.image_id: r for r in CacheReader(tmp_path / "c").iter_images(include_failed=True)}
    np.testing.assert_array_equal(rows["a"].proposals.decode()[0], m)
    assert rows["b"].status == 0 and len(rows["b"].proposals) == 0
