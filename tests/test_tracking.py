"""Training tracked through DVCLive (the same records as train_log.jsonl, no step twice after a resume)
and the periodic validation check (the retrieval figures of the student at that step)."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import models
from pipeline.evaluation import evaluate
from pipeline.evaluation.retrieval import retrieval_metrics
from pipeline.training import loop
from tests.fakes import write_fake_features
from tests.test_data import write_negatives
from tests.test_training import make_cfg, read_log, train_until_killed


@pytest.fixture(scope="module")
def shards_with_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    write_fake_features(root / "features", "train", n_images=64, captions_per_image=2, dim=32, seed=0)
    write_fake_features(root / "features", "val", n_images=40, captions_per_image=2, dim=32, seed=1)
    write_negatives(root / "features", root / "negatives", k=4)
    return root / "features", root / "negatives"


def tracked_cfg(dirs, out: Path, **optim):
    cfg = make_cfg(dirs, out, **{"max_steps": 6, "checkpoint_every": 2, **optim})
    return dataclasses.replace(cfg, val_every=3, val_images=16)


def live_steps(live_dir: Path, metric: str) -> list[tuple[int, float]]:
    with open(live_dir / "plots" / "metrics" / f"{metric}.tsv") as fh:
        return [(int(row["step"]), float(row[metric])) for row in csv.DictReader(fh, delimiter="\t")]


def test_dvclive_holds_the_logged_records_and_the_final_summary(shards_with_val, tmp_path):
    cfg = tracked_cfg(shards_with_val, tmp_path / "out")
    loop.train(cfg)
    log = read_log(cfg.out_dir)
    live = Path(cfg.out_dir) / "dvclive"
    assert live_steps(live, "loss_total") == [(r["step"], pytest.approx(r["loss_total"])) for r in log]
    assert [s for s, _ in live_steps(live, "val_rsum")] == [3, 6]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 6 and summary["loss_total"] == pytest.approx(log[-1]["loss_total"])
    assert {"lr", "samples_per_s", "weight_feature", "val_rsum"} <= set(summary)


def test_the_validation_check_is_the_students_retrieval_on_the_first_val_images(shards_with_val, tmp_path):
    cfg = tracked_cfg(shards_with_val, tmp_path / "out")
    loop.train(cfg)
    final = read_log(cfg.out_dir)[-1]
    student = models.load_student(cfg.out_dir)
    image_emb, text_emb, text_to_image = evaluate.encode_split(student, cfg.features_dir, "val")
    keep = text_to_image < 16
    want = retrieval_metrics(image_emb[:16], text_emb[keep], text_to_image[keep])
    assert final["val_rsum"] == pytest.approx(want["rsum"])
    assert final["val_i2t_r1"] == pytest.approx(want["i2t_r1"])


def test_a_resumed_run_logs_each_step_once_in_dvclive(shards_with_val, tmp_path, monkeypatch):
    full = tracked_cfg(shards_with_val, tmp_path / "full")
    loop.train(full)
    cut = dataclasses.replace(full, out_dir=str(tmp_path / "cut"))
    train_until_killed(monkeypatch, cut, 4)  # after the step-2 checkpoint and a logged step (3) past it
    loop.train(cut, resume=True)
    got = live_steps(Path(cut.out_dir) / "dvclive", "loss_total")
    want = live_steps(Path(full.out_dir) / "dvclive", "loss_total")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)


def test_tracking_can_be_switched_off(shards_with_val, tmp_path):
    cfg = dataclasses.replace(tracked_cfg(shards_with_val, tmp_path / "out"), live_dir="", val_every=0)
    loop.train(cfg)
    assert not (Path(cfg.out_dir) / "dvclive").exists()
    assert "val_rsum" not in read_log(cfg.out_dir)[-1]
