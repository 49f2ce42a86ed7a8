"""Training data from the shards: caption sampling, re-applied views, id lookups, samplers, the corpus source."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import models
from pipeline.common import atomic
from pipeline.features import schema, store
from pipeline.training import data as data_mod
from PIL import Image

from pipeline.common.config import ConfigError
from pipeline.corpus.augment import apply_view, decode_image, preprocess_batch
from tests.fakes import write_fake_features
from tests.tiny_corpus import write_tiny_corpus


def write_negatives(features_dir, negatives_dir, split: str = "train", k: int = 4, fingerprint: str | None = None) -> None:
    """Brute-force neighbours of the cached teacher embeddings in all four directions (own captions /
    own image / self excluded)."""
    image_emb, text_emb, text_to_image = store.load_embeddings(features_dir, split)
    fingerprint = fingerprint or store.features_fingerprint(features_dir, split)

    def put(direction: str, scores: np.ndarray) -> None:
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        table = pa.Table.from_pydict(
            {
                schema.neighbor_key_column(direction): pa.array(np.arange(len(scores)), pa.int64()),
                schema.NEIGHBOR_IDS: pa.array(ids.tolist(), pa.list_(pa.int64())),
                schema.NEIGHBOR_SCORES: pa.array(np.take_along_axis(scores, ids, 1).tolist(), pa.list_(pa.float32())),
            },
            schema=schema.neighbors_schema(direction, {schema.META_FEATURES_FINGERPRINT: fingerprint}),
        )
        atomic.atomic_write_table(table, store.neighbors_path(negatives_dir, split, direction))

    i2t = image_emb @ text_emb.T
    i2t[text_to_image[None, :] == np.arange(len(image_emb))[:, None]] = -np.inf
    i2i = image_emb @ image_emb.T
    np.fill_diagonal(i2i, -np.inf)
    t2i = i2t.T.copy()
    t2t = text_emb @ text_emb.T
    t2t[text_to_image[None, :] == text_to_image[:, None]] = -np.inf
    put("i2t", i2t)
    put("i2i", i2i)
    put("t2i", t2i)
    put("t2t", t2t)


@pytest.fixture(scope="module")
def student():
    return models.load_model("dsmd-test-student", "")


@pytest.fixture
def features(tmp_path):
    write_fake_features(tmp_path / "features", "train", n_images=40, captions_per_image=3, dim=32, views=2, seed=1)
    return tmp_path / "features"


def make_dataset(features, student, **kwargs) -> data_mod.TrainingDataset:
    data = data_mod.load_shards_data(features, "train")
    return data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, **kwargs)


def test_one_caption_per_image_per_epoch_deterministic_and_changing(features, student):
    dataset = make_dataset(features, student, seed=3)
    again = make_dataset(features, student, seed=3)
    data = dataset.data
    image_emb, text_emb, text_to_image = store.load_embeddings(features, "train")
    per_epoch = []
    for epoch in range(4):
        chosen = [dataset.choose(epoch, i)[0] for i in range(data.num_images)]
        assert chosen == [again.choose(epoch, i)[0] for i in range(data.num_images)]
        # exactly one caption, and it belongs to the image
        assert all(text_to_image[t] == i for i, t in enumerate(chosen))
        per_epoch.append(chosen)
    assert per_epoch[0] != per_epoch[1]
    used = {t for chosen in per_epoch for t in chosen}
    assert len(used) > data.num_images  # different epochs use different captions of the same image

    item = dataset[(2, 7)]
    text_id = per_epoch[2][7]
    assert item[data_mod.TEXT_ID] == text_id
    assert torch.equal(item[data_mod.TEXT], student.tokenizer([data.captions[text_id]])[0])
    # the teacher text embedding is the one stored for that text id (float16 storage)
    np.testing.assert_allclose(item[data_mod.TEACHER_TEXT].numpy(), text_emb[text_id], atol=1e-3)
    other_seed = make_dataset(features, student, seed=4)
    assert [other_seed.choose(0, i)[0] for i in range(data.num_images)] != per_epoch[0]


def test_batch_preprocess_is_bit_identical_to_per_image(student):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 20), (31, 17), (8, 40))]
    images.append(Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)))  # grey: converted to RGB first
    expected = torch.stack([student.preprocess(image) for image in images])
    assert torch.equal(preprocess_batch(student.preprocess, images), expected)
    # any other pipeline runs image by image
    flip = lambda image: student.preprocess(image).flip(-1)  # noqa: E731
    assert torch.equal(preprocess_batch(flip, images), expected.flip(-1))


def test_a_batch_equals_its_samples_and_tokenises_each_caption_once(features, student):
    calls = []

    def counting_tokenizer(texts):
        calls.append(len(texts))
        return student.tokenizer(texts)

    data = data_mod.load_shards_data(features, "train")
    dataset = data_mod.TrainingDataset(data, student.preprocess, counting_tokenizer, seed=0, use_views=True)
    keys = [(0, i) for i in range(16)]
    batch = dataset.__getitems__(keys)
    assert calls == [16]
    again = dataset.__getitems__(keys)
    assert calls == [16]  # every caption already tokenised
    assert torch.equal(again[data_mod.TEXT], batch[data_mod.TEXT])
    for row, key in enumerate(keys):
        text_id, view = dataset.choose(*key)
        image = decode_image(data.image_bytes[key[1]])
        if view >= 0:
            image = apply_view(image, data.view_params[key[1]][view])
        assert torch.equal(batch[data_mod.IMAGE][row], student.preprocess(image))
        assert torch.equal(batch[data_mod.TEXT][row], student.tokenizer([data.captions[text_id]])[0])
    assert set(batch[data_mod.VIEW_INDEX].tolist()) == {-1, 0, 1}  # crops of several sizes in one batch


def test_stored_views_are_reapplied_with_their_teacher_embedding(features, student):
    dataset = make_dataset(features, student, seed=0, use_views=True)
    data = dataset.data
    seen_views = set()
    for image_id in range(12):
        item = dataset[(0, image_id)]
        view = item[data_mod.VIEW_INDEX]
        seen_views.add(view)
        plain = decode_image(data.image_bytes[image_id])
        if view >= 0:
            expected = student.preprocess(apply_view(plain, data.view_params[image_id][view]))
            expected_teacher = data.teacher_views[image_id, view]
            assert not torch.equal(item[data_mod.IMAGE], student.preprocess(plain))
        else:
            expected = student.preprocess(plain)
            expected_teacher = data.teacher_image[image_id]
        assert torch.equal(item[data_mod.IMAGE], expected)
        np.testing.assert_array_equal(item[data_mod.TEACHER_IMAGE].numpy(), expected_teacher.astype(np.float32))
    assert seen_views == {-1, 0, 1}
    no_views = make_dataset(features, student, seed=0, use_views=False)
    assert {no_views[(0, i)][data_mod.VIEW_INDEX] for i in range(12)} == {-1}


@pytest.mark.parametrize("per_batch", [True, False], ids=["ids.npy per batch", "parquet whole"])
def test_mined_negatives_are_looked_up_by_id(features, student, tmp_path, per_batch):
    write_negatives(features, tmp_path / "negatives", k=3)
    if per_batch:  # what `dsmd mine` writes beside each direction's Parquet file
        for direction in schema.NEIGHBOR_DIRECTIONS:
            store.write_neighbor_rows(tmp_path / "negatives", "train", direction, 3)
    data = data_mod.load_shards_data(features, "train")
    negatives = data_mod.load_negatives(tmp_path / "negatives", "train", data, count=5, features_dir=features)
    dataset = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, negatives=negatives)
    i2t, _ = store.read_neighbors(tmp_path / "negatives", "train", "i2t")
    i2i, _ = store.read_neighbors(tmp_path / "negatives", "train", "i2i")
    for image_id in (0, 17, 39):
        item = dataset[(1, image_id)]
        # 3 mined, then padding up to the 5 asked for
        assert item[data_mod.MINED["i2i"][1]].tolist() == i2i[image_id].tolist() + [-1, -1]
        owners = item[data_mod.MINED["i2t"][1]].tolist()
        assert owners == data.text_to_image[i2t[image_id]].tolist() + [-1, -1]
        assert image_id not in owners
        np.testing.assert_array_equal(item[data_mod.MINED["i2t"][0]][:3].numpy(), data.teacher_text[i2t[image_id]].astype(np.float32))
        np.testing.assert_array_equal(item[data_mod.MINED["i2i"][0]][:3].numpy(), data.teacher_image[i2i[image_id]].astype(np.float32))
        assert not item[data_mod.MINED["i2i"][0]][3:].any()
        # the caption's own lists (t2t, t2i) for text anchors
        text_id = item[data_mod.TEXT_ID]
        t2t, _ = store.read_neighbors(tmp_path / "negatives", "train", "t2t")
        t2i, _ = store.read_neighbors(tmp_path / "negatives", "train", "t2i")
        assert item[data_mod.MINED["t2i"][1]].tolist() == t2i[text_id].tolist() + [-1, -1]
        assert item[data_mod.MINED["t2t"][1]].tolist() == data.text_to_image[t2t[text_id]].tolist() + [-1, -1]
        np.testing.assert_array_equal(item[data_mod.MINED["t2t"][0]][:3].numpy(), data.teacher_text[t2t[text_id]].astype(np.float32))
        np.testing.assert_array_equal(item[data_mod.MINED["t2i"][0]][:3].numpy(), data.teacher_image[t2i[text_id]].astype(np.float32))


@pytest.mark.parametrize("per_batch", [True, False], ids=["ids.npy per batch", "parquet whole"])
def test_negatives_outside_a_training_subset_become_padding(features, student, tmp_path, per_batch):
    write_negatives(features, tmp_path / "negatives", k=6)
    if per_batch:
        for direction in schema.NEIGHBOR_DIRECTIONS:
            store.write_neighbor_rows(tmp_path / "negatives", "train", direction, 6)
    data = data_mod.load_shards_data(features, "train")
    negatives = data_mod.load_negatives(tmp_path / "negatives", "train", data, count=6, features_dir=features)
    assert isinstance(negatives.lists["i2t"], store.RowFile) == per_batch
    subset = np.arange(10)
    kept = data_mod.restrict_negatives(negatives, subset, data.num_images)
    full = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, negatives=negatives)
    part = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, negatives=kept)
    padded = 0
    for image_id in range(0, 40, 3):
        everything, seen = full[(0, image_id)], part[(0, image_id)]
        for direction, (emb_key, owner_key) in data_mod.MINED.items():  # brute force, entry by entry
            owners = everything[owner_key].tolist()
            assert seen[owner_key].tolist() == [o if 0 <= o < 10 else -1 for o in owners]
            hidden = (seen[owner_key] < 0).numpy()
            assert not seen[emb_key][hidden].any()
            np.testing.assert_array_equal(seen[emb_key][~hidden].numpy(), everything[emb_key][~hidden].numpy())
            padded += int(hidden.sum() - (everything[owner_key] < 0).sum())
    assert padded > 0


def test_negatives_from_another_extraction_are_refused(features, student, tmp_path):
    write_negatives(features, tmp_path / "negatives", fingerprint="0" * 64)
    data = data_mod.load_shards_data(features, "train")
    with pytest.raises(data_mod.DataError, match="another extraction"):
        data_mod.load_negatives(tmp_path / "negatives", "train", data, count=2, features_dir=features)


def test_random_sampler_covers_each_image_once_per_epoch_and_splits_over_ranks():
    ids = np.arange(50)
    sampler = data_mod.GlobalBatchSampler(ids, batch_size=8, total_steps=14, seed=5)
    assert sampler.batches_per_epoch == 6
    epoch0 = np.concatenate([sampler.global_batch(s) for s in range(6)])
    assert len(set(epoch0.tolist())) == 48  # one pass, the incomplete last batch dropped
    epoch1 = np.concatenate([sampler.global_batch(s) for s in range(6, 12)])
    assert not np.array_equal(epoch0, epoch1)
    assert [e for e, _ in next(iter(sampler))] == [0] * 8
    full = list(sampler)
    # two ranks x two micro-batches see exactly the global batch of every step
    ranks = [
        list(data_mod.GlobalBatchSampler(ids, 8, 14, seed=5, rank=r, world_size=2, accum_steps=2)) for r in range(2)
    ]
    for step in range(14):
        pieces = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert [k for piece in pieces for k in piece] == full[step]
        assert all(len(p) == 2 for p in pieces)
    # starting mid-run yields the rest of the same sequence
    assert list(data_mod.GlobalBatchSampler(ids, 8, 14, seed=5, start_step=9)) == full[9:]
    # the ids held as a range (every image trainable) or as int32 give the very same batches
    assert list(data_mod.GlobalBatchSampler(data_mod.ImageRange(50), 8, 14, seed=5)) == full
    assert list(data_mod.GlobalBatchSampler(ids.astype(np.int32), 8, 14, seed=5)) == full
    with pytest.raises(ConfigError, match="divide evenly"):
        data_mod.GlobalBatchSampler(ids, 8, 14, world_size=3)


def test_hard_negative_aware_batches_contain_mined_neighbours():
    rng = np.random.default_rng(0)
    n, k, batch = 200, 3, 20
    i2i = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    ids = np.arange(n)

    def neighbour_share(sampler, steps):
        hits = total = 0
        for step in steps:
            members = set(sampler.global_batch(step).tolist())
            for i in members:
                hits += sum(int(j) in members for j in i2i[i])
                total += k
        return hits / total

    aware = data_mod.GlobalBatchSampler(ids, batch, 20, seed=1, batching="hard-negative-aware", i2i=i2i)
    plain = data_mod.GlobalBatchSampler(ids, batch, 20, seed=1)
    epoch = np.concatenate([aware.global_batch(s) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(n))  # still every image exactly once per epoch
    aware_share, plain_share = neighbour_share(aware, range(10)), neighbour_share(plain, range(10))
    assert aware_share > 0.2 and aware_share > 2 * plain_share  # random batches: about batch / n = 0.1
    # every anchor is followed by its unused neighbours
    order = data_mod.hard_negative_order(ids, i2i, seed=1, epoch=0)
    first = int(order[0])
    assert order[1 : 1 + k].tolist() == i2i[first].tolist()
    assert not np.array_equal(order, data_mod.hard_negative_order(ids, i2i, seed=1, epoch=1))
    assert np.array_equal(order, data_mod.hard_negative_order(ids, i2i, seed=1, epoch=0))
    with pytest.raises(ConfigError, match="i2i"):
        data_mod.GlobalBatchSampler(ids, batch, 20, batching="hard-negative-aware")


def test_loader_batches_collate(features, student, tmp_path):
    write_negatives(features, tmp_path / "negatives", k=2)
    data = data_mod.load_shards_data(features, "train")
    negatives = data_mod.load_negatives(tmp_path / "negatives", "train", data, count=2, features_dir=features)
    dataset = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, negatives=negatives)
    sampler = data_mod.GlobalBatchSampler(data.trainable_image_ids(), 8, 3, seed=0)
    batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=1, collate_fn=data_mod.keep_batch))
    assert len(batches) == 3
    assert batches[0][data_mod.IMAGE].shape == (8, 3, 16, 16)
    assert batches[0][data_mod.MINED["i2t"][0]].shape == (8, 2, 32)
    assert batches[1][data_mod.IMAGE_ID].tolist() == sampler.global_batch(1).tolist()


def test_clip_from_shards_reads_no_teacher_embeddings_but_the_same_views(features, student):
    data = data_mod.load_shards_data(features, "train", with_teacher=False)
    assert data.teacher_image is None and data.teacher_text is None and data.teacher_views is None
    assert data.num_images == 40 and len(data.captions) == 120
    # the CLIP-only student is shown exactly the images (plain or view) the distilled student is shown
    clip = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, seed=0, use_views=True)
    dsmd = make_dataset(features, student, seed=0, use_views=True)
    keys = [(1, i) for i in range(16)]
    clip_batch, dsmd_batch = clip.__getitems__(keys), dsmd.__getitems__(keys)
    assert set(clip_batch[data_mod.VIEW_INDEX].tolist()) == {-1, 0, 1}
    for name in (data_mod.IMAGE, data_mod.TEXT, data_mod.VIEW_INDEX):
        assert torch.equal(clip_batch[name], dsmd_batch[name]), name
    assert data_mod.TEACHER_IMAGE not in clip_batch


def test_corpus_source_counts_and_skips_corrupt_images(tmp_path, student):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=2, per_shard=5, corrupt={"train0_002", "train1_004"})
    data = data_mod.load_corpus_data(manifest, "train")
    assert data.num_images == 8
    assert data.skipped["counts"] == {"corrupt_image": 2}
    assert data.teacher_image is None
    # every caption of every kept sample, owned by the right image
    assert len(data.captions) == len(data.text_to_image) == sum(len(data.captions_of(i)) for i in range(8))
    dataset = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer)
    item = dataset[(0, 3)]
    assert data.text_to_image[item[data_mod.TEXT_ID]] == 3 and data_mod.TEACHER_IMAGE not in item


def test_cached_tokens_are_packed_and_come_back_bit_for_bit(features, student):
    """The token cache keeps each caption without its padding; a batch equals the tokenizer's own output."""
    rows = student.tokenizer(["a red circle", "", " ".join(["word"] * 200)])  # short, empty, cut at the context
    hf_like = torch.tensor([[5, 7, 9, 1, 1, 1], [1, 1, 1, 1, 1, 1], [5, 1, 7, 1, 1, 1]])  # pad_token_id 1, not 0
    for row in [*rows, *hf_like]:
        packed = data_mod.pack_tokens(row)
        assert torch.equal(torch.from_numpy(data_mod.unpack_tokens(packed, len(row))), row)
    assert len(data_mod.pack_tokens(rows[0])) < rows[0].numel() * rows[0].element_size() / 4  # 24 bytes, not 128
    data = data_mod.load_shards_data(features, "train")
    dataset = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer)
    keys = [(0, i) for i in range(12)] + [(1, i) for i in range(12)]
    for batch_keys in (keys[:12], keys[12:], keys[:12]):  # the last read from the cache alone
        batch = dataset.__getitems__(batch_keys)
        expected = student.tokenizer([data.captions[t] for t in batch[data_mod.TEXT_ID].tolist()])
        assert batch[data_mod.TEXT].dtype == expected.dtype and torch.equal(batch[data_mod.TEXT], expected)


def test_prepared_images_are_kept_up_to_the_cap_and_batches_do_not_change(features, student, monkeypatch):
    """Images prepared once (decoded, view re-applied, resized) and kept give the batches of images prepared every
    time, epoch after epoch; past the cap the rest are prepared per batch."""
    keys = [(epoch, i) for epoch in range(6) for i in range(40)]
    monkeypatch.setattr(data_mod, "IMAGE_CACHE_BYTES", 0)
    uncached = make_dataset(features, student, seed=2)
    expected = [uncached.__getitems__(keys[j : j + 20]) for j in range(0, len(keys), 20)]
    assert uncached._prepared == {}
    variants = {(key[1], uncached.choose(*key)[1]) for key in keys}  # (view, image) pairs drawn
    for cap in (10**9, 1):
        monkeypatch.setattr(data_mod, "IMAGE_CACHE_BYTES", cap)
        dataset = make_dataset(features, student, seed=2)
        reads = []
        original = dataset.data.image_bytes
        monkeypatch.setattr(dataset.data, "image_bytes", type("Counting", (), {
            "__getitem__": lambda self, i: reads.append(i) or original[i], "__len__": lambda self: len(original)})())
        for j, want in zip(range(0, len(keys), 20), expected):
            batch = dataset.__getitems__(keys[j : j + 20])
            assert batch.keys() == want.keys() and all(torch.equal(batch[k], want[k]) for k in want)
        assert dataset._prepared_bytes <= cap
        # with room, each (image, view) drawn is read and prepared once; without, every draw reads it again
        assert len(reads) == (len(variants) if cap > 1 else len(keys))
        assert len(dataset._prepared) == (len(variants) if cap > 1 else 0)


def test_trainable_ids_are_a_range_when_every_image_has_a_caption_else_the_int32_ids():
    some = data_mod.TrainingData(source="t", image_bytes=[b""] * 4, captions=["a", "b", "c"], text_to_image=[0, 0, 2])
    trainable = some.trainable_image_ids()
    assert trainable.dtype == np.int32 and trainable.tolist() == [0, 2]
    every = data_mod.TrainingData(source="t", image_bytes=[b""] * 3, captions=["a", "b", "c"], text_to_image=[2, 0, 1])
    ids = every.trainable_image_ids()
    assert isinstance(ids, data_mod.ImageRange) and np.asarray(ids).tolist() == [0, 1, 2]
    assert np.asarray(ids[:2]).tolist() == [0, 1] and ids[[2, 0]].tolist() == [2, 0]
    assert every.captions_of(2).tolist() == [0]
