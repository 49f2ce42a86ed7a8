"""The one place that names every Parquet column, dtype, file name and metadata key.

Writers build their tables with the schema functions here; readers use the constants and the
`embeddings_to_numpy` / `read_metadata` helpers. Nothing else in the project spells a column name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: images referenced by offset (IMAGE_BYTES nullable), embeddings also as .npy

# ---- file layout ------------------------------------------------------------------------------
# features/<split>/images-<shard>.parquet, texts-<shard>.parquet, _manifest.json
IMAGES_PREFIX = "images"
TEXTS_PREFIX = "texts"
SPLIT_MANIFEST = "_manifest.json"
PARTS_DIR = "_parts"  # per-input-shard results before dense ids are assigned (resume unit)
# features/<split>/<column>.npy: the split's embeddings of EMBEDDING_ARRAYS in id order, the storage dtype,
# (N, D) / (M, D) / (N, K, D), so stage two and mining read rows by position without loading the split
EMBEDDING_ARRAYS = ("teacher_image_emb", "teacher_text_emb", "teacher_view_emb")
# features/<split>/<name>.npy: the per-id lookups stage two reads per batch, so that no rank holds anything per
# image or caption (listed under the manifest's "lookups"; features without them are read whole). Texts are stored
# grouped by image in id order, so image i's captions are the text ids TEXT_OFFSETS[i] .. TEXT_OFFSETS[i + 1] - 1.
TEXT_OFFSETS = "text_offsets"  # (N + 1,) int64
TEXT_IMAGE_IDS = "text_image_ids"  # (M,) int64, the IMAGE_ID of each text id
CAPTION_OFFSETS = "caption_offsets"  # (M + 1,) int64: caption t is CAPTION_UTF8[CAPTION_OFFSETS[t]:CAPTION_OFFSETS[t + 1]]
CAPTION_UTF8 = "caption_utf8"  # (bytes,) uint8, every caption's UTF-8 in text id order
IMAGE_SHARD_INDEX = "image_shard_index"  # (N,) int32, position in the manifest's "lookups" shards list (referenced images)
IMAGE_OFFSETS = "image_offsets"  # (N,) int64, IMAGE_OFFSET of each image id (referenced images)
IMAGE_SIZES = "image_sizes"  # (N,) int64, IMAGE_SIZE of each image id (referenced images)
FEATURES_FINGERPRINT = "features_fingerprint"  # an added teacher's manifest key: the features split it embedded
LOOKUPS_KEY = "lookups"  # manifest key: {name: {"path", "sha256"}, "shards": [url, ...]}
LOOKUP_SHARDS = "shards"


def array_file(column: str) -> str:
    return f"{column}.npy"


# negatives/<split>/<direction>.parquet, _manifest.json
NEIGHBOR_DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
# features/zeroshot/<task>/images.parquet (+ LABEL), prompts.parquet, _manifest.json
ZEROSHOT_DIR = "zeroshot"
ZEROSHOT_IMAGES_FILE = "images.parquet"
ZEROSHOT_PROMPTS_FILE = "prompts.parquet"

# ---- columns ----------------------------------------------------------------------------------
IMAGE_ID = "image_id"  # int64, dense 0..N-1 within a split
TEXT_ID = "text_id"  # int64, dense 0..M-1 within a split
KEY = "key"  # string, the sample's key in the source WebDataset
SOURCE_SHARD = "source_shard"  # string, the input shard the sample came from
IMAGE_BYTES = "image_bytes"  # binary, the encoded image exactly as stored in the source; null when referenced
# where the image member's data lies in SOURCE_SHARD (an uncompressed local tar; null otherwise): with
# extract.store_images false, stage two reads IMAGE_SIZE bytes at IMAGE_OFFSET instead of a copy
IMAGE_OFFSET = "image_offset"  # int64
IMAGE_SIZE = "image_size"  # int64
IMAGE_FORMAT = "image_format"  # string, the source extension (jpg, png, webp)
CAPTION = "caption"  # string
CAPTION_INDEX = "caption_index"  # int32, position of the caption within its sample
TEACHER_IMAGE_EMB = "teacher_image_emb"  # fixed_size_list<float16|float32>[D], L2-normalised
TEACHER_TEXT_EMB = "teacher_text_emb"  # fixed_size_list<float16|float32>[D], L2-normalised
TEACHER_VIEW_EMB = "teacher_view_emb"  # list<fixed_size_list<..>[D]>, one per augmented view
VIEW_PARAMS = "view_params"  # list<struct<VIEW_PARAM_FIELDS>>, one per augmented view
LABEL = "label"  # int32, class index of a zero-shot classification image (CLIP_benchmark's .cls)
CLASS_INDEX = "class_index"  # int32, the class a prompt names
TEMPLATE_INDEX = "template_index"  # int32, the template a prompt was made with
PROMPT = "prompt"  # string, template.format(c=classname)
NEIGHBOR_IDS = "neighbor_ids"  # list<int64>, best first
NEIGHBOR_SCORES = "neighbor_scores"  # list<float32>, teacher cosine, best first

# Augmentation view: crop box as fractions of the source image, then optional horizontal flip.
# Fractions keep a view meaningful at any model resolution (teacher and student may differ).
VIEW_PARAM_FIELDS = (
    ("crop_top", pa.float32()),
    ("crop_left", pa.float32()),
    ("crop_height", pa.float32()),
    ("crop_width", pa.float32()),
    ("hflip", pa.bool_()),
)

# ---- key-value metadata (bytes keys, JSON-encoded or plain string values) ---------------------
META_SCHEMA_VERSION = b"dsmd.schema_version"
META_KIND = b"dsmd.kind"  # images | texts | neighbors
META_SPLIT = b"dsmd.split"
META_TEACHER = b"dsmd.teacher"  # JSON: teacher identity (see pipeline.models.teacher_identity)
META_MANIFEST_SHA256 = b"dsmd.manifest_sha256"
META_EMBEDDING_DIM = b"dsmd.embedding_dim"
META_EMBEDDING_DTYPE = b"dsmd.embedding_dtype"
META_VIEWS = b"dsmd.views"
META_DIRECTION = b"dsmd.direction"  # i2t | t2i | i2i | t2t
META_FEATURES_FINGERPRINT = b"dsmd.features_fingerprint"  # sha256 of the features _manifest.json
META_MINE_PARAMS = b"dsmd.mine_params"  # JSON

EMBEDDING_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embedding_type(dim: int, dtype: str) -> pa.DataType:
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
    return pa.list_(EMBEDDING_DTYPES[dtype], dim)


def view_params_type() -> pa.DataType:
    return pa.struct([pa.field(name, t) for name, t in VIEW_PARAM_FIELDS])


def images_schema(dim: int, dtype: str = "float16", views: int = 0, metadata: dict | None = None) -> pa.Schema:
    fields = [
        pa.field(IMAGE_ID, pa.int64(), nullable=False),
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SOURCE_SHARD, pa.string(), nullable=False),
        pa.field(IMAGE_FORMAT, pa.string(), nullable=False),
        pa.field(IMAGE_BYTES, pa.binary(), nullable=True),
        pa.field(IMAGE_OFFSET, pa.int64(), nullable=True),
        pa.field(IMAGE_SIZE, pa.int64(), nullable=True),
        pa.field(TEACHER_IMAGE_EMB, embedding_type(dim, dtype), nullable=False),
    ]
    if views:
        fields.append(pa.field(TEACHER_VIEW_EMB, pa.list_(embedding_type(dim, dtype)), nullable=False))
        fields.append(pa.field(VIEW_PARAMS, pa.list_(view_params_type()), nullable=False))
    return pa.schema(fields, metadata=encode_metadata(metadata or {}))


def texts_schema(dim: int, dtype: str = "float16", metadata: dict | None = None) -> pa.Schema:
    return pa.schema(
        [
            pa.field(TEXT_ID, pa.int64(), nullable=False),
            pa.field(IMAGE_ID, pa.int64(), nullable=False),
            pa.field(CAPTION_INDEX, pa.int32(), nullable=False),
            pa.field(CAPTION, pa.string(), nullable=False),
            pa.field(TEACHER_TEXT_EMB, embedding_type(dim, dtype), nullable=False),
        ],
        metadata=encode_metadata(metadata or {}),
    )


def neighbors_schema(direction: str, metadata: dict | None = None) -> pa.Schema:
    """i2t / i2i are keyed by image_id, t2i / t2t by text_id."""
    if direction not in NEIGHBOR_DIRECTIONS:
        raise ValueError(f"direction must be one of {NEIGHBOR_DIRECTIONS}, got {direction!r}")
    key = IMAGE_ID if direction[0] == "i" else TEXT_ID
    return pa.schema(
        [
            pa.field(key, pa.int64(), nullable=False),
            pa.field(NEIGHBOR_IDS, pa.list_(pa.int64()), nullable=False),
            pa.field(NEIGHBOR_SCORES, pa.list_(pa.float32()), nullable=False),
        ],
        metadata=encode_metadata({**(metadata or {}), META_DIRECTION: direction}),
    )


def neighbor_key_column(direction: str) -> str:
    return IMAGE_ID if direction[0] == "i" else TEXT_ID


def encode_metadata(metadata: dict) -> dict[bytes, bytes]:
    out = {META_SCHEMA_VERSION: SCHEMA_VERSION.encode()}
    for k, v in metadata.items():
        key = k if isinstance(k, bytes) else k.encode()
        if isinstance(v, bytes):
            out[key] = v
        elif isinstance(v, str):
            out[key] = v.encode()
        else:
            out[key] = json.dumps(v, sort_keys=True).encode()
    return out


def read_metadata(schema: pa.Schema, key: bytes, default: Any = None, as_json: bool = False) -> Any:
    raw = (schema.metadata or {}).get(key)
    if raw is None:
        return default
    text = raw.decode()
    return json.loads(text) if as_json else text


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A fixed_size_list embedding column -> (N, D) array, without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(dtype, copy=False)


def numpy_to_embeddings(array: np.ndarray, dtype: str) -> pa.Array:
    """(N, D) float array -> fixed_size_list column of the requested storage dtype."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    array = np.ascontiguousarray(array, dtype=np_dtype)
    n, dim = array.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), type=EMBEDDING_DTYPES[dtype]), dim)


def _per_row(values: pa.Array, per_row: int) -> pa.Array:
    """A flat array of N * per_row values -> a list column of N rows of `per_row` values."""
    rows = len(values) // per_row if per_row else 0
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * per_row + 1, per_row, dtype=np.int32)), values)


def images_table(
    keys: list[str], source_shards: list[str], image_formats: list[str], image_bytes: list[bytes | None],
    teacher_image_emb: np.ndarray, dtype: str = "float16", metadata: dict | None = None,
    teacher_view_emb: np.ndarray | None = None, view_params: list[dict] | None = None,
    image_offsets: list[int | None] | None = None, image_sizes: list[int | None] | None = None,
) -> pa.Table:
    """The images table with dense ids 0..N-1. With views: `teacher_view_emb` (N, K, D) and
    `view_params`, N * K dicts of VIEW_PARAM_FIELDS in row order. A referenced image has bytes None
    and its offset and size in its source shard."""
    n, dim = teacher_image_emb.shape
    columns = {
        IMAGE_ID: pa.array(np.arange(n), pa.int64()),
        KEY: pa.array(keys, pa.string()),
        SOURCE_SHARD: pa.array(source_shards, pa.string()),
        IMAGE_FORMAT: pa.array(image_formats, pa.string()),
        IMAGE_BYTES: pa.array(image_bytes, pa.binary()),
        IMAGE_OFFSET: pa.array(image_offsets if image_offsets is not None else [None] * n, pa.int64()),
        IMAGE_SIZE: pa.array(image_sizes if image_sizes is not None else [None] * n, pa.int64()),
        TEACHER_IMAGE_EMB: numpy_to_embeddings(teacher_image_emb, dtype),
    }
    views = 0 if teacher_view_emb is None else teacher_view_emb.shape[1]
    if views:
        columns[TEACHER_VIEW_EMB] = _per_row(numpy_to_embeddings(teacher_view_emb.reshape(-1, dim), dtype), views)
        columns[VIEW_PARAMS] = _per_row(pa.array(view_params, view_params_type()), views)
    return pa.Table.from_pydict(columns, schema=images_schema(dim, dtype, views, {**(metadata or {}), META_KIND: "images"}))


def texts_table(
    text_image_ids: np.ndarray, caption_index: np.ndarray, captions: list[str], teacher_text_emb: np.ndarray,
    dtype: str = "float16", metadata: dict | None = None,
) -> pa.Table:
    """The texts table with dense ids 0..M-1."""
    m, dim = teacher_text_emb.shape
    return pa.Table.from_pydict(
        {
            TEXT_ID: pa.array(np.arange(m), pa.int64()),
            IMAGE_ID: pa.array(np.asarray(text_image_ids), pa.int64()),
            CAPTION_INDEX: pa.array(np.asarray(caption_index), pa.int32()),
            CAPTION: pa.array(captions, pa.string()),
            TEACHER_TEXT_EMB: numpy_to_embeddings(teacher_text_emb, dtype),
        },
        schema=texts_schema(dim, dtype, {**(metadata or {}), META_KIND: "texts"}),
    )


def labelled_images_table(images: pa.Table, labels: np.ndarray) -> pa.Table:
    """A zero-shot task's images: the images table (no views) plus each image's class index."""
    return images.append_column(pa.field(LABEL, pa.int32(), nullable=False), pa.array(np.asarray(labels), pa.int32()))


def prompts_table(
    class_index: np.ndarray, template_index: np.ndarray, prompts: list[str], teacher_text_emb: np.ndarray,
    dtype: str = "float16", metadata: dict | None = None,
) -> pa.Table:
    """A zero-shot task's prompts (every template for every class) with the teacher's embeddings."""
    dim = teacher_text_emb.shape[1]
    fields = [
        pa.field(CLASS_INDEX, pa.int32(), nullable=False),
        pa.field(TEMPLATE_INDEX, pa.int32(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(TEACHER_TEXT_EMB, embedding_type(dim, dtype), nullable=False),
    ]
    return pa.Table.from_arrays(
        [pa.array(np.asarray(class_index), pa.int32()), pa.array(np.asarray(template_index), pa.int32()),
         pa.array(prompts, pa.string()), numpy_to_embeddings(teacher_text_emb, dtype)],
        schema=pa.schema(fields, metadata=encode_metadata({**(metadata or {}), META_KIND: "prompts"})),
    )


# ---- zero-shot tasks: where extraction writes them and how their prompts are laid out ----------------
def task_dir(features_dir: str | Path, task: str) -> Path:
    """A zero-shot task's folder inside the features (images.parquet, prompts.parquet, _manifest.json)."""
    return Path(features_dir) / ZEROSHOT_DIR / task


def list_tasks(features_dir: str | Path) -> list[str]:
    """The finished tasks in `features_dir` (those with a `_manifest.json`), sorted."""
    root = Path(features_dir) / ZEROSHOT_DIR
    return sorted(p.parent.name for p in root.glob(f"*/{SPLIT_MANIFEST}")) if root.is_dir() else []


def prompts_for(classnames: list[str], templates: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(class_index, template_index, prompt) of every template for every class, class-major."""
    pairs = [(c, t) for c in range(len(classnames)) for t in range(len(templates))]
    prompts = [templates[t].format(c=classnames[c]) for c, t in pairs]
    return np.array([c for c, _ in pairs], np.int32), np.array([t for _, t in pairs], np.int32), prompts
