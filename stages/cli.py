"""The `dsmd` console script: every stage's CLI under one command (`dsmd <stage> --help`)."""
from __future__ import annotations

import importlib
import sys
from typing import Iterable

import typer

STAGES = ("plan", "corpus", "pretrain", "teacher", "extract", "mine", "verify", "train", "evaluate", "export")


def build(names: Iterable[str] = STAGES) -> typer.Typer:
    """A `dsmd` app with the commands of `names` (each stage's module imported only here)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="DSMD distillation pipeline: corpus -> teacher -> extract -> mine -> train -> evaluate -> export.")

    @app.callback()
    def _group() -> None:  # a group even with one command: `dsmd mine ...` keeps its command name
        pass

    for name in names:
        module = importlib.import_module(f"stages.{name}")
        app.command(name=name, help=module.main.__doc__, epilog=module.EPILOG)(module.main)
    return app


def main() -> None:
    """The console script. `dsmd <stage> ...` builds that stage's command alone, so a stage that needs no torch
    (corpus, mine) starts without importing it (seconds per DVC stage on a small CPU); anything else (`dsmd --help`,
    a mistyped stage) gets every command."""
    stage = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in STAGES else None
    build([stage] if stage else STAGES)()


def __getattr__(name: str):  # `from stages.cli import app`: the whole app, built on first use
    if name == "app":
        return build()
    raise AttributeError(name)
