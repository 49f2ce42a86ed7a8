"""`dsmd teacher`: resolve the teacher (an open_clip tag, hf-hub:, local-dir:, a checkpoint, or the shipped demo) and record its identity."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.config import section_help, stage_config
from pipeline.common.names import IDENTITY_FILE
from pipeline.features.teacher import prepare_teacher
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("teacher")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(teacher=["model", "pretrained", "out_dir"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    set_: Optional[list[str]] = set_option(),
    options: dict = None,
) -> None:
    """Load the teacher once and write its identity to the teacher directory (nothing is trained)."""
    with user_errors():
        cfg = stage_config(params, "teacher", options["teacher"], set_)
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            identity = prepare_teacher(cfg)
        where = Path(cfg.out_dir) / IDENTITY_FILE
        typer.echo(f"teacher {identity.get('model')} ({cfg.pretrained or 'random weights'}): identity in {where}")


if __name__ == "__main__":
    app()
