"""Zero-shot classification: metrics against brute force, CLIP_benchmark's layout read through the
manifest, and the teacher's cached figures equal to running the teacher as CLIP_benchmark does."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.common.config import CorpusConfig, ExtractConfig, TeacherConfig
from pipeline.corpus import reader
from pipeline.corpus.augment import decode_image
from pipeline.corpus.manifest import load_manifest, ManifestError
from pipeline.corpus.synthetic import generate_corpus, ZEROSHOT_TASKS
from pipeline.evaluation import zeroshot
from pipeline.features import extract as extract_mod
from pipeline.models import load_model

TEACHER = "dsmd-test-teacher"


def unit(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(image_emb, labels, class_emb):
    """Per image, classes sorted by score with a plain loop; recall per class from the top-1."""
    acc1 = acc5 = 0
    predicted = []
    for emb, label in zip(image_emb, labels):
        scores = [float(np.dot(emb, c)) for c in class_emb]
        order = sorted(range(len(scores)), key=lambda c: -scores[c])
        acc1 += order[0] == label
        acc5 += label in order[:5]
        predicted.append(order[0])
    recalls = []
    for c in sorted(set(labels.tolist())):
        members = [i for i, label in enumerate(labels) if label == c]
        recalls.append(sum(predicted[i] == c for i in members) / len(members))
    return acc1 / len(labels), acc5 / len(labels), sum(recalls) / len(recalls)


@pytest.mark.parametrize("num_classes", [3, 12])
def test_metrics_match_brute_force(num_classes):
    rng = np.random.default_rng(num_classes)
    class_emb = unit(rng, num_classes, 16)
    labels = rng.integers(0, num_classes, 200)
    labels[:num_classes] = np.arange(num_classes)
    image_emb = class_emb[labels] + 2.0 * unit(rng, 200, 16)  # noisy: many mistakes
    got = zeroshot.classification_metrics(image_emb, labels, class_emb)
    acc1, acc5, recall = brute_force(image_emb, labels, class_emb)
    assert 0.2 < got["acc1"] < 0.95  # the case exercises mistakes
    assert got["acc1"] == pytest.approx(acc1) and got["mean_per_class_recall"] == pytest.approx(recall)
    if num_classes >= 5:
        assert got["acc5"] == pytest.approx(acc5) and got["acc5"] > got["acc1"]
    else:
        assert got["acc5"] is None  # CLIP_benchmark reports NaN below 5 classes


def test_class_embedding_is_the_normalised_mean_of_normalised_prompts():
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(12, 8)).astype(np.float32) * 3
    class_index = np.repeat(np.arange(4), 3)
    got = zeroshot.class_embeddings(prompts, class_index, 4)
    for c in range(4):
        mean = np.mean([p / np.linalg.norm(p) for p in prompts[class_index == c]], axis=0)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def _clip_benchmark_task(root, labels, classnames=("cat", "dog", "fox"), templates=("a photo of a {c}.", "{c}")):
    """A task in CLIP_benchmark's layout: classnames.txt, templates, test/0.tar with .png + .cls."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    from PIL import Image
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), (40 * i % 255, 90, 30)).save(buf, format="PNG")
            for name, data in ((f"s{i:03d}.png", buf.getvalue()), (f"s{i:03d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _manifest(path, tasks: dict) -> None:
    (path.parent / "train.tar").write_bytes(b"")
    path.write_text(yaml.safe_dump({"splits": {"train": {"shards": "train.tar"}}, "classification": tasks}))


def test_a_clip_benchmark_task_is_read_through_the_manifest_and_bad_labels_are_counted(tmp_path):
    _clip_benchmark_task(tmp_path / "wds_pets", [0, 1, 2, 1, "7", "x"])
    _manifest(tmp_path / "m.yaml", {"pets": {"root": "wds_pets"}})
    task = load_manifest(tmp_path / "m.yaml").classification["pets"]
    assert task.classnames == ["cat", "dog", "fox"] and task.templates == ["a photo of a {c}.", "{c}"]
    report = reader.SkipReport()
    samples = list(reader.iter_labelled(task.shards[0], ["png"], len(task.classnames), report))
    assert [s.label for s in samples] == [0, 1, 2, 1]
    assert report.counts == {"bad_label": 2}


@pytest.mark.parametrize("task, message", [
    ({"root": "nowhere"}, "no shards match"),
    ({"root": "wds_pets", "classnames": "missing.txt"}, "missing.txt not found"),
    ({"root": "wds_pets", "templates": "bad.txt"}, "without '{c}'"),
    ({"shards": "wds_pets/test/0.tar"}, "needs 'root'"),
])
def test_bad_task_declarations_name_the_file(tmp_path, task, message):
    _clip_benchmark_task(tmp_path / "wds_pets", [0])
    (tmp_path / "bad.txt").write_text("a photo\n")
    _manifest(tmp_path / "m.yaml", {"pets": task})
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(tmp_path / "m.yaml")
    assert "m.yaml" in str(info.value)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The synthetic corpus's zero-shot tasks extracted with a fixed random teacher."""
    root = tmp_path_factory.mktemp("zeroshot")
    cfg = CorpusConfig(out_dir=str(root / "corpus"), seed=1, train_images=16, val_images=0, test_images=80,
                       web_images=0, image_size=32, samples_per_shard=40, workers=1)
    manifest = generate_corpus(cfg)
    torch.manual_seed(0)
    checkpoint = root / "teacher.pt"
    torch.save(load_model(TEACHER, "").model.state_dict(), checkpoint)
    extract_cfg = ExtractConfig(manifest=str(manifest), out_dir=str(root / "features"), splits=["test"], batch_size=16,
                                num_workers=0, threads=1)
    results = extract_mod.extract(extract_cfg, TeacherConfig(model=TEACHER, pretrained=str(checkpoint)))
    return root, manifest, checkpoint, results


def _as_clip_benchmark(model, preprocess, tokenizer, task) -> dict:
    """CLIP_benchmark's procedure (zero_shot_classifier + run_classification), with the model in hand."""
    with torch.no_grad():
        weights = []
        for name in task.classnames:
            emb = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in task.templates])), dim=-1).mean(0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)
        samples = list(reader.iter_labelled(task.shards[0], ["png"], len(task.classnames), reader.SkipReport()))
        images = torch.stack([preprocess(decode_image(s.image_bytes)) for s in samples])
        logits = F.normalize(model.encode_image(images), dim=-1) @ classifier
    labels = np.array([s.label for s in samples])
    predicted = logits.argmax(1).numpy()
    return {"acc1": float((predicted == labels).mean()),
            "mean_per_class_recall": float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))}


def test_the_synthetic_tasks_are_extracted_and_the_cached_teacher_scores_as_clip_benchmark(extracted):
    root, manifest, checkpoint, results = extracted
    tasks = load_manifest(manifest).classification
    assert sorted(tasks) == sorted(ZEROSHOT_TASKS) == zeroshot.list_tasks(root / "features")
    teacher = load_model(TEACHER, str(checkpoint))
    for name, task in tasks.items():
        assert results[f"zeroshot/{name}"]["num_images"] > 0
        cached = zeroshot.teacher_task_metrics(zeroshot.load_task(root / "features", name))
        direct = _as_clip_benchmark(teacher.model, teacher.preprocess, teacher.tokenizer, task)
        assert cached["num_classes"] == len(task.classnames)
        # float16 storage: the same predictions up to near-ties
        assert cached["acc1"] == pytest.approx(direct["acc1"], abs=0.03), name
        assert cached["mean_per_class_recall"] == pytest.approx(direct["mean_per_class_recall"], abs=0.05), name
    # the count task holds every test scene, the others only the single-object ones
    assert results["zeroshot/count"]["num_images"] == 80 > results["zeroshot/shape"]["num_images"]


def test_a_students_scores_are_its_own_embeddings(extracted):
    root, manifest, _, _ = extracted
    torch.manual_seed(1)
    student = load_model("dsmd-test-student", "")
    task = load_manifest(manifest).classification["colour"]
    got = zeroshot.student_task_metrics(student, zeroshot.load_task(root / "features", "colour"), batch_size=7, device="cpu")
    want = _as_clip_benchmark(student.model, student.preprocess, student.tokenizer, task)
    assert got["acc1"] == pytest.approx(want["acc1"], abs=1e-6)
    assert got["mean_per_class_recall"] == pytest.approx(want["mean_per_class_recall"], abs=1e-6)


def test_a_finished_task_is_not_redone(extracted, caplog):
    root, manifest, checkpoint, _ = extracted
    cfg = ExtractConfig(manifest=str(manifest), out_dir=str(root / "features"), splits=["test"], batch_size=16,
                        num_workers=0, threads=1)
    caplog.set_level("INFO")
    extract_mod.extract(cfg, TeacherConfig(model=TEACHER, pretrained=str(checkpoint)))
    assert sum("zero-shot task" in r.getMessage() and "up to date" in r.getMessage() for r in caplog.records) == 4


def test_task_paths_resolve_against_the_manifest_folder_not_the_working_directory(tmp_path, monkeypatch):
    _clip_benchmark_task(tmp_path / "wds_pets", [0, 1])
    _manifest(tmp_path / "m.yaml", {"pets": {"shards": "wds_pets/test/*.tar", "classnames": "wds_pets/classnames.txt",
                                             "templates": "wds_pets/zeroshot_classification_templates.txt"}})
    monkeypatch.chdir(tmp_path.parent)
    task = load_manifest(tmp_path / "m.yaml").classification["pets"]
    assert task.shards == [str(tmp_path / "wds_pets" / "test" / "0.tar")] and task.classnames == ["cat", "dog", "fox"]
