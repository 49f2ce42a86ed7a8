"""Extraction throughput against the bare teacher forward on the same data, batch size and threads.

    python benchmarks/extract.py [--images 2000] [--batch-size 256] [--threads 2] [--rounds 2]

Target: extract / bare >= 0.85 (decoding, tokenising and writing must not starve the model). Both are
measured in this one process, alternating, and the best round of each is compared.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.common.config import CorpusConfig, ExtractConfig, TeacherConfig
from pipeline.corpus import augment, reader
from pipeline.corpus.manifest import load_manifest
from pipeline.corpus.synthetic import generate_corpus
from pipeline.features import extract as extract_mod
from pipeline.models import load_model


@torch.inference_mode()
def bare_forward(loaded, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        loaded.model.encode_image(pixels[start : start + batch_size])
    for start in range(0, len(tokens), batch_size):
        loaded.model.encode_text(tokens[start : start + batch_size])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="dsmd-demo-teacher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="dsmd-bench-extract-"))
    try:
        manifest_path = generate_corpus(CorpusConfig(
            out_dir=str(work / "corpus"), train_images=args.images, val_images=0, test_images=0,
            samples_per_shard=500,
        ))
        teacher_cfg = TeacherConfig(model=args.model, pretrained="")
        torch.manual_seed(0)
        loaded = load_model(args.model, "")
        ckpt = work / "teacher.pt"
        torch.save(loaded.model.state_dict(), ckpt)
        teacher_cfg.pretrained = str(ckpt)
        loaded = load_model(args.model, str(ckpt))

        # the bare path gets its inputs decoded, preprocessed and tokenised for free
        manifest = load_manifest(manifest_path)
        samples = list(reader.iter_samples(manifest.split("train").shards, manifest.fields, reader.SkipReport()))
        pixels = torch.stack([loaded.preprocess(augment.decode_image(s.image_bytes)) for s in samples])
        tokens = loaded.tokenizer([c for s in samples for c in s.captions])
        n_images, n_texts = len(pixels), len(tokens)

        bare_times, extract_times = [], []
        for round_index in range(args.rounds):
            bare_times.append(bare_forward(loaded, pixels, tokens, args.batch_size))
            out = work / f"features-{round_index}"
            cfg = ExtractConfig(manifest=str(manifest_path), out_dir=str(out), splits=["train"],
                                batch_size=args.batch_size, num_workers=args.num_workers, threads=args.threads)
            started = time.perf_counter()
            extract_mod.extract(cfg, teacher_cfg)
            extract_times.append(time.perf_counter() - started)
        bare, full = min(bare_times), min(extract_times)
        print(f"data: {n_images} images, {n_texts} captions; model {args.model}; batch {args.batch_size}; "
              f"threads {args.threads}; workers {args.num_workers}")
        print(f"bare encode_image + encode_text: {bare:.2f} s  ({n_images / bare:.0f} images/s with their captions)")
        print(f"dsmd extract (decode, tokenise, embed, write): {full:.2f} s  ({n_images / full:.0f} images/s)")
        ratio = bare / full
        print(f"throughput ratio extract / bare = {ratio:.3f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
