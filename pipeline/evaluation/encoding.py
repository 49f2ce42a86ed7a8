"""A model's own embeddings of stored data: images from their encoded bytes (with the model's eval
preprocessing), texts with its own tokenizer; L2-normalised float32, in row order. Used for the students'
side of evaluation (retrieval and zero-shot); the teacher's side is cached by `dsmd extract`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common import runtime
from pipeline.common.progress import progress
from pipeline.corpus.augment import CorruptImageError, decode_image, preprocess_batch
from pipeline.features import schema, store
from pipeline.models import LoadedModel


def encode_images(loaded: LoadedModel, images: Sequence[bytes], batch_size: int, device: torch.device, where: str,
                  show_progress: bool = True) -> np.ndarray:
    """(N, D) embeddings of the encoded `images` (a list, or store.ImageBytes: copied or referenced); an
    undecodable image is a ShardError naming `where`."""
    model = loaded.model.to(device).eval()
    chunks = []
    with torch.inference_mode(), runtime.autocast(device), \
            progress(len(images), f"encode {where}", "img", enabled=show_progress) as bar:
        for start in range(0, len(images), batch_size):
            decoded = []
            for row in range(start, min(start + batch_size, len(images))):
                try:
                    decoded.append(decode_image(images[row]))
                except CorruptImageError as exc:
                    raise store.ShardError(f"{where}: image row {row}: {exc}") from None
            emb = model.encode_image(preprocess_batch(loaded.preprocess, decoded).to(device))
            chunks.append(F.normalize(emb.float(), dim=-1).cpu())
            bar.update(len(decoded))
    return torch.cat(chunks).numpy().astype(np.float32, copy=False) if chunks else np.zeros((0, loaded.embed_dim), np.float32)


def encode_texts(loaded: LoadedModel, texts: list[str], batch_size: int, device: torch.device, where: str,
                 show_progress: bool = True) -> np.ndarray:
    """(M, D) embeddings of `texts`."""
    model = loaded.model.to(device).eval()
    chunks = []
    with torch.inference_mode(), runtime.autocast(device), \
            progress(len(texts), f"encode {where}", "txt", enabled=show_progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            emb = model.encode_text(loaded.tokenizer(batch).to(device))
            chunks.append(F.normalize(emb.float(), dim=-1).cpu())
            bar.update(len(batch))
    return torch.cat(chunks).numpy().astype(np.float32, copy=False) if chunks else np.zeros((0, loaded.embed_dim), np.float32)


def _ordered_ids(column, what: str, features_dir, split: str) -> None:
    ids = column.to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise store.ShardError(
            f"{store.split_dir(features_dir, split)}: {what} ids are not dense and ordered; re-run `dsmd extract`"
        )


def encode_split(
    loaded: LoadedModel, features_dir: str | Path, split: str, batch_size: int = 256, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_emb (N, D), text_emb (M, D), text_to_image (M,)) of a features split, encoded by `loaded`
    from the stored image bytes and captions, in image_id / text_id order."""
    device = torch.device(device)
    images = store.read_images(features_dir, split, columns=[schema.IMAGE_ID])
    texts = store.read_texts(features_dir, split, columns=[schema.TEXT_ID, schema.IMAGE_ID, schema.CAPTION])
    _ordered_ids(images[schema.IMAGE_ID], "image", features_dir, split)
    _ordered_ids(texts[schema.TEXT_ID], "text", features_dir, split)
    where = str(store.split_dir(features_dir, split))
    image_emb = encode_images(loaded, store.image_bytes(features_dir, split), batch_size, device, where)
    text_emb = encode_texts(loaded, texts[schema.CAPTION].to_pylist(), batch_size, device, where)
    return image_emb, text_emb, texts[schema.IMAGE_ID].to_numpy().astype(np.int64)
