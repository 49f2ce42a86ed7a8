"""`dsmd pretrain`: make the demo teacher once: teacher.model trained with the CLIP loss on fresh scenes of the
corpus section's synthetic world, rendered on the fly, then shipped as an open_clip local-dir folder with a card.
Not a DVC stage: the pipeline uses the shipped weights (`teacher.pretrained: demo`), as users use downloaded ones."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common.config import section_help, stage_config
from pipeline.training.pretrain import pretrain_teacher
from stages._common import SET_HELP, config_options, params_option, user_errors

EPILOG = section_help("teacher")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(teacher=["pretrain.world_images", "pretrain.out_dir"])
def main(
    params: Path = params_option(),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue an interrupted pretraining from its checkpoint"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP + " (teacher section; corpus.* keys set the world)"),
    options: dict = None,
) -> None:
    """Pretrain the demo teacher and write its folder (safetensors, open_clip_config.json, card.json)."""
    with user_errors():
        sets = set_ or []
        world = stage_config(params, "corpus", {}, [s[len("corpus."):] for s in sets if s.startswith("corpus.")])
        cfg = stage_config(params, "teacher", options["teacher"], [s for s in sets if not s.startswith("corpus.")])
        folder = pretrain_teacher(cfg, world, resume=resume)
        typer.echo(f"demo teacher {cfg.model}: {folder} (load it with pretrained: demo, or local-dir:{folder})")


if __name__ == "__main__":
    app()
