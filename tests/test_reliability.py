"""Bad input never destroys data, never trains on the wrong labels, never ends in a traceback.

Every test drives the real `samcp` entry point (`samcp.cli.main.main`) and checks the exit code,
the one-line message and that nothing was lost or half-written. docs/reliability.md lists them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from samcp.cli.main import main
from samcp.pipeline.synth import make_synthetic_dataset


@pytest.fixture(autouse=True)
def _text_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCP_CACHE_DIR", str(tmp_path / "samcp-cache"))


def run_cli(capsys, *args) -> tuple[int, str]:
    """Runs `samcp ARGS`; returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 4-image synthetic val set and its SLIC cache (read-only for tests)."""
    root = tmp_path_factory.mktemp("small")
    data = make_synthetic_dataset(
        root / "ds", seed=1, num_train=0, num_val=4, height=64, width=96
    )
    code = _quiet_main(
        ["precompute", str(data), "--out", str(root / "cache.zarr"), "--proposals", "slic",
         "--num-workers", "0", "--shard-size", "2", "--no-progress"]
    )
    assert code == 0
    return data, root / "cache.zarr"


def _quiet_main(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _precompute(*args) -> list:
    return ["precompute", *args, "--proposals", "slic", "--num-workers", "0", "--no-progress"]


# ---- data loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_precompute_never_empties_a_folder_that_is_not_a_cache(small, tmp_path, capsys, overwrite):
    data, _ = small
    victim = tmp_path / "mine"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("precious")
    (victim / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = snapshot(victim)
    code, err = run_cli(
        capsys, *_precompute(data, "--out", victim, *(["--overwrite"] if overwrite else []))
    )
    assert_one_line_error(code, err, "samcp did not make", str(victim))
    assert snapshot(victim) == before


def test_precompute_refuses_the_source_folder_itself(small, tmp_path, capsys):
    data, _ = small
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    before = snapshot(copy)
    code, err = run_cli(capsys, *_precompute(copy, "--out", copy, "--overwrite"))
    assert_one_line_error(code, err, "not a proposal cache")  # it is samcp's synthetic dataset
    assert snapshot(copy) == before


def test_precompute_overwrite_replaces_a_samcp_cache(small, tmp_path, capsys):
    data, cache = small
    mine = tmp_path / "c.zarr"
    shutil.copytree(cache, mine)
    (mine / "shards" / "00000" / "stale").write_text("left by an older run")
    code, err = run_cli(capsys, *_precompute(data, "--out", mine, "--overwrite", "--shard-size", 4))
    assert code == 0, err
    assert not (mine / "shards" / "00000" / "stale").exists()
    assert sorted(p.name for p in (mine / "shards").iterdir() if p.is_dir()) == ["00000"]


@pytest.mark.parametrize(
    "command",
    [
        lambda d, c, o: _precompute(d, "--out", o),
        lambda d, c, o: ["synth", o, "--num-train", "0", "--num-val", "1"],
        lambda d, c, o: ["demo", "--out", o],
        lambda d, c, o: ["train", "--cache", c, "--dataset", d, "--split", "val2017", "--out", o],
    ],
    ids=["precompute", "synth", "demo", "train"],
)
@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_a_file_is_one_line(small, tmp_path, capsys, command, where):
    data, cache = small
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = f if where == "file" else f / "sub"
    code, err = run_cli(capsys, *command(data, cache, out))
    assert_one_line_error(code, err, str(out))
    assert f.read_text() == "x"


def test_synth_overwrite_replaces_only_its_own_dataset(tmp_path, capsys):
    args = ["--num-train", "0", "--num-val", "1", "--height", "48", "--width", "64"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("mine")
    code, err = run_cli(capsys, "synth", foreign, *args, "--overwrite")
    assert_one_line_error(code, err, "samcp did not make")
    assert (foreign / "a.txt").read_text() == "mine"
    assert run_cli(capsys, "synth", tmp_path / "ds", *args)[0] == 0
    code, err = run_cli(capsys, "synth", tmp_path / "ds", *args, "--seed", "5")
    assert_one_line_error(code, err, "--overwrite")
    assert run_cli(capsys, "synth", tmp_path / "ds", *args, "--seed", "5", "--overwrite")[0] == 0


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("x")
    code, err = run_cli(capsys, "demo", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "samcp did not make")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["thesis.tex"]


# ---- training and prediction on the wrong or unfinished data ------------------------------------


def _train_args(root, data, clip, out, *extra, cache=None, split="train2017"):
    return [
        "train", "--cache", cache or root / "cache", "--dataset", data, "--out", out,
        "--split", split, "--preset", "tiny", "--clip-checkpoint", clip, "--steps", "2",
        "--batch-size", "2", "--ckpt-every", "1", "--no-progress", *extra,
    ]


def test_train_refuses_a_cache_of_another_dataset_with_the_same_ids(
    tiny_train_cache, tmp_path, capsys
):
    root, data, clip = tiny_train_cache
    # Same ids, same sizes, other pictures and labels: only the source identity tells them apart.
    other = make_synthetic_dataset(
        tmp_path / "other", seed=7, num_train=4, num_val=1, height=96, width=128
    )
    code, err = run_cli(capsys, *_train_args(root, other, clip, tmp_path / "run"))
    assert_one_line_error(code, err, "was made from", "--allow-other-dataset")
    assert not (tmp_path / "run").exists()
    # A deliberate move of the same data is allowed with the flag.
    code, err = run_cli(
        capsys, *_train_args(root, other, clip, tmp_path / "run", "--allow-other-dataset")
    )
    assert code == 0, err


def test_train_refuses_a_moved_dataset_only_if_its_content_differs(
    tiny_train_cache, tmp_path, capsys
):
    root, data, clip = tiny_train_cache
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    code, err = run_cli(capsys, *_train_args(root, moved, clip, tmp_path / "run"))
    assert code == 0, err  # same annotations, another place: the same dataset


def test_train_refuses_other_image_sizes_even_with_the_override(
    tiny_train_cache, tmp_path, capsys
):
    root, data, clip = tiny_train_cache
    other = make_synthetic_dataset(
        tmp_path / "other", seed=2, num_train=4, num_val=1, height=64, width=128
    )
    code, err = run_cli(
        capsys, *_train_args(root, other, clip, tmp_path / "run", "--allow-other-dataset")
    )
    assert_one_line_error(code, err, "128x96 in cache", "128x64")


def _unfinished_copy(cache: Path, dest: Path) -> Path:
    """A copy of ``cache`` whose last shard was interrupted (not marked complete)."""
    shutil.copytree(cache, dest)
    last = sorted(p for p in (dest / "shards").iterdir() if p.is_dir())[-1]
    meta = json.loads((last / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (last / "zarr.json").write_text(json.dumps(meta))
    return dest


def test_train_refuses_an_unfinished_cache_unless_allowed(tiny_train_cache, tmp_path, capsys):
    root, data, clip = tiny_train_cache
    cache = _unfinished_copy(root / "cache", tmp_path / "unfinished")
    code, err = run_cli(capsys, *_train_args(root, data, clip, tmp_path / "run", cache=cache))
    assert_one_line_error(code, err, "unfinished", "2 of 4 images", "--allow-incomplete")
    assert not (tmp_path / "run").exists()
    code, err = run_cli(
        capsys,
        *_train_args(root, data, clip, tmp_path / "run", "--allow-incomplete", cache=cache),
    )
    assert code == 0, err
    assert "unfinished" in err and "2 of 4 images" in err


def test_predict_refuses_an_unfinished_cache_unless_allowed(tiny_train_cache, tmp_path, capsys):
    root, data, clip = tiny_train_cache
    assert run_cli(capsys, *_train_args(root, data, clip, tmp_path / "run"))[0] == 0
    cache = _unfinished_copy(root / "cache", tmp_path / "unfinished")
    args = ["predict", "--run", tmp_path / "run", "--cache", cache, "--no-progress"]
    code, err = run_cli(capsys, *args, "--out", tmp_path / "pred")
    assert_one_line_error(code, err, "unfinished", "--allow-incomplete")
    assert not (tmp_path / "pred").exists()
    code, err = run_cli(capsys, *args, "--out", tmp_path / "pred", "--allow-incomplete")
    assert code == 0, err
    assert "2 of 4 images" in err
    assert len(json.loads((tmp_path / "pred" / "panoptic.json").read_text())["images"]) == 2


def test_predict_never_replaces_a_folder_it_did_not_make(tiny_train_cache, tmp_path, capsys):
    root, data, clip = tiny_train_cache
    assert run_cli(capsys, *_train_args(root, data, clip, tmp_path / "run"))[0] == 0
    gt_like = tmp_path / "gt"  # holds a panoptic.json, as a ground-truth folder might
    gt_like.mkdir()
    (gt_like / "panoptic.json").write_text('{"annotations": []}')
    args = ["predict", "--run", tmp_path / "run", "--cache", root / "cache", "--no-progress"]
    code, err = run_cli(capsys, *args, "--out", gt_like)
    assert_one_line_error(code, err, "samcp did not make")
    assert (gt_like / "panoptic.json").read_text() == '{"annotations": []}'
    # Its own earlier output is replaced by a rerun.
    assert run_cli(capsys, *args, "--out", tmp_path / "pred")[0] == 0
    assert run_cli(capsys, *args, "--out", tmp_path / "pred")[0] == 0


def test_predict_with_a_truncated_model_is_one_line(tiny_train_cache, tmp_path, capsys):
    root, data, clip = tiny_train_cache
    assert run_cli(capsys, *_train_args(root, data, clip, tmp_path / "run"))[0] == 0
    weights = tmp_path / "run" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(
        capsys, "predict", "--run", tmp_path / "run", "--cache", root / "cache",
        "--out", tmp_path / "pred", "--no-progress",
    )
    assert_one_line_error(code, err, "model.safetensors", "truncated")
    assert not (tmp_path / "pred").exists()


# ---- a failed start never blocks a retry -------------------------------------------------------


@pytest.mark.parametrize(
    "bad, needles",
    [
        (["--split", "nosuch"], ["panoptic_nosuch.json"]),
        (["--lr", "-1"], ["lr", "positive"]),
        (["--lr", "nan"], ["lr"]),
        (["--head", "nosuch"], ["unknown head", "affinity"]),
        (["--device", "tpu"], ["unknown --device", "cpu"]),
        (["--set", "no_such_field=1"], ["bad head config"]),
    ],
    ids=["split", "lr", "lr-nan", "head", "device", "head-field"],
)
def test_a_run_refused_at_start_leaves_nothing_and_the_retry_starts(
    tiny_train_cache, tmp_path, capsys, bad, needles
):
    root, data, clip = tiny_train_cache
    out = tmp_path / "run"
    code, err = run_cli(capsys, *_train_args(root, data, clip, out), *bad)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()
    code, err = run_cli(capsys, *_train_args(root, data, clip, out))
    assert code == 0, err
    assert (out / "model" / "model.safetensors").is_file()


def test_a_run_that_died_before_its_first_checkpoint_is_restarted(
    tiny_train_cache, tmp_path, capsys, monkeypatch
):
    root, data, clip = tiny_train_cache
    out = tmp_path / "run"
    from samcp.models.affinity.plugin import AffinityPlugin

    def boom(*a, **k):
        raise RuntimeError("simulated crash before the first checkpoint")

    monkeypatch.setattr(AffinityPlugin, "collate", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        main([str(a) for a in _train_args(root, data, clip, out)])
    assert (out / "train_config.json").exists() and not (out / "checkpoints").exists()
    monkeypatch.undo()
    code, err = run_cli(capsys, *_train_args(root, data, clip, out))
    assert code == 0, err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # logged once, by the rerun (log_every 10 logs the last step only)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000001", "step_0000002"
    ]
    assert (out / "model" / "model.safetensors").is_file()


def test_train_refuses_a_foreign_run_folder(tiny_train_cache, tmp_path, capsys):
    root, data, clip = tiny_train_cache
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("1,2")
    code, err = run_cli(capsys, *_train_args(root, data, clip, tmp_path / "run"))
    assert_one_line_error(code, err, "samcp did not make")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["results.csv"]


@pytest.mark.parametrize(
    "text, needles",
    [
        ("steps: [1, 2\n", ["not valid YAML"]),
        ("- a\n- b\n", ["YAML mapping"]),
        ("lr: fast\n", ["lr", "str"]),
        ("lr_drop: 2\n", ["lr_drop"]),
        ("head_config: 3\n", ["head_config"]),
        ("nosuch: 1\n", ["unknown keys nosuch"]),
        ("head_overrides: 3\n", ["head_overrides"]),
        ("out: elsewhere\n", ["out", "command line"]),
    ],
    ids=["syntax", "list", "lr-type", "lr-drop", "head-config", "unknown", "overrides", "out"],
)
def test_a_malformed_config_is_one_line(tiny_train_cache, tmp_path, capsys, text, needles):
    root, data, clip = tiny_train_cache
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    code, err = run_cli(
        capsys, *_train_args(root, data, clip, tmp_path / "run"), "--config", cfg
    )
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


# ---- damaged caches ----------------------------------------------------------------------------


def _damaged(cache: Path, dest: Path, how: str) -> Path:
    shutil.copytree(cache, dest)
    shard = dest / "shards" / "00000"
    if how == "metadata":
        (shard / "zarr.json").write_text("{not json")
    else:
        shutil.rmtree(shard / "bbox")
    return shard


@pytest.mark.parametrize("how", ["metadata", "array"])
@pytest.mark.parametrize("command", ["inspect", "oracle"])
def test_a_damaged_shard_is_named_in_one_line(small, tmp_path, capsys, how, command):
    data, cache = small
    shard = _damaged(cache, tmp_path / "c.zarr", how)
    args = (
        ["inspect", tmp_path / "c.zarr"]
        if command == "inspect"
        else ["eval", "--gt", data, "--oracle", tmp_path / "c.zarr", "--no-progress"]
    )
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, str(shard), "re-run the same `samcp precompute`")


def test_unexpected_errors_still_show_a_traceback(monkeypatch):
    """Only expected errors become one line: a bug keeps its traceback."""
    import samcp.pipeline.synth as synth

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(synth, "make_synthetic_dataset", bug)
    with pytest.raises(ZeroDivisionError):
        main(["synth", "/nonexistent/never-written"])


def test_oracle_refuses_a_cache_of_another_dataset(small, tmp_path, capsys):
    data, cache = small
    other = make_synthetic_dataset(
        tmp_path / "other", seed=9, num_train=0, num_val=4, height=64, width=96
    )
    args = ["eval", "--gt", other, "--oracle", cache, "--no-progress"]
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "was made from", str(other), "--allow-other-dataset")
    code, err = run_cli(capsys, *args, "--allow-other-dataset")
    assert code == 0, err
    assert run_cli(capsys, "eval", "--gt", data, "--oracle", cache, "--no-progress")[0] == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["images"][0].pop("id"),
        lambda d: d["images"][0].update(height="tall"),
        lambda d: d["annotations"][0].pop("image_id"),
        lambda d: d["categories"].append({"name": "no id"}),
    ],
    ids=["image-id", "height", "annotation-image-id", "category-id"],
)
def test_a_malformed_dataset_json_is_one_line_for_precompute(small, tmp_path, capsys, damage):
    data, _ = small
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    ann = copy / "annotations" / "panoptic_val2017.json"
    doc = json.loads(ann.read_text())
    damage(doc)
    ann.write_text(json.dumps(doc))
    code, err = run_cli(capsys, *_precompute(copy, "--out", tmp_path / "c.zarr"))
    assert_one_line_error(code, err, "panoptic_val2017.json", "malformed")
    assert not (tmp_path / "c.zarr").exists()


def test_expected_errors_become_one_line_with_a_fix_and_bugs_do_not():
    import errno

    from samcp.pipeline.errors import SamcpError, expected_error_message

    full = OSError(errno.ENOSPC, "No space left on device", "/data/cache.zarr/shards/00003")
    assert expected_error_message(full) == (
        "/data/cache.zarr/shards/00003: No space left on device; free some space or choose "
        "another location, then re-run (runs resume)"
    )
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/run")
    assert "check the permissions" in expected_error_message(denied)
    assert expected_error_message(SamcpError("a\nb")) == "a b"
    assert expected_error_message(ZeroDivisionError("bug")) is None
    assert expected_error_message(KeyError("x")) is None


def test_a_remote_cache_location_holding_other_data_is_never_emptied():
    """URL caches (s3://, gs://, ...) follow the same rule as folders: zarr's mode="w" would delete
    the whole prefix. fsspec's in-memory filesystem stands in for an object store."""
    fsspec = pytest.importorskip("fsspec")

    from samcp.pipeline import cache as cache_io
    from samcp.pipeline.errors import SamcpError

    fs = fsspec.filesystem("memory")
    fs.pipe("/mine/user.txt", b"precious")
    fs.pipe("/mine/sub/a.txt", b"too")
    for overwrite in (False, True):
        with pytest.raises(SamcpError, match="not a samcp cache"):
            cache_io.init_cache("memory://mine", {"dataset": {}}, overwrite=overwrite)
    assert fs.cat("/mine/user.txt") == b"precious" and fs.cat("/mine/sub/a.txt") == b"too"
    # A samcp cache there is created, resumed and, with overwrite, replaced.
    assert cache_io.init_cache("memory://c", {"dataset": {"n": 1}}) == set()
    fs.pipe("/c/shards/00000/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')
    cache_io.init_cache("memory://c", {"dataset": {"n": 1}})
    assert fs.exists("/c/shards/00000/zarr.json")
    cache_io.init_cache("memory://c", {"dataset": {"n": 2}}, overwrite=True)
    assert not fs.exists("/c/shards/00000")
    assert cache_io.CacheReader("memory://c").attrs["dataset"] == {"n": 2}


def test_train_refuses_a_run_folder_another_training_holds(tiny_train_cache, tmp_path, capsys):
    from samcp.pipeline.folderlock import FolderLock

    root, data, clip = tiny_train_cache
    out = tmp_path / "run"
    with FolderLock(out, "run folder", "samcp train"):  # a live training (this very process)
        code, err = run_cli(capsys, *_train_args(root, data, clip, out))
        assert_one_line_error(code, err, "locked by another samcp train", "pid")
    assert run_cli(capsys, *_train_args(root, data, clip, out))[0] == 0


def test_a_foreign_folder_with_a_train_config_json_is_never_cleared(
    tiny_train_cache, tmp_path, capsys
):
    root, data, clip = tiny_train_cache
    out = tmp_path / "theirs"
    (out / "checkpoints").mkdir(parents=True)
    (out / "train_config.json").write_text("{}")
    (out / "checkpoints" / "epoch_10.pt").write_bytes(b"weights")
    before = snapshot(out)
    code, err = run_cli(capsys, *_train_args(root, data, clip, out))
    assert_one_line_error(code, err, "samcp did not make")
    assert snapshot(out) == before


def test_replacing_a_prediction_folder_never_takes_user_files_with_it(
    tiny_train_cache, tmp_path, capsys
):
    root, data, clip = tiny_train_cache
    assert run_cli(capsys, *_train_args(root, data, clip, tmp_path / "run"))[0] == 0
    args = ["predict", "--run", tmp_path / "run", "--cache", root / "cache", "--no-progress"]
    pred = tmp_path / "pred"
    assert run_cli(capsys, *args, "--out", pred)[0] == 0
    (pred / "my_notes.md").write_text("keep me")
    code, err = run_cli(capsys, *args, "--out", pred)
    assert_one_line_error(code, err, "my_notes.md", "move them out")
    assert (pred / "my_notes.md").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred.")]  # no staging left
