"""The pipeline's Parquet store: reading the features (`features/<split>/`) and the negatives
(`negatives/<split>/`), and writing a finished features split. Not to be confused with the WebDataset
shards of the input corpus (`pipeline/corpus/reader.py`). Writes go through `pipeline/common/atomic.py`.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic import atomic_write_json, atomic_write_table, atomic_write_with, sha256_file
from pipeline.common.config import PRIMARY_TEACHER
from pipeline.common.errors import PipelineError
from pipeline.features import schema


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


def _kind_files(features_dir: str | Path, split: str, prefix: str) -> list[Path]:
    """The split's images or texts files, in id order, each checked to exist."""
    manifest = load_split_manifest(features_dir, split)
    base = split_dir(features_dir, split)
    paths = [base / entry["path"] for entry in manifest["files"][prefix]]
    for path in paths:
        if not path.exists():
            raise ShardError(f"{path} is listed in {base / schema.SPLIT_MANIFEST} but missing")
    if not paths:
        raise ShardError(f"{base}: split {split!r} has no {prefix} files")
    return paths


def _read_kind(features_dir: str | Path, split: str, prefix: str, columns: Iterable[str] | None) -> pa.Table:
    tables = []
    for path in _kind_files(features_dir, split, prefix):
        try:
            tables.append(pq.read_table(path, columns=list(columns) if columns else None))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: unreadable Parquet ({exc})") from None
    return pa.concat_tables(tables)


def take_rows(features_dir: str | Path, split: str, prefix: str, ids: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows `ids` (sorted split-wide ids) of the split's images or texts table, in that order, reading only the
    row groups that hold them: a sample of a large split costs a few row groups, not the whole column."""
    ids, pieces, offset = np.asarray(ids, dtype=np.int64), [], 0
    for path in _kind_files(features_dir, split, prefix):
        try:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                local = ids[(ids >= offset) & (ids < offset + rows)] - offset
                if len(local):
                    pieces.append(parquet.read_row_group(group, columns=columns).take(local))
                offset += rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise ShardError(f"{path}: unreadable Parquet ({exc})") from None
    if len(ids) and (ids.min() < 0 or ids.max() >= offset):
        raise ShardError(f"{split_dir(features_dir, split)}: row ids outside 0..{offset - 1}")
    return pa.concat_tables(pieces) if pieces else pq.read_schema(_kind_files(features_dir, split, prefix)[0]).empty_table().select(columns)


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


def neighbor_rows_path(negatives_dir: str | Path, split: str, direction: str) -> Path:
    """`<direction>.ids.npy` beside `<direction>.parquet`: the same neighbour ids as a (keys, k) int32 array
    (-1 padded), which training reads per batch by row instead of holding every key's list in memory."""
    return neighbors_path(negatives_dir, split, direction).with_suffix(".ids.npy")


def read_row_groups(path: str | Path, columns: list[str]) -> Iterator[pa.Table]:
    """`columns` of a Parquet file, a row group at a time. (pyarrow's `iter_batches` kept what it had read allocated
    until the end of the file: 300 MB over 7M neighbour lists, measured; this holds one row group.)"""
    found = pq.ParquetFile(path)
    for group in range(found.num_row_groups):
        yield found.read_row_group(group, columns=columns)


def _neighbor_batches(path: Path, direction: str, count: int) -> Iterator[np.ndarray]:
    """The first `count` neighbour ids of each key of `path`, (rows, count) int32 with -1 padding, a row
    group at a time, keys checked to be dense and ordered."""
    try:
        row = 0
        for batch in read_row_groups(path, [schema.neighbor_key_column(direction), schema.NEIGHBOR_IDS]):
            keys = batch.column(0).to_numpy()
            if not np.array_equal(keys, np.arange(row, row + len(keys))):
                raise ShardError(f"{path}: keys are not dense and ordered")
            lists = batch.column(1).combine_chunks()
            offsets = lists.offsets.to_numpy()
            starts, lengths = offsets[:-1], np.minimum(np.diff(offsets), count)
            flat = lists.values.to_numpy()
            out = np.full((len(keys), count), -1, dtype=np.int32)
            for column in range(count):
                has = lengths > column
                out[np.flatnonzero(has), column] = flat[starts[has] + column]
            row += len(keys)
            yield out
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: unreadable Parquet ({exc})") from None


def write_neighbor_rows(negatives_dir: str | Path, split: str, direction: str, k: int) -> Path:
    """Write `<direction>.ids.npy` from the direction's Parquet file, a batch of rows at a time (memory holds
    one batch), atomically."""
    path = neighbors_path(negatives_dir, split, direction)
    rows = pq.ParquetFile(path).metadata.num_rows

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                                          "shape": (rows, k)})
            for batch in _neighbor_batches(path, direction, k):
                handle.write(batch.tobytes())

    return atomic_write_with(neighbor_rows_path(negatives_dir, split, direction), write)


def neighbor_rows(negatives_dir: str | Path, split: str, direction: str) -> "RowFile | None":
    """The direction's neighbour ids read per batch (`rows[ids]`), or None where `dsmd mine` wrote no
    `.ids.npy` (negatives mined before it did: read whole instead)."""
    path = neighbor_rows_path(negatives_dir, split, direction)
    return RowFile(path) if path.exists() else None


def read_neighbor_ids(negatives_dir: str | Path, split: str, direction: str, count: int) -> np.ndarray:
    """The first `count` neighbour ids of every key, (N, count) int32 with -1 padding, read a batch of rows at
    a time: memory holds the result, never the whole lists (k per key) or their scores."""
    path = neighbors_path(negatives_dir, split, direction)
    if not path.exists():
        raise ShardError(f"{path} not found: run `dsmd mine` for split {split!r} first")
    out = np.full((pq.ParquetFile(path).metadata.num_rows, count), -1, dtype=np.int32)
    row = 0
    for batch in _neighbor_batches(path, direction, count):
        out[row : row + len(batch)] = batch
        row += len(batch)
    return out


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
    arrays = _write_arrays(base, image_tables, text_tables)
    lookups = _write_lookups(base, image_tables, text_tables)
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
        "arrays": arrays,
        schema.LOOKUPS_KEY: lookups,
    }
    atomic_write_json(manifest, marker)
    return manifest


# ---- embeddings as .npy, read by row --------------------------------------------------------------

def _write_arrays(base: Path, image_tables: list[pa.Table], text_tables: list[pa.Table]) -> dict:
    """The split's embedding columns also as `<column>.npy` in id order (storage dtype), written table by
    table into a memory map, so a reader can fetch rows by position (RowFile) without loading the split."""
    written = {}
    for column in schema.EMBEDDING_ARRAYS:
        tables = image_tables if column != schema.TEACHER_TEXT_EMB else text_tables
        if column not in tables[0].schema.names:
            continue
        def write(tmp: Path, column=column, tables=tables) -> None:
            out, start = None, 0
            for table in tables:
                piece = _embedding_rows(table[column])
                if out is None:  # dtype and row shape from the first table, rows from all
                    total = sum(t.num_rows for t in tables)
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=piece.dtype, shape=(total, *piece.shape[1:]))
                out[start : start + len(piece)] = piece
                start += len(piece)
            out.flush()
            del out
        path = atomic_write_with(base / schema.array_file(column), write)
        written[column] = {"path": path.name, "sha256": sha256_file(path)}
    return written


def _write_npy(path: Path, dtype, shape: int | tuple[int, ...], pieces: Iterable[np.ndarray]) -> dict:
    """A `.npy` of `shape` (an int: 1-D) written piece by piece along its first axis into a memory map
    (atomically): never whole in memory."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)

    def write(tmp: Path) -> None:
        out, start = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape), 0
        for piece in pieces:
            out[start : start + len(piece)] = piece
            start += len(piece)
        if start != shape[0]:
            raise ValueError(f"{path.name}: wrote {start} rows, expected {shape[0]}")
        out.flush()
        del out
    atomic_write_with(path, write)
    return {"path": path.name, "sha256": sha256_file(path)}


def _caption_bytes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0 (rows + 1,), UTF-8 bytes) of a texts table's captions, straight from the Arrow buffers."""
    array = table[schema.CAPTION].combine_chunks().cast(pa.large_string())
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]
    data = array.buffers()[2]
    utf8 = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], utf8


def _write_lookups(base: Path, image_tables: list[pa.Table], text_tables: list[pa.Table]) -> dict:
    """The per-id lookups of stage two (schema.TEXT_OFFSETS ...) as .npy files, table by table. Texts must be grouped
    by image in id order (extract writes them so); if they are not, none is written and readers load the tables."""
    owners = [t[schema.IMAGE_ID].to_numpy() for t in text_tables]
    joined_ok = all(np.all(np.diff(o) >= 0) for o in owners) and all(
        a[-1] <= b[0] for a, b in zip([o for o in owners if len(o)], [o for o in owners if len(o)][1:]))
    if not joined_ok:
        return {}
    num_images = sum(t.num_rows for t in image_tables)
    num_texts = sum(t.num_rows for t in text_tables)
    counts = np.zeros(num_images, np.int64)
    for o in owners:
        counts += np.bincount(o, minlength=num_images)
    out = {
        schema.TEXT_OFFSETS: _write_npy(base / schema.array_file(schema.TEXT_OFFSETS), np.int64, num_images + 1,
                                        [np.zeros(1, np.int64), np.cumsum(counts)]),
        schema.TEXT_IMAGE_IDS: _write_npy(base / schema.array_file(schema.TEXT_IMAGE_IDS), np.int64, num_texts, owners),
    }
    del counts, owners
    sizes = [int(_caption_bytes(t)[0][-1]) for t in text_tables]

    def caption_offsets() -> Iterator[np.ndarray]:
        yield np.zeros(1, np.int64)
        start = 0
        for table in text_tables:
            offsets = _caption_bytes(table)[0]
            yield offsets[1:] + start
            start += int(offsets[-1])

    out[schema.CAPTION_OFFSETS] = _write_npy(base / schema.array_file(schema.CAPTION_OFFSETS), np.int64, num_texts + 1,
                                             caption_offsets())
    out[schema.CAPTION_UTF8] = _write_npy(base / schema.array_file(schema.CAPTION_UTF8), np.uint8, sum(sizes),
                                          (_caption_bytes(t)[1] for t in text_tables))
    if all(t[schema.IMAGE_OFFSET].null_count == 0 and t[schema.IMAGE_SIZE].null_count == 0 for t in image_tables):
        shards: dict[str, int] = {}
        index = [np.array([shards.setdefault(url, len(shards)) for url in t[schema.SOURCE_SHARD].to_pylist()], np.int32)
                 for t in image_tables]
        out[schema.IMAGE_SHARD_INDEX] = _write_npy(base / schema.array_file(schema.IMAGE_SHARD_INDEX), np.int32,
                                                   num_images, index)
        for name, column in ((schema.IMAGE_OFFSETS, schema.IMAGE_OFFSET), (schema.IMAGE_SIZES, schema.IMAGE_SIZE)):
            out[name] = _write_npy(base / schema.array_file(name), np.int64, num_images,
                                   (t[column].to_numpy(zero_copy_only=False).astype(np.int64) for t in image_tables))
        out[schema.LOOKUP_SHARDS] = list(shards)
    return out


def lookups(features_dir: str | Path, split: str) -> dict[str, "RowFile | list[str]"] | None:
    """The split's per-id lookups as RowFiles (read per batch), with the referenced shards' urls; None for features
    written before them (readers then load the tables)."""
    manifest = load_split_manifest(features_dir, split)
    listed = manifest.get(schema.LOOKUPS_KEY) or {}
    if schema.TEXT_OFFSETS not in listed:
        return None
    base = split_dir(features_dir, split)
    found: dict = {name: RowFile(base / entry["path"]) for name, entry in listed.items() if name != schema.LOOKUP_SHARDS}
    expected = {schema.TEXT_OFFSETS: manifest["num_images"] + 1, schema.TEXT_IMAGE_IDS: manifest["num_texts"],
                schema.CAPTION_OFFSETS: manifest["num_texts"] + 1, schema.IMAGE_SHARD_INDEX: manifest["num_images"],
                schema.IMAGE_OFFSETS: manifest["num_images"], schema.IMAGE_SIZES: manifest["num_images"]}
    for name, rows in found.items():
        if name in expected and len(rows) != expected[name]:
            raise ShardError(f"{rows.path}: {len(rows)} rows, but {schema.SPLIT_MANIFEST} implies {expected[name]}; "
                             f"re-run `dsmd extract`")
    if schema.LOOKUP_SHARDS in listed:
        found[schema.LOOKUP_SHARDS] = list(listed[schema.LOOKUP_SHARDS])
    return found


class Captions:
    """The split's captions indexed like a list of str, read per call from schema.CAPTION_UTF8 (nothing per caption
    is held)."""

    def __init__(self, offsets: "RowFile", utf8: "RowFile") -> None:
        self.offsets, self.utf8 = offsets, utf8

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.utf8.path}: caption {index} out of range for {len(self)}")
        lo, hi = self.offsets[index % len(self) : index % len(self) + 2].tolist()
        return self.utf8[lo:hi].tobytes().decode("utf-8")


def _embedding_rows(column: pa.ChunkedArray) -> np.ndarray:
    """An embedding column (fixed-size lists, or lists of them for views) as an array of its storage dtype."""
    array = column.combine_chunks()
    per_row = None
    if pa.types.is_list(array.type) and pa.types.is_fixed_size_list(array.type.value_type):
        per_row = int(np.diff(array.offsets.to_numpy())[0]) if len(array) else 0
        array = array.flatten()
    storage = np.float16 if array.type.value_type == pa.float16() else np.float32
    rows = schema.embeddings_to_numpy(array, storage)
    return rows if per_row is None else rows.reshape(-1, per_row, rows.shape[1])


Rows = "np.ndarray | RowFile"  # indexed by id lists alike: in memory, or read per call


class RowFile:
    """A `.npy` array read by row with `os.pread`: `rows[index]` (any numpy index) costs only the rows asked
    for, and nothing is mapped into the process (a memory map would be: on this kernel each fault maps a
    whole large folio, ~0.5 MB, so 512 scattered rows made 270 MB resident), so resident memory stays
    bounded by what one read returns, whatever the size of the array; the page cache keeps the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0)(handle)
                self.header = handle.tell()
        except (OSError, ValueError) as exc:
            raise ShardError(f"{self.path}: unreadable embedding array ({exc}); re-run `dsmd extract`") from None
        if fortran:
            raise ShardError(f"{self.path}: Fortran-ordered arrays are not supported")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        expected = self.header + self.row_bytes * self.shape[0]
        if os.path.getsize(self.path) < expected:
            raise ShardError(f"{self.path}: shorter than its header says ({os.path.getsize(self.path)} < {expected} bytes)")
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptor
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # rows[ids, inner]: the rows, then the inner index within each
            ids, inner = index
            return self[ids][np.arange(np.size(ids)).reshape(np.shape(ids)), inner]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            stop = max(start, stop)
            data = os.pread(self._descriptor(), (stop - start) * self.row_bytes, self.header + start * self.row_bytes)
            return np.frombuffer(data, self.dtype).reshape(stop - start, *self.row_shape).copy()
        ids = np.asarray(index, dtype=np.int64)
        if ids.size and (ids.min() < -len(self) or ids.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range for {len(self)} rows")
        flat = np.where(ids < 0, ids + len(self), ids).reshape(-1)
        out = np.empty((flat.size, *self.row_shape), self.dtype)
        fd, size, header = self._descriptor(), self.row_bytes, self.header
        for j, i in enumerate(flat.tolist()):
            out[j] = np.frombuffer(os.pread(fd, size, header + i * size), self.dtype).reshape(self.row_shape)
        return out.reshape(ids.shape + tuple(self.row_shape))

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows[start:start + size]) over the whole array: bounded-memory passes."""
        for start in range(0, len(self), size):
            yield start, self[start : start + size]


def embedding_rows(features_dir: str | Path, split: str, column: str) -> RowFile:
    """The split's `<column>.npy` (written by `dsmd extract`), checked against its manifest's row count."""
    manifest = load_split_manifest(features_dir, split)
    entry = (manifest.get("arrays") or {}).get(column)
    if entry is None:
        raise ShardError(f"{split_dir(features_dir, split)}: no {schema.array_file(column)} listed in its "
                         f"{schema.SPLIT_MANIFEST}; re-run `dsmd extract` (features written before schema 2)")
    rows = RowFile(split_dir(features_dir, split) / entry["path"])
    expected = manifest["num_texts"] if column == schema.TEACHER_TEXT_EMB else manifest["num_images"]
    if len(rows) != expected:
        raise ShardError(f"{rows.path}: {len(rows)} rows, but {schema.SPLIT_MANIFEST} lists {expected}")
    return rows


# ---- the embeddings of added teachers: <teachers_dir>/<name>/<split>/, keyed to a features split's ids ---------

def added_teacher_dir(teachers_dir: str | Path, name: str, split: str) -> Path:
    return Path(teachers_dir) / name / split


def write_added_teacher(out: Path, info: dict, image_rows: Iterable[np.ndarray], text_rows: Iterable[np.ndarray],
                        num_images: int, num_texts: int, dim: int, dtype: str,
                        view_rows: Iterable[np.ndarray] | None = None, views: int = 0) -> dict:
    """An added teacher's `<column>.npy` arrays, piece by piece (with `views`, the stored views' (N, views, dim)
    too), then, last, its `_manifest.json` (the split counts as embedded only once that file exists). `info` names
    the teacher and the features fingerprint."""
    arrays = {}
    columns = [(schema.TEACHER_IMAGE_EMB, image_rows, (num_images, dim)), (schema.TEACHER_TEXT_EMB, text_rows, (num_texts, dim))]
    if views:
        columns.append((schema.TEACHER_VIEW_EMB, view_rows, (num_images, views, dim)))
    for column, pieces, shape in columns:
        arrays[column] = _write_npy(out / schema.array_file(column), np.dtype(dtype), shape, pieces)
    manifest = {**info, "num_images": num_images, "num_texts": num_texts, "views": views, "arrays": arrays}
    atomic_write_json(manifest, out / schema.SPLIT_MANIFEST)
    return manifest


def added_teacher_manifest(teachers_dir: str | Path, name: str, split: str) -> dict:
    marker = added_teacher_dir(teachers_dir, name, split) / schema.SPLIT_MANIFEST
    if not marker.exists():
        raise ShardError(f"{marker} not found: teacher {name!r} has not embedded split {split!r}; run "
                         f"`dsmd extract --teacher {name}` (dvc.yaml: extract_teacher@{name})")
    return json.loads(marker.read_text())


def added_teacher_array(teachers_dir: str | Path, name: str, features_dir: str | Path, split: str, column: str) -> RowFile:
    """Added teacher `name`'s `column` (schema.EMBEDDING_ARRAYS) for a features split, read per batch; refused in
    one line when it was embedded from another extraction of the split (its ids would not be these)."""
    base = added_teacher_dir(teachers_dir, name, split)
    manifest = added_teacher_manifest(teachers_dir, name, split)
    if manifest.get(schema.FEATURES_FINGERPRINT) != features_fingerprint(features_dir, split):
        raise ShardError(f"{base}: embedded from another extraction of {split_dir(features_dir, split)} (its "
                         f"{schema.SPLIT_MANIFEST} changed since); re-run `dsmd extract --teacher {name}`")
    entry = manifest["arrays"].get(column)
    if entry is None:
        raise ShardError(f"{base}: teacher {name!r} holds no {schema.array_file(column)} (embedded before views were "
                         f"added); re-run `dsmd extract --teacher {name} --overwrite`")
    array = RowFile(base / entry["path"])
    rows = manifest["num_texts"] if column == schema.TEACHER_TEXT_EMB else manifest["num_images"]
    if len(array) != rows:
        raise ShardError(f"{array.path}: {len(array)} rows, but {schema.SPLIT_MANIFEST} lists {rows}")
    return array


def added_teacher_rows(teachers_dir: str | Path, name: str, features_dir: str | Path, split: str) -> tuple[RowFile, RowFile]:
    """(image rows, text rows) of added teacher `name` for a features split (added_teacher_array)."""
    return (added_teacher_array(teachers_dir, name, features_dir, split, schema.TEACHER_IMAGE_EMB),
            added_teacher_array(teachers_dir, name, features_dir, split, schema.TEACHER_TEXT_EMB))


def added_teacher_view_rows(teachers_dir: str | Path, name: str, features_dir: str | Path, split: str) -> RowFile:
    """Added teacher `name`'s embeddings of the split's stored views, (N, views, D) read per batch."""
    return added_teacher_array(teachers_dir, name, features_dir, split, schema.TEACHER_VIEW_EMB)


def teacher_rows(features_dir: str | Path, split: str, column: str, shares: dict[str, float],
                 teachers_dir: str | Path, scaled: bool = True) -> "RowFile | EnsembleRows":
    """The split's `column` from the teachers of `shares` (name -> share; PRIMARY_TEACHER names the features' own
    teacher, the others are added teachers in `teachers_dir`): the features' own array when `shares` is empty,
    else their EnsembleRows (scaled: the ensemble target; not: side by side)."""
    if not shares:
        return embedding_rows(features_dir, split, column)
    parts = [embedding_rows(features_dir, split, column) if name == PRIMARY_TEACHER else
             added_teacher_array(teachers_dir, name, features_dir, split, column) for name in shares]
    return EnsembleRows(parts, list(shares.values()), scaled)


class EnsembleRows:
    """Several teachers' embeddings of the same ids as one target, indexed like a RowFile: each teacher's unit
    rows scaled by sqrt(share) and concatenated (float32), the shares summing to 1. The target stays a unit vector
    and its cosine between two ids is the share-weighted mean of the teachers' cosines, so every DSMD term that
    reads similarities distils the ensemble's, and the feature term fits one projection to the joint width."""

    def __init__(self, parts: list["Rows"], shares: list[float], scaled: bool = True) -> None:
        """`scaled` False: the teachers' rows side by side as they are (for losses that take each teacher apart)."""
        if len({len(p) for p in parts}) != 1:
            raise ValueError(f"teachers disagree on the number of rows: {[len(p) for p in parts]}")
        total = float(sum(shares))
        self.parts, self.scales = parts, [float(np.sqrt(s / total)) if scaled else 1.0 for s in shares]
        self.widths = [int(p.shape[-1]) for p in parts]  # (rows, D) or, for views, (rows, views, D)
        self.shape = (len(parts[0]), *tuple(parts[0].shape[1:-1]), sum(self.widths))

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return np.concatenate([np.asarray(p[index], np.float32) * c for p, c in zip(self.parts, self.scales)], axis=-1)

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) blocks of `size` rows in order, as RowFile.chunks."""
        for start in range(0, len(self), size):
            yield start, self[start : start + size]


# ---- image bytes: copied, or referenced in the source shards ---------------------------------------

_OPEN_SHARDS = 64


def _shard_file(url: str) -> str:
    """The file of a local shard url (`path`, `file:path`); extract refuses any other kind when referencing."""
    return url[len("file:"):] if url.startswith("file:") else url


class ImageBytes:
    """Each image's encoded bytes by image id. Copied images (`extract.store_images: true`) are held in
    memory; referenced ones are read per call from their source shard at the recorded byte offset."""

    def __init__(self, where: str, copies: list[bytes] | None, shards: list[str] | None = None,
                 shard_index: "Rows | None" = None, offsets: "Rows | None" = None, sizes: "Rows | None" = None,
                 count: int | None = None):
        self.where, self.copies, self.shards = where, copies, shards or []
        self.shard_index, self.offsets, self.sizes = shard_index, offsets, sizes  # arrays, or RowFiles read per image
        self.count = count  # only the first `count` images (None: all)
        self._fds: OrderedDict[int, int] = OrderedDict()  # the most recently read shards' descriptors
        self._pid = -1

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptors
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": -1}

    def _descriptor(self, shard: int) -> int:
        """An open descriptor of `shard`; at most _OPEN_SHARDS stay open (a corpus has thousands of shards)."""
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()  # a forked worker does not share the parent's
        if shard in self._fds:
            self._fds.move_to_end(shard)
        else:
            if len(self._fds) >= _OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def __len__(self) -> int:
        found = len(self.copies) if self.copies is not None else len(self.offsets)
        return found if self.count is None else min(found, self.count)

    def __iter__(self) -> Iterator[bytes]:
        return (self[i] for i in range(len(self)))

    @property
    def referenced(self) -> bool:
        return self.copies is None

    def __getitem__(self, image_id: int) -> bytes:
        if self.copies is not None:
            return self.copies[image_id]
        if not 0 <= image_id < len(self):
            raise IndexError(f"{self.where}: image {image_id} out of range for {len(self)}")
        shard = int(self.shard_index[image_id])
        size = int(self.sizes[image_id])
        data = os.pread(self._descriptor(shard), size, int(self.offsets[image_id]))
        if len(data) != size:
            raise ShardError(f"{self.shards[shard]}: image {image_id} ends past the end of the file; the shard changed "
                             f"since `dsmd extract` referenced it: re-run `dsmd extract`")
        return data


def check_source_shards(features_dir: str | Path, split: str, used: list[str]) -> None:
    """Every source shard the features reference still exists and is the file extracted from: same size and
    mtime, or failing that the same sha256. A shard that vanished or changed is an error naming it."""
    manifest = load_split_manifest(features_dir, split)
    recorded = {part["url"]: part.get("source") or {} for part in manifest.get("shard_parts") or []}
    for url in used:
        path = _shard_file(url)
        if not os.path.isfile(path):
            raise ShardError(f"{path}: the images of features split {split!r} are referenced in this shard, which is gone; "
                             f"restore it or re-run `dsmd extract`")
        source = recorded.get(url, {})
        stat = os.stat(path)
        if (source.get("size"), source.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            continue
        if source.get("sha256") != sha256_file(path):
            raise ShardError(f"{path} changed since `dsmd extract` referenced its images for features split {split!r} "
                             f"(sha256 differs from the one recorded); re-run `dsmd extract`")


def image_bytes(features_dir: str | Path, split: str, count: int | None = None) -> ImageBytes:
    """The images of a features split (the first `count`, or all), copied or referenced."""
    manifest = load_split_manifest(features_dir, split)
    copied = manifest.get("store_images", True)
    found = None if copied else lookups(features_dir, split)
    if found is not None and schema.IMAGE_SHARD_INDEX in found:  # read per image, nothing held per image
        shards = found[schema.LOOKUP_SHARDS]
        check_source_shards(features_dir, split, shards)
        return ImageBytes(str(split_dir(features_dir, split)), None, [_shard_file(s) for s in shards],
                          found[schema.IMAGE_SHARD_INDEX], found[schema.IMAGE_OFFSETS], found[schema.IMAGE_SIZES],
                          count=count)
    columns = [schema.IMAGE_BYTES] if copied else [schema.SOURCE_SHARD, schema.IMAGE_OFFSET, schema.IMAGE_SIZE]
    table = read_images(features_dir, split, columns=columns)
    if count is not None:
        table = table.slice(0, count)
    where = str(split_dir(features_dir, split))
    if copied:
        return ImageBytes(where, table[schema.IMAGE_BYTES].to_pylist())
    encoded = table[schema.SOURCE_SHARD].combine_chunks().dictionary_encode()
    shards = encoded.dictionary.to_pylist()
    check_source_shards(features_dir, split, shards)
    return ImageBytes(
        where, None, [_shard_file(s) for s in shards],
        encoded.indices.to_numpy().astype(np.int32),
        table[schema.IMAGE_OFFSET].to_numpy(zero_copy_only=False).astype(np.int64),
        table[schema.IMAGE_SIZE].to_numpy(zero_copy_only=False).astype(np.int64),
    )
