"""`dsmd extract`: embeddings equal the model's, resume equals a clean run, ranks split the work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.common import atomic
from pipeline.common.config import ExtractConfig, TeacherConfig
from pipeline.common.errors import PipelineError
from pipeline.corpus import augment
from pipeline.features import extract as extract_mod, schema, store
from pipeline.models import load_model
from stages.extract import app
from tiny_corpus import write_tiny_corpus

REPO = Path(__file__).resolve().parent.parent
TEACHER = TeacherConfig(model="dsmd-test-teacher", pretrained="")


def _cfg(manifest: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(manifest=str(manifest), out_dir=str(out), splits=["train", "test"], batch_size=4,
                         num_workers=0, threads=1, **kw)


def _teacher(ckpt: Path) -> TeacherConfig:
    return TeacherConfig(model="dsmd-test-teacher", pretrained=str(ckpt))


def _tables(out: Path, split: str):
    return store.read_images(out, split), store.read_texts(out, split)


def test_embeddings_equal_direct_model_call(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "features"
    result = extract_mod.extract(_cfg(manifest, out), _teacher(teacher_checkpoint))
    assert result["train"]["num_images"] == 12 and result["test"]["num_images"] == 12

    images, texts = _tables(out, "train")
    assert images[schema.IMAGE_ID].to_pylist() == list(range(12))
    assert texts[schema.TEXT_ID].to_pylist() == list(range(texts.num_rows))
    # several captions per image, each pointing at its image
    counts = np.bincount(texts[schema.IMAGE_ID].to_numpy())
    assert set(counts) == {2, 3}

    loaded = load_model("dsmd-test-teacher", str(teacher_checkpoint))
    with torch.no_grad():
        pixels = torch.stack([loaded.preprocess(augment.decode_image(b)) for b in store.image_bytes(out, "train")])
        direct_image = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
        tokens = loaded.tokenizer(texts[schema.CAPTION].to_pylist())
        direct_text = torch.nn.functional.normalize(loaded.model.encode_text(tokens), dim=-1).numpy()
    stored_image = schema.embeddings_to_numpy(images[schema.TEACHER_IMAGE_EMB])
    stored_text = schema.embeddings_to_numpy(texts[schema.TEACHER_TEXT_EMB])
    np.testing.assert_allclose(stored_image, direct_image, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(stored_text, direct_text, atol=2e-3)
    assert np.allclose(np.linalg.norm(stored_image, axis=1), 1, atol=2e-3)

    # identity and manifest hash travel with the data
    file_schema = pq.read_schema(out / "train" / "images-000000.parquet")
    identity = schema.read_metadata(file_schema, schema.META_TEACHER, as_json=True)
    assert identity["model"] == "dsmd-test-teacher"
    assert identity["checkpoint_sha256"] == atomic.sha256_file(teacher_checkpoint)
    split_manifest = store.load_split_manifest(out, "train")
    assert split_manifest["manifest_sha256"] == atomic.sha256_file(manifest)
    for entry in split_manifest["files"]["images"]:
        assert atomic.sha256_file(out / "train" / entry["path"]) == entry["sha256"]
    assert not (out / "train" / schema.PARTS_DIR).exists()


def test_float32_storage(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=1, splits=("train",))
    out = tmp_path / "features"
    cfg = _cfg(manifest, out, embedding_dtype="float32")
    cfg.splits = ["train"]
    extract_mod.extract(cfg, _teacher(teacher_checkpoint))
    images = store.read_images(out, "train")
    assert images.schema.field(schema.TEACHER_IMAGE_EMB).type.value_type == schema.EMBEDDING_DTYPES["float32"]


def test_corrupt_images_are_counted_not_fatal(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", corrupt={"train0_001", "train1_004"})
    out = tmp_path / "features"
    result = extract_mod.extract(_cfg(manifest, out), _teacher(teacher_checkpoint))
    assert result["train"]["num_images"] == 10
    skipped = result["train"]["skipped"]
    assert skipped["counts"]["corrupt_image"] == 2
    assert sorted(k for _, k in skipped["examples"]["corrupt_image"]) == ["train0_001", "train1_004"]
    keys = store.read_images(out, "train")[schema.KEY].to_pylist()
    assert "train0_001" not in keys and len(keys) == 10


def test_interrupted_run_resumes_to_identical_tables(tmp_path, teacher_checkpoint, monkeypatch):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=3)
    clean = tmp_path / "clean"
    extract_mod.extract(_cfg(manifest, clean), _teacher(teacher_checkpoint))

    resumed = tmp_path / "resumed"
    real = extract_mod._write_part
    calls = []

    def dies_on_second_shard(index, *args, **kwargs):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(extract_mod, "_write_part", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract_mod.extract(_cfg(manifest, resumed), _teacher(teacher_checkpoint))
    assert not (resumed / "train" / schema.SPLIT_MANIFEST).exists()  # incomplete split is not marked done
    assert (resumed / "train" / schema.PARTS_DIR / "skips-000000.json").exists()

    calls.clear()
    monkeypatch.setattr(extract_mod, "_write_part", lambda index, *a, **k: (calls.append(index), real(index, *a, **k))[1])
    extract_mod.extract(_cfg(manifest, resumed), _teacher(teacher_checkpoint))
    assert calls[:2] == [1, 2]  # train shard 0 was not redone
    for split in ("train", "test"):
        for a, b in zip(_tables(clean, split), _tables(resumed, split)):
            assert a.equals(b)
    # a third run has nothing to do
    calls.clear()
    extract_mod.extract(_cfg(manifest, resumed), _teacher(teacher_checkpoint))
    assert calls == []


def test_changed_teacher_is_refused(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=1)
    out = tmp_path / "features"
    extract_mod.extract(_cfg(manifest, out), _teacher(teacher_checkpoint))
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(load_model("dsmd-test-teacher", "").model.state_dict(), other)
    with pytest.raises(extract_mod.ExtractMismatchError, match="checkpoint_sha256"):
        extract_mod.extract(_cfg(manifest, out), _teacher(other))
    # --overwrite discards and redoes
    result = extract_mod.extract(_cfg(manifest, out), _teacher(other), overwrite=True)
    assert result["train"]["teacher"]["checkpoint_sha256"] == atomic.sha256_file(other)


def test_views_store_parameters_that_reproduce_the_embedding(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=1, splits=("train",))
    out = tmp_path / "features"
    cfg = _cfg(manifest, out, views=3, embedding_dtype="float32")
    cfg.splits = ["train"]
    extract_mod.extract(cfg, _teacher(teacher_checkpoint))
    images = store.read_images(out, "train")
    loaded = load_model("dsmd-test-teacher", str(teacher_checkpoint))
    row = 2
    params = images[schema.VIEW_PARAMS][row].as_py()
    stored = np.array(images[schema.TEACHER_VIEW_EMB][row].as_py(), np.float32)
    assert len(params) == 3 and stored.shape == (3, loaded.embed_dim)
    image = augment.decode_image(store.image_bytes(out, "train")[row])
    with torch.no_grad():
        pixels = torch.stack([loaded.preprocess(augment.apply_view(image, p)) for p in params])
        direct = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(stored, direct, atol=1e-4)
    plain = schema.embeddings_to_numpy(images[schema.TEACHER_IMAGE_EMB])[row]
    assert not np.allclose(stored[0], plain, atol=1e-3)  # a view is not the plain image


def test_only_the_view_splits_get_views(tmp_path, teacher_checkpoint):
    """Evaluation never reads views, and each costs a teacher pass: the test split is embedded once."""
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=1)
    out = tmp_path / "features"
    result = extract_mod.extract(_cfg(manifest, out, views=2), _teacher(teacher_checkpoint))
    assert result["train"]["views"] == 2 and result["test"]["views"] == 0
    assert schema.TEACHER_VIEW_EMB in store.read_images(out, "train").column_names
    assert schema.TEACHER_VIEW_EMB not in store.read_images(out, "test").column_names
    with pytest.raises(PipelineError, match="trian"):  # a typo would otherwise store no views at all
        extract_mod.extract(_cfg(manifest, tmp_path / "typo", views=2, view_splits=["trian"]), _teacher(teacher_checkpoint))


def test_cli_reports_bad_manifest_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["--manifest", str(tmp_path / "nope.yaml"), "--out-dir", str(tmp_path / "f")])
    assert result.exit_code == 2
    assert "nope.yaml" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path, teacher_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=3, splits=("train",))
    empty_params = tmp_path / "empty.yaml"
    empty_params.write_text("{}\n")
    args = ["--manifest", str(manifest), "--split", "train", "--batch-size", "4", "--num-workers", "0",
            "--threads", "1", "--device", "cpu", "--teacher-model", "dsmd-test-teacher",
            "--teacher-pretrained", str(teacher_checkpoint), "--params", str(empty_params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "stages.extract", *args, "--out-dir", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "stages.extract", *args, "--out-dir", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(_tables(tmp_path / "one", "train"), _tables(tmp_path / "two", "train")):
        assert a.equals(b)


def test_flickr8k_sample_end_to_end(tmp_path, teacher_checkpoint, flickr8k_dir):
    """The real-format sample through the shipped manifest: JPEGs, 5 captions a line each."""
    manifest = REPO / "data_manifest" / "flickr8k-sample.yaml"
    out = tmp_path / "features"
    cfg = ExtractConfig(manifest=str(manifest), out_dir=str(out), splits=["train", "test"], batch_size=64,
                        num_workers=0, threads=1)
    result = extract_mod.extract(cfg, _teacher(teacher_checkpoint))
    assert result["train"]["num_images"] == 200 and result["test"]["num_images"] == 100
    assert result["train"]["num_texts"] == 1000 and result["test"]["num_texts"] == 500
    images, texts = _tables(out, "test")
    assert set(images[schema.IMAGE_FORMAT].to_pylist()) == {"jpg"}
    assert store.image_bytes(out, "test")[0][:2] == b"\xff\xd8"  # the source JPEG, byte for byte (referenced)
    assert np.all(np.bincount(texts[schema.IMAGE_ID].to_numpy()) == 5)
    assert all(c.strip() for c in texts[schema.CAPTION].to_pylist())


def test_decoding_workers_do_not_change_the_tables(tmp_path, teacher_checkpoint):
    """Shards are decoded and tokenised in DataLoader workers; batches never cross a shard, so the
    result is the same with 0 or 2 workers (and the shards may finish in any order)."""
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=3, splits=("train",), corrupt={"train1_002"})
    for workers in (0, 2):
        cfg = _cfg(manifest, tmp_path / f"w{workers}")
        cfg.splits, cfg.num_workers = ["train"], workers
        extract_mod.extract(cfg, _teacher(teacher_checkpoint))
    for a, b in zip(_tables(tmp_path / "w0", "train"), _tables(tmp_path / "w2", "train")):
        assert a.equals(b)
    assert store.load_split_manifest(tmp_path / "w2", "train")["skipped"]["counts"] == {"corrupt_image": 1}


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "-1")])
def test_bad_batch_size_is_one_error_line_before_any_work(tmp_path, option, value):
    result = CliRunner().invoke(app, ["--manifest", str(tmp_path / "m.yaml"), "--out-dir", str(tmp_path / "f"), option, value])
    assert result.exit_code == 2
    assert "error: extract.batch_size must be >= 1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "f").exists()
