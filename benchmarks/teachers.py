"""Several teachers: DSMD students distilled from the shipped demo teacher alone, from a second demo teacher alone,
and from both (as one ensemble target, and each teacher apart: `train.teachers_target`), on ONE set of cached
features, each over several seeds.

    python benchmarks/teachers.py [--params params.yaml] [--seeds 0 1 2] [--quick] [--out benchmarks/results]

The second teacher differs in what it saw and where it started: the same architecture pretrained by `dsmd pretrain`
with `--second-images` fresh scenes (default 200,000: a quarter of the first's 800,000, ~10 minutes on 2 cores)
and init seed 1, written to `<work>/second/` (kept: a re-run reuses it). `dsmd extract --teacher second` adds its
embeddings of the train and test splits beside the features' own (`<work>/embeddings/second/`). The hard negatives
stay the first teacher's (mining is not redone). Writes `teachers.json` (the teachers' own test RSUM, each
recipe's runs, mean and std) and `teachers.png` in --out.

`--merge A/teachers.json B/teachers.json` joins runs of other seeds or other recipes (`--only`) of the same teachers
into one table (every recipe must then have every seed).
Needs `dvc repro` (or extract + mine) first. --quick: a 2,000-scene second teacher and 10 steps a student (the
suite's smoke test).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.common import atomic
from pipeline.common.config import TeacherConfig, apply_overrides
from pipeline.common.params import load_params
from pipeline.evaluation import evaluate
from pipeline.features import store
from pipeline.features.added_teacher import extract_added_teacher

from students import bar_chart, format_rows, jsonable, run_recipes, single_core, sweep_parser

SECOND = "second"


def make_second_teacher(params: str, work: Path, images: int, quick: bool) -> Path:
    """`dsmd pretrain` of the teacher's architecture on `images` scenes with init seed 1, unless already made."""
    folder = work / SECOND
    if (folder / "card.json").exists():
        return folder
    sets = [f"world_images={images}", "optim.seed=1", f"out_dir={folder}",
            f"work_dir={work / 'second-run'}"]
    if quick:
        sets += ["optim.batch_size=32", "optim.warmup_steps=1", "optim.num_workers=0"]
    command = [sys.executable, "-m", "stages.pretrain", "--params", params, "--resume"]
    for item in sets:
        command += ["--set", item]
    subprocess.run(command, check=True)
    return folder


def embed_second(params: str, folder: Path, work: Path, splits: list[str]) -> str:
    """The second teacher's embeddings of the features' splits (`dsmd extract --teacher second`'s library call)."""
    loaded = load_params(params)
    extract = apply_overrides(loaded.extract, {"teachers_dir": str(work / "embeddings"), "splits": splits,
                                               "out_dir": loaded.train.features_dir})
    teacher = TeacherConfig(model=loaded.teacher.model, pretrained=f"local-dir:{folder}")
    extract_added_teacher(extract, SECOND, teacher)
    return extract.teachers_dir


def teacher_rows(features_dir: str, teachers_dir: str, split: str = "test") -> dict[str, float]:
    """Test RSUM of each teacher and of their equal-share ensemble, from the cached embeddings."""
    own_image, own_text, text_to_image = store.load_embeddings(features_dir, split)
    image, text = (rows[:].astype(np.float32) for rows in store.added_teacher_rows(teachers_dir, SECOND, features_dir, split))
    joint_image = store.EnsembleRows([own_image, image], [1.0, 1.0])[:]
    joint_text = store.EnsembleRows([own_text, text], [1.0, 1.0])[:]
    return {name: evaluate.retrieval_metrics(i, t, text_to_image)["rsum"] for name, (i, t) in
            {"first teacher": (own_image, own_text), "second teacher": (image, text), "ensemble": (joint_image, joint_text)}.items()}


def recipes(teachers_dir: str, quick: bool) -> dict[str, dict]:
    common = {"teachers_dir": teachers_dir, **({"optim.max_steps": 10} if quick else {})}
    return {
        "CLIP-only": {"loss": "clip", "batching": "random", **common},
        "DSMD, first teacher": {"loss": "dsmd", **common},
        "DSMD, second teacher": {"loss": "dsmd", "teachers": {SECOND: {}}, **common},
        "DSMD, both (ensemble)": {"loss": "dsmd", "teachers": {"teacher": {}, SECOND: {}}, **common},
        "DSMD, both (each)": {"loss": "dsmd", "teachers": {"teacher": {}, SECOND: {}}, "teachers_target": "each", **common},
    }


_RECIPE_ORDER = ("CLIP-only", "DSMD, first teacher", "DSMD, second teacher", "DSMD, both (ensemble)",
                 "DSMD, both (each)")  # as recipes()


def merge(paths: list[str]) -> dict:
    """The union of teachers.json files of the same teachers run over other seeds, as one table."""
    tables = []
    for path in paths:
        try:
            tables.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read ({exc})") from None
    first = tables[0]
    for path, table in zip(paths[1:], tables[1:]):
        if table["teachers"] != first["teachers"] or table["second_teacher"] != first["second_teacher"]:
            raise SystemExit(f"{path}: other teachers than {paths[0]}; refusing to merge")
    names = sorted({name for table in tables for name in table["recipes"]}, key=_RECIPE_ORDER.index)
    recipes = {}
    for name in names:
        runs = sorted((run for table in tables for run in table["recipes"].get(name, {}).get("runs", [])),
                      key=lambda run: run["seed"])
        values = [run["rsum"] for run in runs]
        overrides = next(table["recipes"][name]["overrides"] for table in tables if name in table["recipes"])
        recipes[name] = {"overrides": overrides, "runs": runs, "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    seeds = sorted({run["seed"] for recipe in recipes.values() for run in recipe["runs"]})
    uneven = [name for name, recipe in recipes.items() if [run["seed"] for run in recipe["runs"]] != seeds]
    if uneven:  # every recipe over the same seeds, or the table compares unlike things
        raise SystemExit(f"recipes {uneven} lack some of seeds {seeds}, or have one twice; refusing to merge")
    return {**first, "seeds": seeds, "recipes": recipes}


def report(table: dict, out: Path) -> None:
    atomic.atomic_write_json(jsonable(table), out / "teachers.json")
    rows = [(name, r["mean"], r["std"]) for name, r in table["recipes"].items()]
    bar_chart(rows, table["teachers"]["first teacher"], out / "teachers.png", "DSMD from one teacher, the other, or both")
    print(" ".join(f"{name} RSUM {value:.1f};" for name, value in table["teachers"].items()))
    print(format_rows(rows, table["recipes"]["CLIP-only"]["mean"] if "CLIP-only" in table["recipes"] else None))


def main() -> None:
    parser = sweep_parser(__doc__, "a 2,000-scene second teacher, 10 steps a student: a smoke test")
    parser.add_argument("--second-images", type=int, default=200_000, help="fresh scenes the second teacher sees")
    parser.add_argument("--work", default="outputs/bench-teachers", help="the second teacher and its embeddings (kept)")
    parser.add_argument("--merge", nargs="+", help="teachers.json files of other seeds or recipes: write their union "
                                                   "(every recipe over the same seeds); trains nothing")
    parser.add_argument("--only", nargs="*", help="run only these recipes")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    if args.merge:
        report(merge(args.merge), out)
        return
    if args.single_core:
        single_core()
    folder = make_second_teacher(args.params, work, 2000 if args.quick else args.second_images, args.quick)
    features_dir = load_params(args.params).train.features_dir
    teachers_dir = embed_second(args.params, folder, work, ["train", "test"])
    teachers = teacher_rows(features_dir, teachers_dir)
    chosen = {k: v for k, v in recipes(teachers_dir, args.quick).items() if not args.only or k in args.only}
    results = run_recipes(args.params, chosen, args.seeds, work / "students",
                          log_file=out / "teachers.partial.json")
    card = json.loads((folder / "card.json").read_text())
    second = {k: card[k] for k in ("samples_seen", "steps", "wall_time_s", "sha256")}
    report({"teachers": teachers, "second_teacher": second, "seeds": args.seeds, "recipes": results}, out)
    (out / "teachers.partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
