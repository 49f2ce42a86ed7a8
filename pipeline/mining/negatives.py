"""`dsmd mine`: hard negatives from the cached teacher embeddings, by FAISS search.

Four directions per split, written to `negatives/<split>/<direction>.parquet`:

- i2t: for every image, the k texts most similar to it that are not its captions;
- t2i: for every text, the k images most similar to it that are not its image;
- i2i / t2t: the intra-modal neighbours (the intra-modal triplet terms, hard-negative batching).

Scores are inner products of the float32, re-L2-normalised teacher embeddings, i.e. cosines:
`s(q, c) = <q / |q|, c / |c|>`. Only the extract shards are read: never the teacher, never the corpus.

Excluded from a query's candidates (positives and false negatives), with `norm(.)` = `normalise_caption`:

- i2t: texts t with `norm(t)` equal to `norm` of any caption of the query image (its own captions included);
- t2i: images owning a caption c with `norm(c) == norm(query)` (the query's own image included);
- i2i: the query itself and every image sharing a normalised caption with it;
- t2t: the query, every caption of the query's image, and every text with the same normalised caption.

Then, in this order, the knobs of sentence-transformers' `mine_hard_negatives`:

- `range_min`: the first `range_min` ranked candidates left after the exclusions are skipped;
- `max_score`: candidates with `s > max_score` are dropped;
- `relative_margin`: candidates with `s > (1 - relative_margin) * positive_score` are dropped;
- `twin_threshold`: semantic twins are dropped: candidates with a caption whose teacher text-text
  cosine with a caption of the query's image exceeds the threshold (paraphrases that exact caption
  matching misses; see `_twin_rule`);
- `margin`: candidates with `s > positive_score - margin` are dropped, where `positive_score` is
  i2t: `max_{t in captions(q)} s(q, t)`; t2i: `s(q, image(q))`; t2t: `max_{t' in siblings(q)} s(q, t')`
  (the query's other captions; 1.0 when it has none); i2i: 1.0 (the query itself: image-image and
  image-text cosines live on different scales in CLIP space, so a cross-modal positive would drop
  nearly every intra-modal candidate).

Defaults are `range_min: 0, max_score: None, margin: None` (off): the synthetic corpus makes
near-duplicate scenes that differ in one attribute or relation *on purpose*; they are the hard
negatives the hard-negative loss needs, and a score filter would throw exactly them away. Only
identical (normalised) captions are treated as false negatives by default.

Search: exact `IndexFlatIP` when the database has fewer than `exact_threshold` vectors, otherwise
IVF-Flat (`auto`); `index` overrides (flat | ivf | hnsw | ivfpq). Queries go in chunks of
`query_chunk`, each searched for `K0 = k + range_min + slack` candidates (slack = the 99th percentile
of the per-query count of structural exclusions). Rows left with fewer than k after filtering are
searched again 2x deeper (4x when they found under half of k); when an approximate index runs out of
candidates for a row, that row falls back to exact search. A search call holds at most
`query_chunk * max(K0, 1024)` candidates (deeper re-searches take fewer rows per call): memory
never grows with N x N. A row ends shorter than k only when the whole database is exhausted. An
approximate run measures its recall@k against exact mining of a sample of queries (`recall_sample`).
IVF-PQ codes only rank candidates: `refine_factor * K` of them are re-scored with the exact vectors.

Re-runs: `_manifest.json` is written last with the features fingerprint and the mine params; a
re-run with the same fingerprint, params and output files returns at once ("up to date").
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.progress import progress as progress_bar

from pipeline.common import atomic, names
from pipeline.common.config import PRIMARY_TEACHER, IndexKind, MineConfig, teacher_shares
from pipeline.common.errors import PipelineError
from pipeline.features import schema, store
from pipeline.mining import captions
from pipeline.mining.captions import CaptionGroups

log = logging.getLogger(__name__)

INDEX_KINDS = tuple(m.value for m in IndexKind)
APPROXIMATE_KINDS = ("ivf", "hnsw", "ivfpq")
# fields of MineConfig that change no output: they are left out of the params a re-run compares
_NON_RESULT_FIELDS = ("features_dir", "out_dir", "splits", "threads", "query_chunk", "teachers_dir", "shard_vectors")
_RESCORE_BLOCK_FLOATS = 1 << 21  # 8 MB of float32 per block when re-scoring IVF-PQ candidates
_DATABASE_BLOCK_FLOATS = 1 << 23  # 32 MB of float32 per database block (index adds, exact search, checks)
_BLOCKS_PER_WRITE = 4  # query chunks mined between two writes of a direction's output (a row group)
# re-searches keep the full query_chunk rows per call up to this depth, then take fewer rows per call:
# a search call holds at most query_chunk * max(K0, this) candidates (12 bytes each)
_DEEP_SLOTS_PER_QUERY = 1024


class MineError(PipelineError):
    """Bad mining input or options; the message names the option or the features directory."""


# ---- index ------------------------------------------------------------------------------------

def resolve_index_kind(kind: str, database_size: int, exact_threshold: int, dim: int = 0, memory_budget_mb: int = 0) -> str:
    """`auto` -> exact `flat` below `exact_threshold` database vectors, else IVF-Flat; both hold a float32
    copy of the database, so when that copy exceeds `memory_budget_mb` (> 0), IVF-PQ (as autofaiss picks)."""
    if kind not in INDEX_KINDS:
        raise MineError(f"mine.index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    if memory_budget_mb > 0 and database_size * dim * 4 > memory_budget_mb * 2**20:
        return "ivfpq"
    return "flat" if database_size < exact_threshold else "ivf"


def memory_bytes(num_images: int, num_texts: int, dim: int, cfg: MineConfig) -> dict[str, int]:
    """What `dsmd mine` holds that grows with the split, by part (`benchmarks/memory.py --mine-only` measures it):
    each index as `mine.index` resolves it (flat and IVF-Flat: the float32 vectors; IVF-PQ: pq_m code bytes and an
    8-byte id a vector; HNSW: the vectors and 2 x hnsw_m 4-byte links). The caption groups of features written by
    `dsmd extract` are read per block (`captions.disk_groups`): nothing a text or an image is held."""
    def index(n: int) -> int:
        kind = resolve_index_kind(cfg.index, n, cfg.exact_threshold, dim, cfg.memory_budget_mb)
        return n * {"ivfpq": cfg.pq_m + 8, "hnsw": 4 * dim + 8 * cfg.hnsw_m}.get(kind, 4 * dim)
    return {"images_index": index(num_images), "texts_index": index(num_texts)}


def _nlist(cfg: MineConfig, n: int, dim: int) -> int:
    wanted = cfg.nlist if cfg.nlist > 0 else int(round(4 * math.sqrt(n)))
    # k-means needs enough points per centroid (FAISS warns below 39); clamp rather than fail. Its
    # training sample (>= 39 a list) must also fit the memory budget.
    budget_rows = cfg.memory_budget_mb * 2**20 // (4 * dim) if cfg.memory_budget_mb > 0 else n
    cap = max(1, min(n, budget_rows) // 39)
    if wanted > cap:
        log.warning("mine.nlist %d is too many lists for %d vectors; using %d", wanted, n, cap)
    return max(1, min(wanted, cap))


def build_index(vectors, kind: str, cfg: MineConfig, shard_dir: Optional[Path] = None):
    """An inner-product FAISS index over `vectors` (float32, L2-normalised; an array or UnitRows read
    from disk): `flat` (exact IndexFlatIP), `ivf` (IVF-Flat, nlist lists, nprobe probed), `hnsw`
    (HNSW-Flat, hnsw_m links, ef_search) or `ivfpq` (IVF with pq_m x 8-bit product codes; mining
    re-scores its candidates exactly). IVF quantisers train on a seeded sample of
    `train_points_per_list * nlist` vectors (at most what `memory_budget_mb` holds); vectors are added
    in blocks. With `shard_dir`, IVF-PQ codes beyond `memory_budget_mb` go to disk in shards (`PQShards`), so
    nothing held grows with the database; otherwise only the index itself does."""
    n, dim = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efSearch = cfg.ef_search
    elif kind in ("ivf", "ivfpq"):
        nlist = _nlist(cfg, n, dim)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
            n_train = min(n, max(cfg.train_points_per_list * nlist, 39 * nlist))
        else:
            if cfg.pq_m <= 0 or dim % cfg.pq_m:
                raise MineError(f"mine.pq_m must divide the embedding dimension {dim}, got {cfg.pq_m}")
            if n < 256:
                raise MineError(f"mine.index ivfpq needs at least 256 vectors to train its codebooks, the database has {n}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, ip)
            n_train = min(n, max(cfg.train_points_per_list * nlist, 39 * 256))
        if cfg.memory_budget_mb > 0:  # the training sample is a float32 copy too
            n_train = min(n_train, max(39 * nlist, cfg.memory_budget_mb * 2**20 // (4 * dim)))
        index.referenced_objects = [quantizer]  # keep the quantizer alive beside the SWIG object
        index.cp.seed = cfg.seed
        rng = np.random.default_rng(cfg.seed)
        sample = vectors[:] if n_train >= n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        del sample
        index.nprobe = min(cfg.nprobe, nlist)
        per_shard = shard_vectors(cfg)
        if kind == "ivfpq" and shard_dir is not None and per_shard and n > per_shard:
            return PQShards.build(index, vectors, per_shard, shard_dir, add_block_rows(kind, dim, cfg.pq_m))
    else:
        raise MineError(f"mine.index must be one of {', '.join(INDEX_KINDS[1:])} here, got {kind!r}")
    block = add_block_rows(kind, dim, cfg.pq_m)
    for start in range(0, n, block):
        index.add(np.ascontiguousarray(vectors[start:start + block], dtype=np.float32))
    return index


def shard_vectors(cfg: MineConfig) -> int:
    """IVF-PQ vectors a shard holds: `shard_vectors`, else `memory_budget_mb` of codes and ids (pq_m + 8 bytes a
    vector); 0 = one index in memory."""
    if cfg.shard_vectors > 0:
        return cfg.shard_vectors
    return cfg.memory_budget_mb * 2**20 // (cfg.pq_m + 8) if cfg.memory_budget_mb > 0 else 0


class PQShards:
    """An IVF-PQ index on disk in shards of at most `shard_vectors` vectors: one trained coarse quantizer and
    product quantizer (held), each shard file holding its share of every inverted list. A search assigns the
    queries to lists once, then maps one shard at a time (FAISS IO_FLAG_MMAP), scans its part of those lists and
    lets it go, and keeps the best k of all: the result of one index holding every vector, while memory holds
    the pages of one shard whatever the database size (the page cache keeps the files)."""

    TRAINED = "trained.faiss"

    def __init__(self, trained: faiss.IndexIVFPQ, paths: list[Path], ntotal: int) -> None:
        self.trained, self.paths, self.ntotal = trained, paths, ntotal
        self.nlist, self.nprobe = trained.nlist, trained.nprobe

    @classmethod
    def build(cls, trained: faiss.IndexIVFPQ, vectors, per_shard: int, folder: Path, block: int) -> "PQShards":
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        atomic.atomic_write_with(folder / cls.TRAINED, lambda tmp: faiss.write_index(trained, str(tmp)))
        paths = []
        for number, first in enumerate(range(0, len(vectors), per_shard)):
            shard = faiss.clone_index(trained)
            for start in range(first, min(first + per_shard, len(vectors)), block):
                rows = np.ascontiguousarray(vectors[start:min(start + block, first + per_shard)], dtype=np.float32)
                shard.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
            paths.append(atomic.atomic_write_with(folder / f"shard-{number:05d}.faiss",
                                                  lambda tmp, shard=shard: faiss.write_index(shard, str(tmp))))
            del shard
        return cls(trained, paths, len(vectors))

    @classmethod
    def load(cls, folder: Path) -> "PQShards":
        """The shards another rank built (torchrun); nprobe is stored with the trained index."""
        trained = faiss.read_index(str(folder / cls.TRAINED))
        paths = sorted(folder.glob("shard-*.faiss"))
        return cls(trained, paths, sum(faiss.read_index(str(p), faiss.IO_FLAG_MMAP).ntotal for p in paths))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        coarse_scores, lists = self.trained.quantizer.search(queries, self.nprobe)
        found_scores, found_ids = [], []
        for path in self.paths:
            shard = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
            shard.nprobe = self.nprobe
            scores, ids = shard.search_preassigned(queries, k, lists, coarse_scores)
            found_scores.append(np.where(ids >= 0, scores, -np.inf))
            found_ids.append(ids)
            del shard  # unmapped: its pages leave this process
        scores, ids = np.concatenate(found_scores, axis=1), np.concatenate(found_ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def add_block_rows(kind: str, dim: int, pq_m: int) -> int:
    """Rows added to an index per call. FAISS encodes each IVF-PQ call through an (n, pq_m, 256) float32 table of
    sub-quantizer distances: 32768 rows at pq_m 16 made a transient 512 MB, so PQ blocks are sized by that table."""
    rows = _DATABASE_BLOCK_FLOATS // dim
    if kind == "ivfpq":
        rows = min(rows, _DATABASE_BLOCK_FLOATS // (pq_m * 256))
    return max(1, rows)


def _search_block(searcher, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The one place that runs a search (tests watch it to check the memory bound)."""
    return searcher.search(queries, k)


def search_chunked(index, queries: np.ndarray, k: int, chunk: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, k) float32, ids (n, k) int64) of `index.search`, `chunk` queries per call; a
    missing neighbour is id -1. Memory beyond the outputs is O(chunk * k)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    with progress_bar(n, "search", "q", enabled=progress) as bar:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            scores[start:stop], ids[start:stop] = _search_block(index, queries[start:stop], k)
            bar.update(stop - start)
    return scores, ids


class _ExactSearcher:
    """Brute-force inner-product search without copying the database (`faiss.knn`); a database read
    from disk (UnitRows) is searched block by block, keeping the best k of each query."""

    exact = True

    def __init__(self, database):
        self.database = database
        self.ntotal = len(database)

    def search(self, queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if isinstance(self.database, np.ndarray):
            return faiss.knn(queries, self.database, k, metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for start, block in self.database.chunks(max(1, _DATABASE_BLOCK_FLOATS // self.database.shape[1])):
            found_scores, found = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            both_scores = np.concatenate([scores, found_scores], axis=1)
            both_ids = np.concatenate([ids, np.where(found >= 0, found + start, -1)], axis=1)
            order = np.argsort(-both_scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(both_scores, order, 1), np.take_along_axis(both_ids, order, 1)
        return scores, np.where(np.isfinite(scores), ids, -1)


class UnitRows:
    """float32, re-L2-normalised rows of a split's embedding array, read from disk on demand
    (store.RowFile): mining never holds a float32 copy of the database. Indexed like an array."""

    def __init__(self, rows: store.RowFile):
        self.rows = rows
        self.shape = (len(rows), int(rows.row_shape[0]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        x = self.rows[index].astype(np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)  # in place: one float32 copy of the rows, not two
        return x

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield start, self[start:start + size]


class _IndexSearcher:
    """A built index; HNSW searches at least k deep, IVF-PQ candidates are re-scored exactly."""

    def __init__(self, index: faiss.Index, kind: str, database: np.ndarray, cfg: MineConfig):
        self.index, self.kind, self.database = index, kind, database
        self.exact = kind == "flat"
        self.ntotal = index.ntotal
        self.ef_search, self.refine_factor = cfg.ef_search, max(1, cfg.refine_factor)

    def search(self, queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        if self.kind != "ivfpq":
            return self.index.search(queries, k)
        depth = min(k * self.refine_factor, self.ntotal)
        _, ids = self.index.search(queries, depth)
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows = max(1, _RESCORE_BLOCK_FLOATS // max(1, depth * queries.shape[1]))
        for start in range(0, len(queries), rows):
            block = ids[start:start + rows]
            exact = np.einsum("rkd,rd->rk", self.database[np.maximum(block, 0)], queries[start:start + rows])
            scores[start:start + rows] = np.where(block >= 0, exact, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(ids, order, axis=1), -1)
        if top_ids.shape[1] < k:  # depth was capped by the database size
            pad = k - top_ids.shape[1]
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return top_scores, top_ids


# ---- one direction ----------------------------------------------------------------------------

@dataclass
class Direction:
    """Queries, database and false-negative rules of one mining direction."""

    name: str
    queries: np.ndarray  # (n, d) float32
    database: np.ndarray  # (m, d) float32
    excluded: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (query ids (R,), cand ids (R, K)) -> bool (R, K)
    slack: int  # the 99th percentile of the per-query count of candidates `excluded` can remove
    positive_score: Optional[np.ndarray] = None  # (n,) for `margin`; NaN = no positive
    twin: Optional[Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = None  # semantic twins, see _twin_rule


def _padded_captions(groups: CaptionGroups) -> np.ndarray:
    """(N, C) the text ids of each image's captions, -1 padded (held: twin_threshold is opt-in)."""
    offsets = groups.image_text_offsets[:]
    counts = np.diff(offsets)
    out = np.full((groups.num_images, max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)
    owner, texts = groups.texts_of(np.arange(groups.num_images))
    column = np.arange(len(owner)) - offsets[owner]
    out[owner, column] = texts
    return out


def _max_caption_cosine(text_emb: np.ndarray, query_sets: np.ndarray, cand_sets: np.ndarray) -> np.ndarray:
    """(R, K): the largest teacher text-text cosine between a caption of the query's set (R, C) and
    one of the candidate's set (R, K, C'); -1 padding takes no part. Blocked over rows (bounded memory)."""
    rows, k, width = cand_sets.shape
    out = np.full((rows, k), -np.inf, dtype=np.float32)
    block = max(1, (1 << 20) // max(1, k * width * query_sets.shape[1]))
    for start in range(0, rows, block):
        q = query_sets[start : start + block]
        c = cand_sets[start : start + block]
        sims = np.einsum("rqd,rkcd->rkqc", text_emb[np.maximum(q, 0)], text_emb[np.maximum(c, 0)])
        valid = (q >= 0)[:, None, :, None] & (c >= 0)[:, :, None, :]
        out[start : start + block] = np.where(valid, sims, -np.inf).max(axis=(2, 3))
    return out


def _twin_rule(text_emb: np.ndarray, groups: CaptionGroups, query_side: str, cand_side: str):
    """Semantic twins (`twin_threshold`): a candidate one of whose captions (a text candidate: the
    text itself) has teacher text-text cosine above the threshold with a caption of the query's image
    (a text query: its own image's captions, the query included). Such paraphrases of a positive
    are false negatives that exact-caption matching misses."""
    @functools.cache
    def padded() -> np.ndarray:  # built on first use: only runs with twin_threshold set need it (N x C ids)
        return _padded_captions(groups)

    def sets(ids: np.ndarray, side: str) -> np.ndarray:
        return padded()[ids] if side == "image" else padded()[groups.text_image(ids)] if ids.ndim == 1 else ids[..., None]

    def rule(q: np.ndarray, c: np.ndarray, threshold: float) -> np.ndarray:
        return _max_caption_cosine(text_emb, sets(q, query_side), sets(c, cand_side)) > threshold

    return rule


def make_directions(image_emb: np.ndarray, text_emb: np.ndarray, groups: CaptionGroups, need_positives: bool) -> dict[str, Direction]:
    g = groups

    def i2t(q, c):
        return g.owns(np.broadcast_to(q[:, None], c.shape), g.text_group[c])

    def t2i(q, c):
        return g.owns(c, np.broadcast_to(g.text_group[q][:, None], c.shape))

    def i2i(q, c):
        return (c == q[:, None]) | g.share(q, c)

    def t2t(q, c):
        return (g.text_image(c) == g.text_image(q)[:, None]) | (g.text_group[c] == g.text_group[q][:, None])

    positives = _positive_scores(image_emb, text_emb, g) if need_positives else {}
    specs = {"i2t": (image_emb, text_emb, i2t), "t2i": (text_emb, image_emb, t2i),
             "i2i": (image_emb, image_emb, i2i), "t2t": (text_emb, text_emb, t2t)}
    sides = {"i2t": ("image", "text"), "t2i": ("text", "image"), "i2i": ("image", "image"), "t2t": ("text", "text")}
    return {
        name: Direction(name, queries, database, rule, g.slack[name], positives.get(name), _twin_rule(text_emb, g, *sides[name]))
        for name, (queries, database, rule) in specs.items()
    }


def _rowwise_dot(a: np.ndarray, a_rows: np.ndarray, b: np.ndarray, b_rows: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(len(a_rows), dtype=np.float32)
    for start in range(0, len(a_rows), block):
        sl = slice(start, start + block)
        out[sl] = np.einsum("ij,ij->i", a[a_rows[sl]], b[b_rows[sl]])
    return out


def _positive_scores(image_emb: np.ndarray, text_emb: np.ndarray, g: CaptionGroups) -> dict[str, np.ndarray]:
    """The positive each `margin` is measured from (see the module docstring). Only the margin filters
    need these (n,) arrays: held per query, so off by default."""
    n_images, n_texts = len(image_emb), len(text_emb)
    text_ids = np.arange(n_texts)
    text_image = g.text_image(text_ids)
    own_image = _rowwise_dot(text_emb, text_ids, image_emb, text_image)
    best_caption = np.full(n_images, np.nan, dtype=np.float32)
    np.fmax.at(best_caption, text_image, own_image)
    # sibling pairs (t, t') of the same image, t != t': sum of c * (c - 1) over images
    owner, order = g.texts_of(np.arange(n_images))  # texts in image order
    offsets = g.image_text_offsets[:]
    counts = np.diff(offsets)
    per_text = counts[owner]  # partners of each text (itself included)
    first = np.repeat(order, per_text)
    offset_in_image = np.arange(int(per_text.sum())) - np.repeat(np.cumsum(per_text) - per_text, per_text)
    second = order[np.repeat(offsets[owner], per_text) + offset_in_image]
    keep = first != second
    best_sibling = np.ones(n_texts, dtype=np.float32)  # no sibling: the query itself, cosine 1
    if keep.any():
        sibling = np.full(n_texts, np.nan, dtype=np.float32)
        np.fmax.at(sibling, first[keep], _rowwise_dot(text_emb, first[keep], text_emb, second[keep]))
        best_sibling = np.where(np.isnan(sibling), 1.0, sibling).astype(np.float32)
    return {"i2t": best_caption, "t2i": own_image, "i2i": np.ones(n_images, dtype=np.float32), "t2t": best_sibling}


def _select(direction: Direction, query_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray, cfg: MineConfig):
    """Filter one block of ranked candidates -> (ids (R, k), scores (R, k), counts (R,)), best first."""
    k = cfg.k
    valid = ids >= 0
    keep = valid & ~direction.excluded(query_ids, np.where(valid, ids, 0))
    if cfg.range_min > 0:
        keep &= np.cumsum(keep, axis=1) > cfg.range_min
    if cfg.max_score is not None:
        keep &= scores <= cfg.max_score
    if cfg.margin is not None and direction.positive_score is not None:
        positive = direction.positive_score[query_ids]
        limit = np.where(np.isnan(positive), np.inf, positive - cfg.margin)
        keep &= scores <= limit[:, None]
    if cfg.relative_margin is not None and direction.positive_score is not None:
        positive = direction.positive_score[query_ids]
        limit = np.where(np.isnan(positive), np.inf, (1.0 - cfg.relative_margin) * positive)
        keep &= scores <= limit[:, None]
    if cfg.twin_threshold is not None and direction.twin is not None:
        keep &= ~direction.twin(query_ids, np.where(valid, ids, 0), cfg.twin_threshold)
    rank = np.cumsum(keep, axis=1)
    take = keep & (rank <= k)
    rows, cols = np.nonzero(take)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores = np.full((len(ids), k), np.nan, dtype=np.float32)
    out_ids[rows, rank[rows, cols] - 1] = ids[rows, cols]
    out_scores[rows, rank[rows, cols] - 1] = scores[rows, cols]
    return out_ids, out_scores, take.sum(axis=1)


def initial_depth(direction: Direction, cfg: MineConfig) -> int:
    """K0 = k + range_min + the 99th percentile of the per-query exclusion bound (capped at the database)."""
    return int(min(len(direction.database), cfg.k + cfg.range_min + direction.slack))


def mine_direction(direction: Direction, searcher, exact_searcher, cfg: MineConfig,
                   rows: Optional[np.ndarray] = None, progress: bool = False) -> dict:
    """Mine `rows` (default: every query) of one direction.

    Returns ids (R, k) int64 (-1 pads), scores (R, k) float32, counts (R,), short_rows (rows that
    ended with fewer than k: the database was exhausted), retried_rows and the depth K0."""
    rows = np.arange(len(direction.queries)) if rows is None else np.asarray(rows, dtype=np.int64)
    k, ntotal = cfg.k, len(direction.database)
    depth0 = max(1, initial_depth(direction, cfg))
    budget = cfg.query_chunk * max(depth0, _DEEP_SLOTS_PER_QUERY)  # candidate slots per search call
    out_ids = np.full((len(rows), k), -1, dtype=np.int64)
    out_scores = np.full((len(rows), k), np.nan, dtype=np.float32)
    counts = np.zeros(len(rows), dtype=np.int64)
    queue = [(np.arange(len(rows)), depth0, searcher)]
    first_pass, retried = True, 0
    bar = progress_bar(len(rows), direction.name, "q", enabled=progress)
    while queue:
        positions, depth, current = queue.pop(0)
        per_call = max(1, min(cfg.query_chunk, budget // depth))
        retry, retry_far, fallback = [], [], []
        for start in range(0, len(positions), per_call):
            block = positions[start:start + per_call]
            query_ids = rows[block]
            scores, ids = _search_block(current, direction.queries[query_ids], depth)
            out_ids[block], out_scores[block], counts[block] = _select(direction, query_ids, scores, ids, cfg)
            if first_pass:
                bar.update(len(block))
            short = counts[block] < k
            if short.any():
                exhausted = (ids < 0).any(axis=1) | (depth >= ntotal)
                # rows that found under half of k are far off: grow their depth 4x instead of 2x
                far = counts[block] < (k + 1) // 2
                retry.append(block[short & ~exhausted & ~far])
                retry_far.append(block[short & ~exhausted & far])
                if not current.exact:  # the approximate index has no more for these rows
                    fallback.append(block[short & exhausted])
        first_pass = False
        for pending, next_depth, next_searcher in ((retry, 2 * depth, current), (retry_far, 4 * depth, current),
                                                   (fallback, 2 * depth, exact_searcher)):
            pending_rows = np.concatenate(pending) if pending else np.empty(0, np.int64)
            if len(pending_rows):
                queue.append((pending_rows, min(next_depth, ntotal), next_searcher))
                retried += len(pending_rows)
    bar.close()
    return {"ids": out_ids, "scores": out_scores, "counts": counts, "short_rows": int((counts < k).sum()),
            "retried_rows": retried, "depth": depth0}


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / |exact| (-1 pads ignored; rows with no exact neighbour skipped)."""
    exact_valid = exact_ids >= 0
    hits = ((exact_ids[:, :, None] == approx_ids[:, None, :]) & exact_valid[:, :, None]).any(axis=2).sum(axis=1)
    sizes = exact_valid.sum(axis=1)
    mask = sizes > 0
    return float((hits[mask] / sizes[mask]).mean()) if mask.any() else 1.0


# ---- a split ----------------------------------------------------------------------------------

def mine_params(cfg: MineConfig) -> dict:
    """The config fields that decide the output (paths, threads and chunking do not)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NON_RESULT_FIELDS}


def _validate(cfg: MineConfig) -> None:
    """What the ranges of single keys cannot say (those the config checks itself)."""
    if not cfg.splits:
        raise MineError("mine.splits is empty: name at least one split")


def _teacher_fingerprints(features_dir: Path, split: str, cfg: MineConfig) -> dict:
    """The added teachers' manifests' sha256: negatives mined from an added teacher are redone when it is."""
    return {name: atomic.sha256_file(store.added_teacher_dir(cfg.teachers_dir, name, split) / schema.SPLIT_MANIFEST)
            for name in cfg.teachers if name != PRIMARY_TEACHER}


def _checked_rows(features_dir: Path, split: str, column: str, what: str, cfg: MineConfig) -> UnitRows:
    """The split's embedding array as UnitRows, every row checked finite and non-zero (block by block)."""
    where = store.split_dir(features_dir, split)
    # the features' own teacher, or one named teacher, or several as their ensemble target (as a student sees it)
    rows = UnitRows(store.teacher_rows(features_dir, split, column, teacher_shares(cfg.teachers), cfg.teachers_dir))
    for start, raw in rows.rows.chunks(max(1, _DATABASE_BLOCK_FLOATS // max(1, rows.shape[1]))):
        raw = raw.astype(np.float32)
        if not np.isfinite(raw).all():
            raise MineError(f"{where}: {what} embeddings from row {start} on contain NaN or inf; re-run `dsmd extract`")
        if (np.linalg.norm(raw, axis=1) == 0).any():
            raise MineError(f"{where}: {what} embeddings from row {start} on include all-zero rows; re-run `dsmd extract`")
    return rows


def _neighbors_table(direction: str, ids: np.ndarray, scores: np.ndarray, counts: np.ndarray, metadata: dict,
                     first_key: int = 0) -> pa.Table:
    mask = np.arange(ids.shape[1])[None, :] < counts[:, None]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(first_key, first_key + len(ids)), pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(ids[mask], pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(scores[mask], pa.float32())),
        ],
        schema=schema.neighbors_schema(direction, metadata),
    )


def _up_to_date(out: Path, fingerprint: str, params: dict) -> Optional[dict]:
    marker = out / schema.SPLIT_MANIFEST
    if not marker.exists():
        return None
    try:
        manifest = json.loads(marker.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if manifest.get("features_fingerprint") != fingerprint or manifest.get("mine_params") != params:
        return None
    for entry in manifest.get("files", {}).values():
        path = out / entry["path"]
        if not path.exists() or path.stat().st_size != entry.get("bytes"):
            return None
        if not (out / entry.get("ids_path", "-")).exists():  # mined before the per-batch ids were written
            return None
    return manifest


def _return_free_memory() -> None:
    """Hand freed heap back to the system: the load's block-sized temporaries leave glibc's heap fragmented (160 MB
    kept resident at 7M captions, measured), which every later phase would carry."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _load_groups(features_dir: Path, split: str, num_texts: int, num_images: int, cfg: MineConfig, ranks: "Ranks",
                 work: Path) -> CaptionGroups:
    """The split's caption groups: read per block from disk (its lookups and the text hashes rank 0 writes to
    `work`), or held for features whose texts are not grouped by image."""
    lookups = store.lookups(features_dir, split)
    if lookups is None:
        return captions.in_memory_groups(features_dir, split, num_texts, num_images, cfg.seed)
    hashes = work / captions.TEXT_HASHES
    if ranks.is_main:
        captions.write_text_hashes(features_dir, split, num_texts, num_images, hashes)
    ranks.barrier()
    return captions.disk_groups(lookups, hashes, cfg.seed)


def _load_directions(features_dir: Path, split: str, cfg: MineConfig, ranks: "Ranks", work: Path):
    """(image rows, text rows, caption groups, the four directions) of a features split, checked; the
    embeddings and the caption groups stay on disk."""
    where = store.split_dir(features_dir, split)
    image_emb = _checked_rows(features_dir, split, schema.TEACHER_IMAGE_EMB, "image", cfg)
    text_emb = _checked_rows(features_dir, split, schema.TEACHER_TEXT_EMB, "text", cfg)
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise MineError(f"{where}: split {split!r} has {len(image_emb)} images and {len(text_emb)} texts; nothing to mine")
    groups = _load_groups(features_dir, split, len(text_emb), len(image_emb), cfg, ranks, work)
    _return_free_memory()
    need_positives = cfg.margin is not None or cfg.relative_margin is not None
    return image_emb, text_emb, groups, make_directions(image_emb, text_emb, groups, need_positives=need_positives)


@dataclass
class Ranks:
    """This process's place among `torchrun` ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            from pipeline.common import runtime
            runtime.barrier(runtime.DistInfo(rank=self.rank, world_size=self.world_size))

    def rows(self, total: int) -> range:
        """This rank's contiguous share of `total` query rows."""
        return range(self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size)


def current_ranks() -> Ranks:
    """Join torchrun's process group (gloo) when there is one; torch is imported only then."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from pipeline.common import runtime
    info = runtime.init_distributed("cpu")
    return Ranks(info.rank, info.world_size)


def _build_indexes(databases: dict, cfg: MineConfig, split: str, ranks: Ranks, work: Path) -> tuple[dict, dict]:
    """One index per database (images serve t2i and i2i, texts i2t and t2t): {name: (searcher, exact)}, info.
    Under torchrun rank 0 builds each index once and writes it to `work`; then every rank, rank 0 included, maps
    that file (FAISS IO_FLAG_MMAP): the ranks of a node share one copy in the page cache instead of one each."""
    indexes, index_info = {}, {}
    for name, vectors in databases.items():
        kind = resolve_index_kind(cfg.index, len(vectors), cfg.exact_threshold, vectors.shape[1], cfg.memory_budget_mb)
        path, shard_dir = work / f"{name}.faiss", work / f"{name}-shards"
        t0 = time.perf_counter()
        if ranks.is_main:
            index = build_index(vectors, kind, cfg, shard_dir=shard_dir)
            if ranks.world_size > 1 and not isinstance(index, PQShards):
                atomic.atomic_write_with(path, lambda tmp, index=index: faiss.write_index(index, str(tmp)))
                del index
        ranks.barrier()
        if ranks.world_size > 1:
            index = PQShards.load(shard_dir) if shard_dir.exists() else faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        sharded = isinstance(index, PQShards)
        index_info[name] = {"kind": kind, "ntotal": int(index.ntotal), "build_seconds": round(time.perf_counter() - t0, 3),
                            "mapped": ranks.world_size > 1 or sharded, "shards": len(index.paths) if sharded else 1}
        if kind in ("ivf", "ivfpq"):
            index_info[name].update(nlist=int(index.nlist), nprobe=int(index.nprobe))
        log.info("%s: %s index over %d %s built in %.1fs", split, kind, index.ntotal, name, index_info[name]["build_seconds"])
        indexes[name] = (_IndexSearcher(index, kind, vectors, cfg), _ExactSearcher(vectors))
    return indexes, index_info


def _mine_rows(name: str, direction, searchers, cfg: MineConfig, rows: range, path: Path, metadata: dict,
               progress: bool) -> dict:
    """Mine `rows` of one direction, a few query chunks at a time, each appended to `path` as a row group
    (written atomically): memory holds one block's results, never the direction's."""
    searcher, exact_searcher = searchers
    stats = {"short_rows": 0, "retried_rows": 0, "depth": max(1, initial_depth(direction, cfg))}
    block = cfg.query_chunk * _BLOCKS_PER_WRITE

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema.neighbors_schema(name, metadata), compression="zstd") as writer, \
                progress_bar(len(rows), f"{name}", "q", enabled=progress) as bar:
            for start in range(rows.start, rows.stop, block):
                part = np.arange(start, min(start + block, rows.stop))
                result = mine_direction(direction, searcher, exact_searcher, cfg, rows=part)
                writer.write_table(_neighbors_table(name, result["ids"], result["scores"], result["counts"], metadata, start))
                stats["short_rows"] += result["short_rows"]
                stats["retried_rows"] += result["retried_rows"]
                bar.update(len(part))

    atomic.atomic_write_with(path, write)
    return stats


def _merge_parts(parts: list[Path], path: Path, name: str, metadata: dict) -> None:
    """The ranks' part files, row group by row group, into one file in key order."""
    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema.neighbors_schema(name, metadata), compression="zstd") as writer:
            for part in parts:
                found = pq.ParquetFile(part)
                for group in range(found.num_row_groups):
                    writer.write_table(found.read_row_group(group))
    atomic.atomic_write_with(path, write)


def _recall(direction, searchers, cfg: MineConfig, rng: np.random.Generator) -> dict:
    """Recall@k of the approximate index, measured on a sample of queries against exact mining (a row's
    result does not depend on the rows mined beside it, so the sample is mined again, not read back)."""
    searcher, exact_searcher = searchers
    sample = np.sort(rng.choice(len(direction.queries), min(cfg.recall_sample, len(direction.queries)), replace=False))
    approximate = mine_direction(direction, searcher, exact_searcher, cfg, rows=sample)
    reference = mine_direction(direction, exact_searcher, exact_searcher, cfg, rows=sample)
    return {"recall_at_k": round(recall_at_k(approximate["ids"], reference["ids"]), 4), "recall_sample": len(sample)}


def _mine_one(name: str, direction, searchers, index_kind: str, cfg: MineConfig, split: str, metadata: dict,
              rng: np.random.Generator, progress: bool, ranks: Ranks, work: Path) -> tuple[dict, dict] | None:
    """Mine one direction (this rank's rows) and write its table; rank 0 returns (report, file record)."""
    t0 = time.perf_counter()
    path = store.neighbors_path(cfg.out_dir, split, name)
    rows = ranks.rows(len(direction.queries))
    own = path if ranks.world_size == 1 else work / f"{name}-{ranks.rank:05d}.parquet"
    stats = _mine_rows(name, direction, searchers, cfg, rows, own, metadata, progress and ranks.is_main)
    if ranks.world_size > 1:
        atomic.atomic_write_json(stats, own.with_suffix(".json"))
    ranks.barrier()
    if not ranks.is_main:
        return None
    if ranks.world_size > 1:
        parts = [work / f"{name}-{r:05d}.parquet" for r in range(ranks.world_size)]
        _merge_parts(parts, path, name, metadata)
        totals = [json.loads(p.with_suffix(".json").read_text()) for p in parts]
        stats = {key: sum(t[key] for t in totals) for key in ("short_rows", "retried_rows")} | {"depth": stats["depth"]}
    info = {"index": index_kind, "queries": len(direction.queries), "database": len(direction.database),
            "depth": stats["depth"], "short_rows": stats["short_rows"], "retried_rows": stats["retried_rows"],
            "seconds": round(time.perf_counter() - t0, 3)}
    if not searchers[0].exact and cfg.recall_sample > 0:  # measured, not assumed: recall against exact search
        info.update(_recall(direction, searchers, cfg, rng))
        log.info("%s %s: recall@%d %.4f against exact search on %d queries", split, name, cfg.k, info["recall_at_k"],
                 info["recall_sample"])
    if info["short_rows"]:
        log.info("%s %s: %d rows have fewer than k=%d negatives (database exhausted after filtering)",
                 split, name, info["short_rows"], cfg.k)
    rows_written = pq.ParquetFile(path).metadata.num_rows
    ids = store.write_neighbor_rows(cfg.out_dir, split, name, cfg.k)  # what training reads per batch
    return info, {"path": path.name, "rows": rows_written, "bytes": path.stat().st_size, "sha256": atomic.sha256_file(path),
                  "ids_path": ids.name, "ids_sha256": atomic.sha256_file(ids)}


DATABASE_OF = {"i2t": "texts", "t2i": "images", "i2i": "images", "t2t": "texts"}
WORK_DIR = names.MINE_WORK_DIR


def mine_split(cfg: MineConfig, split: str, progress: bool = True, ranks: Ranks | None = None) -> dict:
    """Mine one split; returns its `_manifest.json` content plus `status` (mined | up to date). Under
    torchrun every rank mines its share of each direction's queries; rank 0 writes the result."""
    ranks = ranks or Ranks()
    features_dir = Path(cfg.features_dir)
    out = Path(cfg.out_dir) / split
    work = out / WORK_DIR
    fingerprint = store.features_fingerprint(features_dir, split)
    params = mine_params(cfg)
    if cfg.teachers:
        params["teacher_fingerprints"] = _teacher_fingerprints(features_dir, split, cfg)
    current = _up_to_date(out, fingerprint, params)
    if current is not None:
        log.info("%s: negatives up to date (%s)", split, out)
        return {**current, "status": "up to date"}

    started = time.perf_counter()
    marker = out / schema.SPLIT_MANIFEST
    if ranks.is_main:
        work.mkdir(parents=True, exist_ok=True)
        if marker.exists():
            marker.unlink()  # from here on the split's negatives are incomplete until the new manifest lands
    ranks.barrier()
    image_emb, text_emb, groups, directions = _load_directions(features_dir, split, cfg, ranks, work)
    load_seconds = time.perf_counter() - started
    indexes, index_info = _build_indexes({"images": image_emb, "texts": text_emb}, cfg, split, ranks, work)
    features_manifest = store.load_split_manifest(features_dir, split)
    metadata = {schema.META_KIND: "neighbors", schema.META_SPLIT: split, schema.META_FEATURES_FINGERPRINT: fingerprint,
                schema.META_MINE_PARAMS: params}
    if "teacher" in features_manifest:
        metadata[schema.META_TEACHER] = features_manifest["teacher"]
    rng = np.random.default_rng(cfg.seed)
    report, files = {}, {}
    for name in schema.NEIGHBOR_DIRECTIONS:
        database = DATABASE_OF[name]
        mined = _mine_one(name, directions[name], indexes[database], index_info[database]["kind"], cfg, split, metadata,
                          rng, progress, ranks, work)
        if mined is not None:
            report[name], files[name] = mined
    manifest = {
        "split": split, "schema_version": schema.SCHEMA_VERSION, "features_dir": str(features_dir),
        "features_fingerprint": fingerprint, "mine_params": params, "num_images": len(image_emb),
        "num_texts": len(text_emb), "exclusion_slack": groups.slack, "indexes": index_info, "directions": report,
        "files": files, "load_seconds": round(load_seconds, 3), "seconds": round(time.perf_counter() - started, 3),
        "world_size": ranks.world_size,
    }
    if ranks.is_main:
        atomic.atomic_write_json(manifest, marker)
        shutil.rmtree(work, ignore_errors=True)
    ranks.barrier()
    return {**manifest, "status": "mined"}


def mine(cfg: MineConfig, progress: bool = True) -> dict:
    """Mine every split of `cfg.splits`; returns {split: summary} (each its `_manifest.json` plus
    `status`). FAISS threads are set to `cfg.threads` (0 = FAISS default) for the call only."""
    _validate(cfg)
    ranks = current_ranks()
    if ranks.is_main:
        atomic.prepare_output_dir(cfg.out_dir)
    ranks.barrier()
    previous_threads = faiss.omp_get_max_threads()
    if cfg.threads > 0:
        faiss.omp_set_num_threads(cfg.threads)
    try:
        return {split: mine_split(cfg, split, progress=progress, ranks=ranks) for split in cfg.splits}
    finally:
        faiss.omp_set_num_threads(previous_threads)
