"""`dsmd corpus`: generate the synthetic captioned-scenes corpus (WebDataset shards + manifest.yaml)."""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline.common import locking
from pipeline.common.config import section_help, stage_config
from pipeline.corpus.manifest import load_manifest
from pipeline.corpus.synthetic import generate_corpus
from stages._common import break_lock_option, config_options, params_option, set_option, user_errors

EPILOG = section_help("corpus")
app = typer.Typer(add_completion=False)


@app.command(epilog=EPILOG)
@config_options(corpus=["out_dir", "seed", "train_images", "val_images", "test_images", "web_images", "image_size",
                        "samples_per_shard"])
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    set_: list[str] = set_option(),
    options: dict = None,
) -> None:
    """Write {out_dir}/{split}-NNNNNN.tar and {out_dir}/manifest.yaml; shards already written for the
    same config are kept."""
    with user_errors():
        cfg = stage_config(params, "corpus", options["corpus"], set_)
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            manifest_path = generate_corpus(cfg)
        manifest = load_manifest(manifest_path)
    typer.echo(f"manifest: {manifest_path}")
    for name, spec in manifest.splits.items():
        typer.echo(f"  {name}: {spec.num_samples} images in {len(spec.shards)} shard(s)")


if __name__ == "__main__":
    app()
