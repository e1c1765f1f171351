"""precompute --dataset -> predict --dataset -> eval --dataset on a semantic (Pascal Context 459,
16-bit labels) and a panoptic (ADE20K-150) layout, with a head trained on the synthetic COCO-layout
set: the cross-dataset protocol of the papers, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_layouts import CLASS_IDS, vocabulary_file, write_layout
from PIL import Image

from samcp.pipeline.benchmarks import open_benchmark

H, W = 64, 80


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from samcp.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny run trained on the synthetic set's train split, and its val split in two benchmark
    layouts."""
    from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.proposals.slic import SlicParams
    from samcp.pipeline.synth import make_synthetic_dataset
    from samcp.pipeline.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("bench_e2e")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAMCP_CACHE_DIR", str(root / "textcache"))
    syn = make_synthetic_dataset(root / "syn", seed=5, num_train=4, num_val=3, height=H, width=W)
    clip = make_random_clip_checkpoint(root / "clip.pt")
    run_precompute(
        PrecomputeConfig(
            source=str(syn), out=str(root / "train_cache"), split="train2017", shard_size=2,
            proposals=ProposalConfig(source="slic", slic=SlicParams(n_segments=(12, 40))),
            num_workers=0, progress=False,
            clip=ClipConfig(model="samcp-test-convnext", checkpoint=str(clip), input_size=128),
        )
    )
    run = root / "run"
    run_training(
        TrainConfig(
            cache=str(root / "train_cache"), dataset=str(syn), out=str(run), preset="tiny",
            head_overrides={"min_affinity": 0.0}, clip_checkpoint=str(clip), steps=6,
            batch_size=2, progress=False,
        )
    )
    names = (
        "pascal_context_459",
        "ade20k_150",
        "cityscapes",
        "ade20k_847",
        "pascal_context_59",
        "pascal_voc_20",
        "coco_stuff_171",
    )
    layouts = {n: write_layout(n, syn, root / n) for n in names}
    yield {"root": root, "syn": syn, "clip": clip, "run": run, "layouts": layouts}
    mp.undo()


def _precompute(world, name: str, capsys) -> Path:
    cache = world["root"] / f"cache_{name}"
    code, out, err = _cli(
        ["precompute", "--dataset", name, str(world["layouts"][name]), "--split", "val",
         "-o", str(cache), "--proposals", "slic", "--slic-segments", "12,40", "--num-workers", "0",
         "--shard-size", "2", "--clip-model", "samcp-test-convnext", "--clip-checkpoint",
         str(world["clip"]), "--clip-input-size", "128", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    return cache


def _predict(world, name: str, cache: Path, vocab: Path, pred: Path, capsys) -> None:
    """samcp predict --dataset NAME of the world's run on ``cache`` into ``pred``."""
    code, out, err = _cli(
        ["predict", "--run", str(world["run"]), "--cache", str(cache), "--out", str(pred),
         "--dataset", name, "--vocabulary", str(vocab), "--clip-checkpoint", str(world["clip"]),
         "--device", "cpu", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, err


def test_semantic_benchmark_end_to_end_with_16bit_labels(world, tmp_path, capsys):
    from samcp.pipeline.cache import CacheReader

    name = "pascal_context_459"
    cache = _precompute(world, name, capsys)
    attrs = CacheReader(cache).attrs
    assert attrs["dataset"]["name"] == name and attrs["dataset"]["num_images"] == 3
    assert attrs["dataset_source"]["benchmark"] == name
    assert attrs["dataset_source"]["split"] == "val"

    vocab = vocabulary_file(tmp_path / "pc459_synth.txt", world["syn"], name)
    pred = tmp_path / "pred"
    _predict(world, name, cache, vocab, pred, capsys)
    bench = open_benchmark(name, world["layouts"][name], "val")
    doc = json.loads((pred / "panoptic.json").read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(459))
    info = json.loads((pred / "predict_info.json").read_text())
    assert info["dataset"] == name and info["semantic_ignore"] == 65535
    for it in bench.items:
        png = pred / "semantic" / f"{it.stem}.png"
        with Image.open(png) as img:
            assert img.mode.startswith("I")  # 16-bit: more than 255 classes
            values = set(np.unique(np.asarray(img)).tolist())
        assert values <= set(CLASS_IDS[name]) | {65535}

    report = tmp_path / "r.json"
    code, out, err = _cli(
        ["eval", "--dataset", name, "--gt", str(world["layouts"][name]), "--pred", str(pred),
         "--workers", "1", "--no-progress", "--json", str(report), "--per-class"],
        capsys,
    )
    assert code == 0, err
    assert f"Evaluated 3 images of {name}" in out and "mIoU" in out and "PQ" not in out
    r = json.loads(report.read_text())
    assert r["benchmark"] == name and r["panoptic"] is None and r["num_images"] == 3
    assert 0.0 <= r["semantic"]["miou"] <= 100.0
    present = set()
    for it in bench.items:
        present |= set(np.unique(bench.load_labels(it.image_id)).tolist()) - {65535}
    assert r["semantic"]["n"] == len(present)  # mIoU averages the classes with ground truth
    assert len(r["per_class"]) == 459

    # eval --run --cache: the ground truth is the benchmark the cache was made from
    code, out, err = _cli(
        ["eval", "--run", str(world["run"]), "--cache", str(cache), "--vocabulary", str(vocab),
         "--clip-checkpoint", str(world["clip"]), "--device", "cpu", "--workers", "1",
         "--no-progress", "--json", str(tmp_path / "r2.json")],
        capsys,
    )
    assert code == 0, err
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["semantic"]["miou"] == pytest.approx(r["semantic"]["miou"])

    # a vocabulary id that is not a class of the benchmark: one line, before any work
    bad = tmp_path / "bad.txt"
    bad.write_text("500:ball\n")
    code, out, err = _cli(
        ["predict", "--run", str(world["run"]), "--cache", str(cache), "--out",
         str(tmp_path / "p2"), "--dataset", name, "--vocabulary", str(bad), "--no-progress"],
        capsys,
    )
    assert code == 2
    assert err.strip().startswith("error: vocabulary") and "not classes of pascal_context_459" in err
    assert not (tmp_path / "p2").exists()


def test_panoptic_benchmark_end_to_end(world, tmp_path, capsys):
    name = "ade20k_150"
    cache = _precompute(world, name, capsys)
    vocab = vocabulary_file(tmp_path / "ade_synth.txt", world["syn"], name)
    pred = tmp_path / "pred"
    _predict(world, name, cache, vocab, pred, capsys)
    doc = json.loads((pred / "panoptic.json").read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(150))
    # thing/stuff comes from the benchmark's JSON
    things = {c["id"] for c in doc["categories"] if c["isthing"]}
    assert things == {CLASS_IDS[name][i] for i in range(7)}
    assert {Path(a["file_name"]).stem for a in doc["annotations"]} == {
        f"ADE_val_{i:08d}" for i in (1, 2, 3)
    }
    with Image.open(next((pred / "semantic").iterdir())) as img:
        assert img.mode == "L"
    code, out, err = _cli(
        ["eval", "--dataset", name, "--gt", str(world["layouts"][name]), "--pred", str(pred),
         "--workers", "1", "--no-progress", "--json", str(tmp_path / "r.json")],
        capsys,
    )
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["benchmark"] == name
    assert 0.0 <= r["panoptic"]["all"]["pq"] <= 100.0

    assert r["instance"] is not None  # instances.json is scored (AP)
    assert 0.0 <= r["semantic"]["miou"] <= 100.0


def test_cityscapes_end_to_end_in_train_ids(world, tmp_path, capsys):
    name = "cityscapes"
    cache = _precompute(world, name, capsys)  # leftImg8bit PNGs in city folders
    vocab = vocabulary_file(tmp_path / "cs_synth.txt", world["syn"], name)
    pred = tmp_path / "pred"
    _predict(world, name, cache, vocab, pred, capsys)
    doc = json.loads((pred / "panoptic.json").read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(19))  # train ids, not label ids
    assert {c["id"] for c in doc["categories"] if c["isthing"]} == set(range(11, 19))
    assert sorted(p.name for p in (pred / "semantic").iterdir()) == [
        f"frankfurt_000000_{i:06d}_gtFine_panoptic.png" for i in range(3)
    ]
    code, out, err = _cli(
        ["eval", "--run", str(world["run"]), "--cache", str(cache), "--vocabulary", str(vocab),
         "--device", "cpu", "--workers", "1", "--no-progress", "--json", str(tmp_path / "r.json")],
        capsys,
    )
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["benchmark"] == name and r["panoptic"]["all"]["n"] > 0
    assert 0.0 <= r["semantic"]["miou"] <= 100.0


def test_coco_panoptic_dataset_on_a_cache_made_without_dataset(world, tmp_path, capsys):
    """A COCO-layout cache made the old way (no --dataset) predicts and evaluates as the
    coco_panoptic benchmark; the result equals the plain COCO evaluation."""
    pred = tmp_path / "pred"
    code, out, err = _cli(
        ["predict", "--run", str(world["run"]), "--cache", str(world["root"] / "train_cache"),
         "--out", str(pred), "--dataset", "coco_panoptic", "--vocabulary",
         str(world["syn"] / "classes.txt"), "--clip-checkpoint", str(world["clip"]),
         "--device", "cpu", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    results = []
    for extra in (["--dataset", "coco_panoptic", "--split", "train"], ["--split", "train2017"]):
        code, out, err = _cli(
            ["eval", "--gt", str(world["syn"]), "--pred", str(pred), "--workers", "1",
             "--no-progress", "--json", str(tmp_path / "r.json"), *extra],
            capsys,
        )
        assert code == 0, err
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["benchmark"] == "coco_panoptic" and results[1]["benchmark"] is None
    for key in ("panoptic", "semantic", "instance"):
        assert results[0][key] == results[1][key]


@pytest.mark.slow
def test_predict_dataset_defaults_to_the_builtin_vocabulary(world, tmp_path, capsys):
    """Without --vocabulary the benchmark's builtin vocabulary names the classes (embedding its
    150 classes with the test CLIP takes ~10 s)."""
    name = "ade20k_150"
    cache = world["root"] / f"cache_{name}"
    if not cache.exists():
        cache = _precompute(world, name, capsys)
    code, out, err = _cli(
        ["predict", "--run", str(world["run"]), "--cache", str(cache), "--out",
         str(tmp_path / "builtin"), "--dataset", name, "--clip-checkpoint", str(world["clip"]),
         "--device", "cpu", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    info = json.loads((tmp_path / "builtin" / "predict_info.json").read_text())
    assert info["vocabulary"] == name and info["thing_stuff_source"] == f"benchmark {name}"


@pytest.mark.parametrize(
    "name", ["ade20k_847", "pascal_context_59", "pascal_voc_20", "coco_stuff_171"]
)
def test_every_other_semantic_layout_end_to_end(name, world, tmp_path, capsys):
    """precompute --dataset -> predict --dataset -> eval --dataset on the remaining semantic
    layouts: the PNGs carry the benchmark's class ids in its bit depth, eval scores them."""
    cache = _precompute(world, name, capsys)
    vocab = vocabulary_file(tmp_path / f"{name}_synth.txt", world["syn"], name)
    pred = tmp_path / "pred"
    _predict(world, name, cache, vocab, pred, capsys)
    bench = open_benchmark(name, world["layouts"][name], "val")
    ignore = 65535 if name == "ade20k_847" else 255
    for it in bench.items:
        with Image.open(pred / "semantic" / f"{it.stem}.png") as img:
            assert img.mode.startswith("I") == (ignore == 65535)
            values = set(np.unique(np.asarray(img)).tolist())
        assert values <= set(CLASS_IDS[name]) | {ignore}
    report = tmp_path / "r.json"
    code, out, err = _cli(
        ["eval", "--dataset", name, "--gt", str(world["layouts"][name]), "--pred", str(pred),
         "--workers", "1", "--no-progress", "--json", str(report)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["benchmark"] == name and r["panoptic"] is None and r["num_images"] == 3
    assert 0.0 <= r["semantic"]["miou"] <= 100.0
