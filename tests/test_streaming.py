"""Corpora larger than memory: images referenced in their source shards (not copied), teacher embeddings read
per batch from the split's .npy files, and the same training as from memory."""
from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import models
from pipeline.common import names
from pipeline.common.config import ExtractConfig
from pipeline.features import extract as extract_mod, schema, store
from pipeline.training import data as data_mod, loop
from tests.conftest import REPO_ROOT
from tests.test_extract import _teacher
from tests.test_training import STUDENT, make_cfg, read_log, train_until_killed
from tests.tiny_corpus import write_tiny_corpus


def _extract(manifest: Path, out: Path, teacher: Path, **options) -> Path:
    cfg = ExtractConfig(manifest=str(manifest), out_dir=str(out), splits=["train"], batch_size=8, num_workers=0,
                        threads=1, zeroshot=False, **options)
    extract_mod.extract(cfg, _teacher(teacher))
    return out


def _mine(features: Path, negatives: Path) -> None:
    from tests.test_data import write_negatives
    write_negatives(features, negatives, k=4)


@pytest.fixture(scope="module")
def both_stores(tmp_path_factory, teacher_checkpoint):
    """The same tiny corpus extracted twice, with 2 augmentation views: images copied and referenced."""
    root = tmp_path_factory.mktemp("stores")
    manifest = write_tiny_corpus(root / "corpus", shards_per_split=3, per_shard=8, splits=("train",))
    copied = _extract(manifest, root / "copied", teacher_checkpoint, store_images=True, views=2)
    referenced = _extract(manifest, root / "referenced", teacher_checkpoint, store_images=False, views=2)
    for features in (copied, referenced):
        _mine(features, features.parent / f"{features.name}-negatives")
    return root, copied, referenced


def _batches(features: Path, stream: bool, keys) -> list[dict]:
    student = models.load_model(STUDENT, "")
    data = data_mod.load_shards_data(features, "train", stream=stream)
    negatives = data_mod.load_negatives(features.parent / f"{features.name}-negatives", "train", data, 3, features)
    dataset = data_mod.TrainingDataset(data, student.preprocess, student.tokenizer, seed=5, negatives=negatives)
    return [dataset.__getitems__(chunk) for chunk in keys]


def test_referenced_and_copied_features_give_identical_training_batches(both_stores):
    root, copied, referenced = both_stores
    images = store.read_images(referenced, "train")
    assert images[schema.IMAGE_BYTES].null_count == images.num_rows  # nothing copied
    assert store.image_bytes(referenced, "train").referenced and not store.image_bytes(copied, "train").referenced
    keys = [[(epoch, i) for i in range(j, 24, 3)] for epoch in (0, 1) for j in range(3)]
    want = _batches(copied, False, keys)
    for stream in (False, True):
        got = _batches(referenced, stream, keys)
        for a, b in zip(want, got):
            assert a.keys() == b.keys()
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert (want[0][data_mod.VIEW_INDEX] >= 0).any()  # the views were re-applied, from the streamed arrays too

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size(referenced) < size(copied) - sum(len(b) for b in store.image_bytes(copied, "train")) * 0.9


def test_the_embedding_arrays_equal_the_parquet_columns(both_stores):
    _, _, referenced = both_stores
    images, texts = store.read_images(referenced, "train"), store.read_texts(referenced, "train")
    rows = store.embedding_rows(referenced, "train", schema.TEACHER_TEXT_EMB)
    parquet = schema.embeddings_to_numpy(texts[schema.TEACHER_TEXT_EMB], np.float16)
    np.testing.assert_array_equal(rows[:], parquet)
    np.testing.assert_array_equal(rows[[5, 0, 5, 17]], parquet[[5, 0, 5, 17]])
    assert [start for start, _ in rows.chunks(7)] == list(range(0, len(parquet), 7))
    views = store.embedding_rows(referenced, "train", schema.TEACHER_VIEW_EMB)
    assert views.shape == (images.num_rows, 2, parquet.shape[1])
    np.testing.assert_array_equal(views[[3, 4], [1, 0]], np.stack([views[:][3, 1], views[:][4, 0]]))


def _train_cfg(features: Path, out: Path, **changes):
    cfg = make_cfg((features, features.parent / f"{features.name}-negatives"), out, max_steps=9, batch_size=8,
                   checkpoint_every=4, num_workers=1)
    return dataclasses.replace(cfg, batching="hard-negative-aware", **changes)


def _same_checkpoints(a_dir, b_dir) -> None:
    a = torch.load(Path(a_dir) / names.CHECKPOINT_FILE, weights_only=True)
    b = torch.load(Path(b_dir) / names.CHECKPOINT_FILE, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(a["queue"]["image"], b["queue"]["image"], rtol=0, atol=0)


def test_streamed_training_equals_training_from_memory_and_resumes_exactly(both_stores, tmp_path, monkeypatch):
    root, copied, referenced = both_stores
    loop.train(_train_cfg(copied, tmp_path / "memory", data_loading="memory"))
    streamed = _train_cfg(referenced, tmp_path / "stream", data_loading="stream")
    loop.train(streamed)
    _same_checkpoints(tmp_path / "memory", tmp_path / "stream")

    cut = dataclasses.replace(streamed, out_dir=str(tmp_path / "cut"))
    train_until_killed(monkeypatch, cut, 7)
    assert loop.train(cut, resume=True)["resumed_from_step"] == 4
    _same_checkpoints(tmp_path / "stream", cut.out_dir)
    assert [r["step"] for r in read_log(cut.out_dir)] == list(range(1, 10))


def test_a_changed_or_vanished_source_shard_is_refused_with_its_name(both_stores, tmp_path):
    root, _, referenced = both_stores
    shard = root / "corpus" / "train-000001.tar"
    original = shard.read_bytes()
    stat = shard.stat()
    try:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: still accepted
        assert len(store.image_bytes(referenced, "train")) == 24
        changed = bytearray(original)
        changed[2000] ^= 0xFF
        shard.write_bytes(bytes(changed))
        with pytest.raises(store.ShardError, match=f"{shard} changed since `dsmd extract`"):
            loop.train(_train_cfg(referenced, tmp_path / "a"))
        shard.unlink()
        with pytest.raises(store.ShardError, match=f"{shard}: the images of features split 'train' are referenced"):
            loop.train(_train_cfg(referenced, tmp_path / "b"))
    finally:
        shard.write_bytes(original)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_store_images_false_refuses_a_compressed_shard_by_name(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=1, per_shard=4, splits=("train",))
    plain = tmp_path / "corpus" / "train-000000.tar"
    with tarfile.open(plain) as source, tarfile.open(tmp_path / "corpus" / "train-000000.tar.gz", "w:gz") as packed:
        for member in source.getmembers():
            packed.addfile(member, source.extractfile(member))
    manifest.write_text(manifest.read_text().replace("train-{000000..000000}.tar", "train-{000000..000000}.tar.gz"))
    with pytest.raises(extract_mod.PipelineError, match=r"train-000000.tar.gz is not a local uncompressed .tar"):
        _extract(manifest, tmp_path / "features", teacher_checkpoint)
    assert _extract(manifest, tmp_path / "copied", teacher_checkpoint, store_images=True).exists()  # copies are fine


def _write_heavy_corpus(root: Path, images: int, padding: int) -> Path:
    """PNG images each followed by `padding` bytes (decoders ignore data after the image's end), so the
    corpus is large on disk while the model's work stays tiny."""
    root.mkdir(parents=True)
    filler = os.urandom(padding)
    per_shard = 25
    for shard in range(images // per_shard):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key, colour = f"s{shard}_{i:03d}", (shard * 37 % 255, i * 11 % 255, 90)
                buf = io.BytesIO()
                Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
                for name, data in ((f"{key}.png", buf.getvalue() + filler), (f"{key}.txt", f"colour {colour}\nsquare {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest = {"name": "heavy", "fields": {"image": ["png"], "captions": {"source": "txt"}},
                "splits": {"train": {"shards": f"train-{{000000..{images // per_shard - 1:06d}}}.tar"}}}
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root / "manifest.yaml"


# VmHWM, the peak of this process image (ru_maxrss survives execve: it would start at the forking pytest's size)
RSS_OF_CHILD = """import runpy, sys
sys.argv = ["dsmd-train", *sys.argv[1:]]
try:
    runpy.run_module("stages.train", run_name="__main__")
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"peak_rss_kib={peak}", file=sys.stderr)
"""


@pytest.mark.slow
def test_training_on_a_corpus_several_times_larger_than_the_process_completes(tmp_path, teacher_checkpoint):
    # 3.6 GB of image bytes; importing torch and open_clip alone takes ~0.8 GB of resident memory here
    manifest = _write_heavy_corpus(tmp_path / "corpus", images=600, padding=6 * 2**20)
    features = _extract(manifest, tmp_path / "features", teacher_checkpoint)
    corpus_bytes = sum(p.stat().st_size for p in (tmp_path / "corpus").glob("*.tar"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {
        "model": STUDENT, "loss": "clip", "features_dir": str(features), "data_loading": "stream", "live_dir": "",
        "val_every": 0, "optim": {"epochs": 1, "batch_size": 32, "threads": 1, "num_workers": 0, "log_every": 5},
    }}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", RSS_OF_CHILD, "--params", str(params), "--out-dir", str(tmp_path / "s")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = int(result.stderr.rsplit("peak_rss_kib=", 1)[1].split()[0]) * 1024
    summary = yaml.safe_load((tmp_path / "s" / names.TRAIN_SUMMARY_FILE).read_text())
    assert summary["steps"] == 600 // 32 + 1  # a whole epoch: every image was read
    assert corpus_bytes > 3 * peak, (corpus_bytes, peak)


def test_referenced_images_keep_few_shards_open(both_stores, monkeypatch):
    """A corpus has thousands of shards: reading across them keeps only the most recent few open, and a
    shard closed and opened again reads the same bytes."""
    _, copied, referenced = both_stores
    monkeypatch.setattr(store, "_OPEN_SHARDS", 2)
    images, copies = store.image_bytes(referenced, "train"), store.image_bytes(copied, "train")
    order = [0, 9, 17, 1, 10, 18, 2, 23]  # shards 0, 1, 2, 0, 1, 2, ...
    assert [images[i] for i in order] == [copies[i] for i in order]
    assert len(images._fds) == 2 and len(set(images.shard_index[order].tolist())) == 3


def _without_lookups(features: Path, out: Path) -> Path:
    """A copy of `features` as written before the per-id lookups existed (manifest key and files gone), mined again."""
    import json
    import shutil

    shutil.copytree(features, out)
    marker = out / "train" / schema.SPLIT_MANIFEST
    manifest = json.loads(marker.read_text())
    for name, entry in manifest.pop(schema.LOOKUPS_KEY).items():
        if name != schema.LOOKUP_SHARDS:
            (out / "train" / entry["path"]).unlink()
    marker.write_text(json.dumps(manifest))
    _mine(out, out.parent / f"{out.name}-negatives")
    return out


def test_the_per_id_lookups_equal_the_tables_and_nothing_per_id_is_held(both_stores):
    _, copied, referenced = both_stores
    texts, images = store.read_texts(referenced, "train"), store.read_images(referenced, "train")
    found = store.lookups(referenced, "train")
    owners = texts[schema.IMAGE_ID].to_numpy()
    np.testing.assert_array_equal(found[schema.TEXT_IMAGE_IDS][:], owners)
    np.testing.assert_array_equal(found[schema.TEXT_OFFSETS][:], np.searchsorted(owners, np.arange(images.num_rows + 1)))
    np.testing.assert_array_equal(found[schema.IMAGE_OFFSETS][:], images[schema.IMAGE_OFFSET].to_numpy())
    np.testing.assert_array_equal(found[schema.IMAGE_SIZES][:], images[schema.IMAGE_SIZE].to_numpy())
    assert [found[schema.LOOKUP_SHARDS][i] for i in found[schema.IMAGE_SHARD_INDEX][:]] == images[schema.SOURCE_SHARD].to_pylist()
    captions = store.Captions(found[schema.CAPTION_OFFSETS], found[schema.CAPTION_UTF8])
    assert [captions[i] for i in range(len(captions))] == texts[schema.CAPTION].to_pylist()

    data = data_mod.load_shards_data(referenced, "train", stream=True)
    per_id = [data.text_to_image, data.text_offsets, data.image_bytes.shard_index, data.image_bytes.offsets,
              data.image_bytes.sizes, data.teacher_image, data.teacher_text, data.teacher_views]
    assert all(isinstance(rows, store.RowFile) for rows in per_id) and isinstance(data.captions, store.Captions)
    every = data.trainable_image_ids()  # every image has a caption: nothing held for the ids
    assert isinstance(every, data_mod.ImageRange) and len(every) == data.num_images
    np.testing.assert_array_equal(np.asarray(every[:5]), np.arange(5))
    for seed, epoch in ((0, 0), (3, 7)):  # the same batch order as from the int64 array of earlier versions
        order = data_mod.random_order(every, seed, epoch)
        assert order.dtype == np.int32
        np.testing.assert_array_equal(order, np.random.default_rng((seed, epoch, 0)).permutation(np.arange(data.num_images)))


def test_features_without_lookups_still_load_and_give_the_same_batches_and_student(both_stores, tmp_path):
    root, copied, referenced = both_stores
    keys = [[(epoch, i) for i in range(j, 24, 3)] for epoch in (0, 2) for j in range(3)]
    for features in (referenced, copied):
        legacy = _without_lookups(features, tmp_path / f"legacy-{features.name}")
        assert store.lookups(legacy, "train") is None
        old, new = data_mod.load_shards_data(legacy, "train"), data_mod.load_shards_data(features, "train")
        np.testing.assert_array_equal(old.trainable_image_ids(), new.trainable_image_ids())
        assert [list(old.captions_of(i)) for i in range(old.num_images)] == [list(new.captions_of(i)) for i in range(new.num_images)]
        for stream in (False, True):
            for a, b in zip(_batches(legacy, stream, keys), _batches(features, stream, keys)):
                assert a.keys() == b.keys()
                for name in a:
                    torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    legacy = tmp_path / f"legacy-{referenced.name}"
    loop.train(_train_cfg(legacy, tmp_path / "old", data_loading="stream"))
    loop.train(_train_cfg(referenced, tmp_path / "new", data_loading="stream"))
    _same_checkpoints(tmp_path / "old", tmp_path / "new")


def test_lookups_are_not_written_for_texts_out_of_image_order_and_a_truncated_one_is_named(both_stores, tmp_path):
    _, _, referenced = both_stores
    texts = store.read_texts(referenced, "train")
    images = store.read_images(referenced, "train")
    shuffled = texts.take(np.random.default_rng(0).permutation(texts.num_rows))
    assert store._write_lookups(tmp_path, [images], [shuffled]) == {}
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(referenced, broken)
    path = broken / "train" / schema.array_file(schema.CAPTION_OFFSETS)
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(store.ShardError, match=str(path)):
        store.lookups(broken, "train")
