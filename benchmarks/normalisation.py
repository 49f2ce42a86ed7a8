"""Why the students normalise their input with the target corpus's own channel statistics.

    python benchmarks/normalisation.py [--params params.yaml] [--images 256] [--seeds 0 1 2] [--out benchmarks/results]

Measures, on the train split of the cached features (the images the students train on):
- the per-channel mean and std of the pixels in [0, 1] (what `train.image_mean` / `train.image_std` hold);
- for the student architecture at initialisation (each seed), the mean cosine between the image features of
  different images, with OpenAI's normalisation constants and with the corpus's. A mean cosine near 1 means every
  image starts as the same feature: the CLIP loss then pulls the text features onto it too and the run collapses
  to chance (loss ln(batch)) for its first tens of steps, from which some seeds never fully recover.

Prints a table and writes normalisation.json in --out. Runs in seconds on the 2-core CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from pipeline import models
from pipeline.common import atomic
from pipeline.common.params import load_params
from pipeline.corpus import augment
from pipeline.training.data import load_shards_data


def channel_statistics(images: list) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of RGB pixels in [0, 1] over all `images` (PIL), in float64."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for image in images:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        squares += (pixels ** 2).sum(0)
        count += len(pixels)
    mean = total / count
    return mean.tolist(), np.sqrt(squares / count - mean ** 2).tolist()


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    unit = F.normalize(features.float(), dim=-1)
    sims = unit @ unit.T
    n = len(unit)
    return float((sims.sum() - sims.trace()) / (n * (n - 1)))


def init_cosines(model_name: str, pixels: torch.Tensor, mean, std, seeds: list[int]) -> list[float]:
    batch = TF.normalize(pixels, mean, std)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = models.load_model(model_name, "").model.eval()
        with torch.no_grad():
            out.append(mean_pairwise_cosine(model.encode_image(batch)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", type=int, default=256, help="images of the train split for the cosines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    train = load_params(args.params).train
    data = load_shards_data(train.features_dir, train.split, with_teacher=False)
    images = [augment.decode_image(data.image_bytes[i]) for i in range(data.num_images)]
    mean, std = channel_statistics(images)
    size = models.load_model(train.model, "").image_size
    pixels = torch.stack([TF.to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), size), size))
                          for im in images[: args.images]])
    rows = {
        "openai": init_cosines(train.model, pixels, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, args.seeds),
        "corpus": init_cosines(train.model, pixels, mean, std, args.seeds),
    }
    print(f"{train.features_dir} {train.split}: {data.num_images} images; channel mean {np.round(mean, 4).tolist()} "
          f"std {np.round(std, 4).tolist()} (params.yaml: {train.image_mean} / {train.image_std})")
    for name, cosines in rows.items():
        print(f"{train.model} at init, {name:6s} normalisation: mean cosine between images "
              f"{np.mean(cosines):.3f} (seeds {args.seeds}: {', '.join(f'{c:.3f}' for c in cosines)})")
    out = Path(args.out)
    atomic.atomic_write_json({"model": train.model, "images": data.num_images, "channel_mean": mean, "channel_std": std,
                              "seeds": args.seeds, "init_mean_cosine": rows}, out / "normalisation.json")
    print(f"wrote {out / 'normalisation.json'}")


if __name__ == "__main__":
    main()
