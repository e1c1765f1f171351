"""Loading the frozen foundation models (SAM, CLIP) through their libraries' own code paths.

Real checkpoints go through ``segment_anything.sam_model_registry[arch](checkpoint=PATH)``. Tests and the
demo build tiny, randomly initialised models with segment_anything's own classes, save them in the same
checkpoint format (a torch state dict, :func:`write_random_sam_checkpoint`) and load them back through
:func:`load_sam`. segment_anything's registry builders take no widths, so the test-size architectures
are samcp names (``vit_tiny``, ``vit_test``) in :data:`SAM_ARCHS`: :func:`load_sam` builds them from
the same segment_anything classes and loads the state dict into them, as the registry does for
``vit_b``/``vit_l``/``vit_h``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
    # Tiny SAM with the real interface: 1024-pixel input, a (256, 64, 64) image embedding and the
    # real mask decoder, but a 2-block, 32-wide, 1-head encoder (one windowed block, one global), so
    # that a 1024-pixel image encodes in about 0.25 s on one CPU core. For the demo and tests (random
    # weights, write_random_sam_checkpoint); its embeddings have the shape of real ones, not their
    # meaning.
    "vit_tiny": SamArch(32, 2, 1, (1,)),
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
        arch: ``vit_h``, ``vit_l`` or ``vit_b`` (segment_anything's registry), or samcp's test-size
            ``vit_tiny`` / ``vit_test`` (built from segment_anything's classes, see SAM_ARCHS).
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
        held = _checkpoint_arch(path)
        fix = (
            f"it holds a {held} model: pass --sam-model {held}"
            if held and held != arch
            else "pass the matching --sam-model"
        )
        raise SamcpError(
            f"SAM checkpoint {path} does not fit --sam-model {arch} ({first[:120]}); {fix}"
        ) from None
    except Exception as exc:  # unpickling errors come in many types
        raise SamcpError(
            f"cannot read SAM checkpoint {path} ({type(exc).__name__}: {str(exc)[:120]}); "
            "is it a segment_anything .pth file?"
        ) from None
    return model.to(device).eval()


def _checkpoint_arch(path: Path) -> str | None:
    """The SAM_ARCHS name whose encoder width, depth, embedding width and input size the state dict
    at ``path`` has, or None (unreadable, or no match). Only for error messages."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # not a zip checkpoint: no mmap
            sd = torch.load(path, map_location="cpu", weights_only=True)
        width = sd["image_encoder.patch_embed.proj.weight"].shape[0]
        depth = len({k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")})
        out = sd["image_encoder.neck.0.weight"].shape[0]
        size = sd["image_encoder.pos_embed"].shape[1] * 16
    except Exception:
        return None
    for name, a in SAM_ARCHS.items():
        if (a.encoder_embed_dim, a.encoder_depth, a.prompt_embed_dim, a.image_size) == (
            width,
            depth,
            out,
            size,
        ):
            return name
    return None


#: The architecture :func:`write_random_sam_checkpoint` writes with ``tiny=True``, per ``model``:
#: vit_b, vit_l and vit_h differ only in their encoder, so their tiny version is the same one.
TINY_SAM_ARCHS = {
    "vit_h": "vit_tiny",
    "vit_l": "vit_tiny",
    "vit_b": "vit_tiny",
    "vit_tiny": "vit_tiny",
    "vit_test": "vit_test",
}


def write_random_sam_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    model: str = "vit_b",
    tiny: bool = True,
    hypernet_scale: float | None = None,
) -> Path:
    """Writes a randomly initialised SAM checkpoint in segment_anything's format; returns ``path``.

    The file is a ``torch.save``'d state dict, like ``sam_vit_b_01ec64.pth``, loaded by
    ``load_sam(arch, path)`` (``--sam-model arch --sam-checkpoint path``) where ``arch`` is ``model``,
    or with ``tiny=True`` the test-size architecture ``TINY_SAM_ARCHS[model]``: ``vit_tiny`` for
    vit_b/l/h (same 1024-pixel input, (256, 64, 64) image embedding and mask decoder as the real
    models, a tiny encoder: about 0.25 s per 1024-pixel image on one CPU core). segment_anything's
    registry has no tiny builder, so ``vit_tiny`` is a samcp name that :func:`load_sam` builds from
    segment_anything's own classes before loading the state dict.

    A random SAM predicts logits near zero everywhere, so all its masks look alike. The last layer of
    each output hypernetwork MLP (``mask_decoder.output_hypernetworks_mlps.*.layers.2.weight``) is
    scaled by ``hypernet_scale``, which spreads the logits (std about 2): distinct masks per prompt and
    non-trivial stability scores, a far better test model, and still a valid checkpoint. The default
    scale is 30 for the real decoder width (256) and 300 for the 32-wide ``vit_test`` decoder (whose
    hypernetwork outputs are smaller).

    The same arguments give byte-identical files (the global torch RNG is left as it was). The file
    is written under a temporary folder next to ``path`` and renamed into place, so ``path`` is
    either absent or complete.

    Raises:
        SamcpError: an unknown ``model``.
    """
    if tiny:
        if model not in TINY_SAM_ARCHS:
            raise SamcpError(
                f"no tiny version of SAM model {model!r}; choose one of {', '.join(TINY_SAM_ARCHS)}"
            )
        arch = TINY_SAM_ARCHS[model]
    else:
        arch = model
    a = _arch(arch)
    if hypernet_scale is None:
        hypernet_scale = 30.0 if a.prompt_embed_dim >= 256 else 300.0
    with torch.random.fork_rng(devices=[]):  # parameters are built on the CPU: seed only its RNG
        torch.random.default_generator.manual_seed(seed)
        sam = build_sam_arch(arch)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(hypernet_scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.save names the records inside the zip after the file, so save under the final name in
    # a private folder, then rename: the bytes do not depend on the temporary location.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.save(sam.state_dict(), tmp_dir / path.name)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def make_random_sam_checkpoint(
    path: str | Path, arch: str = "vit_test", seed: int = 0, hypernet_scale: float | None = None
) -> Path:
    """:func:`write_random_sam_checkpoint` of exactly ``arch`` (``tiny=False``)."""
    return write_random_sam_checkpoint(
        path, seed=seed, model=arch, tiny=False, hypernet_scale=hypernet_scale
    )
