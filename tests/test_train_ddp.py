"""DDP training under torchrun on the CPU (gloo): two ranks with 1 image each vs one process with 2.

The two runs see the same images and flips at every step, but they are not the same optimisation:
AffinityCriterion normalises by the positive queries of the batch it is given (M*, per query type),
so DDP's average of per-rank losses equals the 2-image loss only at steps where both ranks hold the
same number of positives. On this data that is the case at step 1 (asserted), so the step-1 weights
agree; afterwards the trajectories drift apart and the test checks that both train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samcp.pipeline.train import TrainConfig, run_training

TORCHRUN = Path(sys.executable).with_name("torchrun")

# Runs run_training in each torchrun worker. The product writes one model (rank 0); to check that
# the ranks stayed in sync this test-side entry captures each rank's head as it is built and
# writes a digest of its final weights next to the run folder.
ENTRY = """
import hashlib, json, os, sys
import samcp.models.registry as registry
from samcp.pipeline.train import TrainConfig, run_training

built = []
_build = registry.build_head
def build_head(*a, **k):
    built.append(_build(*a, **k))
    return built[-1]
registry.build_head = build_head

cfg = TrainConfig(**json.loads(sys.argv[1]))
cfg = TrainConfig(**{**cfg.__dict__, "lr_drop": tuple(cfg.lr_drop)})
run_training(cfg)
h = hashlib.sha256()
for k, v in sorted(built[0].state_dict().items()):
    h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[2], f"rank{rank}.sha256"), "w") as f:
    f.write(h.hexdigest())
"""


@pytest.fixture
def setup(tiny_train_cache):
    return tiny_train_cache


def _cfg(setup, out: Path, batch_size: int) -> TrainConfig:
    root, data, clip_ckpt = setup
    return TrainConfig(
        cache=str(root / "cache"),
        dataset=str(data),
        out=str(out),
        preset="tiny",
        # Denoising groups (per-rank batch, RNG) and the BG mean (per-rank count of negative queries)
        # depend on how the batch is split: DDP == single process holds only without them.
        head_overrides={"num_denoising_queries": 0, "bg_self_affinity": False},
        clip_checkpoint=str(clip_ckpt),
        steps=STEPS,
        batch_size=batch_size,
        lr=1e-3,
        lr_drop=(0.95,),
        log_every=1,
        ckpt_every=1,
        device="cpu",
        progress=False,
    )


STEPS = 12


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_ranks(setup, tmp_path, monkeypatch):
    env = {**os.environ, "SAMCP_CACHE_DIR": str(tmp_path / "samcp-cache"), "OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("SAMCP_CACHE_DIR", env["SAMCP_CACHE_DIR"])
    ddp = tmp_path / "ddp"
    cfg = json.dumps(_cfg(setup, ddp, batch_size=1).__dict__)
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(entry), cfg, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    # Rank 0 wrote the run folder once: one final model, checkpoints, one metrics line per step.
    assert (ddp / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == [
        f"step_{i:07d}" for i in range(1, STEPS + 1)
    ]
    steps = [json.loads(x)["step"] for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads((ddp / "train_config.json").read_text())["world_size"] == 2
    # The ranks stayed in sync: bit-identical weights at the end.
    assert (tmp_path / "rank0.sha256").read_text() == (tmp_path / "rank1.sha256").read_text()

    # One process with the same global batch (2) sees the same images and flips at every step.
    single = tmp_path / "single"
    run_training(_cfg(setup, single, batch_size=2))
    ddp_losses, single_losses = _losses(ddp), _losses(single)
    assert ddp_losses[0] == pytest.approx(single_losses[0], rel=1e-5)  # same images, same M*
    step1 = "checkpoints/step_0000001/model.safetensors"
    a, b = load_file(str(ddp / step1)), load_file(str(single / step1))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    # Both optimise (the loss alternates between the two global batches of an epoch: even windows).
    for losses in (ddp_losses, single_losses):
        assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
