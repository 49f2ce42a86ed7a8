"""`dsmd mine`: FAISS-mined hard negatives (i2t, t2i, i2i, t2t) from the cached teacher embeddings, to Parquet."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.config import section_help, stage_config
from pipeline.mining.negatives import mine
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("mine")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(mine=["features_dir", "out_dir", "splits:split", "k", "index", "threads"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    set_: Optional[list[str]] = set_option(),
    options: dict = None,
) -> None:
    """Mine the k hardest negatives of every image and text (i2t, t2i, i2i, t2t), positives and
    duplicate captions excluded. A re-run on unchanged features and params does nothing.

    Under `torchrun --nproc_per_node N` (or across machines) each rank searches its share of the
    queries; the index is built once by rank 0 and read by the others; the result equals one process."""
    with user_errors():
        cfg = stage_config(params, "mine", options["mine"], set_)
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            results = mine(cfg)
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
            return
        for split_name, summary in results.items():
            if summary["status"] == "up to date":
                typer.echo(f"{split_name}: up to date -> {Path(cfg.out_dir) / split_name}")
                continue
            parts = []
            for direction, info in summary["directions"].items():
                part = f"{direction} {info['index']}"
                if "recall_at_k" in info:
                    part += f" recall@{cfg.k}={info['recall_at_k']:.3f}"
                if info["short_rows"]:
                    part += f" {info['short_rows']} short"
                parts.append(part)
            typer.echo(f"{split_name}: {summary['num_images']} images, {summary['num_texts']} texts, k={cfg.k}; "
                       f"{'; '.join(parts)}; {summary['seconds']:.1f}s -> {Path(cfg.out_dir) / split_name}")


if __name__ == "__main__":
    app()
