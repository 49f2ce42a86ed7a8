"""Augmentation views that can be stored and re-applied exactly (MobileCLIP-style reinforcement).

A view is a crop box given as fractions of the source image plus a horizontal flip. `dsmd extract
--views K` embeds K sampled views with the teacher and stores their parameters; training re-applies
the very same view to the stored image bytes, then each model's own eval preprocessing follows.
"""
from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipeline.common.errors import PipelineError


class CorruptImageError(PipelineError):
    """Image bytes that PIL cannot decode."""


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image; undecodable bytes raise CorruptImageError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad data
        raise CorruptImageError(f"cannot decode image: {exc}") from None


def preprocess_batch(preprocess: Callable, images: Sequence[Image.Image]) -> torch.Tensor:
    """`torch.stack([preprocess(im) for im in images])`, bit for bit, but with a trailing ToTensor +
    Normalize (open_clip's preprocess) run once on the whole batch: per image they cost more than
    the model's forward pass on a small student's CPU batch. Other pipelines run image by image."""
    steps = list(getattr(preprocess, "transforms", ()))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return torch.stack([preprocess(image) for image in images])
    head = T.Compose(steps[:-2])
    pils = [head(image) for image in images]
    if not all(isinstance(p, Image.Image) and p.mode == "RGB" and p.size == pils[0].size for p in pils):
        return torch.stack([steps[-1](steps[-2](p)) for p in pils])
    # ToTensor's own steps on a (B, H, W, C) uint8 stack: to CHW, to the default float dtype, / 255;
    # then Normalize in place (the same arithmetic, without two more batch-sized temporaries)
    pixels = torch.from_numpy(np.stack([np.asarray(p) for p in pils])).permute(0, 3, 1, 2)
    pixels = pixels.to(torch.get_default_dtype(), memory_format=torch.contiguous_format).div_(255)
    return TF.normalize(pixels, steps[-1].mean, steps[-1].std, inplace=True)


def sample_view(rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.5) -> dict:
    """A RandomResizedCrop-style box (area fraction in `scale`, aspect in `ratio`) and a flip."""
    area = rng.uniform(*scale)
    log_ratio = rng.uniform(math.log(ratio[0]), math.log(ratio[1]))
    aspect = math.exp(log_ratio)
    width = min(1.0, math.sqrt(area * aspect))
    height = min(1.0, math.sqrt(area / aspect))
    return {
        "crop_top": float(rng.uniform(0.0, 1.0 - height)),
        "crop_left": float(rng.uniform(0.0, 1.0 - width)),
        "crop_height": float(height),
        "crop_width": float(width),
        "hflip": bool(rng.random() < flip_prob),
    }


def apply_view(image: Image.Image, view: dict) -> Image.Image:
    """Crop `image` to the view's box (rounded to whole pixels, at least 1 px) and flip it."""
    w, h = image.size
    left = int(round(view["crop_left"] * w))
    top = int(round(view["crop_top"] * h))
    right = max(left + 1, min(w, int(round((view["crop_left"] + view["crop_width"]) * w))))
    bottom = max(top + 1, min(h, int(round((view["crop_top"] + view["crop_height"]) * h))))
    out = image.crop((left, top, right, bottom))
    if view["hflip"]:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out
