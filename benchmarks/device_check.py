"""The GPU check: run it the day a CUDA machine is available (from a fresh clone, after the README's install).

    python benchmarks/device_check.py [--images 8192] [--steps 300] [--out benchmarks/results/device_check.json]

On one machine with CUDA it
1. renders a JPEG corpus of 224-px scenes (the synthetic world, as `dsmd corpus`),
2. extracts it with a `ViT-B-32` teacher (random weights: no download) in bf16 through `dsmd extract`'s own code,
   and times the bare `encode_image` + `encode_text` forward on preloaded tensors of the same sizes:
   images/s of both, their ratio (target >= 0.85), and the rate against clip-retrieval's 2,500 images/s per A100,
3. trains the default student `--steps` steps with bf16 autocast from those features and reports samples/s,
4. runs one DDP step under `torchrun` with the NCCL backend on every visible GPU,
and writes one JSON. It takes a few minutes on one GPU. Without CUDA it stops at once with one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CLIP_RETRIEVAL_A100 = 2500.0  # images/s per A100 that clip-retrieval's inference reports for ViT-B-32


def bare_rate(model_name: str, images: int, captions: int, batch: int) -> float:
    """Images/s of the bare teacher forward (images and their captions) on tensors already on the GPU."""
    from pipeline.models import load_model

    loaded = load_model(model_name, "", device="cuda")
    size = loaded.image_size
    pixels = torch.randn(batch, 3, size, size, device="cuda")
    tokens = loaded.tokenizer(["a small red circle left of a large blue square"] * batch).cuda()
    text_batches = max(1, round(captions / images))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator
            loaded.model.encode_image(pixels), loaded.model.encode_text(tokens)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(images // batch):
            loaded.model.encode_image(pixels)
            for _ in range(text_batches):
                loaded.model.encode_text(tokens)
        torch.cuda.synchronize()
    return (images // batch) * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--out", default="benchmarks/results/device_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device here (torch.cuda.is_available() is False): run this check on a GPU machine")

    from pipeline.common.config import CorpusConfig, ExtractConfig, TeacherConfig

    from pipeline.common.params import OptimConfig, TrainConfig
    from pipeline.corpus.synthetic import generate_corpus
    from pipeline.features.extract import extract
    from pipeline.training.loop import train

    work = Path(tempfile.mkdtemp(prefix="dsmd-device-check-"))
    report: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                    "host": platform.node(), "images": args.images}
    started = time.perf_counter()
    manifest = generate_corpus(CorpusConfig(out_dir=str(work / "corpus"), train_images=args.images, val_images=0,
                                            test_images=0, web_images=0, image_size=224, image_format="jpg",
                                            workers=args.workers))
    report["corpus_s"] = round(time.perf_counter() - started, 1)

    teacher = TeacherConfig(model="ViT-B-32", pretrained="")
    extract_cfg = ExtractConfig(manifest=str(manifest), out_dir=str(work / "features"), splits=["train"], zeroshot=False,
                                batch_size=args.batch_size, num_workers=args.workers, device="cuda", precision="bf16")
    started = time.perf_counter()
    result = extract(extract_cfg, teacher)["train"]
    seconds = time.perf_counter() - started
    extract_rate = result["num_images"] / seconds
    bare = bare_rate(teacher.model, result["num_images"], result["num_texts"], args.batch_size)
    report["extract"] = {"images_per_s": round(extract_rate, 1), "bare_images_per_s": round(bare, 1),
                         "ratio_to_bare": round(extract_rate / bare, 3), "target": 0.85,
                         "ratio_to_clip_retrieval_a100": round(extract_rate / CLIP_RETRIEVAL_A100, 3)}
    print(json.dumps(report["extract"]), flush=True)

    optim = OptimConfig(max_steps=args.steps, batch_size=args.batch_size, warmup_steps=20, device="cuda",
                        precision="bf16", num_workers=args.workers, log_every=50)
    cfg = TrainConfig(loss="clip", features_dir=str(work / "features"), out_dir=str(work / "student"), val_every=0,
                      live_dir="", batching="random", optim=optim)
    summary = train(cfg)
    report["train"] = {"steps": summary["steps"], "samples_per_s": round(summary["samples_per_s"], 1),
                       "precision": "bf16"}
    print(json.dumps(report["train"]), flush=True)

    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torch.cuda.device_count()}", "-m",
         "stages.train", "--params", "/dev/null", "--features-dir", str(work / "features"), "--out-dir",
         str(work / "ddp"), "--loss", "clip", "--batching", "random", "--max-steps", "1", "--batch-size",
         str(args.batch_size), "--set", "optim.device=cuda", "--set", "val_every=0", "--set", "live_dir="],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    report["ddp_step"] = {"ok": ddp.returncode == 0, "ranks": torch.cuda.device_count(),
                          "tail": (ddp.stdout + ddp.stderr)[-1500:] if ddp.returncode else ""}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if ddp.returncode:
        sys.exit(f"error: the DDP step failed (exit {ddp.returncode}); see {out}")


if __name__ == "__main__":
    main()
