"""`samcp eval` on bad input: every case ends in one line naming the problem and the fix, exit 2,
and nothing of the user's is written over or deleted. Each test runs the real CLI entry point."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samcp.cli.main import main
from samcp.pipeline.evaluation import read_panoptic_png, resolve_ground_truth
from samcp.pipeline.evaluation.perturb import write_perturbed_predictions
from samcp.pipeline.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("rel") / "ds", seed=7, num_train=0, num_val=4, height=48, width=64
    )


@pytest.fixture(scope="module")
def truth(dataset) -> tuple[Path, Path]:
    return resolve_ground_truth(dataset, "val2017")


def run_eval(args: list[str], capsys) -> tuple[int, str, str]:
    """Runs `samcp eval ARGS` through the CLI's entry point: (exit code, stdout, stderr)."""
    try:
        main(["eval", *args, "--workers", "1", "--no-progress"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *parts: str) -> str:
    assert code == 2, err
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)
    return err


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    # json.dumps writes NaN / Infinity literals, which Python's json (and so samcp) reads back.
    path.write_text(json.dumps(data))


def perfect_prediction(truth: tuple[Path, Path], out: Path) -> Path:
    return write_perturbed_predictions(*truth, out)


def copy_ground_truth(truth: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the ground truth (JSON + PNG folder) to damage."""
    gj, gp = truth
    shutil.copytree(gp, tmp_path / "gt")
    shutil.copy(gj, tmp_path / "gt.json")
    return tmp_path / "gt.json"


# ---------------------------------------------------------------------------------------------
# 1. Non-finite scores in instances.json.


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_is_refused_naming_image_and_entry(truth, tmp_path, capsys, bad):
    pred = perfect_prediction(truth, tmp_path / "pred")
    results = json.loads((pred / "instances.json").read_text())
    assert len(results) >= 2
    results[1]["score"] = bad
    (pred / "instances.json").write_text(json.dumps(results))
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--pred", str(pred), "--json", str(tmp_path / "r.json")], capsys
    )
    assert_one_line_error(
        code, err, "instances.json", "result 1", f"image {results[1]['image_id']}", "finite"
    )
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------
# 2. The same segment id twice in one image.


@pytest.mark.parametrize("other_category", [True, False])
def test_duplicate_segment_id_is_refused(truth, tmp_path, capsys, other_category):
    pred = perfect_prediction(truth, tmp_path / "pred")
    cats = [c["id"] for c in json.loads(truth[0].read_text())["categories"]]
    data = json.loads((pred / "panoptic.json").read_text())
    ann = data["annotations"][1]
    first = ann["segments_info"][0]
    twin = dict(first)
    if other_category:
        twin["category_id"] = next(c for c in cats if c != first["category_id"])
    ann["segments_info"].append(twin)
    (pred / "panoptic.json").write_text(json.dumps(data))
    code, _, err = run_eval(["--gt", str(truth[0]), "--pred", str(pred)], capsys)
    err = assert_one_line_error(
        code, err, f"image {ann['image_id']}", f"segment id {first['id']}", "twice"
    )
    if other_category:
        assert f"categories {first['category_id']} and {twin['category_id']}" in err


# ---------------------------------------------------------------------------------------------
# 3. Malformed entries of the panoptic JSONs (prediction and ground truth) and instances.json.


def _seg(data: dict, image: int = 0, segment: int = 0) -> dict:
    return data["annotations"][image]["segments_info"][segment]


PRED_DAMAGE = {
    "segments_info null": (
        lambda d: d["annotations"][0].update(segments_info=None),
        ["segments_info is null", "not a list"],
    ),
    "segments_info object": (
        lambda d: d["annotations"][0].update(segments_info={"id": 1, "category_id": 1}),
        ["segments_info is an object", "not a list"],
    ),
    "segment without category_id": (
        lambda d: _seg(d).pop("category_id"),
        ["has no category_id", "integer category_id"],
    ),
    "string segment id": (
        lambda d: _seg(d).update(id=str(_seg(d)["id"])),
        ["(str)", "segment ids are integers"],
    ),
    "segment id zero": (lambda d: _seg(d).update(id=0), ["segment id 0", "void"]),
    "annotations not a list": (
        lambda d: d.update(annotations={"0": d["annotations"][0]}),
        ["'annotations' list"],
    ),
    "annotation without image_id": (
        lambda d: d["annotations"][0].pop("image_id"),
        ["annotation 0 needs an 'image_id'"],
    ),
    "two annotations of one image": (
        lambda d: d["annotations"].append(dict(d["annotations"][0])),
        ["has two annotations", "keep one"],
    ),
    "file_name with a folder": (
        lambda d: d["annotations"][0].update(file_name="../x.png"),
        ["file_name '../x.png'", "no folders"],
    ),
    "unknown category": (
        lambda d: _seg(d).update(category_id=4242),
        ["unknown category_id 4242", "ground truth's category ids"],
    ),
}


@pytest.mark.parametrize("case", list(PRED_DAMAGE))
def test_malformed_prediction_json_is_one_line(truth, tmp_path, capsys, case):
    change, parts = PRED_DAMAGE[case]
    pred = perfect_prediction(truth, tmp_path / "pred")
    edit_json(pred / "panoptic.json", change)
    code, _, err = run_eval(["--gt", str(truth[0]), "--pred", str(pred)], capsys)
    assert_one_line_error(code, err, "panoptic.json", *parts)


GT_DAMAGE = {
    "segments_info null": (
        lambda d: d["annotations"][0].update(segments_info=None),
        ["segments_info is null", "fix the ground-truth JSON"],
    ),
    "segment without category_id": (
        lambda d: _seg(d).pop("category_id"),
        ["has no category_id"],
    ),
    "annotations not a list": (
        lambda d: d.update(annotations={"x": d["annotations"][0]}),
        ["'annotations' is an object, not a list"],
    ),
    "annotation without file_name": (
        lambda d: d["annotations"][0].pop("file_name"),
        ["file_name None", "fix the ground-truth JSON"],
    ),
    "unknown category": (
        lambda d: _seg(d).update(category_id=4242),
        ["unknown category_id 4242", "fix the ground-truth JSON"],
    ),
    "area not a number": (lambda d: _seg(d).update(area="big"), ["area 'big'", "pixel count"]),
    "fractional area": (lambda d: _seg(d).update(area=12.5), ["area 12.5", "whole number"]),
    "iscrowd not 0/1": (lambda d: _seg(d).update(iscrowd="yes"), ["iscrowd 'yes'", "0 or 1"]),
    "bbox of 3 numbers": (lambda d: _seg(d).update(bbox=[1, 2, 3]), ["bbox [1, 2, 3]"]),
    "categories null": (lambda d: d.update(categories=None), ["'categories' is null"]),
    "isthing not 0/1": (
        lambda d: d["categories"][0].update(isthing="yes"),
        ["isthing 'yes'", "use 1 for things and 0 for stuff"],
    ),
    "images not a list": (lambda d: d.update(images={}), ["'images' is an object"]),
}


@pytest.mark.parametrize("case", list(GT_DAMAGE))
def test_malformed_ground_truth_json_is_one_line(truth, tmp_path, capsys, case):
    change, parts = GT_DAMAGE[case]
    gj = copy_ground_truth(truth, tmp_path)
    pred = perfect_prediction(truth, tmp_path / "pred")
    edit_json(gj, change)
    code, _, err = run_eval(["--gt", str(gj), "--pred", str(pred)], capsys)
    assert_one_line_error(code, err, str(gj), *parts)


RESULT_DAMAGE = {
    "score as a string": (lambda r: r.update(score="0.9"), ["score '0.9'"]),
    "segmentation null": (lambda r: r.update(segmentation=None), ["segmentation null"]),
    "uncompressed counts": (
        lambda r: r["segmentation"].update(counts=[1, 2]),
        ["counts: str"],
    ),
    "boolean category": (lambda r: r.update(category_id=True), ["category_id True"]),
}


@pytest.mark.parametrize("case", list(RESULT_DAMAGE))
def test_malformed_instances_json_is_one_line(truth, tmp_path, capsys, case):
    change, parts = RESULT_DAMAGE[case]
    pred = perfect_prediction(truth, tmp_path / "pred")
    results = json.loads((pred / "instances.json").read_text())
    change(results[0])
    (pred / "instances.json").write_text(json.dumps(results))
    code, _, err = run_eval(["--gt", str(truth[0]), "--pred", str(pred)], capsys)
    assert_one_line_error(code, err, "result 0", f"image {results[0]['image_id']}", *parts)


def test_valid_edge_cases_still_evaluate(truth, tmp_path, capsys):
    """What the checks must not refuse: string image ids, no area/bbox/iscrowd, empty images."""
    pred = perfect_prediction(truth, tmp_path / "pred")

    def strip(d: dict) -> None:
        for ann in d["annotations"]:
            ann["image_id"] = str(ann["image_id"])
            for s in ann["segments_info"]:
                for key in ("area", "bbox", "iscrowd"):
                    s.pop(key, None)

    edit_json(pred / "panoptic.json", strip)
    out = tmp_path / "r.json"
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--pred", str(pred), "--json", str(out)], capsys
    )
    assert code == 0, err
    assert json.loads(out.read_text())["panoptic"]["all"]["pq"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# 4. Output destinations: --json and --oracle-out.


def make_gt_cache(
    truth: tuple[Path, Path], path: Path, *, keep: int | None = None, planned: int | None = None
) -> Path:
    """A real proposal cache whose proposals are the ground-truth segments (a perfect oracle).

    ``keep`` images go into one complete shard; when given, a second shard is left incomplete,
    as a precompute stopped mid-write leaves it, and ``planned`` is recorded as the image count.
    """
    from samcp.pipeline import cache as cache_io
    from samcp.pipeline.proposals.base import Proposals

    gj, gp = truth
    anns = json.loads(gj.read_text())["annotations"]
    rows = []
    for a in anns[:keep]:
        ids = read_panoptic_png(gp / a["file_name"])
        h, w = ids.shape
        rles = [
            mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))["counts"]
            for s in a["segments_info"]
        ]
        rows.append(cache_io.ImageResult(str(a["image_id"]), h, w, Proposals.from_rles(h, w, rles)))
    dataset = {} if planned is None else {"num_images": planned}
    cache_io.init_cache(
        path, {"proposals": {"source": "external"}, "sam": None, "clip": None, "dataset": dataset}
    )
    cache_io.write_shard(path, "00000", rows)
    if keep is not None:
        root = cache_io._open_root(path, "r+")
        root["shards"].create_group("00001").attrs["complete"] = False
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_json_destination_that_is_a_folder_is_refused(truth, tmp_path, capsys):
    pred = perfect_prediction(truth, tmp_path / "pred")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--pred", str(pred), "--json", str(folder)], capsys
    )
    assert_one_line_error(code, err, f"--json {folder} is a folder", "pass a file path")
    assert snapshot(folder) == {"keep.txt": b"mine"}


def test_json_destination_under_a_file_is_refused(truth, tmp_path, capsys):
    pred = perfect_prediction(truth, tmp_path / "pred")
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--pred", str(pred), "--json", str(tmp_path / "notes.txt/r.json")],
        capsys,
    )
    assert_one_line_error(code, err, "lies under the file", "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_oracle_out_that_is_or_lies_under_a_file_is_refused(truth, tmp_path, capsys, where):
    cache = make_gt_cache(truth, tmp_path / "cache")
    (tmp_path / "f.txt").write_text("mine")
    out = tmp_path / "f.txt" if where == "file" else tmp_path / "f.txt" / "oracle"
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--oracle", str(cache), "--oracle-out", str(out)], capsys
    )
    what = "is a file" if where == "file" else "lies under the file"
    assert_one_line_error(code, err, "--oracle-out", what)
    assert (tmp_path / "f.txt").read_text() == "mine"


def test_foreign_folder_as_oracle_out_is_refused_and_left_untouched(truth, tmp_path, capsys):
    cache = make_gt_cache(truth, tmp_path / "cache")
    # Someone's own prediction folder: it even has a panoptic.json, but samcp did not write it.
    mine = tmp_path / "mine"
    (mine / "panoptic").mkdir(parents=True)
    (mine / "panoptic.json").write_text('{"annotations": []}')
    (mine / "precious.txt").write_text("do not delete")
    (mine / "panoptic" / "a.png").write_bytes(b"\x89PNG not really")
    before = snapshot(mine)
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--oracle", str(cache), "--oracle-out", str(mine)], capsys
    )
    assert_one_line_error(code, err, f"--oracle-out {mine}", "samcp did not make", "new or empty")
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mine"]  # no staging left


def test_second_eval_into_the_same_oracle_folder_replaces_it(truth, tmp_path, capsys):
    cache = make_gt_cache(truth, tmp_path / "cache")
    out = tmp_path / "oracle"
    for i in range(2):
        code, stdout, err = run_eval(
            [
                "--gt",
                str(truth[0]),
                "--oracle",
                str(cache),
                "--oracle-out",
                str(out),
                "--json",
                str(tmp_path / f"r{i}.json"),
            ],
            capsys,
        )
        assert code == 0, err
        assert json.loads((tmp_path / f"r{i}.json").read_text())["panoptic"]["all"][
            "pq"
        ] == pytest.approx(100.0)
        assert (out / ".samcp-output").is_file() and (out / "panoptic.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "oracle", "r0.json", "r1.json"]


def test_empty_folder_as_oracle_out_is_used(truth, tmp_path, capsys):
    cache = make_gt_cache(truth, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--oracle", str(cache), "--oracle-out", str(tmp_path / "empty")],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "empty" / "panoptic.json").is_file()


# ---------------------------------------------------------------------------------------------
# 5. `samcp eval --gt --pred` needs neither torch nor any other heavy library.

HEAVY = ("torch", "torchvision", "open_clip", "ray", "samcp.models")

_CHECK = """
import sys
{entry}
try:
    run({args!r})
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = [m for m in {heavy!r} if m in sys.modules]
assert not heavy, "imported: " + ", ".join(heavy)
"""


def _eval_in_subprocess(entry: str, truth: tuple[Path, Path], pred: Path) -> None:
    args = ["--gt", str(truth[0]), "--pred", str(pred), "--workers", "1", "--no-progress"]
    code = _CHECK.format(entry=entry, args=args, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PQ" in proc.stdout


def test_eval_command_imports_no_heavy_library(truth, tmp_path):
    """The eval command's own module and the evaluation package stay free of torch & co."""
    pred = perfect_prediction(truth, tmp_path / "pred")
    entry = (
        "from samcp.cli.eval import command\n"
        "def run(args):\n"
        "    command.main(args, standalone_mode=False)\n"
    )
    _eval_in_subprocess(entry, truth, pred)


def test_samcp_eval_through_the_cli_entry_point_imports_no_torch(truth, tmp_path):
    pred = perfect_prediction(truth, tmp_path / "pred")
    entry = "from samcp.cli.main import main\ndef run(args):\n    main(['eval', *args])\n"
    _eval_in_subprocess(entry, truth, pred)


# ---------------------------------------------------------------------------------------------
# 6. An unfinished cache is named as the cause of images without proposals.


def test_oracle_of_an_unfinished_cache_names_it(truth, tmp_path, capsys):
    n = len(json.loads(truth[0].read_text())["annotations"])
    cache = make_gt_cache(truth, tmp_path / "cache", keep=n - 2, planned=n)
    out = tmp_path / "r.json"
    code, stdout, err = run_eval(
        ["--gt", str(truth[0]), "--oracle", str(cache), "--json", str(out)], capsys
    )
    assert code == 0, err
    expect = (
        f"2 images without proposals, 2 of them missing because cache {cache} is unfinished "
        f"(precompute did not complete: 1 shard(s) interrupted, 2 of {n} images not cached); "
        "re-run the same `samcp precompute` to finish it"
    )
    assert expect in stdout
    data = json.loads(out.read_text())
    assert data["oracle"]["images_not_in_source"] == 2
    assert "is unfinished" in data["oracle"]["unfinished"]


def test_oracle_of_a_finished_cache_has_no_unfinished_note(truth, tmp_path, capsys):
    cache = make_gt_cache(truth, tmp_path / "cache")
    code, stdout, err = run_eval(["--gt", str(truth[0]), "--oracle", str(cache)], capsys)
    assert code == 0, err
    assert "0 images without proposals" in stdout and "unfinished" not in stdout


@pytest.mark.parametrize("lacking", [1, 0])
def test_run_on_an_unfinished_cache_names_it_before_predicting(truth, tmp_path, capsys, lacking):
    n = len(json.loads(truth[0].read_text())["annotations"])
    cache = make_gt_cache(truth, tmp_path / "cache", keep=n - lacking)
    run = tmp_path / "run"  # never read: the cache is refused first
    run.mkdir()
    code, _, err = run_eval(
        ["--gt", str(truth[0]), "--run", str(run), "--cache", str(cache)], capsys
    )
    err = assert_one_line_error(
        code,
        err,
        f"cache {cache} is unfinished (precompute did not complete: 1 shard(s) interrupted",
        "re-run the same `samcp precompute` to finish it, then evaluate again",
    )
    assert (f"{lacking} of the {n} ground-truth images" in err) == bool(lacking)
    assert "--allow-incomplete" not in err  # an option samcp eval does not have
    assert not (run / "predictions").exists()
