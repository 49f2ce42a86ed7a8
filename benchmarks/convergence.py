"""Does the DSMD student's lead survive more training? Both students (CLIP-only and DSMD, the train section
of params.yaml otherwise) at several training budgets, each a full run with its own schedule, over several
seeds, from ONE set of cached features; the teacher as a line.

    python benchmarks/convergence.py [--params params.yaml] [--seeds 0 1 2] [--multiples 0.5 1 2 3]
                                     [--losses clip dsmd] [--single-core] [--out benchmarks/results]
    python benchmarks/convergence.py --assemble A/convergence.clip.json B/convergence.dsmd.json [C/convergence.dsmd.json]

Each budget is a multiple of the default (params.yaml's train.optim.epochs). `--losses clip` and `--losses
dsmd` with `--single-core` run the two halves side by side on two cores; each writes convergence.<loss>.json,
and `--assemble` joins them. With both losses it writes `convergence.json` directly, in this shape:

    {"teacher_rsum": float, "default_steps": int, "seeds": [int],
     "budgets": [{"steps": int, "clip": {"runs": [float], "mean": float, "std": float}, "dsmd": {...}}]}

and `convergence.png` (test RSUM against training steps). `--losses clip_views` adds a third curve, the CLIP-only
student with the DSMD student's stored views as plain augmentation (budgets then also hold "clip_views"); CLIP-only's
best is then the better of its two recipes. It prints the issue's checks: teacher / CLIP-only's best, DSMD /
CLIP-only at the default budget and best against best, each gap against 3 combined standard deviations, and DSMD's
spread as a share of its mean.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from pipeline.common import atomic
from pipeline.common.params import load_params
from pipeline.training.data import total_steps

from students import jsonable, run_recipe, save_rsum_chart, single_core, sweep_parser, teacher_rsum

LOSSES = ("clip", "dsmd")
# Each curve: a student of params.yaml with these overrides. clip_views (optional) is the CLIP-only student given the
# DSMD student's stored views as plain augmentation: the fairest baseline once training is long enough to overfit.
SERIES = {"clip": {"loss": "clip", "batching": "random"}, "dsmd": {"loss": "dsmd"},
          "clip_views": {"loss": "clip", "batching": "random", "use_views": True}}
LABELS = {"dsmd": "DSMD student", "clip": "CLIP-only student", "clip_views": "CLIP-only student, stored views as augmentation"}


def overrides(series: str, epochs: float) -> dict:
    return {**SERIES[series], "optim.epochs": epochs, "val_every": 0, "live_dir": ""}


def run_half(params: str, loss: str, multiples: list[float], seeds: list[int], out: Path, extra: dict | None = None) -> dict:
    """{multiple: {"steps", "runs"}} for one series (`loss`: a key of SERIES); written after every run, so a killed
    sweep keeps its figures."""
    base = load_params(params).train
    half: dict = {"loss": loss, "seeds": seeds, "default_epochs": base.optim.epochs, "budgets": {}}
    for multiple in multiples:
        runs = []
        for seed in seeds:
            run = run_recipe(params, {**overrides(loss, base.optim.epochs * multiple), **(extra or {})}, seed,
                             out / f"convergence-runs-{loss}")
            runs.append(run["rsum"])
            print(f"{loss:10s} x{multiple:<4g} ({run['steps']} steps) seed {seed}: RSUM {run['rsum']:.1f} "
                  f"({run['seconds']:.0f} s)", flush=True)
            half["budgets"][str(multiple)] = {"steps": run["steps"], "runs": runs}
            atomic.atomic_write_json(jsonable(half), out / f"convergence.{loss}.json")
    return half


def summary(runs: list[float]) -> dict:
    return {"runs": runs, "mean": statistics.fmean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0}


def merge(parts: list[dict]) -> dict[str, dict]:
    """One half per loss from partial files (a loss's seeds may be split over several processes): {loss: half},
    each half's runs keyed by seed. Only budgets every seed of a loss finished are kept."""
    halves: dict[str, dict] = {}
    for part in parts:
        half = halves.setdefault(part["loss"], {"loss": part["loss"], "seeds": [], "budgets": {}})
        for multiple, budget in part["budgets"].items():
            slot = half["budgets"].setdefault(multiple, {"steps": budget["steps"], "by_seed": {}})
            slot["by_seed"].update(zip(part["seeds"], budget["runs"]))
        half["seeds"] += [s for s in part["seeds"] if s not in half["seeds"]]
    for half in halves.values():
        half["seeds"].sort()
        half["budgets"] = {m: {"steps": b["steps"], "runs": [b["by_seed"][s] for s in half["seeds"]]}
                           for m, b in half["budgets"].items() if set(b["by_seed"]) == set(half["seeds"])}
    return halves


def assemble(halves: dict[str, dict], teacher: float, default_steps: int) -> dict:
    seeds = {tuple(h["seeds"]) for h in halves.values()}
    if len(seeds) != 1:
        raise SystemExit(f"the halves were run with different seeds: {sorted(seeds)}")
    multiples = sorted(set.intersection(*(set(halves[loss]["budgets"]) for loss in LOSSES)), key=float)
    budgets = [{"steps": halves["clip"]["budgets"][m]["steps"], "multiple": float(m),
                **{series: summary(half["budgets"][m]["runs"]) for series, half in halves.items() if m in half["budgets"]}}
               for m in multiples]
    return {"teacher_rsum": teacher, "default_steps": default_steps, "seeds": list(seeds.pop()), "budgets": budgets}


def checks(result: dict) -> list[str]:
    """The issue's targets, read back from the JSON alone."""
    teacher = result["teacher_rsum"]
    default = next(b for b in result["budgets"] if b["steps"] == result["default_steps"])
    # "best" is over the default budget and longer ones (the issue's {default, 2x, 3x}): a shorter one is a point
    # of the curve, not a budget a user would stop at
    budgets = [b for b in result["budgets"] if b["steps"] >= result["default_steps"]]
    best = {loss: max(budgets, key=lambda b: b[loss]["mean"])[loss] for loss in LOSSES}
    # the baseline's best is over its recipes too: with stored views as augmentation where that curve was run
    best["clip"] = max([best["clip"]] + [b["clip_views"] for b in budgets if "clip_views" in b], key=lambda r: r["mean"])

    def gap(a: dict, b: dict) -> str:
        combined = 3 * math.sqrt(a["std"] ** 2 + b["std"] ** 2)
        return f"gap {a['mean'] - b['mean']:.1f} vs 3 combined std {combined:.1f}: {'yes' if a['mean'] - b['mean'] > combined else 'NO'}"

    dsmd = default["dsmd"]
    return [
        f"teacher / CLIP-only's best:        {teacher / best['clip']['mean']:.3f} (target >= 1.15)",
        f"DSMD / CLIP-only, default budget:  {dsmd['mean'] / default['clip']['mean']:.3f} (target >= 1.10); {gap(dsmd, default['clip'])}",
        f"DSMD's best / CLIP-only's best:    {best['dsmd']['mean'] / best['clip']['mean']:.3f} (target >= 1.07); {gap(best['dsmd'], best['clip'])}",
        f"DSMD / teacher, default budget:    {dsmd['mean'] / teacher:.3f} (target >= 0.90)",
        f"DSMD's seed spread, default:       {100 * dsmd['std'] / dsmd['mean']:.2f}% of its mean (target <= 2%)",
    ]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [b["steps"] for b in result["budgets"]]
    for series, colour in (("dsmd", "#4c72b0"), ("clip", "#8c8c8c"), ("clip_views", "#55a868")):
        have = [b for b in result["budgets"] if series in b]
        if have:
            ax.errorbar([b["steps"] for b in have], [b[series]["mean"] for b in have], yerr=[b[series]["std"] for b in have],
                        marker="o", capsize=3, color=colour, label=LABELS[series])
    ax.axhline(result["teacher_rsum"], color="#c44e52", linestyle="--", label=f"teacher {result['teacher_rsum']:.1f}")
    ax.axvline(result["default_steps"], color="#bbbbbb", linestyle=":", label="default budget")
    save_rsum_chart(fig, ax, "training steps", f"Convergence, seeds {result['seeds']}", path)


def main() -> None:
    parser = sweep_parser(__doc__, "two budgets of 10 steps, one seed: a smoke test")
    parser.set_defaults(seeds=[0, 1, 2])
    parser.add_argument("--multiples", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--losses", nargs="+", choices=list(SERIES), default=list(LOSSES),
                        help="the curves: clip, dsmd, and optionally clip_views (CLIP-only with the stored views)")
    parser.add_argument("--assemble", nargs="+", metavar="PART", help="join convergence.<loss>.json files (a loss's seeds "
                        "may be split over several)")
    args = parser.parse_args()
    out = Path(args.out)
    train = load_params(args.params).train
    from pipeline.training.data import load_shards_data

    num_images = load_shards_data(train.features_dir, "train", with_teacher=False).num_images if train.max_images == 0 else train.max_images
    default_steps = total_steps(num_images, train.optim.batch_size, train.optim.epochs, train.optim.max_steps)
    if args.assemble:
        parts = []
        for path in args.assemble:
            try:
                parts.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as exc:
                sys.exit(f"{path}: cannot read ({exc})")
        halves = merge(parts)
        if not set(LOSSES) <= set(halves):
            sys.exit(f"--assemble needs one half per loss {LOSSES}, got {sorted(map(str, halves))}")
    else:
        if args.single_core:
            single_core()
        multiples, seeds, extra = args.multiples, args.seeds, {}
        if args.quick:
            multiples, seeds, extra = multiples[:2], seeds[:1], {"optim.max_steps": 10, "optim.batch_size": 32}
        halves = {loss: run_half(args.params, loss, multiples, seeds, out, extra) for loss in args.losses}
        if not set(LOSSES) <= set(halves):
            print(f"wrote {out}/convergence.{args.losses[0]}.json: join the other half with --assemble")
            return
    result = assemble(halves, teacher_rsum(train.features_dir, "test"), default_steps)
    print(f"teacher RSUM {result['teacher_rsum']:.1f}; seeds {result['seeds']}; default {default_steps} steps")
    print(f"{'steps':>6s} {'CLIP-only':>16s} {'DSMD':>16s} {'DSMD/CLIP':>9s} {'CLIP-only + views':>17s}")
    for b in result["budgets"]:
        views = f"{b['clip_views']['mean']:10.1f} +/-{b['clip_views']['std']:5.1f}" if "clip_views" in b else ""
        print(f"{b['steps']:6d} {b['clip']['mean']:9.1f} +/-{b['clip']['std']:5.1f} {b['dsmd']['mean']:9.1f} "
              f"+/-{b['dsmd']['std']:5.1f} {b['dsmd']['mean'] / b['clip']['mean']:9.3f} {views}")
    if any(b["steps"] == default_steps for b in result["budgets"]):
        print("\n".join(checks(result)))
    out.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write_json(jsonable(result), out / "convergence.json")
    plot(result, out / "convergence.png")
    print(f"wrote {out / 'convergence.json'} and {out / 'convergence.png'}")


if __name__ == "__main__":
    main()
