"""`dsmd verify` and extract's own check: the cache proves it holds the teacher's embeddings, and a cache that
does not (another checkpoint, a corrupted array) is named row by row with its cause."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.common.config import ExtractConfig, TeacherConfig
from pipeline.features import extract as extract_mod, schema, store
from pipeline.features.verify import CacheMismatchError, sample_ids, verify, verify_features
from pipeline.models import load_model, load_teacher
from tiny_corpus import write_tiny_corpus


def _cfg(manifest, out, **kw) -> ExtractConfig:
    return ExtractConfig(manifest=str(manifest), out_dir=str(out), splits=["train"], batch_size=4, num_workers=0,
                         threads=1, zeroshot=False, **kw)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, teacher_checkpoint):
    """A split extracted with 2 views per image; extract's own verification ran on it (it raises otherwise)."""
    root = tmp_path_factory.mktemp("verify")
    manifest = write_tiny_corpus(root / "corpus", splits=("train",))
    cfg = _cfg(manifest, root / "features", views=2, verify_sample=6)
    extract_mod.extract(cfg, TeacherConfig(model="dsmd-test-teacher", pretrained=str(teacher_checkpoint)))
    return cfg


def test_the_teachers_own_cache_verifies(extracted, teacher_checkpoint):
    teacher = load_teacher(TeacherConfig(model="dsmd-test-teacher", pretrained=str(teacher_checkpoint)))
    summary = verify_features(teacher, extracted.out_dir, ["train"], sample=100)["train"]
    n_images = store.load_split_manifest(extracted.out_dir, "train")["num_images"]
    assert summary["ok"] and summary["checked"]["image"] == n_images and summary["checked"]["view"] == 2 * n_images
    assert min(summary["lowest"].values()) >= 0.9999  # float16 storage of unit vectors


def test_another_checkpoint_is_named_with_what_differs(extracted, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save(load_model("dsmd-test-teacher", "").model.state_dict(), other)
    with pytest.raises(CacheMismatchError) as error:
        verify(extracted, TeacherConfig(model="dsmd-test-teacher", pretrained=str(other)))
    message = str(error.value)
    assert "dsmd-test-teacher" in message and "rows below cosine 0.999" in message
    assert "teacher checkpoint_sha256" in message and "teacher weights_sha256" in message
    assert "sha256 differs" not in message  # the arrays themselves are intact


def test_a_corrupted_row_is_named_and_the_array_blamed(extracted, teacher_checkpoint, tmp_path):
    import shutil

    features = tmp_path / "features"
    shutil.copytree(extracted.out_dir, features)
    victim = 0  # every text is sampled below
    array = np.load(features / "train" / schema.array_file(schema.TEACHER_TEXT_EMB), mmap_mode="r+")
    array[victim] = -array[victim]  # a flipped row: cosine -1
    array.flush()
    del array
    teacher = load_teacher(TeacherConfig(model="dsmd-test-teacher", pretrained=str(teacher_checkpoint)))
    with pytest.raises(CacheMismatchError) as error:
        verify_features(teacher, features, ["train"], sample=1000)
    message = str(error.value)
    assert f"text id {victim}: -1.0000" in message and "1 of" in message
    assert f"{schema.array_file(schema.TEACHER_TEXT_EMB)}: sha256 differs" in message
    assert "teacher checkpoint_sha256" not in message  # the same teacher


def test_samples_are_seeded_distinct_and_bounded():
    a = sample_ids(50, 10, np.random.default_rng(3))
    assert len(set(a.tolist())) == 10 and (np.diff(a) > 0).all()
    assert np.array_equal(a, sample_ids(50, 10, np.random.default_rng(3)))
    assert np.array_equal(sample_ids(5, 10, np.random.default_rng(0)), np.arange(5))


def test_extract_refuses_a_bad_verification_setting(tmp_path):
    with pytest.raises(Exception, match="verify_min_cosine"):
        extract_mod.extract(_cfg(tmp_path / "none.yaml", tmp_path / "f", verify_min_cosine=1.5),
                            TeacherConfig(model="dsmd-test-teacher", pretrained=""))


def test_cli_prints_a_summary_and_exits_2_on_a_mismatch(extracted, teacher_checkpoint, tmp_path):
    from stages.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  threads: 1\n")
    base = ["verify", "--params", str(params), "--out-dir", extracted.out_dir, "--split", "train",
            "--teacher-model", "dsmd-test-teacher", "--sample", "4"]
    ok = CliRunner().invoke(app, base + ["--teacher-pretrained", str(teacher_checkpoint)])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.output.strip().splitlines()[-1])
    assert summary["split"] == "train" and summary["ok"] and summary["checked"]["text"] == 4
    wrong = CliRunner().invoke(app, base + ["--teacher-pretrained", ""])  # random weights: another teacher
    assert wrong.exit_code == 2 and "error:" in wrong.output and "does not match teacher" in wrong.output


def test_take_rows_reads_the_rows_asked_for_across_files_and_row_groups(tmp_path):
    """Against the brute force (the whole column read, then taken), with the ids spread over 3 files, one of them
    written in row groups of 7 rows."""
    import pyarrow.parquet as pq

    from pipeline.features import schema, store
    from tests.fakes import write_fake_features
    write_fake_features(tmp_path / "one", n_images=40, captions_per_image=3, views=2)
    images = store.read_images(tmp_path / "one", "train")
    texts = store.read_texts(tmp_path / "one", "train")
    cuts = [(0, 9), (9, 30), (30, 40)]
    info = {k: v for k, v in store.load_split_manifest(tmp_path / "one", "train").items()
            if k in ("teacher", "manifest_sha256", "embedding_dim", "embedding_dtype", "views")}
    manifest = store.write_split(tmp_path / "three", "train", [images.slice(a, b - a) for a, b in cuts],
                                 [texts.slice(3 * a, 3 * (b - a)) for a, b in cuts], info)
    middle = store.split_dir(tmp_path / "three", "train") / manifest["files"][schema.TEXTS_PREFIX][1]["path"]
    pq.write_table(pq.read_table(middle), middle, row_group_size=7)
    assert pq.ParquetFile(middle).num_row_groups > 1
    rng = np.random.default_rng(0)
    for prefix, whole, column in ((schema.TEXTS_PREFIX, texts, schema.CAPTION),
                                  (schema.IMAGES_PREFIX, images, schema.VIEW_PARAMS)):
        ids = np.sort(rng.choice(whole.num_rows, size=25, replace=False))
        got = store.take_rows(tmp_path / "three", "train", prefix, ids, [column])
        assert got[column].to_pylist() == whole[column].take(ids).to_pylist()
    assert store.take_rows(tmp_path / "three", "train", schema.TEXTS_PREFIX, np.array([], np.int64), [schema.CAPTION]).num_rows == 0
    with pytest.raises(store.ShardError, match="row ids outside 0..119"):
        store.take_rows(tmp_path / "three", "train", schema.TEXTS_PREFIX, np.array([120]), [schema.CAPTION])
