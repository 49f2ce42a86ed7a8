"""Where distillation helps: DSMD against the CLIP-only student as the target train split grows.

    python benchmarks/scaling.py [--params params.yaml] [--sizes 500 1000 2000] [--seeds 0 1 2] [--quick]

Each size trains both students on the first N images of the train split (`train.max_images`; mined
negatives outside them are dropped) for the SAME number of steps as the full-size default run, so only
the data differs. Prints mean and standard deviation of test RSUM per size, the teacher as a
reference, and writes `scaling.json` and `scaling.png` (RSUM against size) in --out.

Sizes above the train split are clipped to it (the default world's is 2,000 images). Run time on the 2-core CPU
at the default 586 steps: about 2.5 min a student, 3 with --single-core beside another sweep, so 2 sizes x 2
losses x 3 seeds take about 35 min on one core, plus the full size unless --reuse finds it (the ablation's
CLIP-only and DSMD (default) runs are the full-size points). Two halves side by side (`--sizes 500 2000 --out A`,
`--sizes 1000 2000 --out B`, each --single-core), then `--sizes 500 1000 2000 --reuse ablation.json
A/scaling.json B/scaling.json` trains nothing and writes their union. --quick runs 2 sizes x 1 seed for 10 steps
(a smoke test, in the suite).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.common import atomic
from pipeline.common.params import load_params
from pipeline.features import store
from pipeline.training import data as data_mod

from students import sweep_parser, single_core, format_rows, jsonable, run_recipes, save_rsum_chart, teacher_rsum


def plot(sizes, results, teacher, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for loss, colour in (("dsmd", "#4c72b0"), ("clip", "#dd8452")):
        means = [results[f"{loss} {n}"]["mean"] for n in sizes]
        stds = [results[f"{loss} {n}"]["std"] for n in sizes]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, color=colour,
                    label="DSMD student" if loss == "dsmd" else "CLIP-only student")
    ax.axhline(teacher, color="#c44e52", linestyle="--", label=f"teacher {teacher:.1f}")
    ax.set_xscale("log")
    save_rsum_chart(fig, ax, "target train images", "Distillation against training alone, by target data size", path)


def main() -> None:
    parser = sweep_parser(__doc__, "2 sizes, 1 seed, 10 steps: a smoke test")
    parser.set_defaults(seeds=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000], help="train images (clipped to the split)")
    parser.add_argument("--reuse", nargs="*", help="ablation.json / scaling.json of the same params: runs of the same recipe, "
                                                   "steps and seeds found there (the ablation's CLIP-only and DSMD (default) "
                                                   "are the full-size points) are not trained again")
    args = parser.parse_args()
    if args.single_core:
        single_core()
    train = load_params(args.params).train
    manifest = store.load_split_manifest(train.features_dir, train.split)
    full = int(manifest["num_images"])
    steps = data_mod.total_steps(full, train.optim.batch_size, train.optim.epochs, train.optim.max_steps)
    sizes, seeds, extra = sorted(set(min(n, full) for n in args.sizes)), args.seeds, {}
    if args.quick:
        sizes, seeds, steps, extra = sizes[:2], seeds[:1], 10, {"optim.batch_size": 32}
    recipes = {
        f"{loss} {n}": {"loss": loss, "batching": "random" if loss == "clip" else train.batching,
                        "max_images": n, "optim.max_steps": steps, **extra}
        for n in sizes for loss in ("dsmd", "clip")
    }
    out = Path(args.out)
    teacher = teacher_rsum(train.features_dir, "test")
    reused = {}
    for path in args.reuse or []:  # earlier runs of exactly these recipes, steps and seeds are not trained again
        earlier = json.loads(Path(path).read_text())["recipes"]
        aliases = {f"dsmd {full}": "DSMD (default)", f"clip {full}": "CLIP-only"}
        for name in recipes:
            recipe = earlier.get(name) or earlier.get(aliases.get(name, ""))
            if recipe and [r["seed"] for r in recipe["runs"]] == seeds and all(r["steps"] == steps for r in recipe["runs"]):
                reused[name] = {**recipe, "reused_from": str(path)}
    if reused:
        print(f"reusing {sorted(reused)} from {args.reuse}")
    todo = {k: v for k, v in recipes.items() if k not in reused}
    results = {**reused, **run_recipes(args.params, todo, seeds, out / "scaling-runs", out / "scaling.partial.json")}
    results = {k: results[k] for k in recipes}
    print(f"teacher RSUM {teacher:.1f}; {steps} steps of {extra.get('optim.batch_size', train.optim.batch_size)} at every size; seeds {seeds}")
    print(format_rows([(name, r["mean"], r["std"]) for name, r in results.items()]))
    for n in sizes:
        d, c = results[f"dsmd {n}"], results[f"clip {n}"]
        gap = d["mean"] - c["mean"]
        spread = 3 * math.sqrt(d["std"] ** 2 + c["std"] ** 2)
        lead = teacher / c["mean"] - 1
        print(f"{n:6d} images: DSMD - CLIP = {gap:+.1f} (3 x combined std {spread:.1f}); teacher leads CLIP-only by {100 * lead:.1f}%")
    atomic.atomic_write_json(jsonable({"teacher_rsum": teacher, "steps": steps, "sizes": sizes, "seeds": seeds, "recipes": results}),
                             out / "scaling.json")
    plot(sizes, results, teacher, out / "scaling.png")
    (out / "scaling.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
