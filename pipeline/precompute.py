"""`samcp precompute`: run a proposal source over a dataset and write the proposal cache.

Shards are the unit of work, of writing and of resume. By default a local Ray instance is started in
this process; ``ray_address`` joins a running cluster. One actor per GPU (or ``num_workers`` CPU
actors) pulls shards; an actor killed mid-shard is restarted by Ray and the shard is redone from
scratch. ``num_workers=0`` runs everything in this process (no Ray), for debugging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samcp.pipeline import cache as cache_io
from samcp.pipeline.datasets import ImageRecord, load_image_rgb, open_image_source, shard_records
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.folderlock import FolderLock
from samcp.pipeline.proposals import ProposalConfig, ProposalSource
from samcp.pipeline.raywatch import RayWatchdog


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything `samcp precompute` needs.

    source: a COCO panoptic dataset folder or a JSONL image manifest.
    out: the cache location.
    split: dataset split folder name (COCO layout only), e.g. ``val2017``.
    shard_size: images per shard (the unit of work and of resume).
    proposals: which proposal generator and its settings.
    num_workers: CPU workers when there is no GPU; 0 runs in this process without Ray.
    gpus_per_worker: GPUs per worker when the cluster has GPUs (one worker per GPU by default).
    ray_address: join this Ray cluster instead of starting a local instance.
    overwrite: delete an existing cache at ``out`` first.
    limit: only the first N images (quick looks).
    store_sam_embeddings: also store SAM's image embedding (``sam_embed``): from the same encoder
        pass as SAM proposals, or, for ``slic`` and ``external`` proposals, from a SAM pass that only
        computes the embedding (needs ``proposals.sam_checkpoint`` and ``proposals.sam_model``).
        With ``proposals.sam_features`` sam2clip it is the distilled embedding SAM's decoder ran on.
    clip: frozen-CLIP features to store (dense maps and mask-pooled embeddings), or None.
    redo_failed: also redo complete shards that hold failed rows (e.g. after fixing files).
    dataset: a benchmark name (samcp.pipeline.benchmarks, e.g. ``ade20k_150``): ``source`` is
        then that benchmark's root in its prepared layout and ``split`` is val or train; None
        reads ``source`` as a COCO panoptic folder or a JSONL manifest.
    """

    source: str
    out: str
    split: str = "val2017"
    shard_size: int = 16
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    num_workers: int = 1
    gpus_per_worker: float = 1.0
    ray_address: str | None = None
    overwrite: bool = False
    limit: int | None = None
    progress: bool = True
    store_sam_embeddings: bool = False
    redo_failed: bool = False
    clip: Any = (
        None  # samcp.pipeline.clip.ClipConfig; typed loosely so CLIP stays an optional import
    )
    dataset: str | None = None


@dataclass
class ShardSummary:
    shard_id: str
    num_images: int
    num_failed: int
    num_masks: int
    seconds: float
    worker_pid: int
    errors: list[str] = field(default_factory=list)


# How many failed images a summary and an error message name.
MAX_REASONS = 5


@dataclass
class PrecomputeSummary:
    out: str
    num_images: int
    num_shards: int
    shards_skipped: int
    shards_done: int
    shards_failed: list[str]
    num_failed_images: int
    num_masks: int
    seconds: float
    worker_pids: list[int]
    failed_reasons: list[str] = field(default_factory=list)  # first "image_id: reason" lines

    @property
    def all_failed(self) -> bool:
        """True when images were processed in this run and not one of them succeeded."""
        return self.num_images > 0 and self.num_failed_images == self.num_images

    def lines(self) -> list[str]:
        rate = self.num_images / self.seconds if self.seconds > 0 else float("nan")
        out = [
            f"cache: {self.out}",
            f"shards: {self.shards_done} written, {self.shards_skipped} already complete, "
            f"{len(self.shards_failed)} failed (of {self.num_shards})",
            f"images: {self.num_images} processed now, {self.num_failed_images} failed rows",
            f"masks: {self.num_masks} written now"
            + (
                f" ({self.num_masks / max(self.num_images, 1):.1f} per image)"
                if self.num_images
                else ""
            ),
            f"time: {self.seconds:.1f} s ({rate:.2f} images/s)",
        ]
        if self.num_failed_images:
            shown = self.failed_reasons[:MAX_REASONS]
            out.append(
                f"failed: {self.num_failed_images} of {self.num_images} images (kept as failed "
                "rows; fix the files and re-run with --redo-failed); "
                + ("first reasons:" if len(shown) < self.num_failed_images else "reasons:")
            )
            out.extend(f"  {r}" for r in shown)
        return out


class AllImagesFailed(SamcpError):
    """Not one image of a precompute run could be processed; ``summary`` says what was done."""

    def __init__(self, summary: PrecomputeSummary) -> None:
        self.summary = summary
        # The fix comes before the reasons: a long line is cut at its end.
        reasons = "; ".join(r[:120] for r in summary.failed_reasons[:3])
        super().__init__(
            f"all {summary.num_images} images failed; fix the image files (or the dataset path, "
            f"--split, the manifest) and re-run with --redo-failed; first reasons: {reasons}"
        )


class ImageProcessor:
    """Everything computed per image: proposals, optional SAM embedding, optional CLIP features.

    Built once per worker (models are loaded here), then called per image. With SAM2CLIP features
    (``proposals.sam_features`` sam2clip) the CLIP trunk runs first: the run's neck turns the
    image's CLIP levels (as stored) into the SAM embedding that SAM's decoder then prompts, and the
    same trunk pass gives the stored levels and the mask-pooled embeddings.
    """

    def __init__(self, cfg: PrecomputeConfig, device: str) -> None:
        self.cfg = cfg
        self.proposals = ProposalSource(cfg.proposals, device, cfg.store_sam_embeddings)
        self.clip = None
        if cfg.clip is not None:
            from samcp.pipeline.clip import ClipFeatureExtractor

            self.clip = ClipFeatureExtractor(cfg.clip, device)
        self.sam2clip = None
        if cfg.proposals.sam_features == "sam2clip":
            from samcp.pipeline.proposals.sam2clip import Sam2ClipFeatures

            if self.clip is None:
                raise SamcpError("--sam-features sam2clip needs the CLIP pass (--clip-checkpoint)")
            self.sam2clip = Sam2ClipFeatures(cfg.proposals.sam2clip_run, device)

    @property
    def needs_pixels(self) -> bool:
        return (
            self.cfg.proposals.source != "external"
            or self.clip is not None
            or self.cfg.store_sam_embeddings
        )

    def __call__(self, rec: ImageRecord) -> cache_io.ImageResult:
        """One image's row; any failure (unreadable file, size mismatch) becomes a failed row."""
        try:
            image = None
            if self.needs_pixels:
                image = load_image_rgb(rec.file_name)
                if image.shape[:2] != (rec.height, rec.width):
                    raise ValueError(
                        f"image is {image.shape[1]}x{image.shape[0]} but the dataset says "
                        f"{rec.width}x{rec.height}"
                    )
            image_arrays: dict[str, np.ndarray] = {}
            mask_arrays: dict[str, np.ndarray] = {}
            final = features = None
            if self.sam2clip is not None:
                from samcp.pipeline.clip import _to_fp16

                final, levels = self.clip.dense_features(image)
                image_arrays.update({f"clip_{lv}": _to_fp16(t) for lv, t in levels.items()})
                features = self.sam2clip.embed(image_arrays)
            props, sam_embed = self.proposals(
                image, rec, self.cfg.store_sam_embeddings, features=features
            )
            if sam_embed is not None:
                image_arrays["sam_embed"] = sam_embed
            if final is not None:  # the trunk already ran: pool the proposals from its map
                emb = self.clip.mask_embeddings(final, props)
                mask_arrays["clip_mask_embed"] = _to_fp16(emb)
            elif self.clip is not None:
                dense, per_mask = self.clip.extract(image, props)
                image_arrays.update(dense)
                mask_arrays.update(per_mask)
        except Exception as exc:  # one bad image must not stop the shard
            return cache_io.ImageResult(rec.image_id, rec.height, rec.width, error=_describe(exc))
        return cache_io.ImageResult(
            rec.image_id,
            rec.height,
            rec.width,
            props,
            image_arrays=image_arrays,
            mask_arrays=mask_arrays,
        )


def process_shard(
    processor: ImageProcessor, out: str, shard_id: str, records: list[ImageRecord]
) -> ShardSummary:
    """Processes one shard's images and writes the shard; unreadable images become failed rows."""
    t0 = time.perf_counter()
    rows = [processor(rec) for rec in records]
    m = cache_io.write_shard(out, shard_id, rows)
    failed = [r for r in rows if not r.ok]
    return ShardSummary(
        shard_id,
        len(rows),
        len(failed),
        m,
        time.perf_counter() - t0,
        os.getpid(),
        [f"{r.image_id}: {r.error}" for r in failed],
    )


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def dataset_attrs(records: list[ImageRecord], shard_size: int, name: str | None = None) -> dict:
    """Identity of the image list (compared on resume) — ids and sizes, not paths — and, for a
    benchmark (``--dataset``), its name."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id}\t{r.height}\t{r.width}\n".encode())
    out = {
        "num_images": len(records),
        "shard_size": shard_size,
        "image_list_sha256": h.hexdigest(),
    }
    if name is not None:
        out["name"] = name
    return out


def prepare(cfg: PrecomputeConfig) -> tuple[list[tuple[str, list[ImageRecord]]], dict]:
    """Validates inputs, plans shards and builds the cache's root attributes. Writes nothing.

    Returns:
        ``(shards, attrs)``: the ``(shard_id, records)`` plan and the attributes that
        :func:`samcp.pipeline.cache.init_cache` compares with an existing cache.

    Raises:
        SamcpError: bad options, dataset, checkpoints or ``out``.
    """
    from samcp.pipeline.foundation import file_sha256

    cfg.proposals.validate(cfg.store_sam_embeddings)
    uses_sam = cfg.proposals.uses_sam(cfg.store_sam_embeddings)
    if cfg.dataset is not None:
        from samcp.pipeline.benchmarks import open_benchmark

        bench = open_benchmark(cfg.dataset, cfg.source, cfg.split)
        records = bench.records
        source_attrs = bench.source_attrs()
    else:
        records = open_image_source(Path(cfg.source), cfg.split)
        source_attrs = cache_io.dataset_source_attrs(cfg.source, cfg.split)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise SamcpError(f"no images in {cfg.source}; check the path and --split")
    shards = shard_records(records, cfg.shard_size)
    sha = file_sha256(cfg.proposals.sam_checkpoint) if uses_sam else None
    clip_attrs = _clip_attrs(cfg.clip)
    sam2clip = None
    if uses_sam:
        # Fail early, in the driver, on a checkpoint that does not load (wrong file or arch).
        from samcp.pipeline.foundation import load_sam

        sam = load_sam(cfg.proposals.sam_model, cfg.proposals.sam_checkpoint, "cpu")
        if cfg.proposals.sam_features == "sam2clip":
            from samcp.pipeline.proposals.sam2clip import check_sam2clip_run

            channels = _CLIP_CHANNELS.get(str(cfg.clip.checkpoint)) if cfg.clip else None
            sam2clip = check_sam2clip_run(cfg.proposals.sam2clip_run, cfg.clip, channels, sam)
        del sam
    attrs = {
        **cfg.proposals.cache_attrs(sha, cfg.store_sam_embeddings, sam2clip),
        "clip": clip_attrs,
        "sam_embed": bool(cfg.store_sam_embeddings),
        "dataset": dataset_attrs(records, cfg.shard_size, cfg.dataset),
        "dataset_source": source_attrs,
    }
    if _is_local(cfg.out):
        # Read-only check first, so that no lock file is ever put into a folder samcp may not use.
        from samcp.pipeline.outputs import prepare_output_dir

        prepare_output_dir(cfg.out, "cache", overwrite=cfg.overwrite, reuse=True)
    return shards, attrs


def open_cache(cfg: PrecomputeConfig, attrs: dict) -> set[str]:
    """Creates (or checks) the cache root; returns the shards to skip. Call it holding the lock."""
    done = cache_io.init_cache(cfg.out, attrs, overwrite=cfg.overwrite)
    if cfg.clip is not None:
        _store_clip_head(cfg)
    if cfg.redo_failed and done:
        done -= set(cache_io.shards_with_failed_rows(cfg.out, done))
    return done


def _is_local(out: str | os.PathLike) -> bool:
    return "://" not in str(out)


def _clip_attrs(clip_cfg) -> dict | None:
    """The cache's ``clip`` attribute; loads the model once in the driver so a bad checkpoint fails
    here, before any worker starts."""
    if clip_cfg is None:
        return None
    from samcp.pipeline.clip import export_clip_head, load_clip
    from samcp.pipeline.foundation import file_sha256

    model, _ = load_clip(clip_cfg.model, clip_cfg.checkpoint, "cpu")
    # Kept for open_cache (the head is small; the model is not kept).
    _CLIP_HEADS[str(clip_cfg.checkpoint)] = export_clip_head(model, clip_cfg.input_size)
    _CLIP_CHANNELS[str(clip_cfg.checkpoint)] = _level_channels(model)
    return clip_cfg.cache_attrs(file_sha256(clip_cfg.checkpoint))


# checkpoint path -> its exported head (or None), from _clip_attrs to open_cache.
_CLIP_HEADS: dict[str, object] = {}
# checkpoint path -> channels of each clip_<level> its trunk gives (checks a --sam2clip-run).
_CLIP_CHANNELS: dict[str, dict[str, int]] = {}


def _level_channels(model) -> dict[str, int]:
    """``clip_<level>`` -> channels of a timm ConvNeXt tower's stage outputs ({} for others)."""
    from samcp.pipeline.clip import LEVEL_STRIDES

    info = getattr(getattr(getattr(model, "visual", None), "trunk", None), "feature_info", None)
    by_stride = {int(f["reduction"]): int(f["num_chs"]) for f in (info or [])}
    return {f"clip_{lv}": by_stride[s] for lv, s in LEVEL_STRIDES.items() if s in by_stride}


def _store_clip_head(cfg: PrecomputeConfig) -> None:
    """Writes the CLIP head into the cache (samcp.pipeline.cache.write_clip_head) when the tower
    has one samcp can rebuild and the cache has none yet."""
    key = str(cfg.clip.checkpoint)
    if key not in _CLIP_HEADS:
        _clip_attrs(cfg.clip)
    weights = _CLIP_HEADS.pop(key, None)
    if weights is not None:
        cache_io.write_clip_head(cfg.out, weights)


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeSummary:
    """Runs precompute end to end and returns what was done. Re-running resumes.

    A local cache is locked (:class:`FolderLock`) from before its root is created or checked until
    the run ends; a remote cache (a URL) is not.

    Raises:
        SamcpError: bad input, a cache locked by another run, or :class:`AllImagesFailed`.
    """
    t0 = time.perf_counter()
    shards, attrs = prepare(cfg)
    lock = FolderLock(cfg.out) if _is_local(cfg.out) else None
    if lock is not None:
        lock.acquire()
    try:
        done = open_cache(cfg, attrs)
        summary = _run(cfg, shards, done, t0)
    finally:
        if lock is not None:
            lock.release()
    if summary.all_failed:
        raise AllImagesFailed(summary)
    return summary


def _run(cfg: PrecomputeConfig, shards, done: set[str], t0: float) -> PrecomputeSummary:
    todo = [(sid, recs) for sid, recs in shards if sid not in done]
    total_images = sum(len(r) for _, r in todo)
    note = f"{len(done)} shards already complete" if done else ""
    bar = _progress(total_images, cfg.progress, initial_note=note)
    results: list[ShardSummary] = []
    failed_shards: list[str] = []
    try:
        if cfg.num_workers == 0:
            processor = ImageProcessor(cfg, _local_device())
            for sid, recs in todo:
                s = process_shard(processor, cfg.out, sid, recs)
                results.append(s)
                bar.update(s.num_images)
        else:
            results, failed_shards = _run_ray(cfg, todo, bar)
    finally:
        bar.close()
    results.sort(key=lambda s: s.shard_id)
    summary = PrecomputeSummary(
        out=str(cfg.out),
        num_images=sum(s.num_images for s in results),
        num_shards=len(shards),
        shards_skipped=len(done),
        shards_done=len(results),
        shards_failed=failed_shards,
        num_failed_images=sum(s.num_failed for s in results),
        num_masks=sum(s.num_masks for s in results),
        seconds=time.perf_counter() - t0,
        worker_pids=sorted({s.worker_pid for s in results}),
        failed_reasons=[e for s in results for e in s.errors][:MAX_REASONS],
    )
    _write_run_log(cfg, summary, results)
    return summary


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress(total: int, enabled: bool, initial_note: str = ""):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="precompute",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        postfix=initial_note or None,
    )


def _run_ray(cfg: PrecomputeConfig, todo, bar) -> tuple[list[ShardSummary], list[str]]:
    import ray

    with _ray_session(cfg):
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus >= cfg.gpus_per_worker > 0:
            n = max(1, int(gpus // cfg.gpus_per_worker))
            opts = {"num_gpus": cfg.gpus_per_worker, "num_cpus": 1}
        else:
            n = max(1, cfg.num_workers)
            opts = {"num_cpus": 1}
            if cfg.ray_address:
                # On a cluster this usually means the GPU workers have not joined yet.
                bar.write(
                    f"warning: the Ray cluster has {gpus:g} GPUs (< --gpus-per-worker "
                    f"{cfg.gpus_per_worker:g}); running {n} CPU worker(s)"
                )
        n = min(n, max(len(todo), 1))
        worker_cls = ray.remote(max_restarts=3, max_task_retries=3)(ShardWorker)
        workers = [worker_cls.options(**opts).remote(cfg) for _ in range(n)]
        results: list[ShardSummary] = []
        failed: list[str] = []
        pending: dict = {}
        queue = list(todo)
        for w in workers:
            if queue:
                sid, recs = queue.pop(0)
                pending[w.process.remote(sid, recs)] = (w, sid)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            w, sid = pending.pop(ref)
            try:
                s = ray.get(ref)
                results.append(s)
                bar.update(s.num_images)
            except ray.exceptions.RayError as exc:
                failed.append(sid)
                bar.write(f"shard {sid} failed after retries: {_describe(exc)}")
            if queue:
                nsid, nrecs = queue.pop(0)
                pending[w.process.remote(nsid, nrecs)] = (w, nsid)
        for w in workers:
            ray.kill(w)
        return results, failed


@contextmanager
def _ray_session(cfg: PrecomputeConfig) -> Iterator[None]:
    """Connects to Ray for one run: the caller's Ray if already initialised (left running), the
    cluster at ``ray_address``, or a local instance started here and stopped at the end.

    A local instance gets a :class:`RayWatchdog`, so that none of its processes outlive this one
    even when it is killed (SIGKILL, OOM) before it can shut Ray down.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = dict(
        ignore_reinit_error=True,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kwargs)
        try:
            yield
        finally:
            ray.shutdown()
        return
    watchdog = RayWatchdog()
    try:
        # Local instance: leave the driver room and don't let Ray pick up GPUs it cannot use.
        ray.init(num_cpus=max(cfg.num_workers, 1), **kwargs)
        watchdog.seal()
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        watchdog.stop()


class ShardWorker:
    """A Ray actor: builds the proposal source once (model on its GPU), then processes shards."""

    def __init__(self, cfg: PrecomputeConfig) -> None:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.out = cfg.out
        self.processor = ImageProcessor(cfg, _local_device())

    def process(self, shard_id: str, records: list[ImageRecord]) -> ShardSummary:
        return process_shard(self.processor, self.out, shard_id, records)


def _write_run_log(cfg: PrecomputeConfig, summary: PrecomputeSummary, results) -> None:
    """Appends a JSON line per run to <out>/runs.jsonl (local caches only), for the record."""
    if "://" in str(cfg.out):
        return
    line = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "summary": asdict(summary),
        "errors": [e for s in results for e in s.errors],
    }
    with open(Path(cfg.out) / "runs.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


# --------------------------------------------------------------------------------------------
# The cache lock: one writing run per local cache.
