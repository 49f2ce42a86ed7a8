"""What every stage CLI shares: the --params option and turning PipelineError into a clean exit."""
from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from pipeline.common.config import option_help, option_type, StageOneParams
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


def set_option() -> list[str]:
    return typer.Option(None, "--set", help=SET_HELP)


def _cli_type(section: str, key: str, root: type) -> Any:
    """The option's click-facing type: the key's declared type (a mode shows its choices; a list repeats)."""
    hint = option_type(section, key, root)
    if hint in (str, int, float, bool) or (isinstance(hint, type) and issubclass(hint, Enum)):
        return hint
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (str, int, float):
        return hint
    raise TypeError(f"{section}.{key}: no CLI option for a {hint}; set it with --set")


def config_options(root: type = StageOneParams, **sections: list[str]) -> Callable:
    """Give a stage command one option per listed config key, declared nowhere else: its type, description,
    range and default come from the key's one declaration in `root` (stage one's sections, pipeline/common/config.py;
    a stage-two command passes pipeline/common/params.py's Params, the whole file). The option is named
    after the key's last part (`optim.lr` -> `--lr`, a bool -> `--onnx/--no-onnx`), or "key:name" names it.
    The command receives `options={section: {key: value, or None when not given}}`, for `stage_config`."""

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "options"]
        generated: dict[str, tuple[str, str]] = {}  # parameter name -> (section, key)
        for section, keys in sections.items():
            for spec in keys:
                key, _, name = spec.partition(":")
                name = name or key.rsplit(".", 1)[-1].replace("_", "-")
                hint = _cli_type(section, key, root)
                flag = f"--{name}/--no-{name}" if hint is bool else f"--{name}"
                parameter = f"{section}__{key.replace('.', '__')}"
                generated[parameter] = (section, key)
                own.append(inspect.Parameter(parameter, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[hint],
                                             default=typer.Option(None, flag, help=option_help(section, key, root))))

        @functools.wraps(command)
        def with_options(**kwargs: Any) -> Any:
            options: dict[str, dict[str, Any]] = {section: {} for section in sections}
            for parameter, (section, key) in generated.items():
                value = kwargs.pop(parameter)
                if isinstance(value, Enum):
                    value = value.value
                options[section][key] = None if value in ([], ()) else value  # an unused repeatable option is []
            return command(**kwargs, options=options)

        with_options.__signature__ = inspect.Signature(own)  # what typer reads
        with_options.__annotations__ = {p.name: p.annotation for p in own}
        return with_options

    return decorate


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
