"""`samcp train` on benchmark caches: a cache made with `precompute --dataset NAME` is trained with
that benchmark's ground truth (COCO-Stuff 171's semantic labels for the SAM-MI / ESC-Net protocol,
ADE20K-150's panoptic PNGs), the identity checks hold, and `samcp viz` finds a benchmark cache's
images and ground truth."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from benchmark_layouts import CLASS_IDS, write_layout
from PIL import Image

from samcp.pipeline.benchmarks import open_benchmark, read_label_map, semantic_to_panoptic
from samcp.pipeline.errors import SamcpError

H, W = 48, 64
STUFF = "coco_stuff_171"
ADE = "ade20k_150"


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
    """The synthetic val split in the COCO-Stuff 171 and ADE20K-150 (panoptic) layouts, each
    cached with `precompute --dataset NAME` (SLIC proposals, a random test CLIP)."""
    from samcp.pipeline.clip import ClipConfig, make_random_clip_checkpoint
    from samcp.pipeline.precompute import PrecomputeConfig, run_precompute
    from samcp.pipeline.proposals import ProposalConfig
    from samcp.pipeline.proposals.slic import SlicParams
    from samcp.pipeline.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("bench_train")
    mp = pytest.MonkeyPatch()
    mp.setenv("SAMCP_CACHE_DIR", str(root / "textcache"))
    syn = make_synthetic_dataset(root / "syn", seed=7, num_train=1, num_val=3, height=H, width=W)
    clip = make_random_clip_checkpoint(root / "clip.pt")
    layouts, caches = {}, {}
    for name in (STUFF, ADE):
        layouts[name] = write_layout(name, syn, root / name)
        caches[name] = root / f"cache_{name}"
        run_precompute(
            PrecomputeConfig(
                source=str(layouts[name]), out=str(caches[name]), split="val", dataset=name,
                shard_size=2, num_workers=0, progress=False,
                proposals=ProposalConfig(source="slic", slic=SlicParams(n_segments=(12, 30))),
                clip=ClipConfig(model="samcp-test-convnext", checkpoint=str(clip), input_size=64),
            )
        )
    yield {"root": root, "syn": syn, "clip": clip, "layouts": layouts, "caches": caches}
    mp.undo()


def _record_gt(monkeypatch) -> list[tuple[str, object]]:
    """(image id, GroundTruth) of every sample training makes."""
    import samcp.pipeline.train as train_mod
    from samcp.pipeline.benchmarks import PanopticBenchmark, SemanticBenchmark

    seen: list[tuple[str, object]] = []
    last: list[str] = []
    for cls in (SemanticBenchmark, PanopticBenchmark):
        orig = cls.load_panoptic

        def load(self, image_id, _orig=orig):
            last.append(str(image_id))
            return _orig(self, image_id)

        monkeypatch.setattr(cls, "load_panoptic", load)
    real = train_mod.ground_truth_rles

    def rles(id_map, segments, classes):
        gt = real(id_map, segments, classes)
        seen.append((last[-1], gt))
        return gt

    monkeypatch.setattr(train_mod, "ground_truth_rles", rles)
    return seen


# -- ground-truth conversion -------------------------------------------------------------------


def test_a_label_map_becomes_one_stuff_segment_per_class_and_ignore_is_void():
    labels = np.array([[0, 0, 255, 7], [5, 5, 255, 7], [5, 0, 0, 255]], np.uint8)
    id_map, segs = semantic_to_panoptic(labels, 10, 255, "t.png")
    assert [(s["id"], s["category_id"], s["iscrowd"], s["area"]) for s in segs] == [
        (1, 0, 0, 4), (6, 5, 0, 3), (8, 7, 0, 2)
    ]
    assert id_map.dtype == np.int32
    np.testing.assert_array_equal(id_map == 0, labels == 255)
    for s in segs:
        np.testing.assert_array_equal(id_map == s["id"], labels == s["category_id"])
    # 16-bit labels, 65535 = ignore: class 300 is one segment
    big = np.array([[300, 65535], [300, 2]], np.uint16)
    id_map, segs = semantic_to_panoptic(big, 459, 65535)
    assert [(s["category_id"], s["area"]) for s in segs] == [(2, 1), (300, 2)]
    assert id_map[0, 1] == 0
    with pytest.raises(SamcpError, match="t.png: label 12 is neither a class id"):
        semantic_to_panoptic(np.array([[12, 255]], np.uint8), 10, 255, "t.png")


def test_the_head_sees_the_label_files_classes_and_ignore_as_void(world, tmp_path):
    """What a head gets (GroundTruth -> per-pixel class index) equals the label file, with a
    --classes subset of benchmark ids: the other classes void too."""
    from samcp.models.costagg.data import VOID, semantic_label_map
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.headdata import ground_truth_rles
    from samcp.pipeline.train import TrainConfig, open_training_dataset, training_classes

    reader = CacheReader(world["caches"][STUFF])
    cfg = TrainConfig(cache=str(reader.path), dataset=str(world["layouts"][STUFF]), out="unused")
    data = open_training_dataset(cfg, reader)
    assert (data.name, data.split) == (STUFF, "val")  # both from the cache
    bench = data.dataset
    classes, vocab = training_classes(bench.categories, None, data.annotations, data.vocabulary)
    assert classes.ids == list(range(171)) and not classes.isthing.any()
    assert vocab.name == STUFF and vocab.names[0][0] == "person"  # the builtin, with synonyms
    seen_ids = CLASS_IDS[STUFF][:4]
    seen_file = tmp_path / "seen.txt"
    seen_file.write_text("".join(f"{i}:class {i}\n" for i in seen_ids))
    sub, sub_vocab = training_classes(bench.categories, str(seen_file), data.annotations)
    assert sub.ids == seen_ids and list(sub_vocab.ids) == seen_ids
    for item in bench.items:
        raw = read_label_map(item.label).astype(np.int64)
        gt = ground_truth_rles(*bench.load_panoptic(item.image_id), classes)
        assert not gt.iscrowd.any()
        assert sorted(gt.labels.tolist()) == sorted(set(raw[raw != 255].tolist()))
        want = np.where(raw == 255, VOID, raw)
        np.testing.assert_array_equal(semantic_label_map(gt, *raw.shape), want)
        gt = ground_truth_rles(*bench.load_panoptic(item.image_id), sub)
        lut = np.full(256, VOID, np.int64)
        lut[seen_ids] = np.arange(len(seen_ids))
        want = lut[raw]
        np.testing.assert_array_equal(semantic_label_map(gt, *raw.shape), want)
    bad = tmp_path / "bad.txt"
    bad.write_text("171:not a class\n")
    with pytest.raises(SamcpError, match="class id\\(s\\) 171 are not categories"):
        training_classes(bench.categories, str(bad), data.annotations)


def test_costagg_trains_on_a_coco_stuff_cache_from_the_command_line(
    world, tmp_path, capsys, monkeypatch
):
    """`samcp train --head costagg --cache C --dataset ROOT`: benchmark and split come from the
    cache; every sample's ground truth is its label file."""
    seen = _record_gt(monkeypatch)
    run = tmp_path / "run"
    code, out, err = _cli(
        ["train", "--head", "costagg", "--preset", "tiny", "--cache", str(world["caches"][STUFF]),
         "--dataset", str(world["layouts"][STUFF]), "--out", str(run), "--steps", "2",
         "--batch-size", "2", "--clip-checkpoint", str(world["clip"]), "--device", "cpu",
         "--no-progress"],
        capsys,
    )
    assert code == 0, err
    assert (run / "model" / "model.safetensors").is_file()
    cfg = json.loads((run / "train_config.json").read_text())
    assert (cfg["dataset_name"], cfg["split"]) == (STUFF, "val")
    cats = json.loads((run / "classes.json").read_text())
    assert [c["id"] for c in cats] == list(range(171))
    assert (run / "vocabulary.txt").read_text().startswith("0:person")
    from samcp.models.costagg.data import VOID, semantic_label_map

    bench = open_benchmark(STUFF, world["layouts"][STUFF], "val")
    assert seen and {i for i, _ in seen} <= {it.image_id for it in bench.items}
    for image_id, gt in seen:
        raw = read_label_map(bench._item(image_id).label).astype(np.int64)
        np.testing.assert_array_equal(
            semantic_label_map(gt, *raw.shape), np.where(raw == 255, VOID, raw)
        )


def test_affinity_trains_on_an_ade20k_150_panoptic_cache(world, tmp_path, monkeypatch):
    """A panoptic benchmark gives its panoptic segments (thing/stuff and crowd from its JSON)."""
    from samcp.pipeline.train import TrainConfig, run_training

    seen = _record_gt(monkeypatch)
    run = tmp_path / "run"
    run_training(
        TrainConfig(
            cache=str(world["caches"][ADE]), dataset=str(world["layouts"][ADE]), out=str(run),
            head="affinity", preset="tiny", clip_checkpoint=str(world["clip"]), steps=2,
            batch_size=2, device="cpu", progress=False,
        )
    )
    assert (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "train_config.json").read_text())["dataset_name"] == ADE
    cats = json.loads((run / "classes.json").read_text())
    assert [c["id"] for c in cats] == list(range(150))
    ann_path = world["layouts"][ADE] / "ADEChallengeData2016" / "ade20k_panoptic_val.json"
    doc = json.loads(ann_path.read_text())
    anns = {a["image_id"]: a for a in doc["annotations"]}
    assert seen
    for image_id, gt in seen:
        segs = anns[image_id]["segments_info"]
        assert sorted(gt.labels.tolist()) == sorted(s["category_id"] for s in segs)
        assert gt.iscrowd.sum() == sum(bool(s.get("iscrowd")) for s in segs)
        assert gt.isthing[CLASS_IDS[ADE][0]] and not gt.isthing[CLASS_IDS[ADE][-1]]


def test_a_benchmark_cache_is_checked_against_the_dataset_given(world, tmp_path):
    from samcp.pipeline.benchmarks import check_benchmark_source
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.train import TrainConfig, open_training_dataset

    reader = CacheReader(world["caches"][STUFF])

    def cfg(dataset, **kw):
        return TrainConfig(cache=str(reader.path), dataset=str(dataset), out="unused", **kw)

    # the same files moved: the label listing is the same
    moved = tmp_path / "moved"
    shutil.copytree(world["layouts"][STUFF], moved)
    assert open_training_dataset(cfg(moved), reader).name == STUFF
    # rewritten labels: refused unless --allow-other-dataset
    label = sorted((moved / "coco" / "stuffthingmaps_detectron2" / "val2017").glob("*.png"))[0]
    arr = np.asarray(Image.open(label)).copy()
    arr[:4] = 255
    Image.fromarray(arr).save(label)
    with pytest.raises(SamcpError, match="listing differs.*--allow-other-dataset"):
        open_training_dataset(cfg(moved), reader)
    open_training_dataset(cfg(moved, allow_other_dataset=True), reader)
    # another benchmark named, or a COCO panoptic root for a COCO-Stuff cache
    with pytest.raises(SamcpError, match="made from coco_stuff_171.*not from pascal_voc_20"):
        open_training_dataset(cfg(world["layouts"][STUFF], dataset_name="pascal_voc_20"), reader)
    with pytest.raises(SamcpError, match="coco_stuff_171.*not from coco_panoptic"):
        open_training_dataset(cfg(world["syn"], dataset_name="coco_panoptic", split="val2017"),
                              reader)
    with pytest.raises(SamcpError, match="unknown dataset 'stuff'"):
        cfg(world["layouts"][STUFF], dataset_name="stuff").validate()
    # caches made before the listing was recorded: the folder and split are compared
    attrs = json.loads(json.dumps(reader.attrs))
    del attrs["dataset_source"]["labels_listing_sha256"]
    check_benchmark_source(attrs, "C", open_benchmark(STUFF, world["layouts"][STUFF], "val"))
    with pytest.raises(SamcpError, match="not from the label files"):
        check_benchmark_source(attrs, "C", open_benchmark(STUFF, moved, "val"))


def test_an_ade20k_cache_checks_the_panoptic_json(world, tmp_path):
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.train import TrainConfig, run_training

    other = tmp_path / "ade"
    shutil.copytree(world["layouts"][ADE], other)
    js = other / "ADEChallengeData2016" / "ade20k_panoptic_val.json"
    doc = json.loads(js.read_text())
    doc["annotations"][0]["segments_info"] = doc["annotations"][0]["segments_info"][:1]
    js.write_text(json.dumps(doc))
    assert CacheReader(world["caches"][ADE]).attrs["dataset_source"]["benchmark"] == ADE
    with pytest.raises(SamcpError, match="annotations differ"):
        run_training(
            TrainConfig(cache=str(world["caches"][ADE]), dataset=str(other),
                        out=str(tmp_path / "run"), preset="tiny", steps=1, progress=False)
        )
    assert not (tmp_path / "run" / "train_config.json").exists()


# -- viz ---------------------------------------------------------------------------------------


def test_viz_finds_a_benchmark_caches_images_and_ground_truth(world, tmp_path, capsys):
    bench = open_benchmark(STUFF, world["layouts"][STUFF], "val")
    image_id = bench.items[0].image_id
    cache = str(world["caches"][STUFF])
    png = tmp_path / "p.png"
    code, out, err = _cli(["viz", cache, image_id, "--out", str(png)], capsys)
    assert code == 0, err
    assert "warning" not in err and png.is_file()
    pixels = np.asarray(Image.open(png))
    assert pixels.shape[:2] == (H, W) and pixels.std() > 0  # the image, not the grey canvas
    # --gt: the benchmark root, one segment per class of the label file
    raw = read_label_map(bench.items[0].label)
    classes = set(np.unique(raw).tolist()) - {255}
    gt_png = tmp_path / "gt.png"
    code, out, err = _cli(
        ["viz", cache, image_id, "--out", str(gt_png), "--gt", str(world["layouts"][STUFF])],
        capsys,
    )
    assert code == 0, err
    assert gt_png.is_file() and f"{len(classes)} segments" in out
    # --image-root: the same benchmark moved
    moved = tmp_path / "moved"
    shutil.copytree(world["layouts"][STUFF], moved)
    code, out, err = _cli(
        ["viz", cache, image_id, "--out", str(tmp_path / "m.png"), "--image-root", str(moved)],
        capsys,
    )
    assert code == 0 and "warning" not in err, err
    # a panoptic benchmark (ADE20K-150: string ids, images/validation)
    ade = open_benchmark(ADE, world["layouts"][ADE], "val")
    code, out, err = _cli(
        ["viz", str(world["caches"][ADE]), ade.records[0].image_id, "--out",
         str(tmp_path / "a.png"), "--gt", str(world["layouts"][ADE])],
        capsys,
    )
    assert code == 0 and "warning" not in err, err
    assert (tmp_path / "a.png").is_file()


@pytest.mark.slow
def test_coco_stuff_protocol_train_predict_eval(world, tmp_path, capsys):
    """The SAM-MI / ESC-Net protocol end to end on the fixture: costagg trained on COCO-Stuff's
    labels, predicted in its label space and scored with mIoU."""
    run = tmp_path / "run"
    cache = str(world["caches"][STUFF])
    code, out, err = _cli(
        ["train", "--head", "costagg", "--preset", "tiny", "--cache", cache, "--dataset",
         str(world["layouts"][STUFF]), "--out", str(run), "--steps", "3", "--batch-size", "2",
         "--clip-checkpoint", str(world["clip"]), "--device", "cpu", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    report = tmp_path / "r.json"
    code, out, err = _cli(
        ["eval", "--run", str(run), "--cache", cache, "--dataset", STUFF, "--gt",
         str(world["layouts"][STUFF]), "--clip-checkpoint", str(world["clip"]), "--device", "cpu",
         "--workers", "1", "--no-progress", "--json", str(report)],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["panoptic"] is None and 0 <= doc["semantic"]["miou"] <= 100
