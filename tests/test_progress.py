"""Progress in a piped log: bounded-rate log lines with rate and ETA instead of a disabled bar."""
import logging

from pipeline.common.progress import LogProgress, progress


def test_log_progress_reports_every_tenth_and_the_end(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.common.progress")
    with LogProgress(total=95, desc="train dsmd", unit="step", every_s=3600) as bar:
        for _ in range(95):
            bar.set_postfix(loss="0.5")
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert 9 <= len(lines) <= 11  # each 10% (and the last step), not once per step
    assert lines[-1].startswith("train dsmd: 95/95 step (100%)") and "ETA 0:00" in lines[-1] and "loss=0.5" in lines[-1]
    assert "step/s" in lines[0]


def test_log_progress_also_reports_on_time(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pipeline.common.progress")
    clock = iter(range(0, 10_000, 40))  # every update 40 s later
    monkeypatch.setattr("pipeline.common.progress.time.perf_counter", lambda: next(clock))
    bar = LogProgress(total=1000, desc="extract", unit="img", every_s=30)
    for _ in range(5):
        bar.update(1)  # 0.5% of the work each: only the clock triggers lines
    assert len(caplog.records) == 5


def test_piped_output_gets_log_lines_not_a_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert isinstance(progress(10, "x", "it"), LogProgress)


def test_unknown_total_reports_on_time_only(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pipeline.common.progress")
    clock = iter(range(0, 10_000, 20))
    monkeypatch.setattr("pipeline.common.progress.time.perf_counter", lambda: next(clock))
    bar = LogProgress(total=None, desc="extract train", unit="img", every_s=30)
    for _ in range(6):
        bar.update(100)  # 20 s apart: a line every other update
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["extract train: 200 img", "extract train: 400 img", "extract train: 600 img"]


def test_stage_logging_keeps_pipeline_warnings_and_drops_open_clip_chatter():
    from stages._common import _quiet_open_clip

    def record(name, level, message):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    assert _quiet_open_clip(record("pipeline.corpus.reader", logging.WARNING, "3 sample(s) skipped: corrupt_image"))
    assert _quiet_open_clip(record("pipeline.features.extract", logging.INFO, "resuming: 2 of 5 shards done"))
    assert _quiet_open_clip(record("root", logging.ERROR, "something open_clip considers an error"))
    assert not _quiet_open_clip(record("root", logging.INFO, "Loaded dsmd-tiny-student model config."))
    assert not _quiet_open_clip(record("root", logging.WARNING, "No pretrained weights loaded for model 'x'."))
