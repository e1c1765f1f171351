"""Tests for samcp.pipeline.datasets: the COCO panoptic reader (on a synthetic set), JSONL
manifests, open_image_source, shard_records and load_image_rgb."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samcp.pipeline.datasets import (
    VOID_LABEL,
    CocoPanopticDataset,
    ImageRecord,
    load_image_rgb,
    open_image_source,
    read_manifest,
    rgb_to_id,
    shard_records,
    write_manifest,
)
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.synth import make_synthetic_dataset, synth_categories

# Not square, so a swapped height/width shows.
H, W = 48, 80


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ds") / "synth", seed=2, num_train=2, num_val=3, height=H, width=W
    )


@pytest.fixture
def synth_copy(synth, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(synth, tmp_path / "copy"))


def _records(folder: Path, n: int = 3) -> list[ImageRecord]:
    return [
        ImageRecord(
            image_id=f"img{i}", file_name=str(folder / f"sub/{i}.jpg"), height=10 + i, width=20 + i
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# CocoPanopticDataset


def test_rgb_to_id_uses_all_three_channels():
    rgb = np.array([[[0, 0, 0], [1, 2, 3], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb_to_id(rgb), [[0, 1 + 2 * 256 + 3 * 65536, 256**3 - 1]])
    assert rgb_to_id(rgb).dtype == np.int32


@pytest.mark.parametrize("split, n, first_id", [("val2017", 3, 500001), ("train2017", 2, 1)])
def test_records(synth, split, n, first_id):
    ds = CocoPanopticDataset(synth, split)
    assert len(ds) == len(ds.records) == n
    assert [r.image_id for r in ds.records] == [str(first_id + k) for k in range(n)]
    for r in ds.records:
        assert isinstance(r.image_id, str)
        path = Path(r.file_name)
        assert path.is_absolute() and path.is_file() and path.parent == synth / split
        with Image.open(path) as im:
            assert im.size == (r.width, r.height) == (W, H)


def test_relative_root_gives_absolute_paths(synth, monkeypatch):
    monkeypatch.chdir(synth.parent)
    ds = CocoPanopticDataset("synth", "val2017")
    assert all(Path(r.file_name).is_absolute() and Path(r.file_name).is_file() for r in ds.records)


def test_categories(synth):
    ds = CocoPanopticDataset(synth)
    assert ds.categories == synth_categories()
    assert ds.category_index == {c["id"]: i for i, c in enumerate(synth_categories())}


def test_load_panoptic_round_trip(synth):
    ds = CocoPanopticDataset(synth, "val2017")
    doc = json.loads((synth / "annotations" / "panoptic_val2017.json").read_text())
    for ann in doc["annotations"]:
        id_map, segments = ds.load_panoptic(ann["image_id"])
        png = synth / "annotations" / "panoptic_val2017" / ann["file_name"]
        rgb = np.asarray(Image.open(png)).astype(np.int64)
        expected = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert id_map.dtype == np.int32 and id_map.shape == (H, W)
        np.testing.assert_array_equal(id_map, expected)
        assert segments == ann["segments_info"]
        assert set(np.unique(id_map).tolist()) - {0} == {s["id"] for s in segments}
        # String and int ids address the same image.
        np.testing.assert_array_equal(ds.load_panoptic(str(ann["image_id"]))[0], id_map)


def test_load_semantic_from_png_and_derived(synth, tmp_path):
    ds = CocoPanopticDataset(synth, "val2017")
    assert ds.semantic_dir == synth / "semantic_val2017"
    # Pointing at a folder without the PNGs makes the reader derive labels from the panoptic PNG.
    derived = CocoPanopticDataset(synth, "val2017", semantic_dir=tmp_path / "none")
    for r in ds.records:
        sem = ds.load_semantic(r.image_id)
        stem = Path(r.file_name).stem
        png = np.asarray(Image.open(synth / "semantic_val2017" / f"{stem}.png"))
        assert sem.dtype == np.uint8 and sem.shape == (H, W)
        np.testing.assert_array_equal(sem, png)
        np.testing.assert_array_equal(derived.load_semantic(r.image_id), png)
        assert (sem == VOID_LABEL).any()  # the synthetic set has void pixels in every image


def test_semantic_mask2former_folder_is_found(synth_copy):
    (synth_copy / "semantic_val2017").rename(synth_copy / "panoptic_semseg_val2017")
    ds = CocoPanopticDataset(synth_copy, "val2017")
    assert ds.semantic_dir == synth_copy / "panoptic_semseg_val2017"
    (synth_copy / "panoptic_semseg_val2017").rename(synth_copy / "elsewhere")
    assert CocoPanopticDataset(synth_copy, "val2017").semantic_dir is None


def test_derived_semantic_treats_unlisted_ids_as_void(synth_copy):
    path = synth_copy / "annotations" / "panoptic_val2017.json"
    doc = json.loads(path.read_text())
    dropped = doc["annotations"][0]["segments_info"].pop()
    path.write_text(json.dumps(doc))
    ds = CocoPanopticDataset(synth_copy, "val2017", semantic_dir=synth_copy / "none")
    image_id = doc["annotations"][0]["image_id"]
    id_map, _ = ds.load_panoptic(image_id)
    sem = ds.load_semantic(image_id)
    assert (sem[id_map == dropped["id"]] == VOID_LABEL).all()


def test_image_path_and_annotation(synth):
    ds = CocoPanopticDataset(synth, "val2017")
    r = ds.records[1]
    assert ds.image_path(r.image_id) == Path(r.file_name) == ds.image_path(int(r.image_id))
    ann = ds.annotation(r.image_id)
    assert str(ann["image_id"]) == r.image_id
    assert ann["file_name"] == f"{Path(r.file_name).stem}.png"
    with pytest.raises(KeyError, match="not in"):
        ds.image_path("999")
    with pytest.raises(KeyError):
        ds.annotation(1)  # a train id is not in val


def test_records_sorted_by_numeric_id(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 4, "width": 5} for i in (10, 9, 100)]
    doc = {"images": images, "annotations": [], "categories": []}
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    ds = CocoPanopticDataset(tmp_path)
    assert [r.image_id for r in ds.records] == ["9", "10", "100"]  # not "10", "100", "9"


def test_missing_panoptic_png(synth_copy):
    ds = CocoPanopticDataset(synth_copy, "val2017")
    image_id = ds.records[0].image_id
    png = ds.panoptic_dir / ds.annotation(image_id)["file_name"]
    png.unlink()
    with pytest.raises(SamcpError, match="not found") as exc:
        ds.load_panoptic(image_id)
    assert str(png) in str(exc.value) and "panoptic_val2017.zip" in str(exc.value)


def test_panoptic_png_of_the_wrong_size(synth_copy):
    ds = CocoPanopticDataset(synth_copy, "val2017")
    image_id = ds.records[0].image_id
    png = ds.panoptic_dir / ds.annotation(image_id)["file_name"]
    Image.new("RGB", (W + 1, H)).save(png)
    with pytest.raises(SamcpError, match=f"{W + 1}x{H}.*{W}x{H}"):
        ds.load_panoptic(image_id)


def test_wrong_split(synth):
    with pytest.raises(SamcpError, match="panoptic_test2017.json") as exc:
        CocoPanopticDataset(synth, "test2017")
    assert "--split" in str(exc.value)


def test_missing_image_folder(synth_copy):
    shutil.rmtree(synth_copy / "val2017")
    with pytest.raises(SamcpError, match="image folder"):
        CocoPanopticDataset(synth_copy, "val2017")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"images": [], "annotations": []}', "not a COCO panoptic file"),
        ("[1, 2]", "not a COCO panoptic file"),
        ("5", "not a COCO panoptic file"),
    ],
)
def test_bad_json(synth_copy, text, match):
    (synth_copy / "annotations" / "panoptic_val2017.json").write_text(text)
    with pytest.raises(SamcpError, match=match):
        CocoPanopticDataset(synth_copy, "val2017")


# --------------------------------------------------------------------------------------------
# Manifests


def test_manifest_round_trip_relative(tmp_path, monkeypatch):
    records = _records(tmp_path)
    path = write_manifest(records, tmp_path / "m.jsonl")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "image_id": "img0",
        "file_name": "sub/0.jpg",
        "width": 20,
        "height": 10,
    }
    # Relative names resolve against the manifest's folder, not the working directory.
    monkeypatch.chdir(tmp_path / "..")
    assert read_manifest(path) == records
    # The manifest and its images move together.
    moved = Path(shutil.move(str(tmp_path), str(tmp_path.parent / "moved")))
    assert [Path(r.file_name) for r in read_manifest(moved / "m.jsonl")] == [
        moved / f"sub/{i}.jpg" for i in range(3)
    ]


def test_manifest_round_trip_absolute(tmp_path):
    records = _records(tmp_path / "images")
    path = write_manifest(records, tmp_path / "manifests" / "m.jsonl")  # creates the folder
    assert json.loads(path.read_text().splitlines()[2])["file_name"] == records[2].file_name
    assert read_manifest(path) == records
    assert not [p for p in path.parent.iterdir() if p.name != "m.jsonl"]  # no temporary file


def test_manifest_int_ids_and_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"image_id": 7, "file_name": "a.jpg", "width": 3, "height": 2}\n\n  \n'
        '{"image_id": "b", "file_name": "/abs/b.png", "width": 1, "height": 1}\n'
    )
    assert read_manifest(path) == [
        ImageRecord("7", str(tmp_path / "a.jpg"), 2, 3),
        ImageRecord("b", "/abs/b.png", 1, 1),
    ]


GOOD = '{"image_id": "a", "file_name": "a.jpg", "width": 4, "height": 3}'


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"image_id": "b", "file_name": ', "not valid JSON"),
        ('["b", "b.jpg", 4, 3]', "expected a JSON object"),
        ('{"image_id": "b", "width": 4, "height": 3}', "missing key.*file_name"),
        ('{"file_name": "b.jpg"}', "missing key.*image_id, width, height"),
        ('{"image_id": null, "file_name": "b.jpg", "width": 4, "height": 3}', "image_id"),
        ('{"image_id": "", "file_name": "b.jpg", "width": 4, "height": 3}', "image_id"),
        ('{"image_id": true, "file_name": "b.jpg", "width": 4, "height": 3}', "image_id"),
        ('{"image_id": "b", "file_name": 5, "width": 4, "height": 3}', "file_name"),
        ('{"image_id": "b", "file_name": "", "width": 4, "height": 3}', "file_name"),
        ('{"image_id": "b", "file_name": "b.jpg", "width": "4", "height": 3}', "width"),
        ('{"image_id": "b", "file_name": "b.jpg", "width": 4, "height": 0}', "height"),
        ('{"image_id": "b", "file_name": "b.jpg", "width": 4.0, "height": 3}', "width"),
        ('{"image_id": "b", "file_name": "b.jpg", "width": true, "height": 3}', "width"),
        ('{"image_id": "a", "file_name": "b.jpg", "width": 4, "height": 3}', "duplicate.*line 1"),
    ],
)
def test_malformed_manifest_names_file_and_line(tmp_path, bad, match):
    path = tmp_path / "m.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n")  # the bad object is on line 3
    with pytest.raises(SamcpError, match=match) as exc:
        read_manifest(path)
    assert f"{path}:3:" in str(exc.value)


def test_duplicate_ids_across_int_and_string(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"image_id": 1, "file_name": "a.jpg", "width": 4, "height": 3}\n'
        '{"image_id": "1", "file_name": "b.jpg", "width": 4, "height": 3}\n'
    )
    with pytest.raises(SamcpError, match=f"{path}:2: duplicate image_id '1'"):
        read_manifest(path)


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(SamcpError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SamcpError, match="lists no images"):
        read_manifest(tmp_path / "empty.jsonl")


# --------------------------------------------------------------------------------------------
# open_image_source


def test_open_image_source_dispatch(synth, tmp_path):
    manifest = write_manifest(_records(tmp_path), tmp_path / "m.jsonl")
    assert open_image_source(manifest) == read_manifest(manifest)
    assert open_image_source(synth) == CocoPanopticDataset(synth, "val2017").records
    assert open_image_source(synth, "train2017") == CocoPanopticDataset(synth, "train2017").records
    with pytest.raises(SamcpError, match="does not exist"):
        open_image_source(tmp_path / "missing")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(SamcpError, match="neither a .jsonl manifest nor a dataset folder"):
        open_image_source(tmp_path / "list.txt")
    with pytest.raises(SamcpError, match="panoptic_val2017.json"):
        open_image_source(tmp_path)  # a folder, but not a dataset


# --------------------------------------------------------------------------------------------
# Sharding


def test_shard_records():
    records = _records(Path("/data"), n=7)
    shards = shard_records(records, 3)
    assert [sid for sid, _ in shards] == ["00000", "00001", "00002"]
    assert [len(chunk) for _, chunk in shards] == [3, 3, 1]
    assert [r for _, chunk in shards for r in chunk] == records  # in order, each exactly once
    assert shard_records(records, 3) == shards
    assert shard_records(tuple(records), 3) == shards
    assert shard_records(records, 7) == [("00000", records)]
    assert shard_records(records, 100) == [("00000", records)]
    assert [len(c) for _, c in shard_records(records, 1)] == [1] * 7
    assert shard_records([], 3) == []


@pytest.mark.parametrize("size", [0, -1, True, 2.5, "3"])
def test_shard_size_must_be_positive_int(size):
    with pytest.raises(SamcpError, match="shard size"):
        shard_records(_records(Path("/data")), size)


# --------------------------------------------------------------------------------------------
# load_image_rgb


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_load_image_rgb_reads_rgb(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("fmt, keep", [("PNG", 0.5), ("JPEG", 0.5), ("JPEG", 0.02)])
def test_load_image_rgb_truncated(tmp_path, fmt, keep):
    data = _encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises((OSError, ValueError)):
        load_image_rgb(path)


def test_load_image_rgb_corrupt_and_missing(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"this is not an image")
    with pytest.raises((OSError, ValueError)):
        load_image_rgb(tmp_path / "x.jpg")
    with pytest.raises(OSError):
        load_image_rgb(tmp_path / "missing.jpg")


def test_load_image_rgb_grayscale_and_rgba(tmp_path):
    grey = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9) * 4
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = load_image_rgb(tmp_path / "g.png")
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)

    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = load_image_rgb(tmp_path / "a.png")
    assert out.shape == (4, 5, 3) and (out[..., 0] == 200).all()


def test_load_image_rgb_16bit_grayscale_is_rescaled(tmp_path):
    grey = np.array([[0, 257, 1000], [32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    out = load_image_rgb(tmp_path / "g16.png")
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    # Not clipped to 255: 1000/65535 is about 4/255.
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 4], [128, 254, 255]])
