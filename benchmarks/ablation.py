"""Which parts of DSMD earn their place: students trained from ONE set of cached features.

    python benchmarks/ablation.py [--params params.yaml] [--seeds 0 1] [--quick] [--out benchmarks/results]

Recipes (each over every seed; train section of params.yaml plus the overrides shown in the JSON):
the CLIP-only student and DSMD as configured, each also at the other learning rates of LR_GRID; DSMD
without each term in turn (with the affinity term, which is off by default); each balancer mode; the
other projection initialisation; the fixed (paper) hard-negative margin; hard-negative-aware batching;
each student with the other choice of the stored augmentation views (only when the features have them:
`extract.views` > 0; for the CLIP-only student they are plain augmentation).
Prints mean and standard deviation of test RSUM and the ratio to the CLIP-only student, and writes
`ablation.json` and `ablation.png` in --out.

Needs `dvc repro` (or extract + mine) first: it reads train.features_dir / train.negatives_dir.
Run time on the 2-core CPU at the default 586 steps: about 2.5 min a DSMD student, 1.5 min a CLIP-only
one (--single-core beside another sweep: about 3 and 2.5 min), so the 23 recipes x 3 seeds take about
95 min in two halves; --quick trains 2 recipes x 2 seeds for 10 steps (a smoke test, in the suite).
To use both cores, run two halves side by side (`--single-core --only ...` and `--single-core --only ...
--skip CLIP-only`, each with its own
--out), then `--merge A/ablation.json B/ablation.json` writes their union as one table, JSON and chart. --merge also
joins more seeds run later (`--seeds 3 4` beside a finished `--seeds 0 1 2`), as long as every recipe then has
every seed.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.common import atomic
from pipeline.common.params import load_params
from pipeline.features import store

from students import merge, base_config, sweep_parser, single_core, bar_chart, format_rows, jsonable, run_recipes, teacher_rsum

TERMS = ("feature", "similarity", "contrastive", "hard_negative", "affinity")
LR_GRID = (0.002, 0.004, 0.008, 0.016, 0.032)


def recipes(params: str, views: int) -> dict[str, dict]:
    """Recipe name -> overrides; `views`: how many stored views the train features hold (0: none)."""
    loaded = load_params(params)
    train, clip_lr = base_config(loaded, "dsmd"), base_config(loaded, "clip").optim.lr
    out = {"CLIP-only": {"loss": "clip", "batching": "random"}, "DSMD (default)": {"loss": "dsmd"}}
    for lr in LR_GRID:  # both students see the same learning-rate grid, each around its own tuned rate
        if lr != clip_lr:
            out[f"CLIP-only lr {lr}"] = {"loss": "clip", "batching": "random", "optim.lr": lr}
        if lr != train.optim.lr:
            out[f"DSMD lr {lr}"] = {"loss": "dsmd", "optim.lr": lr}
    for term in TERMS:
        if getattr(train.distill, term):
            out[f"DSMD without {term}"] = {"loss": "dsmd", f"distill.{term}": False}
        else:
            out[f"DSMD with {term}"] = {"loss": "dsmd", f"distill.{term}": True}
    for mode in ("calibrated", "dynamic", "authors", "uniform"):
        if mode != train.distill.balancer.mode:
            out[f"balancer {mode}"] = {"loss": "dsmd", "distill.balancer.mode": mode}
    other_margin = "fixed" if train.distill.margin_mode == "teacher" else "teacher"
    out[f"margin {other_margin}"] = {"loss": "dsmd", "distill.margin_mode": other_margin, "distill.hard_negative": True}
    other_init = "default" if train.projection_init == "orthogonal" else "orthogonal"
    out[f"projection init {other_init}"] = {"loss": "dsmd", "projection_init": other_init}
    other_batching = "hard-negative-aware" if train.batching == "random" else "random"
    out[f"batching {other_batching}"] = {"loss": "dsmd", "batching": other_batching}
    if views:  # each student's other choice of the stored views is a recipe (the CLIP-only one: plain augmentation)
        out["DSMD without stored views" if train.use_views else "DSMD with stored views"] = {
            "loss": "dsmd", "use_views": not train.use_views}
        clip = base_config(loaded, "clip")
        out["CLIP-only without stored views" if clip.use_views else "CLIP-only with stored views"] = {
            "loss": "clip", "batching": "random", "use_views": not clip.use_views}
    return out


def stored_views(params: str) -> int:
    train = base_config(load_params(params), "dsmd")
    return int(store.load_split_manifest(train.features_dir, train.split).get("views", 0) or 0)


def main() -> None:
    parser = sweep_parser(__doc__, "2 recipes, 10 steps each: a smoke test")
    parser.add_argument("--only", nargs="*", help="run only these recipe names (CLIP-only is always run)")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out these recipe names")
    parser.add_argument("--merge", nargs="+", help="ablation.json files of runs over the same features (two halves run "
                                                   "side by side, or more seeds run later): write their union; trains nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.merge:
        teacher, seeds, results = merge(args.merge, recipes(args.params, stored_views(args.params)))
        report(results, teacher, seeds, out)
        return
    if args.single_core:
        single_core()
    views = stored_views(args.params)
    chosen = recipes(args.params, views)
    unknown = [name for name in (args.only or []) + args.skip if name not in chosen]
    if unknown:  # a mistyped name would otherwise drop a recipe without a word
        raise SystemExit(f"unknown recipe(s) {unknown}; the recipes are: {', '.join(map(repr, chosen))}")
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only or k == "CLIP-only"}
    chosen = {k: v for k, v in chosen.items() if k not in args.skip}
    if args.quick:
        chosen = {k: {**v, "optim.max_steps": 10, "optim.batch_size": 32} for k, v in list(chosen.items())[:2]}
    train = load_params(args.params).train
    if not views:
        print("stored views: not run (the features have none; extract with extract.views > 0 to include them)")
    teacher = teacher_rsum(train.features_dir, "test")
    results = run_recipes(args.params, chosen, args.seeds, out / "ablation-runs", out / "ablation.partial.json")
    report(results, teacher, args.seeds, out)
    (out / "ablation.partial.json").unlink(missing_ok=True)


def report(results: dict, teacher: float, seeds: list[int], out: Path) -> None:
    """Print the table (ratios to the CLIP-only student when it ran), write ablation.json and ablation.png."""
    rows = [(name, r["mean"], r["std"]) for name, r in results.items()]
    clip = results["CLIP-only"]["mean"] if "CLIP-only" in results else None
    print(f"teacher RSUM {teacher:.1f}; seeds {seeds}")
    print(format_rows(rows, clip))
    atomic.atomic_write_json(jsonable({"teacher_rsum": teacher, "seeds": seeds, "recipes": results}), out / "ablation.json")
    bar_chart(rows, teacher, out / "ablation.png", f"Ablation ({len(seeds)} seeds)")
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
