"""`samcp viz`: overlay pixels follow the masks, images are found (or a grey canvas is said)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samcp.cli.main import main as samcp_main
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.datasets import load_image_rgb
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.viz import (
    CANVAS_GREY,
    mask_colors,
    render_cached_image,
    render_grid,
    render_overlay,
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
