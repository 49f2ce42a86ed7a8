"""`dsmd plan`: the run's cost before the run: extraction time, the features' disk size, mining's memory and time,
each student's time per epoch; timed on this device with the real teacher and students, for 1 or N ranks."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.common.params import load_params
from pipeline.plan import format_plan, plan
from stages._common import params_option, user_errors

EPILOG = "Reads every section of --params (extract, teacher, train, students) and the corpus manifest; writes nothing."
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
def main(
    params: Path = params_option(),
    ranks: int = typer.Option(1, "--ranks", min=1, help="processes the work is split over (torchrun's world size)"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed batches per measurement (after one warm-up)"),
    json_out: bool = typer.Option(False, "--json", help="print the plan as JSON instead of lines"),
) -> None:
    """Project what extract, mine and train will cost, timing a few real batches on this device."""
    with user_errors():
        result = plan(load_params(params), ranks=ranks, repeats=repeats)
        typer.echo(json.dumps(result, indent=2) if json_out else format_plan(result))


if __name__ == "__main__":
    app()
