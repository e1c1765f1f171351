"""Loading the frozen foundation models (SAM, CLIP) through their libraries' own code paths.

Real checkpoints go through ``segment_anything.sam_model_registry[arch](checkpoint=PATH)``. Tests and the
demo build tiny, randomly initialised models with segment_anything's own classes, save them in the same
checkpoint format (a torch state dict) and load them back through :func:`load_sam`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.files import file_sha256  # noqa: F401  (re-exported: callers import it here)


@dataclass(frozen=True)
class SamArch:
    """Dimensions of a SAM variant (segment_anything's ``_build_sam`` arguments, plus sizes it fixes)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    prompt_embed_dim: int = 256
    image_size: int = 1024
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_ARCHS: dict[str, SamArch] = {
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    # Test-size SAM: same classes, tiny widths and a 256-pixel input, so the whole code path runs in
    # milliseconds on a CPU. Not a model anyone should use for real proposals.
    "vit_test": SamArch(
        32,
        2,
        2,
        (1,),
        prompt_embed_dim=32,
        image_size=256,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def build_sam_arch(arch: str) -> torch.nn.Module:
    """Builds a randomly initialised SAM of the named architecture from segment_anything's classes."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    a = _arch(arch)
    patch = 16
    emb = a.image_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a.encoder_depth,
            embed_dim=a.encoder_embed_dim,
            img_size=a.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a.encoder_num_heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(a.encoder_global_attn_indexes),
            window_size=14,
            out_chans=a.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(a.image_size, a.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=a.prompt_embed_dim,
                mlp_dim=a.decoder_mlp_dim,
                num_heads=a.decoder_num_heads,
            ),
            transformer_dim=a.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=a.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _arch(arch: str) -> SamArch:
    if arch not in SAM_ARCHS:
        raise SamcpError(
            f"unknown SAM model {arch!r}; choose one of {', '.join(SAM_ARCHS)} (--sam-model)"
        )
    return SAM_ARCHS[arch]


def load_sam(
    arch: str, checkpoint: str | Path, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Loads SAM weights from a checkpoint file in segment_anything's format.

    Args:
        arch: ``vit_h``, ``vit_l`` or ``vit_b`` (segment_anything's registry), or ``vit_test``.
        checkpoint: path to the state-dict checkpoint (e.g. ``sam_vit_h_4b8939.pth``).
        device: where to put the model.

    Raises:
        SamcpError: the file is missing, unreadable, or holds weights of another architecture.
    """
    from segment_anything import sam_model_registry

    _arch(arch)
    path = Path(checkpoint)
    if not path.is_file():
        raise SamcpError(
            f"SAM checkpoint not found: {path}; pass the .pth file of the {arch} model "
            "with --sam-checkpoint"
        )
    try:
        if arch in sam_model_registry:
            model = sam_model_registry[arch](checkpoint=str(path))
        else:
            model = build_sam_arch(arch)
            with open(path, "rb") as f:
                model.load_state_dict(torch.load(f, map_location="cpu"))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SamcpError(
            f"SAM checkpoint {path} does not fit --sam-model {arch} ({first[:120]}); "
            "pass the matching --sam-model"
        ) from None
    except Exception as exc:  # unpickling errors come in many types
        raise SamcpError(
            f"cannot read SAM checkpoint {path} ({type(exc).__name__}: {str(exc)[:120]}); "
            "is it a segment_anything .pth file?"
        ) from None
    return model.to(device).eval()


def make_random_sam_checkpoint(
    path: str | Path, arch: str = "vit_test", seed: int = 0, hypernet_scale: float | None = None
) -> Path:
    """Writes a randomly initialised SAM checkpoint in segment_anything's format.

    A random SAM predicts logits near zero everywhere, so all its masks look alike. Scaling the last
    layer of each output hypernetwork MLP by ``hypernet_scale`` spreads the logits (std about 2), which
    gives distinct masks per prompt and non-trivial stability scores: a far better test model, and
    still a valid checkpoint. The default scale is 30 for the real decoder width and 300 for the
    32-wide test decoder (whose hypernetwork outputs are smaller).
    """
    if hypernet_scale is None:
        hypernet_scale = 30.0 if _arch(arch).prompt_embed_dim >= 256 else 300.0
    torch.manual_seed(seed)
    model = build_sam_arch(arch)
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(hypernet_scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
