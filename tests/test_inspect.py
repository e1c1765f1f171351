"""`samcp inspect` on a real cache with a failed row and an interrupted (incomplete) shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from samcp.cli.main import main as samcp_main
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.inspect import AREA_PERCENTILES, _array_bytes, summarize_cache

BAD_ID = "500003"  # its file is corrupted before precompute -> a failed row in shard 00001


def build_cache(tmp: Path, slic_cache_factory) -> Path:
    """5 val images in shards of 2 (00000, 00001, 00002); image 500003 unreadable; the last shard
    replaced by a half-written group (no complete=true), as an interrupted worker leaves it."""
    _, cache = slic_cache_factory(tmp, seed=5, corrupt=(BAD_ID,))
    shards = zarr.open_group(str(cache / "shards"), mode="r+")
    del shards["00002"]
    g = shards.create_group("00002")
    g.attrs["complete"] = False
    g.create_array("image_id", shape=(1,), dtype="int32")
    return cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, slic_cache_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("inspect"), slic_cache_factory)


def test_counts_match_a_direct_read(cache):
    s = summarize_cache(cache)
    reader = CacheReader(cache)
    rows = list(reader.iter_images(include_failed=True, prefetch=0))
    ok = [r for r in rows if r.status == 0]
    counts = np.array([len(r.proposals) for r in ok])

    assert reader.shard_ids == ["00000", "00001"]
    assert s.images == len(rows) == 4
    assert s.images_ok == len(ok) == 3
    assert s.masks == counts.sum() > 0
    mpi = s.masks_per_image
    assert (mpi["min"], mpi["median"], mpi["max"]) == (
        counts.min(),
        float(np.median(counts)),
        counts.max(),
    )
    assert sum(b["count"] for b in mpi["histogram"]) == len(ok)

    fracs = np.concatenate([r.proposals.area / (r.height * r.width) for r in ok])
    want = np.percentile(fracs, AREA_PERCENTILES)
    got = [s.mask_area_fraction["percentiles"][f"p{p}"] for p in AREA_PERCENTILES]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert sum(b["count"] for b in s.mask_area_fraction["histogram"]) == len(fracs)


def test_failed_row_and_incomplete_shard_are_reported(cache):
    s = summarize_cache(cache)
    assert s.failed_count == 1
    (f,) = s.failed
    assert f["image_id"] == BAD_ID and f["shard"] == "00001"
    assert "Error" in f["error"]  # e.g. "UnidentifiedImageError: cannot identify image file ..."
    assert s.incomplete_shards == ["00002"]
    assert s.shards_complete == 2 and s.shards_planned == 3 and s.missing_shards == []

    text = "\n".join(s.lines())
    assert BAD_ID in text and f["error"] in text
    assert "2 complete, 1 incomplete, 0 not started of 3 planned" in text
    assert any(line.lstrip().startswith("incomplete") and "00002" in line for line in s.lines())


def test_max_failures_limits_the_list_not_the_count(cache):
    s = summarize_cache(cache, max_failures=0)
    assert s.failed_count == 1 and s.failed == []


def test_never_started_shard_is_reported(tmp_path, cache):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache, copy)
    shutil.rmtree(copy / "shards" / "00002")
    s = summarize_cache(copy)
    assert s.incomplete_shards == [] and s.missing_shards == ["00002"]


def test_bytes_are_the_files_of_complete_shards(cache):
    s = summarize_cache(cache)
    # Every array folder of both shards, shard-level zarr.json excluded.
    per_array = sum(
        p.stat().st_size
        for sid in ("00000", "00001")
        for d in (cache / "shards" / sid).iterdir()
        if d.is_dir()
        for p in d.rglob("*")
        if p.is_file()
    )
    assert s.bytes_source == "files"
    assert s.bytes_total == per_array
    assert {"rle", "bbox", "area", "mask_offset", "image_id"} <= set(s.bytes_by_array)
    assert s.bytes_by_array["rle"] > 0
    np.testing.assert_allclose(s.bytes_per_image["rle"], s.bytes_by_array["rle"] / s.images)


def test_non_local_fallback_uses_zarr_nbytes_stored(cache):
    g = zarr.open_group(str(cache / "shards" / "00000"), mode="r")
    stored = _array_bytes(g, None)
    on_disk = _array_bytes(g, str(cache / "shards" / "00000"))
    assert set(stored) == set(on_disk)
    assert stored["rle"] > 0


def test_schedulers_agree(cache):
    a = summarize_cache(cache, scheduler="threads").to_dict()
    b = summarize_cache(cache, scheduler="synchronous").to_dict()
    assert a == b
    with pytest.raises(SamcpError, match="scheduler"):
        summarize_cache(cache, scheduler="processes")


def test_cli_json_parses_and_matches(cache, capsys):
    samcp_main(["inspect", str(cache), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"]["total"] == 4 and doc["images"]["failed"] == 1
    assert doc["images"]["failed_listed"][0]["image_id"] == BAD_ID
    assert doc["shards"]["incomplete"] == ["00002"]
    assert doc["models"]["proposals"]["source"] == "slic"
    assert doc["models"]["sam"] is None
    assert doc["dataset"]["num_images"] == 5 and doc["dataset"]["shard_size"] == 2
    assert doc == json.loads(json.dumps(summarize_cache(cache).to_dict()))


def test_cli_text(cache, capsys):
    samcp_main(["inspect", str(cache)])
    out = capsys.readouterr().out
    assert "slic" in out and BAD_ID in out and "00002" in out
    assert "masks/image" in out and "area/image" in out


def test_not_a_cache_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        samcp_main(["inspect", str(tmp_path / "nothing.zarr")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
