"""The demo teacher, made once and shipped as users download theirs (`dsmd pretrain`).

A real teacher (ViT-L-14/openai, a LAION model) has seen ~10^5 times the student's target data; that gap is
what distillation transfers. The demo teacher stands in for it: `teacher.model` trained with the CLIP loss by
the students' own loop on `pretrain.world_images` fresh scenes of the synthetic world, rendered in the
loader workers (no tars), then written as an open_clip `local-dir:` folder with a card. `pretrained: demo`
resolves to that folder; the default pipeline never pretrains.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.config import CorpusConfig, to_dict
from pipeline.common.params import PretrainConfig, TrainConfig
from pipeline.corpus import synthetic
from pipeline.training import data, loop

log = logging.getLogger(__name__)


def load_world_data(world: CorpusConfig, num_images: int) -> data.TrainingData:
    """The synthetic world as a split of `num_images` fresh scenes, rendered per sample in the loader
    workers (synthetic.WorldStream): images are PIL images, not bytes, which TrainingDataset takes as they are."""
    images, captions, text_to_image = synthetic.world_sequences(world, num_images)
    return data.TrainingData(source=f"world {synthetic.WORLD_NAME} v{synthetic.WORLD_VERSION} (seed {world.seed}, "
                             f"{num_images} scenes)", image_bytes=images, captions=captions, text_to_image=text_to_image)


def pretrain_config(cfg: PretrainConfig, model: str) -> TrainConfig:
    """The CLIP-loss training run of the demo teacher `model` (the baseline students' loop, source world)."""
    return TrainConfig(model=model, loss="clip", source="world", split="world", out_dir=cfg.work_dir,
                       live_dir="", val_every=0, optim=dataclasses.replace(cfg.optim))


def pretrain_teacher(cfg: PretrainConfig, model: str, world: CorpusConfig, resume: bool = False) -> Path:
    """Pretrain `model` on the world and write the shipped folder `cfg.out_dir`; returns it."""
    run = pretrain_config(cfg, model)
    log.info("pretraining the demo teacher %s on %d fresh scenes of world %s v%d", model,
             cfg.world_images, synthetic.WORLD_NAME, synthetic.WORLD_VERSION)
    summary = loop.train(run, resume=resume, world=load_world_data(world, cfg.world_images))
    trained = models.load_model(model, str(Path(run.out_dir) / names.WEIGHTS_FILE))
    card = {
        "model": model,
        "world": synthetic.world_record(world),
        "world_seed": world.seed,
        "samples_seen": summary["steps"] * run.optim.batch_size,
        "steps": summary["steps"],
        "wall_time_s": round(summary["wall_time_s"], 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads",
        "command": "dsmd pretrain --params params.yaml",
        "config": {"pretrain": to_dict(cfg), "world": {k: v for k, v in dataclasses.asdict(world).items()
                                                      if k not in synthetic.NOT_CONTENT_FIELDS}},
    }
    return write_demo_folder(trained.model, model, Path(cfg.out_dir), card)


def write_demo_folder(model: torch.nn.Module, model_name: str, out_dir: Path, card: dict) -> Path:
    """safetensors + open_clip_config.json (open_clip's `local-dir:` layout) + card.json with the weights' sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / (names.SAFETENSORS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out_dir / names.SAFETENSORS_FILE)
    config = {"model_name": model_name, "model_cfg": models.model_config(model_name),
              "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {}) or {})}
    atomic.atomic_write_json(config, out_dir / names.OPEN_CLIP_CONFIG)
    card = {**card, "weights": names.SAFETENSORS_FILE, "sha256": atomic.sha256_file(out_dir / names.SAFETENSORS_FILE)}
    atomic.atomic_write_json(card, out_dir / names.DEMO_CARD)
    log.info("demo teacher written to %s (%s)", out_dir, json.dumps({k: card[k] for k in ("samples_seen", "sha256")}))
    return out_dir
