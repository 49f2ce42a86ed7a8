"""`dsmd verify`: re-embed a seeded sample of the cached features with the teacher and compare."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.common.config import option_help, section_help, stage_config
from pipeline.features.verify import verify
from stages._common import SET_HELP, params_option, user_errors

EPILOG = section_help("extract")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
def main(
    params: Path = params_option(),
    out_dir: Optional[str] = typer.Option(None, help=option_help("extract", "out_dir")),
    split: Optional[list[str]] = typer.Option(None, "--split", help=option_help("extract", "splits")),
    sample: Optional[int] = typer.Option(None, help=option_help("extract", "verify_sample")),
    min_cosine: Optional[float] = typer.Option(None, help=option_help("extract", "verify_min_cosine")),
    seed: int = typer.Option(0, help="which rows are sampled"),
    device: Optional[str] = typer.Option(None, help=option_help("extract", "device")),
    teacher_model: Optional[str] = typer.Option(None, help=option_help("teacher", "model")),
    teacher_pretrained: Optional[str] = typer.Option(None, help=option_help("teacher", "pretrained")),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Check that the cached features are the teacher's: re-embed a seeded random sample of each split's
    images, captions and stored views and compare them with the cache.

    Reads the `extract` and `teacher` sections. Prints one JSON summary per split; a row below the minimum
    cosine ends with exit status 2 and a message naming the rows, the teacher and what differs (the recorded
    teacher identity against the one loaded now, and the arrays' sha256 against the split's manifest). Writes
    nothing."""
    with user_errors():
        cfg = stage_config(params, "extract", {"out_dir": out_dir, "splits": split or None, "verify_sample": sample,
                                               "verify_min_cosine": min_cosine, "device": device}, set_)
        teacher_cfg = stage_config(params, "teacher", {"model": teacher_model, "pretrained": teacher_pretrained})
        summaries = verify(cfg, teacher_cfg, seed)
        for summary in summaries.values():
            typer.echo(json.dumps(summary))


if __name__ == "__main__":
    app()
