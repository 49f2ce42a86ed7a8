"""A few small WebDataset shards plus their manifest, written by hand (independent of the generator)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tiny_corpus(
    root: Path, shards_per_split: int = 2, per_shard: int = 6, splits=("train", "test"),
    corrupt: set[str] = frozenset(), image_size: int = 40,
) -> Path:
    """Shards `<split>-NNNNNN.tar` with `{key}.png` + `{key}.txt` (2-3 captions); keys listed in
    `corrupt` get undecodable image bytes. Returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    manifest = {"name": "tiny", "fields": {"image": ["png", "jpg"], "captions": {"source": "txt"}}, "splits": {}}
    for split in splits:
        for shard in range(shards_per_split):
            with tarfile.open(root / f"{split}-{shard:06d}.tar", "w") as tar:
                for i in range(per_shard):
                    key = f"{split}{shard}_{i:03d}"
                    colour = names[(shard * per_shard + i) % len(names)]
                    pixels = np.zeros((image_size, image_size, 3), np.uint8) + rng.integers(0, 40, 3, dtype=np.uint8)
                    x, y = rng.integers(0, image_size // 2, 2)
                    pixels[y : y + image_size // 2, x : x + image_size // 2] = COLOURS[colour]
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="PNG")
                    image = b"not an image at all" if key in corrupt else buf.getvalue()
                    captions = [f"a {colour} square", f"one {colour} box on a dark background", f"{colour} block {i}"][: 2 + i % 2]
                    _add(tar, f"{key}.png", image)
                    _add(tar, f"{key}.txt", "\n".join(captions).encode())
        manifest["splits"][split] = {"shards": f"{split}-{{000000..{shards_per_split - 1:06d}}}.tar"}
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path
