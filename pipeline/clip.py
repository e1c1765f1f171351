"""Frozen CLIP features for the proposal cache: dense maps and mask-pooled embeddings (FC-CLIP style).

Models are loaded through open_clip's own path, ``open_clip.create_model(NAME, pretrained=FILE)``; any
open_clip model name loads. Dense features and mask pooling need an image tower whose spatial features
feed the model's own pooling head: open_clip's timm ConvNeXt towers (``convnext_base*``,
``convnext_large_d*``, ``convnext_xxlarge*``), the CLIP that FC-CLIP, SAM-CP and PosSAM use.

Per image (see docs/clip-features.md):

1. resize so the longer side is ``input_size`` (bilinear, antialiased), normalise with the model's
   mean/std, zero-pad bottom/right to ``input_size x input_size``;
2. run the ConvNeXt trunk once; keep the stage outputs ``res2..res5`` (strides 4, 8, 16, 32);
3. pool the final map (``trunk.norm_pre(res5)``) under every proposal mask, mapped into the same padded
   geometry and bilinearly resized to the map's size, then apply the model's own head (timm's
   ``forward_head``: norm; open_clip's ``visual.head``: projection into CLIP space) and L2-normalise:
   FC-CLIP's out-of-vocabulary branch (``MaskPooling`` + ``visual_prediction_forward_convnext``).

Tests build a tiny open_clip model (:data:`TEST_MODEL_CONFIGS`, registered with open_clip's
``add_model_config``), save it with :func:`make_random_clip_checkpoint` and load it back through
:func:`load_clip`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samcp.models.cliphead import (  # noqa: F401  (mask_pool: re-exported)
    ClipHeadWeights,
    mask_pool,
    mask_pool_weights,
    resized_size,
)
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.foundation import file_sha256
from samcp.pipeline.proposals.base import Proposals

DEFAULT_CLIP_MODEL = "convnext_large_d_320"

# Trunk stage outputs that can be stored, by output stride (FC-CLIP's names: res2 is stride 4, ...).
LEVEL_STRIDES: dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

# Names the pooling rule, so that a cache written with another rule has another fingerprint.
MASK_POOLING = "bilinear-v1"

_FP16_MAX = float(np.finfo(np.float16).max)

# Test-size CLIP: convnext_large_d_320's layout (timm ConvNeXt trunk, no extra pooling, MLP projection)
# with timm's smallest ConvNeXt (dims 24/32/48/64) and a 2-layer, 64-wide text tower. Seconds on a CPU;
# not a model for real features.
TEST_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "samcp-test-convnext": {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "test_convnext",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "timm_drop": 0.0,
            "timm_drop_path": 0.0,
            "image_size": 64,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
    # samcp's own synthetic-world CLIP (docs/synthetic-clip.md): the same layout again, trained by
    # `samcp synth-clip` (samcp.pipeline.synthclip) on the 11 classes of `samcp synth` so that
    # mask-pooled features land near their class's text. The trunk is timm's test_convnext (fast
    # enough to train at the cache's 1024 geometry on a CPU); captions are short, so 32 tokens.
    "samcp-synth-convnext": {
        "embed_dim": 64,
        "vision_cfg": {
            "timm_model_name": "test_convnext",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "timm_drop": 0.0,
            "timm_drop_path": 0.0,
            "image_size": 1024,
        },
        "text_cfg": {
            "context_length": 32,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
}


def register_test_models() -> None:
    """Adds :data:`TEST_MODEL_CONFIGS` to open_clip's model registry (idempotent).

    Goes through open_clip's public ``add_model_config``, which reads JSON files; the files are written
    to a temporary folder that is removed again (open_clip keeps the parsed configs in memory).
    """
    import open_clip

    missing = {k: v for k, v in TEST_MODEL_CONFIGS.items() if k not in open_clip.list_models()}
    if not missing:
        return
    with tempfile.TemporaryDirectory(prefix="samcp-clip-configs-") as tmp:
        for name, cfg in missing.items():
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)


def _model_config(model_name: str) -> dict:
    import open_clip

    register_test_models()
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise SamcpError(
            f"CLIP model {model_name!r} names a download or folder source; pass an open_clip model "
            "name (e.g. convnext_large_d_320) with --clip-model and the weights file with --clip-checkpoint"
        )
    # open_clip itself looks names up with '/' replaced ('ViT-B/32' is 'ViT-B-32').
    cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None:
        raise SamcpError(
            f"unknown CLIP model {model_name!r}; pass an open_clip model name such as "
            f"{DEFAULT_CLIP_MODEL} (open_clip.list_models() lists them) with --clip-model"
        )
    return cfg


def load_clip(
    model_name: str, checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """Loads an open_clip model from a local weights file, frozen and in eval mode.

    Args:
        model_name: an open_clip model name (``convnext_large_d_320``, ``ViT-B-16``, ...) or a test
            model from :data:`TEST_MODEL_CONFIGS`.
        checkpoint: the weights file (``open_clip_pytorch_model.bin``, ``.safetensors``, a state-dict
            ``.pt``), passed to ``open_clip.create_model(model_name, pretrained=...)``.
        device: where to put the model.

    Returns:
        The model and its preprocessing config (open_clip's ``get_model_preprocess_cfg``: ``mean``,
        ``std``, ``size``, ...).

    Raises:
        SamcpError: unknown model name, or a checkpoint that is missing, unreadable or of another
            architecture.
    """
    import open_clip

    _model_config(model_name)
    path = Path(checkpoint)
    if not path.is_file():
        raise SamcpError(
            f"CLIP checkpoint not found: {path}; pass the weights file of {model_name} with --clip-checkpoint"
        )
    try:
        # An absolute path can never be mistaken for a pretrained tag (which would be downloaded).
        model = open_clip.create_model(model_name, pretrained=str(path.resolve()), device="cpu")
    except Exception as exc:  # torch and unpickling raise many types; sort by what the file holds
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        # A readable state dict that open_clip could not load (a size mismatch, missing keys, or
        # an assertion in its resizing of position embeddings) means weights of another config.
        mismatch = _checkpoint_mismatch(model_name, path)
        if mismatch is None and "loading state_dict" in text:
            mismatch = first[:120]
        if mismatch is not None:
            raise SamcpError(
                f"CLIP checkpoint {path} does not fit --clip-model {model_name} ({mismatch}); "
                "check --clip-model: it must name the open_clip config the weights were trained "
                "with"
            ) from None
        raise SamcpError(
            f"cannot read CLIP checkpoint {path} ({type(exc).__name__}: {first[:120]}); "
            "is it an open_clip weights file?"
        ) from None
    model = model.to(device).eval().requires_grad_(False)
    return model, dict(open_clip.get_model_preprocess_cfg(model))


def _checkpoint_mismatch(model_name: str, path: Path) -> str | None:
    """How a weights file differs from an open_clip model's parameters, in a few words.

    Returns None when the file is not a readable state dict of tensors, or when its keys and
    shapes all match the model (then something else went wrong).
    """
    from open_clip.factory import load_state_dict

    try:
        # open_clip's own reader: unwraps {"state_dict": ...} and DataParallel's "module." prefix.
        state = load_state_dict(str(path))
    except Exception:  # not a state dict open_clip can read
        return None
    if not isinstance(state, dict) or not state:
        return None
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    want = _parameter_shapes(model_name)
    sizes = [k for k in want if k in got and got[k] != want[k]]
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    parts = []
    if sizes:
        k = sizes[0]
        parts.append(
            f"{len(sizes)} size mismatch{'es' if len(sizes) > 1 else ''}, e.g. {k} is "
            f"{list(got[k])} in the file but {list(want[k])} in the model"
        )
    if missing:
        parts.append(
            f"{len(missing)} missing key{'s' if len(missing) > 1 else ''}, e.g. {missing[0]}"
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''}, "
            f"e.g. {unexpected[0]}"
        )
    return ", ".join(parts) or None


def _parameter_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of an open_clip model's state dict, built without weights where torch allows."""
    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that the model is randomly initialised
    try:
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation
                model = open_clip.create_model(model_name, device="meta")
        except Exception:
            model = open_clip.create_model(model_name)
    finally:
        root.setLevel(level)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def make_random_clip_checkpoint(
    path: str | Path, model_name: str = "samcp-test-convnext", seed: int = 0
) -> Path:
    """Writes a randomly initialised open_clip model's state dict, loadable by :func:`load_clip`."""
    import open_clip

    _model_config(model_name)
    torch.manual_seed(seed)
    # No `pretrained`: random init, nothing downloaded. open_clip warns about exactly that on the root
    # logger, which is the point here, so it is silenced for this call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(model_name)
    finally:
        root.setLevel(level)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


@dataclass(frozen=True)
class ClipConfig:
    """Which frozen-CLIP features to compute and store.

    model: open_clip model name; dense features need a timm ConvNeXt tower (default: the ConvNeXt-L
        CLIP of FC-CLIP, SAM-CP and PosSAM).
    checkpoint: path to the model's weights file.
    input_size: the fixed input geometry: the image is resized so its longer side is input_size and
        zero-padded (after normalisation) to input_size x input_size. Multiple of 32. Default 1024, the
        1024x1024 input of FC-CLIP's COCO training.
    levels: trunk stage outputs stored as ``clip_<level>`` maps, from res2 (stride 4), res3 (8),
        res4 (16), res5 (32). ConvNeXt-L channels are 192, 384, 768, 1536.
    store_dense: store the dense maps; False keeps only the per-mask embeddings.
    mask_chunk: masks pooled per batched op. Peak memory is about mask_chunk * input_size^2 * 4 bytes
        (128 MiB at 32 and 1024); higher may be faster on a GPU.
    """

    model: str = DEFAULT_CLIP_MODEL
    checkpoint: str | Path | None = None
    input_size: int = 1024
    levels: tuple[str, ...] = ("res5",)
    store_dense: bool = True
    mask_chunk: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        if self.input_size < 32 or self.input_size % 32:
            raise SamcpError(
                f"CLIP input size {self.input_size} is not a positive multiple of 32; "
                "pass e.g. 1024 or 768"
            )
        bad = [lv for lv in self.levels if lv not in LEVEL_STRIDES]
        if bad:
            raise SamcpError(
                f"unknown CLIP level(s) {', '.join(bad)}; choose from {', '.join(LEVEL_STRIDES)} "
                "(--clip-levels)"
            )
        if len(set(self.levels)) != len(self.levels):
            raise SamcpError(f"CLIP levels repeat: {', '.join(self.levels)}; name each level once")
        if self.mask_chunk < 1:
            raise SamcpError(f"CLIP mask_chunk must be at least 1, got {self.mask_chunk}")

    @property
    def stored_levels(self) -> tuple[str, ...]:
        """The levels written to the cache (none when ``store_dense`` is off), in stride order."""
        if not self.store_dense:
            return ()
        return tuple(sorted(self.levels, key=LEVEL_STRIDES.__getitem__))

    def cache_attrs(self, checkpoint_sha256: str | None = None) -> dict:
        """The cache root's ``clip`` attribute (JSON types only; part of the cache fingerprint).

        Args:
            checkpoint_sha256: the checkpoint's sha256; computed from ``checkpoint`` when omitted.
        """
        if checkpoint_sha256 is None:
            if self.checkpoint is None:
                raise SamcpError("no CLIP checkpoint given; pass one with --clip-checkpoint")
            checkpoint_sha256 = file_sha256(self.checkpoint)
        levels = list(self.stored_levels)
        return {
            "model": self.model,
            "checkpoint_sha256": checkpoint_sha256,
            "input_size": self.input_size,
            "levels": levels,
            "strides": {lv: LEVEL_STRIDES[lv] for lv in levels},
            "store_dense": self.store_dense,
            "embed_dim": int(_model_config(self.model)["embed_dim"]),
            "mask_pooling": MASK_POOLING,
        }


def _convnext_trunk(model: torch.nn.Module, model_name: str):
    """The timm ConvNeXt trunk of an open_clip model, or a SamcpError naming what is supported."""
    from open_clip.timm_model import TimmModel
    from timm.models.convnext import ConvNeXt

    visual = getattr(model, "visual", None)
    if (
        isinstance(visual, TimmModel)
        and isinstance(visual.trunk, ConvNeXt)
        and "pool" not in dict(visual.head.named_children())
    ):
        return visual.trunk
    kind = type(visual).__name__
    if isinstance(visual, TimmModel):
        kind = f"timm {type(visual.trunk).__name__}"
    raise SamcpError(
        f"CLIP model {model_name!r} has a {kind} image tower; dense features and mask pooling "
        "support open_clip's timm ConvNeXt towers (convnext_base*, convnext_large_d*, "
        "convnext_xxlarge*): pass one of those with --clip-model"
    )


class ClipFeatureExtractor:
    """Computes the cache's CLIP arrays for one image and its proposals.

    Args:
        config: what to compute.
        device: where to run; the model is moved there.
        model: an already-built open_clip model to use instead of loading ``config.checkpoint``
            (benchmarks, or a caller that loaded it once).
    """

    def __init__(
        self,
        config: ClipConfig,
        device: str | torch.device = "cpu",
        model: torch.nn.Module | None = None,
    ) -> None:
        import open_clip

        self.config = config
        if model is None:
            if config.checkpoint is None:
                raise SamcpError("no CLIP checkpoint given; pass one with --clip-checkpoint")
            model, pp = load_clip(config.model, config.checkpoint, device)
        else:
            model = model.to(device).eval().requires_grad_(False)
            pp = open_clip.get_model_preprocess_cfg(model)
        self.model = model
        self.device = torch.device(device)
        self.trunk = _convnext_trunk(model, config.model)
        self.proj = model.visual.head
        self.mean = torch.tensor(pp["mean"], dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(pp["std"], dtype=torch.float32, device=self.device).view(3, 1, 1)
        reductions = [int(info["reduction"]) for info in self.trunk.feature_info]
        self._stage_index = {
            lv: reductions.index(s) for lv, s in LEVEL_STRIDES.items() if s in reductions
        }
        missing = [lv for lv in config.stored_levels if lv not in self._stage_index]
        if missing:
            raise SamcpError(
                f"CLIP model {config.model!r} has no stage output for {', '.join(missing)} "
                f"(its strides are {reductions}); choose other --clip-levels"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the image inside the padded input: longer side = input_size."""
        return resized_size(height, width, self.config.input_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, S, S) normalised, resized and zero-padded input on the device."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SamcpError(
                f"CLIP input must be an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}; "
                "convert it when reading"
            )
        s = self.config.input_size
        h, w = self.resized_size(*image.shape[:2])
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        x = x.permute(2, 0, 1)[None].float().div_(255.0)
        if (h, w) != tuple(image.shape[:2]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.pad(x, (0, s - w, 0, s - h))

    def mask_weights(self, masks: torch.Tensor, feat_hw: tuple[int, int]) -> torch.Tensor:
        """Pooling weights (m, fh*fw) of masks (m, H, W) given at the original image size
        (:func:`samcp.models.cliphead.mask_pool_weights` at this CLIP's input size)."""
        return mask_pool_weights(masks, self.config.input_size, feat_hw)

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(M, C) mask-pooled trunk features -> (M, D) L2-normalised CLIP embeddings.

        The model's own head on a 1x1 map (FC-CLIP's ``visual_prediction_forward_convnext``): timm's
        ``forward_head`` (global pool of 1x1 = identity, LayerNorm) then open_clip's projection.
        """
        x = self.trunk.forward_head(pooled[:, :, None, None])
        return F.normalize(self.proj(x), dim=-1)

    @torch.inference_mode()
    def dense_features(self, image: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One trunk pass: the final map to pool (C, fh, fw) and the stored levels' maps.

        The final map is ``trunk.norm_pre(res5)``, FC-CLIP's ``clip_vis_dense`` (``norm_pre`` is the
        identity for open_clip's ConvNeXt towers, so it equals ``res5``).
        """
        x = self.preprocess(image)
        levels = self.config.stored_levels
        indices = sorted({self._stage_index[lv] for lv in levels} | {len(self.trunk.stages) - 1})
        final, inter = self.trunk.forward_intermediates(x, indices=indices, norm=False)
        by_index = dict(zip(indices, inter))
        return final[0], {lv: by_index[self._stage_index[lv]][0] for lv in levels}

    @torch.inference_mode()
    def mask_embeddings(self, dense: torch.Tensor, proposals: Proposals) -> torch.Tensor:
        """(M, D) float32 L2-normalised embeddings of the proposals pooled from ``dense`` (C, fh, fw).

        Masks are decoded, resized and pooled ``config.mask_chunk`` at a time, each chunk in one
        batched op; the head then runs once on all pooled features.
        """
        dense = dense.float()
        c, fh, fw = dense.shape
        flat = dense.reshape(c, fh * fw)
        # Zero proposals give a (0, C) batch, which the head maps to (0, D).
        pooled = [flat.new_zeros((0, c))]
        chunk = self.config.mask_chunk
        h, w = proposals.height, proposals.width
        for i in range(0, len(proposals), chunk):
            masks = Proposals(h, w, proposals.rles[i : i + chunk]).decode()
            wts = self.mask_weights(torch.from_numpy(masks).to(self.device), (fh, fw))
            pooled.append(mask_pool(flat, wts))
        return self.embed_pooled(torch.cat(pooled))

    @torch.inference_mode()
    def extract(
        self, image: np.ndarray, proposals: Proposals
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """CLIP arrays of one image: one trunk pass, all masks pooled from its final map.

        Args:
            image: HxWx3 uint8 RGB.
            proposals: the image's masks (RLE at the original size).

        Returns:
            ``(image_arrays, mask_arrays)``: ``{"clip_<level>": (C, h, w) float16}`` for the stored
            levels (empty when ``store_dense`` is off) and ``{"clip_mask_embed": (M, D) float16}``.
        """
        height, width = image.shape[:2]
        if (proposals.height, proposals.width) != (height, width):
            raise SamcpError(
                f"proposals are for a {proposals.height}x{proposals.width} image but the image is "
                f"{height}x{width}; regenerate the proposals for this image"
            )
        dense, levels = self.dense_features(image)
        emb = self.mask_embeddings(dense, proposals)
        image_arrays = {f"clip_{lv}": _to_fp16(t) for lv, t in levels.items()}
        return image_arrays, {"clip_mask_embed": _to_fp16(emb)}


def _to_fp16(t: torch.Tensor) -> np.ndarray:
    # Clamp so that an outlier activation becomes the largest float16, not inf.
    return t.float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).cpu().numpy()


def export_clip_head(model: torch.nn.Module, input_size: int) -> ClipHeadWeights | None:
    """The frozen head that turns mask-pooled final-map features into CLIP embeddings (timm's
    ConvNeXt ``head.norm`` and open_clip's ``visual.head`` projection), as plain arrays for the
    cache's ``clip_head`` group; None when the tower's head has another layout (the cache then
    has no ``clip_head`` and heads fall back to the cached per-proposal embeddings).

    Args:
        model: a loaded open_clip model with a timm ConvNeXt tower.
        input_size: the cache's CLIP input size (the pooling geometry).
    """
    from timm.layers import LayerNorm2d

    visual = getattr(model, "visual", None)
    trunk_head = getattr(getattr(visual, "trunk", None), "head", None)
    norm = getattr(trunk_head, "norm", None)
    plain = all(
        isinstance(getattr(trunk_head, name, torch.nn.Identity()), torch.nn.Identity)
        for name in ("pre_logits", "fc")
    )
    if not isinstance(norm, (LayerNorm2d, torch.nn.LayerNorm)) or not plain:
        return None
    children = dict(visual.head.named_children())

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    tensors = {"norm_weight": arr(norm.weight), "norm_bias": arr(norm.bias)}
    if isinstance(children.get("proj"), torch.nn.Linear):
        kind = "linear"
        tensors["proj_weight"] = arr(children["proj"].weight)
        if children["proj"].bias is not None:
            tensors["proj_bias"] = arr(children["proj"].bias)
    elif "mlp" in children:
        mlp = children["mlp"]
        if not isinstance(getattr(mlp, "act", None), torch.nn.GELU) or not isinstance(
            getattr(mlp, "norm", torch.nn.Identity()), torch.nn.Identity
        ):
            return None
        kind = "mlp"
        tensors.update(fc1_weight=arr(mlp.fc1.weight), fc1_bias=arr(mlp.fc1.bias))
        tensors["fc2_weight"] = arr(mlp.fc2.weight)
        if mlp.fc2.bias is not None:
            tensors["fc2_bias"] = arr(mlp.fc2.bias)
    else:
        return None
    return ClipHeadWeights(kind, float(norm.eps), tensors, int(input_size), "clip_res5")
