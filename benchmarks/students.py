"""Shared by ablation.py and scaling.py: train students from one set of cached features and score
them on the test split, each recipe over several seeds (mean and standard deviation of RSUM)."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import models
from pipeline.common import atomic
from pipeline.common.config import apply_overrides
from pipeline.common.params import load_params, Params, TrainConfig
from pipeline.evaluation import evaluate
from pipeline.features import store
from pipeline.training.loop import train


def teacher_rsum(features_dir: str, split: str) -> float:
    image, text, text_to_image = store.load_embeddings(features_dir, split)
    return evaluate.retrieval_metrics(image, text, text_to_image)["rsum"]


def student_rsum(student_dir: Path, features_dir: str, split: str) -> float:
    loaded = models.load_student(student_dir)
    image, text, text_to_image = evaluate.encode_split(loaded, features_dir, split)
    return evaluate.retrieval_metrics(image, text, text_to_image)["rsum"]


# Two sweeps side by side on a 2-core machine: each on one core, data loading in the main process,
# (`--threads 1`) trains more students per hour than both fighting over two threads and a loader each.
PROCESS_OVERRIDES: dict[str, Any] = {}


def sweep_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every student sweep takes: --params, --seeds, --quick, --out, --single-core."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--single-core", action="store_true", help="one thread, no loader worker: for two sweeps side by side")
    return parser


def single_core() -> None:
    PROCESS_OVERRIDES.update({"optim.threads": 1, "optim.num_workers": 0})


def base_config(params: Params, loss: str | None) -> TrainConfig:
    """What a recipe of `loss` starts from: the first student of the students section with that loss (the DSMD
    student's distill terms and negatives), else the train section."""
    for name in params.students:
        if params.student(name).loss == loss:
            return params.student(name)
    return params.train


def run_recipe(params: str, overrides: dict[str, Any], seed: int, work_dir: Path, split: str = "test") -> dict:
    """Train one student (params.yaml's student of the recipe's loss + `overrides`, seed `seed`) and score it."""
    base = base_config(load_params(params), overrides.get("loss"))
    out_dir = work_dir / f"seed{seed}"
    cfg = apply_overrides(base, {**overrides, **PROCESS_OVERRIDES, "optim.seed": seed, "out_dir": str(out_dir),
                                 "optim.log_every": 50})
    if PROCESS_OVERRIDES:
        torch.set_num_threads(int(PROCESS_OVERRIDES["optim.threads"]))  # evaluation too
    started = time.perf_counter()
    summary = train(cfg)
    rsum = student_rsum(out_dir, cfg.features_dir, split)
    result = {"seed": seed, "rsum": rsum, "steps": summary["steps"], "images": summary["num_images"],
              "seconds": round(time.perf_counter() - started, 1)}
    shutil.rmtree(out_dir, ignore_errors=True)  # the figures are what we keep
    return result


def run_recipes(params: str, recipes: dict[str, dict], seeds: list[int], work_dir: Path, log_file: Path | None = None) -> dict:
    """{name: {overrides, runs, mean, std}} for every recipe, every seed."""
    results: dict[str, dict] = {}
    for name, overrides in recipes.items():
        runs = []
        for seed in seeds:
            run = run_recipe(params, overrides, seed, work_dir / name)
            runs.append(run)
            print(f"{name:28s} seed {seed}: RSUM {run['rsum']:.1f} ({run['seconds']:.0f} s)", flush=True)
        values = [r["rsum"] for r in runs]
        results[name] = {
            "overrides": overrides, "runs": runs, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
        if log_file is not None:  # partial results survive an interrupted sweep
            atomic.atomic_write_json(results, log_file)
    return results


def bar_chart(rows: list[tuple[str, float, float]], teacher: float | None, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [r[0] for r in rows]
    ax.barh(names, [r[1] for r in rows], xerr=[r[2] for r in rows], color="#4c72b0", capsize=3)
    if teacher is not None:
        ax.axvline(teacher, color="#c44e52", linestyle="--", label=f"teacher {teacher:.1f}")
        ax.legend(loc="lower right")
    low = min(r[1] - r[2] for r in rows)
    ax.set_xlim(max(0, low - 20), max([r[1] + r[2] for r in rows] + [teacher or 0]) + 10)
    ax.invert_yaxis()
    ax.set_xlabel("test RSUM (mean +/- std over seeds)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_rsum_chart(fig, ax, xlabel: str, title: str, path: Path, **legend) -> None:
    """Label an RSUM-against-x chart the same way in every benchmark and write it as PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("test RSUM (mean +/- std over seeds)")
    ax.set_title(title)
    ax.legend(**{"loc": "best", **legend})  # "best": the least overlap with the curves and their error bars
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_rows(rows: list[tuple[str, float, float]], reference: float | None = None) -> str:
    lines = [f"{'recipe':28s} {'RSUM mean':>10s} {'std':>6s}" + ("  vs CLIP-only" if reference else "")]
    for name, mean, std in rows:
        extra = f"  {mean / reference:6.3f}x" if reference else ""
        lines.append(f"{name:28s} {mean:10.1f} {std:6.1f}{extra}")
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def merge(paths: list[str], order: dict[str, dict]) -> tuple[float, list[int], dict]:
    """The union of several sweep results (ablation.json, tuning.<losses>.json) of the same features, in recipe order.

    Parts may split the recipes (two halves run side by side) or the seeds (more seeds run later): a recipe's runs
    are joined over the parts, and every recipe of the result must then have run at every seed of the union, so
    that no mean is over fewer seeds than the table says.
    """
    parts = [_read_part(path) for path in paths]
    for path, part in zip(paths[1:], parts[1:]):
        if abs(part["teacher_rsum"] - parts[0]["teacher_rsum"]) > 1e-6:
            raise SystemExit(f"{path}: teacher RSUM {part['teacher_rsum']} differs from {paths[0]}'s "
                             f"{parts[0]['teacher_rsum']}; merge only runs over the same features")
    seeds = sorted({seed for part in parts for seed in part["seeds"]})
    runs: dict[str, dict[int, dict]] = {}
    overrides: dict[str, dict] = {}
    for path, part in zip(paths, parts):
        for name, recipe in part["recipes"].items():
            have = runs.setdefault(name, {})
            for run in recipe["runs"]:
                if run["seed"] in have:
                    raise SystemExit(f"{path}: {name!r} seed {run['seed']} is also in another part; merge each run once")
                have[run["seed"]] = run
            overrides[name] = recipe["overrides"]
    results = {}
    for name in [n for n in order if n in runs] + [n for n in runs if n not in order]:
        if sorted(runs[name]) != seeds:
            raise SystemExit(f"{name!r} ran at seeds {sorted(runs[name])}, the merged table is over seeds {seeds}: "
                             "run the missing seeds first")
        values = [runs[name][seed]["rsum"] for seed in seeds]
        results[name] = {"overrides": overrides[name], "runs": [runs[name][seed] for seed in seeds],
                         "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return parts[0]["teacher_rsum"], seeds, results


def _read_part(path: str) -> dict:
    """One sweep result, checked: its runs are at the seeds it names."""
    try:
        part = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read a sweep result here ({exc})") from None
    if not isinstance(part, dict) or not {"seeds", "teacher_rsum", "recipes"} <= set(part):
        raise SystemExit(f"{path}: not a sweep result (needs seeds, teacher_rsum and recipes)")
    for name, recipe in part["recipes"].items():
        if sorted(run["seed"] for run in recipe["runs"]) != sorted(part["seeds"]):
            raise SystemExit(f"{path}: {name!r} has runs at seeds {[run['seed'] for run in recipe['runs']]}, "
                             f"the file says {part['seeds']}")
    return part
