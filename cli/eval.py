"""`samcp eval`: PQ/SQ/RQ, mIoU and AP of a prediction folder, of a trained run on a cache (predict
then evaluate), or of the proposal oracle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from samcp.pipeline.errors import SamcpError


@click.command("eval")
@click.option(
    "--gt",
    "gt_path",
    type=click.Path(exists=True, path_type=Path),
    help="COCO panoptic dataset root (annotations/panoptic_<split>.json) or a panoptic JSON file; "
    "with --dataset, that benchmark's root. With --run, defaults to the dataset the cache was "
    "made from.",
)
@click.option(
    "--dataset",
    "dataset",
    default=None,
    metavar="NAME",
    help="Evaluate on a benchmark in its prepared layout under --gt: ade20k_150, cityscapes, "
    "coco_panoptic (PQ, mIoU, AP), ade20k_847, pascal_context_59, pascal_context_459, "
    "pascal_voc_20, coco_stuff_171 (mIoU, fwIoU, pACC). docs/datasets.md.",
)
@click.option(
    "--split",
    default=None,
    help="Split to evaluate when --gt is a dataset root [default: val2017; val with --dataset; "
    "with --run and no --gt the cache's split].",
)
@click.option(
    "--pred",
    "pred_dir",
    type=click.Path(path_type=Path),
    help="Prediction folder written by samcp predict (panoptic.json, panoptic/, ...).",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Predict with this trained run on --cache (into RUN/predictions/<cache name>/, or "
    "<cache name>.<vocabulary file stem>/ with --vocabulary), then evaluate.",
)
@click.option(
    "--cache",
    "run_cache",
    type=click.Path(exists=True, path_type=Path),
    help="Proposal cache of the images to predict with --run.",
)
@click.option(
    "--kappa",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="With --run: CLIP fusion weight (see samcp predict) [default: the head config's].",
)
@click.option(
    "--device", default="auto", show_default=True, help="With --run: auto, cpu or cuda[:N]."
)
@click.option(
    "--vocabulary",
    default=None,
    metavar="FILE",
    help="With --run: predict these classes (a class file id:name,synonym,... or builtin name), "
    "e.g. all classes for an open-vocabulary evaluation [default: the run's training classes].",
)
@click.option(
    "--clip-checkpoint",
    default=None,
    help="With --run --vocabulary: the cache's CLIP, to embed a vocabulary not cached yet.",
)
@click.option(
    "--seen-classes",
    "seen_spec",
    default=None,
    metavar="FILE|RUN|IDS",
    help="Also report every metric over the seen and the unseen classes: a class file (e.g. "
    "classes_seen.txt), a run folder or its classes.json (the training classes), or ids "
    "such as 1,2,4.",
)
@click.option(
    "--oracle",
    "oracle_cache",
    type=click.Path(exists=True, path_type=Path),
    help="Evaluate the ceiling of a proposal cache instead of a prediction folder.",
)
@click.option(
    "--oracle-threshold",
    default=0.5,
    show_default=True,
    type=float,
    help="Minimum intersection-over-proposal (exclusive) to assign a proposal.",
)
@click.option(
    "--oracle-out",
    type=click.Path(path_type=Path),
    help="Keep the oracle's prediction folder here (default: a temporary folder). It must be "
    "new, empty or an oracle folder samcp wrote, which is replaced.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    help="Write all numbers to this JSON file.",
)
@click.option(
    "--prompts",
    type=click.Choice(["gt-boxes", "gt-points"]),
    default=None,
    help="With --run RUN --cache CACHE of a prompted head (clip2sam): prompt it with every "
    "ground-truth segment's box or centre point and report mask mIoU and class accuracy, all / "
    "seen / unseen (Open-Vocabulary SAM's table 1), instead of PQ.",
)
@click.option("--per-class", is_flag=True, help="Add per-class results to the table and JSON.")
@click.option(
    "--semantic-rule",
    type=click.Choice(["detectron2", "mmseg"]),
    default="detectron2",
    show_default=True,
    help="detectron2: a class counts where it has ground truth; mmseg: where its union "
    "is non-empty.",
)
@click.option(
    "--workers", type=int, default=None, help="Processes for per-image work [default: all cores]."
)
@click.option(
    "--allow-other-dataset",
    is_flag=True,
    help="Accept a --cache/--oracle cache recorded as made from another dataset than the ground "
    "truth (the same images moved); image sizes are still checked.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def command(
    gt_path: Path | None,
    dataset: str | None,
    split: str | None,
    pred_dir: Path | None,
    run_dir: Path | None,
    run_cache: Path | None,
    kappa: float | None,
    device: str,
    vocabulary: str | None,
    clip_checkpoint: str | None,
    seen_spec: str | None,
    oracle_cache: Path | None,
    oracle_threshold: float,
    oracle_out: Path | None,
    json_out: Path | None,
    prompts: str | None,
    per_class: bool,
    semantic_rule: str,
    workers: int | None,
    allow_other_dataset: bool,
    no_progress: bool,
) -> None:
    """Evaluate predictions (a --pred folder, or a --run predicted on a --cache, or the proposal
    oracle) against a COCO panoptic ground truth or a --dataset benchmark."""
    from samcp.pipeline.evaluation import (
        build_oracle_predictions,
        cache_proposals,
        check_cache_covers,
        evaluate,
        format_report,
        resolve_ground_truth,
        unfinished_cache_note,
    )
    from samcp.pipeline.evaluation.formats import load_ground_truth, write_json_atomic
    from samcp.pipeline.evaluation.groups import check_seen_classes, read_seen_classes
    from samcp.pipeline.outputs import check_out_file, prepare_output_dir

    if sum(x is not None for x in (pred_dir, oracle_cache, run_dir)) != 1:
        raise SamcpError(
            "pass exactly one of --pred PRED_DIR, --run RUN --cache CACHE or --oracle CACHE"
        )
    if (run_dir is None) != (run_cache is None):
        raise SamcpError("--run and --cache go together: pass both, or neither")
    if workers is not None and workers < 1:
        raise SamcpError(f"--workers {workers} must be at least 1")
    if oracle_out is not None and oracle_cache is None:
        raise SamcpError("--oracle-out goes with --oracle CACHE; drop it or pass --oracle")
    if (vocabulary is not None or clip_checkpoint is not None) and run_dir is None:
        raise SamcpError("--vocabulary and --clip-checkpoint go with --run RUN --cache CACHE")
    seen = read_seen_classes(seen_spec) if seen_spec is not None else None
    # Destinations are checked before any work, so a typo does not cost a whole evaluation.
    if json_out is not None:
        check_out_file(json_out, "--json")
    if prompts is not None:
        if run_dir is None:
            raise SamcpError("--prompts goes with --run RUN --cache CACHE (a clip2sam run)")
        if dataset is not None or seen is not None or oracle_out is not None:
            raise SamcpError(
                "--prompts reports seen/unseen by the run's training classes and reads a COCO "
                "panoptic --gt; drop --dataset, --seen-classes and --oracle-out"
            )
        from samcp.pipeline.segment import evaluate_prompts

        # --kappa sets CLIP's weight on every class (alpha = beta); default: the run's 0.1 / 0.9
        weights = {} if kappa is None else {"alpha": kappa, "beta": kappa}
        result = evaluate_prompts(
            run_dir,
            run_cache,
            gt_path or _cache_source(run_cache)[0],
            prompts,
            split=split,
            vocabulary=vocabulary,
            clip_checkpoint=clip_checkpoint,
            device=device,
            **weights,
        )
        click.echo(result.table())
        if json_out is not None:
            write_json_atomic(json_out, result.to_dict())
        return
    if oracle_out is not None:
        prepare_output_dir(oracle_out, "oracle", reuse=True, option="--oracle-out")
    workers = workers or os.cpu_count() or 1
    if dataset is None and gt_path is None and run_cache is not None:
        src = _cache_source_attrs(run_cache)
        if src.get("benchmark") not in (None, "coco_panoptic"):
            dataset = src["benchmark"]  # a cache made with precompute --dataset
    if dataset is not None:
        _benchmark_eval(
            dataset,
            gt_path,
            split,
            pred_dir,
            run_dir,
            run_cache,
            oracle_cache,
            seen,
            json_out,
            per_class=per_class,
            semantic_rule=semantic_rule,
            workers=workers,
            progress=not no_progress,
            kappa=kappa,
            device=device,
            vocabulary=vocabulary,
            clip_checkpoint=clip_checkpoint,
            allow_other_dataset=allow_other_dataset,
        )
        return
    if gt_path is None:
        if run_cache is None:
            raise SamcpError("pass --gt DATASET_OR_JSON (the ground truth to evaluate against)")
        gt_path, cache_split = _cache_source(run_cache)
        split = split or cache_split
    gt_json, gt_png_dir = resolve_ground_truth(gt_path, split or "val2017")
    progress = not no_progress
    if seen is not None:  # before predicting, so that a wrong id does not cost a prediction run
        check_seen_classes(seen, load_ground_truth(gt_json, gt_png_dir).categories, gt_json)

    from samcp.pipeline.cache import check_cache_matches_annotations

    for cache in (run_cache, oracle_cache):
        if cache is not None:  # never score a cache made from other images against this GT
            check_cache_matches_annotations(cache, gt_json, allow_other=allow_other_dataset)

    if run_dir is not None:
        from samcp.pipeline.predict import gt_file_stems, predict_run, prediction_notes

        assert run_cache is not None
        check_cache_covers(run_cache, gt_json, gt_png_dir)
        name = run_cache.resolve().name
        if vocabulary is not None:  # one folder per vocabulary, so none replaces another
            name += f".{Path(vocabulary).stem}"
        pred_dir = predict_run(
            run_dir,
            run_cache,
            run_dir / "predictions" / name,
            vocabulary=vocabulary,
            clip_checkpoint=clip_checkpoint,
            kappa=kappa,
            device=device,
            file_stems=gt_file_stems(gt_json),
            progress=progress,
        )

    with tempfile.TemporaryDirectory(prefix="samcp-oracle-") as tmp:
        oracle_stats = None
        unfinished = None
        if oracle_cache is not None:
            unfinished = unfinished_cache_note(oracle_cache)
            pred_dir = oracle_out or Path(tmp) / "oracle"
            oracle_stats = build_oracle_predictions(
                gt_json,
                gt_png_dir,
                cache_proposals(oracle_cache),
                pred_dir,
                threshold=oracle_threshold,
                workers=workers,
                progress=progress,
            )
        assert pred_dir is not None
        report = evaluate(
            gt_json,
            gt_png_dir,
            pred_dir,
            workers=workers,
            semantic_rule=semantic_rule,  # type: ignore[arg-type]
            progress=progress,
            seen=seen,
        )
    if run_dir is not None:
        report.notes[:0] = [f"predictions of {run_dir}: {pred_dir}", *prediction_notes(pred_dir)]
    if oracle_stats is not None:
        note = (
            f"oracle of {oracle_cache}: {oracle_stats.assigned}/{oracle_stats.proposals} "
            f"proposals assigned (IoP > {oracle_threshold}); "
            f"{oracle_stats.images_without_proposals} images without proposals"
        )
        if unfinished is not None and oracle_stats.images_not_in_source:
            note += f", {oracle_stats.images_not_in_source} of them missing because {unfinished}"
        elif unfinished is not None:
            note += f"; {unfinished}"
        report.notes.insert(0, note)
    click.echo(format_report(report, per_class=per_class))
    if json_out is not None:
        out = report.to_dict(per_class=per_class)
        out["ground_truth"] = str(gt_json)
        out["predictions"] = str(oracle_cache if oracle_cache is not None else pred_dir)
        out["run"] = None if run_dir is None else {"run": str(run_dir), "cache": str(run_cache)}
        out["oracle"] = (
            None
            if oracle_stats is None
            else {
                "cache": str(oracle_cache),
                "threshold": oracle_threshold,
                "unfinished": unfinished,
                **oracle_stats.__dict__,
            }
        )
        write_json_atomic(json_out, out)


def _cache_source_attrs(cache: Path) -> dict:
    from samcp.pipeline.cache import CacheReader

    return dict(CacheReader(cache).attrs.get("dataset_source") or {})


def _benchmark_eval(
    dataset: str,
    gt_path: Path | None,
    split: str | None,
    pred_dir: Path | None,
    run_dir: Path | None,
    run_cache: Path | None,
    oracle_cache: Path | None,
    seen,
    json_out: Path | None,
    *,
    per_class: bool,
    semantic_rule: str,
    workers: int,
    progress: bool,
    kappa: float | None,
    device: str,
    vocabulary: str | None,
    clip_checkpoint: str | None,
    allow_other_dataset: bool,
) -> None:
    """`samcp eval --dataset NAME`: a prediction folder (or a run predicted on a cache of that
    benchmark) scored on the benchmark's ground truth."""
    from samcp.pipeline.benchmarks import open_benchmark
    from samcp.pipeline.evaluation import evaluate_benchmark, format_report
    from samcp.pipeline.evaluation.formats import write_json_atomic
    from samcp.pipeline.evaluation.groups import check_seen_classes

    if oracle_cache is not None:
        raise SamcpError(
            "--oracle works with a COCO-layout --gt, not with --dataset; drop one of them"
        )
    if gt_path is None:
        src = _cache_source_attrs(run_cache) if run_cache is not None else {}
        if src.get("benchmark") != dataset or not src.get("path"):
            raise SamcpError(f"--dataset {dataset} needs --gt ROOT, the benchmark's datasets root")
        gt_path, split = Path(src["path"]), split or src.get("split")
    bench = open_benchmark(dataset, gt_path, split or "val")
    if seen is not None:  # before predicting, so that a wrong id does not cost a prediction run
        from samcp.pipeline.evaluation.runner import semantic_ground_truth

        cats = (
            semantic_ground_truth(bench).categories
            if bench.task == "semantic"
            else bench.ground_truth().categories
        )
        check_seen_classes(seen, cats, f"{dataset} ({bench.root})")
    notes: list[str] = []
    if run_dir is not None:
        from samcp.pipeline.cache import CacheReader, check_cache_source
        from samcp.pipeline.predict import predict_run, prediction_notes

        assert run_cache is not None
        sizes = {r.image_id: (r.height, r.width) for r in bench.records}
        ann = bench.json_path if bench.task == "panoptic" else bench.label_dir
        check_cache_source(
            CacheReader(run_cache), ann, sizes, allow_other=allow_other_dataset, option="--gt"
        )
        name = run_cache.resolve().name + f".{dataset}"
        if vocabulary is not None:
            name += f".{Path(vocabulary).stem}"
        pred_dir = predict_run(
            run_dir,
            run_cache,
            run_dir / "predictions" / name,
            vocabulary=vocabulary,
            clip_checkpoint=clip_checkpoint,
            kappa=kappa,
            device=device,
            dataset=dataset,
            file_stems=bench.file_stems(),
            progress=progress,
        )
        notes = [f"predictions of {run_dir}: {pred_dir}", *prediction_notes(pred_dir)]
    assert pred_dir is not None
    report = evaluate_benchmark(
        bench,
        pred_dir,
        workers=workers,
        semantic_rule=semantic_rule,  # type: ignore[arg-type]
        progress=progress,
        seen=seen,
    )
    report.notes[:0] = notes
    click.echo(format_report(report, per_class=per_class))
    if json_out is not None:
        out = report.to_dict(per_class=per_class)
        out["ground_truth"] = str(bench.root)
        out["split"] = bench.split
        out["predictions"] = str(pred_dir)
        out["run"] = None if run_dir is None else {"run": str(run_dir), "cache": str(run_cache)}
        out["oracle"] = None
        write_json_atomic(json_out, out)


def _cache_source(cache: Path) -> tuple[Path, str | None]:
    """The dataset a cache was made from (its ``dataset_source`` attribute): (path, split)."""
    from samcp.pipeline.cache import CacheReader

    src = CacheReader(cache).attrs.get("dataset_source") or {}
    if not src.get("path"):
        raise SamcpError(f"cache {cache} does not record the dataset it was made from; pass --gt")
    return Path(src["path"]), src.get("split")
