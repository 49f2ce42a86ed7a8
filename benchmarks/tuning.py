"""The same care for both students: each trained over a small grid around params.yaml's train section (the
learning rate, the warmup, the initial logit scale, where CLIP from scratch on small batches usually stalls),
from ONE set of cached features, at the default budget, over several seeds.

    python benchmarks/tuning.py [--params params.yaml] [--losses clip dsmd] [--seeds 0 1 2] [--single-core]

One factor at a time around each student's default (a full grid would be many recipes a loss): prints each recipe's test
RSUM (mean +/- std over the seeds) and writes tuning.<losses>.json and a bar chart beside it in --out. Two halves
side by side (`--losses clip --single-core --out A` beside `--losses dsmd --single-core --out B`), then
`--merge A/tuning.clip.json B/tuning.dsmd.json` writes their union as tuning.json (more seeds or entries run later
join the same way).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.common import atomic
from pipeline.common.params import load_params

from students import base_config, bar_chart, merge, format_rows, jsonable, run_recipes, single_core, sweep_parser, teacher_rsum

LR_GRID = (0.002, 0.004, 0.008, 0.016, 0.032)
WARMUP_GRID = (30, 100, 200, 300, 400, 500)
LOGIT_SCALE_GRID = (1 / 0.07, 30.0, 50.0)  # 1 / 0.07: open_clip's (CLIP's) initial temperature 0.07


def grid(params: str, loss: str) -> dict[str, dict]:
    """Recipe name -> overrides of `loss`'s student: its default, then one factor at a time, each grid value that
    differs from the student's own (so no recipe duplicates the default under another name)."""
    own = base_config(load_params(params), loss)
    out: dict[str, dict] = {"default": {}}
    for lr in LR_GRID:
        if lr != own.optim.lr:
            out[f"lr {lr}"] = {"optim.lr": lr}
    for steps in WARMUP_GRID:
        if steps != own.optim.warmup_steps:
            out[f"warmup {steps}"] = {"optim.warmup_steps": steps}
    for scale in LOGIT_SCALE_GRID:
        if abs(scale - own.init_logit_scale) > 1e-6:
            out[f"logit scale {scale:.3g}"] = {"init_logit_scale": scale}
    return out


def main() -> None:
    parser = sweep_parser(__doc__, "two recipes, 10 steps, one seed: a smoke test")
    parser.set_defaults(seeds=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", choices=("clip", "dsmd"), default=["clip", "dsmd"])
    parser.add_argument("--only", nargs="*", help="grid entries to run (default: all)")
    parser.add_argument("--merge", nargs="+", help="tuning.<losses>.json files over the same features: write "
                        "the union of their recipes, grid order first, as tuning.json; trains nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.merge:
        order = {f"{loss} {name}": None for loss in args.losses for name in grid(args.params, loss)}
        teacher, seeds, results = merge(args.merge, order)
        report(results, teacher, seeds, out, "tuning")
        return
    if args.single_core:
        single_core()
    grids = {loss: grid(args.params, loss) for loss in args.losses}
    unknown = [name for name in args.only or [] if not any(name in g for g in grids.values())]
    if unknown:  # a mistyped name would otherwise drop a recipe without a word
        parser.error(f"unknown grid entries {unknown}; known: {sorted(set().union(*grids.values()))}")
    grids = {loss: {k: v for k, v in g.items() if not args.only or k in args.only} for loss, g in grids.items()}
    seeds = args.seeds
    if args.quick:
        grids = {loss: {k: {**v, "optim.max_steps": 10, "optim.batch_size": 32} for k, v in list(g.items())[:2]}
                 for loss, g in grids.items()}
        seeds = seeds[:1]
    recipes = {f"{loss} {name}": {"loss": loss, "val_every": 0, "live_dir": "", **({"batching": "random"} if loss == "clip" else {}),
                                  **overrides} for loss, g in grids.items() for name, overrides in g.items()}
    name = "tuning." + "-".join(args.losses)
    results = run_recipes(args.params, recipes, seeds, out / f"{name}-runs", out / f"{name}.partial.json")
    report(results, teacher_rsum(load_params(args.params).train.features_dir, "test"), seeds, out, name)
    (out / f"{name}.partial.json").unlink(missing_ok=True)


def report(results: dict, teacher: float, seeds: list[int], out: Path, name: str) -> None:
    """Print the table; write <name>.json and its bar chart <name>.png in `out`."""
    rows = [(recipe, r["mean"], r["std"]) for recipe, r in results.items()]
    print(f"teacher RSUM {teacher:.1f}; seeds {seeds}")
    print(format_rows(rows))
    atomic.atomic_write_json(jsonable({"teacher_rsum": teacher, "seeds": seeds, "recipes": results}), out / f"{name}.json")
    bar_chart(rows, teacher, out / f"{name}.png", f"Tuning grid at the default budget, seeds {seeds}")
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")


if __name__ == "__main__":
    main()
