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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import augment, corpus, runtime, schema, shards
from pipeline.config import ExtractConfig, TeacherConfig
from pipeline.errors import PipelineError
from pipeline.manifest import load_manifest
from pipeline.models import LoadedModel
from pipeline.teacher import load_teacher

log = logging.getLogger(__name__)

RUN_FILE = "_run.json"  # inside _parts/: what the parts were computed with


class ExtractMismatchError(PipelineError):
    """Existing outputs were made with another teacher, corpus or settings."""


@dataclass
class _Item:
    index: int  # position of the sample within its shard
    image: torch.Tensor | None
    views: torch.Tensor | None
    view_params: list[dict]


def view_rng(seed: int, key: str) -> np.random.Generator:
    """Views depend only on (seed, sample key): the same on every rank and every re-run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class _ShardImages(Dataset):
    """Decodes and preprocesses the images of one shard (in DataLoader workers)."""

    def __init__(self, samples: list[corpus.Sample], preprocess, views: int, seed: int):
        self.samples, self.preprocess, self.views, self.seed = samples, preprocess, views, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> _Item:
        sample = self.samples[index]
        try:
            image = augment.decode_image(sample.image_bytes)
        except augment.CorruptImageError:
            return _Item(index, None, None, [])
        view_params, view_tensors = [], None
        if self.views:
            rng = view_rng(self.seed, sample.key)
            view_params = [augment.sample_view(rng) for _ in range(self.views)]
            view_tensors = torch.stack([self.preprocess(augment.apply_view(image, v)) for v in view_params])
        return _Item(index, self.preprocess(image), view_tensors, view_params)


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def _run_info(teacher: LoadedModel, manifest_sha256: str, cfg: ExtractConfig) -> dict:
    """Everything that must match for existing parts to be reused."""
    return {
        "teacher": teacher.identity,
        "manifest_sha256": manifest_sha256,
        "embedding_dim": teacher.embed_dim,
        "embedding_dtype": cfg.embedding_dtype,
        "views": cfg.views,
        "view_seed": cfg.seed if cfg.views else None,
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


def _check_compatible(path: Path, existing: dict, info: dict) -> None:
    keys = [k for k in info]
    old = {k: existing.get(k) for k in keys}
    changes = _describe_change(old, info)
    if changes:
        raise ExtractMismatchError(
            f"{path} was written with different inputs; refusing to mix outputs. What changed: "
            + "; ".join(changes)
            + ". Use a new --out-dir, or --overwrite to discard the old outputs."
        )


@torch.inference_mode()
def _encode_images(teacher: LoadedModel, images: torch.Tensor, device, precision, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        with runtime.autocast(device, precision):
            emb = teacher.model.encode_image(batch)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, teacher.embed_dim), np.float32)


@torch.inference_mode()
def _encode_texts(teacher: LoadedModel, captions: list[str], device, precision, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(captions), batch_size):
        tokens = teacher.tokenizer(captions[start : start + batch_size]).to(device, non_blocking=True)
        with runtime.autocast(device, precision):
            emb = teacher.model.encode_text(tokens)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, teacher.embed_dim), np.float32)


def _list_column(values: np.ndarray, per_row: int, value_type: pa.DataType | None = None, arrow_values: pa.Array | None = None) -> pa.Array:
    n = len(values) // per_row if per_row else 0
    offsets = pa.array(np.arange(0, n * per_row + 1, per_row, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, arrow_values if arrow_values is not None else pa.array(values, value_type))


def _extract_shard(
    shard_index: int,
    url: str,
    split: str,
    fields,
    teacher: LoadedModel,
    cfg: ExtractConfig,
    device: torch.device,
    parts_dir: Path,
    meta: dict,
    progress: tqdm,
) -> dict:
    """Embed one input shard and write its part files; returns the shard's skip report."""
    report = corpus.SkipReport()
    samples = list(corpus.iter_shard(url, fields, report))
    loader = DataLoader(
        _ShardImages(samples, teacher.preprocess, cfg.views, cfg.seed),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    kept: list[corpus.Sample] = []
    image_embs, view_embs, view_params = [], [], []
    for items in loader:
        good = []
        for item in items:
            if item.image is None:
                report.add("corrupt_image", url, samples[item.index].key)
            else:
                good.append(item)
        if not good:
            continue
        image_embs.append(_encode_images(teacher, torch.stack([g.image for g in good]), device, cfg.precision, cfg.batch_size))
        if cfg.views:
            flat = torch.cat([g.views for g in good])
            view_embs.append(_encode_images(teacher, flat, device, cfg.precision, cfg.batch_size))
            view_params.extend(p for g in good for p in g.view_params)
        kept.extend(samples[g.index] for g in good)
        progress.update(len(items))

    dim, dtype = teacher.embed_dim, cfg.embedding_dtype
    image_emb = np.concatenate(image_embs) if image_embs else np.zeros((0, dim), np.float32)
    columns: dict[str, Any] = {
        schema.IMAGE_ID: pa.array(np.arange(len(kept)), pa.int64()),  # local ids; made global at finalize
        schema.KEY: pa.array([s.key for s in kept], pa.string()),
        schema.SOURCE_SHARD: pa.array([s.shard for s in kept], pa.string()),
        schema.IMAGE_FORMAT: pa.array([s.image_format for s in kept], pa.string()),
        schema.IMAGE_BYTES: pa.array([s.image_bytes for s in kept], pa.binary()),
        schema.TEACHER_IMAGE_EMB: schema.numpy_to_embeddings(image_emb, dtype),
    }
    if cfg.views:
        flat_views = np.concatenate(view_embs) if view_embs else np.zeros((0, dim), np.float32)
        columns[schema.TEACHER_VIEW_EMB] = _list_column(
            flat_views, cfg.views, arrow_values=schema.numpy_to_embeddings(flat_views, dtype)
        )
        columns[schema.VIEW_PARAMS] = _list_column(
            np.empty(len(view_params)), cfg.views, arrow_values=pa.array(view_params, schema.view_params_type())
        )
    images = pa.Table.from_pydict(
        columns, schema=schema.images_schema(dim, dtype, cfg.views, {**meta, schema.META_KIND: "images"})
    )

    captions = [c for s in kept for c in s.captions]
    text_emb = _encode_texts(teacher, captions, device, cfg.precision, cfg.batch_size)
    texts = pa.Table.from_pydict(
        {
            schema.TEXT_ID: pa.array(np.arange(len(captions)), pa.int64()),
            schema.IMAGE_ID: pa.array(np.repeat(np.arange(len(kept)), [len(s.captions) for s in kept]), pa.int64()),
            schema.CAPTION_INDEX: pa.array([i for s in kept for i in range(len(s.captions))], pa.int32()),
            schema.CAPTION: pa.array(captions, pa.string()),
            schema.TEACHER_TEXT_EMB: schema.numpy_to_embeddings(text_emb, dtype),
        },
        schema=schema.texts_schema(dim, dtype, {**meta, schema.META_KIND: "texts"}),
    )
    shards.atomic_write_table(images, parts_dir / f"images-{shard_index:06d}.parquet")
    shards.atomic_write_table(texts, parts_dir / f"texts-{shard_index:06d}.parquet")
    # the report file is written last: its presence marks the part complete
    shards.atomic_write_json({"url": url, "skipped": report.to_dict()}, parts_dir / f"skips-{shard_index:06d}.json")
    return report.to_dict()


def _finalize(features_dir: Path, split: str, urls: list[str], parts_dir: Path, info: dict) -> dict:
    """Offset each part's local ids into dense split-wide ids and write the final split."""
    image_tables, text_tables = [], []
    report = corpus.SkipReport()
    image_offset = text_offset = 0
    for index, url in enumerate(urls):
        part_report = json.loads((parts_dir / f"skips-{index:06d}.json").read_text())
        report.merge(corpus.SkipReport.from_dict(part_report["skipped"]))
        images = pq.read_table(parts_dir / f"images-{index:06d}.parquet")
        texts = pq.read_table(parts_dir / f"texts-{index:06d}.parquet")
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
    manifest = shards.write_split(
        features_dir, split, image_tables, text_tables,
        {**info, "source_shards": urls, "skipped": report.to_dict()},
    )
    if report.total:
        log.warning("split %s: skipped %d sample(s)\n%s", split, report.total, report.summary())
    shutil.rmtree(parts_dir)
    return manifest


def extract_split(
    split: str, urls: list[str], fields, teacher: LoadedModel, info: dict, cfg: ExtractConfig,
    device: torch.device, dist_info: runtime.DistInfo, expected_samples: int | None = None,
) -> dict | None:
    features_dir = Path(cfg.out_dir)
    out = shards.split_dir(features_dir, split)
    final_manifest = out / schema.SPLIT_MANIFEST
    parts_dir = out / schema.PARTS_DIR
    if final_manifest.exists():
        existing = json.loads(final_manifest.read_text())
        _check_compatible(final_manifest, existing, info)
        if existing.get("source_shards") == urls:
            log.info("split %s is up to date (%s)", split, final_manifest)
            return existing
    run_file = parts_dir / RUN_FILE
    if dist_info.is_main:
        if run_file.exists():
            _check_compatible(run_file, json.loads(run_file.read_text()), info)
        else:
            shards.atomic_write_json(info, run_file)
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
    todo = [i for i in mine if not (parts_dir / f"skips-{i:06d}.json").exists()]
    if len(todo) < len(mine):
        log.info("split %s: resuming, %d of %d shard(s) already done", split, len(mine) - len(todo), len(mine))
    total = expected_samples // dist_info.world_size if expected_samples else None
    started = time.perf_counter()
    with tqdm(total=total, desc=f"extract {split}", unit="img", disable=not dist_info.is_main, dynamic_ncols=True) as progress:
        for index in todo:
            _extract_shard(index, urls[index], split, fields, teacher, cfg, device, parts_dir, meta, progress)
    log.info("split %s rank %d: %d shard(s) in %.1fs", split, dist_info.rank, len(todo), time.perf_counter() - started)
    runtime.barrier(dist_info)
    manifest = None
    if dist_info.is_main:
        manifest = _finalize(features_dir, split, urls, parts_dir, info)
        log.info("split %s: %d images, %d texts -> %s", split, manifest["num_images"], manifest["num_texts"], out)
    runtime.barrier(dist_info)
    return manifest


def extract(cfg: ExtractConfig, teacher_cfg: TeacherConfig, overwrite: bool = False) -> dict:
    """Extract every split in `cfg.splits`; returns {split: split manifest} (on rank 0)."""
    dist_info = runtime.init_distributed(cfg.device)
    device = runtime.device_for(dist_info, cfg.device)
    runtime.set_threads(cfg.threads)
    if cfg.embedding_dtype not in schema.EMBEDDING_DTYPES:
        raise PipelineError(f"extract.embedding_dtype must be one of {sorted(schema.EMBEDDING_DTYPES)}, got {cfg.embedding_dtype!r}")
    manifest = load_manifest(cfg.manifest)
    teacher = load_teacher(teacher_cfg, device=device)
    teacher.model.eval()
    info = _run_info(teacher, manifest.sha256, cfg)
    results = {}
    for split in cfg.splits:
        spec = manifest.split(split)
        out = shards.split_dir(cfg.out_dir, split)
        if overwrite and dist_info.is_main and out.exists():
            shutil.rmtree(out)
        runtime.barrier(dist_info)
        results[split] = extract_split(
            split, spec.shards, manifest.fields, teacher, info, cfg, device, dist_info, spec.num_samples
        )
    return results
