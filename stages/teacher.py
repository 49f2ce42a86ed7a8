"""`dsmd teacher`: resolve the teacher; with `pretrained: demo`, pretrain the demo teacher on the corpus."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.config import stage_config
from pipeline.names import IDENTITY_FILE
from pipeline.teacher import prepare_teacher
from stages._common import SET_HELP, params_option, user_errors

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    params: Path = params_option(),
    model: Optional[str] = typer.Option(None, help="open_clip model name or config (params: teacher.model)"),
    pretrained: Optional[str] = typer.Option(None, help="demo (pretrain here), an open_clip tag, hf-hub:..., local-dir:..., a checkpoint path, or '' for random (params: teacher.pretrained)"),
    out_dir: Optional[str] = typer.Option(None, help="where the demo teacher and teacher_identity.json go (params: teacher.out_dir)"),
    manifest: Optional[str] = typer.Option(None, help="corpus manifest used to pretrain the demo teacher (params: teacher.manifest)"),
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
