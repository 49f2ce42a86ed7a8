"""The whole pipeline through DVC and the CLIs, with tiny configs, in a temporary project.

Pretrains a tiny demo teacher with `dsmd pretrain` (as the shipped one was made), then runs `dvc repro` on the
repository's own dvc.yaml (corpus -> teacher -> extract -> mine -> train x2 -> evaluate -> export) with it, checks
the metrics file, then changes a `train.*` param and checks that only the training stages and evaluation run again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

TINY_PARAMS = {
    "corpus": {"out_dir": "data/synthetic", "train_images": 192, "val_images": 32, "test_images": 48,
               "web_images": 0, "image_size": 32, "samples_per_shard": 64},
    "teacher": {"model": "dsmd-test-teacher", "pretrained": "teacher-demo/open_clip_model.safetensors",
                "out_dir": "outputs/teachers/teacher"},
    "pretrain": {"world_images": 256, "work_dir": "teacher-run", "out_dir": "teacher-demo",
                 "optim": {"batch_size": 32, "warmup_steps": 1, "threads": 1, "lr": 0.002, "num_workers": 0}},
    # an added teacher (the same weights: the pipeline, not the ensemble's worth, is under test here)
    "teachers": {"second": {"model": "dsmd-test-teacher", "pretrained": "teacher-demo/open_clip_model.safetensors"}},
    "extract": {"manifest": "data/synthetic/manifest.yaml", "out_dir": "outputs/features", "batch_size": 64,
                "num_workers": 0, "threads": 1, "teachers_dir": "outputs/teachers"},
    "mine": {"features_dir": "outputs/features", "out_dir": "outputs/negatives", "k": 4, "threads": 1},
    "train": {"model": "dsmd-test-student", "features_dir": "outputs/features", "init_logit_scale": 30.0,
              "optim": {"max_steps": 6, "batch_size": 32, "warmup_steps": 1, "threads": 1, "lr": 0.002}},
    "students": {"dsmd": {"loss": "dsmd", "negatives_dir": "outputs/negatives", "batching": "hard-negative-aware",
                          "distill": {"queue_size": 64, "hard_negatives": 2}},
                 "baseline": {"loss": "clip"},
                 "ensemble": {"loss": "dsmd", "negatives_dir": "outputs/negatives", "distill": {"queue_size": 64},
                              "teachers": {"teacher": {}, "second": {"weight": 2.0}}}},
    "evaluate": {"features_dir": "outputs/features", "teacher_dir": "outputs/teachers/teacher", "latency_repeats": 2,
                 "throughput_batch": 16, "throughput_repeats": 1, "threads": 1,
                 "metrics_file": "outputs/metrics.json", "plots_dir": "outputs/plots", "report_dir": "outputs/report"},
    "export": {"student": "dsmd", "student_dir": "outputs/students/dsmd", "features_dir": "outputs/features",
               "metrics_file": "outputs/metrics.json", "out_dir": "outputs/export/dsmd", "check_images": 8},
}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.mark.slow
def test_dvc_pipeline_end_to_end_and_train_only_rerun(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    assert _dvc("init", "--no-scm", "-q", cwd=project).returncode == 0
    pretrained = _run(["dsmd", "pretrain", "--params", "params.yaml"], project)
    assert pretrained.returncode == 0, pretrained.stdout[-3000:] + pretrained.stderr[-3000:]
    assert json.loads((project / "teacher-demo" / "card.json").read_text())["samples_seen"] == 256

    first = _dvc("repro", cwd=project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    teacher_rsum = metrics["teacher"]["rsum"]
    identity = json.loads((project / "outputs" / "teachers" / "teacher" / "teacher_identity.json").read_text())
    for split in ("train", "val", "test"):  # the added teacher, beside the features' own
        added = json.loads((project / "outputs" / "teachers" / "second" / split / "_manifest.json").read_text())
        assert added["num_images"] == json.loads((project / "outputs" / "features" / split / "_manifest.json").read_text())["num_images"]
    assert identity["world"]["version"] == json.loads((project / "teacher-demo" / "card.json").read_text())["world"]["version"]
    assert 0 < teacher_rsum <= 600
    for name in ("dsmd", "baseline", "ensemble"):
        student = metrics["students"][name]
        assert 0 <= student["rsum"] <= 600
        assert student["quality_ratio"] == pytest.approx(student["rsum"] / teacher_rsum, rel=1e-6)
        assert student["image_time_ratio"] > 0
        # zero-shot on the synthetic tasks, teacher (cached) and students alike, CLIP_benchmark's keys
        for task in ("shape", "colour", "pattern", "count"):
            for model in (metrics["teacher"], student):
                assert 0 <= model["zeroshot"][task]["acc1"] <= model["zeroshot"][task]["mean_per_class_recall"] + 1
        assert student["image_retrieval_recall@1"] == pytest.approx(student["t2i_r1"] / 100)
    for plot in ("quality_vs_time.png", "training_curves.png"):
        assert (project / "outputs" / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # training tracked through DVCLive: dvc sees each student's final training metrics beside the evaluation
    shown = _dvc("metrics", "show", "--json", cwd=project)
    assert shown.returncode == 0, shown.stderr
    files = next(iter(json.loads(shown.stdout).values()))["data"]
    live = files["outputs/live/dsmd/metrics.json"]["data"]
    assert live["step"] == 6 and "loss_total" in live and 0 <= live["val_rsum"] <= 600
    assert "outputs/metrics.json" in files
    # the exported student: checked safetensors + config, ONNX towers, card
    report = json.loads((project / "outputs" / "export" / "dsmd" / "export_report.json").read_text())
    assert report["onnx_image_max_abs_diff"] <= 1e-4 and report["reload_text_max_abs_diff"] <= 1e-6
    assert "zero-shot shape acc1" in (project / "outputs" / "export" / "dsmd" / "README.md").read_text()
    # the student is an open_clip checkpoint with its config beside it
    assert (project / "outputs" / "students" / "dsmd" / "open_clip_config.json").exists()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["optim"]["lr"] = 0.001
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = _dvc("status", "--json", cwd=project)
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"train@dsmd", "train@baseline", "train@ensemble"}

    second = _dvc("repro", cwd=project)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    ran = set(re.findall(r"Running stage '([^']+)'", second.stdout))
    assert ran == {"train@dsmd", "train@baseline", "train@ensemble", "evaluate", "export"}, second.stdout

    # an edit to the module that declares the training options re-runs stage two only, never the teacher pass
    declared = project / "pipeline" / "common" / "params.py"
    original = declared.read_text()
    declared.write_text(original + "\n# an edited training option\n")
    status = set(json.loads(_dvc("status", "--json", cwd=project).stdout))
    assert status == {"train@dsmd", "train@baseline", "train@ensemble", "evaluate", "export"}, status
    declared.write_text(original)

    # a changed added teacher re-runs its own extraction and the students, never the features' extraction or mining
    params["teachers"]["second"]["model"] = "dsmd-test-teacher"
    params["teachers"]["second"]["pretrained"] = ""
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = set(json.loads(_dvc("status", "--json", cwd=project).stdout))
    # evaluate tracks the teachers section (its reference rows); the students follow once the extraction has run
    assert status == {"extract_teacher@second", "evaluate"}, status
    params["teachers"]["second"]["pretrained"] = "teacher-demo/open_clip_model.safetensors"
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    # a distillation key never re-runs the CLIP-only student; a third student is one params entry, trained
    # by its own stage without touching the others
    params["students"]["dsmd"]["distill"]["temperature"] = 0.07
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = set(json.loads(_dvc("status", "--json", cwd=project).stdout))
    assert status == {"train@dsmd", "evaluate"}, status  # evaluate: after any student, and it tracks their names
    params["students"]["short"] = {"loss": "clip", "optim": {"max_steps": 3}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = set(json.loads(_dvc("status", "--json", cwd=project).stdout))
    assert {s for s in status if s.startswith("train")} == {"train@dsmd", "train@short"}, status
    # stage one is paid once: editing every training, evaluation and export module, and every student's
    # architecture, leaves it up to date
    from test_dvc_deps import NOT_STAGE_ONE
    edited = [p for prefix in NOT_STAGE_ONE for p in ([project / prefix] if prefix.endswith(".py") else
                                                     sorted((project / prefix).rglob("*.py")))]
    assert len(edited) > 10
    for path in edited:
        path.write_text(path.read_text() + "\n# edited\n")
    for config in (project / "pipeline" / "student_configs").glob("*.json"):
        config.write_text(config.read_text() + "\n")
    status = _dvc("status", "--json", cwd=project)
    changed = set(json.loads(status.stdout))
    assert changed and not changed & {"corpus", "teacher", "extract", "extract_teacher@second", "mine"}, changed
    assert changed <= {"train@dsmd", "train@baseline", "train@ensemble", "train@short", "evaluate", "export"}, changed

    # the ablation, scaling and budget benchmarks, --quick, on this project's cached features
    for script, key in (("ablation.py", "recipes"), ("scaling.py", "recipes"), ("budget.py", "recipes")):
        done = _run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--params", "params.yaml",
                     "--out", "bench"], project)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads((project / "bench" / script.replace(".py", ".json")).read_text())
        assert result["teacher_rsum"] == pytest.approx(teacher_rsum, rel=1e-6)
        runs = [run for recipe in result[key].values() for run in recipe["runs"]]
        assert runs and all(0 <= run["rsum"] <= 600 and run["steps"] == 10 for run in runs)
        assert (project / "bench" / script.replace(".py", ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the several-teachers benchmark, --quick: a second teacher pretrained small, added, and distilled from
    done = _run([sys.executable, str(REPO / "benchmarks" / "teachers.py"), "--quick", "--params", "params.yaml",
                 "--seeds", "0", "--out", "bench", "--work", "bench-teachers"], project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    several = json.loads((project / "bench" / "teachers.json").read_text())
    assert several["teachers"]["first teacher"] == pytest.approx(teacher_rsum, rel=1e-6)
    assert set(several["recipes"]) == {"CLIP-only", "DSMD, first teacher", "DSMD, second teacher", "DSMD, both (ensemble)",
                                      "DSMD, both (each)"}
    assert all(len(r["runs"]) == 1 and 0 <= r["mean"] <= 600 for r in several["recipes"].values())
    assert several["second_teacher"]["samples_seen"] >= 2000 and (project / "bench" / "teachers.png").exists()
    # the convergence and tuning benchmarks, --quick: both students, in the shapes their docs promise
    done = _run([sys.executable, str(REPO / "benchmarks" / "convergence.py"), "--quick", "--params", "params.yaml",
                 "--out", "bench"], project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    convergence = json.loads((project / "bench" / "convergence.json").read_text())
    assert convergence["teacher_rsum"] == pytest.approx(teacher_rsum, rel=1e-6) and convergence["seeds"] == [0]
    assert [set(b) >= {"steps", "clip", "dsmd"} for b in convergence["budgets"]] == [True, True]
    assert all(len(b[loss]["runs"]) == 1 and b[loss]["mean"] == b[loss]["runs"][0] for b in convergence["budgets"]
               for loss in ("clip", "dsmd"))
    done = _run([sys.executable, str(REPO / "benchmarks" / "tuning.py"), "--quick", "--params", "params.yaml",
                 "--losses", "clip", "--out", "bench"], project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(json.loads((project / "bench" / "tuning.clip.json").read_text())["recipes"]) == ["clip default", "clip lr 0.002"]
    # the seed split, --quick: every (init seed, data seed) pair; the diagonal is the plain seeds
    done = _run([sys.executable, str(REPO / "benchmarks" / "seeds.py"), "--quick", "--params", "params.yaml",
                 "--loss", "clip", "--seeds", "0", "1", "--out", "bench"], project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seeds = json.loads((project / "bench" / "seeds.clip.json").read_text())
    assert np.array(seeds["rsum"]).shape == (2, 2) and seeds["plain_seeds"] == [seeds["rsum"][0][0], seeds["rsum"][1][1]]
    assert seeds["rsum"][0] != seeds["rsum"][1]  # other initial weights, other students
    ablation = json.loads((project / "bench" / "ablation.json").read_text())["recipes"]
    assert list(ablation) == ["CLIP-only", "DSMD (default)"] and len(ablation["CLIP-only"]["runs"]) == 2

    # --merge: two halves run side by side become one table, in recipe order; other seeds are refused
    whole = json.loads((project / "bench" / "ablation.json").read_text())
    halves = {"a": {"CLIP-only": whole["recipes"]["CLIP-only"]}, "b": {"DSMD (default)": whole["recipes"]["DSMD (default)"]}}
    for name, recipes in halves.items():
        (project / name).mkdir()
        (project / name / "ablation.json").write_text(json.dumps({**whole, "recipes": recipes}))
    merge = [sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--params", "params.yaml", "--out", "merged",
             "--merge", "b/ablation.json", "a/ablation.json"]
    done = _run(merge, project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = json.loads((project / "merged" / "ablation.json").read_text())
    assert merged == whole and list(merged["recipes"]) == ["CLIP-only", "DSMD (default)"]
    (project / "b" / "ablation.json").write_text(json.dumps({**whole, "seeds": [5, 6], "recipes": halves["b"]}))
    refused = _run(merge, project)
    assert refused.returncode != 0 and "b/ablation.json" in refused.stdout + refused.stderr
    (project / "b" / "ablation.json").write_text("{not json")
    broken = _run(merge, project)
    assert broken.returncode != 0 and "b/ablation.json: cannot read" in broken.stderr and "Traceback" not in broken.stderr
