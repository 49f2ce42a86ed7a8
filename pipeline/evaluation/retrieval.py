"""Retrieval quality from embeddings: the standard multi-caption protocol (Flickr30k / COCO).

Image -> text is a hit at K if any of the image's captions is among the K best-scoring texts; text ->
image if its own image is. Scores are cosine similarities of L2-normalised embeddings, computed by
chunks of query rows so that COCO's 5k x 25k matrix never exists at once. Used by `dsmd evaluate` and
by the periodic validation during training.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.common.config import ConfigError

log = logging.getLogger(__name__)


def _chunk_scores(queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    """(c, D) x (K, D) -> (c, K) dot products: the only place scores are computed (one chunk)."""
    return queries @ database.T


def _as_tensor(array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)


def retrieval_ranks(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of the first correct item for every image (i2t) and every text (t2i).

    With S = image_emb @ text_emb^T (computed `chunk_size` query rows at a time, never whole):
      i2t_rank[i] = 1 + #{t : S[i, t] > max_{p : text_to_image[p] = i} S[i, p]}
      t2i_rank[t] = 1 + #{j : S[j, t] > S[text_to_image[t], t]}
    Ties are counted in the query's favour: only strictly greater scores push a correct item down,
    so the result does not depend on sort order. An image without any caption gets rank 0 (no query).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    image_emb = np.asarray(image_emb)
    text_emb = np.asarray(text_emb)
    text_to_image = np.asarray(text_to_image)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (M, D), got {image_emb.shape} and {text_emb.shape}")
    n_images, n_texts = len(image_emb), len(text_emb)
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},), got {text_to_image.shape}")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image has ids outside 0..{n_images - 1}")
    if not (np.isfinite(image_emb).all() and np.isfinite(text_emb).all()):
        raise ValueError("embeddings contain NaN or infinite values")

    device = torch.device(device)
    images = _as_tensor(image_emb, torch.float32, device)
    texts = _as_tensor(text_emb, torch.float32, device)
    owner = _as_tensor(text_to_image, torch.int64, device)
    # texts sorted by their image: the captions of an image chunk are one contiguous slice
    texts_by_image = torch.argsort(owner, stable=True)
    owners_sorted = owner[texts_by_image]

    i2t = torch.zeros(n_images, dtype=torch.int64)
    for start in range(0, n_images, chunk_size):
        stop = min(n_images, start + chunk_size)
        scores = _chunk_scores(images[start:stop], texts)  # (c, M)
        lo = int(torch.searchsorted(owners_sorted, start))
        hi = int(torch.searchsorted(owners_sorted, stop))
        positives = texts_by_image[lo:hi]
        rows = owner[positives] - start
        best = torch.full((stop - start,), -math.inf, device=device)
        best.scatter_reduce_(0, rows, scores[rows, positives], reduce="amax")
        ranks = (scores > best[:, None]).sum(dim=1) + 1
        has_caption = torch.isfinite(best)
        i2t[start:stop] = torch.where(has_caption, ranks, torch.zeros_like(ranks)).cpu()

    t2i = torch.zeros(n_texts, dtype=torch.int64)
    for start in range(0, n_texts, chunk_size):
        stop = min(n_texts, start + chunk_size)
        scores = _chunk_scores(texts[start:stop], images)  # (c, N)
        positive = scores.gather(1, owner[start:stop, None])
        t2i[start:stop] = ((scores > positive).sum(dim=1) + 1).cpu()
    return i2t.numpy(), t2i.numpy()


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@K = 100 * mean(rank <= K) each way; rsum = sum of all R@K; mean and median of the ranks.
    Images with rank 0 (no caption) are left out of i2t."""
    ks = _check_ks(ks)
    i2t = np.asarray(i2t_ranks)
    missing = int((i2t == 0).sum())
    i2t = i2t[i2t > 0]
    t2i = np.asarray(t2i_ranks)
    if len(i2t) == 0 or len(t2i) == 0:
        raise ValueError("no queries: need at least one image with a caption and one text")
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{direction}_r{k}"] = float(100.0 * np.mean(ranks <= k))
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks))
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{direction}_mean_rank"] = float(np.mean(ranks))
        out[f"{direction}_median_rank"] = float(np.median(ranks))
    for k in ks:  # CLIP_benchmark's names (fractions): image retrieval = text query -> images
        out[f"image_retrieval_recall@{k}"] = out[f"t2i_r{k}"] / 100.0
        out[f"text_retrieval_recall@{k}"] = out[f"i2t_r{k}"] / 100.0
    if missing:
        log.warning("%d image(s) have no caption and are left out of image-to-text retrieval", missing)
        out["images_without_captions"] = missing
    return out


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict:
    """Multi-caption retrieval metrics: `i2t_r{k}`, `t2i_r{k}` (percent), `rsum`, and
    `{i2t,t2i}_{mean,median}_rank` (1-based rank of the first correct item, ties in the query's
    favour; see `retrieval_ranks`). Embeddings are expected L2-normalised (scores = cosine)."""
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size, device)
    return metrics_from_ranks(i2t, t2i, ks)


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"evaluate.ks must be a non-empty list of positive integers, got {ks}")
    return ks


