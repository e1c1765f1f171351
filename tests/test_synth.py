"""Tests for samcp.pipeline.synth and `samcp synth`: determinism, COCO panoptic layout, and a
ground truth that agrees with itself (PNG ids vs segments_info vs semantic PNGs vs classes.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.synth import SYNTH_CLASSES, make_synthetic_dataset, synth_categories

SPLITS = ("train2017", "val2017")
SMALL = dict(num_train=3, num_val=3, height=96, width=128)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _decode_ids(png: Path) -> np.ndarray:
    # Decoded here rather than with samcp.pipeline.datasets.rgb_to_id, so the two check each other.
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _samples(root: Path, split: str):
    """Yield (image dict, annotation dict, id map, RGB image, semantic map) per image."""
    doc = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
    anns = {a["image_id"]: a for a in doc["annotations"]}
    for im in doc["images"]:
        ann = anns[im["id"]]
        ids = _decode_ids(root / "annotations" / f"panoptic_{split}" / ann["file_name"])
        rgb = np.asarray(Image.open(root / split / im["file_name"]))
        sem = np.asarray(
            Image.open(root / f"semantic_{split}" / f"{Path(im['file_name']).stem}.png")
        )
        yield im, ann, ids, rgb, sem


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", seed=0, **SMALL)


@pytest.fixture(scope="module")
def default_size(tmp_path_factory) -> Path:
    """A few images with the default size, instance counts and crowd fraction."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synth") / "ds", seed=0, num_train=0, num_val=6
    )


# --------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_byte_identical_files(small, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", seed=0, **SMALL)
    a, b = _all_files(small), _all_files(again)
    assert sorted(a) == sorted(b)
    # classes.txt, classes_seen.txt + the .samcp-output marker + per split: json, 3 x (jpg, pan, sem)
    assert len(a) == 3 + 2 * (1 + 3 * 3)
    for name in a:
        assert a[name] == b[name], name


def test_different_seed_gives_different_images(small, tmp_path):
    other = make_synthetic_dataset(tmp_path / "other", seed=1, **SMALL)
    for split in SPLITS:
        for jpg in sorted((small / split).iterdir()):
            x = np.asarray(Image.open(jpg), dtype=np.int16)
            y = np.asarray(Image.open(other / split / jpg.name), dtype=np.int16)
            assert np.abs(x - y).mean() > 10, jpg.name
    assert (small / "classes.txt").read_bytes() == (other / "classes.txt").read_bytes()


def test_val_images_do_not_depend_on_num_train(small, tmp_path):
    more = make_synthetic_dataset(tmp_path / "more", seed=0, **{**SMALL, "num_train": 1})
    a, b = _all_files(small), _all_files(more)
    val = [n for n in a if "val2017" in n]
    assert val and all(a[n] == b[n] for n in val)


# --------------------------------------------------------------------------------------------
# Layout


def test_exact_coco_panoptic_layout(small):
    assert sorted(p.name for p in small.iterdir()) == [
        ".samcp-output",
        "annotations",
        "classes.txt",
        "classes_seen.txt",
        "semantic_train2017",
        "semantic_val2017",
        "train2017",
        "val2017",
    ]
    assert sorted(p.name for p in (small / "annotations").iterdir()) == [
        "panoptic_train2017",
        "panoptic_train2017.json",
        "panoptic_val2017",
        "panoptic_val2017.json",
    ]
    all_ids: list[int] = []
    for split in SPLITS:
        doc = json.loads((small / "annotations" / f"panoptic_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(doc)
        stems = [Path(im["file_name"]).stem for im in doc["images"]]
        assert [im["file_name"] for im in doc["images"]] == [f"{s}.jpg" for s in stems]
        assert [a["file_name"] for a in doc["annotations"]] == [f"{s}.png" for s in stems]
        assert [a["image_id"] for a in doc["annotations"]] == [im["id"] for im in doc["images"]]
        # Every file the JSON names exists, and nothing else is there.
        assert sorted(p.name for p in (small / split).iterdir()) == sorted(
            f"{s}.jpg" for s in stems
        )
        for folder in (small / "annotations" / f"panoptic_{split}", small / f"semantic_{split}"):
            assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.png" for s in stems)
        for im in doc["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"  # COCO's naming
            with Image.open(small / split / im["file_name"]) as jpg:
                assert jpg.format == "JPEG" and jpg.mode == "RGB"
                assert jpg.size == (im["width"], im["height"]) == (128, 96)
        all_ids += [im["id"] for im in doc["images"]]
    assert len(set(all_ids)) == len(all_ids)  # train and val ids are disjoint, as in COCO
    # The build folder was renamed into place: no temporary sibling is left behind.
    assert sorted(p.name for p in small.parent.iterdir()) == ["ds"]


def test_categories_things_and_stuff():
    cats = synth_categories()
    assert [c["id"] for c in cats] == sorted(c["id"] for c in cats)
    assert len({c["id"] for c in cats}) == len(cats) and len({c["name"] for c in cats}) == len(cats)
    assert sum(c["isthing"] == 1 for c in cats) >= 6
    assert sum(c["isthing"] == 0 for c in cats) >= 3
    for c in cats:
        assert c["isthing"] in (0, 1)
        assert len(c["color"]) == 3 and all(
            isinstance(v, int) and 0 <= v <= 255 for v in c["color"]
        )
    assert len({tuple(c["color"]) for c in cats}) == len(cats)
    # Ids have gaps on purpose, so a consumer that treats ids as indices is caught.
    assert [c["id"] for c in cats] != list(range(1, len(cats) + 1))


# --------------------------------------------------------------------------------------------
# Ground truth consistency


@pytest.mark.parametrize("which", ["small", "default_size"])
def test_panoptic_png_and_segments_info_agree(which, request):
    root = request.getfixturevalue(which)
    cat_ids = {c["id"] for c in synth_categories()}
    n_images = 0
    for split in SPLITS:
        for im, ann, ids, _, _ in _samples(root, split):
            n_images += 1
            assert ids.shape == (im["height"], im["width"])
            info = {s["id"]: s for s in ann["segments_info"]}
            assert len(info) == len(ann["segments_info"])  # ids unique within the image
            assert 0 not in info
            present = set(np.unique(ids).tolist()) - {0}
            assert present == set(info)  # every PNG id is listed, every listed id is drawn
            for sid, s in info.items():
                mask = ids == sid
                assert s["area"] == int(mask.sum())
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                assert s["bbox"] == [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
                assert s["category_id"] in cat_ids
                assert s["iscrowd"] in (0, 1)
    assert n_images > 0


def test_semantic_pngs_match_panoptic(small, default_size):
    contiguous = {c["id"]: i for i, c in enumerate(synth_categories())}
    crowd_pixels = 0
    for root in (small, default_size):
        for split in SPLITS:
            for _, ann, ids, _, sem in _samples(root, split):
                assert sem.dtype == np.uint8 and sem.shape == ids.shape
                expected = np.full(ids.shape, 255, dtype=np.uint8)
                for s in ann["segments_info"]:
                    expected[ids == s["id"]] = contiguous[s["category_id"]]
                    if s["iscrowd"]:
                        crowd_pixels += int((ids == s["id"]).sum())
                np.testing.assert_array_equal(sem, expected)
    # Crowd pixels carry their class (not 255), which the comparison above checked on these.
    assert crowd_pixels > 0


def test_default_set_has_crowds_void_and_many_instances(default_size):
    isthing = {c["id"]: c["isthing"] for c in synth_categories()}
    crowd, void, instances = 0, 0, []
    for _, ann, ids, _, _ in _samples(default_size, "val2017"):
        crowd += sum(s["iscrowd"] for s in ann["segments_info"])
        void += int((ids == 0).sum())
        instances.append(
            sum(isthing[s["category_id"]] and not s["iscrowd"] for s in ann["segments_info"])
        )
        stuff = [s for s in ann["segments_info"] if not isthing[s["category_id"]]]
        assert stuff and all(s["iscrowd"] == 0 for s in stuff)
        # Crowd segments are always things, as in COCO.
        assert all(isthing[s["category_id"]] for s in ann["segments_info"] if s["iscrowd"])
    assert crowd >= 1
    assert void > 0
    assert min(instances) >= 2 and np.mean(instances) >= 3


def test_things_touch_or_occlude_each_other(default_size):
    """Two different thing segments are 4-neighbours somewhere, in most images."""
    isthing = {c["id"]: c["isthing"] for c in synth_categories()}
    touching = []
    for _, ann, ids, _, _ in _samples(default_size, "val2017"):
        things = [s["id"] for s in ann["segments_info"] if isthing[s["category_id"]]]
        is_thing = np.isin(ids, things)
        right = is_thing[:, :-1] & is_thing[:, 1:] & (ids[:, :-1] != ids[:, 1:])
        down = is_thing[:-1] & is_thing[1:] & (ids[:-1] != ids[1:])
        touching.append(bool(right.any() or down.any()))
    assert sum(touching) >= len(touching) // 2 + 1


def test_segments_are_textured_not_flat(default_size):
    flat = {c.id for c in SYNTH_CLASSES if c.texture == "flat"}
    checked = 0
    for _, ann, ids, rgb, _ in _samples(default_size, "val2017"):
        grey = rgb.astype(np.float32).mean(-1)
        for s in ann["segments_info"]:
            # The interior only: a boundary pixel mixes two segments (and JPEG blurs edges).
            inner = ndimage.binary_erosion(ids == s["id"], iterations=2)
            if inner.sum() < 30:
                continue
            std = float(grey[inner].std())
            assert std > (1.5 if s["category_id"] in flat else 5.0), (s, std)
            checked += 1
    assert checked >= 20


def test_class_colours_are_what_the_categories_say(default_size):
    """A segment's mean colour is nearest to its own category's colour for most segments."""
    cats = synth_categories()
    colours = np.array([c["color"] for c in cats], dtype=np.float32)
    index = {c["id"]: i for i, c in enumerate(cats)}
    hits, total = 0, 0
    for _, ann, ids, rgb, _ in _samples(default_size, "val2017"):
        for s in ann["segments_info"]:
            inner = ndimage.binary_erosion(ids == s["id"], iterations=2)
            if inner.sum() < 30:
                continue
            mean = rgb[inner].astype(np.float32).mean(0)
            hits += int(
                np.argmin(np.linalg.norm(colours - mean, axis=1)) == index[s["category_id"]]
            )
            total += 1
    assert total >= 20 and hits / total >= 0.8


def test_classes_txt_matches_categories(small):
    vocab_mod = pytest.importorskip("samcp.pipeline.vocab")
    vocab = vocab_mod.read_vocabulary(small / "classes.txt")
    cats = synth_categories()
    assert list(vocab.ids) == [c["id"] for c in cats]
    assert [n[0] for n in vocab.names] == [c["name"] for c in cats]
    assert all(len(n) >= 2 for n in vocab.names)  # every class has at least one synonym
    for line in (small / "classes.txt").read_text().splitlines():
        cid, _, names = line.partition(":")
        assert cid.isdigit() and names and "" not in names.split(",")


# --------------------------------------------------------------------------------------------
# Refusals and the CLI


def test_refuses_non_empty_out_without_overwrite(small, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SamcpError, match="overwrite"):
        make_synthetic_dataset(out, **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces only a dataset samcp wrote: a folder it did not make is never emptied.
    with pytest.raises(SamcpError, match="samcp did not make"):
        make_synthetic_dataset(out, seed=0, overwrite=True, **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    ours = tmp_path / "ours"
    make_synthetic_dataset(ours, seed=5, **SMALL)
    make_synthetic_dataset(ours, seed=0, overwrite=True, **SMALL)
    assert _all_files(ours) == _all_files(small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ours"]  # no .old / .tmp left


def test_empty_out_folder_is_fine(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    assert make_synthetic_dataset(out, num_train=1, num_val=0, height=32, width=32) == out
    assert (out / "annotations" / "panoptic_train2017.json").is_file()
    assert json.loads((out / "annotations" / "panoptic_val2017.json").read_text())["images"] == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train=0, num_val=0), "num-train"),
        (dict(num_train=-1), "num-train"),
        (dict(height=16), "too small"),
        (dict(min_instances=5, max_instances=2), "instances"),
        (dict(crowd_fraction=1.5), "crowd-fraction"),
    ],
)
def test_bad_parameters_raise(tmp_path, kwargs, match):
    with pytest.raises(SamcpError, match=match):
        make_synthetic_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SamcpError, match="is a file"):
        make_synthetic_dataset(tmp_path / "f", overwrite=True, **SMALL)


def test_cli_writes_the_same_set(tmp_path):
    from samcp.cli.main import cli

    args = ["--seed", "3", "--num-train", "1", "--num-val", "2", "--height", "48", "--width", "64"]
    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "cli"), *args])
    assert result.exit_code == 0, result.output
    assert "1 train + 2 val" in result.output
    ref = make_synthetic_dataset(
        tmp_path / "ref", seed=3, num_train=1, num_val=2, height=48, width=64
    )
    assert _all_files(tmp_path / "cli") == _all_files(ref)


def test_cli_refuses_non_empty_out_with_a_one_line_error(tmp_path, capsys):
    from samcp.cli.main import main

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path / "ds"), "--num-train", "1", "--num-val", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--overwrite" in err and "Traceback" not in err
