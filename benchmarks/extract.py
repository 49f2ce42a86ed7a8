"""Extraction throughput against the bare teacher forward on the same data, batch size and threads.

    python benchmarks/extract.py [--images 2000] [--batch-size 256] [--threads 2] [--rounds 2]

Target: extract / bare >= 0.85 (decoding, tokenising and writing must not starve the model). Both are
measured in this one process, alternating, and the best round of each is compared.

On a CPU the loader's decoding and tokenising run on the same cores as the model, so they cannot be hidden
behind it as on a GPU. The script therefore also times every part of extraction's work alone on one thread
(reading the tars, decoding, preprocessing, tokenising, the forward passes) and the per-run fixed costs
(loading the teacher, the closing verification), and prints the best ratio those cores allow:
bare / max(bare, (forward + loader work) / cores), with and without the fixed costs, and the ratio without any
overlap, bare / (bare + loader work + fixed costs). `--json` writes it all.
"""
from __future__ import annotations

import argparse
import json
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
from pipeline.features.verify import verify_features
from pipeline.models import load_model, load_teacher


@torch.inference_mode()
def bare_forward(loaded, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        loaded.model.encode_image(pixels[start : start + batch_size])
    for start in range(0, len(tokens), batch_size):
        loaded.model.encode_text(tokens[start : start + batch_size])
    return time.perf_counter() - started


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@torch.inference_mode()
def one_thread_parts(loaded, manifest, batch_size: int) -> dict[str, float]:
    """Seconds of each part of extraction's per-sample work, alone on one thread (CPU seconds to fit on the cores)."""
    torch.set_num_threads(1)
    shards, parts = manifest.split("train").shards, {}
    samples: list = []
    parts["read tars"] = _timed(lambda: samples.extend(reader.iter_samples(shards, manifest.fields, reader.SkipReport())))
    images: list = []
    parts["decode"] = _timed(lambda: images.extend(augment.decode_image(s.image_bytes) for s in samples))
    pixels: list = []
    parts["preprocess"] = _timed(lambda: pixels.extend(
        augment.preprocess_batch(loaded.preprocess, images[i : i + batch_size]) for i in range(0, len(images), batch_size)))
    tokens: list = []
    parts["tokenise"] = _timed(lambda: tokens.append(loaded.tokenizer([c for s in samples for c in s.captions])))
    parts["forward"] = bare_forward(loaded, torch.cat(pixels), tokens[0], batch_size)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="dsmd-demo-teacher")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
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
        # the per-run fixed costs, each timed as extract runs it
        fixed = {"load teacher": _timed(lambda: load_teacher(teacher_cfg)),
                 "verify": _timed(lambda: verify_features(loaded, work / "features-0", ["train"], 32))}
        parts = one_thread_parts(loaded, manifest, args.batch_size)
        torch.set_num_threads(args.threads)
        loader_work = sum(v for k, v in parts.items() if k != "forward")
        scaling = max(bare, (parts["forward"] + loader_work) / args.threads)  # best wall time of the per-sample work
        bound, bound_fixed = bare / scaling, bare / (scaling + sum(fixed.values()))
        # a forward on every core leaves none to overlap the loader with: then the loader's work adds up
        serial = bare / (bare + loader_work + sum(fixed.values()))
        print(f"data: {n_images} images, {n_texts} captions; model {args.model}; batch {args.batch_size}; "
              f"threads {args.threads}; workers {args.num_workers}")
        print(f"bare encode_image + encode_text: {bare:.2f} s  ({n_images / bare:.0f} images/s with their captions)")
        print(f"dsmd extract (decode, tokenise, embed, write): {full:.2f} s  ({n_images / full:.0f} images/s)")
        ratio = bare / full
        print(f"throughput ratio extract / bare = {ratio:.3f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'})")
        print("one thread alone: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
              + f"; loader work = {loader_work / parts['forward']:.1%} of the forward")
        print("fixed per run: " + ", ".join(f"{k} {v:.2f} s" for k, v in fixed.items()))
        print(f"best ratio {args.threads} core(s) allow: {bound:.3f} for the per-sample work, {bound_fixed:.3f} with the "
              f"fixed costs; extract reaches {ratio / bound_fixed:.1%} of the latter")
        print(f"without overlap (loader work after the forward's, on its one thread): {serial:.3f}; "
              f"extract reaches {ratio / serial:.1%} of it")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "images": n_images, "captions": n_texts, "model": args.model, "batch_size": args.batch_size,
                "threads": args.threads, "num_workers": args.num_workers, "bare_s": bare, "extract_s": full,
                "ratio": ratio, "one_thread_s": parts, "fixed_s": fixed, "bound": bound, "bound_with_fixed": bound_fixed,
                "serial_bound": serial,
            }, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
