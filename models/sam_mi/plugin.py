"""SAM-MI as a samcp head plugin (see samcp.models.heads); built on the costagg plugin."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from ..costagg.plugin import CostAggPlugin
from ..heads import CacheInfo, GroundTruth, ImageInputs
from ..registry import register_head
from ..sam_decoder import SAM_DECODER_SIZES
from .config import RANDOM_SAM, SamMiConfig
from .data import SAM_FLAG, SamMiSample, collate, flip_sample, make_sample
from .losses import SamMiCriterion
from .model import SamMiNet, build_sam_mi_head

_DEFAULTS = SamMiConfig()
#: state-dict prefixes of the parts the config can switch off
_SWITCHABLE = ("low.", "high.")


def _get(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, getattr(_DEFAULTS, name))


def find_saved_weights(path: str | Path) -> Path:
    """The weights file of a saved SAM-MI head: ``path`` may be a saved model folder
    (model.safetensors + config.json), a finished run (its ``model/``) or an unfinished run (its
    latest checkpoint).

    Raises:
        ValueError: nothing of the kind there, or it is another head's.
    """
    p = Path(path)
    candidates = [p, p / "model"]
    checkpoints = sorted((p / "checkpoints").glob("step_???????"))
    if checkpoints:
        candidates.append(checkpoints[-1])
    for folder in candidates:
        weights, config = folder / "model.safetensors", folder / "config.json"
        if weights.is_file() and config.is_file():
            head = json.loads(config.read_text()).get("head")
            if head != "sam_mi":
                raise ValueError(f"init_from {p} holds a {head!r} head, not sam_mi")
            return weights
    raise ValueError(
        f"init_from {p}: no saved sam_mi head there (a run folder from samcp train, or its "
        "model/ folder)"
    )


def load_init_weights(module: SamMiNet, path: str | Path) -> list[str]:
    """Copy a saved SAM-MI head's weights into ``module``, except its SAM decoder (the frozen
    SAM comes from ``sam_checkpoint``: a stage-1 run has none) and injections ``module`` does not
    have. Returns the keys loaded.

    Raises:
        ValueError: the saved head's parameters do not match (another architecture config).
    """
    weights = find_saved_weights(path)
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("sam.")}
    # The injections a run switches off (low_injection / high_injection) may exist in the saved
    # head (a stage-1 run builds them untrained): they are skipped, anything else must match.
    state = {
        k: v
        for k, v in load_file(str(weights)).items()
        if not k.startswith("sam.") and (k in own or not k.startswith(_SWITCHABLE))
    }
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        )
        raise ValueError(
            f"init_from {weights.parent} does not fit this head's config ({detail}); use the same "
            "architecture fields as the run it starts from"
        )
    module.load_state_dict(state, strict=False)
    return sorted(state)


@register_head
class SamMiPlugin(CostAggPlugin):
    """SAM-MI: TSPP, online SAM, SMAgg and DMI on the cost-aggregation head (semantic only)."""

    name = "sam_mi"
    config_cls = SamMiConfig
    summary = (
        "SAM-MI: text-guided sparse point prompts for SAM on cached sam_embed, shallow mask "
        "aggregation, low/high-frequency mask injection into the cost-aggregation head"
    )
    outputs = ("semantic",)
    # SAM-MI sec. 4.1: AdamW, lr 2e-4 (CAT-Seg's recipe, whose weight decay and clipping apply).
    train_defaults = {"lr": 2e-4, "weight_decay": 1e-4, "clip_grad": 0.01}
    inference_fields = ("point_seed", "max_points", "alpha_sma", "mask_threshold")

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        out = super().configure(config, cache)
        level = _get(config, "clip_level")
        stride = cache.clip_strides.get(level)
        if stride:
            out["cost_grid"] = int(cache.clip_input_size // stride)
        stage, prompter = _get(config, "stage"), _get(config, "prompter")
        if cache.sam_embed_shape is not None:
            dim, grid, grid2 = (int(v) for v in cache.sam_embed_shape)
            arch = _get(config, "sam_arch")
            want = SAM_DECODER_SIZES[arch].dim if arch in SAM_DECODER_SIZES else None
            if stage == 2 and prompter == "tspp" and want is not None and want != dim:
                fits = [a for a, d in SAM_DECODER_SIZES.items() if d.dim == dim]
                raise ValueError(
                    f"the cache's sam_embed has {dim} channels but sam_arch {arch}'s decoder "
                    f"takes {want}: --set sam_arch={fits[0] if fits else '...'} (the SAM that "
                    "made the cache)"
                )
            if grid != grid2:
                raise ValueError(f"the cache's sam_embed is not square: {cache.sam_embed_shape}")
            out.update(sam_dim=dim, sam_grid=grid)
        elif stage == 2 and prompter == "tspp":
            raise ValueError(f"the cache has no SAM embeddings (sam_embed); {SAM_FLAG}")
        return out

    def needs(self, config: SamMiConfig) -> tuple[list[str], list[str]]:
        arrays, per_mask = super().needs(config)
        if config.uses_sam:
            arrays = [*arrays, "sam_embed"]
        return arrays, per_mask

    def build(self, config: SamMiConfig) -> nn.Module:
        return build_sam_mi_head(config)

    def init_from_cache(self, module: nn.Module, config: SamMiConfig, cache: CacheInfo) -> None:
        """The cache's frozen CLIP head (as costagg), the SAM decoder from ``sam_checkpoint``
        (stage 2 with TSPP) and, with ``init_from``, the weights of an earlier run."""
        super().init_from_cache(module.costagg, config, cache)
        if module.sam is not None:
            if not config.sam_checkpoint:
                raise ValueError(
                    "sam_mi runs SAM on TSPP's points: pass the SAM checkpoint the cache's "
                    "sam_embed was made with (--set sam_checkpoint=PATH sam_arch=vit_h|vit_l|"
                    "vit_b), or --set prompter=grid"
                )
            if config.sam_checkpoint != RANDOM_SAM:
                try:
                    module.sam.load_checkpoint(config.sam_checkpoint)
                except FileNotFoundError as exc:
                    raise ValueError(f"{exc.strerror}: {exc.filename}") from None
        if config.init_from:
            load_init_weights(module, config.init_from)

    def sample(
        self,
        inputs: ImageInputs,
        config: SamMiConfig,
        max_masks: int,
        gt: GroundTruth | None = None,
    ) -> SamMiSample:
        return make_sample(inputs, config, max_masks, gt)

    def augment(self, sample: SamMiSample, config: SamMiConfig, flip: bool, rng=None):
        out = flip_sample(sample) if flip else sample
        if rng is not None:  # a fresh, reproducible point draw every step
            out = replace(out, seed=int(rng.integers(1 << 31)))
        return out

    def collate(self, samples, text_embed: Tensor, config: SamMiConfig, device) -> dict:
        return collate(list(samples), text_embed, config, device)

    def param_groups(self, module: nn.Module, config: SamMiConfig, lr: float) -> list[dict]:
        """Stage 2 trains TSPP "with a reduced learning rate" (sec. 3.5; the factor is not given):
        ``lr * tspp_lr_mult`` for TSPP, ``lr`` for the rest. Stage 1: one group."""
        if config.stage == 1:
            return [{"params": list(module.parameters())}]
        tspp = list(module.tspp.parameters())
        ids = {id(p) for p in tspp}
        rest = [p for p in module.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": tspp, "lr": lr * config.tspp_lr_mult}]

    def criterion(self, config: SamMiConfig) -> nn.Module:
        return SamMiCriterion(config)

    def num_masks(self, sample: SamMiSample) -> int:
        return 0 if sample.masks is None else int(sample.masks.shape[0])

    def infer(self, outputs, samples: Sequence[SamMiSample], config, ctx):
        """As costagg: the per-pixel argmax of the logits (stage 1: of TSPP's text masks)."""
        return super().infer(outputs, samples, config, ctx)
