"""precompute: resume, bad inputs and worker faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from samcp.cli.main import main as samcp_main
from samcp.pipeline import precompute as pre
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.foundation import make_random_sam_checkpoint
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.sam import SamEverythingParams
from samcp.pipeline.synth import make_synthetic_dataset

TINY_SAM = SamEverythingParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    make_synthetic_dataset(root, seed=3, num_train=1, num_val=7, height=96, width=128)
    return root


@pytest.fixture(scope="module")
def sam_ckpt(tmp_path_factory) -> Path:
    return make_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "a.pth", "vit_test", seed=0)


def _cfg(dataset, out, ckpt=None, **kw) -> pre.PrecomputeConfig:
    if ckpt is not None:
        props = ProposalConfig(
            source="sam", sam_model="vit_test", sam_checkpoint=str(ckpt), sam=TINY_SAM
        )
    else:
        props = ProposalConfig(source="slic")
    kw.setdefault("num_workers", 0)
    kw.setdefault("shard_size", 2)
    return pre.PrecomputeConfig(
        source=str(dataset), out=str(out), proposals=props, progress=False, **kw
    )


def assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.shard_ids == rb.shard_ids
    ta = {k: v for k, v in ra.attrs.items() if k not in ("created", "dataset_source")}
    tb = {k: v for k, v in rb.attrs.items() if k not in ("created", "dataset_source")}
    assert ta == tb
    for sid in ra.shard_ids:
        ga, gb = ra.root["shards"][sid], rb.root["shards"][sid]
        assert sorted(ga.array_keys()) == sorted(gb.array_keys())
        for name in ga.array_keys():
            x, y = ga[name][...], gb[name][...]
            assert x.shape == y.shape, (sid, name)
            assert (
                all(bytes(p) == bytes(q) for p, q in zip(x, y))
                if x.dtype == object and name == "rle"
                else np.array_equal(x, y)
            ), (sid, name)


def test_sam_precompute_matches_generator(dataset, sam_ckpt, tmp_path):
    from samcp.pipeline.datasets import load_image_rgb, open_image_source
    from samcp.pipeline.foundation import load_sam
    from samcp.pipeline.proposals.sam import SamEverythingGenerator

    summary = pre.run_precompute(_cfg(dataset, tmp_path / "c", sam_ckpt))
    assert summary.num_images == 7 and summary.shards_done == 4 and summary.num_failed_images == 0
    reader = CacheReader(tmp_path / "c")
    assert reader.attrs["sam"]["model"] == "vit_test"
    assert reader.attrs["sam"]["params"]["points_per_side"] == 4
    gen = SamEverythingGenerator(load_sam("vit_test", sam_ckpt), TINY_SAM)
    recs = {r.image_id: r for r in open_image_source(dataset, "val2017")}
    for row in reader.iter_images():
        direct = gen.generate(load_image_rgb(recs[row.image_id].file_name))
        assert row.proposals.rles == direct.rles
        np.testing.assert_array_equal(row.proposals.predicted_iou, direct.predicted_iou)


def test_interrupted_run_resumes_to_the_same_cache(dataset, sam_ckpt, tmp_path, monkeypatch):
    pre.run_precompute(_cfg(dataset, tmp_path / "full", sam_ckpt))

    real = pre.process_shard
    calls = []

    def dies_on_third_shard(source, out, shard_id, records):
        calls.append(shard_id)
        if len(calls) == 3:
            # Leave half a shard behind, as a killed worker would.
            from samcp.pipeline.cache import _open_root

            _open_root(out, "r+")["shards"].create_group(shard_id).attrs["complete"] = False
            raise KeyboardInterrupt
        return real(source, out, shard_id, records)

    monkeypatch.setattr(pre, "process_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pre.run_precompute(_cfg(dataset, tmp_path / "resumed", sam_ckpt))
    assert CacheReader(tmp_path / "resumed").shard_ids == ["00000", "00001"]
    assert CacheReader(tmp_path / "resumed").incomplete_shard_ids == ["00002"]
    monkeypatch.setattr(pre, "process_shard", real)
    summary = pre.run_precompute(_cfg(dataset, tmp_path / "resumed", sam_ckpt))
    assert (summary.shards_skipped, summary.shards_done) == (2, 2)
    assert_same_cache(tmp_path / "full", tmp_path / "resumed")


def test_corrupt_and_missing_images_become_failed_rows(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    images = sorted((data / "val2017").iterdir())
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated file
    images[4].unlink()
    summary = pre.run_precompute(_cfg(data, tmp_path / "c"))
    assert summary.num_images == 7 and summary.num_failed_images == 2
    rows = list(CacheReader(tmp_path / "c").iter_images(include_failed=True))
    failed = {r.image_id: r.error for r in rows if r.status == 1}
    assert len(failed) == 2
    assert all(e for e in failed.values())
    assert any("No such file" in e or "FileNotFound" in e for e in failed.values())
    ok = [r for r in rows if r.status == 0]
    assert len(ok) == 5 and all(len(r.proposals) > 0 for r in ok)
    # Fixed files: a plain re-run skips the complete shards, --redo-failed redoes their shards.
    shutil.copytree(dataset / "val2017", data / "val2017", dirs_exist_ok=True)
    assert pre.run_precompute(_cfg(data, tmp_path / "c")).shards_done == 0
    again = pre.run_precompute(_cfg(data, tmp_path / "c", redo_failed=True))
    assert again.shards_done == 2 and again.num_failed_images == 0
    rows = list(CacheReader(tmp_path / "c").iter_images(include_failed=True))
    assert len(rows) == 7 and all(r.status == 0 for r in rows)


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        samcp_main(args)
    err = capsys.readouterr().err
    return exc.value.code, err


def test_cli_clear_errors(dataset, sam_ckpt, tmp_path, capsys):
    # Wrong checkpoint path: one line, non-zero exit, nothing written.
    code, err = _run_cli(
        [
            "precompute",
            str(dataset),
            "--out",
            str(tmp_path / "c1"),
            "--sam-model",
            "vit_test",
            "--sam-checkpoint",
            str(tmp_path / "nope.pth"),
            "--num-workers",
            "0",
        ],
        capsys,
    )
    assert code == 2 and "SAM checkpoint not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c1").exists()
    # No checkpoint at all for sam proposals.
    code, err = _run_cli(
        ["precompute", str(dataset), "--out", str(tmp_path / "c1"), "--num-workers", "0"], capsys
    )
    assert code == 2 and "--sam-checkpoint" in err
    # Malformed manifest.
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image_id": "a", "file_name": "a.jpg", "width": 4, "height": 4}\n{oops\n')
    code, err = _run_cli(
        [
            "precompute",
            str(manifest),
            "--out",
            str(tmp_path / "c2"),
            "--proposals",
            "slic",
            "--num-workers",
            "0",
        ],
        capsys,
    )
    assert code == 2 and "m.jsonl:2" in err
    assert not (tmp_path / "c2").exists()
    # Missing dataset.
    code, err = _run_cli(
        [
            "precompute",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "c3"),
            "--proposals",
            "slic",
            "--num-workers",
            "0",
        ],
        capsys,
    )
    assert code == 2 and "does not exist" in err


def test_resume_with_another_checkpoint_is_refused(dataset, sam_ckpt, tmp_path, capsys):
    out = tmp_path / "c"
    args = [
        "precompute",
        str(dataset),
        "--out",
        str(out),
        "--sam-model",
        "vit_test",
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0",
        "--stability-score-thresh",
        "0.5",
        "--shard-size",
        "2",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    samcp_main([*args, "--sam-checkpoint", str(sam_ckpt)])  # returns normally on success
    before = {
        s: CacheReader(out).root["shards"][s]["rle"][...].tolist()
        for s in CacheReader(out).shard_ids
    }
    other = make_random_sam_checkpoint(tmp_path / "b.pth", "vit_test", seed=1)
    code, err = _run_cli([*args, "--sam-checkpoint", str(other)], capsys)
    assert code == 2 and "different sam" in err and "--overwrite" in err
    code, err = _run_cli(
        [*args, "--sam-checkpoint", str(sam_ckpt), "--points-per-side", "5"], capsys
    )
    assert code == 2 and "different" in err
    after = {
        s: CacheReader(out).root["shards"][s]["rle"][...].tolist()
        for s in CacheReader(out).shard_ids
    }
    assert before == after


def _shard_worker_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"ShardWorker" in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray workers in /proc")
def test_ray_worker_killed_mid_run_is_restarted(dataset, tmp_path, ray_precompute_argv):
    """SIGKILL a Ray worker while it works: Ray restarts it, its shard is redone, nothing lost."""
    # Images large enough that SLIC takes a noticeable time, so the kill lands mid-run.
    data = tmp_path / "big"
    make_synthetic_dataset(data, seed=5, num_train=1, num_val=10, height=360, width=480)
    pre.run_precompute(_cfg(data, tmp_path / "ref", shard_size=1))
    out = tmp_path / "ray"
    cmd = ray_precompute_argv(data, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metas = (out / "shards").glob("*/zarr.json") if (out / "shards").exists() else []
        done = [m for m in metas if '"complete": true' in m.read_text()]
        pids = _shard_worker_pids()
        if len(done) >= 2 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=180)
    assert killed is not None, output
    assert proc.returncode == 0, output
    log = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    # One worker, yet shards were written by two processes: the killed one and its restart.
    pids = log[-1]["summary"]["worker_pids"]
    assert killed in pids and len(pids) == 2
    assert log[-1]["summary"]["num_images"] == 10 and not log[-1]["summary"]["shards_failed"]
    assert_same_cache(tmp_path / "ref", out)


def test_sam_embeddings_come_from_the_same_encoder_pass(dataset, sam_ckpt, tmp_path, monkeypatch):
    from segment_anything import SamPredictor

    from samcp.pipeline.datasets import load_image_rgb, open_image_source
    from samcp.pipeline.proposals import sam_encoder

    cfg = _cfg(dataset, tmp_path / "c", sam_ckpt, store_sam_embeddings=True)
    processor = pre.ImageProcessor(cfg, "cpu")
    model = processor.proposals.sam_model
    passes = []
    real_encode = sam_encoder.encode_image

    def counting_encode(*args, **kwargs):
        passes.append(1)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(sam_encoder, "encode_image", counting_encode)
    recs = open_image_source(dataset, "val2017")[:2]
    rows = [processor(r) for r in recs]
    assert len(passes) == 2  # one encoder pass per image, proposals and embedding together
    predictor = SamPredictor(model)
    for rec, row in zip(recs, rows, strict=True):
        predictor.set_image(load_image_rgb(rec.file_name))
        want = predictor.features[0].numpy()
        got = row.image_arrays["sam_embed"]
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_allclose(
            got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max()
        )
    pre.run_precompute(cfg)
    reader = CacheReader(tmp_path / "c")
    assert reader.attrs["sam_embed"] is True
    first = next(reader.iter_images())
    np.testing.assert_array_equal(
        first.image_arrays["sam_embed"], rows[0].image_arrays["sam_embed"]
    )


def test_sam_embeddings_need_sam_proposals(dataset, tmp_path):
    with pytest.raises(SamcpError, match="needs SAM proposals"):
        pre.run_precompute(_cfg(dataset, tmp_path / "c", store_sam_embeddings=True))
