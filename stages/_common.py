"""What every stage CLI shares: the --params option and turning PipelineError into a clean exit."""
from __future__ import annotations

import contextlib
import errno
import logging
from pathlib import Path

import typer

from pipeline.common.errors import PipelineError

PARAMS_HELP = "params file (YAML); the stage reads its own section. A missing default params.yaml means built-in defaults."
_FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}
SET_HELP = "override any param of this stage's section, e.g. --set optim.lr=0.001 (repeatable)"


BREAK_LOCK_HELP = ("take the output folder's lock even when another host holds it (that run is gone); a dead "
                   "holder on this host is taken over without it")


def break_lock_option() -> bool:
    return typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP)


def params_option() -> Path:
    return typer.Option(Path("params.yaml"), "--params", help=PARAMS_HELP)


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """open_clip logs through the root logger: drop its info chatter and the expected "no pretrained
    weights" warning (students start from random weights), keep every other warning and error."""
    if record.name != "root":
        return True
    return record.levelno >= logging.WARNING and not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def user_errors():
    """Bad input ends with `error: <message>` and exit status 2, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # our warnings show; open_clip's chatter does not
        handler.addFilter(_quiet_open_clip)
    try:
        yield
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # the file system refused (full disk, read-only, too large) where no helper named it
        if exc.errno not in _FILE_SYSTEM_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
