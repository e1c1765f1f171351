"""SAM-CP losses (eq. 1-2) on hand cases with known values."""

import math

import pytest
import torch

from samcp.models.affinity import AffinityConfig, AffinityCriterion, AffinityOutput, ImageTargets
from samcp.models.affinity.losses import affinity_focal_loss, classification_loss, dice_loss

LN2 = math.log(2)
FL_POS0 = 0.25 * 0.25 * LN2  # focal loss of logit 0 against target 1 (alpha 0.25, gamma 2)
FL_NEG0 = 0.75 * 0.25 * LN2  # ... against target 0


def test_affinity_focal_loss_hand_case():
    logits = torch.zeros(2, 3)
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0: patch 2 ignored
    rows = torch.tensor([1.0, 1.0])
    got = affinity_focal_loss(logits, targets, weights, rows, 0.25, 2.0)
    expected = (FL_POS0 + FL_NEG0) / 1 + (2 * FL_POS0 + FL_NEG0) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # eps_m = 0 drops the row; an empty target row is divided by max(|B|, 1) = 1.
    got = affinity_focal_loss(
        logits, torch.zeros(2, 3), weights, torch.tensor([0.0, 1.0]), 0.25, 2.0
    )
    assert float(got) == pytest.approx(3 * FL_NEG0, rel=1e-6)


def test_dice_loss_hand_case():
    t = torch.tensor([[1.0, 0.0]])
    w = torch.ones(1, 2)
    one = torch.ones(1)
    assert float(dice_loss(torch.tensor([[30.0, -30.0]]), t, w, one)) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(dice_loss(torch.zeros(1, 2), t, w, one)) == pytest.approx(1 / 3, rel=1e-6)
    # An ignored patch neither adds to the prediction mass nor to the target.
    w2 = torch.tensor([[1.0, 0.0]])
    assert float(dice_loss(torch.tensor([[30.0, 30.0]]), t, w2, one)) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(dice_loss(torch.zeros(1, 2), t, w, torch.zeros(1))) == 0.0


def test_classification_loss_hand_case():
    logits = torch.zeros(3, 2)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([1.0, 1.0, 0.0])
    got = classification_loss(logits, targets, weights, 0.25, 2.0)
    assert float(got) == pytest.approx((FL_POS0 + FL_NEG0) + 2 * FL_NEG0, rel=1e-6)


def _zero_outputs(k: int, p: int, layers: int = 1) -> AffinityOutput:
    q = k + p
    return AffinityOutput(
        affinity_logits=torch.zeros(layers, 1, q, p, requires_grad=True),
        class_logits=torch.zeros(layers, 1, q, k, requires_grad=True),
        query_valid=torch.ones(1, q, dtype=torch.bool),
        patch_valid=torch.ones(1, p, dtype=torch.bool),
        patch_boxes=torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]]),
        num_semantic=k,
    )


def _targets(
    usable: bool = True, sem_present=(True, False), sem_pos0=(True, False)
) -> ImageTargets:
    return ImageTargets(
        inst_labels=torch.tensor([0]),
        inst_pos=torch.tensor([[True, False]]),
        inst_ignore=torch.zeros(1, 2, dtype=torch.bool),
        inst_boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5]]),
        inst_usable=torch.tensor([usable]),
        sem_pos=torch.tensor([list(sem_pos0), [False, False]]),
        sem_ignore=torch.zeros(2, 2, dtype=torch.bool),
        sem_present=torch.tensor(list(sem_present)),
    )


def test_criterion_total_on_a_hand_case():
    """K=2 classes, P=2 patches, all logits 0: every term is known in closed form.

    Type-I: class 0 present (patch 0 positive), class 1 absent. Type-II: one GT of class 0 on patch 0;
    both instance queries are identical, so whichever is matched gives the same value.
    cls per type = [FL+(0) + FL-(0)] + 2 FL-(0) = 0.625 ln2 (M* = 1); mfl = 0.25 ln2; dice = 1/3.
    """
    cfg = AffinityConfig.tiny()
    out = _zero_outputs(2, 2)
    losses = AffinityCriterion(cfg)(out, [_targets()])
    for kind in ("sem", "ins"):
        assert float(losses[f"{kind}_cls"]) == pytest.approx(0.625 * LN2, rel=1e-5)
        assert float(losses[f"{kind}_mfl"]) == pytest.approx(0.25 * LN2, rel=1e-5)
        assert float(losses[f"{kind}_dice"]) == pytest.approx(1 / 3, rel=1e-5)
        assert float(losses[f"num_pos_{kind}"]) == 1
    # BG: the unmatched instance query's target is its own patch: the same closed forms.
    assert float(losses["bg_mfl"]) == pytest.approx(0.25 * LN2, rel=1e-5)
    assert float(losses["bg_dice"]) == pytest.approx(1 / 3, rel=1e-5)
    assert float(losses["num_pos_bg"]) == 1
    expected = 2 * (2.0 * 0.625 * LN2 + 0.25 * LN2 + 1 / 3) + 0.25 * LN2 + 1 / 3
    assert float(losses["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    losses["loss"].backward()
    assert out.affinity_logits.grad is not None and out.affinity_logits.grad.abs().sum() > 0


def test_deep_supervision_sums_every_layer():
    cfg = AffinityConfig.tiny()
    one = AffinityCriterion(cfg)(_zero_outputs(2, 2, layers=1), [_targets()])
    three = AffinityCriterion(cfg)(_zero_outputs(2, 2, layers=3), [_targets()])
    assert float(three["loss"].detach()) == pytest.approx(3 * float(one["loss"].detach()), rel=1e-5)
    assert "layer0/ins_cls" in three and "layer2/sem_dice" in three
    last = AffinityCriterion(AffinityConfig.tiny(deep_supervision=False))(
        _zero_outputs(2, 2, layers=3), [_targets()]
    )
    assert float(last["loss"].detach()) == pytest.approx(float(one["loss"].detach()), rel=1e-5)


def test_unusable_gt_ignores_its_query_and_uncomposable_class_is_not_a_negative():
    cfg = AffinityConfig.tiny()
    # The instance GT cannot be composed: its matched query gets no loss at all, the other is negative.
    # Class 0 is present but none of its patches qualifies: its Type-I query is ignored for cls.
    losses = AffinityCriterion(cfg)(
        _zero_outputs(2, 2), [_targets(usable=False, sem_pos0=(False, False))]
    )
    assert float(losses["num_pos_ins"]) == 0 and float(losses["num_pos_sem"]) == 0
    assert float(losses["ins_cls"]) == pytest.approx(2 * FL_NEG0, rel=1e-5)
    assert float(losses["sem_cls"]) == pytest.approx(2 * FL_NEG0, rel=1e-5)  # only class 1's query
    for name in ("ins_mfl", "ins_dice", "sem_mfl", "sem_dice"):
        assert float(losses[name]) == 0.0


def test_cls_normalizer_num_queries():
    cfg = AffinityConfig.tiny(cls_normalizer="num_queries")
    losses = AffinityCriterion(cfg)(_zero_outputs(2, 2), [_targets()])
    assert float(losses["ins_cls"]) == pytest.approx(0.625 * LN2 / 2, rel=1e-5)


def test_criterion_rejects_mismatched_targets():
    cfg = AffinityConfig.tiny()
    out = _zero_outputs(2, 2)
    out.patch_valid[0, 1] = False
    with pytest.raises(ValueError, match="valid patches"):
        AffinityCriterion(cfg)(out, [_targets()])
