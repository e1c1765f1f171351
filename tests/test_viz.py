"""`samcp viz`: overlay pixels follow the masks, images are found (or a grey canvas is said),
predicted segments stand out from the image, ground truth and prediction sit side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samcp.cli.main import main as samcp_main
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.datasets import load_image_rgb
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import read_panoptic_png, write_panoptic_png
from samcp.pipeline.viz import (
    CANVAS_GREY,
    CAPTION_HEIGHT,
    PANEL_GAP,
    ground_truth_segments,
    mask_colors,
    prediction_segments,
    render_cached_image,
    render_grid,
    render_overlay,
    render_segments,
)

BAD_ID = "500002"
IMAGE_ID = "500001"


@pytest.fixture(scope="module")
def built(tmp_path_factory, slic_cache_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("viz")
    root, cache = slic_cache_factory(tmp, seed=7, corrupt=(BAD_ID,))
    return root, cache


def expected_overlay(image: np.ndarray, masks: np.ndarray, alpha: float) -> np.ndarray:
    """Reference: each pixel takes the colour of its smallest covering mask (ties: the later index),
    blended once; uncovered pixels keep the image."""
    colors = mask_colors(len(masks)).astype(np.float64)
    h, w = image.shape[:2]
    best_area = np.full((h, w), np.inf)
    top = np.full((h, w), -1)
    for i, m in enumerate(masks):
        a = m.sum()
        take = m & (a <= best_area)  # '<=' with increasing i: later index wins ties
        best_area[take] = a
        top[take] = i
    out = image.astype(np.float64)
    cov = top >= 0
    out[cov] = (1 - alpha) * out[cov] + alpha * colors[top[cov]]
    return np.round(out).astype(np.uint8)


def test_overlay_topmost_is_smallest_and_outside_is_untouched():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 50), bool)
    masks[0, 5:35, 5:45] = True  # big
    masks[1, 10:20, 10:20] = True  # small, inside the big one
    masks[2, 25:30, 20:48] = True  # overlaps the big one's edge
    colors = mask_colors(3)
    out = render_overlay(image, masks, alpha=1.0, outline=False)
    assert (out[12, 12] == colors[1]).all()
    assert (out[30, 30] == colors[0]).all()
    assert (out[27, 46] == colors[2]).all()  # outside the big mask, inside mask 2
    assert (out[26, 30] == colors[2]).all()  # overlap of 0 and 2: the smaller (2) is on top
    outside = ~masks.any(0)
    assert (out[outside] == image[outside]).all()
    np.testing.assert_array_equal(out, expected_overlay(image, masks, 1.0))
    np.testing.assert_array_equal(
        render_overlay(image, masks, 0.3, outline=False), expected_overlay(image, masks, 0.3)
    )
    # Mask order does not decide stacking, only area does.
    perm = [2, 0, 1]
    out_perm = render_overlay(image, masks[perm], 1.0, outline=False, colors=colors[perm])
    np.testing.assert_array_equal(out_perm, out)


def test_outline_marks_the_boundary_in_the_mask_colour():
    from skimage.segmentation import find_boundaries

    image = np.full((30, 30, 3), 50, np.uint8)
    masks = np.zeros((1, 30, 30), bool)
    masks[0, 8:20, 5:25] = True
    out = render_overlay(image, masks, alpha=0.0, outline=True)
    edge = find_boundaries(masks[0], mode="inner") & masks[0]
    assert edge.sum() == 2 * (12 + 20) - 4
    assert (out[edge] == mask_colors(1)[0]).all()
    assert (out[~edge] == 50).all()  # alpha 0: no fill anywhere else


def test_colours_are_deterministic_per_index():
    a, b = mask_colors(5), mask_colors(40)
    np.testing.assert_array_equal(a, b[:5])
    assert len({tuple(c) for c in b}) == 40


def test_labels_and_bad_arguments():
    image = np.zeros((60, 80, 3), np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 5:55, 5:40] = True
    masks[1, 5:55, 42:78] = True
    plain = render_overlay(image, masks, 0.5)
    labelled = render_overlay(image, masks, 0.5, labels=["dog", ""])
    diff = (plain != labelled).any(2)
    assert diff.any() and not diff[:, 42:].any()  # text only on the labelled mask
    with pytest.raises(ValueError, match="labels"):
        render_overlay(image, masks, labels=["one"])
    with pytest.raises(ValueError, match="masks"):
        render_overlay(image, masks[:, :10])
    assert (render_overlay(image, masks[:0]) == image).all()


def test_viz_png_pixels_follow_the_cached_masks(built, tmp_path, capsys):
    root, cache = built
    out = tmp_path / "sub" / "viz.png"
    samcp_main(
        [
            "viz",
            str(cache),
            IMAGE_ID,
            "--out",
            str(out),
            "--alpha",
            "1",
            "--no-outline",
            "--max-masks",
            "6",
        ]
    )
    assert "wrote" in capsys.readouterr().out
    png = np.asarray(Image.open(out).convert("RGB"))
    image = load_image_rgb(root / "val2017" / f"000000{IMAGE_ID}.jpg")
    masks = CacheReader(cache).get(IMAGE_ID).proposals.decode()[:6]
    assert png.shape == image.shape
    assert 0 < masks.any(0).mean() < 1  # some pixels inside masks, some outside
    np.testing.assert_array_equal(png, expected_overlay(image, masks, 1.0))


def test_failed_image_is_drawn_on_a_grey_canvas_with_warnings(built):
    _, cache = built
    r = render_cached_image(cache, BAD_ID)
    assert r.num_masks == 0
    assert (r.image == CANVAS_GREY).all()
    assert any("grey canvas" in w for w in r.warnings)
    assert any("failed in precompute" in w for w in r.warnings)


def test_image_root_override(built, tmp_path):
    root, cache = built
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(root / "val2017" / f"000000{IMAGE_ID}.jpg", plain)
    want = load_image_rgb(plain / f"000000{IMAGE_ID}.jpg")
    r = render_cached_image(cache, IMAGE_ID, image_root=plain, max_masks=0)
    assert r.warnings == [] and (r.image == want).all()
    # The whole dataset root works too; a wrong folder falls back to grey and says so.
    r = render_cached_image(cache, IMAGE_ID, image_root=root, max_masks=0)
    assert r.warnings == [] and (r.image == want).all()
    r = render_cached_image(cache, IMAGE_ID, image_root=tmp_path / "nowhere", max_masks=0)
    assert (r.image == CANVAS_GREY).all() and "grey canvas" in r.warnings[0]


def test_unknown_image_id_is_a_clear_error(built, tmp_path, capsys):
    _, cache = built
    with pytest.raises(SamcpError, match="'123' is not in cache"):
        render_cached_image(cache, "123")
    with pytest.raises(SystemExit) as e:
        samcp_main(["viz", str(cache), "123", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "123" in err and IMAGE_ID in err  # the hint lists ids that are there
    assert not (tmp_path / "x.png").exists()


def test_grid(built, tmp_path):
    _, cache = built
    r = render_grid(cache, num=4, tile=64)
    assert r.image_ids == ["500001", "500003", "500004", "500005"]  # failed 500002 skipped
    assert r.image.shape == (2 * (64 + 4) + 4, 2 * (64 + 4) + 4, 3)
    out = tmp_path / "grid.png"
    samcp_main(["viz", str(cache), "--grid", "--num", "3", "--tile", "64", "--out", str(out)])
    assert Image.open(out).size == (2 * 68 + 4, 2 * 68 + 4)
    with pytest.raises(SystemExit):
        samcp_main(["viz", str(cache), IMAGE_ID, "--grid", "--out", str(out)])


def gt_as_prediction(root: Path, dest: Path) -> Path:
    """A prediction folder whose segments are the ground truth's (panoptic.json + panoptic/)."""
    dest.mkdir(parents=True)
    shutil.copy(root / "annotations" / "panoptic_val2017.json", dest / "panoptic.json")
    shutil.copytree(root / "annotations" / "panoptic_val2017", dest / "panoptic")
    return dest


def gt_annotation(root: Path, image_id: str) -> tuple[dict, list[dict]]:
    data = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    ann = next(a for a in data["annotations"] if str(a["image_id"]) == image_id)
    return ann, data["categories"]


def test_predicted_segments_contrast_with_the_image(built, tmp_path):
    """On the synthetic set each class is painted in its category colour; a prediction equal to
    the ground truth must still stand out from the pixels under every segment."""
    root, cache = built
    pred = gt_as_prediction(root, tmp_path / "pred")
    out = tmp_path / "pred.png"
    samcp_main(
        ["viz", str(cache), IMAGE_ID, "--pred", str(pred), "--no-outline", "--out", str(out)]
    )
    png = np.asarray(Image.open(out).convert("RGB")).astype(np.float64)
    image = load_image_rgb(root / "val2017" / f"000000{IMAGE_ID}.jpg").astype(np.float64)
    assert png.shape == image.shape
    ann, categories = gt_annotation(root, IMAGE_ID)
    ids = read_panoptic_png(root / "annotations" / "panoptic_val2017" / ann["file_name"])
    masks = [ids == s["id"] for s in ann["segments_info"] if (ids == s["id"]).any()]
    assert len(masks) >= 3

    def shift(drawn: np.ndarray, m: np.ndarray) -> float:  # mean RGB distance to the raw pixels
        return float(np.linalg.norm(drawn[m] - image[m], axis=1).mean())

    margin = 60.0
    shifts = [shift(png, m) for m in masks]
    assert min(shifts) > margin, shifts
    # The check has teeth: the same overlay in each class's own colour stays under the margin.
    paint = {c["id"]: c["color"] for c in categories}
    segs = [s for s in ann["segments_info"] if (ids == s["id"]).any()]
    same = render_overlay(
        image.astype(np.uint8),
        np.stack(masks),
        outline=False,
        colors=np.array([paint[s["category_id"]] for s in segs], np.uint8),
    ).astype(np.float64)
    assert max(shift(same, m) for m in masks) < margin


def test_gt_and_prediction_side_by_side(built, tmp_path, capsys):
    root, cache = built
    # A prediction that differs from the ground truth: one segment missing (void), and a folder
    # without categories (the class names are then the ground truth's).
    pred = gt_as_prediction(root, tmp_path / "pred")
    data = json.loads((pred / "panoptic.json").read_text())
    del data["categories"]
    ann = next(a for a in data["annotations"] if str(a["image_id"]) == IMAGE_ID)
    ids = read_panoptic_png(pred / "panoptic" / ann["file_name"])
    dropped = ann["segments_info"].pop()
    gone = ids == dropped["id"]
    assert gone.any()
    ids[gone] = 0
    write_panoptic_png(pred / "panoptic" / ann["file_name"], ids)
    (pred / "panoptic.json").write_text(json.dumps(data))

    out = tmp_path / "both.png"
    samcp_main(
        ["viz", str(cache), IMAGE_ID, "--gt", str(root), "--pred", str(pred), "-o", str(out)]
    )
    assert "segments" in capsys.readouterr().out
    png = np.asarray(Image.open(out).convert("RGB"))
    image = load_image_rgb(root / "val2017" / f"000000{IMAGE_ID}.jpg")
    h, w = image.shape[:2]
    assert png.shape == (CAPTION_HEIGHT + h, 2 * w + PANEL_GAP, 3)

    gt_segs, names = ground_truth_segments(root, IMAGE_ID)
    pred_segs = prediction_segments(pred, IMAGE_ID, names)
    assert pred_segs.labels == gt_segs.labels[:-1]  # class names, borrowed from the ground truth
    assert names[dropped["category_id"]] == gt_segs.labels[-1]
    left, right = png[CAPTION_HEIGHT:, :w], png[CAPTION_HEIGHT:, w + PANEL_GAP :]
    np.testing.assert_array_equal(left, render_segments(image, gt_segs))
    np.testing.assert_array_equal(right, render_segments(image, pred_segs))
    # The left half draws the dropped segment; the right half leaves it as the raw image (but for
    # a neighbour's label that may reach over it).
    assert (left[gone] != image[gone]).any(axis=1).mean() > 0.9
    assert (right[gone] == image[gone]).all(axis=1).mean() > 0.9

    # --gt alone draws the ground truth at the image's size.
    samcp_main(["viz", str(cache), IMAGE_ID, "--gt", str(root), "-o", str(out)])
    np.testing.assert_array_equal(
        np.asarray(Image.open(out).convert("RGB")), render_segments(image, gt_segs)
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pred", "nowhere"], "prediction folder not found"),
        (["--gt", "nowhere"], "ground-truth panoptic JSON not found"),
        (["--grid", "--gt", "GT"], "give an IMAGE_ID instead of --grid"),
    ],
)
def test_segment_views_refuse_bad_input_in_one_line(built, tmp_path, capsys, args, message):
    root, cache = built
    args = [str(root) if a == "GT" else str(tmp_path / a) if a == "nowhere" else a for a in args]
    image = [] if "--grid" in args else [IMAGE_ID]
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        samcp_main(["viz", str(cache), *image, *args, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_out_that_is_a_folder_or_under_a_file_is_refused(built, tmp_path, capsys):
    _, cache = built
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for out, message in ((folder, "is a folder"), (blocker / "viz.png", "lies under the file")):
        with pytest.raises(SystemExit) as e:
            samcp_main(["viz", str(cache), IMAGE_ID, "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "mine" and blocker.read_text() == "mine"
