"""Where a student's seed spread comes from: its initial weights, or the order and views of its data.

    python benchmarks/seeds.py [--params params.yaml] [--loss clip] [--seeds 0 1 2] [--single-core] [--out DIR]

`optim.seed` draws both the initial weights and the data (order, caption and view of each image); `optim.init_seed`
draws the weights alone. Every (init seed, data seed) pair of --seeds is trained from ONE set of cached features at
the default budget (the diagonal is the plain seeds' runs) and scored on the test split. Prints the matrix, the
spread of its row means (the initial weights), of its column means (the data) and what neither explains, and writes
seeds.<loss>.json in --out. On the 2-core CPU a pair takes about 2.5 min (CLIP-only) or 3.5 min (DSMD) with
--single-core, so 3 seeds take 25-30 min; two losses run side by side, each with its own --out.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from pipeline.common import atomic
from pipeline.common.params import load_params

from students import jsonable, run_recipes, single_core, sweep_parser, teacher_rsum


def recipes(loss: str, seeds: list[int]) -> dict[str, dict]:
    """One recipe per init seed; run over the data seeds, each gives a row of the matrix."""
    return {f"init seed {seed}": {"loss": loss, "optim.init_seed": seed, "val_every": 0, "live_dir": "",
                                  **({"batching": "random"} if loss == "clip" else {})} for seed in seeds}


def decompose(matrix: np.ndarray) -> dict[str, float]:
    """Rows: init seeds, columns: data seeds. The std of the row means, of the column means, and the root mean
    square of what is left after both (their interaction); with one seed a side there is nothing to split."""
    grand = matrix.mean()
    rows, cols = matrix.mean(axis=1), matrix.mean(axis=0)
    residual = matrix - rows[:, None] - cols[None, :] + grand
    return {"mean": float(grand), "std_all": float(np.std(matrix, ddof=1)) if matrix.size > 1 else 0.0,
            "std_init": float(np.std(rows, ddof=1)) if len(rows) > 1 else 0.0,
            "std_data": float(np.std(cols, ddof=1)) if len(cols) > 1 else 0.0,
            "rms_interaction": float(np.sqrt((residual ** 2).mean()))}


def main() -> None:
    parser = sweep_parser(__doc__, "2 seeds, 10 steps: a smoke test")
    parser.set_defaults(seeds=[0, 1, 2])
    parser.add_argument("--loss", choices=("clip", "dsmd"), default="clip")
    args = parser.parse_args()
    if args.single_core:
        single_core()
    chosen = recipes(args.loss, args.seeds)
    if args.quick:
        chosen = {k: {**v, "optim.max_steps": 10, "optim.batch_size": 32} for k, v in chosen.items()}
    out = Path(args.out)
    results = run_recipes(args.params, chosen, args.seeds, out / f"seeds.{args.loss}-runs", out / f"seeds.{args.loss}.partial.json")
    matrix = np.array([[run["rsum"] for run in results[f"init seed {i}"]["runs"]] for i in args.seeds])
    split = decompose(matrix)
    report = {"loss": args.loss, "seeds": args.seeds, "teacher_rsum": teacher_rsum(load_params(args.params).train.features_dir, "test"),
              "rsum": matrix.tolist(), "rows": "init seed", "columns": "data seed", **split,
              "plain_seeds": [float(matrix[i, i]) for i in range(len(args.seeds))]}
    print(format_matrix(matrix, args.seeds))
    print(f"mean {split['mean']:.1f}; std over all pairs {split['std_all']:.1f}; of the init seeds' means "
          f"{split['std_init']:.1f}, of the data seeds' means {split['std_data']:.1f}; interaction (rms) "
          f"{split['rms_interaction']:.1f}; plain seeds (diagonal) {statistics.fmean(report['plain_seeds']):.1f}")
    atomic.atomic_write_json(jsonable(report), out / f"seeds.{args.loss}.json")
    (out / f"seeds.{args.loss}.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / f'seeds.{args.loss}.json'}")


def format_matrix(matrix: np.ndarray, seeds: list[int]) -> str:
    head = "init \\ data " + "".join(f"{s:>9d}" for s in seeds) + "     mean"
    lines = [f"{i:>11d} " + "".join(f"{v:9.1f}" for v in row) + f"{row.mean():9.1f}" for i, row in zip(seeds, matrix)]
    return "\n".join([head, *lines, "       mean " + "".join(f"{v:9.1f}" for v in matrix.mean(axis=0))])


if __name__ == "__main__":
    main()
