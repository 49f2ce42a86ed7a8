"""The `dsmd` console script: every stage's CLI under one command (`dsmd <stage> --help`)."""
from __future__ import annotations

import typer

from stages import corpus, evaluate, export, extract, mine, plan, pretrain, teacher, train, verify

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DSMD distillation pipeline: corpus -> teacher -> extract -> mine -> train -> evaluate -> export.",
)

for _name, _module in (("plan", plan), ("corpus", corpus), ("pretrain", pretrain), ("teacher", teacher), ("extract", extract), ("mine", mine),
                       ("verify", verify), ("train", train), ("evaluate", evaluate), ("export", export)):
    app.command(name=_name, help=_module.main.__doc__, epilog=_module.EPILOG)(_module.main)
