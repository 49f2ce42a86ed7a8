"""`dsmd teacher`: resolve the teacher; with `pretrained: demo`, pretrain the demo teacher on the corpus."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.config import option_help, section_help, stage_config
from pipeline.names import IDENTITY_FILE
from pipeline.teacher import prepare_teacher
from stages._common import SET_HELP, params_option, user_errors

EPILOG = section_help("teacher")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
def main(
    params: Path = params_option(),
    model: Optional[str] = typer.Option(None, help=option_help("teacher", "model")),
    pretrained: Optional[str] = typer.Option(None, help=option_help("teacher", "pretrained")),
    out_dir: Optional[str] = typer.Option(None, help=option_help("teacher", "out_dir")),
    manifest: Optional[str] = typer.Option(None, help=option_help("teacher", "manifest")),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue an interrupted demo-teacher pretraining from its checkpoint"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Write the teacher's identity (and, for `demo`, its pretrained weights) to the teacher directory."""
    with user_errors():
        cfg = stage_config(params, "teacher", {"model": model, "pretrained": pretrained, "out_dir": out_dir, "manifest": manifest}, set_)
        identity = prepare_teacher(cfg, resume=resume)
        where = Path(cfg.out_dir) / IDENTITY_FILE
        typer.echo(f"teacher {identity.get('model')} ({cfg.pretrained or 'random weights'}): identity in {where}")


if __name__ == "__main__":
    app()
