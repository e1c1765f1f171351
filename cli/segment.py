"""`samcp segment`: box and point prompts on a cached image with a trained CLIP2SAM run -> a mask,
a class and a score per prompt (a table, COCO RLE JSON and an overlay PNG)."""

from __future__ import annotations

import click


def _numbers(text: str, n: int, option: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != n:
        shape = "x0,y0,x1,y1" if n == 4 else "x,y"
        raise click.BadParameter(f"{text!r}: expected {shape} (pixels)", param_hint=option)
    return values


@click.command("segment")
@click.argument("image")
@click.option("--run", required=True, help="A samcp train --head clip2sam run folder.")
@click.option(
    "--cache",
    required=True,
    help="Cache holding IMAGE (sam_embed and the run's CLIP levels); uncached images are not "
    "supported yet.",
)
@click.option(
    "--box",
    "boxes",
    multiple=True,
    metavar="X0,Y0,X1,Y1",
    help="A box prompt in image pixels (repeatable).",
)
@click.option(
    "--point",
    "points",
    multiple=True,
    metavar="X,Y",
    help="A point prompt in image pixels (repeatable).",
)
@click.option(
    "--out",
    "-o",
    default=None,
    help="Output prefix: writes PREFIX.json (COCO results, RLE) and PREFIX.png (overlay) "
    "[segment_<image id>].",
)
@click.option(
    "--vocabulary",
    default=None,
    help="Class file or builtin vocabulary to name the masks with [the run's classes].",
)
@click.option("--clip-checkpoint", default=None, help="The cache's CLIP, for a new vocabulary.")
@click.option(
    "--alpha", type=click.FloatRange(0, 1), default=None, help="CLIP's weight, seen classes [0.1]."
)
@click.option(
    "--beta", type=click.FloatRange(0, 1), default=None, help="CLIP's weight, unseen classes [0.9]."
)
@click.option("--image-root", default=None, help="Where the image file is, for the overlay.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def command(
    image, run, cache, boxes, points, out, vocabulary, clip_checkpoint, alpha, beta, image_root,
    device,
):  # fmt: skip
    """Segment and name the object under each --box / --point prompt of a cached IMAGE (an image
    id of the cache, or a file whose name is one)."""
    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.outputs import check_out_file
    from samcp.pipeline.segment import (
        find_cached_image,
        load_prompted_run,
        results_table,
        segment_cached_image,
        write_segment_outputs,
    )

    box_list = [_numbers(b, 4, "--box") for b in boxes]
    point_list = [_numbers(p, 2, "--point") for p in points]
    if not box_list and not point_list:
        raise click.UsageError("give at least one --box X0,Y0,X1,Y1 or --point X,Y")
    reader = CacheReader(cache)
    row = find_cached_image(reader, image)
    prefix = out or f"segment_{row.image_id}"
    json_path = check_out_file(f"{prefix}.json", "--out")
    png_path = check_out_file(f"{prefix}.png", "--out")
    predictor = load_prompted_run(
        run,
        reader,
        vocabulary=vocabulary,
        clip_checkpoint=clip_checkpoint,
        alpha=alpha,
        beta=beta,
        device=device,
    )
    results = segment_cached_image(predictor, row, box_list, point_list)
    rows = [("prompt", "class", "score", "mask area"), *results_table(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for w in write_segment_outputs(results, reader, row, json_path, png_path, image_root):
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {json_path} and {png_path}")
