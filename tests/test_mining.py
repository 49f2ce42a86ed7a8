"""`dsmd mine`: exact search against a brute-force reference, exclusions, approximate recall,
bounded memory, resume, the Parquet output and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.common.config import ConfigError, MineConfig
from pipeline.features import schema, store
from pipeline.mining import captions, negatives
from tests.conftest import REPO_ROOT
from tests.fakes import write_fake_features

DIRECTIONS = schema.NEIGHBOR_DIRECTIONS
PHRASES = [f"a {c} {s} next to a {o}" for c in ("red", "blue", "green") for s in ("cube", "ball") for o in ("tree", "car", "cat", "box", "lamp")]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _variant(text: str, rng: np.random.Generator) -> str:
    """The same caption after case, white-space and punctuation noise."""
    choice = rng.integers(4)
    if choice == 1:
        return text.upper() + "."
    if choice == 2:
        return "  " + text.replace(" ", "   ").title() + "!"
    if choice == 3:
        return text.replace("next to", "next, to") + " ?"
    return text


def write_features(features_dir, split, image_emb, text_emb, text_image, captions, dtype="float32") -> None:
    n, dim = image_emb.shape
    meta = {schema.META_SPLIT: split}
    images = schema.images_table([f"k{i}" for i in range(n)], ["s.tar"] * n, ["png"] * n, [b""] * n, image_emb, dtype, meta)
    caption_index = np.zeros(len(text_image), dtype=np.int32)
    for t in range(1, len(text_image)):
        caption_index[t] = caption_index[t - 1] + 1 if text_image[t] == text_image[t - 1] else 0
    texts = schema.texts_table(text_image, caption_index, captions, text_emb, dtype, meta)
    store.write_split(features_dir, split, [images], [texts], {"teacher": {"model": "test"}, "embedding_dim": dim})


def duplicate_heavy_split(features_dir, split="train", n_images=80, dim=16, seed=0, shuffle_texts=False) -> None:
    """Captions drawn from a small pool of phrases (with case/punctuation/space variants), so many
    images share a caption; a caption's embedding sits close to its phrase's, so duplicates are
    the nearest candidates and the exclusions matter. `shuffle_texts`: text ids not grouped by image."""
    rng = np.random.default_rng(seed)
    phrase_emb = _unit(rng.standard_normal((len(PHRASES), dim)))
    text_image, captions, text_rows = [], [], []
    for image in range(n_images):
        for phrase in rng.choice(len(PHRASES), size=rng.integers(1, 4), replace=False):
            text_image.append(image)
            captions.append(_variant(PHRASES[phrase], rng))
            text_rows.append(phrase_emb[phrase] + 0.15 * rng.standard_normal(dim))
    text_image = np.array(text_image)
    text_emb = _unit(np.array(text_rows))
    image_emb = _unit(np.stack([text_emb[text_image == i].mean(0) for i in range(n_images)]) + 0.2 * rng.standard_normal((n_images, dim)))
    if shuffle_texts:
        order = rng.permutation(len(text_image))
        text_image, text_emb, captions = text_image[order], text_emb[order], [captions[i] for i in order]
    write_features(features_dir, split, image_emb, text_emb, text_image, captions)


def _inputs(features_dir, split="train"):
    image_emb, text_emb, text_image = store.load_embeddings(features_dir, split)
    captions = store.read_texts(features_dir, split, columns=[schema.CAPTION])[schema.CAPTION].to_pylist()
    return _unit(image_emb), _unit(text_emb), text_image, captions


def reference_negatives(features_dir, cfg: MineConfig, split="train") -> dict:
    """Brute force: the full similarity matrix, the exclusion rules spelled out with Python sets."""
    image_emb, text_emb, text_image, caption_list = _inputs(features_dir, split)
    norm = [captions.normalise_caption(c) for c in caption_list]
    n_images, n_texts = len(image_emb), len(text_emb)
    groups_of_image = [set() for _ in range(n_images)]
    texts_of_image = [[] for _ in range(n_images)]
    for t, (image, caption) in enumerate(zip(text_image, norm)):
        groups_of_image[image].add(caption)
        texts_of_image[image].append(t)
    sim = {"i2t": image_emb @ text_emb.T, "t2i": text_emb @ image_emb.T, "i2i": image_emb @ image_emb.T, "t2t": text_emb @ text_emb.T}
    excluded = {
        "i2t": lambda q, c: norm[c] in groups_of_image[q],
        "t2i": lambda q, c: norm[q] in groups_of_image[c],
        "i2i": lambda q, c: q == c or bool(groups_of_image[q] & groups_of_image[c]),
        "t2t": lambda q, c: text_image[q] == text_image[c] or norm[q] == norm[c],
    }
    positive = {
        "i2t": lambda q: max(sim["i2t"][q, t] for t in texts_of_image[q]) if texts_of_image[q] else np.nan,
        "t2i": lambda q: sim["t2i"][q, text_image[q]],
        "i2i": lambda q: 1.0,
        "t2t": lambda q: max([sim["t2t"][q, t] for t in texts_of_image[text_image[q]] if t != q], default=1.0),
    }
    out = {}
    for name in DIRECTIONS:
        rows = []
        for q in range(len(sim[name])):
            order = np.argsort(-sim[name][q], kind="stable")
            kept = [c for c in order if not excluded[name](q, c)][cfg.range_min:]
            if cfg.max_score is not None:
                kept = [c for c in kept if sim[name][q, c] <= cfg.max_score]
            if cfg.margin is not None and not np.isnan(positive[name](q)):
                kept = [c for c in kept if sim[name][q, c] <= positive[name](q) - cfg.margin]
            if cfg.relative_margin is not None and not np.isnan(positive[name](q)):
                kept = [c for c in kept if sim[name][q, c] <= (1 - cfg.relative_margin) * positive[name](q)]
            if cfg.twin_threshold is not None:
                query_side, cand_side = {"i2t": "it", "t2i": "ti", "i2i": "ii", "t2t": "tt"}[name]
                mine_q = texts_of_image[q] if query_side == "i" else texts_of_image[text_image[q]]
                kept = [c for c in kept if max(
                    (sim["t2t"][a, b] for a in mine_q for b in (texts_of_image[c] if cand_side == "i" else [c])),
                    default=-np.inf) <= cfg.twin_threshold]
            rows.append((kept[: cfg.k], sim[name][q, kept[: cfg.k]]))
        out[name] = rows
    return out


def _directions(features_dir, cfg, split="train"):
    image_emb, text_emb, text_image, caption_list = _inputs(features_dir, split)
    groups = captions.group_captions(caption_list, text_image, len(image_emb))
    return negatives.make_directions(image_emb, text_emb, groups, need_positives=False).values()


def _as_lists(out_dir, split, direction):
    table = pq.read_table(store.neighbors_path(out_dir, split, direction))
    return table[schema.NEIGHBOR_IDS].to_pylist(), table[schema.NEIGHBOR_SCORES].to_pylist()


def test_normalise_caption():
    assert captions.normalise_caption("  A Dog,\tRUNNING!  ") == "a dog running"
    assert captions.normalise_caption("don't stop") == captions.normalise_caption("Dont   stop.")
    assert captions.normalise_caption("a dog running") != captions.normalise_caption("a dog sitting")
    assert captions.normalise_caption("Ｆｕｌｌ－width") == "fullwidth"


@pytest.mark.parametrize("filters", [
    {},
    {"range_min": 2, "max_score": 0.6},
    {"margin": 0.05},
    {"max_score": 0.1, "range_min": 1, "margin": 0.02},  # most candidates filtered: deep re-searches
    {"relative_margin": 0.1},
    {"twin_threshold": 0.8},
    {"twin_threshold": 0.5, "relative_margin": 0.05},
])
def test_exact_matches_brute_force(tmp_path, filters):
    duplicate_heavy_split(tmp_path / "features")
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=6, index="flat",
                     query_chunk=7, **filters)
    summary = negatives.mine(cfg, progress=False)["train"]
    reference = reference_negatives(tmp_path / "features", cfg)
    for name in DIRECTIONS:
        ids, scores = _as_lists(cfg.out_dir, "train", name)
        expected = reference[name]
        assert [row for row in ids] == [list(map(int, e[0])) for e in expected], name
        for got, (_, want) in zip(scores, expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
        short = sum(len(e[0]) < cfg.k for e in expected)
        assert summary["directions"][name]["short_rows"] == short


@pytest.mark.parametrize("filters", [{}, {"twin_threshold": 0.8, "margin": 0.05}])
def test_texts_out_of_image_order_match_brute_force(tmp_path, filters):
    """Features whose text ids are not grouped by image (written by another tool): each image's captions are
    then found through a sorted copy of the ids, and the exclusions and filters still match brute force."""
    duplicate_heavy_split(tmp_path / "features", shuffle_texts=True, seed=3)
    _, _, text_image, _ = _inputs(tmp_path / "features")
    assert (np.diff(text_image) < 0).any()
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=5, index="flat",
                     query_chunk=9, **filters)
    negatives.mine(cfg, progress=False)
    reference = reference_negatives(tmp_path / "features", cfg)
    for name in DIRECTIONS:
        ids, scores = _as_lists(cfg.out_dir, "train", name)
        assert ids == [list(map(int, e[0])) for e in reference[name]], name
        for got, (_, want) in zip(scores, reference[name]):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_in_memory_caption_groups_own_exactly_their_captions():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 50, 1000).astype(np.uint64)
    text_image = np.sort(rng.integers(0, 300, 1000))
    groups = captions.group_captions(hashes, text_image, 300)
    assert groups.image_texts is None  # grouped by image: no id copy
    np.testing.assert_array_equal(groups.text_image(np.arange(1000)), text_image)
    assert groups.owns(text_image[:, None], groups.text_group[:, None]).all()
    pairs = set(zip(text_image.tolist(), hashes.tolist()))
    images, probe = rng.integers(0, 300, 500), rng.integers(0, 50, 500).astype(np.uint64)
    np.testing.assert_array_equal(groups.owns(images, probe), [(i, g) in pairs for i, g in zip(images, probe.tolist())])


def test_scattered_rows_read_like_numpy_fancy_indexing(tmp_path):
    """Runs of nearby ids are read in one call each (here pages of 512 ids, runs of at most 2048): any ids,
    repeated, negative, 2-D or empty, give what numpy indexing of the whole array gives."""
    rng = np.random.default_rng(4)
    for dtype, shape in ((np.uint64, (100_000,)), (np.int32, (5000, 3))):
        array = rng.integers(0, 2**31, shape).astype(dtype)
        np.save(tmp_path / "a.npy", array)
        rows = captions.ScatteredRows(tmp_path / "a.npy")
        for ids in (rng.integers(0, len(array), 3000), rng.integers(-len(array), len(array), (40, 7)),
                    np.arange(0, len(array), 3), np.array([], np.int64), np.array([len(array) - 1, 0, 0])):
            np.testing.assert_array_equal(rows[ids], array[ids])
        np.testing.assert_array_equal(rows[10:20], array[10:20])
        with pytest.raises(IndexError, match="a.npy"):
            rows[np.array([len(array)])]


def test_runs_split_at_gaps_and_spans():
    ids = np.array([0, 1, 5, 6, 20, 21, 22, 23, 24])
    assert captions._runs(ids, gap=4, span=100) == [(0, 4), (4, 9)]
    assert captions._runs(ids, gap=4, span=3) == [(0, 2), (2, 4), (4, 7), (7, 9)]
    assert captions._runs(np.array([7]), gap=1, span=1) == [(0, 1)]


def test_mining_reads_the_caption_groups_from_disk(tmp_path, monkeypatch):
    """Features written by `dsmd extract` (texts grouped by image): every per-id array of the caption groups is a
    file read per block, and the groups answer as the in-memory ones do."""
    duplicate_heavy_split(tmp_path / "features", n_images=120, seed=7)
    work = tmp_path / "work"
    work.mkdir()
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"))
    disk = negatives._load_groups(tmp_path / "features", "train", *_sizes(tmp_path / "features"), cfg, negatives.Ranks(), work)
    assert all(isinstance(a, captions.ScatteredRows) for a in (disk.text_group, disk.image_text_offsets, disk.text_images))
    _, _, text_image, caption_list = _inputs(tmp_path / "features")
    memory = captions.group_captions(caption_list, text_image, 120)
    assert disk.slack == memory.slack
    rng = np.random.default_rng(0)
    q, c = rng.integers(0, 120, 30), rng.integers(0, 120, (30, 9))
    np.testing.assert_array_equal(disk.share(q, c), memory.share(q, c))
    texts = rng.integers(0, len(text_image), (30, 9))
    np.testing.assert_array_equal(disk.owns(c, disk.text_group[texts]), memory.owns(c, memory.text_group[texts]))
    np.testing.assert_array_equal(disk.text_image(texts), text_image[texts])


def test_caption_hashes_name_a_split_that_disagrees_with_its_manifest(tmp_path):
    """A texts file with rows its manifest does not count, or a text whose image is not in the split, is one
    CaptionError naming the folder, and no half-written hash file is left behind."""
    duplicate_heavy_split(tmp_path / "features", n_images=40, seed=3)
    num_texts, num_images = _sizes(tmp_path / "features")
    out = tmp_path / captions.TEXT_HASHES
    for texts, images, message in [(num_texts + 1, num_images, "in its manifest"), (num_texts - 1, num_images, "more texts"),
                                   (num_texts, num_images - 1, "outside")]:
        with pytest.raises(captions.CaptionError, match=message) as caught:
            captions.write_text_hashes(tmp_path / "features", "train", texts, images, out)
        assert str(tmp_path / "features") in str(caught.value)
        assert list(tmp_path.glob("*.npy")) == [] and [f for f in tmp_path.iterdir() if f.name.startswith(".")] == []
    captions.write_text_hashes(tmp_path / "features", "train", num_texts, num_images, out)
    _, _, _, caption_list = _inputs(tmp_path / "features")
    np.testing.assert_array_equal(np.load(out), captions.caption_hashes(caption_list))


def _sizes(features_dir):
    manifest = store.load_split_manifest(features_dir, "train")
    return manifest["num_texts"], manifest["num_images"]


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("sample", [10_000, 150])
def test_exclusion_slack_is_the_99th_percentile_of_the_bounds_spelled_out(shuffled, sample):
    """Every query's bound is spelled out with Python sets and np.quantile taken over them (images without captions
    included): over all queries, or over the seeded sample of `sample` a side when there are more."""
    rng = np.random.default_rng(1)
    num_images = 400
    text_image = np.sort(rng.integers(0, num_images - 20, 1500))  # the last 20 images own no caption
    hashes = rng.zipf(1.5, 1500).astype(np.uint64) % 300  # many shared captions, some twice within an image
    if shuffled:
        order = rng.permutation(1500)
        text_image, hashes = text_image[order], hashes[order]
    groups = captions.group_captions(hashes, text_image, num_images)
    texts_of = [[t for t in range(1500) if text_image[t] == i] for i in range(num_images)]
    groups_of = [{int(hashes[t]) for t in texts} for texts in texts_of]
    texts_with = {h: sum(int(x) == h for x in hashes) for h in map(int, hashes)}
    images_with = {h: sum(h in g for g in groups_of) for h in texts_with}
    draw = np.random.default_rng(3)
    images, texts = captions._sample(num_images, sample, draw), captions._sample(1500, sample, draw)
    assert (len(images), len(texts)) == ((num_images, 1500) if sample > 1500 else (sample, sample))
    bounds = {
        "i2t": [sum(texts_with[h] for h in groups_of[i]) for i in images],
        "t2i": [images_with[int(hashes[t])] for t in texts],
        "i2i": [1 + sum(images_with[h] for h in groups_of[i]) for i in images],
        "t2t": [len(texts_of[text_image[t]]) + texts_with[int(hashes[t])] for t in texts],
    }
    slack = captions.exclusion_slack(groups, sample=sample, seed=3)
    for name, values in bounds.items():
        assert slack[name] == int(np.ceil(np.quantile(values, 0.99))), name
    assert captions.exclusion_slack(groups, sample=sample, seed=3, texts_per_block=37) == slack  # many blocks


def test_rows_are_short_only_when_the_database_is_exhausted(tmp_path):
    duplicate_heavy_split(tmp_path / "features", n_images=9)
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=12, index="flat", query_chunk=2)
    summary = negatives.mine(cfg, progress=False)["train"]
    reference = reference_negatives(tmp_path / "features", cfg)
    ids, _ = _as_lists(cfg.out_dir, "train", "i2i")
    # 9 images: every i2i row is short, and holds every image that is not excluded
    assert [len(r) for r in ids] == [len(e[0]) for e in reference["i2i"]]
    assert all(len(r) < 9 for r in ids) and summary["directions"]["i2i"]["short_rows"] == 9


def test_approximate_rows_fall_back_to_exact_search_before_coming_up_short(tmp_path, monkeypatch):
    duplicate_heavy_split(tmp_path / "features", n_images=200, seed=5)
    searchers = []
    real = negatives._search_block
    monkeypatch.setattr(negatives, "_search_block", lambda s, q, k: searchers.append(s.exact) or real(s, q, k))
    # one probed list of many: IVF alone runs out of candidates once max_score drops the nearest ones
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=6, index="ivf",
                     nlist=5, nprobe=1, max_score=0.0, query_chunk=32, recall_sample=0)
    summary = negatives.mine(cfg, progress=False)["train"]
    reference = reference_negatives(tmp_path / "features", cfg)
    for name in DIRECTIONS:
        ids, scores = _as_lists(cfg.out_dir, "train", name)
        assert [len(r) for r in ids] == [len(e[0]) for e in reference[name]], name
        assert all(max(r, default=-1) <= 0.0 for r in scores)
    assert sum(d["retried_rows"] for d in summary["directions"].values()) > 0
    assert True in searchers  # recall_sample is 0: only the fallback searches exactly


def test_ivfpq_adds_in_blocks_whose_encoding_table_is_bounded(monkeypatch):
    """FAISS encodes an IVF-PQ add through an (n, pq_m, 256) float32 table: the blocks keep it at 32 MB (32768 rows
    at once made 512 MB, the peak of a whole mining run at 20k images)."""
    added = []

    class Spy(negatives.faiss.IndexIVFPQ):
        def add(self, x):
            added.append(len(x))
            return super().add(x)

    monkeypatch.setattr(negatives.faiss, "IndexIVFPQ", Spy)
    rng = np.random.default_rng(0)
    database = _unit(rng.standard_normal((5000, 64)))
    cfg = MineConfig(pq_m=32, nlist=4)
    index = negatives.build_index(database, "ivfpq", cfg)
    assert index.ntotal == 5000 and sum(added) == 5000 and len(added) > 1
    assert max(added) * cfg.pq_m * 256 * 4 <= 32 * 2**20


def test_pq_shards_search_as_one_index_and_hold_one_shard(tmp_path):
    """IVF-PQ codes in shards on disk: the same trained quantizers, each shard a share of every list; a search maps
    one shard at a time and gives what one index over every vector gives."""
    rng = np.random.default_rng(0)
    database, queries = _unit(rng.standard_normal((5000, 32))), _unit(rng.standard_normal((300, 32)))
    cfg = MineConfig(pq_m=8, nlist=16, nprobe=4, shard_vectors=1200)
    whole = negatives.build_index(database, "ivfpq", cfg)
    shards = negatives.build_index(database, "ivfpq", cfg, shard_dir=tmp_path / "shards")
    assert isinstance(shards, negatives.PQShards) and len(shards.paths) == 5 and shards.ntotal == 5000
    want_scores, want_ids = whole.search(queries, 20)
    got_scores, got_ids = shards.search(queries, 20)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_ids, want_ids)
    loaded = negatives.PQShards.load(tmp_path / "shards")  # as another rank sees them
    assert loaded.nprobe == 4 and loaded.ntotal == 5000
    np.testing.assert_array_equal(loaded.search(queries, 20)[1], want_ids)
    assert negatives.build_index(database[:1000], "ivfpq", cfg, shard_dir=tmp_path / "small").__class__ is not negatives.PQShards


def test_mining_from_pq_shards_equals_one_index(tmp_path):
    clustered_split(tmp_path / "features", n_images=600)
    base = {"features_dir": str(tmp_path / "features"), "k": 6, "index": "ivfpq", "pq_m": 8, "query_chunk": 64,
            "recall_sample": 50}
    one = negatives.mine(MineConfig(out_dir=str(tmp_path / "one"), **base), progress=False)["train"]
    sharded = negatives.mine(MineConfig(out_dir=str(tmp_path / "sharded"), shard_vectors=500, **base), progress=False)["train"]
    assert sharded["indexes"]["texts"]["shards"] > 1 and one["indexes"]["texts"]["shards"] == 1
    assert sharded["mine_params"] == one["mine_params"]  # the shard size changes no result
    for name in DIRECTIONS:
        assert pq.read_table(store.neighbors_path(tmp_path / "sharded", "train", name)).equals(
            pq.read_table(store.neighbors_path(tmp_path / "one", "train", name))), name


def test_neighbour_ids_are_read_a_row_group_at_a_time(tmp_path):
    """Writing `<direction>.ids.npy` holds one row group of the Parquet lists at a time (pyarrow's iter_batches held
    the file's whole column from its first batch on: 300 MB at 7M lists), and gives the lists' first k ids, -1
    padded."""
    path = store.neighbors_path(tmp_path, "train", "t2i")
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 400_000
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 12, n))]).astype(np.int32)
    values = rng.integers(0, 10**6, offsets[-1])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))
    scores = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.full(offsets[-1], 0.5, np.float32)))
    pq.write_table(pa.table({schema.neighbor_key_column("t2i"): np.arange(n), schema.NEIGHBOR_IDS: lists,
                             schema.NEIGHBOR_SCORES: scores}), path, row_group_size=4096)
    before = pa.total_allocated_bytes()
    held = max(pa.total_allocated_bytes() - before for _ in store._neighbor_batches(path, "t2i", 8))
    whole = n * 8 + int(offsets[-1]) * 8  # the keys and ids of the file, decoded
    assert held < whole / 8, (held, whole)  # 98 row groups: one at a time (~1 MB of 25 MB here)
    ids = np.load(store.write_neighbor_rows(tmp_path, "train", "t2i", 8))
    first = offsets[:-1, None] + np.arange(8)
    np.testing.assert_array_equal(ids, np.where(first < offsets[1:, None], values[np.minimum(first, len(values) - 1)], -1))


def test_search_chunked_equals_one_brute_force_search():
    rng = np.random.default_rng(0)
    database, queries = _unit(rng.standard_normal((300, 8))), _unit(rng.standard_normal((50, 8)))
    index = negatives.build_index(database, "flat", MineConfig())
    scores, ids = negatives.search_chunked(index, queries, 7, chunk=9)
    sim = queries @ database.T
    np.testing.assert_array_equal(ids, np.argsort(-sim, axis=1)[:, :7])
    np.testing.assert_allclose(scores, np.take_along_axis(sim, ids, axis=1), atol=1e-6)


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_positives_and_duplicate_captions_never_appear(tmp_path, index):
    duplicate_heavy_split(tmp_path / "features", n_images=300, seed=3)
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=8, index=index, query_chunk=64)
    negatives.mine(cfg, progress=False)
    image_emb, text_emb, text_image, caption_list = _inputs(tmp_path / "features")
    norm = np.array([captions.normalise_caption(c) for c in caption_list])
    groups_of_image = [set(norm[text_image == i]) for i in range(len(image_emb))]
    violations = {name: 0 for name in DIRECTIONS}
    for q, row in enumerate(_as_lists(cfg.out_dir, "train", "i2t")[0]):
        violations["i2t"] += sum(norm[c] in groups_of_image[q] for c in row)
    for q, row in enumerate(_as_lists(cfg.out_dir, "train", "t2i")[0]):
        violations["t2i"] += sum(c == text_image[q] or norm[q] in groups_of_image[c] for c in row)
    for q, row in enumerate(_as_lists(cfg.out_dir, "train", "i2i")[0]):
        violations["i2i"] += sum(c == q or bool(groups_of_image[q] & groups_of_image[c]) for c in row)
    for q, row in enumerate(_as_lists(cfg.out_dir, "train", "t2t")[0]):
        violations["t2t"] += sum(c == q or text_image[c] == text_image[q] or norm[c] == norm[q] for c in row)
    assert violations == {name: 0 for name in DIRECTIONS}
    # the rules had work to do: the unfiltered nearest text of most texts is a duplicate caption
    nearest = np.argsort(-(text_emb @ text_emb.T), axis=1)[:, 1]
    assert (norm[nearest] == norm).mean() > 0.5
    assert all(len(r) == cfg.k for r in _as_lists(cfg.out_dir, "train", "i2t")[0])


def clustered_split(features_dir, n_images=2000, dim=32, clusters=40, seed=0) -> None:
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((clusters, dim)))
    image_emb = _unit(centers[rng.integers(clusters, size=n_images)] + 0.12 * rng.standard_normal((n_images, dim)))
    text_image = np.arange(n_images)
    text_emb = _unit(image_emb + 0.08 * rng.standard_normal((n_images, dim)))
    write_features(features_dir, "train", image_emb, text_emb, text_image, [f"caption {i}" for i in range(n_images)])


@pytest.mark.parametrize("index", ["ivf", "hnsw", "ivfpq"])
def test_approximate_index_keeps_recall(tmp_path, index):
    clustered_split(tmp_path / "features")
    common = dict(features_dir=str(tmp_path / "features"), k=10, query_chunk=256, recall_sample=300, pq_m=8)
    exact = negatives.mine(MineConfig(out_dir=str(tmp_path / "exact"), index="flat", **common), progress=False)["train"]
    approx = negatives.mine(MineConfig(out_dir=str(tmp_path / index), index=index, **common), progress=False)["train"]
    assert all(exact["indexes"][db]["kind"] == "flat" for db in ("images", "texts"))
    assert all(approx["indexes"][db]["kind"] == index for db in ("images", "texts"))
    for name in DIRECTIONS:
        want, _ = store.read_neighbors(tmp_path / "exact", "train", name)
        got, got_scores = store.read_neighbors(tmp_path / index, "train", name)
        recall = negatives.recall_at_k(got, want)
        assert recall >= 0.95, (name, recall)
        assert approx["directions"][name]["recall_at_k"] >= 0.95
        assert abs(approx["directions"][name]["recall_at_k"] - recall) < 0.05  # the sample estimates the whole
        assert "recall_at_k" not in exact["directions"][name]
        # scores are exact cosines even where the index ranks with compressed codes
        image_emb, text_emb, _, _ = _inputs(tmp_path / "features")
        q_emb, db_emb = {"i2t": (image_emb, text_emb), "t2i": (text_emb, image_emb),
                         "i2i": (image_emb, image_emb), "t2t": (text_emb, text_emb)}[name]
        np.testing.assert_allclose(got_scores[:50], np.einsum("rd,rkd->rk", q_emb[:50], db_emb[got[:50]]), atol=1e-5)


def test_auto_picks_exact_below_threshold_and_approximate_above(tmp_path):
    clustered_split(tmp_path / "features", n_images=600)
    base = dict(features_dir=str(tmp_path / "features"), k=5, recall_sample=50)
    small = negatives.mine(MineConfig(out_dir=str(tmp_path / "a"), exact_threshold=601, **base), progress=False)["train"]
    large = negatives.mine(MineConfig(out_dir=str(tmp_path / "b"), exact_threshold=600, **base), progress=False)["train"]
    assert small["indexes"]["images"]["kind"] == "flat" and large["indexes"]["images"]["kind"] == "ivf"
    manifest = json.loads((tmp_path / "b" / "train" / schema.SPLIT_MANIFEST).read_text())
    assert manifest["directions"]["i2i"]["recall_sample"] == 50 and 0 <= manifest["directions"]["i2i"]["recall_at_k"] <= 1


def test_search_calls_never_exceed_query_chunk(tmp_path, monkeypatch):
    write_fake_features(tmp_path / "features", n_images=400, captions_per_image=2, dim=16, dtype="float32")
    calls = []
    real = negatives._search_block

    def watched(searcher, queries, k):
        calls.append((len(queries), k))
        return real(searcher, queries, k)

    monkeypatch.setattr(negatives, "_search_block", watched)
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=8, index="flat",
                     query_chunk=16, max_score=0.4)  # max_score forces deeper re-searches of some rows
    negatives.mine(cfg, progress=False)
    assert max(rows for rows, _ in calls) <= cfg.query_chunk
    assert max(k for _, k in calls) > 4 * cfg.k  # re-searches went deep, within the per-call budget
    budget = cfg.query_chunk * max(max(negatives.initial_depth(d, cfg) for d in _directions(tmp_path / "features", cfg)),
                                   negatives._DEEP_SLOTS_PER_QUERY)
    assert all(rows * k <= budget or rows == 1 for rows, k in calls)


def test_chunking_bounds_memory(tmp_path):
    write_fake_features(tmp_path / "features", n_images=1000, captions_per_image=2, dim=16, dtype="float32")
    base = dict(features_dir=str(tmp_path / "features"), k=8, index="flat")
    negatives.mine(MineConfig(out_dir=str(tmp_path / "warm-up"), **base), progress=False)  # one-time imports, tables
    tracemalloc.start()
    negatives.mine(MineConfig(out_dir=str(tmp_path / "neg"), query_chunk=32, **base), progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # numpy allocations are traced: one 2000 x 2000 (t2t) or 1000 x 2000 (i2t) float32 similarity
    # matrix would be 16 MB or 8 MB; chunked search stays at a fraction of one
    n_texts = 2000
    assert peak < n_texts * n_texts * 4 / 4, peak


def test_rerun_is_a_no_op_and_changed_inputs_recompute(tmp_path):
    features = tmp_path / "features"
    write_fake_features(features, n_images=50, captions_per_image=2, dim=16)
    cfg = MineConfig(features_dir=str(features), out_dir=str(tmp_path / "neg"), k=4, query_chunk=8)
    first = negatives.mine(cfg, progress=False)["train"]
    assert first["status"] == "mined"
    out = tmp_path / "neg" / "train"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(stamps) == {schema.SPLIT_MANIFEST} | {f"{d}.parquet" for d in DIRECTIONS} | {f"{d}.ids.npy" for d in DIRECTIONS}

    again = negatives.mine(MineConfig(**{**cfg.__dict__, "threads": 1, "query_chunk": 3}), progress=False)["train"]
    assert again["status"] == "up to date"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    assert negatives.mine(MineConfig(**{**cfg.__dict__, "k": 5}), progress=False)["train"]["status"] == "mined"
    assert store.read_neighbors(tmp_path / "neg", "train", "i2t")[0].shape[1] == 5

    write_fake_features(features, n_images=50, captions_per_image=2, dim=16, seed=1)  # a new extraction
    cfg5 = MineConfig(**{**cfg.__dict__, "k": 5})
    redo = negatives.mine(cfg5, progress=False)["train"]
    assert redo["status"] == "mined" and redo["features_fingerprint"] == store.features_fingerprint(features, "train")
    file_schema = pq.read_schema(out / "t2t.parquet")
    assert schema.read_metadata(file_schema, schema.META_FEATURES_FINGERPRINT) == redo["features_fingerprint"]

    (out / "i2i.parquet").unlink()  # a damaged output is redone, not trusted
    assert negatives.mine(cfg5, progress=False)["train"]["status"] == "mined"
    assert (out / "i2i.parquet").exists()
    (out / "t2i.ids.npy").unlink()  # so is a missing per-batch array (negatives mined before it existed)
    assert negatives.mine(cfg5, progress=False)["train"]["status"] == "mined"
    assert (out / "t2i.ids.npy").exists()


def test_output_schema_and_order(tmp_path):
    write_fake_features(tmp_path / "features", n_images=40, captions_per_image=3, dim=16)
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=5, range_min=1)
    negatives.mine(cfg, progress=False)
    for name in DIRECTIONS:
        table = pq.read_table(store.neighbors_path(cfg.out_dir, "train", name))
        key = schema.neighbor_key_column(name)
        assert table.schema.field(key).type == pa.int64()
        assert table.schema.field(schema.NEIGHBOR_IDS).type == pa.list_(pa.int64())
        assert table.schema.field(schema.NEIGHBOR_SCORES).type == pa.list_(pa.float32())
        assert table[key].to_pylist() == list(range(40 if name[0] == "i" else 120))
        assert schema.read_metadata(table.schema, schema.META_DIRECTION) == name
        assert schema.read_metadata(table.schema, schema.META_MINE_PARAMS, as_json=True) == negatives.mine_params(cfg)
        for row in table[schema.NEIGHBOR_SCORES].to_pylist():
            assert len(row) == 5 and all(a >= b for a, b in zip(row, row[1:]))
        # beside it, the same ids as one (keys, k) int32 array, which training reads per batch by row
        ids = np.load(store.neighbor_rows_path(cfg.out_dir, "train", name))
        assert ids.dtype == np.int32 and ids.tolist() == table[schema.NEIGHBOR_IDS].to_pylist()
        rows = store.neighbor_rows(cfg.out_dir, "train", name)
        np.testing.assert_array_equal(rows[np.array([3, 0, 7])], ids[[3, 0, 7]])


def test_bad_options_give_clear_errors(tmp_path):
    write_fake_features(tmp_path / "features", n_images=300, captions_per_image=1, dim=24)
    base = dict(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"))
    with pytest.raises(negatives.MineError, match="pq_m"):
        negatives.mine(MineConfig(index="ivfpq", pq_m=7, **base), progress=False)
    with pytest.raises(ConfigError, match="MineConfig.index: invalid value 'annoy'"):  # at construction, before any work
        MineConfig(index="annoy", **base)
    with pytest.raises(ConfigError, match="mine.k must be >= 1, got 0"):  # a range: the config's own check
        MineConfig(k=0, **base)
    with pytest.raises(store.ShardError, match="dsmd extract"):
        negatives.mine(MineConfig(**{**base, "splits": ["val"]}), progress=False)


def test_cli(tmp_path):
    from stages.mine import app

    write_fake_features(tmp_path / "features", n_images=30, captions_per_image=2, dim=16)
    args = ["--params", str(tmp_path / "none.yaml"), "--features-dir", str(tmp_path / "features"),
            "--out-dir", str(tmp_path / "neg"), "--split", "train", "--k", "3", "--index", "hnsw", "--threads", "1"]
    (tmp_path / "none.yaml").write_text("mine:\n  recall_sample: 20\n")
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recall@3" in result.output
    assert store.read_neighbors(tmp_path / "neg", "train", "t2i")[0].shape == (60, 3)
    assert "up to date" in runner.invoke(app, args).output
    bad = runner.invoke(app, args[:-4] + ["--index", "annoy"])
    assert bad.exit_code == 2 and "'--index'" in bad.output and "'annoy' is not one of" in bad.output  # lists the modes
    bad = runner.invoke(app, args + ["--set", "index=annoy"])
    assert bad.exit_code == 2 and "error:" in bad.output and "mine.index" in bad.output
    missing = runner.invoke(app, args + ["--split", "test"])
    assert missing.exit_code == 2 and "dsmd extract" in missing.output


@pytest.mark.slow
def test_two_ranks_mine_what_one_process_mines(tmp_path):
    """Under torchrun each rank searches its share of the queries with the index rank 0 built and wrote."""
    clustered_split(tmp_path / "features", n_images=700)
    params = tmp_path / "params.yaml"
    mine_cfg = {"features_dir": str(tmp_path / "features"), "k": 6, "index": "ivfpq", "pq_m": 8, "query_chunk": 64,
                "recall_sample": 100, "threads": 1, "shard_vectors": 300}  # in shards rank 0 writes
    params.write_text(yaml.safe_dump({"mine": mine_cfg}))
    single = negatives.mine(MineConfig(out_dir=str(tmp_path / "one"), **mine_cfg), progress=False)["train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "stages.mine", "--params", str(params), "--out-dir", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("train:") == 1  # rank 0 alone reports
    manifest = json.loads((tmp_path / "two" / "train" / schema.SPLIT_MANIFEST).read_text())
    assert manifest["world_size"] == 2 and not (tmp_path / "two" / "train" / negatives.WORK_DIR).exists()
    assert all(info["mapped"] for info in manifest["indexes"].values())  # one copy a node: every rank maps the file
    assert manifest["indexes"]["texts"]["shards"] > 1 and manifest["indexes"]["images"]["shards"] > 1
    for name in DIRECTIONS:
        assert pq.read_table(store.neighbors_path(tmp_path / "two", "train", name)).equals(
            pq.read_table(store.neighbors_path(tmp_path / "one", "train", name))), name
        np.testing.assert_array_equal(np.load(store.neighbor_rows_path(tmp_path / "two", "train", name)),
                                      np.load(store.neighbor_rows_path(tmp_path / "one", "train", name)))
        for key in ("short_rows", "retried_rows", "recall_at_k"):
            assert manifest["directions"][name][key] == single["directions"][name][key], (name, key)
