import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline.common.errors import PipelineError
from pipeline.corpus.manifest import (
    FieldMapping,
    ManifestError,
    expand_pattern,
    is_remote,
    load_manifest,
    write_manifest,
)


def touch_shards(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_expand_pattern_keeps_zero_padding_and_alternatives():
    assert expand_pattern("train-{000..002}.tar") == ["train-000.tar", "train-001.tar", "train-002.tar"]
    assert expand_pattern("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_pattern("plain.tar") == ["plain.tar"]


def test_is_remote():
    assert is_remote("pipe:cat a.tar")
    assert is_remote("https://host/a.tar") and is_remote("s3://bucket/a.tar") and is_remote("gs://b/a.tar")
    assert not is_remote("/abs/a.tar") and not is_remote("rel/a.tar") and not is_remote("C:/data/a.tar")


def test_load_resolves_relative_to_manifest_dir_not_cwd(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    touch_shards(data_dir, [f"train-{i:06d}.tar" for i in range(3)] + ["x.tar"])
    abs_shard = tmp_path / "elsewhere" / "abs.tar"
    touch_shards(abs_shard.parent, ["abs.tar"])
    manifest_path = write_yaml(
        tmp_path / "manifests" / "m.yaml",
        {
            "name": "demo",
            "description": "a test corpus",
            "fields": {"image": ["PNG", ".jpg"], "captions": {"source": "json", "field": "meta.captions"}},
            "splits": {
                "train": {"shards": "../data/train-{000000..000002}.tar", "num_samples": 30},
                "test": {"shards": ["../data/x.tar", str(abs_shard), "pipe:curl -s https://host/{0..1}.tar", "s3://b/c.tar"]},
            },
        },
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths must not depend on the working directory
    m = load_manifest(Path("../manifests/m.yaml"))
    assert m.name == "demo" and m.description == "a test corpus"
    assert m.path == manifest_path.resolve()
    assert m.sha256 == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert m.fields == FieldMapping(["png", "jpg"], "json", "meta.captions")
    train = m.split("train")
    assert train.shards == [str(data_dir / f"train-{i:06d}.tar") for i in range(3)]
    assert train.num_samples == 30 and train.pattern == "../data/train-{000000..000002}.tar"
    test = m.split("test")
    assert test.shards == [
        str(data_dir / "x.tar"),
        str(abs_shard),
        "pipe:curl -s https://host/0.tar",
        "pipe:curl -s https://host/1.tar",
        "s3://b/c.tar",
    ]
    assert test.num_samples is None


def test_defaults_when_fields_and_name_are_omitted(tmp_path):
    touch_shards(tmp_path, ["a.tar"])
    m = load_manifest(write_yaml(tmp_path / "corpus.yaml", {"splits": {"train": {"shards": "a.tar"}}}))
    assert m.name == "corpus"
    assert m.fields.caption_source == "txt" and m.fields.image_extensions[0] == "jpg"
    m2 = load_manifest(
        write_yaml(tmp_path / "j.yaml", {"fields": {"captions": {"source": "json"}}, "splits": {"train": {"shards": "a.tar"}}})
    )
    assert m2.fields.caption_field == "caption"


def test_split_lookup_names_available_splits(tmp_path):
    touch_shards(tmp_path, ["a.tar"])
    m = load_manifest(write_yaml(tmp_path / "m.yaml", {"splits": {"train": {"shards": "a.tar"}, "val": {"shards": "a.tar"}}}))
    with pytest.raises(ManifestError, match=r"no split 'test'.*train, val"):
        m.split("test")


def test_missing_local_shards_are_listed(tmp_path):
    touch_shards(tmp_path, ["s-1.tar"])
    path = write_yaml(tmp_path / "m.yaml", {"splits": {"train": {"shards": "s-{0..3}.tar"}, "web": {"shards": "https://h/x.tar"}}})
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message and "3 local shard(s) do not exist" in message
    for i in (0, 2, 3):
        assert str(tmp_path / f"s-{i}.tar") in message
    assert "s-1.tar" not in message and "https" not in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ("splits: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ({"name": "x", "splits": {"train": {"shards": "a.tar"}}, "shard": "oops"}, r": shard: unknown key"),
        ({"name": "x"}, "no splits"),
        ({"splits": {}}, "no splits"),
        ({"splits": ["train"]}, r"splits must be a mapping, got \['train'\]"),
        ({"splits": {"train": "a.tar"}}, "splits.train must be a mapping like"),
        ({"splits": {"train": {"shard": "a.tar"}}}, r"splits.train.shard: unknown key"),
        ({"splits": {"train": {"num_samples": 3}}}, "splits.train has no 'shards'"),
        ({"splits": {"train": {"shards": 5}}}, "splits.train.shards must be a list, got 5"),
        ({"splits": {"train": {"shards": []}}}, "splits.train.shards must be a string or a non-empty list"),
        ({"splits": {"train": {"shards": "a-{0..2.tar"}}}, "cannot expand"),
        ({"splits": {"train": {"shards": ["a.tar", "a.tar"]}}}, "lists a shard twice"),
        ({"splits": {"train": {"shards": "a.tar", "num_samples": -1}}}, "splits.train.num_samples must be >= 0, got -1"),
        ({"splits": {"train": {"shards": "a.tar", "num_samples": "many"}}}, "splits.train.num_samples: Value 'many' of type 'str' could not be converted to Integer"),
        ({"fields": {"image": []}, "splits": {"train": {"shards": "a.tar"}}}, "fields.image must be a non-empty list"),
        ({"fields": {"image": ["jpg", [3]]}, "splits": {"train": {"shards": "a.tar"}}}, r"fields.image: \[3\] is not a file extension"),
        ({"fields": {"image": ["j pg"]}, "splits": {"train": {"shards": "a.tar"}}}, "'j pg' is not a file extension"),
        ({"fields": {"image": ["jpg", "JPG"]}, "splits": {"train": {"shards": "a.tar"}}}, "lists an extension twice"),
        ({"fields": {"captions": {"source": "csv"}}, "splits": {"train": {"shards": "a.tar"}}}, r"fields.captions.source: Invalid value 'csv', expected one of \[txt, json\]"),
        ({"fields": {"captions": {"source": "txt", "field": "x"}}, "splits": {"train": {"shards": "a.tar"}}}, "only applies to source: json"),
        ({"fields": {"captions": {"source": "json", "field": ""}}, "splits": {"train": {"shards": "a.tar"}}}, "must be a non-empty string"),
        ({"fields": {"caption": {"source": "txt"}}, "splits": {"train": {"shards": "a.tar"}}}, r"fields.caption: unknown key"),
        ({"name": ["x"], "splits": {"train": {"shards": "a.tar"}}}, "name: Cannot convert 'ListConfig' to string"),
        ({"world": [1], "splits": {"train": {"shards": "a.tar"}}}, r"world must be a mapping, got \[1\]"),
        ({"splits": {"train": {"shards": "a.tar"}}, "classification": {"t": {"roots": "x"}}}, "classification.t.roots: unknown key"),
        ({"splits": {"train": {"shards": "a.tar"}}, "classification": {"t": {"root": "x", "num_samples": -2}}},
         "classification.t.num_samples must be >= 0, got -2"),
    ],
)
def test_bad_manifests_name_file_and_key(tmp_path, content, expected):
    touch_shards(tmp_path, ["a.tar"])
    path = write_yaml(tmp_path / "bad.yaml", content)
    with pytest.raises(ManifestError, match=expected) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, PipelineError)  # stages turn it into "error: ..." and exit 2


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found: .*nope.yaml"):
        load_manifest(tmp_path / "nope.yaml")


def test_write_manifest_round_trip_and_atomic(tmp_path):
    touch_shards(tmp_path, ["train-00.tar", "train-01.tar"])
    data = {
        "name": "rt",
        "description": "round trip",
        "fields": {"image": ["png"], "captions": {"source": "txt"}},
        "splits": {"train": {"shards": "train-{00..01}.tar", "num_samples": 7}},
    }
    path = write_manifest(data, tmp_path / "out" / "manifest.yaml", comment="line one\nline two")
    text = path.read_text()
    assert text.startswith("# line one\n# line two\n")
    assert yaml.safe_load(text) == data  # key order and values preserved; the comment is not data
    assert [p.name for p in path.parent.iterdir()] == ["manifest.yaml"]  # no temp file left behind
    # the written manifest lives in out/, so its relative shards must be ../ to load; check resolution
    data["splits"]["train"]["shards"] = "../train-{00..01}.tar"
    m = load_manifest(write_manifest(data, path))
    assert m.split("train").shards == [str(tmp_path / "train-00.tar"), str(tmp_path / "train-01.tar")]
