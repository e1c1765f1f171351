"""Proposal generators. All produce :class:`~samcp.pipeline.proposals.base.Proposals`.

``sam`` (SAM everything mode), ``slic`` (superpixels) and ``external`` (imported JSON). A
:class:`ProposalConfig` is small and picklable so that Ray workers can build their own generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.proposals.base import Proposals
from samcp.pipeline.proposals.sam_params import SamEverythingParams
from samcp.pipeline.proposals.slic import SlicParams

SOURCES = ("sam", "slic", "external")

#: Where SAM's image embedding comes from: SAM's own image encoder, or a trained sam2clip run's
#: neck applied to the image's CLIP levels (Open-Vocabulary SAM's SAM2CLIP; the encoder is skipped).
SAM_FEATURES = ("sam", "sam2clip")


@dataclass(frozen=True)
class ProposalConfig:
    """Which proposal source to run and its settings.

    ``sam_model`` / ``sam_checkpoint`` name the SAM that makes ``sam`` proposals, and the SAM whose
    image embedding is stored (``store_sam_embeddings``) for any source: with ``slic`` or
    ``external`` proposals, SAM then runs only its image encoder, for the embedding.

    ``sam_features`` says where SAM's image embedding comes from: ``sam`` (SAM's image encoder) or
    ``sam2clip``: the neck of the trained sam2clip run ``sam2clip_run`` applied to the image's CLIP
    levels (the CLIP pass of precompute), SAM's image encoder skipped; SAM's prompt encoder and mask
    decoder still come from ``sam_checkpoint``.
    """

    source: str = "slic"
    sam_model: str = "vit_h"
    sam_checkpoint: str | None = None
    sam: SamEverythingParams = field(default_factory=SamEverythingParams)
    slic: SlicParams = field(default_factory=SlicParams)
    external_path: str | None = None
    sam_features: str = "sam"
    sam2clip_run: str | None = None

    def uses_sam(self, store_sam_embeddings: bool = False) -> bool:
        """True when the run loads SAM: SAM proposals, or SAM embeddings for any source."""
        return self.source == "sam" or bool(store_sam_embeddings)

    def validate(self, store_sam_embeddings: bool = False) -> None:
        """Raises SamcpError for settings that cannot work, before any worker starts."""
        from pathlib import Path

        if self.source not in SOURCES:
            raise SamcpError(
                f"unknown proposal source {self.source!r}; use one of {', '.join(SOURCES)}"
            )
        if self.source == "sam" and not self.sam_checkpoint:
            raise SamcpError(
                "--proposals sam needs --sam-checkpoint PATH (a segment_anything .pth file); "
                "without SAM weights use --proposals slic"
            )
        if store_sam_embeddings and not self.sam_checkpoint:
            raise SamcpError(
                "--store-sam-embeddings needs SAM proposals or SAM weights: add --sam-checkpoint "
                "PATH (a segment_anything .pth file, and its --sam-model) to compute the embedding "
                f"with SAM's encoder next to the {self.source} proposals, or drop "
                "--store-sam-embeddings"
            )
        if self.uses_sam(store_sam_embeddings) and not Path(self.sam_checkpoint).is_file():
            raise SamcpError(
                f"SAM checkpoint not found: {self.sam_checkpoint}; check --sam-checkpoint"
            )
        if self.source == "external" and not self.external_path:
            raise SamcpError(
                "--proposals external needs --external PATH (folder or COCO results JSON)"
            )
        if self.sam_features not in SAM_FEATURES:
            raise SamcpError(
                f"unknown SAM features {self.sam_features!r}; use one of {', '.join(SAM_FEATURES)}"
            )
        if self.sam_features == "sam2clip":
            if not self.uses_sam(store_sam_embeddings):
                raise SamcpError(
                    "--sam-features sam2clip replaces SAM's image embedding, which --proposals "
                    f"{self.source} alone does not use; pass --proposals sam (everything mode on "
                    "SAM2CLIP embeddings) or add --store-sam-embeddings"
                )
            if not self.sam2clip_run:
                raise SamcpError(
                    "--sam-features sam2clip needs --sam2clip-run RUN, a run folder written by "
                    "samcp train --head sam2clip"
                )
        elif self.sam2clip_run:
            raise SamcpError(
                "--sam2clip-run is read only with --sam-features sam2clip; add --sam-features "
                "sam2clip, or drop --sam2clip-run"
            )

    def cache_attrs(
        self,
        checkpoint_sha256: str | None = None,
        store_sam_embeddings: bool = False,
        sam2clip: dict | None = None,
    ) -> dict:
        """Root attributes describing the proposals and the SAM used (compared on resume).

        ``sam`` records the SAM that ran: for SAM proposals its model, checkpoint and everything-mode
        parameters; for SAM embeddings next to other proposals its model and checkpoint with
        ``params`` null (only the encoder ran); else null. With ``sam_features`` sam2clip it also
        holds ``features: "sam2clip"`` and ``sam2clip``: the run's identity (the ``sam2clip``
        argument, from :func:`samcp.pipeline.proposals.sam2clip.check_sam2clip_run`). SAM's own
        encoder leaves both out, so caches made before the option keep their fingerprint.
        """
        attrs: dict = {"proposals": {"source": self.source}, "sam": None}
        if self.source == "sam":
            attrs["proposals"]["params"] = self.sam.cache_params()
            attrs["sam"] = {
                "model": self.sam_model,
                "checkpoint_sha256": checkpoint_sha256,
                "params": self.sam.cache_params(),
            }
        elif self.source == "slic":
            attrs["proposals"]["params"] = self.slic.cache_params()
        else:
            attrs["proposals"]["params"] = {"path": str(self.external_path)}
        if self.source != "sam" and store_sam_embeddings:
            attrs["sam"] = {
                "model": self.sam_model,
                "checkpoint_sha256": checkpoint_sha256,
                "params": None,
            }
        if attrs["sam"] is not None and self.sam_features == "sam2clip":
            attrs["sam"]["features"] = "sam2clip"
            attrs["sam"]["sam2clip"] = sam2clip
        return attrs


class ProposalSource:
    """A built generator with one call for every source: ``(image, record) -> Proposals``.

    With ``sam_embeddings`` SAM is loaded for any source, so that calls can also return its image
    embedding; for ``slic`` and ``external`` proposals that is an encoder pass of its own, computed
    exactly as for SAM proposals (:func:`~samcp.pipeline.proposals.sam_encoder.embed_image`).
    With ``sam_features`` sam2clip the caller passes the embedding (``features``) instead, and SAM's
    image encoder stays on the CPU, unused; only its prompt encoder and mask decoder go to
    ``device``.
    """

    def __init__(
        self, config: ProposalConfig, device: str = "cpu", sam_embeddings: bool = False
    ) -> None:
        self.config = config
        self.device = device
        self.sam_model = None
        if config.uses_sam(sam_embeddings):
            self._load_sam()
        if config.source == "sam":
            from samcp.pipeline.proposals.sam import SamEverythingGenerator

            self._gen = SamEverythingGenerator(self.sam_model, config.sam)
        elif config.source == "slic":
            from samcp.pipeline.proposals.slic import SlicGenerator

            self._gen = SlicGenerator(config.slic)
        else:
            from samcp.pipeline.proposals.external import ExternalGenerator

            self._gen = ExternalGenerator(config.external_path)

    def _load_sam(self) -> None:
        from samcp.pipeline.foundation import load_sam

        if not self.config.sam_checkpoint:
            self.config.validate(store_sam_embeddings=True)  # raises, naming --sam-checkpoint
        if self.config.sam_features == "sam2clip":
            model = load_sam(self.config.sam_model, self.config.sam_checkpoint, "cpu")
            # Sam.device is its pixel_mean's; the (large, unused) image encoder is not moved.
            for part in (model.prompt_encoder, model.mask_decoder):
                part.to(self.device)
            model.pixel_mean = model.pixel_mean.to(self.device)
            model.pixel_std = model.pixel_std.to(self.device)
            self.sam_model = model
        else:
            self.sam_model = load_sam(
                self.config.sam_model, self.config.sam_checkpoint, self.device
            )

    def __call__(
        self,
        image: np.ndarray | None,
        record,
        with_sam_embedding: bool = False,
        features=None,
    ) -> tuple[Proposals, np.ndarray | None]:
        """Proposals for one image, and SAM's image embedding if asked: from the same encoder pass
        for SAM proposals, from an embedding-only SAM pass for the others.

        ``features``: a (1, C, G, G) torch tensor used as SAM's image embedding instead of running
        SAM's image encoder (SAM2CLIP's, ``sam_features`` sam2clip): SAM proposals decode it, and it
        is the returned embedding.
        """
        if self.config.source == "sam":
            from samcp.pipeline.proposals.sam_encoder import sam_embed_array

            if with_sam_embedding:
                props, feats = self._gen.generate(image, return_embedding=True, features=features)
                return props, sam_embed_array(feats)
            return self._gen.generate(image, features=features), None
        if self.config.source == "external":
            props = self._gen.generate_for(
                record.image_id, record.file_name, record.height, record.width
            )
        else:
            props = self._gen.generate(image)
        if not with_sam_embedding:
            return props, None
        if features is not None:
            from samcp.pipeline.proposals.sam_encoder import sam_embed_array

            return props, sam_embed_array(features)
        return props, self.sam_embedding(image)

    def sam_embedding(self, image: np.ndarray) -> np.ndarray:
        """SAM's float16 image embedding ((256, 64, 64) for vit_b/l/h and vit_tiny) of one HxWx3
        uint8 RGB image, from an encoder-only pass (SAM is loaded on first use if the source was
        built without it)."""
        import torch

        from samcp.pipeline.proposals.sam_encoder import embed_image, sam_embed_array

        if self.sam_model is None:
            self._load_sam()
        with torch.inference_mode():
            features, _ = embed_image(self.sam_model, image)
        return sam_embed_array(features)
