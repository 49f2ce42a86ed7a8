"""Caption groups: which texts share a normalised caption, and which texts each image owns (mining's exclusions).

A text's group is the 64-bit blake2b hash of its normalised caption (`caption_hashes`): equal groups are equal
normalised captions. For features written by `dsmd extract` (texts grouped by image) every per-id array stays on
disk and is read per block of queries (`ScatteredRows`): the features' text offsets and text -> image lookups, and
one hash a text that mining writes to its work folder (`write_text_hashes`). Nothing held grows with the split.
Features whose texts are not grouped by image (written by another tool) are grouped in memory (`group_captions`).
"""
from __future__ import annotations

import functools
import hashlib
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from pipeline.common import atomic
from pipeline.common.errors import PipelineError
from pipeline.features import schema, store

TEXT_HASHES = "text_hashes.npy"  # in mining's work folder: (M,) uint64, the group of each text id
SLACK_SAMPLE = 100_000  # queries a side the exclusion slack is measured on (all of them below this)
_GAP_BYTES = 4096  # ids closer than a page apart are read in one call
_RUN_BYTES = 1 << 20  # and one call reads at most this much


class CaptionError(PipelineError):
    """A features split whose texts cannot be grouped; the message names the folder."""


# ---- captions ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, None]:
    """str.translate table deleting every Unicode punctuation code point (categories P*); built once."""
    return {cp: None for cp in range(0x110000) if unicodedata.category(chr(cp)).startswith("P")}


def normalise_caption(text: str) -> str:
    """NFKC, case-folded, punctuation deleted, runs of white space collapsed to one space, trimmed:
    `"A  dog, running!"` and `"a dog running"` normalise alike."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_punctuation_table())
    return " ".join(folded.split())


def caption_hashes(captions: Iterable[str]) -> np.ndarray:
    """64-bit blake2b of each normalised caption: equal captions (after `normalise_caption`) get equal
    hashes, so captions are grouped without holding the strings. Two different captions collide with
    odds ~n^2 / 2^65: 3e-6 among 10^7 distinct captions."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(normalise_caption(c).encode(), digest_size=8).digest(), "little") for c in captions),
        dtype=np.uint64,
    )


# ---- arrays read per block --------------------------------------------------------------------

class ScatteredRows(store.RowFile):
    """A RowFile whose id lookups read nearby rows together: the candidates of a block of queries land all over
    the array, and a read a row would cost a system call a row. The distinct ids are sorted and split into runs
    (a new run past a page-sized gap or a MB of span), one read a run: memory holds one run and the answer."""

    def __getitem__(self, index):
        if isinstance(index, (slice, tuple)) or np.ndim(index) == 0:
            return super().__getitem__(index)
        ids = np.asarray(index, dtype=np.int64)
        if ids.size and (ids.min() < -len(self) or ids.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range for {len(self)} rows")
        distinct, inverse = np.unique(np.where(ids < 0, ids + len(self), ids).reshape(-1), return_inverse=True)
        out = np.empty((len(distinct), *self.row_shape), self.dtype)
        for lo, hi in _runs(distinct, max(1, _GAP_BYTES // self.row_bytes), max(1, _RUN_BYTES // self.row_bytes)):
            first = int(distinct[lo])
            out[lo:hi] = super().__getitem__(slice(first, int(distinct[hi - 1]) + 1))[distinct[lo:hi] - first]
        return out[inverse.reshape(-1)].reshape(ids.shape + tuple(self.row_shape))


def _runs(ids: np.ndarray, gap: int, span: int) -> list[tuple[int, int]]:
    """(lo, hi) position ranges of the sorted distinct `ids`, each read in one call: a run ends where the next id is
    more than `gap` rows on, or would take the run past `span` rows."""
    breaks = (np.flatnonzero(np.diff(ids) > gap) + 1).tolist()
    runs = []
    for lo, hi in zip([0] + breaks, breaks + [len(ids)]):
        while lo < hi:
            stop = lo + int(np.searchsorted(ids[lo:hi], ids[lo] + span))
            runs.append((lo, stop))
            lo = stop
    return runs


Rows = Union[np.ndarray, ScatteredRows]  # indexed alike: in memory, or read per call


# ---- groups -----------------------------------------------------------------------------------

@dataclass
class CaptionGroups:
    """Texts grouped by normalised caption, and each image's texts. Image i's texts are the positions
    `image_text_offsets[i]:image_text_offsets[i + 1]` of `image_texts`, or of the text ids themselves when the
    texts are stored grouped by image (as `dsmd extract` writes them; `image_texts` is then None)."""

    text_group: Rows  # (M,) uint64: the hash of each text's normalised caption
    image_text_offsets: Rows  # (N + 1,)
    text_images: Rows  # (M,) the image of each text
    image_texts: Optional[np.ndarray] = None  # (M,) text ids in image order (in memory only); None = 0..M-1
    slack: dict[str, int] = field(default_factory=dict)  # per direction, see exclusion_slack

    @property
    def num_images(self) -> int:
        return len(self.image_text_offsets) - 1

    @property
    def num_texts(self) -> int:
        return len(self.text_group)

    def text_image(self, texts: np.ndarray) -> np.ndarray:
        """The image of each text id (any shape)."""
        return self.text_images[np.asarray(texts)]

    def texts_of(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, texts): every text of each of the flat `images`, with the position in `images` it belongs to."""
        images = np.asarray(images, dtype=np.int64)
        bounds = self.image_text_offsets[np.concatenate([images, images + 1])].astype(np.int64)  # one read for both
        starts, lengths = bounds[:len(images)], bounds[len(images):] - bounds[:len(images)]
        total = int(lengths.sum())
        owner = np.repeat(np.arange(len(images)), lengths)
        positions = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        return owner, positions if self.image_texts is None else self.image_texts[positions]

    def owns(self, images: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Elementwise (same shapes): image owns a caption of the group."""
        flat_images, flat_groups = images.reshape(-1), groups.reshape(-1)
        owner, texts = self.texts_of(flat_images)
        return _any_of(owner, self.text_group[texts] == flat_groups[owner], images.shape)

    def share(self, query_images: np.ndarray, cand_images: np.ndarray) -> np.ndarray:
        """(R, K): the candidate image owns a normalised caption that the row's query image owns too."""
        flat_query = np.broadcast_to(query_images[:, None], cand_images.shape).reshape(-1)
        owner, texts = self.texts_of(cand_images.reshape(-1))
        return _any_of(owner, self.owns(flat_query[owner], self.text_group[texts]), cand_images.shape)


def _any_of(owner: np.ndarray, hit: np.ndarray, shape: tuple) -> np.ndarray:
    """Per element of `shape`: whether any of its entries (`owner` gives each entry's flat element) is a hit."""
    return (np.bincount(owner[hit], minlength=math.prod(shape)) > 0).reshape(shape)


def _distinct_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (first, second) pairs, sorted."""
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    new = np.ones(len(first), dtype=bool)
    new[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return first[new], second[new]


def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))


def _group_counts(groups: CaptionGroups, wanted: np.ndarray, texts_per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """(texts, images) of each of the sorted `wanted` groups: how many texts have its caption and how many images
    own one. One pass over the images in blocks of about `texts_per_block` texts; only `wanted` is counted."""
    texts_with, images_with = np.zeros(len(wanted), np.int64), np.zeros(len(wanted), np.int64)
    if len(wanted) == 0:
        return texts_with, images_with
    per_block = max(1, texts_per_block * groups.num_images // max(1, groups.num_texts))
    for first in range(0, groups.num_images, per_block):
        owner, texts = groups.texts_of(np.arange(first, min(first + per_block, groups.num_images)))
        hashes = groups.text_group[texts]
        at = np.minimum(np.searchsorted(wanted, hashes), len(wanted) - 1)
        hit = wanted[at] == hashes
        texts_with += np.bincount(at[hit], minlength=len(wanted))
        images_with += np.bincount(_distinct_pairs(owner[hit], at[hit])[1], minlength=len(wanted))
    return texts_with, images_with


def exclusion_slack(groups: CaptionGroups, sample: int = SLACK_SAMPLE, seed: int = 0,
                    texts_per_block: int = 1 << 18) -> dict[str, int]:
    """Per direction, the 99th percentile of an upper bound on the candidates the exclusions remove per query:
    i2t the texts of the query image's groups; t2i the images owning the query's group; i2i 1 + the images
    owning the query image's groups; t2t the query image's captions + the texts of its group. Over every query
    up to `sample` a side, else over a seeded sample of that many: the slack only sets the first search depth
    (rows left short are searched again deeper). One pass over the texts counts texts and images for just the
    groups the sampled queries touch: memory holds the sample, not the split."""
    rng = np.random.default_rng(seed)
    images, texts = _sample(groups.num_images, sample, rng), _sample(groups.num_texts, sample, rng)
    owner, image_text = groups.texts_of(images)
    image_hash, text_hash = groups.text_group[image_text], groups.text_group[texts]
    wanted = np.unique(np.concatenate([image_hash, text_hash]))
    texts_with, images_with = _group_counts(groups, wanted, texts_per_block)
    pair_owner, pair_hash = _distinct_pairs(owner, image_hash)
    pair_at, text_at = np.searchsorted(wanted, pair_hash), np.searchsorted(wanted, text_hash)
    text_image = groups.text_image(texts)
    bounds = {
        "i2t": np.bincount(pair_owner, weights=texts_with[pair_at], minlength=len(images)),
        "t2i": images_with[text_at],
        "i2i": 1 + np.bincount(pair_owner, weights=images_with[pair_at], minlength=len(images)),
        "t2t": groups.image_text_offsets[text_image + 1] - groups.image_text_offsets[text_image] + texts_with[text_at],
    }
    return {name: int(math.ceil(np.quantile(values, 0.99))) if len(values) else 0 for name, values in bounds.items()}


def group_captions(captions: Iterable[str] | np.ndarray, text_image: np.ndarray, num_images: int,
                   seed: int = 0) -> CaptionGroups:
    """Texts grouped by normalised caption, in memory; `captions` are the strings or their `caption_hashes`."""
    hashes = captions if isinstance(captions, np.ndarray) else caption_hashes(captions)
    text_image = np.asarray(text_image, dtype=np.int64)
    in_image_order = bool(np.all(text_image[1:] >= text_image[:-1]))
    image_texts = None if in_image_order else np.argsort(text_image, kind="stable")
    offsets = np.searchsorted(text_image if in_image_order else text_image[image_texts], np.arange(num_images + 1))
    groups = CaptionGroups(text_group=hashes, image_text_offsets=offsets, text_images=text_image, image_texts=image_texts)
    groups.slack = exclusion_slack(groups, seed=seed)
    return groups


# ---- from a features split --------------------------------------------------------------------

def _text_batches(features_dir: Path, split: str, num_texts: int, num_images: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image ids, caption hashes) of the split's texts, batch by batch in text id order, checked against its
    manifest: the captions are never all held."""
    base, row = store.split_dir(features_dir, split), 0
    for entry in store.load_split_manifest(features_dir, split)["files"][schema.TEXTS_PREFIX]:
        for batch in store.read_row_groups(base / entry["path"], [schema.IMAGE_ID, schema.CAPTION]):
            if row + batch.num_rows > num_texts:
                raise CaptionError(f"{base}: more texts in its Parquet files than the {num_texts} of its manifest; "
                                   f"re-run `dsmd extract`")
            image_ids = batch.column(schema.IMAGE_ID).to_numpy()
            if len(image_ids) and (image_ids.min() < 0 or image_ids.max() >= num_images):
                raise CaptionError(f"{base}: a text's image_id is outside 0..{num_images - 1}; re-run `dsmd extract`")
            row += batch.num_rows
            yield image_ids, caption_hashes(batch.column(schema.CAPTION).to_pylist())
    if row != num_texts:
        raise CaptionError(f"{base}: {row} texts in its Parquet files, {num_texts} in its manifest; re-run `dsmd extract`")


def in_memory_groups(features_dir: Path, split: str, num_texts: int, num_images: int, seed: int = 0) -> CaptionGroups:
    """The caption groups of a split whose texts are not grouped by image: its ids and hashes held."""
    owners, hashes, row = np.empty(num_texts, np.int64), np.empty(num_texts, np.uint64), 0
    for image_ids, batch_hashes in _text_batches(features_dir, split, num_texts, num_images):
        owners[row:row + len(image_ids)], hashes[row:row + len(image_ids)] = image_ids, batch_hashes
        row += len(image_ids)
    return group_captions(hashes, owners, num_images, seed)


def write_text_hashes(features_dir: Path, split: str, num_texts: int, num_images: int, path: Path) -> None:
    """The caption hash of every text id, streamed into `path` (.npy, written atomically)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint64)), "fortran_order": False, "shape": (num_texts,)})
            for _, hashes in _text_batches(features_dir, split, num_texts, num_images):
                handle.write(hashes.tobytes())
    atomic.atomic_write_with(path, write)


def disk_groups(lookups: dict, hashes_path: Path, seed: int = 0) -> CaptionGroups:
    """The caption groups of a split that `dsmd extract` wrote (its per-id lookups, `store.lookups`) with the text
    hashes of `write_text_hashes`: every per-id array is read per block."""
    groups = CaptionGroups(text_group=ScatteredRows(hashes_path),
                           image_text_offsets=ScatteredRows(lookups[schema.TEXT_OFFSETS].path),
                           text_images=ScatteredRows(lookups[schema.TEXT_IMAGE_IDS].path))
    groups.slack = exclusion_slack(groups, seed=seed)
    return groups
