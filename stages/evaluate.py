"""`dsmd evaluate`: retrieval quality and encoder cost, teacher (cached embeddings) against students."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.config import option_help, section_help, stage_config
from pipeline.evaluation.evaluate import evaluate, format_table, parse_student_options
from stages._common import SET_HELP, break_lock_option, params_option, user_errors

EPILOG = section_help("evaluate")
app = typer.Typer(add_completion=False)


@app.command(epilog=EPILOG)
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    features_dir: Optional[Path] = typer.Option(None, "--features-dir", help=option_help("evaluate", "features_dir")),
    split: Optional[str] = typer.Option(None, "--split", help=option_help("evaluate", "split")),
    student: list[str] = typer.Option(None, "--student", help="NAME=DIR of a trained student (repeatable; replaces evaluate.students)"),
    teacher_dir: Optional[Path] = typer.Option(None, "--teacher-dir", help=option_help("evaluate", "teacher_dir")),
    metrics_file: Optional[Path] = typer.Option(None, "--metrics-file", help=option_help("evaluate", "metrics_file")),
    plots_dir: Optional[Path] = typer.Option(None, "--plots-dir", help=option_help("evaluate", "plots_dir")),
    threads: Optional[int] = typer.Option(None, "--threads", help=option_help("evaluate", "threads")),
    device: Optional[str] = typer.Option(None, "--device", help=option_help("evaluate", "device")),
    allow_missing: Optional[bool] = typer.Option(None, "--allow-missing/--no-allow-missing", help=option_help("evaluate", "allow_missing")),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Compare teacher and students: R@1/5/10 both ways, RSUM, mean/median rank, parameters,
    latency and throughput, and the student/teacher ratios; writes metrics JSON and plots."""
    with user_errors():
        cfg = stage_config(
            params,
            "evaluate",
            {
                "features_dir": str(features_dir) if features_dir is not None else None,
                "split": split,
                "students": parse_student_options(student),
                "teacher_dir": str(teacher_dir) if teacher_dir is not None else None,
                "metrics_file": str(metrics_file) if metrics_file is not None else None,
                "plots_dir": str(plots_dir) if plots_dir is not None else None,
                "threads": threads,
                "device": device,
                "allow_missing": allow_missing,
            },
            set_,
        )
        with locking.hold(cfg.plots_dir, cfg.report_dir, break_lock=break_lock):
            metrics = evaluate(cfg)
    typer.echo(format_table(metrics))
    typer.echo(f"metrics: {cfg.metrics_file}; plots: {cfg.plots_dir}")


if __name__ == "__main__":
    app()
