import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.corpus.augment import decode_image
from pipeline.corpus.reader import (
    BAD_CAPTION_JSON,
    BAD_CAPTION_TEXT,
    CORRUPT_IMAGE,
    DUPLICATE_KEY,
    EMPTY_CAPTION,
    MAX_EXAMPLES,
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_SHARD,
    SkipReport,
    iter_samples,
    iter_shard,
)
from pipeline.corpus.manifest import FieldMapping, load_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
TXT = FieldMapping(["png", "jpg"], "txt", "")


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def read_all(shards, fields=TXT):
    report = SkipReport()
    samples = list(iter_samples([str(s) for s in shards], fields, report))
    return samples, report


def test_multi_caption_txt_keeps_every_caption_and_raw_image_bytes(tmp_path):
    images = {k: png(i) for i, k in enumerate(["a", "b"])}
    shard = make_tar(
        tmp_path / "s.tar",
        [
            ("a.png", images["a"]),
            ("a.txt", b"first caption\n\n  second caption  \r\nthird\n"),
            ("a.json", b'{"ignored": true}'),
            ("b.PNG", images["b"]),  # extensions compare in lower case
            ("b.txt", "\ufeffun caf\u00e9\n".encode("utf-8")),
        ],
    )
    samples, report = read_all([shard])
    assert report.total == 0
    assert [s.key for s in samples] == ["a", "b"]
    assert samples[0].captions == ["first caption", "second caption", "third"]
    assert samples[1].captions == ["un caf\u00e9"]  # the UTF-8 byte order mark is not part of the caption
    assert samples[0].image_bytes == images["a"] and samples[0].image_format == "png"
    assert samples[1].image_format == "png" and samples[0].shard == str(shard)


def test_image_extension_priority_follows_the_manifest(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("k.jpg", b"JPEG"), ("k.png", b"PNG"), ("k.txt", b"c")])
    (s,) = read_all([shard], FieldMapping(["png", "jpg"], "txt", ""))[0]
    assert (s.image_format, s.image_bytes) == ("png", b"PNG")
    (s,) = read_all([shard], FieldMapping(["jpg", "png"], "txt", ""))[0]
    assert (s.image_format, s.image_bytes) == ("jpg", b"JPEG")


def test_keys_with_directories_group_like_webdataset(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("d/0001.png", b"x"), ("d/0001.txt", b"one"), ("d/0002.png", b"y"), ("d/0002.txt", b"two")])
    samples, report = read_all([shard])
    assert [(s.key, s.captions) for s in samples] == [("d/0001", ["one"]), ("d/0002", ["two"])]


def test_json_captions_string_list_and_dotted_field(tmp_path):
    members = [
        ("s1.jpg", b"i1"), ("s1.json", json.dumps({"meta": {"caps": ["x one", " ", "x two"]}}).encode()),
        ("s2.jpg", b"i2"), ("s2.json", json.dumps({"meta": {"caps": "only one"}}).encode()),
        ("s3.jpg", b"i3"), ("s3.json", json.dumps({"meta": {}}).encode()),  # field missing
        ("s4.jpg", b"i4"), ("s4.json", json.dumps({"meta": {"caps": [1, 2]}}).encode()),  # wrong type
        ("s5.jpg", b"i5"), ("s5.json", b"{not json"),
        ("s6.jpg", b"i6"), ("s6.txt", b"a txt caption is not the json source"),
        ("s7.jpg", b"i7"), ("s7.json", json.dumps({"meta": {"caps": ["", "  "]}}).encode()),
    ]
    shard = make_tar(tmp_path / "j.tar", members)
    samples, report = read_all([shard], FieldMapping(["jpg"], "json", "meta.caps"))
    assert [(s.key, s.captions) for s in samples] == [("s1", ["x one", "x two"]), ("s2", ["only one"])]
    assert report.counts == {MISSING_CAPTION: 2, BAD_CAPTION_JSON: 2, EMPTY_CAPTION: 1}
    assert report.examples[MISSING_CAPTION] == [(str(shard), "s3"), (str(shard), "s6")]
    assert report.examples[BAD_CAPTION_JSON] == [(str(shard), "s4"), (str(shard), "s5")]


def test_incomplete_samples_are_skipped_and_counted_with_keys(tmp_path):
    shard = make_tar(
        tmp_path / "s.tar",
        [
            ("good1.png", b"g1"), ("good1.txt", b"fine"),
            ("noimage.txt", b"caption without image"),
            ("nocaption.png", b"image without caption"),
            ("emptytxt.png", b"x"), ("emptytxt.txt", b"\n  \n"),
            ("latin1.png", b"x"), ("latin1.txt", "caf\u00e9".encode("latin-1")),
            ("wrongext.gif", b"x"), ("wrongext.txt", b"gif is not in the manifest"),
            ("good2.png", b"g2"), ("good2.txt", b"fine too"),
        ],
    )
    samples, report = read_all([shard])
    assert [s.key for s in samples] == ["good1", "good2"]
    s = str(shard)
    assert report.counts == {MISSING_IMAGE: 2, MISSING_CAPTION: 1, EMPTY_CAPTION: 1, BAD_CAPTION_TEXT: 1}
    assert report.examples[MISSING_IMAGE] == [(s, "noimage"), (s, "wrongext")]
    assert report.examples[MISSING_CAPTION] == [(s, "nocaption")]
    assert report.examples[EMPTY_CAPTION] == [(s, "emptytxt")]
    assert report.total == 5


def test_duplicate_key_in_a_shard_is_counted(tmp_path):
    shard = make_tar(tmp_path / "s.tar", [("a.png", b"1"), ("a.txt", b"x"), ("b.png", b"2"), ("b.txt", b"y"), ("a.png", b"3"), ("a.txt", b"z")])
    samples, report = read_all([shard])
    assert [(s.key, s.image_bytes) for s in samples] == [("a", b"1"), ("b", b"2")]
    assert report.counts == {DUPLICATE_KEY: 1}


def _ten_sample_tar(path: Path) -> tuple[Path, list[int]]:
    """A tar of 10 samples; returns it and the byte offset where each sample's first member starts."""
    members = []
    for i in range(10):
        members += [(f"k{i}.png", png(i)), (f"k{i}.txt", f"caption {i}".encode())]
    make_tar(path, members)
    offsets = []
    with tarfile.open(path) as archive:
        for info in archive.getmembers():
            if info.name.endswith(".png"):
                offsets.append(info.offset)
    return path, offsets


def test_truncated_shard_keeps_complete_samples_and_is_counted(tmp_path):
    full, offsets = _ten_sample_tar(tmp_path / "full.tar")
    raw = full.read_bytes()
    # cut in the middle of sample k6's image: k0..k5 are complete
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: offsets[6] + 700])
    good = make_tar(tmp_path / "after.tar", [("z.png", b"z"), ("z.txt", b"after the broken shard")])
    samples, report = read_all([cut, good])
    assert [s.key for s in samples] == [f"k{i}" for i in range(6)] + ["z"]
    assert report.counts == {UNREADABLE_SHARD: 1}
    assert report.examples[UNREADABLE_SHARD] == [(str(cut), "k5")]


def test_shard_cut_exactly_between_members_is_detected(tmp_path):
    # tarfile itself reads such a stream as a clean end of archive; the missing end block gives it away
    full, offsets = _ten_sample_tar(tmp_path / "full.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: offsets[4]])
    samples, report = read_all([cut])
    assert [s.key for s in samples] == ["k0", "k1", "k2"]  # k3 may have been incomplete: it is not trusted
    assert report.counts == {UNREADABLE_SHARD: 1}
    # the untouched tar reads completely with no skip
    samples, report = read_all([full])
    assert len(samples) == 10 and report.total == 0


def test_missing_and_garbage_shards_are_counted_not_raised(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    good = make_tar(tmp_path / "good.tar", [("a.png", b"a"), ("a.txt", b"ok")])
    missing = tmp_path / "missing.tar"
    samples, report = read_all([missing, garbage, good, empty])
    assert [s.key for s in samples] == ["a"]
    assert report.counts == {UNREADABLE_SHARD: 3}
    assert [shard for shard, _ in report.examples[UNREADABLE_SHARD]] == [str(missing), str(garbage), str(empty)]


def test_pipe_shards_read_like_local_ones_and_failing_pipes_are_counted(tmp_path):
    full, _ = _ten_sample_tar(tmp_path / "full.tar")
    local, _ = read_all([full])
    report = SkipReport()
    piped = list(iter_shard(f"pipe:cat {full}", TXT, report))
    assert [(s.key, s.image_bytes, s.captions) for s in piped] == [(s.key, s.image_bytes, s.captions) for s in local]
    assert piped[0].shard == f"pipe:cat {full}" and report.total == 0
    failing = list(iter_shard(f"pipe:cat {tmp_path / 'nope.tar'}", TXT, report))
    assert failing == [] and report.counts == {UNREADABLE_SHARD: 1}


def test_partial_iteration_closes_cleanly(tmp_path):
    full, _ = _ten_sample_tar(tmp_path / "full.tar")
    report = SkipReport()
    iterator = iter_shard(f"pipe:cat {full}", TXT, report)
    assert next(iterator).key == "k0"
    iterator.close()  # a consumer that stops early must not record a broken shard
    assert report.total == 0


def test_skip_report_merge_dict_round_trip_and_example_cap():
    a, b = SkipReport(), SkipReport()
    for i in range(4):
        a.add(MISSING_IMAGE, "s1", f"k{i}")
    for i in range(3):
        b.add(MISSING_IMAGE, "s2", f"j{i}")
    b.add(CORRUPT_IMAGE, "s2", "bad")
    a.merge(b)
    assert a.counts == {MISSING_IMAGE: 7, CORRUPT_IMAGE: 1} and a.total == 8
    assert len(a.examples[MISSING_IMAGE]) == MAX_EXAMPLES
    assert a.examples[MISSING_IMAGE] == [("s1", "k0"), ("s1", "k1"), ("s1", "k2"), ("s1", "k3"), ("s2", "j0")]
    d = json.loads(json.dumps(a.to_dict()))
    assert d["total"] == 8 and d["counts"] == {CORRUPT_IMAGE: 1, MISSING_IMAGE: 7}
    restored = SkipReport.from_dict(d)
    assert restored.counts == a.counts and restored.examples == a.examples
    text = a.summary()
    assert "8 skipped" in text and "missing_image: 7" in text and "s2 [bad]" in text
    assert SkipReport().summary() == "no samples skipped"


def test_skip_report_log(caplog):
    import logging

    report = SkipReport()
    report.add(CORRUPT_IMAGE, "s.tar", "k1")
    with caplog.at_level(logging.INFO):
        report.log(logging.getLogger("test"))
    assert "corrupt_image: 1" in caplog.text


def test_flickr8k_sample_manifest_end_to_end(flickr8k_dir):
    manifest = load_manifest(REPO_ROOT / "data_manifest" / "flickr8k-sample.yaml")
    assert manifest.split("train").shards == [str(flickr8k_dir / f"flickr8k-sample-00000{i}.tar") for i in (0, 1)]
    counts = {}
    keys = set()
    report = SkipReport()
    for name, spec in manifest.splits.items():
        samples = list(iter_samples(spec.shards, manifest.fields, report))
        counts[name] = len(samples)
        assert spec.num_samples == len(samples)
        assert all(len(s.captions) == 5 and s.image_format == "jpg" for s in samples)
        keys |= {s.key for s in samples}
        image = decode_image(samples[0].image_bytes)
        assert min(image.size) >= 100
    assert counts == {"train": 200, "val": 100, "test": 100}
    assert len(keys) == 400 and report.total == 0


def test_gzipped_shard_reads_and_truncated_gzip_is_counted(tmp_path):
    import gzip

    full, _ = _ten_sample_tar(tmp_path / "full.tar")
    local, _ = read_all([full])
    packed = tmp_path / "full.tar.gz"
    packed.write_bytes(gzip.compress(full.read_bytes()))
    samples, report = read_all([packed])
    assert [(s.key, s.image_bytes) for s in samples] == [(s.key, s.image_bytes) for s in local] and report.total == 0
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    samples, report = read_all([cut])
    assert 0 < len(samples) < 10 and report.counts == {UNREADABLE_SHARD: 1}
