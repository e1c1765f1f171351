"""Evaluates a prediction folder against a COCO panoptic ground truth, image-parallel.

Per-image work (reading PNGs, pair counting, matching, confusion matrices, ground-truth RLEs) runs in
a multiprocessing pool; results come back in image order and are summed in that order, so the
numbers do not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import (
    IGNORE_LABEL,
    IGNORE_LABEL_16,
    Category,
    GroundTruth,
    Predictions,
    SemanticGroundTruth,
    ignore_value,
    load_ground_truth,
    load_predictions,
    png_stem,
    read_label_png,
    read_panoptic_png,
)
from samcp.pipeline.evaluation.groups import (
    GROUPS,
    GroupResult,
    SeenClasses,
    check_seen_classes,
    group_ids,
    group_results,
)
from samcp.pipeline.evaluation.instance import (
    InstanceKeys,
    InstanceResult,
    accumulate_instances,
    evaluate_images,
    ground_truth_instances,
    make_keys,
    prepare_detections,
)
from samcp.pipeline.evaluation.panoptic import (
    PanopticResult,
    PQCounts,
    accumulate,
    count_pairs,
    pq_image,
    summarize_panoptic,
)
from samcp.pipeline.evaluation.semantic import (
    SemanticResult,
    SemanticRule,
    confusion_from_labels,
    confusion_from_pairs,
    label_lut,
    labels_from_png,
    semantic_lut,
    semantic_metrics,
)


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    gt_png: str
    gt_segments: list[dict[str, Any]]
    pred_png: str
    pred_segments: list[dict[str, Any]]
    semantic_png: str | None
    detections: list[dict[str, Any]] | None = None
    gt_semantic_png: str | None = None  # the benchmark's own semantic labels (class ids)


@dataclass
class _ImageResult:
    image_id: str
    shape: tuple[int, int]
    pq: dict[int, PQCounts]
    gt_instances: list[dict[str, Any]] | None
    instance_eval: list[Any] | None = None


@dataclass(frozen=True)
class _Context:
    categories: tuple[Category, ...]
    instance_keys: InstanceKeys | None
    semantic_lut: np.ndarray | None = None  # 8-bit semantic PNG value -> GT class index
    semantic_lut16: np.ndarray | None = None  # the same for 16-bit semantic PNGs
    gt_semantic_lut: np.ndarray | None = None  # GT label file value (class id) -> class index


def _pred_labels(path: Path, ctx: _Context, where: str) -> np.ndarray:
    """A predicted semantic PNG as GT class indices (K = unlabelled): 8-bit PNGs mark "no class"
    with 255, 16-bit ones with 65535."""
    raw = read_label_png(path)
    lut = ctx.semantic_lut if raw.dtype == np.uint8 else ctx.semantic_lut16
    return labels_from_png(raw, len(ctx.categories), ignore_value(raw), lut, where=where)


def _gt_labels(path: Path, ctx: _Context, where: str) -> np.ndarray:
    """A ground-truth label file (class ids, the benchmark's ignore label) as class indices."""
    from samcp.pipeline.benchmarks import read_label_map

    assert ctx.gt_semantic_lut is not None
    raw = read_label_map(path)
    out = ctx.gt_semantic_lut[raw.astype(np.int64)]
    if out.size and int(out.min()) < 0:
        bad = int(raw[out < 0].min())
        raise SamcpError(
            f"{where}: ground-truth label {bad} in {path} is neither a class id nor the ignore "
            "label; the label files do not belong to this benchmark (check --dataset)"
        )
    return out


def _pred_from_panoptic(
    pred: np.ndarray, segments: Sequence[dict[str, Any]], cats: dict[int, Category], k: int
) -> np.ndarray:
    """Class index per pixel of a predicted panoptic map (void and unlisted ids: K)."""
    pred_cls = {0: k}
    for s in segments:
        pred_cls[int(s["id"])] = cats[int(s["category_id"])].index
    ids, inverse = np.unique(pred, return_inverse=True)
    lut = np.array([pred_cls.get(x, k) for x in ids.tolist()], dtype=np.int64)
    return lut[inverse.reshape(pred.shape)]


_CTX: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _CTX
    _CTX = ctx


def _evaluate_image(task: _ImageTask, ctx: _Context) -> tuple[_ImageResult, np.ndarray]:
    cats = {c.id: c for c in ctx.categories}
    k = len(ctx.categories)
    where = f"image {task.image_id} ({task.pred_png})"
    gt = read_panoptic_png(Path(task.gt_png))
    pred = read_panoptic_png(Path(task.pred_png))
    if gt.shape != pred.shape:
        raise SamcpError(
            f"{where}: predicted PNG is {pred.shape[1]}x{pred.shape[0]} but the ground truth is "
            f"{gt.shape[1]}x{gt.shape[0]}; predict at the original image size"
        )
    pairs = count_pairs(gt, pred)
    pq = pq_image(pairs, task.gt_segments, task.pred_segments, cats, where=where)

    # Ground-truth semantics: every listed segment (crowd included, as detectron2's panoptic ->
    # semantic conversion does) labelled with its class; void and unlisted ids are ignored (K).
    gt_cls = {0: k}
    for s in task.gt_segments:
        gt_cls[int(s["id"])] = cats[int(s["category_id"])].index
    if task.gt_semantic_png is not None:
        # The benchmark's own semantic labels (ADE20K's annotations_detectron2, Cityscapes'
        # labelTrainIds): what the papers' mIoU is computed on.
        gt_sem = _gt_labels(Path(task.gt_semantic_png), ctx, where)
        if task.semantic_png is None:
            sem = _pred_from_panoptic(pred, task.pred_segments, cats, k)
        else:
            where = f"image {task.image_id} ({task.semantic_png})"
            sem = _pred_labels(Path(task.semantic_png), ctx, where)
        conf = confusion_from_labels(sem, gt_sem, k, where=where)
    elif task.semantic_png is None:
        # Derived from the panoptic output: a void pixel stays unlabelled and counts as wrong.
        pred_cls = {0: k}
        for s in task.pred_segments:
            pred_cls[int(s["id"])] = cats[int(s["category_id"])].index
        g = np.array([gt_cls.get(x, k) for x in pairs.gt_ids.tolist()], dtype=np.int64)
        p = np.array([pred_cls[x] for x in pairs.pred_ids.tolist()], dtype=np.int64)
        conf = confusion_from_pairs(p, g, pairs.counts, k)
    else:
        where = f"image {task.image_id} ({task.semantic_png})"
        sem = _pred_labels(Path(task.semantic_png), ctx, where)
        ids, inverse = np.unique(gt, return_inverse=True)
        lut = np.array([gt_cls.get(x, k) for x in ids.tolist()], dtype=np.int64)
        gt_sem = lut[inverse.reshape(gt.shape)]
        conf = confusion_from_labels(sem, gt_sem, k, where=where)

    instances = None
    if ctx.instance_keys is not None:
        instances = ground_truth_instances(gt, task.gt_segments, cats)
    return _ImageResult(task.image_id, gt.shape, pq, instances), conf


def _evaluate_chunk(tasks: Sequence[_ImageTask]) -> tuple[list[_ImageResult], np.ndarray]:
    assert _CTX is not None
    results = []
    total = None
    for t in tasks:
        r, conf = _evaluate_image(t, _CTX)
        results.append(r)
        total = conf if total is None else total + conf
    keys = _CTX.instance_keys
    if keys is not None:
        # COCOeval's per-image matching runs here, in parallel; only accumulate is serial.
        gt = {r.image_id: r.gt_instances or [] for r in results}
        dt = {t.image_id: t.detections or [] for t in tasks}
        per_image = evaluate_images(gt, dt, keys)
        for r in results:
            r.instance_eval = per_image[keys.images[r.image_id]]
            r.gt_instances = None
    return results, total


@dataclass
class EvalReport:
    """Everything `samcp eval` measured.

    Attributes:
        panoptic: PQ/SQ/RQ; None for a semantic-only benchmark.
        semantic: mIoU and friends.
        instance: AP, or None when there is no instances.json or no thing class.
        categories: The ground truth's categories.
        num_images: Images evaluated.
        semantic_source: "semantic" (PRED_DIR/semantic PNGs) or "panoptic" (derived).
        notes: Human-readable remarks (e.g. why AP is missing).
        groups: ``"seen" / "unseen" -> GroupResult`` when seen classes were given, else empty.
        seen_source: Where the seen classes came from (file or ids), None without them.
        benchmark: The registered benchmark evaluated (``--dataset``), None for a plain COCO
            panoptic ground truth.
    """

    panoptic: PanopticResult | None
    semantic: SemanticResult
    instance: InstanceResult | None
    categories: list[Category]
    num_images: int
    semantic_source: str
    notes: list[str] = field(default_factory=list)
    groups: dict[str, GroupResult] = field(default_factory=dict)
    seen_source: str | None = None
    benchmark: str | None = None

    def to_dict(self, per_class: bool = False) -> dict[str, Any]:
        """All numbers as a JSON-ready dict; per-class tables only when ``per_class``.

        ``groups`` is ``{"seen": ..., "unseen": ...}`` (:meth:`GroupResult.to_dict`) when seen
        classes were given, else None.
        """
        pan = None
        if self.panoptic is not None:
            pan = {n: asdict(getattr(self.panoptic, n)) for n in ("all", "things", "stuff")}
        sem = {k: v for k, v in asdict(self.semantic).items() if k != "per_class"}
        inst = None
        if self.instance is not None:
            inst = {
                k: v for k, v in asdict(self.instance).items() if k not in ("per_class", "groups")
            }
        out: dict[str, Any] = {
            "benchmark": self.benchmark,
            "num_images": self.num_images,
            "panoptic": pan,
            "semantic": {**sem, "source": self.semantic_source},
            "instance": inst,
            "groups": {name: g.to_dict() for name, g in self.groups.items()} or None,
            "seen_classes": self.seen_source,
            "notes": list(self.notes),
        }
        group_of = self._group_of()
        if per_class:
            rows = []
            for c in self.categories:
                row: dict[str, Any] = {"category_id": c.id, "name": c.name, "isthing": c.isthing}
                if group_of:
                    row["group"] = group_of[c.id]
                if self.panoptic is not None:
                    row.update(self.panoptic.per_class.get(c.id, {}))
                sem_row = self.semantic.per_class.get(c.index, {})
                row.update(iou=sem_row.get("iou"), acc=sem_row.get("acc"))
                if self.instance is not None and c.id in self.instance.per_class:
                    row["ap"] = self.instance.per_class[c.id]["ap"]
                rows.append(row)
            out["per_class"] = rows
        return out

    def _group_of(self) -> dict[int, str]:
        return {cid: name for name, g in self.groups.items() for cid in g.category_ids}


def _fmt(v: float | None, width: int = 6) -> str:
    return f"{'n/a':>{width}}" if v is None else f"{v:{width}.1f}"


def format_report(report: EvalReport, per_class: bool = False) -> str:
    """Renders the report as the terminal table (PQ/SQ/RQ, mIoU/fwIoU/pACC/mACC, AP)."""
    what = f" of {report.benchmark}" if report.benchmark else ""
    lines = [f"Evaluated {report.num_images} images{what}"]
    if report.panoptic is not None:
        lines.append("")
        lines.append(f"{'':10s}|{'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'#cat':>5s}")
        lines.append("-" * 10 + "+" + "-" * 27)
        for name in ("all", "things", "stuff"):
            s = getattr(report.panoptic, name)
            lines.append(
                f"{name.capitalize():10s}|{_fmt(s.pq)} {_fmt(s.sq)} {_fmt(s.rq)} {s.n:5d}"
            )
    sem = report.semantic
    lines += [
        "",
        f"Semantic ({sem.rule} rule, from {report.semantic_source} output, {sem.n} classes)",
        f"{'mIoU':>6s} {'fwIoU':>6s} {'pACC':>6s} {'mACC':>6s}",
        f"{_fmt(sem.miou)} {_fmt(sem.fwiou)} {_fmt(sem.pacc)} {_fmt(sem.macc)}",
    ]
    inst = report.instance
    if inst is not None:
        lines += [
            "",
            f"Instance segm AP ({inst.num_detections} detections)",
            " ".join(f"{k:>6s}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")),
            " ".join(
                _fmt(v) for v in (inst.ap, inst.ap50, inst.ap75, inst.aps, inst.apm, inst.apl)
            ),
        ]
    if report.groups:
        lines += ["", *_format_groups(report)]
    group_of = report._group_of()
    if per_class and report.panoptic is None:  # semantic-only: IoU and accuracy per class
        lines += ["", f"{'category':24s} {'IoU':>6s} {'Acc':>6s}" + (
            f" {'group':>6s}" if group_of else "")]
        for c in report.categories:
            row = report.semantic.per_class.get(c.index, {})
            lines.append(
                f"{c.name[:24]:24s} {_fmt(row.get('iou'))} {_fmt(row.get('acc'))}"
                + (f" {group_of[c.id]:>6s}" if group_of else "")
            )
    elif per_class:
        head = f"{'category':24s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'IoU':>6s} {'AP':>6s}"
        lines += ["", head + (f" {'group':>6s}" if group_of else "")]
        for c in report.categories:
            p = report.panoptic.per_class.get(c.id, {}) if report.panoptic is not None else {}
            iou = report.semantic.per_class.get(c.index, {}).get("iou")
            ap = inst.per_class.get(c.id, {}).get("ap") if inst is not None else None
            name = f"{c.name} ({'thing' if c.isthing else 'stuff'})"[:24]
            lines.append(
                f"{name:24s} {_fmt(p.get('pq'))} {_fmt(p.get('sq'))} {_fmt(p.get('rq'))} "
                f"{_fmt(iou)} {_fmt(ap)}" + (f" {group_of[c.id]:>6s}" if group_of else "")
            )
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _format_groups(report: EvalReport) -> list[str]:
    """The open-vocabulary table: every metric over all, seen and unseen classes."""
    n_seen = len(report.groups["seen"].category_ids)
    n_unseen = len(report.groups["unseen"].category_ids)
    if report.panoptic is None:  # a semantic-only benchmark: mIoU per group
        lines = [
            f"Open vocabulary: {n_seen} seen classes ({report.seen_source}), {n_unseen} unseen",
            f"{'':10s}|{'mIoU':>6s} {'#cls':>5s}",
            "-" * 10 + "+" + "-" * 12,
            f"{'All':10s}|{_fmt(report.semantic.miou)} {report.semantic.n:5d}",
        ]
        for name in GROUPS:
            g = report.groups[name]
            lines.append(f"{name.capitalize():10s}|{_fmt(g.miou)} {g.miou_n:5d}")
        return lines
    lines = [
        f"Open vocabulary: {n_seen} seen classes ({report.seen_source}), {n_unseen} unseen",
        f"{'':10s}|{'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'PQth':>6s} {'PQst':>6s} {'#cat':>5s} |"
        f"{'mIoU':>6s} {'#cls':>5s} |{'AP':>6s} {'#cls':>5s}",
        "-" * 10 + "+" + "-" * 41 + "+" + "-" * 13 + "+" + "-" * 12,
    ]
    inst = report.instance
    rows: list[tuple[str, Any, float | None, int, dict[str, Any] | None]] = [
        (
            "All",
            {
                "all": report.panoptic.all,
                "things": report.panoptic.things,
                "stuff": report.panoptic.stuff,
            },
            report.semantic.miou,
            report.semantic.n,
            None
            if inst is None
            else {"ap": inst.ap, "n": sum(v["ap"] is not None for v in inst.per_class.values())},
        )
    ]
    for name in GROUPS:
        g = report.groups[name]
        rows.append((name.capitalize(), g.panoptic, g.miou, g.miou_n, g.instance))
    for label, pan, miou, miou_n, ap in rows:
        a, th, st = pan["all"], pan["things"], pan["stuff"]
        ap_cells = f"{_fmt(None)} {'':5s}" if ap is None else f"{_fmt(ap['ap'])} {ap['n']:5d}"
        lines.append(
            f"{label:10s}|{_fmt(a.pq)} {_fmt(a.sq)} {_fmt(a.rq)} {_fmt(th.pq)} {_fmt(st.pq)} "
            f"{a.n:5d} |{_fmt(miou)} {miou_n:5d} |{ap_cells}"
        )
    return lines


def _image_size(gt: GroundTruth, ann: dict[str, Any]) -> tuple[int, int]:
    # The PNG header, not the JSON's images list: the masks are compared with the PNG itself.
    path = gt.png_dir / ann["file_name"]
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError:
        raise SamcpError(f"{path}: ground-truth panoptic PNG missing or unreadable") from None


def _tasks(
    gt: GroundTruth, pred: Predictions, semantic_files: dict[str, Path] | None = None
) -> list[_ImageTask]:
    tasks = []
    for ann in gt.annotations:
        image_id = str(ann["image_id"])
        p = pred.annotations.get(image_id)
        if p is None:
            raise SamcpError(
                f"{pred.root / 'panoptic.json'}: no prediction for ground-truth image {image_id} "
                f"({ann['file_name']}); predict every image of the split"
            )
        sem = None
        if pred.semantic_dir is not None:
            sem = str(pred.semantic_dir / f"{png_stem(ann['file_name'])}.png")
        tasks.append(
            _ImageTask(
                image_id,
                str(gt.png_dir / ann["file_name"]),
                list(ann["segments_info"]),
                str(pred.png_dir / p["file_name"]),
                list(p["segments_info"]),
                sem,
                gt_semantic_png=None if semantic_files is None else str(semantic_files[image_id]),
            )
        )
    return tasks


def _run_tasks(
    tasks: list[Any], ctx: _Context, workers: int, progress: bool, fn: Any = None
) -> Iterator[tuple[list[Any], np.ndarray]]:
    """Runs ``fn`` (default :func:`_evaluate_chunk`) over chunks of tasks, in order, in ``workers``
    processes; yields each chunk's (per-image results, summed confusion matrix). Only the chunks
    in flight are held, so memory does not grow with the number of images."""
    fn = fn or _evaluate_chunk
    # Chunks amortise the pickling of results; several chunks per worker keep the load balanced.
    chunk = max(1, min(32, len(tasks) // max(1, workers * 8)))
    chunks = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
    bar = tqdm(total=len(tasks), desc="eval", unit="img", file=sys.stderr, disable=not progress)
    try:
        if workers <= 1:
            _init_worker(ctx)
            for c in chunks:
                out = fn(c)
                bar.update(len(c))
                yield out
        else:
            with multiprocessing.get_context().Pool(
                workers, initializer=_init_worker, initargs=(ctx,)
            ) as pool:
                for out in pool.imap(fn, chunks):
                    bar.update(len(out[0]))
                    yield out
    finally:
        bar.close()


def evaluate(
    gt_json: Path,
    gt_png_dir: Path | None,
    pred_dir: Path,
    *,
    workers: int | None = None,
    semantic_rule: SemanticRule = "detectron2",
    progress: bool = False,
    seen: SeenClasses | None = None,
) -> EvalReport:
    """Evaluates a prediction folder: PQ always, mIoU always, AP when instances.json exists.

    Args:
        gt_json: Ground-truth COCO panoptic JSON.
        gt_png_dir: Its PNG folder (default: the JSON's path without ``.json``).
        pred_dir: Prediction folder (panoptic.json, panoptic/, optional semantic/, instances.json).
        workers: Processes for per-image work; default ``os.cpu_count()``; 1 runs in-process.
        semantic_rule: "detectron2" or "mmseg" (see :func:`semantic_metrics`).
        progress: Show a tqdm bar on stderr.
        seen: The seen classes (samcp.pipeline.evaluation.groups.read_seen_classes): every
            metric is then also reported over the seen and the unseen classes (``groups``).

    Returns:
        The report.

    Raises:
        SamcpError: On missing files and inconsistent predictions, naming the file and segment.
    """
    gt = load_ground_truth(Path(gt_json), gt_png_dir)
    return evaluate_ground_truth(
        gt,
        pred_dir,
        workers=workers,
        semantic_rule=semantic_rule,
        progress=progress,
        seen=seen,
    )


def evaluate_ground_truth(
    gt: GroundTruth,
    pred_dir: Path,
    *,
    workers: int | None = None,
    semantic_rule: SemanticRule = "detectron2",
    progress: bool = False,
    seen: SeenClasses | None = None,
    semantic_files: dict[str, Path] | None = None,
    semantic_ignore: int = IGNORE_LABEL,
    benchmark: str | None = None,
) -> EvalReport:
    """:func:`evaluate` on a loaded ground truth (e.g. a benchmark's, with remapped ids).

    Args:
        gt: The panoptic ground truth.
        pred_dir, workers, semantic_rule, progress, seen: As for :func:`evaluate`.
        semantic_files: ``image_id -> label file`` of the benchmark's own semantic ground truth
            (values are class ids, ``semantic_ignore`` = ignored); None derives it from the
            panoptic PNGs.
        semantic_ignore: The label files' ignore value.
        benchmark: The benchmark's name, for the report.
    """
    if seen is not None:
        check_seen_classes(seen, gt.categories, gt.json_path)
    pred = load_predictions(Path(pred_dir), {c.id for c in gt.categories})
    workers = (os.cpu_count() or 1) if workers is None else workers
    tasks = _tasks(gt, pred, semantic_files)
    if not tasks:
        raise SamcpError(f"{gt.json_path}: the ground truth has no annotations to evaluate")
    keys = None
    ignored_stuff = num_detections = 0
    if pred.instances is not None:
        sizes = {str(a["image_id"]): _image_size(gt, a) for a in gt.annotations}
        keys = make_keys([t.image_id for t in tasks], sizes, gt.categories)
    if keys is not None:
        dets, ignored_stuff = prepare_detections(
            pred.instances or [], keys, gt.categories, source=str(pred.root / "instances.json")
        )
        num_detections = sum(map(len, dets.values()))
        tasks = [replace(t, detections=dets.get(t.image_id, [])) for t in tasks]
    k = len(gt.categories)
    ctx = _context(gt.categories, pred.semantic_category_ids, keys)
    if semantic_files is not None:
        ctx = replace(
            ctx,
            gt_semantic_lut=label_lut({c.id: c.index for c in gt.categories}, k, semantic_ignore),
        )

    pq_total: dict[int, PQCounts] = {}
    confusion = np.zeros((k + 1, k + 1), dtype=np.int64)
    instance_evals: dict[int, list[Any]] = {}
    for results, conf in _run_tasks(tasks, ctx, workers, progress):
        confusion += conf
        for r in results:
            accumulate(pq_total, r.pq)
            if keys is not None and r.instance_eval is not None:
                instance_evals[keys.images[r.image_id]] = r.instance_eval

    notes = []
    semantic_only = "panoptic" not in _predicted_outputs(Path(pred_dir))
    if semantic_only:
        # A semantic head (predict_info.json "outputs"): its panoptic files are empty placeholders.
        pq_total = {}
        notes.append("the head predicts semantics only (predict_info.json): PQ not evaluated")
    groups = None if seen is None else group_ids(seen, gt.categories)
    instance = None
    if pred.instances is None and semantic_only:
        pass
    elif pred.instances is None:
        notes.append("no instances.json in the prediction folder: AP not evaluated")
    elif keys is None:
        notes.append("the ground truth has no thing category: AP not evaluated")
    else:
        instance = accumulate_instances(instance_evals, keys, num_detections, ignored_stuff, groups)
        if ignored_stuff:
            notes.append(
                f"{ignored_stuff} instance detections of stuff categories were not evaluated"
            )
    extra = len(set(pred.annotations) - {t.image_id for t in tasks})
    if extra:
        notes.append(f"{extra} predicted images are not in the ground truth and were ignored")
    semantic = semantic_metrics(confusion, semantic_rule)
    group_report = {}
    if groups is not None:
        group_report = group_results(groups, gt.categories, pq_total, semantic, instance)
        if not groups["unseen"]:
            notes.append("every ground-truth category is seen: the unseen group is empty")
    return EvalReport(
        panoptic=None if semantic_only else summarize_panoptic(pq_total, gt.categories),
        semantic=semantic,
        instance=instance,
        categories=gt.categories,
        num_images=len(tasks),
        semantic_source="semantic" if pred.semantic_dir is not None else "panoptic",
        notes=notes,
        groups=group_report,
        seen_source=None if seen is None else seen.source,
        benchmark=benchmark,
    )


def _predicted_outputs(pred_dir: Path) -> tuple[str, ...]:
    """What the head of a prediction folder predicts (``predict_info.json``'s ``outputs``, written
    by samcp predict); every output when the file or the key is absent (other tools' folders,
    samcp's before the key existed)."""
    try:
        info = json.loads((pred_dir / "predict_info.json").read_text())
        outputs = info.get("outputs")
    except (OSError, ValueError, AttributeError):
        return ("panoptic", "semantic", "instances")
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return ("panoptic", "semantic", "instances")
    return tuple(outputs)


def _context(
    categories: Sequence[Category],
    pred_category_ids: Sequence[int] | None,
    keys: InstanceKeys | None = None,
) -> _Context:
    """The per-worker context; semantic PNG lookups when the PNG values index another category
    list (panoptic.json's ``categories``) than the ground truth's."""
    k = len(categories)
    lut = lut16 = None
    if pred_category_ids is not None:
        index = {c.id: c.index for c in categories}
        lut = semantic_lut(pred_category_ids, index, k)
        lut16 = semantic_lut(pred_category_ids, index, k, IGNORE_LABEL_16, size=65536)
    return _Context(tuple(categories), keys, lut, lut16)


# ---------------------------------------------------------------------------------------------
# Semantic-only benchmarks (ADE20K-847, Pascal Context, Pascal VOC, COCO-Stuff).


@dataclass(frozen=True)
class _SemanticTask:
    image_id: str
    gt_label: str
    pred_semantic: str | None
    pred_png: str | None = None
    pred_segments: list[dict[str, Any]] | None = None


def _evaluate_semantic_chunk(tasks: Sequence[_SemanticTask]) -> tuple[list[str], np.ndarray]:
    ctx = _CTX
    assert ctx is not None
    k = len(ctx.categories)
    cats = {c.id: c for c in ctx.categories}
    total = np.zeros((k + 1, k + 1), dtype=np.int64)
    for t in tasks:
        where = f"image {t.image_id} ({t.gt_label})"
        gt = _gt_labels(Path(t.gt_label), ctx, where)
        if t.pred_semantic is not None:
            where = f"image {t.image_id} ({t.pred_semantic})"
            sem = _pred_labels(Path(t.pred_semantic), ctx, where)
        else:
            assert t.pred_png is not None
            where = f"image {t.image_id} ({t.pred_png})"
            sem = _pred_from_panoptic(
                read_panoptic_png(Path(t.pred_png)), t.pred_segments or [], cats, k
            )
        total += confusion_from_labels(sem, gt, k, where=where)
    return [t.image_id for t in tasks], total


def evaluate_semantic(
    gt: SemanticGroundTruth,
    pred_dir: Path,
    *,
    workers: int | None = None,
    semantic_rule: SemanticRule = "detectron2",
    progress: bool = False,
    seen: SeenClasses | None = None,
) -> EvalReport:
    """Evaluates a prediction folder on a semantic-only benchmark: mIoU, fwIoU, pACC, mACC.

    Predictions are ``PRED_DIR/semantic/<stem>.png`` (8-bit with 255, or 16-bit with 65535, for
    "no class"); their values index ``panoptic.json``'s ``categories`` when the folder has one (as
    ``samcp predict`` writes), else they are the benchmark's class ids. Without semantic/, the
    panoptic output is used (each segment's class). One confusion matrix is summed image by
    image, so memory does not grow with the number of images.

    Raises:
        SamcpError: a missing prediction, a value naming no class, a size mismatch.
    """
    if seen is not None:
        check_seen_classes(seen, gt.categories, gt.name)
    root = Path(pred_dir)
    if not root.is_dir():
        raise SamcpError(f"{root}: prediction folder not found; pass the folder samcp predict wrote")
    sem_dir = root / "semantic"
    pred: Predictions | None = None
    if (root / "panoptic.json").is_file():
        pred = load_predictions(root, {c.id for c in gt.categories})
    elif not sem_dir.is_dir():
        raise SamcpError(
            f"{root}: no semantic/ folder and no panoptic.json; a semantic benchmark is scored "
            f"on semantic/<stem>.png (samcp predict --dataset {gt.name} writes them)"
        )
    tasks: list[_SemanticTask] = []
    for image_id, stem, label in gt.items:
        if sem_dir.is_dir():
            tasks.append(_SemanticTask(image_id, str(label), str(sem_dir / f"{stem}.png")))
            continue
        assert pred is not None
        p = pred.annotations.get(image_id)
        if p is None:
            raise SamcpError(
                f"{root / 'panoptic.json'}: no prediction for ground-truth image {image_id}; "
                "predict every image of the split"
            )
        tasks.append(
            _SemanticTask(
                image_id, str(label), None, str(pred.png_dir / p["file_name"]),
                list(p["segments_info"]),
            )
        )
    if not tasks:
        raise SamcpError(f"{gt.name}: the ground truth has no image to evaluate")
    k = len(gt.categories)
    ids = None if pred is None else pred.semantic_category_ids
    ctx = replace(
        _context(gt.categories, ids),
        gt_semantic_lut=label_lut({c.id: c.index for c in gt.categories}, k, gt.ignore_label),
    )
    workers = (os.cpu_count() or 1) if workers is None else workers
    confusion = np.zeros((k + 1, k + 1), dtype=np.int64)
    for _, conf in _run_tasks(tasks, ctx, workers, progress, _evaluate_semantic_chunk):
        confusion += conf
    semantic = semantic_metrics(confusion, semantic_rule)
    notes = []
    if pred is not None:
        extra = len(set(pred.annotations) - {t.image_id for t in tasks})
        if extra:
            notes.append(f"{extra} predicted images are not in the ground truth and were ignored")
    group_report = {}
    if seen is not None:
        groups = group_ids(seen, gt.categories)
        group_report = group_results(groups, gt.categories, {}, semantic, None)
        if not groups["unseen"]:
            notes.append("every ground-truth category is seen: the unseen group is empty")
    return EvalReport(
        panoptic=None,
        semantic=semantic,
        instance=None,
        categories=list(gt.categories),
        num_images=len(tasks),
        semantic_source="semantic" if sem_dir.is_dir() else "panoptic",
        notes=notes,
        groups=group_report,
        seen_source=None if seen is None else seen.source,
        benchmark=gt.name,
    )


def evaluate_benchmark(
    bench: Any,
    pred_dir: Path,
    *,
    workers: int | None = None,
    semantic_rule: SemanticRule = "detectron2",
    progress: bool = False,
    seen: SeenClasses | None = None,
) -> EvalReport:
    """Evaluates a prediction folder on an opened benchmark (samcp.pipeline.benchmarks):
    PQ + mIoU (+ AP) on a panoptic benchmark, mIoU/fwIoU/pACC on a semantic one."""
    if bench.task == "semantic":
        return evaluate_semantic(
            semantic_ground_truth(bench),
            pred_dir,
            workers=workers,
            semantic_rule=semantic_rule,
            progress=progress,
            seen=seen,
        )
    return evaluate_ground_truth(
        bench.ground_truth(),
        pred_dir,
        workers=workers,
        semantic_rule=semantic_rule,
        progress=progress,
        seen=seen,
        semantic_files=bench.semantic_files(),
        semantic_ignore=bench.info.ignore_label,
        benchmark=bench.name,
    )


def semantic_ground_truth(bench: Any) -> SemanticGroundTruth:
    """The :class:`SemanticGroundTruth` of a semantic benchmark (samcp.pipeline.benchmarks)."""
    cats = [
        Category(int(c["id"]), str(c["name"]), bool(c["isthing"]), i)
        for i, c in enumerate(bench.categories)
    ]
    items = [(it.image_id, it.stem, it.label) for it in bench.items]
    return SemanticGroundTruth(bench.name, cats, items, bench.ignore_label)
