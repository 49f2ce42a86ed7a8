"""`dsmd pretrain`: make the demo teacher once: teacher.model trained with the CLIP loss (the pretrain section) on
fresh scenes of the corpus section's synthetic world, rendered on the fly, then shipped as an open_clip local-dir folder with a card.
Not a DVC stage: the pipeline uses the shipped weights (`teacher.pretrained: demo`), as users use downloaded ones."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common.params import Params, section_help, stage_config
from pipeline.training.pretrain import pretrain_teacher
from stages._common import SET_HELP, config_options, params_option, user_errors

EPILOG = section_help("pretrain")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(Params, pretrain=["world_images", "out_dir"])
def main(
    params: Path = params_option(),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="continue an interrupted pretraining from its checkpoint"),
    unmasked_from: Optional[Path] = typer.Option(None, "--unmasked-from", help="a demo teacher folder (card.json beside "
                                                 "its safetensors) to tune unmasked instead of pretraining anew: how the "
                                                 "shipped teacher's tuning was run from the one shipped before it"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP + " (pretrain section; corpus.* keys set the world, teacher.model the model)"),
    options: dict = None,
) -> None:
    """Pretrain the demo teacher and write its folder (safetensors, open_clip_config.json, card.json)."""
    with user_errors():
        sets = set_ or []
        world = stage_config(params, "corpus", {}, _sets_of("corpus", sets))
        teacher = stage_config(params, "teacher", {}, _sets_of("teacher", sets))
        own = [s for s in sets if not s.startswith(("corpus.", "teacher."))]
        cfg = stage_config(params, "pretrain", options["pretrain"], own)
        folder = pretrain_teacher(cfg, teacher.model, world, resume=resume, unmasked_from=unmasked_from)
        typer.echo(f"demo teacher {teacher.model}: {folder} (load it with pretrained: demo, or local-dir:{folder})")


def _sets_of(section: str, sets: list[str]) -> list[str]:
    """The --set items of another section (`corpus.seed=1` -> `seed=1`)."""
    return [s[len(section) + 1:] for s in sets if s.startswith(f"{section}.")]


if __name__ == "__main__":
    app()
