"""`dsmd extract`: the teacher's embeddings of every image and caption of the corpus, to Parquet."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.config import read_params, section_help, stage_config
from pipeline.corpus.reader import UNREADABLE_SHARD
from pipeline.features.added_teacher import extract_added_teacher
from pipeline.features.extract import extract
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("extract") + "\n\n" + section_help("teachers")
app = typer.Typer(add_completion=False, help=__doc__)


@app.command(epilog=EPILOG)
@config_options(extract=["manifest", "out_dir", "splits:split", "batch_size", "num_workers", "views", "embedding_dtype",
                         "device", "precision", "threads"],
                teacher=["model:teacher-model", "pretrained:teacher-pretrained"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard existing outputs of these splits instead of resuming"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="an entry of params.yaml's teachers section: add its "
                                          "embeddings of the extracted splits in extract.teachers_dir/<name>/ (rewrites "
                                          "nothing of the features; dvc.yaml: extract_teacher@<name>)"),
    set_: Optional[list[str]] = set_option(),
    options: dict = None,
) -> None:
    """Run the teacher once over each split and write images/texts Parquet shards.

    Resumable: finished input shards are kept and skipped on a re-run. Under `torchrun --nproc_per_node N`
    each rank embeds its share of the input shards; the result equals a single-process run."""
    with user_errors():
        cfg = stage_config(params, "extract", options["extract"], set_)
        if teacher is not None:
            added = read_params(params).added_teacher(teacher)
            out = Path(cfg.teachers_dir) / teacher
            with locking.hold(out, break_lock=break_lock):
                results = extract_added_teacher(cfg, teacher, added, overwrite=overwrite)
            for split_name, manifest_info in results.items():
                typer.echo(f"{split_name}: teacher {teacher}: {manifest_info['num_images']} images, "
                           f"{manifest_info['num_texts']} texts -> {out / split_name}")
            return
        teacher_cfg = stage_config(params, "teacher", options["teacher"])
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            results = extract(cfg, teacher_cfg, overwrite=overwrite)
        for split_name, manifest_info in results.items():
            if manifest_info and "task" in manifest_info:
                typer.echo(f"{split_name}: {manifest_info['num_images']} images, {manifest_info['num_prompts']} prompts "
                           f"-> {Path(cfg.out_dir) / split_name}")
            elif manifest_info:
                counts = dict(manifest_info.get("skipped", {}).get("counts", {}))
                unreadable = counts.pop(UNREADABLE_SHARD, 0)  # counted in shards, the rest in samples
                typer.echo(f"{split_name}: {manifest_info['num_images']} images, {manifest_info['num_texts']} texts, "
                           f"{sum(counts.values())} sample(s) skipped, {unreadable} unreadable shard(s) "
                           f"-> {Path(cfg.out_dir) / split_name}")


if __name__ == "__main__":
    app()
