"""`dsmd extract`: run the teacher once over every split and cache its embeddings in Parquet.

The unit of work is one input shard: its samples are decoded (DataLoader workers), embedded in
batches that never cross a shard boundary (so results do not depend on which rank or run did the
shard), and written atomically to `<split>/_parts/`. A re-run skips parts already written. Once
every shard is done, rank 0 assigns dense ids in input-shard order and writes the final files and,
last, `_manifest.json`. Under torchrun each rank takes shards rank, rank + world, ...
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from pipeline.common.progress import progress as progress_bar

from pipeline import models
from pipeline.common import atomic, names, runtime
from pipeline.common.config import ExtractConfig, TeacherConfig
from pipeline.common.errors import PipelineError
from pipeline.corpus import augment, reader
from pipeline.corpus.manifest import load_manifest, TaskSpec
from pipeline.features import schema, store
from pipeline.features.verify import verify_features
from pipeline.models import load_teacher, LoadedModel

log = logging.getLogger(__name__)

RUN_FILE = names.EXTRACT_RUN_FILE


class ExtractMismatchError(PipelineError):
    """Existing outputs were made with another teacher, corpus or settings."""


@dataclass
class _Chunk:
    """Up to `batch_size` consecutive samples of one shard, decoded and tokenised in a worker."""

    shard_index: int
    url: str
    samples: list[reader.Sample]  # the decodable ones, in shard order
    read: int  # samples read for this chunk, corrupt ones included (for the progress bar)
    images: torch.Tensor | None = None
    views: torch.Tensor | None = None  # (len(samples) * K, 3, H, W)
    view_params: list[dict] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # every caption of `samples`, in order
    last: bool = False  # the shard's final chunk: carries its skip report
    report: dict | None = None


def view_rng(seed: int, key: str) -> np.random.Generator:
    """Views depend only on (seed, sample key): the same on every rank and every re-run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class _ShardStream(IterableDataset):
    """Reads, decodes, preprocesses and tokenises whole shards in DataLoader workers (worker w takes
    shards w, w + workers, ...), yielding chunks that never cross a shard boundary, so the teacher's
    batches, and hence the embeddings, do not depend on the number of workers or ranks."""

    def __init__(self, shards: list[tuple[int, str]], fields, teacher: LoadedModel, views: int, seed: int, chunk_size: int):
        self.shards, self.fields, self.views, self.seed, self.chunk_size = shards, fields, views, seed, chunk_size
        self.preprocess, self.tokenizer = teacher.preprocess, teacher.tokenizer

    def __iter__(self):
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for position, (shard_index, url) in enumerate(self.shards):
            if position % workers != worker_id:
                continue
            report = reader.SkipReport()
            pending: list[reader.Sample] = []
            for sample in reader.iter_shard(url, self.fields, report):
                pending.append(sample)
                if len(pending) == self.chunk_size:
                    yield self._chunk(shard_index, url, pending, report)
                    pending = []
            chunk = self._chunk(shard_index, url, pending, report)
            chunk.last, chunk.report = True, report.to_dict()
            yield chunk

    def _chunk(self, shard_index: int, url: str, samples: list[reader.Sample], report: reader.SkipReport) -> _Chunk:
        good, images, views, view_params = [], [], [], []
        for sample in samples:
            try:
                image = augment.decode_image(sample.image_bytes)
            except augment.CorruptImageError:
                report.add("corrupt_image", url, sample.key)
                continue
            good.append(sample)
            images.append(image)
            if self.views:
                rng = view_rng(self.seed, sample.key)
                params = [augment.sample_view(rng) for _ in range(self.views)]
                view_params.extend(params)
                views.extend(augment.apply_view(image, v) for v in params)
        chunk = _Chunk(shard_index, url, good, read=len(samples), view_params=view_params)
        if good:
            # ToTensor + Normalize once on the chunk (bit for bit the per-image result, tests/test_augment.py)
            chunk.images = augment.preprocess_batch(self.preprocess, images)
            chunk.views = augment.preprocess_batch(self.preprocess, views) if views else None
            chunk.tokens = self.tokenizer([c for s in good for c in s.captions])
        return chunk


def _unbatched(chunk: _Chunk) -> _Chunk:
    return chunk


def _run_info(teacher: LoadedModel, manifest_sha256: str, cfg: ExtractConfig, views: int) -> dict:
    """Everything that must match for existing parts to be reused; `views`: stored views per image (0 for a split
    outside cfg.view_splits)."""
    return {
        "teacher": teacher.identity,
        "manifest_sha256": manifest_sha256,
        "embedding_dim": teacher.embed_dim,
        "embedding_dtype": cfg.embedding_dtype,
        "views": views,
        "view_seed": cfg.seed if views else None,
        "store_images": cfg.store_images,
        "schema_version": schema.SCHEMA_VERSION,
    }


def _describe_change(old: dict, new: dict, prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _describe_change(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def _comparable(info: dict) -> dict:
    """`info` less what names a teacher without changing it: the path or alias its checkpoint was
    given by (a checkpoint is identified by its sha256)."""
    return {**info, "teacher": models.comparable_identity(info.get("teacher") or {})}


def _check_compatible(path: Path, existing: dict, info: dict) -> None:
    old = _comparable({k: existing.get(k) for k in info})
    changes = _describe_change(old, _comparable(info))
    if changes:
        raise ExtractMismatchError(
            f"{path} was written with different inputs; refusing to mix outputs. What changed: "
            + "; ".join(changes)
            + ". Use a new --out-dir, or --overwrite to discard the old outputs."
        )


@torch.inference_mode()
def _embed(encode, inputs: torch.Tensor, device, precision, batch_size: int, dim: int) -> np.ndarray:
    """L2-normalised float32 embeddings of `inputs` (pixels or tokens) in batches of `batch_size`."""
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size].to(device, non_blocking=True)
        with runtime.autocast(device, precision):
            emb = encode(batch)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)


@dataclass
class _ShardResult:
    """What the main process accumulates for one shard until its last chunk arrives."""

    samples: list[reader.Sample] = field(default_factory=list)
    image_embs: list[np.ndarray] = field(default_factory=list)
    view_embs: list[np.ndarray] = field(default_factory=list)
    view_params: list[dict] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)


def _write_part(
    shard_index: int, result: _ShardResult, report: dict, url: str, teacher: LoadedModel, cfg: ExtractConfig,
    device: torch.device, parts_dir: Path, meta: dict,
) -> None:
    """Embed the shard's captions, then write its images/texts part files and, last, its skip report."""
    kept = result.samples
    dim, dtype, views = teacher.embed_dim, cfg.embedding_dtype, int(meta[schema.META_VIEWS])
    image_emb = np.concatenate(result.image_embs) if result.image_embs else np.zeros((0, dim), np.float32)
    view_emb = None
    if views:
        flat_views = np.concatenate(result.view_embs) if result.view_embs else np.zeros((0, dim), np.float32)
        view_emb = flat_views.reshape(len(kept), views, dim)
    # image ids are local to the shard here; _finalize offsets them into split-wide ids
    copied = cfg.store_images
    images = schema.images_table(
        [s.key for s in kept], [s.shard for s in kept], [s.image_format for s in kept],
        [s.image_bytes if copied else None for s in kept], image_emb, dtype, meta, view_emb, result.view_params,
        [s.image_offset for s in kept], [s.image_size for s in kept],
    )
    if not copied and any(s.image_offset is None for s in kept):
        raise PipelineError(f"{url}: no byte offsets for its images, so they cannot be referenced; "
                            f"set extract.store_images: true to copy them")
    tokens = torch.cat(result.tokens) if result.tokens else torch.zeros((0, 1), dtype=torch.long)
    text_emb = _embed(teacher.model.encode_text, tokens, device, cfg.precision, cfg.batch_size, dim)
    texts = schema.texts_table(
        np.repeat(np.arange(len(kept)), [len(s.captions) for s in kept]),
        [i for s in kept for i in range(len(s.captions))],
        [c for s in kept for c in s.captions],
        text_emb, dtype, meta,
    )
    atomic.atomic_write_table(images, parts_dir / f"images-{shard_index:06d}.parquet")
    atomic.atomic_write_table(texts, parts_dir / f"texts-{shard_index:06d}.parquet")
    # the report file is written last: its presence marks the part complete
    record = {"url": url, "skipped": report, "source": source_signature(url)}
    if not copied and record["source"] is not None:  # the features point into this file: training checks it
        record["source"] = {**record["source"], "sha256": atomic.sha256_file(reader.local_path(url))}
    atomic.atomic_write_json(record, parts_dir / f"skips-{shard_index:06d}.json")


def source_signature(url: str) -> dict | None:
    """Size and mtime of a local input shard (None for `pipe:` and URLs): a part made from another
    version of the shard is redone."""
    path = reader.local_path(url)
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _why_redo(record: dict, url: str) -> str | None:
    """Why the part of `url` described by `record` (its skips json) must be redone, or None."""
    if record.get("url") != url:
        return f"its part was made from {record.get('url')}"
    if record["skipped"].get("counts", {}).get(reader.UNREADABLE_SHARD):
        return "it could not be read to the end last time"
    current = source_signature(url)
    if {k: v for k, v in (record.get("source") or {}).items() if k != "sha256"} != (current or {}):
        return f"it changed since its part was written ({record.get('source')} -> {current})"
    return None


def _todo(parts_dir: Path, urls: list[str], mine: list[int], split: str) -> list[int]:
    """The shards of `mine` whose part is missing or must be redone (logged with the reason)."""
    todo = []
    for index in mine:
        path = parts_dir / f"skips-{index:06d}.json"
        reason = _why_redo(json.loads(path.read_text()), urls[index]) if path.exists() else "not done"
        if reason is not None:
            todo.append(index)
            if reason != "not done":
                log.warning("re-reading %s: %s", urls[index], reason)
    return todo


def _finalize(features_dir: Path, split: str, urls: list[str], parts_dir: Path, info: dict) -> dict:
    """Offset each part's local ids into dense split-wide ids and write the final split."""
    image_tables, text_tables, records = [], [], []
    report = reader.SkipReport()
    image_offset = text_offset = 0
    for index, url in enumerate(urls):
        record = json.loads((parts_dir / f"skips-{index:06d}.json").read_text())
        report.merge(reader.SkipReport.from_dict(record["skipped"]))
        images = pq.read_table(parts_dir / f"images-{index:06d}.parquet")
        texts = pq.read_table(parts_dir / f"texts-{index:06d}.parquet")
        records.append({**record, "file": len(image_tables) if images.num_rows else None})
        if images.num_rows == 0:
            continue
        images = images.set_column(0, schema.IMAGE_ID, pc.add(images[schema.IMAGE_ID], image_offset))
        texts = texts.set_column(0, schema.TEXT_ID, pc.add(texts[schema.TEXT_ID], text_offset))
        texts = texts.set_column(1, schema.IMAGE_ID, pc.add(texts[schema.IMAGE_ID], image_offset))
        image_offset += images.num_rows
        text_offset += texts.num_rows
        image_tables.append(images)
        text_tables.append(texts)
    if not image_tables:
        raise PipelineError(f"split {split!r}: no readable samples in {len(urls)} shard(s); skips: {report.to_dict()}")
    manifest = store.write_split(
        features_dir, split, image_tables, text_tables,
        {**info, "source_shards": urls, "skipped": report.to_dict(), "shard_parts": records},
    )
    if report.total:
        log.warning("split %s: skipped %d sample(s)\n%s", split, report.total, report.summary())
    shutil.rmtree(parts_dir)
    return manifest


def _stale_shards(existing: dict, urls: list[str]) -> list[int]:
    """Shards of a finished split that must be redone: failed last time, or changed since."""
    records = existing.get("shard_parts") or []
    if existing.get("source_shards") != urls or len(records) != len(urls):
        return list(range(len(urls)))
    stale = []
    for index, (record, url) in enumerate(zip(records, urls)):
        reason = _why_redo(record, url)
        if reason is not None:
            stale.append(index)
            log.warning("re-reading %s: %s", url, reason)
    return stale


def _reopen(out: Path, existing: dict, stale: list[int], parts_dir: Path, info: dict) -> None:
    """Turn a finished split back into parts, less the `stale` shards, so only those are redone: each
    kept shard's rows go back to shard-local ids. The split manifest goes last (a kill before that
    leaves the finished split, and the next run reopens it again)."""
    stale_set = set(stale)
    files = existing["files"]
    atomic.atomic_write_json(info, parts_dir / RUN_FILE)
    for index, record in enumerate(existing["shard_parts"]):
        if index in stale_set:
            continue
        if record["file"] is None:  # a shard with no readable sample: empty tables of the same schema
            images = pq.read_schema(out / files[schema.IMAGES_PREFIX][0]["path"]).empty_table()
            texts = pq.read_schema(out / files[schema.TEXTS_PREFIX][0]["path"]).empty_table()
        else:
            images = pq.read_table(out / files[schema.IMAGES_PREFIX][record["file"]]["path"])
            texts = pq.read_table(out / files[schema.TEXTS_PREFIX][record["file"]]["path"])
            image_offset, text_offset = images[schema.IMAGE_ID][0], texts[schema.TEXT_ID][0]
            images = images.set_column(0, schema.IMAGE_ID, pc.subtract(images[schema.IMAGE_ID], image_offset))
            texts = texts.set_column(0, schema.TEXT_ID, pc.subtract(texts[schema.TEXT_ID], text_offset))
            texts = texts.set_column(1, schema.IMAGE_ID, pc.subtract(texts[schema.IMAGE_ID], image_offset))
        atomic.atomic_write_table(images, parts_dir / f"images-{index:06d}.parquet")
        atomic.atomic_write_table(texts, parts_dir / f"texts-{index:06d}.parquet")
        part = {k: v for k, v in record.items() if k != "file"}
        atomic.atomic_write_json(part, parts_dir / f"skips-{index:06d}.json")
    (out / schema.SPLIT_MANIFEST).unlink()


def extract_split(
    split: str, urls: list[str], fields, teacher: LoadedModel, info: dict, cfg: ExtractConfig,
    device: torch.device, dist_info: runtime.DistInfo, expected_samples: int | None = None,
) -> dict | None:
    features_dir = Path(cfg.out_dir)
    out = store.split_dir(features_dir, split)
    final_manifest = out / schema.SPLIT_MANIFEST
    parts_dir = out / schema.PARTS_DIR
    if final_manifest.exists():
        existing = json.loads(final_manifest.read_text())
        _check_compatible(final_manifest, existing, info)
        stale = _stale_shards(existing, urls)
        if not stale:
            log.info("split %s is up to date (%s)", split, final_manifest)
            return existing
        if dist_info.is_main:
            log.warning("split %s: redoing %d of %d shard(s), keeping the others", split, len(stale), len(urls))
            if len(stale) < len(urls):
                _reopen(out, existing, stale, parts_dir, info)
            else:
                final_manifest.unlink()
        runtime.barrier(dist_info)
    run_file = parts_dir / RUN_FILE
    if dist_info.is_main:
        if run_file.exists():
            _check_compatible(run_file, json.loads(run_file.read_text()), info)
        else:
            atomic.atomic_write_json(info, run_file)
    runtime.barrier(dist_info)

    meta = {
        schema.META_SPLIT: split,
        schema.META_TEACHER: info["teacher"],
        schema.META_MANIFEST_SHA256: info["manifest_sha256"],
        schema.META_EMBEDDING_DIM: str(info["embedding_dim"]),
        schema.META_EMBEDDING_DTYPE: info["embedding_dtype"],
        schema.META_VIEWS: str(info["views"]),
    }
    mine = [i for i in range(dist_info.rank, len(urls), dist_info.world_size)]
    todo = _todo(parts_dir, urls, mine, split)
    if len(todo) < len(mine):
        log.info("split %s: resuming, %d of %d shard(s) already done", split, len(mine) - len(todo), len(mine))
    total = expected_samples // dist_info.world_size if expected_samples else None
    started = time.perf_counter()
    loader = DataLoader(
        _ShardStream([(i, urls[i]) for i in todo], fields, teacher, info["views"], cfg.seed, cfg.batch_size),
        batch_size=None, num_workers=min(cfg.num_workers, len(todo)), collate_fn=_unbatched,
        pin_memory=device.type == "cuda", worker_init_fn=runtime.die_with_parent(),
    )
    pending: dict[int, _ShardResult] = {}
    with progress_bar(total, f"extract {split}", "img", enabled=dist_info.is_main) as progress:
        for chunk in loader:
            result = pending.setdefault(chunk.shard_index, _ShardResult())
            if chunk.samples:
                result.samples.extend(chunk.samples)
                result.image_embs.append(_embed(teacher.model.encode_image, chunk.images, device, cfg.precision, cfg.batch_size, teacher.embed_dim))
                if chunk.views is not None:
                    result.view_embs.append(_embed(teacher.model.encode_image, chunk.views, device, cfg.precision, cfg.batch_size, teacher.embed_dim))
                    result.view_params.extend(chunk.view_params)
                result.tokens.append(chunk.tokens)
            progress.update(chunk.read)
            if chunk.last:
                _write_part(chunk.shard_index, pending.pop(chunk.shard_index), chunk.report, chunk.url, teacher, cfg,
                            device, parts_dir, meta)
    log.info("split %s rank %d: %d shard(s) in %.1fs", split, dist_info.rank, len(todo), time.perf_counter() - started)
    runtime.barrier(dist_info)
    manifest = None
    if dist_info.is_main:
        manifest = _finalize(features_dir, split, urls, parts_dir, info)
        log.info("split %s: %d images, %d texts -> %s", split, manifest["num_images"], manifest["num_texts"], out)
    runtime.barrier(dist_info)
    return manifest


def extract_task(task: TaskSpec, image_extensions: list[str], teacher: LoadedModel, info: dict, cfg: ExtractConfig,
                 device: torch.device) -> dict:
    """The teacher's embeddings of a zero-shot task's images and prompts, in `features/zeroshot/<task>/`.
    Tasks are evaluation sets (small next to the corpus): one process, redone whole when anything changed."""
    out = schema.task_dir(cfg.out_dir, task.name)
    marker = out / schema.SPLIT_MANIFEST
    task_info = {**info, "task": task.name, "classnames": task.classnames, "templates": task.templates,
                 "source_shards": task.shards, "sources": [source_signature(u) for u in task.shards]}
    if marker.exists():
        existing = json.loads(marker.read_text())
        _check_compatible(marker, existing, info)  # another teacher: refuse, as for the splits
        if _comparable({k: existing.get(k) for k in task_info}) == _comparable(task_info):
            log.info("zero-shot task %s is up to date (%s)", task.name, marker)
            return existing
    report = reader.SkipReport()
    samples, embs = [], []
    pending: list[tuple[reader.LabelledSample, Image.Image]] = []

    def embed_pending() -> None:
        if pending:
            pixels = augment.preprocess_batch(teacher.preprocess, [image for _, image in pending])
            embs.append(_embed(teacher.model.encode_image, pixels, device, cfg.precision, cfg.batch_size, teacher.embed_dim))
            samples.extend(sample for sample, _ in pending)
            pending.clear()

    with progress_bar(task.num_samples, f"extract zero-shot {task.name}", "img") as bar:
        for url in task.shards:
            for sample in reader.iter_labelled(url, image_extensions, len(task.classnames), report):
                try:
                    pending.append((sample, augment.decode_image(sample.image_bytes)))
                except augment.CorruptImageError:
                    report.add(reader.CORRUPT_IMAGE, url, sample.key)
                if len(pending) == cfg.batch_size:
                    embed_pending()
                bar.update(1)
        embed_pending()
    if not samples:
        raise PipelineError(f"zero-shot task {task.name!r}: no readable labelled image in {len(task.shards)} shard(s); "
                            f"skips: {report.to_dict()}")
    meta = {schema.META_TEACHER: info["teacher"], schema.META_MANIFEST_SHA256: info["manifest_sha256"],
            schema.META_EMBEDDING_DIM: str(teacher.embed_dim), schema.META_EMBEDDING_DTYPE: cfg.embedding_dtype}
    images = schema.images_table(
        [s.key for s in samples], [s.shard for s in samples], [s.image_format for s in samples],
        [s.image_bytes for s in samples], np.concatenate(embs), cfg.embedding_dtype, meta,
    )
    class_index, template_index, prompts = schema.prompts_for(task.classnames, task.templates)
    prompt_emb = _embed(teacher.model.encode_text, teacher.tokenizer(prompts), device, cfg.precision, cfg.batch_size, teacher.embed_dim)
    if marker.exists():
        marker.unlink()  # the task is being rewritten: incomplete until the new manifest lands
    atomic.atomic_write_table(schema.labelled_images_table(images, np.array([s.label for s in samples])),
                              out / schema.ZEROSHOT_IMAGES_FILE)
    atomic.atomic_write_table(schema.prompts_table(class_index, template_index, prompts, prompt_emb, cfg.embedding_dtype, meta),
                              out / schema.ZEROSHOT_PROMPTS_FILE)
    manifest = {**task_info, "num_images": len(samples), "num_prompts": len(prompts), "skipped": report.to_dict()}
    atomic.atomic_write_json(manifest, marker)
    if report.total:
        log.warning("zero-shot task %s: skipped %d\n%s", task.name, report.total, report.summary())
    log.info("zero-shot task %s: %d images, %d classes x %d templates -> %s", task.name, len(samples),
             len(task.classnames), len(task.templates), out)
    return manifest


def _bytes_needed(urls: list[str]) -> int:
    """About what the features take: the images are copied, so the size of the local input shards
    (plus a margin for the parts, which exist beside the final files until a split is finished)."""
    signatures = [source_signature(u) for u in urls]
    return int(1.1 * sum(s["size"] for s in signatures if s))


def _check_referencable(specs: dict) -> None:
    """With store_images false the features point into the input shards by byte offset, which only
    holds for local uncompressed tars (not `pipe:`/URLs, not .tar.gz)."""
    for split, spec in specs.items():
        for url in spec.shards:
            path = reader.local_path(url)  # a missing local shard is an unreadable shard, counted later
            if path is None or (os.path.exists(path) and not reader.is_plain_local_tar(url)):
                raise PipelineError(
                    f"split {split!r}: {url} is not a local uncompressed .tar, so its images cannot be referenced "
                    f"by byte offset; set extract.store_images: true to copy them into the features")


def extract(cfg: ExtractConfig, teacher_cfg: TeacherConfig, overwrite: bool = False) -> dict:
    """Extract every split in `cfg.splits`; returns {split: split manifest} (on rank 0)."""
    dist_info = runtime.init_distributed(cfg.device)
    device = runtime.device_for(dist_info, cfg.device)
    runtime.set_threads(cfg.threads)
    manifest = load_manifest(cfg.manifest)
    specs = {split: manifest.split(split) for split in cfg.splits}  # every split checked before any work
    unknown = sorted(set(cfg.view_splits) - set(manifest.splits))
    if cfg.views and unknown:  # a misspelt split would otherwise store no views at all
        raise PipelineError(f"extract.view_splits names {unknown}, not splits of {cfg.manifest} ({sorted(manifest.splits)})")
    tasks = list(manifest.classification.values()) if cfg.zeroshot else []
    if not cfg.store_images:
        _check_referencable(specs)
    if dist_info.is_main:
        atomic.prepare_output_dir(cfg.out_dir, _bytes_needed([u for spec in [*specs.values(), *tasks] for u in spec.shards]))
    teacher = load_teacher(teacher_cfg, device=device)
    models.check_world(teacher.identity, manifest.world, str(cfg.manifest))
    teacher.model.eval()
    results = {}
    for split, spec in specs.items():
        out = store.split_dir(cfg.out_dir, split)
        if overwrite and dist_info.is_main and out.exists():
            shutil.rmtree(out)
        runtime.barrier(dist_info)
        results[split] = extract_split(split, spec.shards, manifest.fields, teacher,
                                       _run_info(teacher, manifest.sha256, cfg, cfg.views_of(split)), cfg, device, dist_info,
                                       spec.num_samples)
    info = _run_info(teacher, manifest.sha256, cfg, views=0)  # zero-shot tasks: images and prompts, no views
    for task in tasks:
        if dist_info.is_main:
            results[f"{schema.ZEROSHOT_DIR}/{task.name}"] = extract_task(
                task, manifest.fields.image_extensions, teacher, info, cfg, device)
        runtime.barrier(dist_info)
    if cfg.verify_sample and dist_info.is_main:  # the cache proves itself before anything trains on it
        verify_features(teacher, cfg.out_dir, list(specs), cfg.verify_sample, cfg.seed, cfg.verify_min_cosine,
                        device, cfg.precision, cfg.batch_size)
    runtime.barrier(dist_info)
    return results
