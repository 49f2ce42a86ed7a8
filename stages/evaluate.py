"""`dsmd evaluate`: retrieval quality and encoder cost, teacher (cached embeddings) against students."""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline.common import locking
from pipeline.common.params import Params, section_help, stage_config
from pipeline.evaluation.evaluate import evaluate, format_table, parse_student_options
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("evaluate")
app = typer.Typer(add_completion=False)


@app.command(epilog=EPILOG)
@config_options(Params, evaluate=["features_dir", "split", "teacher_dir", "metrics_file", "plots_dir", "threads", "device",
                          "allow_missing"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    student: list[str] = typer.Option(None, "--student", help="NAME=DIR of a trained student (repeatable; replaces evaluate.students)"),
    set_: list[str] = set_option(),
    options: dict = None,
) -> None:
    """Compare teacher and students: R@1/5/10 both ways, RSUM, mean/median rank, parameters,
    latency and throughput, and the student/teacher ratios; writes metrics JSON and plots."""
    with user_errors():
        cfg = stage_config(params, "evaluate", {**options["evaluate"], "students": parse_student_options(student)}, set_)
        with locking.hold(cfg.plots_dir, cfg.report_dir, break_lock=break_lock):
            metrics = evaluate(cfg)
    typer.echo(format_table(metrics))
    typer.echo(f"metrics: {cfg.metrics_file}; plots: {cfg.plots_dir}")


if __name__ == "__main__":
    app()
