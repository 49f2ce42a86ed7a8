"""The benchmark scripts' own bookkeeping (their runs are covered, --quick, by the end-to-end test)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ablation  # noqa: E402
import convergence  # noqa: E402
import seeds  # noqa: E402
import teacher_variants  # noqa: E402
import tuning  # noqa: E402


def test_convergence_joins_a_loss_split_over_processes_and_keeps_only_finished_budgets():
    parts = [
        {"loss": "clip", "seeds": [0, 1, 2], "budgets": {"1.0": {"steps": 10, "runs": [1, 2, 3]}, "2.0": {"steps": 20, "runs": [4, 5, 6]}}},
        {"loss": "dsmd", "seeds": [2], "budgets": {"1.0": {"steps": 10, "runs": [9]}, "2.0": {"steps": 20, "runs": [10]}}},
        {"loss": "dsmd", "seeds": [0, 1], "budgets": {"1.0": {"steps": 10, "runs": [7, 8]}}},
    ]
    halves = convergence.merge(parts)
    assert halves["dsmd"]["seeds"] == [0, 1, 2] and halves["dsmd"]["budgets"] == {"1.0": {"steps": 10, "runs": [7, 8, 9]}}
    result = convergence.assemble(halves, teacher=100.0, default_steps=10)
    assert result["seeds"] == [0, 1, 2] and [b["steps"] for b in result["budgets"]] == [10]  # 2.0 lacks dsmd seeds 0, 1
    budget = result["budgets"][0]
    assert budget["clip"] == {"runs": [1, 2, 3], "mean": 2.0, "std": 1.0} and budget["dsmd"]["mean"] == 8.0
    lines = convergence.checks(result)
    assert lines[0].split(":")[1].strip().startswith("50.000")  # teacher / CLIP-only's best
    assert "gap 6.0 vs 3 combined std 4.2: yes" in lines[1]
    # with the CLIP-only student's views curve, its best recipe is the baseline's best, wherever it was run
    views = {"loss": "clip_views", "seeds": [0, 1, 2], "budgets": {"1.0": {"steps": 10, "runs": [4, 5, 6]}}}
    result = convergence.assemble(convergence.merge(parts + [views]), teacher=100.0, default_steps=10)
    assert result["budgets"][0]["clip_views"]["mean"] == 5.0 and result["budgets"][0]["clip"]["mean"] == 2.0
    lines = convergence.checks(result)
    assert lines[0].split(":")[1].strip().startswith("20.000") and "best / CLIP-only's best:    1.600" in lines[2]
    assert convergence.overrides("clip_views", 5.0)["use_views"] is True and "use_views" not in convergence.overrides("clip", 5.0)
    # "best" is over the default budget and longer ones: a better shorter budget is not the baseline's best
    short = {"loss": "clip", "seeds": [0, 1, 2], "budgets": {"0.5": {"steps": 5, "runs": [30, 31, 32]}}}
    early = {"loss": "dsmd", "seeds": [0, 1, 2], "budgets": {"0.5": {"steps": 5, "runs": [1, 1, 1]}}}
    result = convergence.assemble(convergence.merge(parts + [short, early]), teacher=100.0, default_steps=10)
    assert [b["steps"] for b in result["budgets"]] == [5, 10]
    assert convergence.checks(result)[0].split(":")[1].strip().startswith("50.000")


def _ablation_part(path, seeds, recipes, teacher=470.0):
    runs = {name: [{"seed": seed, "rsum": base + seed} for seed in seeds] for name, base in recipes.items()}
    part = {"teacher_rsum": teacher, "seeds": seeds,
            "recipes": {name: {"overrides": {"loss": name}, "runs": r} for name, r in runs.items()}}
    path.write_text(json.dumps(part))
    return str(path)


def test_ablation_merge_joins_halves_and_later_seeds_and_refuses_a_table_over_missing_seeds(tmp_path):
    order = {"CLIP-only": {}, "DSMD (default)": {}, "balancer dynamic": {}}
    first = _ablation_part(tmp_path / "a.json", [0, 1, 2], {"balancer dynamic": 300, "CLIP-only": 100})
    half = _ablation_part(tmp_path / "b.json", [0, 1, 2], {"DSMD (default)": 200})
    later = _ablation_part(tmp_path / "c.json", [3, 4], {"CLIP-only": 100, "DSMD (default)": 200, "balancer dynamic": 300})
    teacher, seeds, results = ablation.merge([first, half, later], order)
    assert teacher == 470.0 and seeds == [0, 1, 2, 3, 4] and list(results) == list(order)
    for name, base in (("CLIP-only", 100), ("DSMD (default)", 200), ("balancer dynamic", 300)):
        values = [base + seed for seed in seeds]
        assert [run["seed"] for run in results[name]["runs"]] == seeds
        assert results[name]["mean"] == pytest.approx(statistics.fmean(values))
        assert results[name]["std"] == pytest.approx(statistics.stdev(values))
    with pytest.raises(SystemExit, match=r"'DSMD \(default\)' ran at seeds \[0, 1, 2\]"):
        ablation.merge([first, half, _ablation_part(tmp_path / "d.json", [3, 4], {"CLIP-only": 100, "balancer dynamic": 300})], order)
    with pytest.raises(SystemExit, match="seed 0 is also in another part"):
        ablation.merge([first, first], order)
    with pytest.raises(SystemExit, match="teacher RSUM"):
        ablation.merge([first, _ablation_part(tmp_path / "e.json", [3], {"CLIP-only": 1}, teacher=1.0)], order)


def test_ablation_recipes_put_each_student_on_the_lr_grid_around_its_own_rate_and_name_the_views_recipe(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  optim:\n    lr: 0.004\n"
                      "students:\n  dsmd:\n    loss: dsmd\n    optim:\n      lr: 0.008\n  baseline:\n    loss: clip\n")
    with_views, without = ablation.recipes(str(params), 4), ablation.recipes(str(params), 0)
    lrs = {name: recipe.get("optim.lr") for name, recipe in with_views.items() if " lr " in name}
    # each rate of the grid once per student, never the student's own (that is its default recipe)
    assert lrs == {"CLIP-only lr 0.002": 0.002, "CLIP-only lr 0.008": 0.008, "CLIP-only lr 0.016": 0.016,
                   "CLIP-only lr 0.032": 0.032, "DSMD lr 0.002": 0.002, "DSMD lr 0.004": 0.004, "DSMD lr 0.016": 0.016,
                   "DSMD lr 0.032": 0.032}
    assert with_views["DSMD without stored views"] == {"loss": "dsmd", "use_views": False}
    assert with_views["CLIP-only without stored views"] == {"loss": "clip", "batching": "random", "use_views": False}
    assert not any("views" in name for name in without)
    assert set(with_views) - set(without) == {"DSMD without stored views", "CLIP-only without stored views"}
    params.write_text(params.read_text() + "    use_views: false\n")  # a baseline told not to: the recipe turns them on
    assert ablation.recipes(str(params), 4)["CLIP-only with stored views"]["use_views"] is True


def test_the_tuning_grid_is_around_each_students_own_values_and_never_repeats_its_default(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  init_logit_scale: 30\n  optim:\n    lr: 0.008\n    warmup_steps: 100\n"
                      "students:\n  dsmd:\n    loss: dsmd\n    optim:\n      warmup_steps: 300\n  baseline:\n    loss: clip\n")
    clip, dsmd = tuning.grid(str(params), "clip"), tuning.grid(str(params), "dsmd")
    assert clip["default"] == {} and "warmup 100" not in clip and clip["warmup 300"] == {"optim.warmup_steps": 300}
    assert "warmup 300" not in dsmd and dsmd["warmup 100"] == {"optim.warmup_steps": 100}  # the DSMD student's own is 300
    assert "lr 0.008" not in clip and "logit scale 30" not in clip and clip["logit scale 50"] == {"init_logit_scale": 50.0}
    grid_size = len(tuning.LR_GRID) + len(tuning.WARMUP_GRID) + len(tuning.LOGIT_SCALE_GRID)
    assert len(clip) == len(dsmd) == 1 + grid_size - 3  # the default, then every other value of each factor

def test_the_seed_split_recovers_additive_init_and_data_effects():
    import numpy as np

    init, data = np.array([10.0, -4.0, -6.0]), np.array([3.0, 0.0, -3.0])
    split = seeds.decompose(400.0 + init[:, None] + data[None, :])
    assert split["mean"] == pytest.approx(400.0) and split["rms_interaction"] == pytest.approx(0.0, abs=1e-9)
    assert split["std_init"] == pytest.approx(statistics.stdev(init)) and split["std_data"] == pytest.approx(3.0)
    noisy = seeds.decompose(np.array([[1.0, 0.0], [0.0, 1.0]]))  # no row or column effect: all interaction
    assert noisy["std_init"] == noisy["std_data"] == 0.0 and noisy["rms_interaction"] == pytest.approx(0.5)
    assert list(seeds.recipes("clip", [0, 2])) == ["init seed 0", "init seed 2"]
    assert seeds.recipes("dsmd", [1])["init seed 1"]["optim.init_seed"] == 1


def test_the_gpu_check_refuses_in_one_line_where_there_is_no_cuda():
    import subprocess

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the check would run for real")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA device here (torch.cuda.is_available() is False): run this check on a GPU machine"]


def test_memory_generates_a_features_split_of_any_size_that_trains_like_an_extracted_one(tmp_path):
    import numpy as np

    import memory
    from pipeline.corpus.augment import decode_image
    from pipeline.features import schema, store
    from pipeline.training import data as data_mod

    memory.write_features_direct(tmp_path / "png", tmp_path / "features", 250, part=100)
    data = data_mod.load_shards_data(tmp_path / "features", "train", stream=True)
    texts = store.read_texts(tmp_path / "features", "train")
    assert data.num_images == 250 and len(data.captions) == texts.num_rows == sum(2 + i % 4 for i in range(250))
    assert isinstance(data.text_to_image, store.RowFile) and isinstance(data.trainable_image_ids(), data_mod.ImageRange)
    assert [int(t) for t in data.captions_of(130)] == np.flatnonzero(texts[schema.IMAGE_ID].to_numpy() == 130).tolist()
    assert data.captions[int(data.captions_of(130)[1])] == "a picture 130 seen in way 1"
    assert decode_image(data.image_bytes[130]).size == decode_image(data.image_bytes[130 % 64]).size == (64, 64)
    assert data.image_bytes[130] == data.image_bytes[2] != data.image_bytes[3]  # 64 PNGs, referenced in turn


def test_teacher_variants_join_their_parts_and_refuse_unknown_ones():
    base = {"embed_dim": 8, "vision_cfg": {"image_size": 64, "patch_size": 8, "patch_dropout": 0.75}, "text_cfg": {}}
    config, world_norm = teacher_variants.variant_config(base, "dropout-0.5+world-norm")
    assert config["vision_cfg"] == {"image_size": 64, "patch_size": 8, "patch_dropout": 0.5} and world_norm
    assert base["vision_cfg"]["patch_dropout"] == 0.75  # the base config is not changed
    config, world_norm = teacher_variants.variant_config(base, "resnet-32")
    assert config["vision_cfg"] == {**teacher_variants.RESNET_16, "width": 32} and not world_norm
    assert config["text_cfg"] == base["text_cfg"] and config["embed_dim"] == 8
    with pytest.raises(SystemExit, match="unknown variant 'wide'"):
        teacher_variants.variant_config(base, "shipped+wide")


def test_the_shape_probe_scores_what_a_linear_classifier_can_and_cannot_separate():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    separable = np.eye(4)[labels] + 0.05 * rng.standard_normal((400, 4))  # the label is in the embedding
    assert teacher_variants.linear_probe(separable, labels) == 1.0
    noise = rng.standard_normal((400, 4))  # it is not: held-out accuracy stays near chance (0.25)
    assert teacher_variants.linear_probe(noise, labels) < 0.4
