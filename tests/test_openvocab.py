"""samcp.models.openvocab: class embeddings, seen split, void classifier and the CLIP ensembles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samcp.models.affinity import open_vocab_scores
from samcp.models.openvocab import (
    OpenVocabClassifier,
    class_embeddings,
    geometric_ensemble,
    kappa_fusion,
    mase,
    seen_classes,
    split_void,
    text_logits,
)

P_LDP = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
P_CLIP = torch.tensor([[0.5, 0.4, 0.1]], dtype=torch.float64)
SEEN = np.array([True, True, False])
HAND = torch.tensor([[0.54630, 0.34784, 0.1]], dtype=torch.float64)


# --- class embeddings and seen classes ---------------------------------------------------------


def test_class_embeddings_hand_case() -> None:
    syn = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-2.0, 0.0]])
    idx = torch.tensor([0, 0, 1])
    out = class_embeddings(syn, idx, 2)
    # unit [.6, .8] and [0, 1] -> mean [.3, .9] -> normalised.
    expected0 = torch.tensor([0.3, 0.9]) / math.sqrt(0.9)
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_class_embeddings_rejects_class_without_name() -> None:
    with pytest.raises(ValueError, match="without any name"):
        class_embeddings(torch.randn(2, 4), torch.tensor([0, 0]), 2)
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        class_embeddings(torch.randn(2, 4), torch.tensor([0, 2]), 2)


def test_seen_classes_hand_case() -> None:
    vocab = [["Person", "human"], ["sky"], [" Dog "], "wall-other"]
    train = [["person"], ["dog", "puppy"], ["Wall-Other "]]
    assert seen_classes(vocab, train).tolist() == [True, False, True, True]
    assert seen_classes([], train).shape == (0,)


# --- logits and the void class -----------------------------------------------------------------


def test_text_logits_is_scaled_cosine() -> None:
    embed = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    out = text_logits(embed, text, 10.0)
    s = math.sqrt(0.5) * 10
    torch.testing.assert_close(out, torch.tensor([[10.0, 0.0], [s, s]]))


def test_classifier_shapes_void_column_and_gradients() -> None:
    torch.manual_seed(0)
    clf = OpenVocabClassifier(8)
    embed, text = torch.randn(2, 5, 8), torch.randn(3, 8)
    logits = clf(embed, text)
    assert logits.shape == (2, 5, 4)
    void = clf.scale * F.normalize(embed, dim=-1) @ F.normalize(clf.void_embed, dim=0)
    torch.testing.assert_close(logits[..., -1], void)
    target = torch.full((10,), 3)  # every embedding is void
    F.cross_entropy(logits.reshape(10, 4), target).backward()
    assert clf.void_embed.grad is not None and clf.void_embed.grad.abs().sum() > 0
    assert clf.log_scale.grad is not None and clf.log_scale.grad.abs() > 0
    assert torch.isclose(clf.scale, torch.tensor(1 / 0.07))


def test_classifier_scale_is_clamped() -> None:
    clf = OpenVocabClassifier(4, init_temperature=0.001, max_scale=100.0)
    assert float(clf.scale.detach()) == pytest.approx(100.0)
    embed = clf.void_embed.detach()[None]
    assert float(clf(embed, torch.randn(2, 4))[0, -1].detach()) == pytest.approx(100.0, rel=1e-5)
    with pytest.raises(ValueError):
        OpenVocabClassifier(4, init_temperature=0.0)


def test_split_void_sums() -> None:
    logits = torch.randn(3, 7, 6)
    p_in, p_void = split_void(logits)
    assert p_in.shape == (3, 7, 5) and p_void.shape == (3, 7)
    torch.testing.assert_close(p_in.sum(-1), torch.ones(3, 7))
    torch.testing.assert_close(p_void, logits.softmax(-1)[..., -1])
    torch.testing.assert_close(p_in, logits[..., :5].softmax(-1))


# --- geometric ensemble and SAM-CP's kappa fusion ----------------------------------------------


def test_geometric_ensemble_equals_samcp_fusion() -> None:
    torch.manual_seed(1)
    cls, clip = torch.randn(4, 9, 13) * 3, torch.randn(4, 9, 13) * 5
    for kappa in (0.0, 0.3, 0.7, 1.0):
        want = open_vocab_scores(cls, clip, kappa)
        got = geometric_ensemble(cls.sigmoid(), clip.softmax(-1), np.ones(13, bool), kappa, kappa)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kappa_fusion(cls, clip, kappa), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kappa_fusion(cls, None, 0.5), cls.sigmoid())


def test_geometric_ensemble_seen_unseen_and_per_mask_weights() -> None:
    p_in = torch.tensor([[0.5, 0.2], [0.4, 0.3]], dtype=torch.float64)
    p_out = torch.tensor([[0.1, 0.6], [0.2, 0.7]], dtype=torch.float64)
    seen = torch.tensor([True, False])
    out = geometric_ensemble(p_in, p_out, seen, 0.25, 0.75)
    want = torch.stack(
        [p_in[:, 0] ** 0.75 * p_out[:, 0] ** 0.25, p_in[:, 1] ** 0.25 * p_out[:, 1] ** 0.75], 1
    )
    torch.testing.assert_close(out, want)
    alpha, beta = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0])
    out = geometric_ensemble(p_in, p_out, seen, alpha, beta.double())
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.6], [0.2, 0.3]], dtype=torch.float64))


def test_geometric_ensemble_zeros_are_exact_and_gradients_finite() -> None:
    p_in = torch.tensor([[0.0, 0.5, 0.0]], requires_grad=True)
    p_out = torch.tensor([[0.3, 0.0, 0.0]], requires_grad=True)
    out = geometric_ensemble(p_in, p_out, np.array([True, True, True]), 0.5, 0.5)
    assert out.tolist() == [[0.0, 0.0, 0.0]]
    out.sum().backward()
    assert torch.isfinite(p_in.grad).all() and torch.isfinite(p_out.grad).all()
    # 0^0 = 1: a zero with zero weight does not zero the product.
    one = geometric_ensemble(torch.tensor([[0.0]]), torch.tensor([[0.4]]), np.array([True]), 1, 1)
    assert float(one) == pytest.approx(0.4)


# --- MASE (PosSAM algorithm 1) -----------------------------------------------------------------


def test_mase_hand_case() -> None:
    out = mase(P_LDP, P_CLIP, torch.tensor([1.0]), SEEN, 0.4, 0.8)
    torch.testing.assert_close(out, HAND, atol=1e-5, rtol=0)
    half = mase(P_LDP, P_CLIP, torch.tensor([0.5]), SEEN, 0.4, 0.8)
    torch.testing.assert_close(half, HAND / 2, atol=1e-5, rtol=0)


def test_mase_extreme_weights() -> None:
    iou = torch.tensor([0.7])
    torch.testing.assert_close(mase(P_LDP, P_CLIP, iou, SEEN, 0.0, 0.0), P_LDP * 0.7)
    torch.testing.assert_close(mase(P_LDP, P_CLIP, iou, SEEN, 1.0, 1.0), P_CLIP * 0.7)


def test_mase_clamps_adapted_weights() -> None:
    # c = 0.2 / 0.7, beta^ = 0.9 (1 + c) > 1 -> 1: unseen classes take CLIP's score alone.
    out = mase(P_LDP, P_CLIP, torch.tensor([1.0]), np.zeros(3, bool), 0.4, 0.9)
    torch.testing.assert_close(out, P_CLIP)
    # alpha^ = 0.4 (1 + 2/7) stays below 1 (no clamp) on the seen ones.
    a = 0.4 * (1 + 0.2 / 0.7)
    out = mase(P_LDP, P_CLIP, torch.tensor([1.0]), np.ones(3, bool), 0.4, 0.9)
    torch.testing.assert_close(out, P_LDP ** (1 - a) * P_CLIP**a)


def test_mase_zero_maximum_and_single_class() -> None:
    p_ldp = torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.0, 0.0]])
    p_clip = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])
    out = mase(p_ldp, p_clip, torch.tensor([0.0, 1.0]), SEEN)
    assert torch.isfinite(out).all()
    assert out[0].tolist() == [0.0] * 3  # IoU 0: an all-zero row, SE = 0 for both, c = 0.5
    # An all-zero LDP row (SE_l = 0) gives c = 1: seen classes alpha^ = 0.8 keep LDP's zeros, the
    # unseen one (beta^ clamped to 1) takes CLIP's score.
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 0.1]))
    # K == 1: SE = 1 for both, c = 0.5, alpha^ = 0.6.
    one = mase(torch.tensor([[0.4]]), torch.tensor([[0.9]]), torch.tensor([1.0]), [True])
    assert float(one) == pytest.approx(0.4**0.4 * 0.9**0.6, rel=1e-6)


def test_mase_non_finite_iou_falls_back_per_mask() -> None:
    p_ldp = torch.cat([P_LDP, P_LDP, P_LDP])
    p_clip = torch.cat([P_CLIP, P_CLIP, P_CLIP])
    iou = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    out = mase(p_ldp, p_clip, iou, SEEN, 0.4, 0.8)
    plain = geometric_ensemble(P_LDP, P_CLIP, SEEN, 0.4, 0.8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], HAND, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:2], plain)
    torch.testing.assert_close(out[2:], plain)


def test_mase_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        mase(P_LDP, P_CLIP[:, :2], torch.tensor([1.0]), SEEN)
    with pytest.raises(ValueError):
        mase(P_LDP, P_CLIP, torch.tensor([1.0, 1.0]), SEEN)
