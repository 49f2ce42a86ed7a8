"""The demo teacher: the world stream it pretrains on, `dsmd pretrain` at tiny scale, the shipped folder,
and the world version that pairs a teacher with its corpus."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from open_clip.transformer import PatchDropout
from PIL import Image, ImageFilter

from pipeline import models
from pipeline.common import atomic, names
from pipeline.common.config import CorpusConfig, TeacherConfig
from pipeline.common.params import OptimConfig, PretrainConfig, UnmaskedConfig
from pipeline.corpus import synthetic
from pipeline.models import ModelError
from pipeline.training.loop import build_student
from pipeline.training.pretrain import (load_world_data, pretrain_config, pretrain_teacher, PretrainError,
                                       unmasked_config)

WORLD = CorpusConfig(seed=5, train_images=20, val_images=0, test_images=40, web_images=0, image_size=32)


def test_world_stream_is_deterministic_fresh_and_never_shows_a_test_scene():
    first, second = synthetic.WorldStream(WORLD, 300), synthetic.WorldStream(WORLD, 300)
    for index in (0, 7, 299):
        assert np.array_equal(np.asarray(first.image(index)), np.asarray(second.image(index)))
        assert first.caption(index) == second.caption(index)
    scenes = [first.sample(i)[0] for i in range(300)]
    descriptions = [synthetic.description(s, WORLD.image_size) for s in scenes]
    assert not set(descriptions) & synthetic.test_descriptions(WORLD)
    assert len(set(descriptions)) > 250  # fresh scenes, not a small pool replayed
    for scene, (_, captions) in zip(scenes[:50], (first.sample(i) for i in range(50))):
        colour_words = set(synthetic.COLOURS[scene.objects[0].colour][1])
        assert any(word in captions[0] for word in colour_words)  # the caption describes its own scene
    with pytest.raises(IndexError):
        first.sample(300)


def test_world_data_trains_through_the_students_dataset():
    from pipeline.training.data import TrainingDataset

    data = load_world_data(WORLD, 12)
    assert data.num_images == 12 and len(data.captions) == 12
    loaded = models.load_model("dsmd-test-teacher", "")
    batch = TrainingDataset(data, loaded.preprocess, loaded.tokenizer).__getitems__([(0, 3), (0, 5)])
    expected = loaded.preprocess(synthetic.WorldStream(WORLD, 12).image(3))
    assert torch.equal(batch["image"][0], expected)
    assert torch.equal(batch["text"][1], loaded.tokenizer([data.captions[5]])[0])


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_erode_is_pils_min_filter_pixel_for_pixel(width):
    rng = np.random.default_rng(width)
    scene = synthetic.random_scene(rng, 64, 0.0)
    for obj in scene.objects:
        mask = synthetic._shape_mask(obj, 128, 2)
        assert np.array_equal(np.asarray(synthetic._erode(mask, width)),
                              np.asarray(mask.filter(ImageFilter.MinFilter(2 * width + 1))))
    noise = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L")  # edges and borders too
    assert np.array_equal(np.asarray(synthetic._erode(noise, width)), np.asarray(noise.filter(ImageFilter.MinFilter(2 * width + 1))))


TINY_OPTIM = OptimConfig(batch_size=16, lr=0.002, warmup_steps=1, threads=1, num_workers=0, log_every=1)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The test teacher pretrained on 48 scenes: (its teacher section, the shipped folder)."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    pretrain = PretrainConfig(world_images=48, work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "demo"), optim=TINY_OPTIM)
    cfg = TeacherConfig(model="dsmd-test-teacher", pretrained="", out_dir=str(tmp_path / "teacher"))
    folder = pretrain_teacher(pretrain, cfg.model, WORLD)
    return cfg, folder


def test_pretrain_ships_an_open_clip_local_dir_with_a_card(tiny_demo):
    cfg, folder = tiny_demo
    card = json.loads((folder / names.DEMO_CARD).read_text())
    assert card["samples_seen"] == 48 and card["steps"] == 3 and card["world"] == synthetic.world_record(WORLD)
    assert card["sha256"] == atomic.sha256_file(folder / names.SAFETENSORS_FILE)
    assert card["command"].startswith("dsmd pretrain")
    # open_clip loads the folder as it is; its weights are the trained run's, not a fresh init
    shipped = models.load_model(f"local-dir:{folder}")
    trained = models.load_model(cfg.model, str(folder.parent / "work" / names.WEIGHTS_FILE))
    fresh = models.load_model(cfg.model, "")
    tokens = trained.tokenizer(["a red circle"])
    with torch.no_grad():
        assert torch.equal(shipped.model.encode_text(tokens), trained.model.encode_text(tokens))
        assert not torch.equal(shipped.model.encode_text(tokens), fresh.model.encode_text(tokens))


def test_world_data_is_a_window_of_the_one_stream():
    stream = synthetic.WorldStream(WORLD, 50)
    window = load_world_data(WORLD, 8, first=42)
    assert window.num_images == 8 and len(window.captions) == 8 and list(window.text_to_image) == list(range(8))
    assert np.array_equal(np.asarray(window.image_bytes[0]), np.asarray(stream.image(42)))
    assert window.captions[7] == stream.caption(49)
    with pytest.raises(IndexError):
        window.image_bytes[8]


def test_unmasked_tuning_turns_patch_dropout_off_and_only_there():
    assert isinstance(models.load_model("dsmd-demo-teacher").model.visual.patch_dropout, PatchDropout)
    run = unmasked_config(PretrainConfig(), "dsmd-demo-teacher", "weights.bin")
    assert run.force_patch_dropout == 0.0 and run.pretrained == "weights.bin"
    assert run.optim.lr == PretrainConfig().unmasked.lr != PretrainConfig().optim.lr
    loaded, _ = build_student(dataclasses.replace(run, pretrained=""), None, torch.device("cpu"))
    assert isinstance(loaded.model.visual.patch_dropout, torch.nn.Identity)
    assert pretrain_config(PretrainConfig(), "dsmd-demo-teacher").force_patch_dropout is None


def test_unmasked_tuning_continues_on_the_scenes_after_the_pretrainings(tiny_demo, tmp_path):
    cfg, folder = tiny_demo
    card = json.loads((folder / names.DEMO_CARD).read_text())
    pretrain = PretrainConfig(world_images=48, work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "tuned"),
                              optim=TINY_OPTIM, unmasked=UnmaskedConfig(images=32, lr=0.001, warmup_steps=1))
    tuned = pretrain_teacher(pretrain, cfg.model, WORLD, unmasked_from=folder)
    tuned_card = json.loads((tuned / names.DEMO_CARD).read_text())
    first, second = tuned_card["phases"]
    assert first == card["phases"][0] and first["phase"] == "pretraining" and first["samples_seen"] == 48
    assert second == {**second, "phase": "unmasked tuning", "first_scene": 48, "samples_seen": 32, "steps": 2,
                      "from_sha256": card["sha256"], "command": f"dsmd pretrain --params params.yaml --unmasked-from {folder}"}
    assert tuned_card["samples_seen"] == 80 and tuned_card["sha256"] != card["sha256"]
    # a card of before the phases (the teacher shipped until the tuning) becomes the pretraining's record
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    atomic.atomic_write_json({k: v for k, v in card.items() if k != "phases"}, legacy / names.DEMO_CARD)
    again = pretrain_teacher(dataclasses.replace(pretrain, out_dir=str(tmp_path / "again")), cfg.model, WORLD,
                             unmasked_from=legacy)
    first = json.loads((again / names.DEMO_CARD).read_text())["phases"][0]
    assert first["phase"] == "pretraining" and first["sha256"] == card["sha256"] and first["samples_seen"] == 48
    with pytest.raises(PretrainError, match="unmasked.images > 0"):
        pretrain_teacher(dataclasses.replace(pretrain, unmasked=UnmaskedConfig()), cfg.model, WORLD, unmasked_from=folder)
    with pytest.raises(PretrainError, match="no card.json"):
        pretrain_teacher(pretrain, cfg.model, WORLD, unmasked_from=tmp_path)


def test_teacher_identity_records_the_world_and_refuses_another(tiny_demo, tmp_path):
    cfg, folder = tiny_demo
    teacher = models.load_teacher(dataclasses.replace(cfg, pretrained=f"local-dir:{folder}"))
    assert teacher.identity["world"]["version"] == synthetic.WORLD_VERSION
    assert teacher.identity["checkpoint_sha256"] == atomic.sha256_file(folder / names.SAFETENSORS_FILE)
    models.check_world(teacher.identity, synthetic.world_record(WORLD), "manifest.yaml")  # the same world: fine
    older = {**synthetic.world_record(WORLD), "version": synthetic.WORLD_VERSION - 1}
    with pytest.raises(ModelError, match=r"manifest.yaml is world synthetic-shapes v2.*pretrained on synthetic-shapes v3"):
        models.check_world(teacher.identity, older, "manifest.yaml")
    edited = {**synthetic.world_record(WORLD), "fingerprint": "0" * 64}  # the generator changed, the version did not
    with pytest.raises(ModelError):
        models.check_world(teacher.identity, edited, "manifest.yaml")
    models.check_world(teacher.identity, None, "a real corpus")  # a manifest without a world is any corpus


def test_extract_refuses_a_corpus_of_another_world(tiny_demo, tmp_path):
    from pipeline.common.config import ExtractConfig
    from pipeline.common.errors import PipelineError
    from pipeline.features import extract as extract_mod

    cfg, folder = tiny_demo
    corpus = dataclasses.replace(WORLD, out_dir=str(tmp_path / "corpus"), train_images=8, test_images=0, workers=1)
    manifest_path = synthetic.generate_corpus(corpus)
    text = manifest_path.read_text().replace(f"version: {synthetic.WORLD_VERSION}", "version: 1")
    manifest_path.write_text(text)
    extract_cfg = ExtractConfig(manifest=str(manifest_path), out_dir=str(tmp_path / "features"), splits=["train"],
                                num_workers=0, threads=1)
    with pytest.raises(PipelineError, match="v1, but the teacher"):
        extract_mod.extract(extract_cfg, dataclasses.replace(cfg, pretrained=f"local-dir:{folder}"))


def test_demo_resolves_to_the_shipped_folder_and_names_what_is_missing():
    with pytest.raises(ModelError, match="no demo weights for 'dsmd-test-teacher'"):
        models.resolve_pretrained("demo", "dsmd-test-teacher")
    assert models.resolve_pretrained("openai", "ViT-B-32") == "openai"


SHIPPED = models.demo_dir("dsmd-demo-teacher")


@pytest.mark.skipif(not (SHIPPED / names.SAFETENSORS_FILE).exists(), reason="no shipped demo teacher")
def test_shipped_demo_teacher_matches_its_card_and_this_generator():
    card = json.loads((SHIPPED / names.DEMO_CARD).read_text())
    assert card["sha256"] == atomic.sha256_file(SHIPPED / names.SAFETENSORS_FILE)
    # a change to the vocabulary, grammar or renderer must come with a new WORLD_VERSION and a new teacher
    assert card["world"] == synthetic.world_record(CorpusConfig()), "re-pretrain the demo teacher: `dsmd pretrain`"
    assert card["samples_seen"] >= 800_000
    assert models.resolve_pretrained("demo", "dsmd-demo-teacher") == str(SHIPPED / names.SAFETENSORS_FILE)
