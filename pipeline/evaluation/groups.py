"""Seen and unseen classes: the open-vocabulary report of `samcp eval --seen-classes`.

Open-vocabulary segmentation is measured as in the COCO -> ADE20K protocol: a model trained on some
classes (the seen ones, its training vocabulary) is evaluated on every class of a ground truth, and
each metric is reported over all classes and, separately, over the seen and the unseen ones. A
group's number is the metric's own mean restricted to the group's classes, the way PQth / PQst are
means over the thing / stuff classes: PQ, SQ, RQ with panopticapi's rule (categories with
tp + fp + fn > 0), mIoU over the group's classes that count under the semantic rule (from the one
confusion matrix over all classes, so a seen pixel predicted as an unseen class is wrong for both),
and COCO AP with the categories restricted to the group (instance.accumulate_instances).
See docs/eval.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.evaluation.formats import Category
from samcp.pipeline.evaluation.instance import InstanceResult
from samcp.pipeline.evaluation.panoptic import PQCounts, PQSummary, summarize_panoptic
from samcp.pipeline.evaluation.semantic import SemanticResult

GROUPS: tuple[str, ...] = ("seen", "unseen")

_IDS = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")
_HOW = (
    "pass a class file (id:name,synonym,...), a samcp run folder or its classes.json, "
    "or ids such as 1,2,4"
)


@dataclass(frozen=True)
class SeenClasses:
    """The seen classes of an open-vocabulary evaluation.

    Attributes:
        ids: Dataset category ids, in the order given, without repeats.
        source: Where they came from (a file, or the ids as typed), named in messages.
    """

    ids: tuple[int, ...]
    source: str


def read_seen_classes(spec: str | os.PathLike[str]) -> SeenClasses:
    """Reads the seen classes from a class file, a run folder, a classes.json or a list of ids.

    Args:
        spec: An FC-CLIP class file (``id:name,synonym,...``, e.g. the synthetic set's
            classes_seen.txt) or a builtin vocabulary name; a samcp run folder (its classes.json,
            the training classes); a JSON list of categories (``{"id": ...}``) or of ids; or ids
            separated by commas (``"1,2,4"``).

    Raises:
        SamcpError: If the file is missing or malformed, or lists no class.
    """
    from samcp.pipeline.vocab import builtin_vocabularies, read_vocabulary

    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        if not (path / "classes.json").is_file():
            raise SamcpError(f"--seen-classes {path} is a folder without classes.json; {_HOW}")
        path = path / "classes.json"
    if path.is_file():
        if path.suffix.lower() == ".json":
            ids = _json_ids(path)
        else:
            ids = list(read_vocabulary(path).ids)
        return SeenClasses(_unique(ids), str(path))
    if _IDS.match(text):
        return SeenClasses(_unique(int(v) for v in text.split(",") if v.strip()), text.strip())
    if text in builtin_vocabularies():
        return SeenClasses(_unique(read_vocabulary(text).ids), f"builtin:{text}")
    raise SamcpError(
        f"--seen-classes {text!r}: no such file or folder, and not a list of ids; {_HOW}"
    )


def _json_ids(path: Path) -> list[int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SamcpError(f"{path}: cannot read it as JSON ({exc}); {_HOW}") from None
    ids = []
    for item in data if isinstance(data, list) else [None]:
        cid = item.get("id") if isinstance(item, dict) else item
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise SamcpError(
                f'{path}: expected a list of categories with integer ids ({{"id": 1, ...}}) or '
                f"of ids; {_HOW}"
            )
        ids.append(cid)
    if not ids:
        raise SamcpError(f"{path}: lists no class; {_HOW}")
    return ids


def _unique(ids: Any) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids))


def check_seen_classes(
    seen: SeenClasses, categories: Sequence[Category], ground_truth: str | os.PathLike[str]
) -> None:
    """Refuses seen ids that are not categories of the ground truth.

    Raises:
        SamcpError: naming the seen classes' source, the unknown ids and the ground truth.
    """
    known = {c.id for c in categories}
    unknown = [cid for cid in seen.ids if cid not in known]
    if unknown:
        raise SamcpError(
            f"{seen.source}: seen class id(s) {', '.join(map(str, unknown))} are not categories "
            f"of {ground_truth}; list only the ground truth's category ids"
        )


@dataclass
class GroupResult:
    """Every metric over one group of classes (percent; None where not applicable).

    Attributes:
        category_ids: The group's ground-truth category ids, in ground-truth order.
        panoptic: ``"all" / "things" / "stuff" -> PQSummary`` over the group's categories.
        miou: Mean IoU over the group's classes that count under the semantic rule.
        miou_n: Number of classes in that mean.
        instance: ``{ap, ap50, ap75, aps, apm, apl, n}`` over the group's thing categories, or
            None when AP was not evaluated.
    """

    category_ids: list[int]
    panoptic: dict[str, PQSummary]
    miou: float | None
    miou_n: int
    instance: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """The group as a JSON-ready dict."""
        return {
            "category_ids": list(self.category_ids),
            "panoptic": {name: asdict(s) for name, s in self.panoptic.items()},
            "semantic": {"miou": self.miou, "n": self.miou_n},
            "instance": None if self.instance is None else dict(self.instance),
        }


def group_ids(seen: SeenClasses, categories: Sequence[Category]) -> dict[str, list[int]]:
    """``{"seen": ids, "unseen": ids}`` in ground-truth order (unseen: every other category)."""
    wanted = set(seen.ids)
    return {
        "seen": [c.id for c in categories if c.id in wanted],
        "unseen": [c.id for c in categories if c.id not in wanted],
    }


def group_results(
    groups: Mapping[str, Collection[int]],
    categories: Sequence[Category],
    pq_counts: Mapping[int, PQCounts],
    semantic: SemanticResult,
    instance: InstanceResult | None,
) -> dict[str, GroupResult]:
    """The metrics of each group from the dataset-level results of all classes.

    Args:
        groups: ``name -> category ids`` (see :func:`group_ids`).
        categories: The ground truth's categories.
        pq_counts: Dataset-level PQ counts by category id.
        semantic: The all-class semantic result (per-class IoU by class index).
        instance: The all-class AP result, with ``groups`` computed for the same names, or None.
    """
    out = {}
    for name, ids in groups.items():
        wanted = set(ids)
        cats = [c for c in categories if c.id in wanted]
        pan = summarize_panoptic(pq_counts, cats)
        ious = [
            semantic.per_class[c.index]["iou"]
            for c in cats
            if semantic.per_class.get(c.index, {}).get("iou") is not None
        ]
        out[name] = GroupResult(
            category_ids=[c.id for c in cats],
            panoptic={"all": pan.all, "things": pan.things, "stuff": pan.stuff},
            miou=sum(ious) / len(ious) if ious else None,
            miou_n=len(ious),
            instance=None if instance is None else instance.groups.get(name),
        )
    return out
