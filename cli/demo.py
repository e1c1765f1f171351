"""`samcp demo`: the embedded end-to-end run behind `make demo` (see samcp.pipeline.demo)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--out",
    default="demo_out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the demo writes its dataset, caches and results (re-runs resume).",
)
@click.option(
    "--num-workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Ray CPU workers for precompute (0: in-process).",
)
def command(out: Path, num_workers: int) -> None:
    """Run the whole pipeline end to end on a small synthetic dataset, all under --out,
    as an open-vocabulary benchmark (train on 7 seen classes, predict all 11).

    \b
    1. synth: a synthetic COCO-panoptic dataset (train and val) with its
       seen-class file classes_seen.txt.
    2. CLIP: samcp's synthetic-world CLIP (samcp synth-clip), trained once on
       the train split and reused from the samcp cache folder.
    3. precompute: both splits on local Ray, with SLIC proposals, the
       CLIP's features and SAM embeddings of a tiny random SAM.
    4. train: the SAM-CP affinity head and the PosSAM head on the train
       cache, seen classes only (and untrained copies as baselines).
    5. predict + eval: all classes on val, each head with CLIP off and
       fused (SAM-CP kappa 0 / 0.4 / alpha .4 beta .8; PosSAM LDP only,
       CLIP only, geometric, MASE); PQ/SQ/RQ, mIoU and AP for all, seen and
       unseen classes and the proposal oracle, printed as a table and
       written to OUT/figures.json.
    6. viz: pictures of the trained PosSAM head's predictions in OUT/viz.

    Set SAM_CHECKPOINT (and SAM_MODEL) or CLIP_CHECKPOINT (and CLIP_MODEL) to use real SAM or CLIP
    weights instead. Re-running resumes: the dataset, CLIP, caches and finished runs are reused.
    """
    from samcp.pipeline.demo import run_demo

    run_demo(out, echo=click.echo, num_workers=num_workers)
