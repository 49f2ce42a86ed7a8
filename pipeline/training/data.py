"""Training data: the cached shards (or the corpus) as a map-style dataset, and the batch samplers.

The dataset is indexed by `(epoch, image_id)` keys, so everything random about a sample is a pure
function of `(seed, epoch, image_id)`: which of its captions is used this epoch, and which stored
augmentation view (or the plain image) is re-applied. Samplers are pure functions of
`(seed, epoch)` too, which is what lets a resumed or multi-rank run see exactly the batches an
uninterrupted single-process run sees. Teacher embeddings and mined negatives are looked up by
image / text id, never by batch position.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.common.config import ConfigError
from pipeline.common.errors import PipelineError
from pipeline.common.params import Batching
from pipeline.corpus.augment import apply_view, CorruptImageError, decode_image, preprocess_batch
from pipeline.features import schema, store
from pipeline.training.losses import MINED_DIRECTIONS

log = logging.getLogger(__name__)

BATCHING_MODES = tuple(m.value for m in Batching)

# Keys of one sample / one collated batch (in-memory only; Parquet columns live in pipeline.schema).
IMAGE = "image"  # (3, H, W) float, the student's preprocessing
TEXT = "text"  # (context_length,) int64 tokens, the student's tokenizer
IMAGE_ID = "image_ids"
TEXT_ID = "text_ids"
VIEW_INDEX = "view_index"  # -1 = the plain image, else the stored view re-applied
TEACHER_IMAGE = "teacher_image"  # (D,) the teacher embedding of exactly what the student sees
TEACHER_TEXT = "teacher_text"
# Mined negatives (`dsmd mine`), by the direction they were mined in (losses.MINED_DIRECTIONS): the teacher's
# embeddings of each sample's H hardest negatives (H, D) and the image each belongs to (H,), -1 = padding.
# The batch carries them as flat tensors (collated and gathered like every target); losses.Mined groups them.
MINED = {direction: (f"mined_{direction}", f"mined_{direction}_owner") for direction in MINED_DIRECTIONS}
MINED_KEYS = tuple(key for pair in MINED.values() for key in pair)


class DataError(PipelineError):
    """Training data that cannot be used as configured; the message names the file or option."""


Rows = Union[np.ndarray, store.RowFile]  # indexed by id lists alike: in memory, or read per batch


@dataclass
class TrainingData:
    """One split, indexed by dense image id / text id. Image bytes stay encoded (decoded lazily per
    sample) and are read per sample when referenced; teacher embeddings are kept in their storage dtype,
    in memory or read per batch from the split's .npy files (streaming)."""

    source: str  # the directory or manifest it came from, for messages
    image_bytes: Sequence[bytes]  # a list, or store.ImageBytes (copied or referenced)
    captions: Sequence[str]  # a list, Strings (one Arrow buffer) or store.Captions (read per call)
    text_to_image: Rows  # (M,) int64
    teacher_image: Optional[Rows] = None  # (N, D)
    teacher_text: Optional[Rows] = None  # (M, D)
    teacher_views: Optional[Rows] = None  # (N, K, D)
    teacher_widths: Optional[list[int]] = None  # several teachers side by side: each one's width (D = their sum)
    view_params: Optional[list[list[dict]]] = None  # N lists of K view dicts (pipeline.augment)
    skipped: dict = field(default_factory=dict)  # reason -> count, from the source
    # the captions of image i are texts_by_image[text_offsets[i]:text_offsets[i + 1]]; given with text_to_image as
    # the features' lookups (read per call: texts grouped by image, texts_by_image None = the identity), or derived
    # here from text_to_image in memory
    text_offsets: Optional[Rows] = None  # (N + 1,) int64
    texts_by_image: Optional[np.ndarray] = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.text_offsets is not None:
            return
        self.text_to_image = np.asarray(self.text_to_image, dtype=np.int64)
        n = len(self.image_bytes)
        if len(self.text_to_image) and (self.text_to_image.min() < 0 or self.text_to_image.max() >= n):
            raise DataError(f"{self.source}: captions refer to image ids outside 0..{n - 1}")
        self.texts_by_image = np.argsort(self.text_to_image, kind="stable")
        counts = np.bincount(self.text_to_image, minlength=n)
        self.text_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def num_images(self) -> int:
        return len(self.image_bytes)

    @property
    def num_views(self) -> int:
        return 0 if not self.view_params else len(self.view_params[0])

    @property
    def embedding_dim(self) -> Optional[int]:
        return None if self.teacher_image is None else int(self.teacher_image.shape[1])

    def captions_of(self, image_id: int) -> np.ndarray:
        lo, hi = (int(v) for v in self.text_offsets[image_id : image_id + 2])
        return np.arange(lo, hi) if self.texts_by_image is None else self.texts_by_image[lo:hi]

    def trainable_image_ids(self) -> "np.ndarray | ImageRange":
        """Images with at least one caption (an image without one cannot form a pair), read in chunks when the
        offsets are on disk: an ImageRange when that is every image (the usual case: nothing held), else int32."""
        dtype = id_dtype(self.num_images)
        pieces, chunk = [], 1 << 22
        for start in range(0, self.num_images, chunk):
            offsets = np.asarray(self.text_offsets[start : min(start + chunk, self.num_images) + 1])
            pieces.append((np.flatnonzero(np.diff(offsets) > 0) + start).astype(dtype))
        if sum(map(len, pieces)) == self.num_images:
            return ImageRange(self.num_images)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def id_dtype(count: int) -> type:
    """int32 ids where they fit (what a rank holds per image for the batch order is then 4 bytes)."""
    return np.int32 if count < 2**31 else np.int64


class ImageRange:
    """The image ids 0 .. n - 1 without holding them: indexed and converted like the array it stands for."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice) and index.indices(self.n)[0::2] == (0, 1):
            return ImageRange(index.indices(self.n)[1])
        return np.asarray(self)[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.arange(self.n, dtype=dtype or id_dtype(self.n))


def embeddings_bytes(features_dir: str | Path, split: str) -> int:
    """Size of the split's embedding arrays: what loading them into memory would cost."""
    manifest = store.load_split_manifest(features_dir, split)
    base = store.split_dir(features_dir, split)
    return sum((base / entry["path"]).stat().st_size for entry in (manifest.get("arrays") or {}).values())


class Strings:
    """An Arrow string array indexed like a list of str: the split's captions in one buffer."""

    def __init__(self, array: pa.Array) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> str:
        return self.array[int(index)].as_py()


def load_shards_data(features_dir: str | Path, split: str, with_teacher: bool = True, with_views: bool = True,
                     stream: bool = False, teachers: Optional[dict[str, float]] = None,
                     teachers_dir: str | Path = "", teachers_scaled: bool = True) -> TrainingData:
    """Read a features split: captions and the images (copied bytes, or references read per sample), and
    (with_teacher) the teacher embeddings and (with_views, when stored) the augmentation views: loaded
    whole, or with `stream` read per batch from the split's .npy files. Only the columns needed are read.
    Without the teacher the views come without their embeddings: the CLIP-only student sees the same images
    as the distilled one. `teachers` (name -> share; `teacher` = the features' own, other names in
    `teachers_dir`) makes the teacher embeddings one ensemble target (store.EnsembleRows; with `teachers_scaled`
    False the teachers' unit rows side by side, for losses that take each teacher apart)."""
    manifest = store.load_split_manifest(features_dir, split)
    ensemble = _Teachers(teachers or {}, teachers_dir, teachers_scaled)
    stored_views = int(manifest.get("views", 0) or 0)
    with_views = with_views and stored_views > 0
    found = store.lookups(features_dir, split)
    if found is not None:  # nothing per image or caption held: every lookup is read per batch
        data = TrainingData(
            source=str(store.split_dir(features_dir, split)),
            image_bytes=store.image_bytes(features_dir, split),
            captions=store.Captions(found[schema.CAPTION_OFFSETS], found[schema.CAPTION_UTF8]),
            text_to_image=found[schema.TEXT_IMAGE_IDS],
            text_offsets=found[schema.TEXT_OFFSETS],
            skipped=dict(manifest.get("skipped", {}) or {}),
        )
        view_params = (store.read_images(features_dir, split, columns=[schema.VIEW_PARAMS])[schema.VIEW_PARAMS].to_pylist()
                       if with_views else None)
        return _with_embeddings(data, features_dir, split, manifest, with_teacher, view_params, stream, ensemble)
    image_columns = [schema.IMAGE_ID] + ([schema.VIEW_PARAMS] if with_views else [])
    text_columns = [schema.TEXT_ID, schema.IMAGE_ID, schema.CAPTION]
    images = store.read_images(features_dir, split, columns=image_columns)
    texts = store.read_texts(features_dir, split, columns=text_columns)
    where = store.split_dir(features_dir, split)
    image_ids = images[schema.IMAGE_ID].to_numpy()
    text_ids = texts[schema.TEXT_ID].to_numpy()
    if not (np.array_equal(image_ids, np.arange(len(image_ids))) and np.array_equal(text_ids, np.arange(len(text_ids)))):
        raise DataError(f"{where}: ids are not dense and ordered; re-run `dsmd extract`")
    data = TrainingData(
        source=str(where),
        image_bytes=store.image_bytes(features_dir, split),
        captions=Strings(texts[schema.CAPTION].combine_chunks()),
        text_to_image=texts[schema.IMAGE_ID].to_numpy(),
        skipped=dict(manifest.get("skipped", {}) or {}),
    )
    view_params = images[schema.VIEW_PARAMS].to_pylist() if with_views else None
    del images, texts
    pa.default_memory_pool().release_unused()  # the tables' buffers, not kept by the pool for later
    if len(data.image_bytes) != len(image_ids):
        raise DataError(f"{where}: {len(data.image_bytes)} images but {len(image_ids)} image rows; re-run `dsmd extract`")
    return _with_embeddings(data, features_dir, split, manifest, with_teacher, view_params, stream, ensemble)


@dataclass
class _Teachers:
    """Which teachers' embeddings a split is read with (store.teacher_rows): name -> share, {} = the features' own."""

    shares: dict[str, float]
    teachers_dir: str | Path
    scaled: bool = True


def _with_embeddings(data: TrainingData, features_dir, split: str, manifest: dict, with_teacher: bool,
                     view_params: Optional[list], stream: bool, teachers: Optional[_Teachers] = None) -> TrainingData:
    """`data` with the teacher embeddings (whole, or with `stream` read per batch) and the stored views."""
    where = store.split_dir(features_dir, split)
    stored_views = int(manifest.get("views", 0) or 0)
    with_views = view_params is not None
    teachers = teachers or _Teachers({}, "")

    def rows(column: str) -> Rows:
        found = store.teacher_rows(features_dir, split, column, teachers.shares, teachers.teachers_dir, teachers.scaled)
        if column == schema.TEACHER_IMAGE_EMB and teachers.shares:
            data.teacher_widths = found.widths
        return found if stream else found[:]

    if with_teacher:
        data.teacher_image, data.teacher_text = rows(schema.TEACHER_IMAGE_EMB), rows(schema.TEACHER_TEXT_EMB)
    if with_teacher and not teachers.shares:
        dim = int(manifest.get("embedding_dim", data.teacher_image.shape[1]))
        if data.teacher_image.shape[1] != dim or data.teacher_text.shape[1] != dim:
            raise DataError(f"{where}: embedding width differs from _manifest.json embedding_dim {dim}")
    if with_views:
        if with_teacher:
            data.teacher_views = rows(schema.TEACHER_VIEW_EMB)
            if data.teacher_views.shape[1:] != (stored_views, data.teacher_image.shape[1]):
                raise DataError(f"{where}: expected {stored_views} views per image, found shape {data.teacher_views.shape}")
        if any(len(views) != stored_views for views in view_params):
            raise DataError(f"{where}: expected {stored_views} views per image in {schema.VIEW_PARAMS}")
        data.view_params = view_params
    return data


def load_corpus_data(manifest_path: str | Path, split: str) -> TrainingData:
    """A corpus split (WebDataset shards of a manifest) with all captions and no teacher embeddings;
    undecodable images are counted as `corrupt_image` and skipped, never silently."""
    from pipeline.corpus import reader, manifest as manifest_mod  # only the corpus source needs them

    manifest = manifest_mod.load_manifest(manifest_path)
    entry = manifest.split(split)
    report = reader.SkipReport()
    image_bytes: list[bytes] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    for sample in reader.iter_samples(entry.shards, manifest.fields, report):
        try:
            decode_image(sample.image_bytes)
        except CorruptImageError as exc:
            log.debug("%s:%s: %s", sample.shard, sample.key, exc)
            report.add(reader.CORRUPT_IMAGE, sample.shard, sample.key)
            continue
        if not sample.captions:
            report.add(reader.EMPTY_CAPTION, sample.shard, sample.key)
            continue
        captions.extend(sample.captions)
        text_to_image.extend([len(image_bytes)] * len(sample.captions))
        image_bytes.append(sample.image_bytes)
    report.log(log)
    if not image_bytes:
        raise DataError(f"{manifest_path}: split {split!r} has no usable samples")
    return TrainingData(
        source=f"{manifest_path}:{split}",
        image_bytes=image_bytes,
        captions=captions,
        text_to_image=np.asarray(text_to_image, dtype=np.int64),
        skipped=report.to_dict(),
    )


@dataclass
class MinedNegatives:
    """The first `count` mined neighbours of every image (i2t, i2i) and of every caption (t2t, t2i), by direction:
    read per batch from `dsmd mine`'s `<direction>.ids.npy` (memory does not grow with the corpus), or held whole
    for negatives mined before those files existed. `rows(direction, ids)` gives (len(ids), count), -1 padded."""

    count: int
    lists: dict[str, Rows]  # direction -> (keys, k) ids
    allowed: Optional[np.ndarray] = None  # (N,) bool: with train.max_images, the images that may be negatives

    def rows(self, direction: str, ids: np.ndarray) -> np.ndarray:
        found = self.lists[direction][ids]
        out = np.full((len(ids), self.count), -1, dtype=np.int64)
        width = min(self.count, found.shape[1])
        out[:, :width] = found[:, :width]
        return out


def read_i2i(negatives_dir: str | Path, split: str, data: TrainingData, features_dir: str | Path | None = None,
             count: int = 16) -> np.ndarray:
    """The first `count` mined i2i neighbours of every image, (N, count) int32, -1 padded, in memory (for
    hard-negative-aware batching, which orders a whole epoch at once)."""
    return _read_direction(negatives_dir, split, "i2i", data.num_images, data.num_images, features_dir, count)


_KEYS_TARGETS = {"i2t": ("images", "texts"), "i2i": ("images", "images"), "t2t": ("texts", "texts"), "t2i": ("texts", "images")}


def load_negatives(negatives_dir: str | Path, split: str, data: TrainingData, count: int,
                   features_dir: str | Path | None = None) -> MinedNegatives:
    """Mined negatives for the hard-negative loss, checked against the features they were mined from."""
    sizes = {"images": data.num_images, "texts": len(data.captions)}
    lists: dict[str, Rows] = {}
    for direction, (keys, targets) in _KEYS_TARGETS.items():
        _check_mined_from(negatives_dir, split, direction, features_dir)
        found = store.neighbor_rows(negatives_dir, split, direction)
        if found is None:  # mined before the .ids.npy files: read whole, and checked whole
            found = _read_direction(negatives_dir, split, direction, sizes[keys], sizes[targets], None, count)
        elif len(found) != sizes[keys]:
            raise DataError(f"{found.path}: {len(found)} rows, but the features split has {sizes[keys]} {keys}; "
                            f"re-run `dsmd mine`")
        lists[direction] = found
    pa.default_memory_pool().release_unused()  # the Parquet batches read
    return MinedNegatives(count=count, lists=lists)


def restrict_negatives(negatives: MinedNegatives, image_ids: np.ndarray, num_images: int) -> MinedNegatives:
    """The mined lists with every neighbour outside `image_ids` (an image, or a caption of one) made
    padding when looked up: a student trained on a subset sees no teacher embedding of the rest."""
    allowed = np.zeros(num_images, dtype=bool)
    allowed[np.asarray(image_ids)] = True
    return MinedNegatives(count=negatives.count, lists=negatives.lists, allowed=allowed)


def _check_mined_from(negatives_dir, split, direction, features_dir) -> None:
    """The negatives must come from this extraction of the split (the features fingerprint they record)."""
    path = store.neighbors_path(negatives_dir, split, direction)
    if not path.exists():
        raise DataError(f"{path} not found: run `dsmd mine` for split {split!r} first")
    if features_dir is None:
        return
    mined_from = schema.read_metadata(pq.read_schema(path), schema.META_FEATURES_FINGERPRINT)
    current = store.features_fingerprint(features_dir, split)
    if mined_from is not None and mined_from != current:
        raise DataError(
            f"{path} was mined from another extraction of split {split!r} (features fingerprint "
            f"{mined_from[:12]} != {current[:12]}); re-run `dsmd mine`"
        )


def _read_direction(negatives_dir, split, direction, num_keys, num_targets, features_dir, count: int) -> np.ndarray:
    """The first `count` neighbours of every key, in memory (bounded by count), checked against the features."""
    _check_mined_from(negatives_dir, split, direction, features_dir)
    path = store.neighbors_path(negatives_dir, split, direction)
    ids = store.read_neighbor_ids(negatives_dir, split, direction, count)
    if len(ids) != num_keys:
        raise DataError(f"{path}: {len(ids)} rows, but the features split has {num_keys} keys; re-run `dsmd mine`")
    if ids.size and ids.max() >= num_targets:
        raise DataError(f"{path}: neighbour id {int(ids.max())} is outside the split (0..{num_targets - 1}); re-run `dsmd mine`")
    return ids


def sample_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator behind every per-sample choice: a pure function of (seed, epoch, image_id)."""
    return np.random.default_rng((seed, epoch, image_id))


# Captions whose tokens TrainingDataset keeps per loader worker. Each is kept packed (below): ~100 bytes for a
# 15-token caption where the tokenizer's (77,) int64 row and its tensor took ~800, so the full cache is ~25 MiB.
TOKEN_CACHE_TEXTS = 2**18
# Bytes of prepared images (decoded, the stored view re-applied, resized: all but the trailing ToTensor +
# Normalize) TrainingDataset keeps per loader worker. A target split this small is prepared once, not once per
# epoch: the demo's 2,000 images x (plain + 4 views) at 64 px take 160 MiB, and decoding and resizing were over
# half of a CPU batch's loading time. A larger corpus fills it with the first images drawn, the rest per batch.
IMAGE_CACHE_BYTES = 256 * 2**20


def pack_tokens(row: torch.Tensor) -> bytes:
    """A tokenised caption without its padding: int32 [padding value, tokens up to the last non-padding one]
    (the padding is whatever fills the row's end: 0 for open_clip's tokenizer, pad_token_id for HF ones)."""
    values = row.numpy().astype(np.int32)
    kept = np.flatnonzero(values != values[-1])
    return np.concatenate([values[-1:], values[: kept[-1] + 1 if len(kept) else 0]]).tobytes()


def unpack_tokens(packed: bytes, length: int) -> np.ndarray:
    """The (length,) int64 row `pack_tokens` was given."""
    values = np.frombuffer(packed, dtype=np.int32)
    row = np.full(length, values[0], dtype=np.int64)
    row[: len(values) - 1] = values[1:]
    return row


class TrainingDataset(torch.utils.data.Dataset):
    """Map-style over `(epoch, image_id)` keys: one caption of the image (drawn per epoch), the
    image decoded, with a stored view re-applied when one is drawn, then the student's preprocessing;
    the matching teacher embeddings and mined negatives when the data has them."""

    def __init__(
        self,
        data: TrainingData,
        preprocess: Callable,
        tokenizer: Callable,
        seed: int = 0,
        use_views: bool = True,
        negatives: Optional[MinedNegatives] = None,
    ) -> None:
        self.data = data
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.use_views = use_views and data.num_views > 0
        self.negatives = negatives
        self._token_rows: dict[int, bytes] = {}  # text id -> pack_tokens
        self._token_length = 0
        # open_clip's preprocess ends in ToTensor + Normalize, run on the whole batch (preprocess_batch); what comes
        # before them depends only on the image and its view, so its result is kept (another preprocess: nothing kept)
        steps = list(getattr(preprocess, "transforms", ()))
        standard = len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)
        self._prepare = T.Compose(steps[:-2]) if standard else None
        self._finish = T.Compose(steps[-2:]) if standard else preprocess
        self._prepared: dict[tuple[int, int], Image.Image] = {}  # (image id, view) -> prepared, up to IMAGE_CACHE_BYTES
        self._prepared_bytes = 0

    def __len__(self) -> int:
        return self.data.num_images

    def choose(self, epoch: int, image_id: int) -> tuple[int, int]:
        """(text_id, view_index) used for `image_id` in `epoch`; view_index -1 is the plain image."""
        rng = sample_rng(self.seed, epoch, image_id)
        texts = self.data.captions_of(image_id)
        if len(texts) == 0:
            raise DataError(f"{self.data.source}: image {image_id} has no caption")
        text_id = int(texts[rng.integers(len(texts))])
        view = int(rng.integers(self.data.num_views + 1)) - 1 if self.use_views else -1
        return text_id, view

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """One sample (the batch path below with a batch of one)."""
        batch = self.__getitems__([key])
        return {k: (v[0].item() if v.ndim == 1 and k in (IMAGE_ID, TEXT_ID, VIEW_INDEX) else v[0]) for k, v in batch.items()}

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """A whole micro-batch at once (the DataLoader calls this with the sampler's keys): images one
        by one, but captions tokenised together and every id lookup vectorised."""
        image_ids = np.fromiter((int(k[1]) for k in keys), dtype=np.int64, count=len(keys))
        chosen = np.array([self.choose(int(epoch), int(image_id)) for epoch, image_id in keys], dtype=np.int64).reshape(-1, 2)
        text_ids, views = chosen[:, 0], chosen[:, 1]
        batch = {
            IMAGE: preprocess_batch(self._finish, [self._prepared_image(int(i), int(v)) for i, v in zip(image_ids, views)]),
            TEXT: self._tokens(text_ids),
            IMAGE_ID: torch.from_numpy(image_ids),
            TEXT_ID: torch.from_numpy(text_ids.copy()),
            VIEW_INDEX: torch.from_numpy(views.copy()),
        }
        if self.data.teacher_image is not None:
            teacher_image = self.data.teacher_image[image_ids].astype(np.float32)
            with_view = views >= 0
            if with_view.any():
                teacher_image[with_view] = self.data.teacher_views[image_ids[with_view], views[with_view]]
            batch[TEACHER_IMAGE] = torch.from_numpy(teacher_image)
            batch[TEACHER_TEXT] = torch.from_numpy(self.data.teacher_text[text_ids].astype(np.float32))
        if self.negatives is not None:
            batch.update(self._mined(image_ids, text_ids))
        return batch

    def _tokens(self, text_ids: np.ndarray) -> torch.Tensor:
        """Each caption tokenised once and kept (open_clip's BPE tokenizer was a sixth of a CPU batch's
        loading time), up to TOKEN_CACHE_TEXTS captions per worker; beyond that, per batch."""
        ids = text_ids.tolist()
        if len(self._token_rows) >= TOKEN_CACHE_TEXTS:
            return self.tokenizer([self.data.captions[t] for t in ids])
        missing = [t for t in dict.fromkeys(ids) if t not in self._token_rows]
        if missing:
            rows = self.tokenizer([self.data.captions[t] for t in missing])
            self._token_length = rows.shape[1]
            self._token_rows.update(zip(missing, map(pack_tokens, rows)))
        return torch.from_numpy(np.stack([unpack_tokens(self._token_rows[t], self._token_length) for t in ids]))

    def _prepared_image(self, image_id: int, view: int) -> Image.Image:
        """The image with its view re-applied and the preprocess up to its ToTensor: kept, or made and kept."""
        kept = self._prepared.get((image_id, view))
        if kept is not None:
            return kept
        raw = self.data.image_bytes[image_id]
        if isinstance(raw, Image.Image):  # the world source (pipeline.pretrain) renders each scene once: nothing kept
            return raw if self._prepare is None else self._prepare(raw)
        try:
            image = decode_image(raw)
        except CorruptImageError as exc:
            raise DataError(f"{self.data.source}: image {image_id}: {exc}") from None
        if view >= 0:
            image = apply_view(image, self.data.view_params[image_id][view])
        if self._prepare is None:
            return image
        image = self._prepare(image)
        size = image.width * image.height * 4 if isinstance(image, Image.Image) else 0  # PIL keeps RGB in 4 bytes a pixel
        if size and self._prepared_bytes + size <= IMAGE_CACHE_BYTES:  # nothing downstream changes an image in place
            self._prepared[(image_id, view)] = image
            self._prepared_bytes += size
        return image

    def _mined(self, image_ids: np.ndarray, text_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Teacher embeddings of the mined negatives of each sample's image (i2t, i2i) and caption
        (t2t, t2i), looked up by id, with the image owning each (padding: id -1, zeros)."""
        neg = self.negatives
        found = {direction: (self._lookup_texts if direction.endswith("t") else self._lookup_images)(
                     neg.rows(direction, image_ids if direction.startswith("i") else text_ids))
                 for direction in MINED}
        return {key: tensor for direction, keys in MINED.items() for key, tensor in zip(keys, found[direction])}

    def _lookup_texts(self, text_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        owners = np.where(text_ids >= 0, self.data.text_to_image[np.maximum(text_ids, 0)], -1).astype(np.int64)
        ok = self._allowed(owners)
        emb = self.data.teacher_text[np.maximum(text_ids, 0)].astype(np.float32)
        emb[~ok] = 0.0
        return torch.from_numpy(emb), torch.from_numpy(np.where(ok, owners, -1))

    def _lookup_images(self, image_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ok = self._allowed(image_ids)
        emb = self.data.teacher_image[np.maximum(image_ids, 0)].astype(np.float32)
        emb[~ok] = 0.0
        return torch.from_numpy(emb), torch.from_numpy(np.where(ok, image_ids, -1).astype(np.int64))

    def _allowed(self, image_ids: np.ndarray) -> np.ndarray:
        """Real neighbours (not padding) that the run may see (train.max_images keeps the rest out)."""
        allowed = self.negatives.allowed
        return (image_ids >= 0) if allowed is None else (image_ids >= 0) & allowed[np.maximum(image_ids, 0)]


def keep_batch(batch: dict) -> dict:
    """The DataLoader's collate_fn: `TrainingDataset.__getitems__` already returns a batch."""
    return batch


# ---- batch orders -------------------------------------------------------------------------------

def random_order(image_ids: "np.ndarray | ImageRange", seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of the trainable image ids, new every epoch (the same whatever their integer dtype)."""
    return np.random.default_rng((seed, epoch, 0)).permutation(np.asarray(image_ids))


def hard_negative_order(image_ids: np.ndarray, i2i: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Every trainable image once, with mined neighbours next to each other: take a random unused
    image, then its i2i neighbours not yet used this epoch, repeat. Cut into batches, this puts
    hard negatives into the same batch (in-batch negatives become hard)."""
    rng = np.random.default_rng((seed, epoch, 1))
    image_ids = np.asarray(image_ids)
    eligible = np.zeros(len(i2i), dtype=bool)
    eligible[image_ids] = True
    used = np.zeros(len(i2i), dtype=bool)
    order: list[int] = []
    for anchor in rng.permutation(image_ids).tolist():
        if used[anchor]:
            continue
        used[anchor] = True
        order.append(anchor)
        for neighbour in i2i[anchor].tolist():
            if neighbour >= 0 and eligible[neighbour] and not used[neighbour]:
                used[neighbour] = True
                order.append(neighbour)
    return np.asarray(order, dtype=np.int64)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of `(epoch, image_id)` keys for steps [start_step, total_steps).

    Step s uses global batch s % batches_per_epoch of epoch s // batches_per_epoch (incomplete
    last batches are dropped, so every step sees a full global batch). The global batch is split
    into `world_size` contiguous rank slices, each into `accum_steps` micro-batches."""

    def __init__(
        self,
        image_ids: np.ndarray,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        batching: str = "random",
        i2i: Optional[np.ndarray] = None,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ConfigError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
        if batching == "hard-negative-aware" and i2i is None:
            raise ConfigError("batching: hard-negative-aware needs the mined i2i neighbours (negatives_dir)")
        if batch_size % (world_size * accum_steps):
            raise ConfigError(
                f"optim.batch_size {batch_size} must divide evenly over {world_size} rank(s) x "
                f"{accum_steps} accumulation step(s)"
            )
        if len(image_ids) < batch_size:
            raise ConfigError(f"optim.batch_size {batch_size} is larger than the {len(image_ids)} trainable images")
        self.image_ids = image_ids if isinstance(image_ids, ImageRange) else np.asarray(image_ids)
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.seed = seed
        self.batching = batching
        self.i2i = i2i
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.batches_per_epoch = len(self.image_ids) // batch_size
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.world_size * self.accum_steps)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            if self.batching == "random":
                order = random_order(self.image_ids, self.seed, epoch)
            else:
                order = hard_negative_order(self.image_ids, self.i2i, self.seed, epoch)
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of optimizer step `step` (0-based)."""
        return divmod(step, self.batches_per_epoch)

    def global_batch(self, step: int) -> np.ndarray:
        epoch, index = self.position(step)
        return self.epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        epoch, _ = self.position(step)
        per_rank = self.batch_size // self.world_size
        local = self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        size = self.micro_batch_size
        return [[(epoch, int(i)) for i in local[j * size : (j + 1) * size]] for j in range(self.accum_steps)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accum_steps


def total_steps(num_images: int, batch_size: int, epochs: float, max_steps: int) -> int:
    """`max_steps` when > 0, else ceil(epochs * images / batch_size)."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * num_images / batch_size))
