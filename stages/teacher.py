"""`dsmd teacher`: resolve the teacher (an open_clip tag, hf-hub:, local-dir:, a checkpoint, or the shipped demo) and record its identity."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.config import option_help, section_help, stage_config
from pipeline.common.names import IDENTITY_FILE
from pipeline.features.teacher import prepare_teacher
from stages._common import SET_HELP, break_lock_option, params_option, user_errors

EPILOG = section_help("teacher")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    model: Optional[str] = typer.Option(None, help=option_help("teacher", "model")),
    pretrained: Optional[str] = typer.Option(None, help=option_help("teacher", "pretrained")),
    out_dir: Optional[str] = typer.Option(None, help=option_help("teacher", "out_dir")),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Load the teacher once and write its identity to the teacher directory (nothing is trained)."""
    with user_errors():
        cfg = stage_config(params, "teacher", {"model": model, "pretrained": pretrained, "out_dir": out_dir}, set_)
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            identity = prepare_teacher(cfg)
        where = Path(cfg.out_dir) / IDENTITY_FILE
        typer.echo(f"teacher {identity.get('model')} ({cfg.pretrained or 'random weights'}): identity in {where}")


if __name__ == "__main__":
    app()
