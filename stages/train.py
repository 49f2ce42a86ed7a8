"""`dsmd train`: the student, trained purely from the cached shards (DSMD or CLIP loss), or CLIP from the corpus."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import stage_config
from pipeline.training import train
from stages._common import SET_HELP, params_option, user_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: Path = params_option(),
    features_dir: Optional[str] = typer.Option(None, help="cached teacher features written by `dsmd extract` (params: train.features_dir)"),
    negatives_dir: Optional[str] = typer.Option(None, help="mined hard negatives written by `dsmd mine` (params: train.negatives_dir)"),
    out_dir: Optional[str] = typer.Option(None, help="where the student, checkpoint.pt, train_log.jsonl and train_summary.json go (params: train.out_dir)"),
    model: Optional[str] = typer.Option(None, help="open_clip model config of the student (params: train.model)"),
    loss: Optional[str] = typer.Option(None, help="dsmd (distillation + task loss) or clip (CLIP loss alone) (params: train.loss)"),
    source: Optional[str] = typer.Option(None, help="shards (the features) or corpus (the manifest's WebDataset shards; clip loss only) (params: train.source)"),
    manifest: Optional[str] = typer.Option(None, help="corpus manifest used with --source corpus (params: train.manifest)"),
    batching: Optional[str] = typer.Option(None, help="random or hard-negative-aware (mined neighbours in the same batch) (params: train.batching)"),
    epochs: Optional[float] = typer.Option(None, help="passes over the training images (fractions allowed) (params: train.optim.epochs)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps; > 0 overrides --epochs (params: train.optim.max_steps)"),
    batch_size: Optional[int] = typer.Option(None, help="global batch size, across ranks and accumulation (params: train.optim.batch_size)"),
    lr: Optional[float] = typer.Option(None, help="peak AdamW learning rate (params: train.optim.lr)"),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue from <out-dir>/checkpoint.pt when it exists"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Train a student from the shards (never loading the teacher) and save it as an open_clip checkpoint.

    Under `torchrun --nproc_per_node N` the global batch is split over the ranks; the result matches a
    single-process run on the same global batch."""
    with user_errors():
        cfg = stage_config(params, "train", {
            "features_dir": features_dir, "negatives_dir": negatives_dir, "out_dir": out_dir, "model": model,
            "loss": loss, "source": source, "manifest": manifest, "batching": batching, "optim.epochs": epochs,
            "optim.max_steps": max_steps, "optim.batch_size": batch_size, "optim.lr": lr,
        }, set_)
        summary = train(cfg, resume=resume)
        if os.environ.get("RANK", "0") == "0":  # one line per run, not per rank
            typer.echo(f"student saved to {cfg.out_dir} ({summary['steps']} steps, {summary['samples_per_s']:.0f} samples/s)")


if __name__ == "__main__":
    app()
