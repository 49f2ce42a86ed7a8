"""`dsmd verify`: re-embed a seeded sample of the cached features with the teacher and compare."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.common.config import read_params, section_help, stage_config

from pipeline.features.verify import verify
from stages._common import config_options, params_option, set_option, user_errors

EPILOG = section_help("extract")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(extract=["out_dir", "splits:split", "verify_sample:sample", "verify_min_cosine:min-cosine", "device"],
                teacher=["model:teacher-model", "pretrained:teacher-pretrained"])
def main(
    params: Path = params_option(),
    seed: int = typer.Option(0, help="which rows are sampled"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="an entry of params.yaml's teachers section: check "
                                          "its added embeddings (extract.teachers_dir/<name>) instead"),
    set_: Optional[list[str]] = set_option(),
    options: dict = None,
) -> None:
    """Check that the cached features are the teacher's: re-embed a seeded random sample of each split's
    images, captions and stored views and compare them with the cache.

    Reads the `extract` and `teacher` sections. Prints one JSON summary per split; a row below the minimum
    cosine ends with exit status 2 and a message naming the rows, the teacher and what differs (the recorded
    teacher identity against the one loaded now, and the arrays' sha256 against the split's manifest). Writes
    nothing."""
    with user_errors():
        cfg = stage_config(params, "extract", options["extract"], set_)
        teacher_cfg = (read_params(params).added_teacher(teacher) if teacher is not None
                       else stage_config(params, "teacher", options["teacher"]))
        summaries = verify(cfg, teacher_cfg, seed, added=teacher)
        for summary in summaries.values():
            typer.echo(json.dumps(summary))


if __name__ == "__main__":
    app()
