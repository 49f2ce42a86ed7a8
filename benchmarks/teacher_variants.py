"""What the demo teacher knows, by how it was pretrained: short pretraining runs of variants of its image tower and
input normalisation on the same fresh scenes of the world (`dsmd pretrain`'s loop and data), each scored on the
target test split (RSUM), on the corpus's zero-shot tasks, and by a linear probe of shape on its image embeddings
(does the image tower encode shape at all, whatever the prompts say).

    python benchmarks/teacher_variants.py [--params params.yaml] [--variants shipped world-norm ...] [--scenes 200000]
        [--out benchmarks/results] [--work outputs/bench-teacher-variants]

Variants (combine with "+", e.g. `resnet-16+world-norm`):
- `shipped`: the shipped teacher's architecture (ViT 4 x 128, 8-px patches, patch dropout 0.75) and OpenAI's
  normalisation;
- `world-norm`: the input normalised with the world's channel statistics (`train.image_mean` / `train.image_std`);
- `dropout-0.5`: patch dropout 0.5 instead of 0.75 (twice the image tokens per training step);
- `resnet-16`, `resnet-32`: open_clip's ModifiedResNet (layers 1-1-1-1, width 16 or 32: 1.4M or 5.3M parameters)
  instead of the ViT.
Every run uses `pretrain.optim` with `--scenes` fresh scenes (one pass). Runs are kept in --work (a re-run
reuses a finished one). Writes `teacher_variants.json` in --out. Needs `dvc repro` first (the test split's and the
zero-shot tasks' features). ~11 minutes a variant at 200,000 scenes on 2 cores. --quick: 512 scenes, batch 32.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import open_clip
import torch

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.params import TrainConfig, load_params
from pipeline.evaluation.encoding import encode_images, encode_split
from pipeline.evaluation.retrieval import retrieval_metrics
from pipeline.evaluation.zeroshot import list_tasks, load_task, student_task_metrics
from pipeline.features import schema
from pipeline.training import loop, pretrain

RESNET_16 = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64}
VARIANTS = {  # name -> (vision_cfg: overrides, or a whole tower with "replace"), world normalisation
    "shipped": ({}, False),
    "world-norm": ({}, True),
    "dropout-0.5": ({"patch_dropout": 0.5}, False),
    "resnet-16": ({"replace": RESNET_16}, False),
    "resnet-32": ({"replace": {**RESNET_16, "width": 32}}, False),
}


def variant_config(base: dict, variant: str) -> tuple[dict, bool]:
    """The model config of `variant` (parts joined by "+") and whether it normalises with the world's statistics."""
    config, world_norm = json.loads(json.dumps(base)), False
    for part in variant.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}: one of {sorted(VARIANTS)}, joined by +")
        vision, norm = VARIANTS[part]
        config["vision_cfg"] = dict(vision["replace"]) if "replace" in vision else {**config["vision_cfg"], **vision}
        world_norm = world_norm or norm
    return config, world_norm


def linear_probe(embeddings: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (LBFGS) over `folds` seeded folds."""
    x, y = torch.from_numpy(embeddings.astype(np.float32)) * 10, torch.from_numpy(labels.astype(np.int64))
    classes = int(y.max()) + 1
    hits = 0
    for held in torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).chunk(folds):
        train = torch.ones(len(y), dtype=torch.bool)
        train[held] = False
        weight = torch.zeros(x.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, y[train]) + 1e-3 * weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            hits += int(((x[held] @ weight + bias).argmax(1) == y[held]).sum())
    return hits / len(y)


def score(loaded: models.LoadedModel, features_dir: str) -> dict:
    """Test RSUM, zero-shot acc1 of every task and the shape probe, from the model's own embeddings."""
    cpu = torch.device("cpu")
    out = {}
    for task in list_tasks(features_dir):
        out[f"zeroshot_{task}"] = student_task_metrics(loaded, load_task(features_dir, task), 256, cpu)["acc1"]
    shape = load_task(features_dir, "shape")
    image_emb = encode_images(loaded, shape.images[schema.IMAGE_BYTES].to_pylist(), 256, cpu, "shape", False)
    out["shape_probe"] = linear_probe(image_emb, shape.images[schema.LABEL].to_numpy())
    out["rsum"] = retrieval_metrics(*encode_split(loaded, features_dir, "test"))["rsum"]
    return out


def run_variant(params, variant: str, scenes: int, work: Path, quick: bool) -> dict:
    base = models.model_config(params.teacher.model)
    config, world_norm = variant_config(base, variant)
    name = f"teacher-variant-{variant}"
    config_file = work / "configs" / f"{name}.json"
    atomic.atomic_write_json(config, config_file)
    open_clip.add_model_config(str(config_file))
    mean, std = (params.train.image_mean, params.train.image_std) if world_norm else ([], [])
    optim = params.pretrain.optim
    if quick:
        optim = dataclasses.replace(optim, batch_size=32, warmup_steps=1, num_workers=0)
    run = TrainConfig(model=name, loss="clip", source="world", split="world", out_dir=str(work / variant), live_dir="",
                      val_every=0, optim=optim, image_mean=list(mean), image_std=list(std))
    finished = work / variant / names.TRAIN_SUMMARY_FILE  # a finished run is reused: keep its own wall time
    summary = json.loads(finished.read_text()) if finished.exists() else \
        loop.train(run, resume=True, world=pretrain.load_world_data(params.corpus, scenes))
    loaded = models.load_model(name, str(work / variant / names.WEIGHTS_FILE), image_mean=mean, image_std=std)
    parameters = sum(p.numel() for p in loaded.model.visual.parameters())
    return {"variant": variant, "scenes": scenes, "steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
            "image_tower_parameters": parameters, **score(loaded, params.evaluate.features_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variants", nargs="+", default=["shipped", "world-norm", "resnet-16"])
    parser.add_argument("--scenes", type=int, default=200_000, help="fresh scenes each variant is pretrained on")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default="outputs/bench-teacher-variants", help="the variants' runs (kept)")
    parser.add_argument("--quick", action="store_true", help="512 scenes, batch 32 (a smoke test)")
    args = parser.parse_args()
    params = load_params(args.params)
    models.register_model_configs()
    scenes = 512 if args.quick else args.scenes
    work = Path(args.work)
    results = [run_variant(params, variant, scenes, work, args.quick) for variant in args.variants]
    print(f"{'variant':<28} {'RSUM':>7} {'shape probe':>12} " + " ".join(f"{k[9:]:>8}" for k in results[0] if k.startswith("zeroshot_")))
    for r in results:
        print(f"{r['variant']:<28} {r['rsum']:7.1f} {100 * r['shape_probe']:11.1f}% " +
              " ".join(f"{100 * v:7.1f}%" for k, v in r.items() if k.startswith("zeroshot_")))
    atomic.atomic_write_json({"scenes": scenes, "variants": results}, Path(args.out) / "teacher_variants.json")


if __name__ == "__main__":
    main()
