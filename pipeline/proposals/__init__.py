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


@dataclass(frozen=True)
class ProposalConfig:
    """Which proposal source to run and its settings."""

    source: str = "slic"
    sam_model: str = "vit_h"
    sam_checkpoint: str | None = None
    sam: SamEverythingParams = field(default_factory=SamEverythingParams)
    slic: SlicParams = field(default_factory=SlicParams)
    external_path: str | None = None

    def validate(self) -> None:
        """Raises SamcpError for settings that cannot work, before any worker starts."""
        from pathlib import Path

        if self.source not in SOURCES:
            raise SamcpError(
                f"unknown proposal source {self.source!r}; use one of {', '.join(SOURCES)}"
            )
        if self.source == "sam":
            if not self.sam_checkpoint:
                raise SamcpError(
                    "--proposals sam needs --sam-checkpoint PATH (a segment_anything .pth file); "
                    "without SAM weights use --proposals slic"
                )
            if not Path(self.sam_checkpoint).is_file():
                raise SamcpError(
                    f"SAM checkpoint not found: {self.sam_checkpoint}; check --sam-checkpoint"
                )
        if self.source == "external" and not self.external_path:
            raise SamcpError(
                "--proposals external needs --external PATH (folder or COCO results JSON)"
            )

    def cache_attrs(self, checkpoint_sha256: str | None = None) -> dict:
        """Root attributes describing the proposals (compared on resume)."""
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
        return attrs


class ProposalSource:
    """A built generator with one call for every source: ``(image, record) -> Proposals``."""

    def __init__(self, config: ProposalConfig, device: str = "cpu") -> None:
        self.config = config
        self.sam_model = None
        if config.source == "sam":
            from samcp.pipeline.foundation import load_sam
            from samcp.pipeline.proposals.sam import SamEverythingGenerator

            self.sam_model = load_sam(config.sam_model, config.sam_checkpoint, device)
            self._gen = SamEverythingGenerator(self.sam_model, config.sam)
        elif config.source == "slic":
            from samcp.pipeline.proposals.slic import SlicGenerator

            self._gen = SlicGenerator(config.slic)
        else:
            from samcp.pipeline.proposals.external import ExternalGenerator

            self._gen = ExternalGenerator(config.external_path)

    def __call__(
        self, image: np.ndarray | None, record, with_sam_embedding: bool = False
    ) -> tuple[Proposals, np.ndarray | None]:
        """Proposals for one image, and SAM's image embedding from the same encoder pass if asked."""
        if self.config.source == "external":
            props = self._gen.generate_for(
                record.image_id, record.file_name, record.height, record.width
            )
            return props, None
        if with_sam_embedding and self.config.source == "sam":
            props, features = self._gen.generate(image, return_embedding=True)
            return props, features[0].float().cpu().numpy().astype(np.float16)
        return self._gen.generate(image), None
