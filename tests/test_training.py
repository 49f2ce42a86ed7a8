"""The training loop: learning, resume, accumulation, the saved student, the CLI never loading the teacher."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline import models
from pipeline.common import names
from pipeline.common.config import from_dict
from pipeline.common.params import DistillConfig, OptimConfig, TrainConfig
from pipeline.corpus.augment import decode_image
from pipeline.training import data as data_mod, loop
from tests.fakes import write_fake_features
from tests.test_data import write_negatives
from tests.tiny_corpus import write_tiny_corpus

STUDENT = "dsmd-test-student"  # embed 16: the fake teacher's 32 needs the projection
TEACHER = "dsmd-test-teacher"


def _write_shards(root: Path, views: int) -> tuple[Path, Path]:
    write_fake_features(root / "features", "train", n_images=64, captions_per_image=2, dim=32, views=views, seed=0)
    write_negatives(root / "features", root / "negatives", k=4)
    return root / "features", root / "negatives"


@pytest.fixture(scope="module")
def shards_dirs(tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("shards"), views=0)


@pytest.fixture(scope="module")
def view_shards_dirs(tmp_path_factory):
    """With 2 stored augmentation views per image (re-applied during training)."""
    return _write_shards(tmp_path_factory.mktemp("view_shards"), views=2)


def make_cfg(shards_dirs, out_dir, distill: dict | None = None, **optim) -> TrainConfig:
    features, negatives = shards_dirs
    optim_cfg = OptimConfig(**{"max_steps": 8, "batch_size": 16, "lr": 3e-3, "warmup_steps": 3, "threads": 1, "log_every": 1, **optim})
    return TrainConfig(
        model=STUDENT, features_dir=str(features), negatives_dir=str(negatives), out_dir=str(out_dir),
        optim=optim_cfg, distill=from_dict(DistillConfig, {"queue_size": 48, **(distill or {})}),
    )


def read_log(out_dir, name: str = names.TRAIN_LOG_FILE) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / name).read_text().splitlines()]


def load_trained(cfg: TrainConfig, teacher_dim: int = 32) -> loop.StudentWithProjection:
    _, net = loop.build_student(cfg, teacher_dim, torch.device("cpu"))
    state = torch.load(Path(cfg.out_dir) / names.CHECKPOINT_FILE, weights_only=True)
    net.model.load_state_dict(state["model"])
    if net.projection is not None:
        net.projection.load_state_dict(state["projection"])
    return net.eval()


def teacher_cosine(net: loop.StudentWithProjection, cfg: TrainConfig) -> float:
    """Mean cosine between the student's projected embeddings and the cached teacher's, plain images, first captions."""
    data = data_mod.load_shards_data(cfg.features_dir, cfg.split)
    loaded = models.load_model(cfg.model, "")
    images = torch.stack([loaded.preprocess(decode_image(b)) for b in data.image_bytes])
    first = [int(data.captions_of(i)[0]) for i in range(data.num_images)]
    texts = loaded.tokenizer([data.captions[t] for t in first])
    with torch.no_grad():
        out = net(images, texts)
    image_cos = (out["projected_image"] * torch.from_numpy(data.teacher_image.astype(np.float32))).sum(-1).mean()
    text_cos = (out["projected_text"] * torch.from_numpy(data.teacher_text[first].astype(np.float32))).sum(-1).mean()
    return float(image_cos + text_cos) / 2


def test_distillation_lowers_the_losses_and_raises_teacher_cosine(shards_dirs, tmp_path):
    cfg = make_cfg(shards_dirs, tmp_path / "out", max_steps=50, lr=1e-2, warmup_steps=5)
    _, initial = loop.build_student(cfg, 32, torch.device("cpu"))
    before = teacher_cosine(initial.eval(), cfg)
    summary = loop.train(cfg)
    assert summary["steps"] == 50 and summary["projection"]
    rows = read_log(cfg.out_dir)
    assert [r["step"] for r in rows] == list(range(1, 51))
    for name in ("feature", "similarity", "contrastive", "hard_negative"):
        first = np.mean([r[f"loss_{name}"] for r in rows[:10]])
        last = np.mean([r[f"loss_{name}"] for r in rows[-10:]])
        assert last < 0.97 * first, name  # every term falls (calibrated weights: each at its own pace)
    assert np.mean([r["loss_total"] for r in rows[-10:]]) < 0.95 * np.mean([r["loss_total"] for r in rows[:10]])
    assert {f"weight_{n}" for n in ("feature", "similarity", "contrastive", "hard_negative", "task")} <= set(rows[0])
    after = teacher_cosine(load_trained(cfg), cfg)
    assert after > before + 0.1
    # the lr follows warm-up then cosine decay to 0
    lrs = [r["lr"] for r in rows]
    assert lrs[:5] == pytest.approx([1e-2 * (s + 1) / 5 for s in range(5)])
    assert lrs[5] == pytest.approx(1e-2) and lrs[-1] < 1e-4 and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


class Interrupted(Exception):
    pass


def train_until_killed(monkeypatch, cfg: TrainConfig, call: int) -> None:
    """Run `cfg` until its `call`-th optimizer step raises (a kill stand-in), then put the real step back."""
    real_step, calls = loop.optimizer_step, {"n": 0}

    def dies(ctx, micro_batches):
        calls["n"] += 1
        if calls["n"] == call:
            raise Interrupted()
        return real_step(ctx, micro_batches)

    monkeypatch.setattr(loop, "optimizer_step", dies)
    with pytest.raises(Interrupted):
        loop.train(cfg)
    monkeypatch.setattr(loop, "optimizer_step", real_step)


def test_resume_equals_an_uninterrupted_run(view_shards_dirs, tmp_path, monkeypatch):
    settings = dict(max_steps=9, checkpoint_every=4, batch_size=8, num_workers=1)
    full = make_cfg(view_shards_dirs, tmp_path / "full", **settings)
    full = dataclasses.replace(full, batching="hard-negative-aware")
    loop.train(full)

    cut = dataclasses.replace(full, out_dir=str(tmp_path / "cut"))
    train_until_killed(monkeypatch, cut, 7)  # after the step-4 checkpoint and two logged steps past it
    assert [r["step"] for r in read_log(cut.out_dir, names.RUNNING_LOG_FILE)] == [1, 2, 3, 4, 5, 6]
    assert not (Path(cut.out_dir) / names.TRAIN_LOG_FILE).exists()  # the log lands when the run ends
    summary = loop.train(cut, resume=True)
    assert summary["resumed_from_step"] == 4

    a = torch.load(Path(full.out_dir) / names.CHECKPOINT_FILE, weights_only=True)
    b = torch.load(Path(cut.out_dir) / names.CHECKPOINT_FILE, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["projection"]["weight"], b["projection"]["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["queue"]["image"], b["queue"]["image"])
    assert a["balancer"] == b["balancer"]
    full_log, cut_log = read_log(full.out_dir), read_log(cut.out_dir)
    assert [r["step"] for r in cut_log] == list(range(1, 10))  # continued, no duplicate steps
    for x, y in zip(full_log, cut_log):
        assert x["loss_total"] == pytest.approx(y["loss_total"], rel=1e-5)


def test_resume_refuses_a_checkpoint_of_another_run(shards_dirs, tmp_path):
    cfg = make_cfg(shards_dirs, tmp_path / "out", max_steps=2)
    loop.train(cfg)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=8))
    with pytest.raises(loop.TrainingError, match="batch_size"):
        loop.train(other, resume=True)


def _step_grads(cfg: TrainConfig, accum: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One optimizer step on global batch 0 with `accum` micro-batches; the gradients it applied."""
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, accum_steps=accum, grad_clip=0.0))
    data = data_mod.load_shards_data(cfg.features_dir, cfg.split)
    negatives = data_mod.load_negatives(cfg.negatives_dir, cfg.split, data, cfg.distill.hard_negatives, cfg.features_dir)
    loaded, ctx = loop.build_context(cfg, 32, total_steps=10, device=torch.device("cpu"))
    loop._prefill_queue(ctx.dsmd_loss, data, data.trainable_image_ids(), 0, torch.device("cpu"))
    dataset = data_mod.TrainingDataset(data, loaded.preprocess, loaded.tokenizer, negatives=negatives)
    sampler = data_mod.GlobalBatchSampler(data.trainable_image_ids(), cfg.optim.batch_size, 10, accum_steps=accum)
    micro_batches = [dataset.__getitems__(keys) for keys in sampler.micro_batches(0)]
    result = loop.optimizer_step(ctx, micro_batches)
    grads = {n: p.grad.clone() for n, p in ctx.net.named_parameters() if p.grad is not None}
    return result, grads


def test_gradient_accumulation_equals_the_large_batch(shards_dirs, tmp_path):
    cfg = make_cfg(shards_dirs, tmp_path / "out", batch_size=16)
    large, large_grads = _step_grads(cfg, 1)
    accumulated, accumulated_grads = _step_grads(cfg, 4)
    for key in ("loss_feature", "loss_similarity", "loss_contrastive", "loss_hard_negative", "loss_task"):
        assert accumulated[key] == pytest.approx(large[key], rel=1e-5)
    assert set(large_grads) == set(accumulated_grads)
    assert "model.logit_scale" in large_grads and "projection.weight" in large_grads
    for name, grad in large_grads.items():
        torch.testing.assert_close(accumulated_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # a naive per-micro-batch loss (in-batch negatives from 4 samples only) would differ
    naive_cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=4))
    naive, _ = _step_grads(naive_cfg, 1)
    assert abs(naive["loss_task"] - large["loss_task"]) > 0.1


def test_clip_loss_from_the_corpus(tmp_path):
    manifest = write_tiny_corpus(tmp_path / "corpus", shards_per_split=2, per_shard=6, corrupt={"train1_000"})
    cfg = TrainConfig(
        model=STUDENT, loss="clip", source="corpus", manifest=str(manifest), out_dir=str(tmp_path / "teacher"),
        optim=OptimConfig(max_steps=4, batch_size=4, warmup_steps=1, threads=1, log_every=1),
    )
    summary = loop.train(cfg)
    assert summary["num_images"] == 11 and summary["skipped"]["counts"] == {"corrupt_image": 1}
    rows = read_log(cfg.out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(k for k in rows[0] if k.startswith("loss_")) == {"loss_task", "loss_total"}
    assert rows[0]["weight_task"] == 1.0
    assert not summary["projection"]


def test_dsmd_needs_the_shards_and_clip_from_shards_ignores_the_teacher(shards_dirs, tmp_path):
    cfg = make_cfg(shards_dirs, tmp_path / "out")
    with pytest.raises(loop.ConfigError, match="source shards"):
        loop.train(dataclasses.replace(cfg, source="corpus"))
    clip = dataclasses.replace(cfg, loss="clip", optim=dataclasses.replace(cfg.optim, max_steps=2))
    summary = loop.train(clip)
    assert summary["teacher_dim"] is None and not summary["projection"]


def test_the_clip_only_student_reads_the_stored_views_only_when_told(view_shards_dirs, tmp_path):
    """use_views means the same for both losses: the CLIP-only student sees the views as plain augmentation."""
    losses = {}
    for use_views in (True, False):
        cfg = make_cfg(view_shards_dirs, tmp_path / f"views{use_views}", max_steps=3)
        loop.train(dataclasses.replace(cfg, loss="clip", use_views=use_views))
        losses[use_views] = [r["loss_task"] for r in read_log(cfg.out_dir)]
    assert losses[True][0] != pytest.approx(losses[False][0], rel=1e-6)  # other pixels from the first batch on
    with pytest.raises(loop.TrainingError, match="use_views"):  # a checkpoint of the other choice is not resumed
        loop.train(dataclasses.replace(make_cfg(view_shards_dirs, tmp_path / "viewsTrue", max_steps=3), loss="clip",
                                       use_views=False), resume=True)


def test_init_seed_sets_the_initial_weights_apart_from_the_data_order(shards_dirs, tmp_path):
    def initial(seed: int, init_seed: int) -> dict[str, torch.Tensor]:
        cfg = make_cfg(shards_dirs, tmp_path / "out", seed=seed, init_seed=init_seed)
        return loop.build_student(cfg, 32, torch.device("cpu"))[1].state_dict()

    default, same_init, other_init = initial(1, -1), initial(5, 1), initial(1, 2)
    assert all(torch.equal(default[k], same_init[k]) for k in default)  # -1: the weights follow optim.seed
    assert not all(torch.equal(default[k], other_init[k]) for k in default)


def test_saved_student_loads_with_open_clip_and_gives_the_same_embeddings(shards_dirs, tmp_path):
    cfg = make_cfg(shards_dirs, tmp_path / "out", max_steps=3)
    loop.train(cfg)
    trained = load_trained(cfg)
    out = Path(cfg.out_dir)
    assert json.loads((out / names.OPEN_CLIP_CONFIG).read_text())["model_name"] == STUDENT
    models.register_model_configs()
    by_name = open_clip.create_model(STUDENT, pretrained=str(out / names.WEIGHTS_FILE)).eval()
    by_dir = open_clip.create_model(f"local-dir:{out}").eval()
    images = torch.randn(3, 3, 16, 16)
    texts = open_clip.get_tokenizer(STUDENT)(["a picture number 3 variant 0", "a cat", "two dogs"])
    with torch.no_grad():
        expected = trained(images, texts, project=False)
        for model in (by_name, by_dir):
            torch.testing.assert_close(F.normalize(model.encode_image(images), dim=-1), expected["image"])
            torch.testing.assert_close(F.normalize(model.encode_text(texts), dim=-1), expected["text"])
    # the distillation projection lives only in checkpoint.pt: the saved weights are open_clip's own
    assert set(torch.load(out / names.WEIGHTS_FILE, weights_only=True)) == set(by_name.state_dict())


def test_the_students_own_normalisation_trains_saves_and_reloads(shards_dirs, tmp_path):
    from pipeline.models import load_student
    mean, std = [0.9, 0.8, 0.7], [0.1, 0.2, 0.3]
    cfg = dataclasses.replace(make_cfg(shards_dirs, tmp_path / "out", max_steps=2), image_mean=mean, image_std=std)
    loop.train(cfg)
    saved = json.loads((tmp_path / "out" / names.OPEN_CLIP_CONFIG).read_text())["preprocess_cfg"]
    assert saved["mean"] == pytest.approx(mean) and saved["std"] == pytest.approx(std)
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))  # the model's size
    pixels = torchvision_to_tensor(image)
    for loaded in (load_student(tmp_path / "out"), models.load_model(f"local-dir:{tmp_path / 'out'}")):
        expected = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(loaded.preprocess(image), expected)
    # the training batches were normalised the same way: a resumed run with another normalisation is refused
    other = dataclasses.replace(cfg, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with pytest.raises(loop.TrainingError, match="image_mean"):
        loop.train(other, resume=True)


def torchvision_to_tensor(image):
    import torchvision.transforms.functional as TF
    return TF.to_tensor(image.convert("RGB"))


def test_the_train_stage_never_loads_the_teacher(shards_dirs, tmp_path, monkeypatch):
    # a teacher that existed once, whose checkpoint is gone
    teacher_dir = tmp_path / "teacher"
    models.save_open_clip_dir(models.load_model(TEACHER, "").model, TEACHER, teacher_dir)
    (teacher_dir / names.WEIGHTS_FILE).unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher (or pretrained weights) was loaded during training")

    real_create = open_clip.factory.create_model

    def create_student_only(model_name, *args, **kwargs):
        if TEACHER in model_name or "teacher" in model_name or kwargs.get("pretrained"):
            refuse()
        return real_create(model_name, *args, **kwargs)

    monkeypatch.setattr(open_clip.factory, "create_model", create_student_only)
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", refuse)
    with pytest.raises(AssertionError, match="teacher"):  # the trap works
        models.load_model(TEACHER, "")
    from stages.train import app

    features, negatives = shards_dirs
    params = tmp_path / "params.yaml"
    params.write_text(f"teacher:\n  model: {TEACHER}\n  out_dir: {teacher_dir}\n  pretrained: demo\n")
    out = tmp_path / "student"
    result = CliRunner().invoke(app, [
        "--params", str(params), "--features-dir", str(features), "--negatives-dir", str(negatives),
        "--out-dir", str(out), "--model", STUDENT, "--max-steps", "3", "--batch-size", "8",
        "--batching", "hard-negative-aware", "--set", "optim.threads=1", "--set", "distill.queue_size=32",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"student saved to {out}" in result.output
    assert (out / names.WEIGHTS_FILE).exists() and (out / names.TRAIN_SUMMARY_FILE).exists()


def test_the_train_stage_reports_bad_input_without_a_traceback(tmp_path):
    from stages.train import app

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  optim:\n    threads: 1\n")
    result = CliRunner().invoke(app, [
        "--params", str(params), "--features-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o"),
    ])
    assert result.exit_code == 2
    assert "error:" in result.output and "dsmd extract" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["--params", str(params), "--loss", "kd", "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "'kd' is not one of 'dsmd', 'clip'" in result.output  # the option lists the modes
    result = CliRunner().invoke(app, ["--params", str(params), "--set", "loss=kd", "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "train.loss: Invalid value 'kd', expected one of [dsmd, clip]" in result.output


@pytest.mark.parametrize("override, message", [
    ({"optim.lr": -1.0}, "optim.lr must be > 0"),
    ({"optim.epochs": -1.0}, "optim.epochs must be >= 0"),
    ({"optim.epochs": 0.0}, "optim.epochs must be > 0"),
    ({"max_images": -5}, "max_images"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be"),
    ({"image_mean": [0.5] * 3, "image_std": [0.2, 0.0, 0.2]}, "image_std must be"),
    ({"image_mean": [0.5] * 3}, "go together"),
])
def test_bad_training_options_fail_before_any_work(shards_dirs, tmp_path, override, message):
    from pipeline.common.config import apply_overrides
    with pytest.raises(loop.ConfigError, match=message):  # a single key's range: refused by the config itself
        loop.train(apply_overrides(make_cfg(shards_dirs, tmp_path / "out", max_steps=0, epochs=1.0), override))
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_its_checks_leaves_the_previous_log_alone(shards_dirs, tmp_path):
    cfg = make_cfg(shards_dirs, tmp_path / "out", max_steps=3)
    loop.train(cfg)
    log_path = tmp_path / "out" / names.TRAIN_LOG_FILE
    before = log_path.read_bytes()
    assert before
    too_big = make_cfg(shards_dirs, tmp_path / "out", max_steps=3, batch_size=1024)  # more than the 64 images
    with pytest.raises(loop.ConfigError, match="larger than"):
        loop.train(too_big)
    assert log_path.read_bytes() == before



def test_orthogonal_projection_init_starts_with_the_students_own_cosines(shards_dirs, tmp_path):
    images, texts = torch.randn(6, 3, 16, 16), torch.randint(1, 1000, (6, 16))
    gaps = {}
    for init in ("orthogonal", "default"):
        cfg = dataclasses.replace(make_cfg(shards_dirs, tmp_path / "out"), projection_init=init)
        _, net = loop.build_student(cfg, 32, torch.device("cpu"))
        w = net.projection.weight.detach()
        with torch.no_grad():
            out = net.eval()(images, texts)
        gaps[init] = (out["projected_image"] @ out["projected_text"].T - out["image"] @ out["text"].T).abs().max()
        if init == "orthogonal":
            torch.testing.assert_close(w.T @ w, torch.eye(w.shape[1]), atol=1e-5, rtol=0)
    assert gaps["orthogonal"] < 1e-5 < 1e-3 < gaps["default"]
