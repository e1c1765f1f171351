"""Fixtures shared by several test modules: small real caches built through the real pipeline."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint
from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.slic import SlicParams
from samcp.pipeline.synth import make_synthetic_dataset


@pytest.fixture(scope="session")
def slic_cache_factory() -> Callable[..., tuple[Path, Path]]:
    """Builds (dataset root, cache) of ``num_val`` synthetic val images with SLIC proposals.

    ``corrupt`` names image ids whose files are overwritten with junk before precompute (they become
    failed rows). Each call builds its own folder, so callers may modify what they get.
    """

    def build(tmp: Path, seed: int, num_val: int = 5, corrupt: tuple[str, ...] = ()):
        root = make_synthetic_dataset(
            tmp / "synth", seed=seed, num_train=0, num_val=num_val, height=96, width=128
        )
        for image_id in corrupt:
            (root / "val2017" / f"{int(image_id):012d}.jpg").write_bytes(b"not a jpeg")
        cache = tmp / "cache.zarr"
        run_precompute(
            PrecomputeConfig(
                source=str(root),
                out=str(cache),
                shard_size=2,
                proposals=ProposalConfig(source="slic"),
                num_workers=0,
                progress=False,
            )
        )
        return root, cache

    return build


@pytest.fixture(scope="session")
def tiny_train_cache(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(folder, dataset, CLIP checkpoint): 4 train images cached with SLIC and a tiny random CLIP
    at ``folder/cache``. Read-only for tests."""
    root = tmp_path_factory.mktemp("train")
    data = make_synthetic_dataset(
        root / "syn", seed=2, num_train=4, num_val=1, height=96, width=128
    )
    clip_ckpt = make_random_clip_checkpoint(root / "clip.pt")
    run_precompute(
        PrecomputeConfig(
            source=str(data),
            out=str(root / "cache"),
            split="train2017",
            shard_size=2,
            proposals=ProposalConfig(source="slic", slic=SlicParams(n_segments=(12, 40))),
            num_workers=0,
            progress=False,
            clip=ClipConfig(model="samcp-test-convnext", checkpoint=str(clip_ckpt), input_size=256),
        )
    )
    return root, data, clip_ckpt


@pytest.fixture
def ray_precompute_argv() -> Callable[[Path, Path], list[str]]:
    """``samcp precompute DATA --out OUT`` as a subprocess command: SLIC, one image per shard, one
    local-Ray worker (the kill -9 tests run it and kill parts of it)."""

    def build(data: Path, out: Path) -> list[str]:
        return [
            sys.executable, "-m", "samcp.cli.main", "precompute", str(data), "--out", str(out),
            "--proposals", "slic", "--shard-size", "1", "--num-workers", "1", "--no-progress",
        ]

    return build
