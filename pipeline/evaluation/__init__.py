"""Evaluation: panoptic quality (panopticapi), semantic mIoU (detectron2 / mmseg) and instance AP
(pycocotools), plus the proposal oracle. See docs/eval.md for every rule and its origin."""

from samcp.pipeline.evaluation.formats import (
    Category,
    GroundTruth,
    Predictions,
    SemanticGroundTruth,
    id_to_rgb,
    load_ground_truth,
    load_predictions,
    read_panoptic_png,
    resolve_ground_truth,
    rgb_to_id,
    write_panoptic_png,
)
from samcp.pipeline.evaluation.groups import (
    GroupResult,
    SeenClasses,
    check_seen_classes,
    read_seen_classes,
)
from samcp.pipeline.evaluation.instance import InstanceResult, evaluate_instances
from samcp.pipeline.evaluation.oracle import (
    OracleStats,
    build_oracle_predictions,
    cache_proposals,
    check_cache_covers,
    unfinished_cache_note,
)
from samcp.pipeline.evaluation.panoptic import (
    PanopticResult,
    PQCounts,
    PQSummary,
    count_pairs,
    pq_average,
    pq_image,
)
from samcp.pipeline.evaluation.runner import (
    EvalReport,
    evaluate,
    evaluate_benchmark,
    evaluate_ground_truth,
    evaluate_semantic,
    format_report,
)
from samcp.pipeline.evaluation.semantic import SemanticResult, semantic_metrics

__all__ = [
    "cache_proposals",
    "Category",
    "EvalReport",
    "GroundTruth",
    "GroupResult",
    "InstanceResult",
    "OracleStats",
    "PQCounts",
    "PQSummary",
    "PanopticResult",
    "Predictions",
    "SeenClasses",
    "SemanticGroundTruth",
    "SemanticResult",
    "build_oracle_predictions",
    "check_cache_covers",
    "check_seen_classes",
    "count_pairs",
    "evaluate",
    "evaluate_benchmark",
    "evaluate_ground_truth",
    "evaluate_semantic",
    "evaluate_instances",
    "format_report",
    "id_to_rgb",
    "load_ground_truth",
    "load_predictions",
    "pq_average",
    "pq_image",
    "read_panoptic_png",
    "read_seen_classes",
    "resolve_ground_truth",
    "rgb_to_id",
    "semantic_metrics",
    "unfinished_cache_note",
    "write_panoptic_png",
]
