"""`samcp viz`: an image with its cached proposals drawn over it, a grid of several, or its
panoptic prediction and ground truth side by side."""

from __future__ import annotations

import click


@click.command("viz")
@click.argument("cache", type=str)
@click.argument("image_id", required=False)
@click.option(
    "--out", "-o", required=True, help="PNG file to write (its folder is created if missing)."
)
@click.option(
    "--image-root",
    default=None,
    help="Where the images are, instead of the dataset recorded in the cache (for a cache made "
    "with `precompute --dataset NAME`, that benchmark's root, read with its reader): a dataset "
    "root, a .jsonl manifest, or a plain folder of image files.",
)
@click.option(
    "--max-masks",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Draw only the first N proposals of an image (cache order; for SAM best first).",
)
@click.option(
    "--alpha",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Opacity of the mask colours.",
)
@click.option("--no-outline", is_flag=True, help="Do not draw mask boundaries.")
@click.option(
    "--pred",
    "pred_dir",
    default=None,
    help="Draw this prediction folder's panoptic segments (samcp predict, or samcp eval "
    "--oracle-out) instead of the proposals.",
)
@click.option(
    "--gt",
    "gt",
    default=None,
    help="Draw the ground-truth segments from this COCO panoptic dataset root (the cache's split) "
    "or panoptic JSON, or the benchmark root of a cache made with `precompute --dataset NAME` "
    "(a semantic benchmark: one segment per class); with --pred, ground truth left and "
    "prediction right.",
)
@click.option("--grid", is_flag=True, help="Tile several images (IMAGE_ID not given).")
@click.option(
    "--num",
    default=9,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images in the grid (the first N that were processed successfully).",
)
@click.option(
    "--tile",
    default=256,
    show_default=True,
    type=click.IntRange(min=16),
    help="Grid cell size in pixels.",
)
def command(
    cache, image_id, out, image_root, max_masks, alpha, no_outline, pred_dir, gt, grid, num, tile
):
    """Draw the proposals of IMAGE_ID in CACHE over the image, as one coloured overlay with
    outlines (larger masks first, so small ones stay visible), and write it to --out.

    With --grid, draw the first --num images tiled, each with its id written on it. With --pred
    and/or --gt, draw the panoptic segments of IMAGE_ID instead: each segment in a colour chosen
    to contrast with the image under it, outlined and labelled with its class name; with both,
    ground truth on the left and prediction on the right.
    """
    from samcp.pipeline.errors import SamcpError
    from samcp.pipeline.outputs import check_out_file
    from samcp.pipeline.viz import (
        render_cached_image,
        render_cached_segments,
        render_grid,
        write_png,
    )

    check_out_file(out, "--out")
    if grid and image_id is not None:
        raise SamcpError("give either IMAGE_ID or --grid, not both")
    if not grid and image_id is None:
        raise SamcpError("give an IMAGE_ID to draw, or --grid for several images")
    segments = pred_dir is not None or gt is not None
    if segments:
        if grid:
            raise SamcpError("--pred and --gt draw one image; give an IMAGE_ID instead of --grid")
        result = render_cached_segments(
            cache,
            image_id,
            pred_dir=pred_dir,
            gt=gt,
            image_root=image_root,
            alpha=alpha,
            outline=not no_outline,
        )
    elif grid:
        result = render_grid(
            cache,
            num=num,
            image_root=image_root,
            max_masks=max_masks,
            alpha=alpha,
            outline=not no_outline,
            tile=tile,
        )
    else:
        result = render_cached_image(
            cache,
            image_id,
            image_root=image_root,
            max_masks=max_masks,
            alpha=alpha,
            outline=not no_outline,
        )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    path = write_png(result.image, out)
    h, w = result.image.shape[:2]
    if segments:
        shown = f"{result.num_masks} segments"
    elif result.num_masks == result.total_masks:
        shown = f"{result.num_masks} masks"
    else:
        shown = f"{result.num_masks} of {result.total_masks} masks (--max-masks)"
    click.echo(f"wrote {path} ({w}x{h}): {len(result.image_ids)} image(s), {shown}")
