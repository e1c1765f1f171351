"""precompute --sam-features sam2clip: everything mode on SAM2CLIP embeddings made from the CLIP pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samcp.cli.main import main as samcp_main
from samcp.pipeline import precompute as pre
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.clip import ClipConfig, load_clip, make_random_clip_checkpoint
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.files import file_sha256
from samcp.pipeline.foundation import make_random_sam_checkpoint
from samcp.pipeline.proposals import ProposalConfig
from samcp.pipeline.proposals.sam import SamEverythingParams
from samcp.pipeline.synth import make_synthetic_dataset

CLIP_MODEL = "samcp-test-convnext"
CLIP_SIZE = 256
# Random vit_test SAM (32 x 16 x 16 embeddings at a 256 frame): a 5 x 5 grid, no IoU filter.
PARAMS = SamEverythingParams(
    points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=0.7
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Dataset, SAM and CLIP checkpoints, and sam2clip runs (random necks saved as runs are)."""
    from samcp.models.ovsam.sam2clip import Sam2ClipConfig, Sam2ClipNeck
    from samcp.models.registry import save_head

    root = tmp_path_factory.mktemp("s2c")
    data = make_synthetic_dataset(
        root / "synth", seed=4, num_train=0, num_val=3, height=96, width=128
    )
    sam = make_random_sam_checkpoint(root / "sam_vit_test.pth", "vit_test", seed=0)
    clip = make_random_clip_checkpoint(root / "clip.pt", CLIP_MODEL)
    channels = pre._level_channels(load_clip(CLIP_MODEL, clip)[0])
    runs = {}
    for name, levels in (("res5", ("clip_res5",)), ("res4_res5", ("clip_res4", "clip_res5"))):
        cfg = Sam2ClipConfig.tiny(
            clip_levels=levels,
            clip_channels=tuple(channels[lv] for lv in levels),
            clip_strides=tuple(32 if lv == "clip_res5" else 16 for lv in levels),
            clip_input_size=CLIP_SIZE,
        )
        torch.manual_seed(0)
        runs[name] = root / f"run_{name}"
        save_head(Sam2ClipNeck(cfg), cfg, runs[name] / "model")
    other = root / "run_possam" / "model"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"head": "possam", "config": {}}))
    (other / "model.safetensors").write_bytes(b"")
    runs["possam"] = other.parent
    return {"data": data, "sam": sam, "clip": clip, "runs": runs, "root": root}


def _argv(world, out: Path, *extra: str) -> list[str]:
    return [
        "precompute", str(world["data"]), "--out", str(out),
        "--sam-model", "vit_test", "--sam-checkpoint", str(world["sam"]),
        "--points-per-side", str(PARAMS.points_per_side), "--pred-iou-thresh", "0",
        "--stability-score-thresh", str(PARAMS.stability_score_thresh),
        "--clip-model", CLIP_MODEL, "--clip-checkpoint", str(world["clip"]),
        "--clip-input-size", str(CLIP_SIZE), "--shard-size", "2", "--num-workers", "0",
        "--no-progress", *extra,
    ]  # fmt: skip


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        samcp_main(args)
    return exc.value.code, capsys.readouterr().err


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def _reference_proposals(sam, image: np.ndarray, embed: torch.Tensor) -> list[dict]:
    """segment_anything's own SamAutomaticMaskGenerator with SAM's image encoder replaced by the
    given embedding (its predictor's set_image sets exactly what SamPredictor.set_image sets)."""
    from segment_anything import SamAutomaticMaskGenerator

    amg = SamAutomaticMaskGenerator(
        sam,
        points_per_side=PARAMS.points_per_side,
        pred_iou_thresh=PARAMS.pred_iou_thresh,
        stability_score_thresh=PARAMS.stability_score_thresh,
        box_nms_thresh=PARAMS.box_nms_thresh,
        crop_n_layers=0,
        min_mask_region_area=0,
    )
    predictor = amg.predictor

    def set_image(img: np.ndarray, image_format: str = "RGB") -> None:
        predictor.reset_image()
        predictor.original_size = img.shape[:2]
        predictor.input_size = tuple(predictor.transform.apply_image(img).shape[:2])
        predictor.features = embed
        predictor.is_image_set = True

    predictor.set_image = set_image
    return amg.generate(image)


def test_cache_from_sam2clip_features_records_the_source_and_equals_the_decoder_by_hand(
    world, tmp_path, monkeypatch
):
    from samcp.models.registry import load_head
    from samcp.pipeline.datasets import load_image_rgb, open_image_source
    from samcp.pipeline.foundation import load_sam
    from samcp.pipeline.proposals import sam_encoder

    def no_encoder(*args, **kwargs):
        raise AssertionError("SAM's image encoder ran")

    monkeypatch.setattr(sam_encoder, "encode_image", no_encoder)
    run = world["runs"]["res5"]
    out = tmp_path / "c"
    samcp_main(
        _argv(world, out, "--sam-features", "sam2clip", "--sam2clip-run", str(run),
              "--store-sam-embeddings")
    )  # fmt: skip
    reader = CacheReader(out)
    sam_attr = reader.attrs["sam"]
    assert sam_attr["features"] == "sam2clip"
    assert sam_attr["sam2clip"] == {
        "model_sha256": file_sha256(run / "model" / "model.safetensors"),
        "clip_levels": ["clip_res5"],
    }
    assert sam_attr["checkpoint_sha256"] == file_sha256(world["sam"])
    assert reader.attrs["sam_embed"] is True

    neck, _ = load_head(run / "model")
    sam = load_sam("vit_test", world["sam"])
    recs = {r.image_id: r for r in open_image_source(world["data"], "val2017")}
    rows = list(reader.iter_images())
    assert len(rows) == 3
    for row in rows:
        assert row.status == 0 and len(row.proposals) > 0
        # The neck on the image's cached CLIP level is the stored (distilled) embedding ...
        level = torch.from_numpy(row.image_arrays["clip_res5"].astype(np.float32))[None]
        with torch.no_grad():
            embed = neck([level]).embed
        np.testing.assert_allclose(
            row.image_arrays["sam_embed"].astype(np.float32), embed[0].numpy(), rtol=1e-3,
            atol=1e-3 * float(embed.abs().max()),
        )  # fmt: skip
        # ... and SAM's own generator, decoding that embedding, gives the cached proposals.
        ref = _reference_proposals(sam, load_image_rgb(recs[row.image_id].file_name), embed)
        assert len(ref) == len(row.proposals)
        masks = row.proposals.decode()
        for k, r in enumerate(ref):
            a = r["segmentation"]
            i = k
            if _iou(a, masks[k]) < 0.99:  # NMS ties within float rounding may swap
                ties = np.flatnonzero(
                    np.abs(row.proposals.predicted_iou - r["predicted_iou"]) < 1e-5
                )
                i = next(j for j in ties if _iou(a, masks[j]) >= 0.99)
            assert abs(r["predicted_iou"] - row.proposals.predicted_iou[i]) <= 1e-3
            assert abs(r["stability_score"] - row.proposals.stability_score[i]) <= 1e-3
            np.testing.assert_allclose(
                r["point_coords"][0], row.proposals.point_coords[i], atol=1e-3
            )

    # Resuming that cache with SAM's own encoder is refused, naming the key; nothing changes.
    monkeypatch.undo()
    before = [r.proposals.rles for r in reader.iter_images()]
    with pytest.raises(SamcpError, match=r"different sam .*--overwrite"):
        pre.run_precompute(
            pre.PrecomputeConfig(
                source=str(world["data"]),
                out=str(out),
                shard_size=2,
                proposals=ProposalConfig(
                    source="sam",
                    sam_model="vit_test",
                    sam_checkpoint=str(world["sam"]),
                    sam=PARAMS,
                    sam_features="sam",
                ),
                num_workers=0,
                progress=False,
                store_sam_embeddings=True,
                clip=ClipConfig(CLIP_MODEL, str(world["clip"]), CLIP_SIZE, ("res5",)),
            )
        )
    assert [r.proposals.rles for r in CacheReader(out).iter_images()] == before


def test_resume_with_sam_features_sam_is_refused_on_the_command_line(world, tmp_path, capsys):
    out = tmp_path / "c"
    run = world["runs"]["res5"]
    samcp_main(_argv(world, out, "--sam-features", "sam2clip", "--sam2clip-run", str(run)))
    code, err = _run_cli(_argv(world, out, "--sam-features", "sam"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "different sam (features: 'sam2clip' vs now None)" in err and "--overwrite" in err
    # The same command again resumes (every shard already complete).
    samcp_main(_argv(world, out, "--sam-features", "sam2clip", "--sam2clip-run", str(run)))
    log = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert log[-1]["summary"]["shards_skipped"] == 2 and log[-1]["summary"]["shards_done"] == 0


def test_sam2clip_embeddings_next_to_slic_proposals(world, tmp_path):
    """--proposals slic --store-sam-embeddings --sam-features sam2clip stores the neck's output."""
    from samcp.models.registry import load_head

    run = world["runs"]["res4_res5"]
    out = tmp_path / "c"
    samcp_main(
        _argv(world, out, "--proposals", "slic", "--store-sam-embeddings", "--clip-levels",
              "res4,res5", "--sam-features", "sam2clip", "--sam2clip-run", str(run))
    )  # fmt: skip
    reader = CacheReader(out)
    assert reader.attrs["sam"]["features"] == "sam2clip" and reader.attrs["sam"]["params"] is None
    neck, _ = load_head(run / "model")
    row = next(reader.iter_images())
    levels = [
        torch.from_numpy(row.image_arrays[lv].astype(np.float32))[None]
        for lv in ("clip_res4", "clip_res5")
    ]
    with torch.no_grad():
        want = neck(levels).embed[0].numpy()
    np.testing.assert_allclose(
        row.image_arrays["sam_embed"].astype(np.float32), want, rtol=1e-3,
        atol=1e-3 * float(np.abs(want).max()),
    )  # fmt: skip


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no-run", "needs --sam2clip-run RUN"),
        ("missing", "sam2clip run not found"),
        ("other-head", "is a possam run, not a sam2clip run"),
        ("other-levels", "pass --clip-levels res4,res5"),
        ("no-clip", "add --clip-checkpoint PATH --clip-levels res5"),
        ("input-size", "pass --clip-input-size 256"),
        ("run-without-features", "--sam2clip-run is read only with --sam-features sam2clip"),
        ("slic-alone", "pass --proposals sam"),
    ],
)
def test_unsuitable_sam2clip_run_is_one_line_naming_the_fix(world, tmp_path, capsys, case, expect):
    runs = world["runs"]
    out = tmp_path / "c"
    extra = {
        "no-run": ["--sam-features", "sam2clip"],
        "missing": ["--sam-features", "sam2clip", "--sam2clip-run", str(tmp_path / "nowhere")],
        "other-head": ["--sam-features", "sam2clip", "--sam2clip-run", str(runs["possam"])],
        "other-levels": ["--sam-features", "sam2clip", "--sam2clip-run", str(runs["res4_res5"])],
        "input-size": [
            "--sam-features",
            "sam2clip",
            "--sam2clip-run",
            str(runs["res5"]),
            "--clip-input-size",
            "512",
        ],
        "run-without-features": ["--sam2clip-run", str(runs["res5"])],
        "slic-alone": [
            "--proposals",
            "slic",
            "--sam-features",
            "sam2clip",
            "--sam2clip-run",
            str(runs["res5"]),
        ],
    }.get(case, [])
    argv = _argv(world, out, *extra)
    if case == "no-clip":
        i = argv.index("--clip-model")
        argv = argv[:i] + argv[i + 6 :]  # no --clip-model/--clip-checkpoint/--clip-input-size
        argv += ["--sam-features", "sam2clip", "--sam2clip-run", str(runs["res5"])]
    if case == "input-size":
        i = argv.index("--clip-input-size")
        del argv[i : i + 2]
    if case == "slic-alone":
        i = argv.index("--sam-checkpoint")
        del argv[i : i + 2]
    code, err = _run_cli(argv, capsys)
    assert code == 2, err
    # (slic-alone also warns that the SAM tuning options do nothing: a line of its own)
    lines = [x for x in err.strip().splitlines() if not x.startswith("warning:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()
