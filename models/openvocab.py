"""The open-vocabulary classifier every head uses: class embeddings, cosine logits, a learned void
class, and the ensembles of an in-vocabulary classifier with frozen CLIP.

Pieces and where they come from:

* :func:`class_embeddings` -- one embedding per class from its synonyms (the one rule, train and
  predict).
* :func:`seen_classes` -- which prediction classes the head saw in training (FC-CLIP's rule).
* :func:`text_logits` and :class:`OpenVocabClassifier` -- scale x cosine logits against the class
  embeddings plus a learned void embedding (FC-CLIP), with a learnable temperature.
* :func:`split_void` -- the in-vocabulary distribution and the void probability.
* :func:`geometric_ensemble` -- FC-CLIP's ``p_in^(1-a) * p_out^a`` with ``a = alpha`` on seen
  classes and ``beta`` on unseen ones; :func:`kappa_fusion` is SAM-CP's special case and
  :func:`mase` PosSAM's mask-aware selective ensembling.

Pure torch / numpy; imports nothing from ``samcp.pipeline``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Probabilities are clamped to this only inside logarithms (log(0) would be -inf).
LOG_EPS = 1e-12

__all__ = [
    "LOG_EPS",
    "OpenVocabClassifier",
    "class_embeddings",
    "geometric_ensemble",
    "kappa_fusion",
    "mase",
    "seen_classes",
    "split_void",
    "text_logits",
]


# ----------------------------------------------------------------------------------------------
# Class embeddings and the seen / unseen split.
# ----------------------------------------------------------------------------------------------


def class_embeddings(synonym_embed: Tensor, class_index: Tensor, num_classes: int) -> Tensor:
    """One unit embedding per class from the (template-averaged) embeddings of its names.

    The rule: L2-normalise each synonym's embedding, average the synonyms of a class, L2-normalise
    the mean. It is the only rule, used both when training and when predicting, because a class must
    be one embedding everywhere: SAM-CP feeds the class embedding to its decoder as a query, where
    a max over synonyms (FC-CLIP's test-time choice) has nothing to apply to; and a classifier
    trained against one kind of class vector must be evaluated against the same kind.

    Args:
        synonym_embed: (S, D) one embedding per name (already averaged over prompt templates).
        class_index: (S,) int64 class of each name, in ``[0, num_classes)``.
        num_classes: K.

    Returns:
        (K, D) unit-norm class embeddings, dtype of ``synonym_embed``.

    Raises:
        ValueError: on mismatched shapes, an index out of range, or a class without any name.
    """
    if synonym_embed.dim() != 2:
        raise ValueError(f"synonym_embed must be (S, D), got {tuple(synonym_embed.shape)}")
    index = class_index.to(device=synonym_embed.device, dtype=torch.long).reshape(-1)
    if index.numel() != synonym_embed.shape[0]:
        raise ValueError(
            f"class_index has {index.numel()} entries for {synonym_embed.shape[0]} synonyms"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_classes):
        raise ValueError(f"class_index must lie in [0, {num_classes})")
    counts = torch.bincount(index, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes without any name: {missing[:10]}")
    unit = F.normalize(synonym_embed.float(), dim=-1)
    sums = torch.zeros(num_classes, unit.shape[1], device=unit.device, dtype=unit.dtype)
    sums.index_add_(0, index, unit)
    mean = sums / counts.to(unit.dtype)[:, None]
    return F.normalize(mean, dim=-1).to(synonym_embed.dtype)


def _name_key(name: str) -> str:
    """The comparison key of a class name: whitespace-stripped, case-folded."""
    return name.strip().casefold()


def _names_of(names: str | Sequence[str]) -> list[str]:
    """A class's names as a list (a bare string is one name, not a sequence of letters)."""
    return [names] if isinstance(names, str) else list(names)


def seen_classes(
    vocab_names: Sequence[Sequence[str]], train_names: Sequence[Sequence[str]]
) -> np.ndarray:
    """Which prediction classes count as seen in training (FC-CLIP's rule).

    A prediction class is seen when any of its names equals any name of any training class,
    comparing whitespace-stripped, case-insensitive strings.

    Args:
        vocab_names: per prediction class, its names (synonyms); a bare string is one name.
        train_names: per training class, its names.

    Returns:
        (K,) bool, K = ``len(vocab_names)``.
    """
    train = {_name_key(n) for names in train_names for n in _names_of(names)}
    return np.array(
        [any(_name_key(n) in train for n in _names_of(names)) for names in vocab_names],
        dtype=bool,
    ).reshape(len(vocab_names))


# ----------------------------------------------------------------------------------------------
# Logits: cosine against the class embeddings, plus a learned void class.
# ----------------------------------------------------------------------------------------------


def text_logits(embed: Tensor, text: Tensor, scale: float | Tensor) -> Tensor:
    """``scale * cos(embed, text_k)`` for every class k.

    Args:
        embed: (..., D) mask / query embeddings (normalised here).
        text: (K, D) class embeddings (normalised here).
        scale: the logit scale (1 / temperature), a float or a scalar tensor.

    Returns:
        (..., K) logits.
    """
    return scale * (F.normalize(embed, dim=-1) @ F.normalize(text, dim=-1).transpose(0, 1))


class OpenVocabClassifier(nn.Module):
    """Cosine classifier over an open vocabulary with a learned void class.

    ``forward(embed, text)`` returns ``scale * cos`` against the K class embeddings and, as the last
    column, against a learned void embedding (FC-CLIP's choice). A fixed zero void logit cannot adapt
    to the scale of cosine logits (which live in ``[-scale, scale]`` and shift with the temperature
    and the text encoder), so "no class" would be too easy or too hard depending on the run; a
    learned embedding in the same space is scored on the same scale as the classes.

    The temperature tau is learned as ``log(1 / tau)``; the scale ``1 / tau`` is clamped to
    ``max_scale`` (CLIP's 100) so the logits cannot blow up.

    Args:
        dim: D, the text-space dimension.
        init_temperature: initial tau (CLIP's 0.07).
        max_scale: the largest scale ``1 / tau``.
    """

    def __init__(self, dim: int, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        if not max_scale > 0:
            raise ValueError(f"max_scale must be positive, got {max_scale}")
        self.dim = dim
        self.max_scale = float(max_scale)
        self.void_embed = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def scale(self) -> Tensor:
        """The current logit scale ``1 / tau``, at most ``max_scale`` (a scalar tensor)."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, embed: Tensor, text: Tensor) -> Tensor:
        """Class logits with a void column.

        Args:
            embed: (..., D) embeddings to classify.
            text: (K, D) class embeddings.

        Returns:
            (..., K + 1) logits; the last column is void.
        """
        classes = torch.cat([text.to(embed.dtype), self.void_embed[None].to(embed.dtype)], dim=0)
        return text_logits(embed, classes, self.scale.to(embed.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_scale={self.max_scale}"


def split_void(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The in-vocabulary distribution and the void probability of ``(..., K + 1)`` logits.

    Args:
        logits: (..., K + 1) with void last (:class:`OpenVocabClassifier`).

    Returns:
        ``(p_in, p_void)``: p_in (..., K) is the softmax over the K class logits only (the void logit
        dropped, as FC-CLIP does for the in-vocabulary distribution), so it sums to 1; p_void (...)
        is the void entry of the softmax over all K + 1.
    """
    if logits.shape[-1] < 2:
        raise ValueError("logits need at least one class column and the void column")
    return logits[..., :-1].softmax(-1), logits.softmax(-1)[..., -1]


# ----------------------------------------------------------------------------------------------
# Ensembles with CLIP.
# ----------------------------------------------------------------------------------------------


def _as_bool_tensor(seen: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """``seen`` as a bool tensor on ``device``."""
    if isinstance(seen, Tensor):
        return seen.to(device=device, dtype=torch.bool)
    return torch.as_tensor(np.asarray(seen, dtype=bool), device=device)


def _weight(value: float | Tensor, like: Tensor) -> Tensor:
    """A weight (float or tensor over leading dims) as a tensor with a trailing class axis."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).unsqueeze(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (``LOG_EPS`` underflows in float16), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def geometric_ensemble(
    p_in: Tensor,
    p_out: Tensor,
    seen: np.ndarray | Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
) -> Tensor:
    """FC-CLIP's geometric ensemble ``p_in^(1-a) * p_out^a`` per class, ``a`` = alpha on seen
    classes and beta on unseen ones.

    Computed as ``exp((1-a) log p_in + a log p_out)`` with the probabilities clamped to
    ``LOG_EPS`` only inside the logs, so gradients stay finite; results are exact for strictly
    positive inputs, and a zero probability with a positive weight gives exactly 0 (``0^0 = 1``,
    as in ``pow``).

    Args:
        p_in: (..., K) in-vocabulary probabilities.
        p_out: (..., K) out-of-vocabulary (CLIP) probabilities.
        seen: (K,) bool, numpy or tensor.
        alpha: CLIP's weight on seen classes; a float or a tensor broadcastable over the leading
            dims of ``p_in`` (e.g. (M,) per-mask weights, then ``a`` is (M, K)).
        beta: the same for unseen classes.

    Returns:
        (..., K) ensembled scores (not renormalised), dtype of ``p_in``.
    """
    dtype = _compute_dtype(torch.promote_types(p_in.dtype, p_out.dtype))
    p_in_c, p_out_c = p_in.to(dtype), p_out.to(dtype)
    mask = _as_bool_tensor(seen, p_in.device)
    if mask.shape != (p_in.shape[-1],):
        raise ValueError(f"seen must be ({p_in.shape[-1]},), got {tuple(mask.shape)}")
    a = torch.where(mask, _weight(alpha, p_in_c), _weight(beta, p_in_c))
    w_in = 1 - a
    log_mix = w_in * p_in_c.clamp_min(LOG_EPS).log() + a * p_out_c.clamp_min(LOG_EPS).log()
    out = log_mix.exp()
    zero = ((p_in_c <= 0) & (w_in > 0)) | ((p_out_c <= 0) & (a > 0))
    out = torch.where(zero, torch.zeros_like(out), out)
    return out.to(p_in.dtype)


def kappa_fusion(class_logits: Tensor, clip_logits: Tensor | None, kappa: float) -> Tensor:
    """SAM-CP's open-vocabulary score ``S_ov = sigmoid(S_cls)^(1-kappa) * softmax(S_CLIP)^kappa``.

    This is :func:`geometric_ensemble` with every class seen and ``alpha = beta = kappa``.

    Args:
        class_logits: (..., K) the head's per-class logits (sigmoid, multi-label).
        clip_logits: (..., K) CLIP's logits (softmax over classes), or None.
        kappa: CLIP's weight.

    Returns:
        (..., K) scores; ``sigmoid(class_logits)`` without CLIP logits.
    """
    probs = class_logits.sigmoid()
    if clip_logits is None:
        return probs
    seen = torch.ones(class_logits.shape[-1], dtype=torch.bool, device=class_logits.device)
    return geometric_ensemble(probs, clip_logits.softmax(-1), seen, kappa, kappa)


def _selection_entropy(p: Tensor) -> Tensor:
    """PosSAM's per-mask confidence ``1 - second largest / largest`` of (M, K) scores.

    Guards: K == 1 gives 1 (the only class is unrivalled); a row whose largest score is 0 gives 0
    (it carries no preference, and 0 / 0 must not become NaN).
    """
    m, k = p.shape
    if k == 1:
        return torch.ones(m, dtype=p.dtype, device=p.device)
    top2 = p.topk(2, dim=-1).values
    largest, second = top2[:, 0], top2[:, 1]
    positive = largest > 0
    ratio = second / torch.where(positive, largest, torch.ones_like(largest))
    return torch.where(positive, 1 - ratio, torch.zeros_like(largest))


def mase(
    p_ldp: Tensor,
    p_clip: Tensor,
    iou: Tensor,
    seen: np.ndarray | Tensor,
    alpha: float = 0.4,
    beta: float = 0.8,
) -> Tensor:
    """PosSAM's Mask-Aware Selective Ensembling (Algorithm 1).

    1. ``P_l = p_ldp * iou``, ``P_c = p_clip * iou`` (per mask).
    2. ``SE_x = 1 - second largest(P_x) / largest(P_x)`` per mask.
    3. ``c = SE_c / (SE_c + SE_l)``; ``alpha^ = alpha (1 + c)``, ``beta^ = beta (1 + c)``, both
       clamped to [0, 1].
    4. ``P = P_l^(1 - alpha^) P_c^alpha^`` on seen classes, ``P_l^(1 - beta^) P_c^beta^`` on unseen.

    Guards:

    * largest == 0 -> SE = 0 (an all-zero row has no preference; avoids 0 / 0);
    * K == 1 -> SE = 1 (one class is never rivalled);
    * SE_c + SE_l == 0 -> c = 0.5 (neither is confident: trust them equally, avoids 0 / 0);
    * alpha^, beta^ clamped to [0, 1] (``alpha (1 + c)`` reaches ``2 alpha``; an exponent above 1
      would turn the geometric mean into an extrapolation);
    * a negative IoU is taken as 0 (no overlap; negative scores have no fractional power);
    * a mask whose IoU is not finite (nan / inf) falls back to the plain
      ``geometric_ensemble(p_ldp, p_clip, seen, alpha, beta)``: no IoU weighting, no adaptation.
      This is per mask.

    Args:
        p_ldp: (M, K) in-vocabulary (LDP / head) probabilities.
        p_clip: (M, K) CLIP probabilities.
        iou: (M,) predicted IoU of each mask.
        seen: (K,) bool.
        alpha: CLIP's base weight on seen classes.
        beta: CLIP's base weight on unseen classes.

    Returns:
        (M, K) ensembled scores, dtype of ``p_ldp``.
    """
    if p_ldp.dim() != 2 or p_ldp.shape != p_clip.shape:
        raise ValueError(
            f"p_ldp and p_clip must both be (M, K), got {tuple(p_ldp.shape)} and "
            f"{tuple(p_clip.shape)}"
        )
    iou = iou.to(device=p_ldp.device).reshape(-1)
    if iou.numel() != p_ldp.shape[0]:
        raise ValueError(f"iou has {iou.numel()} entries for {p_ldp.shape[0]} masks")
    dtype = _compute_dtype(torch.promote_types(p_ldp.dtype, p_clip.dtype))
    p_l, p_c, iou = p_ldp.to(dtype), p_clip.to(dtype), iou.to(dtype)
    finite = torch.isfinite(iou)
    weight = torch.where(finite, iou.clamp_min(0), torch.ones_like(iou))[:, None]
    big_l, big_c = p_l * weight, p_c * weight
    se_l, se_c = _selection_entropy(big_l), _selection_entropy(big_c)
    total = se_l + se_c
    has = total > 0
    c = torch.where(
        has, se_c / torch.where(has, total, torch.ones_like(total)), total.new_tensor(0.5)
    )
    alpha_hat = (alpha * (1 + c)).clamp(0.0, 1.0)
    beta_hat = (beta * (1 + c)).clamp(0.0, 1.0)
    adaptive = geometric_ensemble(big_l, big_c, seen, alpha_hat, beta_hat)
    if not bool(finite.all()):
        plain = geometric_ensemble(p_l, p_c, seen, alpha, beta)
        adaptive = torch.where(finite[:, None], adaptive, plain)
    return adaptive.to(p_ldp.dtype)
