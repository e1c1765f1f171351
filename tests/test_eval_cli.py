"""`samcp eval` end to end: table, --json, errors, --oracle glue and worker independence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from samcp.cli.eval import command
from samcp.pipeline.evaluation import read_panoptic_png, resolve_ground_truth
from samcp.pipeline.evaluation.perturb import write_perturbed_predictions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from samcp.pipeline.synth import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("cli") / "ds", seed=5, num_train=0, num_val=8, height=48, width=64
    )


def test_perfect_predictions_table_and_json(dataset, tmp_path):
    gj, gp = resolve_ground_truth(dataset, "val2017")
    pred = write_perturbed_predictions(gj, gp, tmp_path / "pred")
    out = tmp_path / "res.json"
    res = CliRunner().invoke(
        command,
        [
            "--gt",
            str(dataset),
            "--pred",
            str(pred),
            "--json",
            str(out),
            "--per-class",
            "--workers",
            "2",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "PQ" in res.output and "mIoU" in res.output and "AP50" in res.output
    data = json.loads(out.read_text())
    assert data["panoptic"]["all"]["pq"] == pytest.approx(100.0)
    assert data["semantic"]["miou"] == pytest.approx(100.0)
    assert data["instance"]["ap"] == pytest.approx(100.0)
    assert {row["name"] for row in data["per_class"]} >= {"ball", "sky"}


def test_json_is_the_same_for_any_number_of_workers(dataset, tmp_path):
    gj, gp = resolve_ground_truth(dataset, "val2017")
    pred = write_perturbed_predictions(
        gj, gp, tmp_path / "pred", seed=3, p_drop=0.3, p_relabel=0.3, p_shift=0.5
    )
    outs = []
    for w in ("1", "2"):
        out = tmp_path / f"r{w}.json"
        res = CliRunner().invoke(
            command,
            [
                "--gt",
                str(gj),
                "--pred",
                str(pred),
                "--json",
                str(out),
                "--workers",
                w,
                "--no-progress",
            ],
        )
        assert res.exit_code == 0, res.output
        outs.append(json.loads(out.read_text()))
    assert outs[0]["panoptic"] == outs[1]["panoptic"]
    assert outs[0]["panoptic"]["all"]["pq"] < 100


def test_inconsistent_prediction_is_a_one_line_error(dataset, tmp_path, capsys):
    from samcp.cli.main import main

    gj, gp = resolve_ground_truth(dataset, "val2017")
    pred = write_perturbed_predictions(gj, gp, tmp_path / "pred")
    data = json.loads((pred / "panoptic.json").read_text())
    victim = data["annotations"][2]
    dropped = victim["segments_info"].pop(0)
    (pred / "panoptic.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as info:
        main(
            [
                "eval",
                "--gt",
                str(dataset),
                "--pred",
                str(pred),
                "--workers",
                "1",
                "--no-progress",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert f"segment id {dropped['id']}" in err and str(victim["image_id"]) in err
    assert not (tmp_path / "r.json").exists()


def test_pred_and_oracle_are_exclusive(dataset, tmp_path):
    res = CliRunner().invoke(command, ["--gt", str(dataset), "--no-progress"])
    assert res.exit_code != 0 and "exactly one of --pred" in str(res.exception)


def test_oracle_reads_a_real_cache(dataset, tmp_path):
    """GT segments written as proposals into a real cache: the oracle scores them as perfect."""
    from samcp.pipeline import cache as cache_io
    from samcp.pipeline.proposals.base import Proposals

    gj, gp = resolve_ground_truth(dataset, "val2017")
    anns = json.loads(gj.read_text())["annotations"]
    rows = []
    for i, a in enumerate(anns):
        ids = read_panoptic_png(gp / a["file_name"])
        h, w = ids.shape
        if i == 0:  # One failed row: the oracle writes that image as all void.
            rows.append(cache_io.ImageResult(str(a["image_id"]), h, w, error="OSError: broken"))
            continue
        rles = [
            mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))["counts"]
            for s in a["segments_info"]
        ]
        rows.append(cache_io.ImageResult(str(a["image_id"]), h, w, Proposals.from_rles(h, w, rles)))
    cache = tmp_path / "cache"
    cache_io.init_cache(
        cache, {"proposals": {"source": "external"}, "sam": None, "clip": None, "dataset": {}}
    )
    cache_io.write_shard(cache, "00000", rows)
    out = tmp_path / "oracle.json"
    res = CliRunner().invoke(
        command,
        [
            "--gt",
            str(dataset),
            "--oracle",
            str(cache),
            "--json",
            str(out),
            "--workers",
            "2",
            "--no-progress",
            "--oracle-out",
            str(tmp_path / "opred"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["oracle"]["images_without_proposals"] == 1
    assert 80 < data["panoptic"]["all"]["pq"] < 100  # 7 of 8 images perfect
    assert (tmp_path / "opred" / "panoptic.json").is_file()
