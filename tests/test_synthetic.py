import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.common.config import ConfigError, CorpusConfig
from pipeline.corpus import synthetic
from pipeline.corpus.augment import decode_image
from pipeline.corpus.manifest import dump_manifest, load_manifest
from pipeline.corpus.reader import iter_samples, SkipReport
from pipeline.corpus.synthetic import (
    COLOURS,
    INVERSE,
    REGION_PHRASES,
    RELATIONS,
    PATTERNS,
    SHAPES,
    SIDE_PHRASES,
    SIZES,
    Scene,
    generate_corpus,
    region,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny(out_dir: Path, **overrides) -> CorpusConfig:
    values = dict(
        out_dir=str(out_dir), seed=3, train_images=40, val_images=10, test_images=10, web_images=0, zipf=1.0,
        image_size=32, samples_per_shard=16, near_duplicate_fraction=0.5, workers=1,
    )
    values.update(overrides)
    return CorpusConfig(**values)


def read_records(manifest_path: Path) -> dict[str, list[tuple]]:
    """split -> [(sample, json record)] read back through the manifest and the corpus reader."""
    manifest = load_manifest(manifest_path)
    report = SkipReport()
    out = {}
    json_fields = manifest.fields.__class__(["json"], "txt", "")  # read the json member as the "image"
    for name, spec in manifest.splits.items():
        samples = list(iter_samples(spec.shards, manifest.fields, report))
        jsons = list(iter_samples(spec.shards, json_fields, report))
        assert [s.key for s in samples] == [j.key for j in jsons]
        out[name] = [(s, json.loads(j.image_bytes)) for s, j in zip(samples, jsons)]
    assert report.total == 0
    return out


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the zero-shot tasks' sub-folders too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    cfg = tiny(out)
    return cfg, generate_corpus(cfg)


def test_layout_manifest_and_counts(corpus):
    cfg, manifest_path = corpus
    out = Path(cfg.out_dir)
    assert manifest_path == out / "manifest.yaml"
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar",
    ]
    manifest = load_manifest(manifest_path)
    assert manifest.split("train").pattern == "train-{000000..000002}.tar"
    assert {n: s.num_samples for n, s in manifest.splits.items()} == {"train": 40, "val": 10, "test": 10}
    records = read_records(manifest_path)
    assert {n: len(r) for n, r in records.items()} == {"train": 40, "val": 10, "test": 10}
    keys = [s.key for r in records.values() for s, _ in r]
    assert len(set(keys)) == 60
    for sample, record in records["train"]:
        assert record["key"] == sample.key and record["captions"] == sample.captions  # .txt == .json captions
        assert cfg.min_captions <= len(sample.captions) <= cfg.max_captions
        assert len(set(sample.captions)) == len(sample.captions)
        assert sample.image_format == "png" and decode_image(sample.image_bytes).size == (32, 32)


def test_same_seed_gives_identical_bytes_other_seed_differs(corpus, tmp_path):
    cfg, _ = corpus
    again = tiny(tmp_path / "again", workers=2)  # and the number of worker processes does not matter
    generate_corpus(again)
    assert files(Path(cfg.out_dir)) == files(tmp_path / "again")
    other = tiny(tmp_path / "other", seed=4)
    generate_corpus(other)
    first, second = files(Path(cfg.out_dir)), files(tmp_path / "other")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first if name.endswith(".tar"))


def _words_re(words) -> re.Pattern:
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?![\w-])")


def _mentioned(caption: str, vocabulary: dict) -> list[str]:
    """Canonical names whose words appear in the caption (once per occurrence)."""
    lookup = {w: name for name, words in vocabulary.items() for w in (words[1] if isinstance(words[0], tuple) else words)}
    return [lookup[m] for m in _words_re(lookup).findall(caption)]


def test_captions_are_determined_by_the_scene(corpus):
    cfg, manifest_path = corpus
    records = read_records(manifest_path)
    n_objects_seen = set()
    for sample, record in (x for r in records.values() for x in r):
        scene = Scene.from_dict(record["scene"])
        n_objects_seen.add(len(scene.objects))
        for caption in sample.captions:
            colours, shapes, sizes = _mentioned(caption, COLOURS), _mentioned(caption, SHAPES), _mentioned(caption, SIZES)
            # every object's colour and shape is named, and nothing that is not in the scene
            assert set(colours) == {o.colour for o in scene.objects}, (caption, record["scene"])
            assert set(shapes) == {o.shape for o in scene.objects}, (caption, record["scene"])
            assert sorted(sizes) == sorted(o.size for o in scene.objects), caption
            assert sorted(_mentioned(caption, PATTERNS)) == sorted(o.pattern for o in scene.objects), caption
            if len(scene.objects) == 1:
                assert scene.relation is None
                assert any(p in caption for p in REGION_PHRASES[region(scene.objects[0], cfg.image_size)]), caption
            else:
                rel = scene.relation
                allowed = RELATIONS[rel] + RELATIONS[INVERSE[rel]] + SIDE_PHRASES[rel]
                assert _words_re(allowed).search(caption), caption
                others = [p for r in RELATIONS if r not in (rel, INVERSE[rel]) for p in RELATIONS[r] + SIDE_PHRASES[r]]
                assert not _words_re(others).search(caption), caption
    assert n_objects_seen == {1, 2, 3}


def test_relation_and_pixels_match_the_scene(corpus):
    cfg, manifest_path = corpus
    for sample, record in (x for r in read_records(manifest_path).values() for x in r):
        scene = Scene.from_dict(record["scene"])
        assert synthetic.layout_ok(scene, cfg.image_size)
        if scene.relation is not None:
            a, b = scene.objects[0], scene.objects[1]
            signed = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[scene.relation]
            assert signed > 0
        pixels = np.asarray(decode_image(sample.image_bytes)).astype(int)
        yy, xx = np.mgrid[0 : cfg.image_size, 0 : cfg.image_size]
        for obj in scene.objects:
            colour = np.array(COLOURS[obj.colour][0])
            if obj.pattern == "solid" and obj.shape != "crescent":  # the centre is filled with its colour
                centre = pixels[int(obj.y), int(obj.x)]
                assert np.abs(centre - colour).max() <= 30, (sample.key, obj)
            # every pattern paints its colour somewhere inside the object's circle
            inside = np.hypot(xx - obj.x, yy - obj.y) <= synthetic.radius(obj, cfg.image_size)
            # (thin rims are blended with the background by the anti-aliasing: "nearer the colour than the background")
            background = np.array(scene.background["tone"])
            nearer = np.abs(pixels[inside] - colour).sum(axis=1) < 0.55 * np.abs(background - colour).sum()
            assert nearer.sum() >= 2, (sample.key, obj)


def _attributes(scene: Scene) -> list[tuple]:
    return [(o.shape, o.colour, o.size, o.pattern) for o in scene.objects]


def test_near_duplicates_differ_in_exactly_one_thing(corpus):
    cfg, manifest_path = corpus
    records = {s.key: (s, r) for split in read_records(manifest_path).values() for s, r in split}
    changes = {}
    for key, (sample, record) in records.items():
        if record["near_duplicate_of"] is None:
            assert record["change"] is None
            continue
        source_sample, source_record = records[record["near_duplicate_of"]]
        assert int(key[-7:]) == int(source_sample.key[-7:]) + 1  # copies the previous scene
        new, old = Scene.from_dict(record["scene"]), Scene.from_dict(source_record["scene"])
        kind = record["change"]
        changes[kind] = changes.get(kind, 0) + 1
        assert new.background == old.background and len(new.objects) == len(old.objects)
        assert sample.image_bytes != source_sample.image_bytes
        diffs = [
            (i, field)
            for i, (a, b) in enumerate(zip(_attributes(new), _attributes(old)))
            for field, x, y in zip(("shape", "colour", "size", "pattern"), a, b)
            if x != y
        ]
        moved = [i for i, (a, b) in enumerate(zip(new.objects, old.objects)) if (a.x, a.y) != (b.x, b.y)]
        if kind in ("colour", "shape", "size", "pattern"):
            assert len(diffs) == 1 and diffs[0][1] == kind and not moved and new.relation == old.relation
        elif kind == "relation":
            assert not diffs and new.relation == INVERSE[old.relation] and moved == [0, 1]
            assert (new.objects[0].x, new.objects[0].y) == (old.objects[1].x, old.objects[1].y)
        elif kind == "swap_colours":
            assert diffs == [(0, "colour"), (1, "colour")] and not moved and new.relation == old.relation
            assert (new.objects[0].colour, new.objects[1].colour) == (old.objects[1].colour, old.objects[0].colour)
        else:
            assert kind == "position" and len(new.objects) == 1 and not diffs and moved == [0]
            assert region(new.objects[0], cfg.image_size) != region(old.objects[0], cfg.image_size)
    n = sum(changes.values())
    assert 10 <= n <= 40  # ~0.5 of the 57 scenes that have a predecessor in their shard
    assert len(changes) >= 4, changes


def test_rerun_skips_written_shards_and_config_change_regenerates(tmp_path, caplog):
    cfg = tiny(tmp_path / "c")
    generate_corpus(cfg)
    out = Path(cfg.out_dir)
    before = files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()
    generate_corpus(cfg)
    assert files(out) == before  # the deleted shard is back, identical
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.glob("*.tar") if p.name != "train-000001.tar")

    smaller = tiny(tmp_path / "c", train_images=20)  # another config in the same folder
    generate_corpus(smaller)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    fresh = tiny(tmp_path / "fresh", train_images=20)
    generate_corpus(fresh)
    assert files(out) == files(tmp_path / "fresh")  # nothing of the old config is left
    assert load_manifest(out / "manifest.yaml").split("train").num_samples == 20


@pytest.mark.parametrize(
    "override, message",
    [
        ({"min_captions": 4, "max_captions": 3}, "min_captions"),
        ({"max_captions": 9}, "max_captions"),
        ({"image_format": "gif"}, "image_format"),
        ({"near_duplicate_fraction": 1.5}, "near_duplicate_fraction"),
        ({"samples_per_shard": 0}, "samples_per_shard"),
        ({"image_size": 8}, "image_size"),
        ({"train_images": 0, "val_images": 0, "test_images": 0}, "must be > 0"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        generate_corpus(tiny(tmp_path / "bad", **override))
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_jpg_corpus(tmp_path):
    cfg = tiny(tmp_path / "j", image_format="jpg", train_images=8, val_images=0, test_images=0)
    manifest = load_manifest(generate_corpus(cfg))
    assert list(manifest.splits) == ["train"] and manifest.fields.image_extensions == ["jpg"]
    samples = list(iter_samples(manifest.split("train").shards, manifest.fields, SkipReport()))
    assert len(samples) == 8 and decode_image(samples[0].image_bytes).size == (32, 32)


def test_data_manifest_synthetic_is_what_dsmd_corpus_writes_for_the_defaults():
    default = CorpusConfig()
    assert default.out_dir == "data/synthetic"
    expected = dump_manifest(synthetic.manifest_data(default, "../data/synthetic/"), synthetic.manifest_comment(default))
    assert (REPO_ROOT / "data_manifest" / "synthetic.yaml").read_text() == expected
    data = yaml.safe_load(expected)
    assert data["splits"]["train"] == {"shards": "../data/synthetic/train-{000000..000001}.tar", "num_samples": 2000}
    assert "web" not in data["splits"] and data["world"]["version"] == synthetic.WORLD_VERSION


def test_cli(tmp_path, monkeypatch):
    from stages.corpus import app

    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults
    runner = CliRunner()
    args = ["--out-dir", "out", "--train-images", "12", "--val-images", "3", "--test-images", "0", "--web-images", "0",
            "--samples-per-shard", "5", "--image-size", "24", "--seed", "1", "--set", "workers=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "out/manifest.yaml" in result.output
    assert "train: 12 images in 3 shard(s)" in result.output and "val: 3 images in 1 shard(s)" in result.output
    manifest = load_manifest(tmp_path / "out" / "manifest.yaml")
    assert manifest.description.startswith("24 px png") and "seed 1" in manifest.description
    bad = runner.invoke(app, ["--out-dir", "out", "--set", "min_captions=0"])
    assert bad.exit_code == 2 and "min_captions" in bad.output


def test_web_split_never_holds_a_test_scene_and_test_scenes_are_unambiguous(tmp_path):
    cfg = tiny(tmp_path / "w", train_images=30, val_images=0, test_images=60, web_images=120, zipf=1.2)
    manifest_path = generate_corpus(cfg)
    records = read_records(manifest_path)
    describe = lambda record: synthetic.description(Scene.from_dict(record["scene"]), cfg.image_size)  # noqa: E731
    test = [describe(r) for _, r in records["test"]]
    web = [describe(r) for _, r in records["web"]]
    assert len(set(test)) == len(test)  # no test caption describes another test image
    assert not set(test) & set(web)
    assert all(s.key.startswith("web-") for s, _ in records["web"])
    report = json.loads((Path(cfg.out_dir) / synthetic.REPORT_NAME).read_text())
    assert report["test_ambiguous_caption_fraction"] == 0.0 and report["web_scenes_with_a_test_description"] == 0
    assert report["web_to_train_ratio"] == 4.0
    objects = [o for _, r in records["web"] for o in r["scene"]["objects"]]
    assert sum(report["splits"]["web"]["colour"].values()) == len(objects)


def test_descriptions_identify_scenes_up_to_paraphrase():
    a = synthetic.SceneObject("circle", "red", "small", 10, 10, "striped")
    b = synthetic.SceneObject("square", "blue", "large", 40, 10)
    left = Scene([a, b], "left", {})
    right = Scene([synthetic.SceneObject(**vars(b)), synthetic.SceneObject(**vars(a))], "right", {})
    assert synthetic.description(left, 64) == synthetic.description(right, 64)  # "A left of B" == "B right of A"
    other = Scene([a, synthetic.SceneObject("square", "blue", "large", 40, 10, "outlined")], "left", {})
    assert synthetic.description(left, 64) != synthetic.description(other, 64)  # one attribute differs


def test_concept_frequencies_follow_the_zipf_law():
    cfg = tiny("unused", zipf=1.2, near_duplicate_fraction=0.0)
    rng = np.random.default_rng(0)
    counts = {name: 0 for name in COLOURS}
    for _ in range(3000):
        for obj in synthetic.random_scene(rng, 64, cfg.zipf).objects:
            counts[obj.colour] += 1
    observed = np.array([counts[name] for name in COLOURS], dtype=float) / sum(counts.values())
    expected = synthetic.zipf_probs(len(COLOURS), 1.2)
    # scenes hold distinct (colour, shape) pairs, which flattens the law a little; the order and scale hold
    assert observed[0] > 3 * observed[-1]
    assert np.abs(observed - expected).max() < 0.05
