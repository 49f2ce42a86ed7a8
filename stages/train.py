"""`dsmd train`: the student, trained purely from the cached shards (DSMD or CLIP loss), or CLIP from the corpus."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.params import Params, section_help, stage_config
from pipeline.training.loop import train
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("train")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(Params, train=["features_dir", "negatives_dir", "out_dir", "model", "loss", "source", "manifest", "batching",
                       "optim.epochs", "optim.max_steps", "optim.batch_size", "optim.lr"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    student: Optional[str] = typer.Option(None, help="a student of params.yaml's students section: its entry applies over "
                                          "the train section (as in dvc.yaml's train@<name> stages)"),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue from <out-dir>/checkpoint.pt when it exists"),
    set_: Optional[list[str]] = set_option(),
    options: dict = None,
) -> None:
    """Train a student from the shards (never loading the teacher) and save it as an open_clip checkpoint.

    Under `torchrun --nproc_per_node N` the global batch is split over the ranks; the result matches a
    single-process run on the same global batch."""
    with user_errors():
        cfg = stage_config(params, "train", options["train"], set_, student=student)
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            summary = train(cfg, resume=resume)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per rank
            typer.echo(f"student saved to {cfg.out_dir} ({summary['steps']} steps, {summary['samples_per_s']:.0f} samples/s)")


if __name__ == "__main__":
    app()
