"""The proposal cache: what the writer stores, the reader returns."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samcp.pipeline import cache as cache_io
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.proposals.base import Proposals, encode_masks

ATTRS = {"proposals": {"source": "slic"}, "sam": None, "clip": None, "dataset": {"n": 3}}


def _random_proposals(rng, h, w, m) -> tuple[Proposals, np.ndarray]:
    masks = rng.random((m, h, w)) > rng.random((m, 1, 1))
    masks[0] = False  # an empty mask survives the round trip too
    props = Proposals.from_rles(
        h, w, encode_masks(masks), rng.random(m), rng.random(m), rng.random((m, 2)) * [w, h]
    )
    return props, masks


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "c.zarr"
    assert cache_io.init_cache(path, ATTRS) == set()
    p1, m1 = _random_proposals(rng, 20, 30, 5)
    p2, m2 = _random_proposals(rng, 17, 11, 3)
    rows = [
        cache_io.ImageResult(
            "a",
            20,
            30,
            p1,
            image_arrays={"feat": rng.random((4, 2, 3)).astype(np.float16)},
            mask_arrays={"emb": rng.random((5, 8)).astype(np.float16)},
        ),
        cache_io.ImageResult("b/x", 9, 9, error="OSError: cannot identify image file"),
        cache_io.ImageResult(
            "c",
            17,
            11,
            p2,
            image_arrays={"feat": rng.random((4, 2, 3)).astype(np.float16)},
            mask_arrays={"emb": rng.random((3, 8)).astype(np.float16)},
        ),
    ]
    assert cache_io.write_shard(path, "00000", rows) == 8
    reader = cache_io.CacheReader(path)
    assert reader.shard_ids == ["00000"] and len(reader) == 3
    assert reader.attrs["samcp_cache_version"] == cache_io.CACHE_VERSION
    got = reader.read_shard("00000")
    assert [g.image_id for g in got] == ["a", "b/x", "c"]
    assert [g.status for g in got] == [0, 1, 0]
    assert got[1].error.startswith("OSError") and len(got[1].proposals) == 0
    for src, g, masks in [(rows[0], got[0], m1), (rows[2], got[2], m2)]:
        assert (g.height, g.width) == (src.height, src.width)
        assert g.proposals.rles == src.proposals.rles
        for name in ("bbox", "area", "predicted_iou", "stability_score", "point_coords"):
            np.testing.assert_array_equal(getattr(g.proposals, name), getattr(src.proposals, name))
        np.testing.assert_array_equal(g.proposals.decode(), masks)
        np.testing.assert_array_equal(
            mask_utils.decode(g.rles).transpose(2, 0, 1).astype(bool), masks
        )
        np.testing.assert_array_equal(g.image_arrays["feat"], src.image_arrays["feat"])
        np.testing.assert_array_equal(g.mask_arrays["emb"], src.mask_arrays["emb"])
    # The failed row keeps zeros in per-image arrays so that rows stay aligned.
    assert not got[1].image_arrays["feat"].any()
    assert [r.image_id for r in reader.iter_images()] == ["a", "c"]
    assert [r.image_id for r in reader.iter_images(include_failed=True)] == ["a", "b/x", "c"]
    assert reader.get("c").proposals.rles == p2.rles


def test_incomplete_shard_is_invisible_and_redone(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "c.zarr"
    cache_io.init_cache(path, ATTRS)
    p, _ = _random_proposals(rng, 8, 8, 2)
    cache_io.write_shard(path, "00000", [cache_io.ImageResult("a", 8, 8, p)])
    # A worker that died mid-write leaves a group without complete=true.
    root = cache_io._open_root(path, "r+")
    partial = root["shards"].create_group("00001")
    partial.create_array("image_id", shape=(1,), dtype="int32")
    reader = cache_io.CacheReader(path)
    assert reader.shard_ids == ["00000"] and reader.incomplete_shard_ids == ["00001"]
    assert cache_io.init_cache(path, ATTRS) == {"00000"}
    cache_io.write_shard(path, "00001", [cache_io.ImageResult("b", 8, 8, p)])
    assert [r.image_id for r in cache_io.CacheReader(path).iter_images(prefetch=0)] == ["a", "b"]


def test_resume_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    cache_io.init_cache(path, ATTRS)
    other = {**ATTRS, "sam": {"model": "vit_b", "checkpoint_sha256": "ab"}}
    with pytest.raises(SamcpError, match="different sam"):
        cache_io.init_cache(path, other)
    assert cache_io.init_cache(path, other, overwrite=True) == set()
    assert cache_io.CacheReader(path).attrs["sam"]["model"] == "vit_b"


def test_reader_errors(tmp_path):
    with pytest.raises(SamcpError, match="run `samcp precompute` first"):
        cache_io.CacheReader(tmp_path / "nothing")
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w").attrs["x"] = 1
    with pytest.raises(SamcpError, match="not a samcp cache"):
        cache_io.CacheReader(tmp_path / "plain")
    g = zarr.open_group(str(tmp_path / "future"), mode="w")
    g.attrs["samcp_cache_version"] = 99
    with pytest.raises(SamcpError, match="format version 99"):
        cache_io.CacheReader(tmp_path / "future")
