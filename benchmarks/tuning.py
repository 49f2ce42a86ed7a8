"""The same care for both students: each trained over a small grid around params.yaml's train section (the
learning rate, the warmup, the initial logit scale, where CLIP from scratch on small batches usually stalls),
from ONE set of cached features, at the default budget, over several seeds.

    python benchmarks/tuning.py [--params params.yaml] [--losses clip dsmd] [--seeds 0 1 2] [--single-core]

One factor at a time around each student's default (a full grid would be many recipes a loss): prints each recipe's test
RSUM (mean +/- std over the seeds) and writes tuning.<losses>.json and a bar chart beside it in --out.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.common import atomic
from pipeline.common.config import load_params

from students import bar_chart, format_rows, jsonable, run_recipes, single_core, sweep_parser, teacher_rsum

GRID = {  # name -> overrides of the train section
    "default": {},
    "lr 0.001": {"optim.lr": 0.001},
    "lr 0.004": {"optim.lr": 0.004},
    "lr 0.008": {"optim.lr": 0.008},
    "lr 0.016": {"optim.lr": 0.016},
    "warmup 30": {"optim.warmup_steps": 30},
    "warmup 100": {"optim.warmup_steps": 100},
    "warmup 200": {"optim.warmup_steps": 200},
    "logit scale 14.3": {"init_logit_scale": 1 / 0.07},  # open_clip's (CLIP's) initial temperature 0.07
    "logit scale 50": {"init_logit_scale": 50.0},
}


def main() -> None:
    parser = sweep_parser(__doc__, "two recipes, 10 steps, one seed: a smoke test")
    parser.set_defaults(seeds=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", choices=("clip", "dsmd"), default=["clip", "dsmd"])
    parser.add_argument("--only", nargs="*", help="grid entries to run (default: all)")
    args = parser.parse_args()
    if args.single_core:
        single_core()
    grid = {k: v for k, v in GRID.items() if not args.only or k in args.only}
    seeds = args.seeds
    if args.quick:
        grid, seeds = {k: {**v, "optim.max_steps": 10, "optim.batch_size": 32} for k, v in list(grid.items())[:2]}, seeds[:1]
    recipes = {f"{loss} {name}": {"loss": loss, "val_every": 0, "live_dir": "", **({"batching": "random"} if loss == "clip" else {}),
                                  **overrides} for loss in args.losses for name, overrides in grid.items()}
    out = Path(args.out)
    tag = "-".join(args.losses)
    results = run_recipes(args.params, recipes, seeds, out / f"tuning-runs-{tag}", out / f"tuning.{tag}.partial.json")
    teacher = teacher_rsum(load_params(args.params).train.features_dir, "test")
    rows = [(name, r["mean"], r["std"]) for name, r in results.items()]
    print(f"teacher RSUM {teacher:.1f}; seeds {seeds}")
    print(format_rows(rows))
    atomic.atomic_write_json(jsonable({"teacher_rsum": teacher, "seeds": seeds, "recipes": results}), out / f"tuning.{tag}.json")
    bar_chart(rows, teacher, out / f"tuning.{tag}.png", f"Tuning grid at the default budget, seeds {seeds}")
    (out / f"tuning.{tag}.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / f'tuning.{tag}.json'}")


if __name__ == "__main__":
    main()
