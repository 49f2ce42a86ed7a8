"""`dsmd corpus`: generate the synthetic captioned-scenes corpus (WebDataset shards + manifest.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.config import stage_config
from pipeline.manifest import load_manifest
from pipeline.synthetic import generate_corpus
from stages._common import SET_HELP, params_option, user_errors

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = params_option(),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="folder for the shards and manifest.yaml"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed; the same seed gives byte-identical shards"),
    train_images: Optional[int] = typer.Option(None, "--train-images", help="images in the train split"),
    val_images: Optional[int] = typer.Option(None, "--val-images", help="images in the val split"),
    test_images: Optional[int] = typer.Option(None, "--test-images", help="images in the test split"),
    web_images: Optional[int] = typer.Option(None, "--web-images", help="images in the web split (only the demo teacher trains on it)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="image side in pixels (>= 16)"),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", help="samples per tar shard"),
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
        manifest_path = generate_corpus(cfg)
        manifest = load_manifest(manifest_path)
    typer.echo(f"manifest: {manifest_path}")
    for name, spec in manifest.splits.items():
        typer.echo(f"  {name}: {spec.num_samples} images in {len(spec.shards)} shard(s)")


if __name__ == "__main__":
    app()
