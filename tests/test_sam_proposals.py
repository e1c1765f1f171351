"""SAM everything mode: equal to segment_anything's SamAutomaticMaskGenerator, mask for mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.foundation import load_sam, make_random_sam_checkpoint
from samcp.pipeline.proposals.sam import (
    SamEverythingGenerator,
    SamEverythingParams,
    masks_to_boxes_xyxy,
)


@pytest.fixture(scope="module")
def sam_model(tmp_path_factory):
    ckpt = make_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_test.pth", "vit_test")
    return load_sam("vit_test", ckpt)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for h, w in [(120, 160), (150, 100), (96, 96)]:
        img = (rng.random((h, w, 3)) * 60 + 80).astype(np.uint8)
        img[h // 5 : h // 2, w // 4 : 3 * w // 4] = [220, 40, 40]
        yy, xx = np.mgrid[:h, :w]
        img[(yy - 0.7 * h) ** 2 + (xx - 0.3 * w) ** 2 < (0.15 * min(h, w)) ** 2] = [30, 60, 230]
        out.append(img)
    return out


def _compare(model, image, params: SamEverythingParams) -> int:
    ours = SamEverythingGenerator(model, params).generate(image)
    ref = SamAutomaticMaskGenerator(
        model,
        points_per_side=params.points_per_side,
        pred_iou_thresh=params.pred_iou_thresh,
        stability_score_thresh=params.stability_score_thresh,
        stability_score_offset=params.stability_score_offset,
        box_nms_thresh=params.box_nms_thresh,
        crop_n_layers=0,
        min_mask_region_area=0,
        output_mode="binary_mask",
    ).generate(image)
    assert len(ours) == len(ref)
    masks = ours.decode()
    swapped = 0
    for k, r in enumerate(ref):
        a = r["segmentation"]
        i = k
        if _iou(a, masks[k]) < 0.99:
            # Masks whose scores tie within float rounding may come out of NMS in either order;
            # anything else must sit at the same position.
            ties = np.flatnonzero(np.abs(ours.predicted_iou - r["predicted_iou"]) <= 1e-5)
            match = [j for j in ties if _iou(a, masks[j]) >= 0.99]
            assert match, (k, _iou(a, masks[k]))
            i = match[0]
            swapped += 1
        assert abs(r["predicted_iou"] - ours.predicted_iou[i]) <= 1e-3
        assert abs(r["stability_score"] - ours.stability_score[i]) <= 1e-3
        # SAM reports w = x1 - x0 of inclusive pixel extents; we store COCO's toBbox (one more).
        assert np.abs(np.asarray(r["bbox"], np.float32) - ours.bbox[i]).max() <= 1.0
        assert abs(r["area"] - ours.area[i]) <= 0.01 * r["area"] + 1
        np.testing.assert_allclose(r["point_coords"][0], ours.point_coords[i], atol=1e-3)
    assert swapped <= len(ref) // 20
    return len(ref)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def test_equals_reference_without_filters(sam_model):
    """Thresholds at 0 and no NMS: every one of 16*16*3 masks per image is compared."""
    params = SamEverythingParams(
        points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    counts = [_compare(sam_model, img, params) for img in _images()]
    assert counts == [768, 768, 768]


def test_equals_reference_with_filters_and_nms(sam_model):
    """Score filters and box NMS on: fewer masks, same ones, same order."""
    params = SamEverythingParams(
        points_per_side=12,
        points_per_batch=50,
        pred_iou_thresh=0.05,
        stability_score_thresh=0.6,
        box_nms_thresh=0.7,
        upsample_chunk=7,
    )
    counts = [_compare(sam_model, img, params) for img in _images()]
    assert all(c >= 1 for c in counts)
    # NMS kept fewer masks than the filters let through.
    loose = SamEverythingParams(12, 50, 0.05, 0.6, 1.0, 1.0)
    assert sum(counts) < sum(
        len(SamEverythingGenerator(sam_model, loose).generate(i)) for i in _images()
    )


def test_order_is_by_predicted_iou(sam_model):
    params = SamEverythingParams(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    out = SamEverythingGenerator(sam_model, params).generate(_images()[0])
    assert np.all(np.diff(out.predicted_iou) <= 0)


def test_rles_decode_to_pycocotools_masks(sam_model):
    params = SamEverythingParams(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    out = SamEverythingGenerator(sam_model, params).generate(_images()[1])
    masks = out.decode()
    assert masks.shape == (len(out), 150, 100)
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle["counts"] == out.rles[i]
        assert m.sum() == out.area[i]


def test_boxes_match_sam_rule():
    from segment_anything.utils.amg import batched_mask_to_box

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 31, 17, generator=g) > 0.97
    masks[3] = False  # empty mask -> [0, 0, 0, 0]
    masks[4] = False
    masks[4, 30, 16] = True
    assert torch.equal(masks_to_boxes_xyxy(masks), batched_mask_to_box(masks))


def test_wrong_checkpoint_is_a_clear_error(tmp_path, sam_model):
    with pytest.raises(SamcpError, match="not found"):
        load_sam("vit_test", tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SamcpError, match="cannot read SAM checkpoint"):
        load_sam("vit_test", junk)
    other = make_random_sam_checkpoint(tmp_path / "t.pth", "vit_test")
    with pytest.raises(SamcpError, match="does not fit --sam-model vit_b"):
        load_sam("vit_b", other)


@pytest.mark.slow
def test_real_registry_path_vit_b(tmp_path):
    """A real-size vit_b checkpoint loads through segment_anything's sam_model_registry."""
    ckpt = make_random_sam_checkpoint(tmp_path / "sam_vit_b.pth", "vit_b")
    model = load_sam("vit_b", ckpt)
    assert model.image_encoder.patch_embed.proj.out_channels == 768
    sd = torch.load(ckpt)
    assert torch.equal(model.mask_decoder.iou_token.weight, sd["mask_decoder.iou_token.weight"])
