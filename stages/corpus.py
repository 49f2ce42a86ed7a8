"""`dsmd corpus`: generate the synthetic captioned-scenes corpus (WebDataset shards + manifest.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common import locking
from pipeline.common.config import option_help, section_help, stage_config
from pipeline.corpus.manifest import load_manifest
from pipeline.corpus.synthetic import generate_corpus
from stages._common import SET_HELP, break_lock_option, params_option, user_errors

EPILOG = section_help("corpus")
app = typer.Typer(add_completion=False)


@app.command(epilog=EPILOG)
def main(
    params: Path = params_option(),
    break_lock: bool = break_lock_option(),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help=option_help("corpus", "out_dir")),
    seed: Optional[int] = typer.Option(None, "--seed", help=option_help("corpus", "seed")),
    train_images: Optional[int] = typer.Option(None, "--train-images", help=option_help("corpus", "train_images")),
    val_images: Optional[int] = typer.Option(None, "--val-images", help=option_help("corpus", "val_images")),
    test_images: Optional[int] = typer.Option(None, "--test-images", help=option_help("corpus", "test_images")),
    web_images: Optional[int] = typer.Option(None, "--web-images", help=option_help("corpus", "web_images")),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=option_help("corpus", "image_size")),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", help=option_help("corpus", "samples_per_shard")),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Write {out_dir}/{split}-NNNNNN.tar and {out_dir}/manifest.yaml; shards already written for the
    same config are kept."""
    with user_errors():
        cfg = stage_config(
            params,
            "corpus",
            {
                "out_dir": str(out_dir) if out_dir is not None else None,
                "seed": seed,
                "train_images": train_images,
                "val_images": val_images,
                "test_images": test_images,
                "web_images": web_images,
                "image_size": image_size,
                "samples_per_shard": samples_per_shard,
            },
            set_,
        )
        with locking.hold(cfg.out_dir, break_lock=break_lock):
            manifest_path = generate_corpus(cfg)
        manifest = load_manifest(manifest_path)
    typer.echo(f"manifest: {manifest_path}")
    for name, spec in manifest.splits.items():
        typer.echo(f"  {name}: {spec.num_samples} images in {len(spec.shards)} shard(s)")


if __name__ == "__main__":
    app()
