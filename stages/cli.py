"""The `dsmd` console script: every stage's CLI under one command (`dsmd <stage> --help`)."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DSMD distillation pipeline: corpus -> teacher -> extract -> mine -> train -> evaluate.")

# stage name -> module; each module's `main` is registered as a sub-command
STAGES = ("corpus", "teacher", "extract", "mine", "train", "evaluate")

for _name in STAGES:
    try:
        _module = importlib.import_module(f"stages.{_name}")
    except ModuleNotFoundError as exc:  # a stage missing from a partial install should not hide the others
        if exc.name != f"stages.{_name}":
            raise
        continue
    app.command(name=_name, help=_module.main.__doc__ or _module.__doc__)(_module.main)
