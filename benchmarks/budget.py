"""Which student shape and training budget make distillation pay: the CLIP-only and the DSMD student
of several student configs, each over several epoch counts, from ONE set of cached features.

    python benchmarks/budget.py [--params params.yaml] [--seeds 0 1] [--only NAME ...] [--quick] [--out benchmarks/results]

Student configs (train section of params.yaml plus the model and epochs of each row; the extra
configs are in benchmarks/model_configs/):
  v1       dsmd-tiny-student-v1: 8-px patches at 48 px (36 image tokens), 1 text layer (the student before)
  w128     as v1 but 128 wide like the teacher, so no projection: distillation acts on the retrieval space
  t1       16-px patches at 64 px (16 image tokens), 1 text layer
  default  train.model of params.yaml (dsmd-tiny-student: 16 image tokens, 2 text layers)
Prints, per config and epoch count, both students' test RSUM (mean and standard deviation over the
seeds), DSMD / CLIP-only and DSMD / teacher, and writes `budget.json` and `budget.png` (RSUM against
training steps) in --out.

Run time on the 2-core CPU, one core per student (`--single-core`, two sweeps side by side): about
1.5-2 min per student at 20 epochs, so the whole grid (12 rows x 2 losses x 2 seeds = 48 students)
takes about 50 min per core;
--quick trains the first row for 10 steps (a smoke test).
"""
from __future__ import annotations

from pathlib import Path

import open_clip

from pipeline.common import atomic
from pipeline.common.params import load_params

from students import sweep_parser, jsonable, run_recipes, save_rsum_chart, single_core, teacher_rsum

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
# (short name, open_clip config or None for params.yaml's, epoch counts, extra overrides)
GRID = (
    ("v1", "dsmd-tiny-student-v1", (20, 30, 40), {}),
    ("w128", "dsmd-tiny-student-w128", (20,), {}),
    ("t1", "dsmd-tiny-student-t1", (20, 25, 30), {}),
    ("t1 lr 0.004", "dsmd-tiny-student-t1", (25,), {"optim.lr": 0.004}),
    ("default", None, (15, 17, 20, 25), {}),
)


def recipes() -> dict[str, dict]:
    out = {}
    for short, model, epochs, extra in GRID:
        for n in epochs:
            for loss in ("clip", "dsmd"):
                overrides = {"loss": loss, "optim.epochs": n, "val_every": 0, "live_dir": "", **extra}
                if loss == "clip":
                    overrides["batching"] = "random"
                if model is not None:
                    overrides["model"] = model
                out[f"{loss} {short} e{n}"] = overrides
    return out


def rows(results: dict, teacher: float) -> list[dict]:
    """One row per (config, epochs) with both students: means, stds, DSMD / CLIP-only, DSMD / teacher."""
    table = []
    for short, _, epochs, _ in GRID:
        for n in epochs:
            clip, dsmd = results.get(f"clip {short} e{n}"), results.get(f"dsmd {short} e{n}")
            if clip is None or dsmd is None:
                continue
            table.append({"config": short, "epochs": n, "steps": dsmd["runs"][0]["steps"],
                          "clip": (clip["mean"], clip["std"]), "dsmd": (dsmd["mean"], dsmd["std"]),
                          "ratio": dsmd["mean"] / clip["mean"], "of_teacher": dsmd["mean"] / teacher})
    return table


def plot(table: list[dict], teacher: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = dict(zip([g[0] for g in GRID], ("#8c8c8c", "#937860", "#55a868", "#da8bc3", "#4c72b0")))
    for short in dict.fromkeys(r["config"] for r in table):
        mine = [r for r in table if r["config"] == short]
        steps = [r["steps"] for r in mine]
        for loss, style in (("dsmd", "-"), ("clip", ":")):
            ax.errorbar(steps, [r[loss][0] for r in mine], yerr=[r[loss][1] for r in mine], marker="o", capsize=3,
                        linestyle=style, color=colours[short], label=f"{short} {'DSMD' if loss == 'dsmd' else 'CLIP-only'}")
    ax.axhline(teacher, color="#c44e52", linestyle="--", label=f"teacher {teacher:.1f}")
    save_rsum_chart(fig, ax, "training steps of 256", "Student shape and training budget", path, fontsize=7)


def main() -> None:
    parser = sweep_parser(__doc__, "the first row, 10 steps, one seed: a smoke test")
    parser.add_argument("--only", nargs="*", help="run only these recipe names (e.g. 'dsmd t1 e25' 'clip t1 e25')")
    args = parser.parse_args()
    if args.single_core:
        single_core()
    open_clip.add_model_config(MODEL_CONFIGS)  # stays registered: open_clip keeps every added path
    chosen, seeds = recipes(), args.seeds
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    if args.quick:
        chosen = {k: {**v, "optim.max_steps": 10, "optim.batch_size": 32} for k, v in list(chosen.items())[:2]}
        seeds = seeds[:1]
    train = load_params(args.params).train
    teacher = teacher_rsum(train.features_dir, "test")
    out = Path(args.out)
    results = run_recipes(args.params, chosen, seeds, out / "budget-runs", out / "budget.partial.json")
    table = rows(results, teacher)
    print(f"teacher RSUM {teacher:.1f}; seeds {seeds}")
    print(f"{'config':12s} {'epochs':>6s} {'steps':>5s} {'CLIP-only':>15s} {'DSMD':>15s} {'DSMD/CLIP':>9s} {'DSMD/teacher':>12s}")
    for r in table:
        print(f"{r['config']:12s} {r['epochs']:6d} {r['steps']:5d} {r['clip'][0]:9.1f} +/-{r['clip'][1]:4.1f} "
              f"{r['dsmd'][0]:9.1f} +/-{r['dsmd'][1]:4.1f} {r['ratio']:9.3f} {r['of_teacher']:12.3f}")
    atomic.atomic_write_json(jsonable({"teacher_rsum": teacher, "seeds": seeds, "recipes": results, "table": table}),
                             out / "budget.json")
    plot(table, teacher, out / "budget.png")
    (out / "budget.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / 'budget.json'} and {out / 'budget.png'}")


if __name__ == "__main__":
    main()
