"""Several teachers: `dsmd extract --teacher <name>` adds a teacher's embeddings beside the features' own without
rewriting them, resumes block by block, and is refused when stale; a student distils from the ensemble target."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common.config import ConfigError, ExtractConfig, TeacherConfig, from_dict

from pipeline.common.params import Params
from pipeline.features import added_teacher, extract as extract_mod, schema, store
from pipeline.features.extract import ExtractMismatchError
from pipeline.models import load_model
from pipeline.training import data as data_mod
from tiny_corpus import write_tiny_corpus


def _teacher(checkpoint) -> TeacherConfig:
    return TeacherConfig(model="dsmd-test-teacher", pretrained=str(checkpoint))


@pytest.fixture(scope="module")
def features(tmp_path_factory, teacher_checkpoint):
    root = tmp_path_factory.mktemp("teachers")
    manifest = write_tiny_corpus(root / "corpus", splits=("train", "test"))
    cfg = ExtractConfig(manifest=str(manifest), out_dir=str(root / "features"), teachers_dir=str(root / "teachers"),
                        splits=["train", "test"], batch_size=4, num_workers=0, threads=1, zeroshot=False, verify_sample=0)
    extract_mod.extract(cfg, _teacher(teacher_checkpoint))
    return cfg


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(load_model("dsmd-test-teacher", "").model.state_dict(), path)
    return path


def _tree(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_teacher_added_reproduces_the_features_own_embeddings(features, teacher_checkpoint, tmp_path):
    cfg = ExtractConfig(**{**features.__dict__, "teachers_dir": str(tmp_path / "teachers")})
    before = _tree(Path(features.out_dir))
    results = added_teacher.extract_added_teacher(cfg, "again", _teacher(teacher_checkpoint))
    assert _tree(Path(features.out_dir)) == before  # nothing of the first teacher rewritten
    for split in ("train", "test"):
        image, text = store.added_teacher_rows(cfg.teachers_dir, "again", cfg.out_dir, split)
        own_image = store.embedding_rows(cfg.out_dir, split, schema.TEACHER_IMAGE_EMB)
        own_text = store.embedding_rows(cfg.out_dir, split, schema.TEACHER_TEXT_EMB)
        # the reference: the primary extraction of the same teacher (another batching: float16 rounding apart)
        np.testing.assert_allclose(image[:].astype(np.float32), own_image[:].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(text[:].astype(np.float32), own_text[:].astype(np.float32), atol=2e-3)
        assert results[split]["num_images"] == len(own_image) and results[split]["num_texts"] == len(own_text)
    assert not (tmp_path / "teachers" / "again" / "train" / schema.PARTS_DIR).exists()


def test_a_killed_run_keeps_its_finished_blocks(features, other_checkpoint, tmp_path, monkeypatch):
    cfg = ExtractConfig(**{**features.__dict__, "teachers_dir": str(tmp_path / "teachers"), "splits": ["train"]})
    monkeypatch.setattr(added_teacher, "BLOCK", 4)
    whole = added_teacher.extract_added_teacher(
        ExtractConfig(**{**cfg.__dict__, "teachers_dir": str(tmp_path / "whole")}), "b", _teacher(other_checkpoint))
    calls = {"n": 0}
    real = added_teacher._save

    def dies_on_the_third(path, rows, dtype):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(path, rows, dtype)

    monkeypatch.setattr(added_teacher, "_save", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))
    parts = tmp_path / "teachers" / "b" / "train" / schema.PARTS_DIR
    assert len(list(parts.glob("images-*.npy"))) == 2
    saved = []
    monkeypatch.setattr(added_teacher, "_save", lambda path, rows, dtype: (saved.append(path.name), real(path, rows, dtype)))
    added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))
    assert "images-000000000000.npy" not in saved and "images-000000000004.npy" not in saved  # kept, not redone
    for column in (schema.TEACHER_IMAGE_EMB, schema.TEACHER_TEXT_EMB):
        path = schema.array_file(column)
        assert np.array_equal(np.load(tmp_path / "teachers" / "b" / "train" / path), np.load(tmp_path / "whole" / "b" / "train" / path))
    assert whole["train"]["num_images"] > 8  # three blocks or more


def test_another_teacher_under_the_same_name_is_refused_and_a_stale_one_named(features, teacher_checkpoint,
                                                                            other_checkpoint, tmp_path):
    cfg = ExtractConfig(**{**features.__dict__, "teachers_dir": str(tmp_path / "teachers"), "splits": ["test"]})
    added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))
    with pytest.raises(ExtractMismatchError, match="checkpoint_sha256"):
        added_teacher.extract_added_teacher(cfg, "b", _teacher(teacher_checkpoint))
    # the features split extracted again (its manifest changed): training refuses the old embeddings in one line
    features_copy = tmp_path / "features"
    shutil.copytree(features.out_dir, features_copy)
    marker = features_copy / "test" / schema.SPLIT_MANIFEST
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "extracted_again": True}))
    with pytest.raises(store.ShardError, match="another extraction"):
        store.added_teacher_rows(cfg.teachers_dir, "b", features_copy, "test")
    with pytest.raises(store.ShardError, match="dsmd extract --teacher c"):
        store.added_teacher_rows(cfg.teachers_dir, "c", features.out_dir, "test")


def test_the_ensemble_target_is_unit_and_its_cosine_the_weighted_mean(rng=np.random.default_rng(0)):
    def unit(n, d):
        x = rng.normal(size=(n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = unit(50, 8), unit(50, 12)
    rows = store.EnsembleRows([a, b.astype(np.float16)], [3.0, 1.0])
    assert rows.shape == (50, 20) and len(rows) == 50
    target = rows[np.arange(50)]
    np.testing.assert_allclose(np.linalg.norm(target, axis=1), 1.0, atol=1e-3)
    b16 = b.astype(np.float16).astype(np.float32)
    expected = 0.75 * (a @ a.T) + 0.25 * (b16 @ b16.T)  # brute force: the share-weighted mean of the cosines
    np.testing.assert_allclose(target @ target.T, expected, atol=1e-5)
    np.testing.assert_allclose(rows[[3, 1]], target[[3, 1]])
    with pytest.raises(ValueError, match="number of rows"):
        store.EnsembleRows([a, b[:10]], [1, 1])


def test_training_data_from_two_teachers(features, other_checkpoint, tmp_path):
    cfg = ExtractConfig(**{**features.__dict__, "teachers_dir": str(tmp_path / "teachers"), "splits": ["train"]})
    added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))
    shares = {"teacher": 1.0, "b": 3.0}
    for stream in (False, True):
        data = data_mod.load_shards_data(cfg.out_dir, "train", stream=stream, teachers=shares, teachers_dir=cfg.teachers_dir)
        own = store.embedding_rows(cfg.out_dir, "train", schema.TEACHER_IMAGE_EMB)[:].astype(np.float32)
        added, _ = store.added_teacher_rows(cfg.teachers_dir, "b", cfg.out_dir, "train")
        ids = np.array([4, 0, 2])
        got = np.asarray(data.teacher_image[ids])
        assert data.embedding_dim == own.shape[1] + added.shape[1]
        np.testing.assert_allclose(got[:, : own.shape[1]], own[ids] * 0.5, atol=1e-6)
        np.testing.assert_allclose(got[:, own.shape[1]:], added[ids].astype(np.float32) * np.sqrt(0.75), atol=1e-6)
    alone = data_mod.load_shards_data(cfg.out_dir, "train", teachers={}, teachers_dir=cfg.teachers_dir)
    assert alone.embedding_dim == own.shape[1]


def test_teacher_names_are_checked_at_load():
    with pytest.raises(ConfigError, match="neither `teacher` nor a teacher of the teachers section"):
        from_dict(Params, {"students": {"s": {"teachers": {"teacher": {}, "missing": {}}}}})
    with pytest.raises(ConfigError, match="teachers.teacher: the name is the `teacher` section's"):
        from_dict(Params, {"teachers": {"teacher": {"model": "m", "pretrained": ""}}})
    with pytest.raises(ConfigError, match=r"mine.teachers names \['c'\]"):
        from_dict(Params, {"mine": {"teachers": {"c": {}}}})
    with pytest.raises(ConfigError, match="weight must be > 0"):
        from_dict(Params, {"students": {"s": {"teachers": {"teacher": {"weight": 0}}}}})
    params = from_dict(Params, {"teachers": {"b": {"model": "m", "pretrained": "p"}},
                                "students": {"s": {"teachers": {"teacher": {}, "b": {"weight": 2, "temperature": 0.5}}}}})
    shares = params.student("s").teachers
    assert shares["teacher"].weight == 1.0 and shares["b"].weight / shares["b"].temperature == 4.0
    assert params.added_teacher("b") == TeacherConfig(model="m", pretrained="p")


@pytest.mark.parametrize("target", ["ensemble", "each"])
def test_a_student_distils_from_two_teachers_through_one_projection(features, other_checkpoint, tmp_path, target):
    from pipeline.common import names
    from pipeline.common.config import TeacherShare
    from pipeline.training import loop
    from tests.test_training import make_cfg, read_log

    cfg = ExtractConfig(**{**features.__dict__, "teachers_dir": str(tmp_path / "teachers"), "splits": ["train"]})
    added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))
    train_cfg = make_cfg((cfg.out_dir, tmp_path / "no-negatives"), tmp_path / "student", {"hard_negative": False},
                         max_steps=3, batch_size=8)
    import dataclasses
    train_cfg = dataclasses.replace(train_cfg, teachers={"teacher": TeacherShare(), "b": TeacherShare(weight=2.0)},
                                    teachers_dir=cfg.teachers_dir, val_every=0, live_dir="", teachers_target=target)
    loop.train(train_cfg)
    state = torch.load(tmp_path / "student" / names.CHECKPOINT_FILE, weights_only=True)
    own = store.embedding_rows(cfg.out_dir, "train", schema.TEACHER_IMAGE_EMB).shape[1]
    added = store.added_teacher_rows(cfg.teachers_dir, "b", cfg.out_dir, "train")[0].shape[1]
    assert state["projection"]["weight"].shape[0] == own + added  # one projection to the joint width
    assert [r["step"] for r in read_log(tmp_path / "student")] == [1, 2, 3]
    assert all(np.isfinite(r["loss_total"]) for r in read_log(tmp_path / "student"))
    assert state["queue"]["image"].shape[1] == own + added  # one joint queue, whichever the target


def test_an_added_teachers_cache_proves_itself_and_a_corrupted_row_is_named(features, other_checkpoint, tmp_path):
    from pipeline.features.verify import CacheMismatchError, verify
    cfg = ExtractConfig(**{**features.__dict__, "teachers_dir": str(tmp_path / "teachers"), "splits": ["test"],
                           "verify_sample": 6})
    added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))  # verifies itself at the end
    summary = verify(cfg, _teacher(other_checkpoint), added="b")["test"]
    assert summary["ok"] and min(summary["lowest"].values()) >= 0.9999 and "view" not in summary["checked"]
    array = np.load(tmp_path / "teachers" / "b" / "test" / schema.array_file(schema.TEACHER_TEXT_EMB), mmap_mode="r+")
    array[:] = -array[:]  # every caption's row flipped
    array.flush()
    del array
    with pytest.raises(CacheMismatchError) as error:
        verify(cfg, _teacher(other_checkpoint), added="b")
    message = str(error.value)
    assert str(tmp_path / "teachers" / "b" / "test") in message and "teacher_text_emb.npy: sha256 differs" in message


def test_each_teacher_apart_equals_the_terms_computed_teacher_by_teacher():
    from pipeline.training.losses import DSMDLoss, Mined, PerTeacherDSMDLoss
    torch.manual_seed(0)
    widths, shares, temperatures = [6, 10], [1.0, 3.0], [1.0, 0.5]
    terms = ["feature", "similarity", "contrastive", "hard_negative", "affinity"]
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    b, h = 5, 3
    teachers = [(unit(b, d), unit(b, d)) for d in widths]
    t_v, t_t = torch.cat([t[0] for t in teachers], 1), torch.cat([t[1] for t in teachers], 1)
    projected_v, projected_t = unit(b, sum(widths)), unit(b, sum(widths))
    ids = torch.arange(b)
    queue_v, queue_t, queue_ids = [unit(8, d) for d in widths], [unit(8, d) for d in widths], torch.arange(10, 18)
    negatives = [unit(b, h, d) for d in widths]
    owners = torch.randint(0, 20, (b, h))
    joint = PerTeacherDSMDLoss(terms, widths, shares, temperatures, temperature=0.05, queue_size=8)
    joint.prefill(torch.cat(queue_v, 1), torch.cat(queue_t, 1), queue_ids)
    got = joint(projected_v, projected_t, t_v, t_t, ids,
                mined={d: Mined(torch.cat(negatives, -1), owners) for d in ("i2i", "i2t", "t2t", "t2i")})
    want, start = {}, 0
    for k, d in enumerate(widths):  # the reference: one DSMDLoss per teacher on its own columns
        single = DSMDLoss(terms, d, temperature=0.05 * temperatures[k], queue_size=8)
        single.prefill(queue_v[k], queue_t[k], queue_ids)
        s_v = torch.nn.functional.normalize(projected_v[:, start:start + d], dim=-1)
        s_t = torch.nn.functional.normalize(projected_t[:, start:start + d], dim=-1)
        part = single(s_v, s_t, teachers[k][0], teachers[k][1], ids,
                      mined={dd: Mined(negatives[k], owners) for dd in ("i2i", "i2t", "t2t", "t2i")})
        for name, value in part.items():
            want[name] = want.get(name, 0) + shares[k] / sum(shares) * value
        start += d
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_mining_from_the_ensemble_equals_mining_features_that_hold_the_ensemble(tmp_path):
    from pipeline.common.config import MineConfig, TeacherShare
    from pipeline.mining import negatives
    from tests.test_mining import DIRECTIONS, _as_lists, duplicate_heavy_split, write_features

    duplicate_heavy_split(tmp_path / "features")
    image, text, text_image = store.load_embeddings(tmp_path / "features", "train")
    captions = store.read_texts(tmp_path / "features", "train", columns=[schema.CAPTION])[schema.CAPTION].to_pylist()
    rng = np.random.default_rng(5)
    b_image = image[:, :8] + 0.5 * rng.normal(size=(len(image), 8))  # a second teacher that half agrees
    b_text = text[:, :8] + 0.5 * rng.normal(size=(len(text), 8))
    b_image, b_text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (b_image, b_text))
    info = {"teacher": {"model": "b"}, schema.FEATURES_FINGERPRINT: store.features_fingerprint(tmp_path / "features", "train")}
    store.write_added_teacher(store.added_teacher_dir(tmp_path / "teachers", "b", "train"), info, [b_image], [b_text],
                              len(image), len(text), 8, "float32")
    shares = {"teacher": TeacherShare(), "b": TeacherShare(weight=3.0)}
    cfg = MineConfig(features_dir=str(tmp_path / "features"), out_dir=str(tmp_path / "neg"), k=6, index="flat",
                     query_chunk=7, teachers=shares, teachers_dir=str(tmp_path / "teachers"))
    negatives.mine(cfg, progress=False)
    # the reference: features whose own embeddings are the ensemble target, mined as usual
    joint = [np.concatenate([a * 0.5, b * np.sqrt(0.75)], axis=1) for a, b in ((image, b_image), (text, b_text))]
    write_features(tmp_path / "joint", "train", joint[0], joint[1], text_image, captions)
    reference = MineConfig(features_dir=str(tmp_path / "joint"), out_dir=str(tmp_path / "neg-joint"), k=6, index="flat",
                           query_chunk=7)
    negatives.mine(reference, progress=False)
    for name in DIRECTIONS:
        got_ids, got_scores = _as_lists(cfg.out_dir, "train", name)
        want_ids, want_scores = _as_lists(reference.out_dir, "train", name)
        assert got_ids == want_ids, name
        np.testing.assert_allclose(np.concatenate(got_scores), np.concatenate(want_scores), atol=1e-5)
    negatives.mine(MineConfig(**{**cfg.__dict__, "teachers": {}, "out_dir": str(tmp_path / "neg-alone")}), progress=False)
    # the first teacher alone mines other neighbours: the option is what changed them
    assert any(_as_lists(tmp_path / "neg-alone", "train", d)[0] != _as_lists(cfg.out_dir, "train", d)[0] for d in DIRECTIONS)


def test_stored_views_are_embedded_by_the_added_teacher_with_the_same_crops(tmp_path, teacher_checkpoint, other_checkpoint):
    manifest = write_tiny_corpus(tmp_path / "corpus", splits=("train",))
    cfg = ExtractConfig(manifest=str(manifest), out_dir=str(tmp_path / "features"), teachers_dir=str(tmp_path / "teachers"),
                        splits=["train"], batch_size=4, num_workers=0, threads=1, zeroshot=False, views=2, verify_sample=4)
    extract_mod.extract(cfg, _teacher(teacher_checkpoint))
    added_teacher.extract_added_teacher(cfg, "again", _teacher(teacher_checkpoint))  # verifies its views at the end
    own = store.embedding_rows(cfg.out_dir, "train", schema.TEACHER_VIEW_EMB)[:].astype(np.float32)
    added = store.added_teacher_view_rows(cfg.teachers_dir, "again", cfg.out_dir, "train")[:].astype(np.float32)
    assert added.shape == own.shape and own.shape[1] == 2
    np.testing.assert_allclose(added, own, atol=2e-3)  # the same teacher, the same crops: the features' own views
    added_teacher.extract_added_teacher(cfg, "b", _teacher(other_checkpoint))
    data = data_mod.load_shards_data(cfg.out_dir, "train", teachers={"teacher": 1.0, "b": 1.0}, teachers_dir=cfg.teachers_dir)
    b_views = store.added_teacher_view_rows(cfg.teachers_dir, "b", cfg.out_dir, "train")[:].astype(np.float32)
    width = own.shape[-1]
    assert data.teacher_views.shape == (len(own), 2, width + b_views.shape[-1])
    np.testing.assert_allclose(data.teacher_views[:, :, :width], own * np.sqrt(0.5), atol=1e-6)
    np.testing.assert_allclose(data.teacher_views[:, :, width:], b_views * np.sqrt(0.5), atol=1e-6)
    # and a student trains on them, streamed, each teacher apart
    import dataclasses
    from pipeline.common.config import TeacherShare
    from pipeline.training import loop
    from tests.test_training import make_cfg, read_log
    train_cfg = dataclasses.replace(
        make_cfg((cfg.out_dir, tmp_path / "none"), tmp_path / "student", {"hard_negative": False}, max_steps=3, batch_size=8),
        teachers={"teacher": TeacherShare(), "b": TeacherShare()}, teachers_dir=cfg.teachers_dir, val_every=0,
        live_dir="", teachers_target="each", data_loading="stream")
    loop.train(train_cfg)
    assert [r["step"] for r in read_log(tmp_path / "student")] == [1, 2, 3]


def test_an_unknown_teacher_name_is_one_error_line(tmp_path):
    from typer.testing import CliRunner
    from stages.cli import app
    params = tmp_path / "params.yaml"
    params.write_text("teachers:\n  b: {model: dsmd-test-teacher, pretrained: ''}\n")
    for stage in ("extract", "verify"):
        result = CliRunner().invoke(app, [stage, "--params", str(params), "--teacher", "nope"])
        assert result.exit_code == 2 and "teachers.nope: no such teacher" in result.output
        assert "Traceback" not in result.output and not Path("outputs/teachers/nope").exists()  # nothing written
