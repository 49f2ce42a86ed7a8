"""`dsmd export`: the student as safetensors + open_clip config, ONNX towers and a model card, checked."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.params import Params, section_help, stage_config
from pipeline.export import export
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("export")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(Params, export=["student", "student_dir", "out_dir", "onnx"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    set_: Optional[list[str]] = set_option(),
    options: dict = None,
) -> None:
    """Export a trained student: open_clip_model.safetensors + open_clip_config.json (load with
    open_clip.create_model_and_transforms("local-dir:<out_dir>")), image_encoder.onnx and text_encoder.onnx
    (dynamic batch), README.md (model card from the run) and export_report.json. Checks before it ends
    that the reloaded student and the ONNX graphs give the trained student's embeddings."""
    with user_errors():
        cfg = stage_config(params, "export", options["export"], set_)
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            report = export(cfg)
        checks = ", ".join(f"{k} {v:.1e}" for k, v in report.items() if k.endswith("max_abs_diff"))
        typer.echo(f"exported {cfg.student_dir} -> {cfg.out_dir} ({checks})")


if __name__ == "__main__":
    app()
