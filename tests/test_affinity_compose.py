"""SAM-CP's composition at inference (issue 11, item 1): the authors' joint per-pixel argmax of
score x mask over stuff regions and instances through the shared ``compose_masks``, and the
earlier ``compose_regions`` kept as ``composition: regions``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samcp.models.affinity import AffinityConfig, ImagePrediction, predict_image
from samcp.models.affinity.plugin import AffinityPlugin, compose_prediction
from samcp.models.compose import NO_CLASS, compose_masks, compose_regions, union_rle
from samcp.models.heads import CompositionParams, ImageResult, InferContext

H, W = 10, 10
ISTHING = np.array([True, False, False])  # class 0 a thing, classes 1 and 2 stuff
JOINT = AffinityPlugin().default_params(AffinityConfig.tiny())


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


#: Ten patches, patch j = column j of the image (10 pixels each).
PATCHES = []
for _j in range(W):
    _m = np.zeros((H, W), bool)
    _m[:, _j] = True
    PATCHES.append(_rle(_m))


def _cols(*cols: int) -> np.ndarray:
    """(P,) bool membership of the listed column patches."""
    m = np.zeros(W, bool)
    m[list(cols)] = True
    return m


def _prediction(
    regions: dict[int, tuple[np.ndarray, float]],
    instances: list[tuple[int, np.ndarray, int, float]],
    k: int = len(ISTHING),
) -> ImagePrediction:
    """An ImagePrediction by hand: regions {class: (members, score)} (other classes empty with
    score 0.01) and instances [(query, members, label, score)] in rank order."""
    sem_members = np.zeros((k, W), bool)
    sem_scores = np.full(k, 0.01, np.float32)
    for c, (members, score) in regions.items():
        sem_members[c], sem_scores[c] = members, score
    n = len(instances)
    return ImagePrediction(
        semantic_scores=torch.from_numpy(sem_scores),
        semantic_members=torch.from_numpy(sem_members),
        instance_queries=torch.tensor([q for q, _, _, _ in instances], dtype=torch.long),
        instance_labels=torch.tensor([c for _, _, c, _ in instances], dtype=torch.long),
        instance_scores=torch.tensor([s for _, _, _, s in instances], dtype=torch.float32),
        instance_members=torch.from_numpy(
            np.stack([m for _, m, _, _ in instances]) if n else np.zeros((0, W), bool)
        ),
        class_probs=torch.zeros(k + W, k),
    )


def _compose(pred: ImagePrediction, params: CompositionParams = JOINT, mode: str = "joint"):
    return compose_prediction(pred, PATCHES, "img", H, W, ISTHING, params, mode)


def _assert_semantic_is_panoptic(res: ImageResult) -> None:
    """The joint composition's semantic map is its panoptic map's classes (-1 on void)."""
    expected = np.full((H, W), NO_CLASS, np.int32)
    for s in res.segments:
        expected[res.panoptic == s["id"]] = s["label"]
    np.testing.assert_array_equal(res.semantic, expected)


def _column_ids(res: ImageResult) -> list[int]:
    """Segment id of each column (the hand cases paint whole columns)."""
    assert (res.panoptic == res.panoptic[0]).all()
    return res.panoptic[0].tolist()


# --- defaults and configuration --------------------------------------------------------------


def test_default_params_follow_the_composition_mode():
    plugin = AffinityPlugin()
    joint = plugin.default_params(AffinityConfig.tiny(max_instances=7))
    assert joint == CompositionParams(
        score_thresh=0.3,
        overlap_thresh=0.8,
        stuff_area_min=0,
        max_instances=7,
        semantic_from="panoptic",
    )
    regions = plugin.default_params(AffinityConfig.tiny(composition="regions"))
    assert (regions.score_thresh, regions.overlap_thresh, regions.stuff_area_min) == (
        0.5,
        0.8,
        4096,
    )
    assert AffinityConfig().composition == "joint"
    assert "composition" in AffinityPlugin.inference_fields


def test_composition_is_a_config_field_settable_at_predict_time():
    from samcp.pipeline.errors import SamcpError
    from samcp.pipeline.predict import _override

    cfg = AffinityConfig.tiny()
    assert AffinityConfig.from_dict(cfg.to_dict()) == cfg
    assert _override(cfg, {"composition": "regions"}).composition == "regions"
    with pytest.raises(SamcpError, match="composition must be one of"):
        _override(cfg, {"composition": "mask2former"})
    with pytest.raises(ValueError, match="semantic_from"):
        CompositionParams(semantic_from="votes")


# --- hand cases --------------------------------------------------------------------------------


def test_a_low_score_stuff_class_paints_nothing():
    # Stuff class 1 (score 0.02) merges columns 5-9; a thing covers columns 0-4.
    pred = _prediction({1: (_cols(5, 6, 7, 8, 9), 0.02)}, [(0, _cols(0, 1, 2, 3, 4), 0, 0.9)])
    res = _compose(pred)
    assert [(s["label"], s["area"]) for s in res.segments] == [(0, 50)]
    assert _column_ids(res) == [1] * 5 + [0] * 5
    assert (res.semantic[:, 5:] == NO_CLASS).all()  # not in the semantic map either
    _assert_semantic_is_panoptic(res)
    # The earlier composition painted any stuff region whatever its score.
    old = _compose(pred, replace(JOINT, stuff_area_min=0), "regions")
    assert [(s["label"], round(s["score"], 2)) for s in old.segments] == [(0, 0.9), (1, 0.02)]
    assert (old.semantic[:, 5:] == 1).all()


def test_a_thing_and_a_stuff_region_compete_per_pixel_by_score():
    thing = (0, _cols(0, 1, 2), 0, 0.9)  # columns 0-2
    stuff = {1: (_cols(*range(2, 10)), 0.6)}  # columns 2-9; column 2 is contested
    res = _compose(_prediction(stuff, [thing]))
    # The thing (0.9) wins column 2; the stuff keeps 70 of its 80 pixels (>= 0.8).
    assert [(s["label"], s["isthing"], s["area"]) for s in res.segments] == [
        (0, True, 30),
        (1, False, 70),
    ]
    assert _column_ids(res) == [1, 1, 1] + [2] * 7
    _assert_semantic_is_panoptic(res)

    # Scores swapped: the stuff (0.9) wins column 2, the thing keeps 20 of 30 pixels and drops
    # (0.8 rule); its columns are void. Instances first (compose_regions) would keep the thing.
    res = _compose(_prediction({1: (stuff[1][0], 0.9)}, [(0, thing[1], 0, 0.6)]))
    assert [(s["label"], s["area"]) for s in res.segments] == [(1, 80)]
    assert _column_ids(res) == [0, 0] + [1] * 8
    _assert_semantic_is_panoptic(res)
    old = _compose(
        _prediction({1: (stuff[1][0], 0.9)}, [(0, thing[1], 0, 0.6)]),
        replace(JOINT, stuff_area_min=0),
        "regions",
    )
    assert [(s["label"], s["area"]) for s in old.segments] == [(0, 30), (1, 70)]
    # The instance list (instances.json) does not depend on the panoptic competition.
    assert res.instance_labels.tolist() == [0] and res.instance_scores.tolist() == [
        pytest.approx(0.6)
    ]


def test_the_overlap_rule_drops_a_mostly_hidden_instance():
    big = (0, _cols(0, 1, 2, 3, 4, 5), 0, 0.9)
    hidden = (1, _cols(4, 5, 6, 7, 8), 0, 0.8)  # 3 of its 5 columns visible: 0.6 < 0.8
    res = _compose(_prediction({}, [big, hidden]))
    assert [s["area"] for s in res.segments] == [60]
    assert _column_ids(res) == [1] * 6 + [0] * 4
    assert len(res.instance_rles) == 2  # still ranked for instance AP
    # 4 of 5 columns visible is exactly 0.8: kept.
    kept = _compose(_prediction({}, [big, (1, _cols(5, 6, 7, 8, 9), 0, 0.8)]))
    assert [s["area"] for s in kept.segments] == [60, 40]
    assert _column_ids(kept) == [1] * 6 + [2] * 4
    _assert_semantic_is_panoptic(kept)


def test_stuff_regions_below_threshold_and_thing_class_regions_take_no_part():
    # Class 0 (a thing) has a Type-I region with a high score: joint ignores it (the authors
    # have Type-I queries for stuff classes only); stuff 2 at 0.35 passes, stuff 1 at 0.29 not.
    pred = _prediction(
        {
            0: (_cols(0, 1, 2, 3), 0.95),
            1: (_cols(4, 5, 6), 0.29),
            2: (_cols(7, 8, 9), 0.35),
        },
        [],
    )
    res = _compose(pred)
    assert [(s["label"], s["area"]) for s in res.segments] == [(2, 30)]
    assert _column_ids(res) == [0] * 7 + [1] * 3
    _assert_semantic_is_panoptic(res)
    assert not res.instance_rles


def test_one_query_with_two_labels_is_one_candidate_mask():
    # predict_image ranks (query, class) pairs: a query may come twice. The lower pair has the
    # same mask and loses every pixel to the higher one.
    members = _cols(0, 1, 2)
    pred = _prediction({}, [(3, members, 0, 0.8), (3, members, 2, 0.5)])
    res = _compose(pred)
    assert [(s["label"], s["area"]) for s in res.segments] == [(0, 30)]
    assert res.instance_labels.tolist() == [0]  # only thing classes are instances


def test_compose_masks_semantic_from():
    a, b = np.zeros((H, W), bool), np.zeros((H, W), bool)
    a[:, :6] = True
    b[:, 4:] = True  # columns 4-5 shared
    rles = [_rle(a), _rle(b)]
    probs = np.array([[0.0, 0.9, 0.0], [0.0, 0.0, 0.2]])  # b scores below 0.3
    base = CompositionParams(score_thresh=0.3, overlap_thresh=0.8)
    every = compose_masks("x", H, W, rles, probs, ISTHING, base)
    assert every.semantic[0].tolist() == [1] * 6 + [2] * 4  # default: all masks vote
    kept = compose_masks("x", H, W, rles, probs, ISTHING, replace(base, semantic_from="kept"))
    assert kept.semantic[0].tolist() == [1] * 6 + [NO_CLASS] * 4
    pan = compose_masks("x", H, W, rles, probs, ISTHING, replace(base, semantic_from="panoptic"))
    assert pan.semantic[0].tolist() == [1] * 6 + [NO_CLASS] * 4
    np.testing.assert_array_equal(pan.panoptic, every.panoptic)
    # "kept" votes even where the overlap rule drops the mask; "panoptic" does not.
    probs = np.array([[0.0, 0.9, 0.0], [0.0, 0.0, 0.8]])
    kept = compose_masks("x", H, W, rles, probs, ISTHING, replace(base, semantic_from="kept"))
    pan = compose_masks("x", H, W, rles, probs, ISTHING, replace(base, semantic_from="panoptic"))
    assert [s["label"] for s in pan.segments] == [1]  # b keeps 4 of 6 columns: dropped
    assert kept.semantic[0].tolist() == [1] * 4 + [1, 1] + [2] * 4
    assert pan.semantic[0].tolist() == [1] * 6 + [NO_CLASS] * 4


# --- AffinityPlugin.infer end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untrained affinity head on one synthetic image with random cached arrays."""
    from samcp.models.heads import ImageInputs
    from samcp.models.registry import build_head, get_head
    from samcp.pipeline.datasets import CocoPanopticDataset
    from samcp.pipeline.headdata import ClassSpace, ground_truth_rles
    from samcp.pipeline.predict import LabelSpace
    from samcp.pipeline.synth import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("affinity_compose")
    make_synthetic_dataset(tmp / "syn", seed=5, num_train=1, num_val=2, height=48, width=64)
    ds = CocoPanopticDataset(tmp / "syn", "val2017")
    classes = ClassSpace(ds.categories)
    rng = np.random.default_rng(0)
    text_dim, size, stride, channels = 12, 64, 8, 16
    # An untrained head's affinities are all below the 0.3 floor; merge by rank only.
    cfg = AffinityConfig.tiny(
        clip_levels=("clip_res5",),
        clip_channels=(channels,),
        clip_strides=(stride,),
        clip_input_size=size,
        text_dim=text_dim,
        min_affinity=0.0,
    )
    head = get_head("affinity")
    torch.manual_seed(0)
    model = build_head("affinity", cfg).eval()
    samples = []
    for rec in ds.records:
        id_map, segs = ds.load_panoptic(rec.image_id)
        gt = ground_truth_rles(id_map, segs, classes)
        rles = list(gt.rles)
        for _ in range(3):  # and a few spurious patches
            m = np.zeros((rec.height, rec.width), np.uint8)
            y, x = rng.integers(0, rec.height - 8), rng.integers(0, rec.width - 8)
            m[y : y + 8, x : x + 8] = 1
            rles.append(mask_utils.encode(np.asfortranarray(m)))
        n = len(rles)
        inputs = ImageInputs(
            image_id=rec.image_id,
            height=rec.height,
            width=rec.width,
            image_arrays={
                "clip_res5": rng.standard_normal((channels, size // stride, size // stride)).astype(
                    np.float16
                )
            },
            rles=rles,
            boxes=mask_utils.toBbox(rles).astype(np.float32),
            areas=mask_utils.area(rles).astype(np.int64),
            mask_arrays={"clip_mask_embed": rng.standard_normal((n, text_dim)).astype(np.float16)},
        )
        samples.append(head.sample(inputs, cfg, 50))
    labels = LabelSpace.from_categories(classes.categories)
    text = torch.nn.functional.normalize(torch.randn(len(labels), text_dim), dim=-1)
    with torch.no_grad():
        out = model(**head.collate(samples, text, cfg, "cpu"))
    return {
        "head": head,
        "cfg": cfg,
        "samples": samples,
        "labels": labels,
        "text": text,
        "out": out,
    }


def _infer(tiny, composition: str, params: CompositionParams | None = None) -> list[ImageResult]:
    cfg = replace(tiny["cfg"], composition=composition)
    head = tiny["head"]
    ctx = InferContext(
        text_embed=tiny["text"],
        isthing=tiny["labels"].isthing,
        seen=np.ones(len(tiny["labels"]), bool),
        params=params or head.default_params(cfg),
        device=torch.device("cpu"),
    )
    return head.infer(tiny["out"], tiny["samples"], cfg, ctx)


def _assert_valid(res: ImageResult, isthing: np.ndarray) -> None:
    assert res.panoptic.shape == res.semantic.shape == (res.height, res.width)
    ids = [s["id"] for s in res.segments]
    assert ids == list(range(1, len(ids) + 1))
    assert set(np.unique(res.panoptic).tolist()) - {0} == set(ids)
    for s in res.segments:
        assert s["area"] == int((res.panoptic == s["id"]).sum())
        assert s["isthing"] == bool(isthing[s["label"]])
    stuff = [s["label"] for s in res.segments if not s["isthing"]]
    assert len(stuff) == len(set(stuff))  # one segment per stuff class
    assert (np.diff(res.instance_scores) <= 0).all()
    assert all(isthing[c] for c in res.instance_labels.tolist())


def test_infer_end_to_end_in_both_modes(tiny):
    isthing = np.asarray(tiny["labels"].isthing, bool)
    # Untrained scores are low: threshold 0 so that both modes paint something.
    open_joint = replace(JOINT, score_thresh=0.0)
    joint = _infer(tiny, "joint", open_joint)
    regions = _infer(tiny, "regions", replace(open_joint, stuff_area_min=0, semantic_from="all"))
    painted = 0
    for j, r in zip(joint, regions, strict=True):
        assert j.image_id == r.image_id
        _assert_valid(j, isthing)
        _assert_valid(r, isthing)
        h, w = j.height, j.width
        expected = np.full((h, w), NO_CLASS, np.int32)
        for s in j.segments:
            expected[j.panoptic == s["id"]] = s["label"]
        np.testing.assert_array_equal(j.semantic, expected)  # consistent maps
        # Both modes rank the same instances for instances.json.
        np.testing.assert_array_equal(j.instance_labels, r.instance_labels)
        np.testing.assert_allclose(j.instance_scores, r.instance_scores, rtol=1e-6)
        assert j.instance_rles == r.instance_rles
        painted += int((j.panoptic > 0).sum())
    assert painted > 0

    # At the default threshold (0.3) every painted segment scores above it; the untrained
    # head's scores are near its 0.01 prior, so little or nothing is painted.
    for j in _infer(tiny, "joint"):
        _assert_valid(j, isthing)
        assert all(s["score"] >= 0.3 for s in j.segments)
        assert ((j.semantic >= 0) == (j.panoptic > 0)).all()


def test_infer_regions_mode_is_the_previous_composition(tiny):
    cfg = replace(tiny["cfg"], composition="regions")
    params = replace(AffinityPlugin().default_params(cfg), stuff_area_min=0)
    got = _infer(tiny, "regions", params)
    out, k = tiny["out"], len(tiny["labels"])
    isthing = np.asarray(tiny["labels"].isthing, bool)
    for i, (s, res) in enumerate(zip(tiny["samples"], got, strict=True)):
        n = s.num_patches
        pred = predict_image(
            out.affinity_logits[-1, i, : k + n, :n],
            out.class_logits[-1, i, : k + n],
            out.patch_valid[i, :n],
            k,
            cfg,
            patch_clip_embed=s.patch_clip_embed.float(),
            text_embed=tiny["text"],
            patch_areas=s.patch_areas,
            instance_classes=torch.from_numpy(isthing),
            seen=torch.ones(k, dtype=torch.bool),
        )
        ref = compose_regions(
            s.image_id,
            s.height,
            s.width,
            [union_rle(s.patch_rles, m) for m in pred.semantic_members.numpy()],
            pred.semantic_scores.numpy(),
            [union_rle(s.patch_rles, m) for m in pred.instance_members.numpy()],
            pred.instance_labels.numpy(),
            pred.instance_scores.numpy(),
            isthing,
            params,
        )
        np.testing.assert_array_equal(res.panoptic, ref.panoptic)
        np.testing.assert_array_equal(res.semantic, ref.semantic)
        assert res.segments == ref.segments
