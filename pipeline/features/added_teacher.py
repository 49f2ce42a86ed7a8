"""`dsmd extract --teacher <name>`: one more teacher's embeddings of an extracted features split, added beside the
first's without rewriting anything of it.

The features split (ids, images, captions) is the key: this reads its images and captions in id order, embeds them
with the added teacher and writes `<teachers_dir>/<name>/<split>/<column>.npy` plus a `_manifest.json` that records
the teacher's identity and the fingerprint of the features split it embedded (stage two refuses a stale one). The
unit of work is a block of BLOCK consecutive ids, written atomically to `_parts/` (a re-run keeps the finished
blocks); the teacher's batches (extract.batch_size, decoded in the loader workers) never cross a block, so the
result does not depend on where a run was killed.
Stored augmentation views are embedded with the same crops and flips (`view_params`); zero-shot tasks stay the
first teacher's.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import models
from pipeline.common import atomic, names, runtime
from pipeline.common.config import ExtractConfig, TeacherConfig
from pipeline.common.errors import PipelineError
from pipeline.common.progress import progress as progress_bar
from pipeline.corpus import augment
from pipeline.corpus.manifest import load_manifest
from pipeline.features import schema, store
from pipeline.features.extract import ExtractMismatchError, _comparable, _describe_change, _embed
from pipeline.features.verify import verify_features
from pipeline.models import LoadedModel, load_teacher

log = logging.getLogger(__name__)

BLOCK = 8192  # ids per resumable part


class _ImageBatches(Dataset):
    """Batch i of the images to embed, decoded and preprocessed (in DataLoader workers): (block start, pixels,
    the pixels of their stored views or None)."""

    def __init__(self, images, batches: list[tuple[int, int, int]], preprocess, view_params: list | None = None) -> None:
        self.images, self.batches, self.preprocess = images, batches, preprocess  # (block start, first id, end id)
        self.view_params = view_params  # per image, its stored views (augment.apply_view dicts)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        block, lo, hi = self.batches[index]
        decoded = []
        for image_id in range(lo, hi):
            try:
                decoded.append(augment.decode_image(self.images[image_id]))
            except augment.CorruptImageError as exc:
                raise PipelineError(f"{self.images.where}: image {image_id} decoded at extraction but not now ({exc}); "
                                    f"its source shard changed: re-run `dsmd extract`") from None
        views = None
        if self.view_params is not None:  # the same crops and flips the first teacher embedded
            crops = [augment.apply_view(image, view) for image, i in zip(decoded, range(lo, hi)) for view in self.view_params[i]]
            views = augment.preprocess_batch(self.preprocess, crops)
        return block, augment.preprocess_batch(self.preprocess, decoded), views


def _batches(blocks: list[int], total: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(block start, first id, end id) of every teacher batch of `blocks`: batches never cross a block."""
    return [(start, lo, min(lo + batch_size, start + BLOCK, total))
            for start in blocks for lo in range(start, min(start + BLOCK, total), batch_size)]


def _part(parts: Path, kind: str, start: int) -> Path:
    return parts / f"{kind}-{start:012d}.npy"


def _save(path: Path, rows: np.ndarray, dtype: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # (np.save given a path would add ".npy" to the temporary's name)
            np.save(handle, rows.astype(dtype), allow_pickle=False)
    atomic.atomic_write_with(path, write)


def _captions(features_dir: str | Path, split: str):
    found = store.lookups(features_dir, split)
    if found is not None:
        return store.Captions(found[schema.CAPTION_OFFSETS], found[schema.CAPTION_UTF8])
    return store.read_texts(features_dir, split, columns=[schema.CAPTION])[schema.CAPTION].to_pylist()


def _run_info(teacher: LoadedModel, features_dir: str | Path, split: str, dtype: str) -> dict:
    """Everything that must match for existing parts or arrays to be reused."""
    return {"teacher": teacher.identity, schema.FEATURES_FINGERPRINT: store.features_fingerprint(features_dir, split),
            "embedding_dim": teacher.embed_dim, "embedding_dtype": dtype, "schema_version": schema.SCHEMA_VERSION}


def _reusable(path: Path, info: dict) -> bool:
    """Whether `path` (a manifest or run file) was written with `info`: the same features split is reused or
    redone silently (new ids, new embeddings); another teacher or dtype is refused, as `dsmd extract` refuses."""
    if not path.exists():
        return False
    old = json.loads(path.read_text())
    if old.get(schema.FEATURES_FINGERPRINT) != info[schema.FEATURES_FINGERPRINT]:
        log.warning("%s: the features split was extracted again since; embedding it anew", path.parent)
        return False
    changes = _describe_change(_comparable({k: old.get(k) for k in info}), _comparable(info))
    if changes:
        raise ExtractMismatchError(f"{path} was written with different inputs; refusing to mix outputs. What changed: "
                                   f"{'; '.join(changes)}. Use another teacher name, or --overwrite to discard them.")
    return True


def embed_split(teacher: LoadedModel, features_dir: str | Path, split: str, out: Path, cfg: ExtractConfig,
                device: torch.device) -> dict:
    """Embed one features split with `teacher` into `out` (resumable block by block); its manifest."""
    info = _run_info(teacher, features_dir, split, cfg.embedding_dtype)
    marker, parts = out / schema.SPLIT_MANIFEST, out / schema.PARTS_DIR
    if _reusable(marker, info):
        log.info("%s is up to date", marker)
        return json.loads(marker.read_text())
    if marker.exists():
        marker.unlink()
    if not _reusable(parts / names.EXTRACT_RUN_FILE, info):
        shutil.rmtree(parts, ignore_errors=True)
        atomic.atomic_write_json(info, parts / names.EXTRACT_RUN_FILE)
    manifest = store.load_split_manifest(features_dir, split)
    num_images, num_texts = int(manifest["num_images"]), int(manifest["num_texts"])
    views = int(manifest.get("views", 0) or 0)
    view_params = (store.read_images(features_dir, split, columns=[schema.VIEW_PARAMS])[schema.VIEW_PARAMS].to_pylist()
                   if views else None)
    dim, dtype = teacher.embed_dim, cfg.embedding_dtype
    embed = lambda encode, inputs: _embed(encode, inputs, device, cfg.precision, cfg.batch_size, dim)  # noqa: E731

    todo = [s for s in range(0, num_images, BLOCK) if not _part(parts, "images", s).exists()]
    batches = _batches(todo, num_images, cfg.batch_size)
    loader = DataLoader(_ImageBatches(store.image_bytes(features_dir, split), batches, teacher.preprocess, view_params),
                        batch_size=None, num_workers=min(cfg.num_workers, len(batches)),
                        worker_init_fn=runtime.die_with_parent())
    pending: list[np.ndarray] = []
    pending_views: list[np.ndarray] = []
    with progress_bar(num_images, f"extract {split} images", "img", initial=num_images - _rows(todo, num_images)) as bar:
        for (block, _, hi), (_, pixels, view_pixels) in zip(batches, loader):  # in order: a block's batches, then the next's
            pending.append(embed(teacher.model.encode_image, pixels))
            if view_pixels is not None:
                pending_views.append(embed(teacher.model.encode_image, view_pixels).reshape(len(pixels), views, dim))
            bar.update(len(pixels))
            if hi == min(block + BLOCK, num_images):  # the block's last batch: the block is a part (images last)
                if views:
                    _save(_part(parts, "views", block), np.concatenate(pending_views), dtype)
                _save(_part(parts, "images", block), np.concatenate(pending), dtype)
                pending, pending_views = [], []
    captions = _captions(features_dir, split)
    todo = [s for s in range(0, num_texts, BLOCK) if not _part(parts, "texts", s).exists()]
    with progress_bar(num_texts, f"extract {split} captions", "txt", initial=num_texts - _rows(todo, num_texts)) as bar:
        for block, lo, hi in _batches(todo, num_texts, cfg.batch_size):
            pending.append(embed(teacher.model.encode_text, teacher.tokenizer([captions[i] for i in range(lo, hi)])))
            bar.update(hi - lo)
            if hi == min(block + BLOCK, num_texts):
                _save(_part(parts, "texts", block), np.concatenate(pending), dtype)
                pending = []

    def pieces(kind: str, rows: int):
        return (np.load(_part(parts, kind, s)) for s in range(0, rows, BLOCK))

    written = store.write_added_teacher(out, {**info, "split": split}, pieces("images", num_images),
                                        pieces("texts", num_texts), num_images, num_texts, dim, dtype,
                                        pieces("views", num_images) if views else None, views)
    shutil.rmtree(parts)
    return written


def _rows(starts: list[int], total: int) -> int:
    return sum(min(BLOCK, total - s) for s in starts)


def extract_added_teacher(cfg: ExtractConfig, name: str, teacher_cfg: TeacherConfig, overwrite: bool = False) -> dict:
    """Embed every split of `cfg.splits` (already extracted into cfg.out_dir) with the added teacher `name`, into
    `cfg.teachers_dir/<name>/<split>/`; returns {split: its manifest}. One process (the images were decoded and
    sorted once by `dsmd extract`; this is a plain pass over them)."""
    runtime.set_threads(cfg.threads)
    device = runtime.resolve_device(cfg.device)
    for split in cfg.splits:  # every split checked before any work
        store.load_split_manifest(cfg.out_dir, split)
    root = Path(cfg.teachers_dir) / name
    if overwrite and root.exists():
        shutil.rmtree(root)
    atomic.prepare_output_dir(root)
    teacher = load_teacher(teacher_cfg, device=device)
    if Path(cfg.manifest).exists():
        models.check_world(teacher.identity, load_manifest(cfg.manifest).world, str(cfg.manifest))
    teacher.model.eval()
    results = {}
    for split in cfg.splits:
        results[split] = embed_split(teacher, cfg.out_dir, split, store.added_teacher_dir(cfg.teachers_dir, name, split),
                                     cfg, device)
        log.info("teacher %s, split %s: %d images, %d texts -> %s", name, split, results[split]["num_images"],
                 results[split]["num_texts"], store.added_teacher_dir(cfg.teachers_dir, name, split))
    if cfg.verify_sample:  # the added cache proves itself too, as the first teacher's does
        verify_features(teacher, cfg.out_dir, cfg.splits, cfg.verify_sample, cfg.seed, cfg.verify_min_cosine, device,
                        cfg.precision, cfg.batch_size, (cfg.teachers_dir, name))
    return results
