"""Small, valid feature and negative directories for tests of the stages after `extract`."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.features import schema, store


def _png(rng: np.random.Generator, size: int = 24) -> bytes:
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_fake_features(
    features_dir: str | Path,
    split: str = "train",
    n_images: int = 64,
    captions_per_image: int = 2,
    dim: int = 32,
    views: int = 0,
    seed: int = 0,
    dtype: str = "float16",
) -> dict:
    """A split whose teacher text embeddings sit near their image's embedding (so retrieval is
    learnable), with real PNG bytes and captions that name the image."""
    rng = np.random.default_rng(seed)
    image_emb = unit(rng, n_images, dim)
    text_to_image = np.repeat(np.arange(n_images), captions_per_image)
    text_emb = image_emb[text_to_image] + 0.3 * unit(rng, len(text_to_image), dim)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    identity = {"model": "fake-teacher", "pretrained": None, "embed_dim": dim}
    meta = {schema.META_TEACHER: identity, schema.META_SPLIT: split, schema.META_MANIFEST_SHA256: "fake"}
    png_bytes = [_png(rng) for _ in range(n_images)]
    view_emb, view_params = None, None
    if views:
        view_emb = image_emb[:, None, :] + 0.1 * unit(rng, n_images * views, dim).reshape(n_images, views, dim)
        view_emb /= np.linalg.norm(view_emb, axis=2, keepdims=True)
        view_params = [
            {"crop_top": 0.1, "crop_left": 0.0, "crop_height": 0.8, "crop_width": 0.9, "hflip": bool(v % 2)}
            for _ in range(n_images) for v in range(views)
        ]
    images = schema.images_table(
        [f"img{i:05d}" for i in range(n_images)], ["fake-000000.tar"] * n_images, ["png"] * n_images,
        png_bytes, image_emb, dtype, meta, view_emb, view_params,
    )
    texts = schema.texts_table(
        text_to_image, np.tile(np.arange(captions_per_image), n_images),
        [f"a picture number {i} variant {c}" for i in range(n_images) for c in range(captions_per_image)],
        text_emb, dtype, meta,
    )
    info = {"teacher": identity, "manifest_sha256": "fake", "embedding_dim": dim, "embedding_dtype": dtype, "views": views}
    return store.write_split(features_dir, split, [images], [texts], info)
