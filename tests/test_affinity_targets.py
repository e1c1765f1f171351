"""GT affinity of SAM-CP (section 3.2.3): IoP, the ignore band, low-quality matching, Type-I rows."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from samcp.models.affinity import AffinityConfig, build_image_targets, gt_affinity, patch_mask_crops
from samcp.models.affinity.targets import box_iop, box_iou, mask_iop


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_box_iop_is_intersection_over_patch_box():
    patches = np.array([[0, 0, 10, 10], [2, 2, 2, 2], [20, 20, 5, 5], [0, 0, 0, 0]], dtype=float)
    gts = np.array([[0, 0, 5, 10]], dtype=float)
    iop = box_iop(patches, gts)
    assert iop.shape == (1, 4)
    np.testing.assert_allclose(iop[0], [0.5, 1.0, 0.0, 0.0])
    # IoP is not symmetric: the GT box is fully inside patch 0, but only half of patch 0 is GT.
    np.testing.assert_allclose(box_iou(patches, gts)[0, 0], 0.5)


def test_mask_iop_is_intersection_over_patch_mask():
    gt = rect(10, 10, 0, 10, 0, 5)  # left half, 50 px
    p_inside = rect(10, 10, 0, 4, 0, 4)  # 16 px inside
    p_half = rect(10, 10, 0, 2, 3, 7)  # 8 px, 4 inside
    p_out = rect(10, 10, 5, 10, 6, 10)
    iop = mask_iop([rle(p_inside), rle(p_half), rle(p_out)], [rle(gt)])
    np.testing.assert_allclose(iop[0], [1.0, 0.5, 0.0])
    assert mask_iop([], [rle(gt)]).shape == (1, 0)
    assert mask_iop([rle(gt)], []).shape == (0, 1)


def test_gt_affinity_threshold_and_ignore_band():
    # patches:         0     1     2     3     4     5
    iop_box = np.array([[0.95, 0.80, 0.79, 0.50, 0.49, 0.95]])
    iop_mask = np.array([[0.90, 0.99, 0.99, 0.99, 0.99, 0.60]])  # patch 5: min is 0.6 -> band
    pos, ign = gt_affinity(iop_box, iop_mask, None, tau=0.8, ignore_low=0.5)
    assert pos[0].tolist() == [True, True, False, False, False, False]
    assert ign[0].tolist() == [False, False, True, True, False, True]
    assert not (pos & ign).any()
    pos2, ign2 = gt_affinity(iop_box, iop_mask, None, tau=0.8, ignore_low=None)
    assert (pos2 == pos).all() and not ign2.any()


def test_low_quality_matching():
    # GT 0: no IoP-positive patch; patches 1 and 2 have box IoU > 0.5 -> both become positive
    #       (patch 2 leaves the ignore band).
    # GT 1: patch 0 is positive with IoU 0.2 (a small part); patch 3 (IoU 0.7) matches it better.
    # GT 2: nothing above 0.5 IoU -> stays empty.
    iop = np.array(
        [
            [0.1, 0.3, 0.6, 0.2],
            [0.9, 0.1, 0.1, 0.7],
            [0.1, 0.6, 0.1, 0.1],
        ]
    )
    iou = np.array(
        [
            [0.3, 0.6, 0.55, 0.4],
            [0.2, 0.1, 0.15, 0.7],
            [0.1, 0.5, 0.2, 0.3],
        ]
    )
    pos, ign = gt_affinity(iop, iop, iou, tau=0.8, ignore_low=0.5, low_quality_iou=0.5)
    assert pos.tolist() == [
        [False, True, True, False],
        [True, False, False, True],
        [False, False, False, False],
    ]
    assert ign.tolist() == [
        [False, False, False, False],
        [False, False, False, False],
        [False, True, False, False],
    ]
    pos_off, _ = gt_affinity(iop, iop, iou, tau=0.8, ignore_low=0.5, low_quality_iou=None)
    assert pos_off.tolist() == [[False] * 4, [True, False, False, False], [False] * 4]


@pytest.fixture()
def scene():
    """20x20 image: thing A (class 0) top-left 10x10, crowd of class 1 bottom-right, stuff class 2."""
    h = w = 20
    a = rect(h, w, 0, 10, 0, 10)
    crowd = rect(h, w, 15, 20, 15, 20)
    stuff = 1 - a - crowd
    patches = [
        rect(h, w, 0, 10, 0, 5),  # 0: left half of A -> positive
        rect(h, w, 0, 10, 0, 12),  # 1: A plus a sliver: IoP 100/120 = 0.83 -> positive
        rect(h, w, 0, 10, 5, 15),  # 2: half A, half stuff -> ignore band for A
        rect(h, w, 12, 15, 0, 20),  # 3: pure stuff
    ]
    prles = [rle(m) for m in patches]
    pboxes = np.asarray(mask_utils.toBbox(prles))
    grles = [rle(a), rle(crowd), rle(stuff)]
    return dict(
        patch_rles=prles,
        patch_boxes_xywh=pboxes,
        gt_rles=grles,
        gt_labels=[0, 1, 2],
        gt_iscrowd=[False, True, False],
        thing_classes=[True, True, False],
        image_size=(h, w),
    )


def test_build_image_targets_instance_rows(scene):
    cfg = AffinityConfig.tiny()
    t = build_image_targets(**scene, config=cfg)
    # Only A is a Type-II GT: the crowd segment and the stuff segment are not.
    assert t.inst_labels.tolist() == [0]
    assert t.inst_pos.tolist() == [[True, True, False, False]]
    assert t.inst_ignore.tolist() == [[False, False, True, False]]
    assert t.inst_usable.tolist() == [True]
    torch.testing.assert_close(t.inst_boxes, torch.tensor([[0.0, 0.0, 0.5, 0.5]]))


def test_build_image_targets_semantic_rows(scene):
    t = build_image_targets(**scene, config=AffinityConfig.tiny())
    assert t.sem_present.tolist() == [True, True, True]
    assert t.sem_pos[0].tolist() == [True, True, False, False]
    assert t.sem_pos[1].tolist() == [False, False, False, False]  # the crowd counts for its class
    assert t.sem_pos[2].tolist() == [False, False, False, True]
    assert not t.sem_ignore.any()  # no ignore band for Type-I rows by default
    t2 = build_image_targets(**scene, config=AffinityConfig.tiny(semantic_ignore_band=True))
    assert t2.sem_ignore[0].tolist() == [False, False, True, False]


def test_unusable_gt_and_empty_inputs(scene):
    cfg = AffinityConfig.tiny()
    # A GT that no patch covers: no positive -> unusable.
    scene = dict(scene)
    scene["patch_rles"] = scene["patch_rles"][3:]
    scene["patch_boxes_xywh"] = scene["patch_boxes_xywh"][3:]
    t = build_image_targets(**scene, config=cfg)
    assert t.inst_pos.shape == (1, 1) and not t.inst_pos.any()
    assert t.inst_usable.tolist() == [False]
    # No GT at all.
    t0 = build_image_targets(
        scene["patch_rles"],
        scene["patch_boxes_xywh"],
        [],
        [],
        [],
        [True, True, False],
        (20, 20),
        cfg,
    )
    assert t0.inst_pos.shape == (0, 1) and t0.inst_boxes.shape == (0, 4)
    assert not t0.sem_present.any() and t0.sem_pos.shape == (3, 1)
    with pytest.raises(ValueError, match="gt_labels"):
        build_image_targets(
            scene["patch_rles"],
            scene["patch_boxes_xywh"],
            scene["gt_rles"],
            [0, 1, 5],
            [False] * 3,
            [True, True, False],
            (20, 20),
            cfg,
        )


def test_patch_mask_crops_follow_the_box():
    full = rect(16, 16, 4, 12, 2, 10)  # fills its own box
    left = rect(16, 16, 0, 8, 0, 8)
    left[:, 4:8] = 0
    left[0, 7] = 1  # make the box 8 wide: columns 0..7, mask only in columns 0..3 (+ one pixel)
    rles = [rle(full), rle(left)]
    boxes = np.asarray(mask_utils.toBbox(rles))
    crops = patch_mask_crops(rles, boxes, size=4)
    assert crops.shape == (2, 4, 4)
    torch.testing.assert_close(crops[0], torch.ones(4, 4))
    assert crops[1][:, :2].min() > 0.99 and crops[1][1:, 2:].max() < 0.01
