"""Training the affinity head on a real (tiny) cache: loss goes down, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.train import TrainConfig, run_training


@pytest.fixture
def setup(tiny_train_cache):
    return tiny_train_cache


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCP_CACHE_DIR", str(tmp_path / "samcp-cache"))


def _cfg(setup, out, **kw) -> TrainConfig:
    root, data, clip_ckpt = setup
    kw.setdefault("steps", 8)
    kw.setdefault("batch_size", 2)
    return TrainConfig(
        cache=str(root / "cache"),
        dataset=str(data),
        out=str(out),
        preset="tiny",
        clip_checkpoint=str(clip_ckpt),
        log_every=1,
        ckpt_every=4,
        progress=False,
        **kw,
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_the_loss(setup, tmp_path):
    summary = run_training(
        _cfg(setup, tmp_path / "run", steps=40, lr=1e-3, flip=False, lr_drop=(0.95,))
    )
    assert summary["steps_done"] == 40
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "model" / "config.json").read_text())["head"] == "affinity"
    assert load_file(str(run / "text_embed.safetensors"))["text_embed"].shape[0] == len(
        json.loads((run / "classes.json").read_text())
    )


def test_resume_reaches_the_uninterrupted_weights(setup, tmp_path):
    run_training(_cfg(setup, tmp_path / "a"))
    run_training(_cfg(setup, tmp_path / "b"), stop_after=4)
    assert not (tmp_path / "b" / "model").exists()
    assert (tmp_path / "b" / "checkpoints" / "step_0000004").is_dir()
    run_training(_cfg(setup, tmp_path / "b"), resume=True)
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # And the interrupted run did not start from scratch: steps 1-4 were logged once only.
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 9))


def test_run_folder_rules(setup, tmp_path):
    run_training(_cfg(setup, tmp_path / "r", steps=2))
    with pytest.raises(SamcpError, match="already holds a run"):
        run_training(_cfg(setup, tmp_path / "r", steps=2))
    with pytest.raises(SamcpError, match="batch_size"):
        run_training(_cfg(setup, tmp_path / "r", steps=2, batch_size=3), resume=True)
    with pytest.raises(SamcpError, match="nothing to resume"):
        run_training(_cfg(setup, tmp_path / "new"), resume=True)


def test_cache_without_clip_is_refused(setup, tmp_path):
    root, data, _ = setup
    run_precompute(
        PrecomputeConfig(
            source=str(data),
            out=str(tmp_path / "plain"),
            split="train2017",
            proposals=ProposalConfig(source="slic"),
            num_workers=0,
            progress=False,
        )
    )
    cfg = TrainConfig(
        cache=str(tmp_path / "plain"),
        dataset=str(data),
        out=str(tmp_path / "r"),
        preset="tiny",
        progress=False,
    )
    with pytest.raises(SamcpError, match="no dense CLIP features"):
        run_training(cfg)


def test_zero_steps_saves_the_initial_weights(setup, tmp_path):
    """The demo's "untrained" row: a run of 0 steps is valid and holds the initial head."""
    summary = run_training(_cfg(setup, tmp_path / "r0", steps=0))
    assert summary["steps_done"] == 0
    assert (tmp_path / "r0" / "model" / "model.safetensors").is_file()
