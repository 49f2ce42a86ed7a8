"""Faults a hostile user causes, through the real `dsmd` CLI in a subprocess where a process must die:
kill -9 anywhere in extract and train (resume equals a clean run; no temporary file and no worker
outlives the run), a file size limit standing in for a full disk, bad options and files (one
`error:` line, exit 2), a damaged input shard restored, and the checks a stage makes before work."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from pipeline import models
from pipeline.common import atomic, locking, names
from pipeline.common.config import ExtractConfig, TeacherConfig
from pipeline.common.params import EvaluateConfig
from pipeline.common.errors import PipelineError
from pipeline.evaluation import evaluate
from pipeline.features import extract as extract_mod, store
from tests.fakes import write_fake_features
from tests.test_data import write_negatives
from tests.tiny_corpus import write_tiny_corpus

REPO = Path(__file__).resolve().parent.parent
TEACHER = "dsmd-test-teacher"
STUDENT = "dsmd-test-student"


# ---- running the CLI ---------------------------------------------------------------------------

def dsmd(args: list[str], cwd: Path, file_size_limit: int | None = None) -> subprocess.Popen:
    """`dsmd <args>` in its own session (so its process group can be searched for survivors)."""

    def limit() -> None:
        if file_size_limit is not None:  # a write past the limit fails with EFBIG instead of killing
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", "from stages.cli import app; app()", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=limit,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def survivors(group: int, grace: float = 10.0) -> list[psutil.Process]:
    """Live (not zombie) processes of the process group `group`, after up to `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) == group and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """kill -9 `proc` (the stage's main process only, as a user would) once `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    leftover = survivors(proc.pid)
    for p in leftover:
        p.kill()
    assert not leftover, f"processes outlived the killed stage: {[p.cmdline() for p in leftover]}"


def the_error_line(code: int, output: str) -> str:
    """The run ended with exit status 2 and exactly one `error:` line (no traceback): that line."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in output and len(errors) == 1, output
    return errors[0]


def kill_seeded(proc: subprocess.Popen, seed: int, first_ready, clean_seconds: float) -> None:
    """Seed 0: kill once `first_ready()` holds (mid-run for sure); others at a seeded random point of
    a clean run's duration."""
    if seed == 0:
        kill_when(proc, first_ready)
    else:
        at = time.monotonic() + random.Random(seed).uniform(0.3, 1.0) * clean_seconds
        kill_when(proc, lambda: time.monotonic() >= at)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


_BLOCKED_WORKER = """
import sys, time
from torch.utils.data import DataLoader, IterableDataset
from pipeline.common import runtime

class Blocked(IterableDataset):
    def __iter__(self):  # a worker busy for long (a big shard, a slow pipe)
        print("worker busy", flush=True)
        time.sleep(600)
        yield 0

init = runtime.die_with_parent() if sys.argv[1] == "die-with-parent" else None
next(iter(DataLoader(Blocked(), num_workers=1, worker_init_fn=init)))
"""


@pytest.mark.parametrize("init", ["die-with-parent", "torch-default"])
def test_a_busy_loader_worker_dies_with_its_killed_parent(tmp_path, init):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_WORKER, init], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "worker busy"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = survivors(proc.pid, grace=3.0)
    for p in left:
        p.kill()
    # torch's own watchdog only looks between batches: the control shows the orphan this prevents
    assert (len(left) == 0) == (init == "die-with-parent")


# ---- extract -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extract_setup(tmp_path_factory):
    """A corpus, a teacher checkpoint, a params file, and the tables of a clean run (with its time)."""
    root = tmp_path_factory.mktemp("extract")
    manifest = write_tiny_corpus(root / "corpus", shards_per_split=3, per_shard=20, image_size=64)
    torch.manual_seed(0)
    checkpoint = root / "teacher.pt"
    torch.save(models.load_model(TEACHER, "").model.state_dict(), checkpoint)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "teacher": {"model": TEACHER, "pretrained": str(checkpoint)},
        "extract": {"manifest": str(manifest), "splits": ["train", "test"], "batch_size": 8, "num_workers": 2, "threads": 1},
    }))
    started = time.monotonic()
    code, out = finish(dsmd(["extract", "--params", str(params), "--out-dir", str(root / "clean")], root))
    assert code == 0, out
    return {"root": root, "params": params, "manifest": manifest, "checkpoint": checkpoint,
            "clean": root / "clean", "seconds": time.monotonic() - started}


def assert_same_tables(a: Path, b: Path) -> None:
    """Equal features, wherever the corpus was read from (the source_shard column names its path)."""
    for split in ("train", "test"):
        images_a, images_b = (store.read_images(d, split) for d in (a, b))
        assert images_a.drop(["source_shard"]).equals(images_b.drop(["source_shard"])), split
        assert store.read_texts(a, split).equals(store.read_texts(b, split)), split


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extract_killed_anywhere_resumes_to_the_clean_tables_and_leaves_nothing_behind(extract_setup, tmp_path, seed):
    out = tmp_path / "features"
    args = ["extract", "--params", str(extract_setup["params"]), "--out-dir", str(out)]
    # seed 0: after the first part, with the decoding workers running
    kill_seeded(dsmd(args, tmp_path), seed, lambda: any(out.glob("*/_parts/skips-*.json")), extract_setup["seconds"])
    code, output = finish(dsmd(args, tmp_path))
    assert code == 0, output
    assert_same_tables(out, extract_setup["clean"])
    assert not temporaries(out)


def test_a_full_disk_is_one_error_line_naming_the_file_and_a_later_run_finishes(extract_setup, tmp_path):
    out = tmp_path / "features"
    args = ["extract", "--params", str(extract_setup["params"]), "--out-dir", str(out)]
    # the limit applies to the shared memory DataLoader workers hand batches through, which a full
    # disk does not touch: decode in the main process here
    error = the_error_line(*finish(dsmd(args + ["--num-workers", "0"], tmp_path, file_size_limit=8 << 10), timeout=120))
    assert str(out) in error and "File too large" in error
    code, output = finish(dsmd(args, tmp_path))
    assert code == 0, output
    assert_same_tables(out, extract_setup["clean"])
    assert not temporaries(out)


def _extract_cfg(setup: dict, out: Path, splits=("train", "test")) -> tuple[ExtractConfig, TeacherConfig]:
    cfg = ExtractConfig(manifest=str(setup["manifest"]), out_dir=str(out), splits=list(splits), batch_size=8,
                        num_workers=0, threads=1)
    return cfg, TeacherConfig(model=TEACHER, pretrained=str(setup["checkpoint"]))


def test_a_restored_shard_is_read_again_and_only_it(extract_setup, tmp_path, caplog):
    corpus = tmp_path / "corpus"
    shutil.copytree(extract_setup["manifest"].parent, corpus)
    shard = corpus / "train-000001.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated: the second half of its samples is lost
    setup = {**extract_setup, "manifest": corpus / "manifest.yaml"}
    cfg, teacher = _extract_cfg(setup, tmp_path / "features")
    damaged = extract_mod.extract(cfg, teacher)["train"]
    assert damaged["skipped"]["counts"]["unreadable_shard"] == 1
    assert damaged["num_images"] < 60

    shard.write_bytes(original)
    caplog.clear()
    restored = extract_mod.extract(cfg, teacher)["train"]
    assert restored["num_images"] == 60 and not restored["skipped"]["counts"]
    assert_same_tables(tmp_path / "features", extract_setup["clean"])
    redone = [r.getMessage() for r in caplog.records if "re-reading" in r.getMessage()]
    assert len(redone) == 1 and "train-000001.tar" in redone[0]

    os.utime(corpus / "train-000002.tar", ns=(0, 0))  # a shard that changed since (its mtime): redone too
    caplog.clear()
    extract_mod.extract(cfg, teacher)
    assert [r.getMessage() for r in caplog.records if "re-reading" in r.getMessage()][0].count("train-000002") == 1
    assert_same_tables(tmp_path / "features", extract_setup["clean"])
    caplog.clear()
    extract_mod.extract(cfg, teacher)  # and now nothing to do
    assert not [r for r in caplog.records if "re-reading" in r.getMessage()]


def test_the_same_checkpoint_by_a_relative_path_is_the_same_teacher(extract_setup, tmp_path, monkeypatch):
    cfg, teacher = _extract_cfg(extract_setup, tmp_path / "features", splits=["test"])
    extract_mod.extract(cfg, teacher)
    monkeypatch.chdir(extract_setup["checkpoint"].parent)
    relative = TeacherConfig(model=TEACHER, pretrained=extract_setup["checkpoint"].name)
    assert extract_mod.extract(cfg, relative)["test"]["num_images"] == 60


def test_a_split_missing_from_the_manifest_fails_before_any_split_is_extracted(extract_setup, tmp_path):
    cfg, teacher = _extract_cfg(extract_setup, tmp_path / "features", splits=["train", "validation"])
    with pytest.raises(PipelineError, match="validation"):
        extract_mod.extract(cfg, teacher)
    assert not (tmp_path / "features" / "train").exists()


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".checkpoint.pt.tmp-{dead.pid}", tmp_path / "a" / f".images-000000.parquet.tmp-{atomic._HOST}-{dead.pid}"]
    live = [tmp_path / f".texts-000000.parquet.tmp-{atomic._HOST}-{os.getpid()}",
            tmp_path / f".texts-000001.parquet.tmp-otherhost-{dead.pid}"]  # another host's: not ours to judge
    for path in stale + live:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    atomic.prepare_output_dir(tmp_path)
    assert [p.exists() for p in stale] == [False, False]
    assert [p.exists() for p in live] == [True, True]


def test_an_unwritable_output_folder_fails_before_evaluation_does_any_work(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the metrics folder should be")
    cfg = EvaluateConfig(features_dir=str(tmp_path / "no-features"), metrics_file=str(blocker / "metrics.json"),
                         plots_dir=str(tmp_path / "plots"), report_dir=str(tmp_path / "report"), students={})
    with pytest.raises(atomic.OutputError, match="outputs is a file"):
        evaluate.evaluate(cfg)


# ---- train -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_fake_features(root / "features", "train", n_images=64, captions_per_image=2, dim=32, seed=0)
    write_negatives(root / "features", root / "negatives", k=4)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {
        "model": STUDENT, "features_dir": str(root / "features"), "negatives_dir": str(root / "negatives"),
        "distill": {"queue_size": 48},
        "optim": {"max_steps": 24, "batch_size": 16, "lr": 0.003, "warmup_steps": 3, "threads": 1, "num_workers": 1,
                  "checkpoint_every": 3, "log_every": 1},
    }}))
    started = time.monotonic()
    code, out = finish(dsmd(["train", "--params", str(params), "--out-dir", str(root / "clean")], root))
    assert code == 0, out
    return {"root": root, "params": params, "clean": root / "clean", "seconds": time.monotonic() - started}


def assert_same_student(a: Path, b: Path) -> None:
    x = torch.load(a / names.CHECKPOINT_FILE, weights_only=True)
    y = torch.load(b / names.CHECKPOINT_FILE, weights_only=True)
    for key in x["model"]:
        torch.testing.assert_close(x["model"][key], y["model"][key], rtol=0, atol=1e-6)
    steps = [[line for line in (d / names.TRAIN_LOG_FILE).read_text().splitlines()] for d in (a, b)]
    assert len(steps[0]) == len(steps[1]) == 24


@pytest.mark.parametrize("seed", [0, 1])
def test_train_killed_anywhere_resumes_to_the_clean_student_and_leaves_nothing_behind(train_setup, tmp_path, seed):
    out = tmp_path / "student"
    args = ["train", "--params", str(train_setup["params"]), "--out-dir", str(out), "--resume"]
    # seed 0: after the first checkpoint, with the loader worker running
    kill_seeded(dsmd(args, tmp_path), seed, lambda: (out / names.CHECKPOINT_FILE).exists(), train_setup["seconds"])
    code, output = finish(dsmd(args, tmp_path))
    assert code == 0, output
    assert_same_student(out, train_setup["clean"])
    assert not temporaries(out)


def test_train_on_a_full_disk_is_one_error_line_and_resume_finishes(train_setup, tmp_path):
    out = tmp_path / "student"
    args = ["train", "--params", str(train_setup["params"]), "--out-dir", str(out), "--resume"]
    limited = args + ["--set", "optim.num_workers=0"]  # (shared memory, as in the extract case)
    error = the_error_line(*finish(dsmd(limited, tmp_path, file_size_limit=64 << 10), timeout=120))  # < a checkpoint
    assert f"cannot write {out}" in error
    code, output = finish(dsmd(args, tmp_path))
    assert code == 0, output
    assert_same_student(out, train_setup["clean"])
    assert not temporaries(out)


# ---- bad options and files: one `error:` line, exit 2, before any work --------------------------

def _pickle_payload(path: Path) -> Path:
    """What a malicious checkpoint looks like: a pickle that would run code when unpickled."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    path.write_bytes(pickle.dumps(Payload()))
    return path


@pytest.mark.parametrize("stage, options, message", [
    ("train", ["--lr", "-1"], "optim.lr must be > 0"),
    ("train", ["--epochs", "-1"], "optim.epochs must be >= 0"),
    ("extract", ["--batch-size", "-1"], "extract.batch_size must be >= 1"),
    ("extract", ["--teacher-pretrained", "{payload}"], "not a weights file"),
    ("evaluate", ["--student", "bad={student}"], "not a weights file"),
])
def test_bad_options_and_files_are_one_error_line(train_setup, extract_setup, tmp_path, stage, options, message):
    payload = _pickle_payload(tmp_path / "teacher.bin")
    student = tmp_path / "student"
    student.mkdir()
    (student / names.OPEN_CLIP_CONFIG).write_text('{"model_name": "%s"}' % STUDENT)
    _pickle_payload(student / names.WEIGHTS_FILE)
    params = {"train": train_setup["params"], "extract": extract_setup["params"]}.get(stage, extract_setup["params"])
    args = [o.format(payload=payload, student=student) for o in options]
    extra = ["--features-dir", str(extract_setup["clean"])] if stage == "evaluate" else []
    error = the_error_line(*finish(dsmd([stage, "--params", str(params), "--out-dir" if stage != "evaluate" else "--plots-dir",
                                         str(tmp_path / "out"), *extra, *args], tmp_path)))
    assert message in error
    if "weights" in message:
        assert str(tmp_path) in error  # the file is named
    assert not (tmp_path / "PWNED").exists()  # nothing was unpickled
    assert not temporaries(tmp_path)


# ---- one writer per output folder ----------------------------------------------------------------

def _only_one_wins(args: list[str], cwd: Path, folder: Path) -> str:
    """Two runs into one folder at once: the first is paused once it holds the folder (mid-run for sure, however
    loaded the machine), the second must refuse in one line naming it; then the first finishes."""
    first = dsmd(args, cwd)
    deadline = time.monotonic() + 120
    while not locking.lock_path(folder).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        code, output = finish(dsmd(args, cwd))
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    line = the_error_line(code, output)
    assert f"is being written by pid {first.pid}" in line and "wait for it to finish" in line, line
    code, output = finish(first)
    assert code == 0, output
    return line


def test_two_extracts_into_one_folder_one_refuses_and_the_other_equals_a_lone_run(extract_setup, tmp_path):
    out = tmp_path / "features"
    args = ["extract", "--params", str(extract_setup["params"]), "--out-dir", str(out)]
    _only_one_wins(args, tmp_path, out)
    assert_same_tables(out, extract_setup["clean"])
    assert not list(out.rglob("_parts")) and not temporaries(out)
    assert not locking.lock_path(out).exists()


def test_two_trainings_into_one_folder_one_refuses_and_the_other_equals_a_lone_run(train_setup, tmp_path):
    out = tmp_path / "student"
    args = ["train", "--params", str(train_setup["params"]), "--out-dir", str(out)]
    _only_one_wins(args, tmp_path, out)
    assert_same_student(out, train_setup["clean"])
    assert not temporaries(out) and not locking.lock_path(out).exists()


def _write_lock(folder: Path, host: str, pid: int) -> None:
    path = locking.lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-12-01T00:00:00", "command": "dsmd mine"}))


def test_a_lock_is_never_seen_without_its_holder(tmp_path, monkeypatch):
    """The lock appears already naming its holder (a run that read it between create and write once reported
    "pid None"); the loser of a race leaves nothing behind."""
    folder = tmp_path / "features"
    seen = []
    real_link = os.link

    def link_and_look(source, target):
        real_link(source, target)
        seen.append(json.loads(Path(target).read_text()))  # what any other run reads from the first instant

    monkeypatch.setattr(locking.os, "link", link_and_look)
    path = locking.acquire(folder)
    assert seen == [json.loads(path.read_text())] and seen[0]["pid"] == os.getpid()
    monkeypatch.setattr(locking.os, "link", real_link)
    _write_lock(folder, socket.gethostname(), os.getppid())  # a live holder: the next taker loses the race
    with pytest.raises(locking.LockError, match=f"pid {os.getppid()}"):
        locking.acquire(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.lock"]  # no holder file of the loser left


def test_mine_refuses_a_live_holder_takes_over_a_dead_one_and_breaks_another_hosts_lock_only_when_told(tmp_path):
    write_fake_features(tmp_path / "features", "train", n_images=40, captions_per_image=2, dim=16, seed=0)
    out = tmp_path / "negatives"
    args = ["mine", "--features-dir", str(tmp_path / "features"), "--out-dir", str(out), "--k", "4", "--threads", "1"]
    here = socket.gethostname()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(out, here, holder.pid)
        line = the_error_line(*finish(dsmd(args, tmp_path)))
        assert f"is being written by pid {holder.pid} on {here}" in line
        assert not out.exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (-9 leaves its lock): taken over with a warning, and released at the end
    code, output = finish(dsmd(args, tmp_path))
    assert code == 0 and "taking over the lock" in output and "its process is gone" in output, output
    assert (out / "train").is_dir() and not locking.lock_path(out).exists()
    # another host's lock cannot be checked from here: refused, unless --break-lock
    _write_lock(out, "another-host", 1)
    line = the_error_line(*finish(dsmd(args, tmp_path)))
    assert "on another-host" in line and "--break-lock" in line
    code, output = finish(dsmd(args + ["--break-lock"], tmp_path))
    assert code == 0, output
    assert not locking.lock_path(out).exists()


# ---- a killed export or evaluation leaves nothing a user could mistake for a result -------------------

@pytest.fixture(scope="module")
def export_setup(tmp_path_factory):
    from tests.test_export import train_student_with_metrics
    root = train_student_with_metrics(tmp_path_factory.mktemp("export-faults"))
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"export": {
        "student": "tiny", "student_dir": str(root / "student"), "features_dir": str(root / "features"), "split": "train",
        "metrics_file": str(root / "metrics.json"), "check_images": 8}}))
    started = time.monotonic()
    code, out = finish(dsmd(["export", "--params", str(params), "--out-dir", str(root / "clean")], root))
    assert code == 0, out
    return {"root": root, "params": params, "clean": root / "clean", "seconds": time.monotonic() - started}


EXPORT_FILES = {names.SAFETENSORS_FILE, names.OPEN_CLIP_CONFIG, names.IMAGE_ONNX, names.TEXT_ONNX, names.MODEL_CARD,
                names.EXPORT_REPORT}


@pytest.mark.parametrize("seed", [0, 1])
def test_export_killed_anywhere_leaves_no_half_written_model_folder(export_setup, tmp_path, seed):
    out = tmp_path / "export"
    args = ["export", "--params", str(export_setup["params"]), "--out-dir", str(out)]
    staging = atomic.staging_dir(out)
    # seed 0: once the weights are written, before the ONNX towers and the card
    kill_seeded(dsmd(args, tmp_path), seed, lambda: (staging / names.SAFETENSORS_FILE).exists(), export_setup["seconds"])
    # what `local-dir:` would find: nothing, or a whole checked export
    assert not out.exists() or {p.name for p in out.iterdir()} == EXPORT_FILES
    code, output = finish(dsmd(args, tmp_path))
    assert code == 0, output
    assert {p.name for p in out.iterdir()} == EXPORT_FILES and not staging.exists()
    assert json.loads((out / names.EXPORT_REPORT).read_text()) == json.loads((export_setup["clean"] / names.EXPORT_REPORT).read_text())


@pytest.mark.parametrize("seed", [0])
def test_evaluate_killed_anywhere_leaves_whole_outputs_and_a_rerun_equals_a_clean_one(tmp_path, seed):
    from tests.test_evaluation import save_student, write_teacher_manifest_identity
    write_fake_features(tmp_path / "features", "test", n_images=24, captions_per_image=3, dim=32)
    write_teacher_manifest_identity(tmp_path / "features", "test", TEACHER)
    save_student(tmp_path / "students" / "dsmd", seed=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {
        "features_dir": str(tmp_path / "features"), "teacher_dir": str(tmp_path / "teacher"), "students": {"dsmd": str(tmp_path / "students" / "dsmd")},
        "latency_repeats": 2, "throughput_batch": 8, "throughput_repeats": 1, "threads": 1, "device": "cpu",
        "metrics_file": str(tmp_path / "out" / "metrics.json"), "plots_dir": str(tmp_path / "out" / "plots"),
        "report_dir": str(tmp_path / "out" / "report")}}))
    started = time.monotonic()
    code, output = finish(dsmd(["evaluate", "--params", str(params)], tmp_path))
    assert code == 0, output
    clean = json.loads((tmp_path / "out" / "metrics.json").read_text())
    shutil.rmtree(tmp_path / "out")
    # seed 0: once the plots are written, while the report is being made
    kill_seeded(dsmd(["evaluate", "--params", str(params)], tmp_path), seed,
                lambda: (tmp_path / "out" / "plots" / names.CURVES_PLOT).exists(), time.monotonic() - started)
    report = tmp_path / "out" / "report"
    assert not report.exists() or (report / names.REPORT_FILE).exists()  # no page without its thumbnails, or half of one
    metrics = tmp_path / "out" / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text())["students"]["dsmd"]["rsum"] == clean["students"]["dsmd"]["rsum"]
    code, output = finish(dsmd(["evaluate", "--params", str(params)], tmp_path))
    assert code == 0, output
    again = json.loads(metrics.read_text())
    for model in ("teacher", "dsmd"):
        got, want = (m["teacher"] if model == "teacher" else m["students"]["dsmd"] for m in (again, clean))
        timing = lambda k: k == "cost" or k.endswith(("time_ratio", "latency_ratio"))  # noqa: E731 (measured each run)
        assert {k: v for k, v in got.items() if not timing(k)} == {k: v for k, v in want.items() if not timing(k)}
    assert not temporaries(tmp_path / "out") and not atomic.staging_dir(report).exists()
