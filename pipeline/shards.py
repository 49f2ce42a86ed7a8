"""Atomic writes and readers for the Parquet shards (the features and the negatives).

Every output of the pipeline is written to a temporary file beside its final path and renamed,
so a killed stage never leaves a half-written file that a re-run would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class ShardError(PipelineError):
    """A shard directory that is missing, incomplete or inconsistent; the message names the file."""


class OutputError(PipelineError):
    """An output that cannot be written (full disk, read-only folder, file size limit); names the path."""


# Temporaries are named `.<name>.tmp-<host>-<pid>`: a run removes those of dead processes on its own
# host when it starts (`prepare_output_dir`); another host's (shared file system) are left alone.
_HOST = socket.gethostname().replace("-", "_")
_TMP_NAME = re.compile(r"^\..+\.tmp-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)$")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def atomic_write_with(path: str | Path, write: Callable[[Path], None], errors: tuple = (OSError,)) -> Path:
    """`write(tmp)` beside `path`, then rename: a killed or failed write never leaves `path` half-written.
    A failure of the file system (full disk, read-only, size limit) is an OutputError naming `path`."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except errors as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"the write failed ({str(exc).splitlines()[0]})"
        raise OutputError(f"cannot write {path}: {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_table(table: pa.Table, path: str | Path, compression: str = "zstd") -> Path:
    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write_with(path, write)


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write_bytes(text.encode(), path)


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch  # only the stages that save weights pay for the import here

    # torch's zip writer reports a failed write (full disk, size limit) as a RuntimeError
    return atomic_write_with(path, lambda tmp: torch.save(obj, tmp), errors=(OSError, RuntimeError))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that killed runs on this host left under `folder` (recursively)."""
    removed = []
    for path in Path(folder).rglob(".*.tmp-*"):
        match = _TMP_NAME.match(path.name)
        if not match or not path.is_file() or match["host"] not in (None, _HOST):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not _process_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by killed runs in %s", len(removed), folder)
    return removed


def prepare_output_dir(folder: str | Path, need_bytes: int = 0) -> Path:
    """Before any work: `folder` exists and is writable, has about `need_bytes` free, and holds no
    temporaries of dead runs (a killed run's partial checkpoint could keep a full disk full)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
    remove_stale_temporaries(folder)
    check_free_space(folder, need_bytes)
    return folder


def check_free_space(folder: str | Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(
            f"output folder {folder} has {free / 2**20:.0f} MiB free, this run needs about {need_bytes / 2**20:.0f} MiB"
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- features ---------------------------------------------------------------------------------

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


# ---- negatives --------------------------------------------------------------------------------

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
