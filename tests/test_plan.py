"""`dsmd plan`: the projected costs come from timing the configured teacher and students on the corpus's images."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import plan as plan_mod
from pipeline.common.params import load_params
from tests.tiny_corpus import write_tiny_corpus


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    manifest = write_tiny_corpus(root / "corpus", shards_per_split=1, per_shard=24, image_size=32)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({
        "teacher": {"model": "dsmd-test-teacher", "pretrained": ""},
        "extract": {"manifest": str(manifest), "splits": ["train", "test"], "batch_size": 8, "threads": 1, "views": 2},
        "train": {"model": "dsmd-test-student", "optim": {"batch_size": 8, "epochs": 2, "threads": 1}},
        "students": {"dsmd": {"loss": "dsmd", "distill": {"queue_size": 16, "hard_negatives": 2}}, "clip": {"loss": "clip"}},
    }))
    return path


def test_the_plan_times_every_student_and_scales_with_the_corpus_and_the_ranks(params_file):
    params = load_params(params_file)
    one = plan_mod.plan(params, ranks=1, repeats=1)
    assert one["split_images"] == {"train": 24, "test": 24} and one["teacher_dim"] == 32
    assert set(one["students"]) == {"dsmd", "clip"}
    for student in one["students"].values():
        assert student["seconds_per_step"] > 0 and student["steps_per_epoch"] == 3  # ceil(24 / 8)
        assert student["run_seconds"] == pytest.approx(2 * student["epoch_seconds"])  # 2 epochs of 3 steps
    assert one["split_views"] == {"train": 2, "test": 0}  # views only where students train (extract.view_splits)
    per_image = one["extract_seconds_per_image"]
    assert one["extract_seconds"]["train"] == pytest.approx(24 * per_image["train"]) and per_image["train"] > per_image["test"]
    # each embedding twice (Parquet and .npy) x width x 2 bytes (float16), plus the rest of each row
    texts = 48 * one["captions_per_image"]
    assert one["features_bytes"] == int((2 * 2 * 32 + plan_mod.ROW_OVERHEAD_BYTES) * (24 * 3 + 24 + texts))
    # a tiny split: exact float32 indexes (the caption groups are read from disk)
    assert one["mine_memory_bytes"] == int(4 * 32 * (24 + 24 * one["captions_per_image"]))
    two = plan_mod.plan(params, ranks=2, repeats=1)
    assert two["extract_seconds"]["train"] == pytest.approx(24 * two["extract_seconds_per_image"]["train"] / 2)
    assert two["students"]["clip"]["epoch_seconds"] == pytest.approx(3 * two["students"]["clip"]["seconds_per_step"] / 2)


def test_each_stored_view_costs_one_more_image_through_loading_and_the_image_tower():
    parts = {"loading": 3.0, "image": 2.0, "text": 1.0}
    assert plan_mod.extraction_seconds(parts, views=0, workers=0) == 6.0
    assert plan_mod.extraction_seconds(parts, views=4, workers=0) == 15.0 + 11.0  # loading 5 x 3, towers 5 x 2 + 1
    assert plan_mod.extraction_seconds(parts, views=4, workers=3) == 11.0  # loading 15 / 3 workers hides behind the towers
    assert plan_mod.extraction_seconds(parts, views=4, workers=1) == 15.0  # one worker: loading is the slower


def test_mining_memory_follows_the_index_the_budget_picks():
    from pipeline.common.config import MineConfig
    from pipeline.mining import negatives
    cfg = MineConfig(memory_budget_mb=64, pq_m=16)
    small = negatives.memory_bytes(20_000, 70_000, 256, cfg)  # 20 MB of float32 images: exact; 70 MB of texts: IVF-PQ
    assert small["images_index"] == 20_000 * 4 * 256 and small["texts_index"] == 70_000 * 24
    large = negatives.memory_bytes(2_000_000, 7_000_000, 256, cfg)
    assert large == {"images_index": 2_000_000 * 24, "texts_index": 7_000_000 * 24}  # nothing a caption


def test_the_cli_prints_the_plan_or_json(params_file):
    from stages.cli import app
    result = CliRunner().invoke(app, ["plan", "--params", str(params_file), "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "extract" in result.output and "train dsmd" in result.output and "train clip" in result.output
    result = CliRunner().invoke(app, ["plan", "--params", str(params_file), "--repeats", "1", "--json", "--ranks", "4"])
    assert result.exit_code == 0 and json.loads(result.output)["ranks"] == 4
