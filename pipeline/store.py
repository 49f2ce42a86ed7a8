"""The pipeline's Parquet store: reading the features (`features/<split>/`) and the negatives
(`negatives/<split>/`), and writing a finished features split. Not to be confused with the WebDataset
shards of the input corpus (`pipeline/corpus.py`). Writes go through `pipeline/atomic.py`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.atomic import atomic_write_json, atomic_write_table, sha256_file
from pipeline.errors import PipelineError




class ShardError(PipelineError):
    """A shard directory that is missing, incomplete or inconsistent; the message names the file."""


def split_dir(features_dir: str | Path, split: str) -> Path:
    return Path(features_dir) / split


def load_split_manifest(features_dir: str | Path, split: str) -> dict:
    """The `_manifest.json` that `dsmd extract` writes last: its presence means the split is complete."""
    path = split_dir(features_dir, split) / schema.SPLIT_MANIFEST
    if not path.exists():
        raise ShardError(
            f"{path} not found: split {split!r} has not been extracted (or extraction did not finish); "
            f"run `dsmd extract` first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from None


def features_fingerprint(features_dir: str | Path, split: str) -> str:
    """Identifies one extraction of one split: the sha256 of its `_manifest.json`."""
    load_split_manifest(features_dir, split)  # clear error when absent
    return sha256_file(split_dir(features_dir, split) / schema.SPLIT_MANIFEST)


def _read_kind(features_dir: str | Path, split: str, prefix: str, columns: Iterable[str] | None) -> pa.Table:
    manifest = load_split_manifest(features_dir, split)
    files = manifest["files"][prefix]
    base = split_dir(features_dir, split)
    tables = []
    for entry in files:
        path = base / entry["path"]
        if not path.exists():
            raise ShardError(f"{path} is listed in {base / schema.SPLIT_MANIFEST} but missing")
        try:
            tables.append(pq.read_table(path, columns=list(columns) if columns else None))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: unreadable Parquet ({exc})") from None
    if not tables:
        raise ShardError(f"{base}: split {split!r} has no {prefix} files")
    return pa.concat_tables(tables)


def read_images(features_dir: str | Path, split: str, columns: Iterable[str] | None = None) -> pa.Table:
    """The split's images table in image_id order (ids are dense, files are written in id order)."""
    return _read_kind(features_dir, split, schema.IMAGES_PREFIX, columns)


def read_texts(features_dir: str | Path, split: str, columns: Iterable[str] | None = None) -> pa.Table:
    """The split's texts table in text_id order."""
    return _read_kind(features_dir, split, schema.TEXTS_PREFIX, columns)


def read_file_schema(features_dir: str | Path, split: str, prefix: str) -> pa.Schema:
    manifest = load_split_manifest(features_dir, split)
    first = split_dir(features_dir, split) / manifest["files"][prefix][0]["path"]
    return pq.read_schema(first)


def load_embeddings(features_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(teacher_image_emb (N, D), teacher_text_emb (M, D), text_to_image (M,)) as float32 / int64."""
    images = read_images(features_dir, split, columns=[schema.IMAGE_ID, schema.TEACHER_IMAGE_EMB])
    texts = read_texts(features_dir, split, columns=[schema.TEXT_ID, schema.IMAGE_ID, schema.TEACHER_TEXT_EMB])
    image_emb = schema.embeddings_to_numpy(images[schema.TEACHER_IMAGE_EMB])
    text_emb = schema.embeddings_to_numpy(texts[schema.TEACHER_TEXT_EMB])
    text_to_image = texts[schema.IMAGE_ID].to_numpy().astype(np.int64)
    image_ids = images[schema.IMAGE_ID].to_numpy()
    text_ids = texts[schema.TEXT_ID].to_numpy()
    if not (np.array_equal(image_ids, np.arange(len(image_ids))) and np.array_equal(text_ids, np.arange(len(text_ids)))):
        raise ShardError(f"{split_dir(features_dir, split)}: ids are not dense and ordered; re-run `dsmd extract`")
    return image_emb, text_emb, text_to_image


def neighbors_path(negatives_dir: str | Path, split: str, direction: str) -> Path:
    if direction not in schema.NEIGHBOR_DIRECTIONS:
        raise ValueError(f"direction must be one of {schema.NEIGHBOR_DIRECTIONS}, got {direction!r}")
    return Path(negatives_dir) / split / f"{direction}.parquet"


def read_neighbors(negatives_dir: str | Path, split: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(neighbor_ids (N, k) int64, neighbor_scores (N, k) float32) in key order; -1 / -inf pad short rows."""
    path = neighbors_path(negatives_dir, split, direction)
    if not path.exists():
        raise ShardError(f"{path} not found: run `dsmd mine` for split {split!r} first")
    table = pq.read_table(path)
    keys = table[schema.neighbor_key_column(direction)].to_numpy()
    if not np.array_equal(keys, np.arange(len(keys))):
        raise ShardError(f"{path}: keys are not dense and ordered")
    ids_col = table[schema.NEIGHBOR_IDS].combine_chunks()
    scores_col = table[schema.NEIGHBOR_SCORES].combine_chunks()
    lengths = np.diff(ids_col.offsets.to_numpy())
    k = int(lengths.max()) if len(lengths) else 0
    ids = np.full((len(keys), k), -1, dtype=np.int64)
    scores = np.full((len(keys), k), -np.inf, dtype=np.float32)
    flat_ids = ids_col.flatten().to_numpy()
    flat_scores = scores_col.flatten().to_numpy()
    rows = np.repeat(np.arange(len(keys)), lengths)
    cols = np.arange(len(flat_ids)) - np.repeat(ids_col.offsets.to_numpy()[:-1], lengths)
    ids[rows, cols] = flat_ids
    scores[rows, cols] = flat_scores
    return ids, scores


def write_split(
    features_dir: str | Path,
    split: str,
    image_tables: list[pa.Table],
    text_tables: list[pa.Table],
    info: dict,
) -> dict:
    """Write a split's images/texts files (one pair per entry, in id order) and, last, its
    `_manifest.json`: the split counts as extracted only once that file exists.

    `info` carries split-level facts (teacher identity, manifest sha256, embedding dim/dtype,
    views, skip report, source shards); counts, files and checksums are added here."""
    if len(image_tables) != len(text_tables):
        raise ValueError("image_tables and text_tables must pair up")
    base = split_dir(features_dir, split)
    base.mkdir(parents=True, exist_ok=True)
    marker = base / schema.SPLIT_MANIFEST
    if marker.exists():
        marker.unlink()  # the split is being rewritten: it is incomplete until the new manifest lands
    files: dict[str, list] = {schema.IMAGES_PREFIX: [], schema.TEXTS_PREFIX: []}
    for index, (images, texts) in enumerate(zip(image_tables, text_tables)):
        for prefix, table in ((schema.IMAGES_PREFIX, images), (schema.TEXTS_PREFIX, texts)):
            name = f"{prefix}-{index:06d}.parquet"
            path = atomic_write_table(table, base / name)
            files[prefix].append({"path": name, "rows": table.num_rows, "sha256": sha256_file(path)})
    for prefix, listed in files.items():  # files of an earlier, larger version of the split
        for path in base.glob(f"{prefix}-*.parquet"):
            if path.name not in {f["path"] for f in listed}:
                path.unlink()
    manifest = {
        **info,
        "split": split,
        "schema_version": schema.SCHEMA_VERSION,
        "num_images": sum(f["rows"] for f in files[schema.IMAGES_PREFIX]),
        "num_texts": sum(f["rows"] for f in files[schema.TEXTS_PREFIX]),
        "files": files,
    }
    atomic_write_json(manifest, marker)
    return manifest
