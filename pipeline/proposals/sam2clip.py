"""SAM image embeddings from the CLIP pass: a trained ``sam2clip`` run (Open-Vocabulary SAM's
SAM2CLIP neck, samcp.models.ovsam) applied to the CLIP levels of an image, so that precompute can
run SAM's prompt encoder and mask decoder without SAM's image encoder (``--sam-features sam2clip``).

The neck reads the levels exactly as the cache stores them (float16, the same arrays the run was
trained on), so an embedding computed here equals the neck applied to the cached ``clip_<level>``
rows of the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from samcp.pipeline.errors import SamcpError

#: How a sam2clip run is made; the fix named by the errors below.
RUN_HINT = "pass --sam2clip-run RUN, a run folder written by samcp train --head sam2clip"


def sam2clip_model_dir(run: str | Path) -> Path:
    """The folder holding the run's weights: ``RUN/model`` (the final model of a run folder) or
    ``RUN`` itself when it holds ``model.safetensors`` and ``config.json`` (e.g. a checkpoint).

    Raises:
        SamcpError: no such folder, or no saved model in it.
    """
    from samcp.models.registry import CONFIG_FILE, WEIGHTS_FILE

    run = Path(run)
    if not run.is_dir():
        raise SamcpError(f"sam2clip run not found: {run}; {RUN_HINT}")
    for d in (run / "model", run):
        if (d / WEIGHTS_FILE).is_file() and (d / CONFIG_FILE).is_file():
            return d
    raise SamcpError(
        f"{run} holds no trained model (model/{WEIGHTS_FILE} and model/{CONFIG_FILE}); finish "
        f"its training (samcp train --head sam2clip), or {RUN_HINT}"
    )


def read_sam2clip_config(run: str | Path):
    """``(model folder, Sam2ClipConfig)`` of a run, from its config.json alone (no weights read).

    Raises:
        SamcpError: not a run, a run of another head, or an unreadable config.
    """
    from samcp.models.ovsam.sam2clip import Sam2ClipConfig
    from samcp.models.registry import CONFIG_FILE

    d = sam2clip_model_dir(run)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        head = meta.get("head")
    except (OSError, ValueError, AttributeError) as exc:
        raise SamcpError(
            f"cannot read {d / CONFIG_FILE} ({type(exc).__name__}); {RUN_HINT}"
        ) from None
    if head != "sam2clip":
        raise SamcpError(f"{run} is a {head or 'unknown'} run, not a sam2clip run; {RUN_HINT}")
    try:
        config = Sam2ClipConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise SamcpError(
            f"{d / CONFIG_FILE} does not hold a sam2clip config ({first}); {RUN_HINT}"
        ) from None
    return d, config


def check_sam2clip_run(
    run: str | Path,
    clip_config,
    clip_channels: dict[str, int] | None,
    sam_model: torch.nn.Module,
) -> dict:
    """Checks that a sam2clip run fits this precompute; returns its identity for the cache.

    Args:
        run: the run folder (``--sam2clip-run``).
        clip_config: the precompute's ``ClipConfig`` (None: no CLIP pass, refused).
        clip_channels: channels of each stored level (``clip_<level>`` -> C) of the loaded CLIP,
            when known.
        sam_model: the SAM whose prompt encoder and mask decoder will decode the embeddings.

    Returns:
        ``{"model_sha256", "clip_levels"}``: the sha256 of the run's model.safetensors and the
        levels its neck reads.

    Raises:
        SamcpError: one line naming what does not fit and the flag that fixes it.
    """
    from samcp.models.registry import WEIGHTS_FILE
    from samcp.pipeline.files import file_sha256

    d, cfg = read_sam2clip_config(run)
    want_levels = ",".join(lv.removeprefix("clip_") for lv in cfg.clip_levels)
    if clip_config is None:
        raise SamcpError(
            "--sam-features sam2clip computes SAM's embedding from the CLIP pass; add "
            f"--clip-checkpoint PATH --clip-levels {want_levels} (the CLIP the run was trained on)"
        )
    stored = {f"clip_{lv}" for lv in clip_config.stored_levels}
    missing = [lv for lv in cfg.clip_levels if lv not in stored]
    if missing:
        have = ",".join(clip_config.stored_levels) or "none (--no-clip-dense)"
        raise SamcpError(
            f"sam2clip run {run} reads the CLIP levels {want_levels} but this cache stores "
            f"{have}; pass --clip-levels {want_levels} (and no --no-clip-dense)"
        )
    if cfg.clip_input_size != clip_config.input_size:
        raise SamcpError(
            f"sam2clip run {run} was trained on CLIP features at input size {cfg.clip_input_size}, "
            f"not {clip_config.input_size}; pass --clip-input-size {cfg.clip_input_size}"
        )
    from samcp.pipeline.clip import LEVEL_STRIDES

    for lv, stride, ch in zip(cfg.clip_levels, cfg.clip_strides, cfg.clip_channels):
        now = (clip_channels or {}).get(lv)
        if stride != LEVEL_STRIDES[lv.removeprefix("clip_")] or (now is not None and now != ch):
            raise SamcpError(
                f"sam2clip run {run} reads {lv} with {ch} channels at stride {stride}, this CLIP "
                f"gives {now} at stride {LEVEL_STRIDES[lv.removeprefix('clip_')]}; pass the "
                "--clip-model and --clip-checkpoint the run was trained on"
            )
    pe = sam_model.prompt_encoder
    if (cfg.sam_dim, cfg.sam_grid) != (pe.embed_dim, pe.image_embedding_size[0]):
        raise SamcpError(
            f"sam2clip run {run} makes {cfg.sam_dim} x {cfg.sam_grid} x {cfg.sam_grid} embeddings "
            f"but the SAM of --sam-checkpoint decodes {pe.embed_dim} x "
            f"{pe.image_embedding_size[0]} x {pe.image_embedding_size[1]}; pass the --sam-model "
            "and --sam-checkpoint whose embeddings the run distilled"
        )
    return {"model_sha256": file_sha256(d / WEIGHTS_FILE), "clip_levels": list(cfg.clip_levels)}


class Sam2ClipFeatures:
    """A trained sam2clip neck on ``device``: CLIP levels of one image -> SAM's image embedding.

    Args:
        run: the run folder (``--sam2clip-run``).
        device: where the neck runs.
    """

    def __init__(self, run: str | Path, device: str | torch.device = "cpu") -> None:
        from safetensors import SafetensorError

        from samcp.models.registry import load_head

        d, _ = read_sam2clip_config(run)
        try:
            self.model, self.config = load_head(d, str(device))
        except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            raise SamcpError(
                f"{d} does not hold a loadable sam2clip model ({type(exc).__name__}: {first}); "
                "re-train it, or restore its model.safetensors and config.json"
            ) from None
        self.device = torch.device(device)

    @property
    def levels(self) -> tuple[str, ...]:
        """The ``clip_<level>`` arrays the neck reads, shallow to deep."""
        return tuple(self.config.clip_levels)

    @torch.inference_mode()
    def embed(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """(1, sam_dim, G, G) float32 embedding on the device from one image's cache arrays
        (``clip_<level>``: (C, h, w) float16, as stored)."""
        levels = [
            torch.from_numpy(np.ascontiguousarray(arrays[lv])).to(self.device).float()[None]
            for lv in self.levels
        ]
        return self.model(levels).embed.float()
