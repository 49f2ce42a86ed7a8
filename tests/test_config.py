"""params.yaml -> typed config: OmegaConf's typed merge, refusals that name the key, and help generated
from the one description of each option."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.common import config
from pipeline.common import params as full
from pipeline.common.config import ConfigError
from pipeline.common.params import load_params, Params, stage_config, TrainConfig


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("train:\n  optim:\n    lrr: 0.1\n", "train.optim.lrr: unknown key"),
    ("train:\n  optim:\n    max_steps: 1.5\n", "train.optim.max_steps: Value '1.5' of type 'float' could not be converted to Integer"),
    ("train:\n  loss: kd\n", "train.loss: Invalid value 'kd', expected one of [dsmd, clip]"),
    ("mine:\n  index: annoy\n", "mine.index: Invalid value 'annoy', expected one of [auto, flat, ivf, hnsw, ivfpq]"),
    ("train:\n  distill:\n    balancer:\n      mode: loose\n", "train.distill.balancer.mode: Invalid value 'loose'"),
    ("evaluate:\n  ks: [1, five]\n", "evaluate.ks[1]"),
    ("trian:\n  loss: clip\n", "trian: unknown key"),
    ("train:\n  optim: 3\n", "train.optim must be a mapping, got 3"),
    ("extract:\n  splits: train\n", "extract.splits must be a list, got 'train'"),
])
def test_a_bad_params_file_is_refused_at_load_naming_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_stage_one_reads_its_own_sections_and_leaves_the_rest_to_stage_two(tmp_path):
    """Stage one builds only corpus, teacher, teachers, extract and mine (it never imports the module that types
    the rest, tests/test_dvc_deps.py): a bad training key is stage two's error, a misspelt section is everyone's."""
    path = write(tmp_path, "extract:\n  views: 2\ntrain:\n  optim:\n    lrr: 0.1\n")
    read = config.read_params(path)
    assert type(read) is config.StageOneParams and read.extract.views == 2 and not hasattr(read, "train")
    with pytest.raises(ConfigError, match="train.optim.lrr: unknown key"):
        load_params(path)
    with pytest.raises(ConfigError, match="trian: unknown key"):
        config.read_params(write(tmp_path, "trian:\n  loss: clip\n"))
    assert config.stage_config(write(tmp_path, "mine:\n  k: 3\n"), "mine", {}).k == 3
    with pytest.raises(AttributeError):  # stage one cannot even name a training section
        config.stage_config(path, "train", {})
    old_layout = write(tmp_path, "teacher:\n  pretrain:\n    world_images: 10\n")
    for read in (config.read_params, load_params):  # a params file of the old layout says where the keys went
        with pytest.raises(ConfigError, match="teacher.pretrain: moved to a section of its own, `pretrain:`"):
            read(old_layout)


def test_params_then_set_then_cli_options_each_override_the_one_before(tmp_path):
    path = write(tmp_path, "train:\n  batching: hard-negative-aware\n  optim:\n    lr: 0.5\n    epochs: 3\n")
    cfg = stage_config(path, "train", {"optim.epochs": None, "loss": "clip"}, ["optim.lr=0.25", "optim.epochs=4"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.loss, cfg.batching) == (0.25, 4.0, "clip", "hard-negative-aware")
    assert type(cfg.batching) is str and cfg.optim.warmup_steps == OptimDefaults.warmup_steps  # checked, kept plain
    assert stage_config(path, "train", {}, ["live_dir="]).live_dir == ""  # an empty --set value is ""
    for bad in (["optim.nope=1"], ["loss=kd"], ["optim.lr"]):
        with pytest.raises(ConfigError, match="optim.nope: unknown key|train.loss: Invalid value|KEY=VALUE"):
            stage_config(path, "train", {}, bad)


OptimDefaults = full.OptimConfig()


def test_modes_given_as_strings_by_code_are_checked_on_construction():
    assert TrainConfig(loss="clip").loss == full.LossMode.clip and type(TrainConfig().loss) is str
    with pytest.raises(ConfigError, match=r"TrainConfig.batching: invalid value 'hna', expected one of \['random', 'hard-negative-aware'\]"):
        TrainConfig(batching="hna")


def test_to_dict_is_plain_data_equal_to_what_was_loaded(tmp_path):
    path = write(tmp_path, "train:\n  batching: hard-negative-aware\n")
    data = config.to_dict(load_params(path).train)
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # no enum objects: safe_dump would refuse them
    assert data["batching"] == "hard-negative-aware" and json.loads(json.dumps(data)) == data
    assert config.from_dict(TrainConfig, data) == load_params(path).train


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _keys(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Params)
                                     if f.name not in ("students", "teachers")])  # train's keys; extract's, below
def test_every_option_has_one_description_and_the_stage_help_lists_it(section):
    from stages.cli import app
    cls = typing.get_type_hints(Params)[section]
    keys = dict(_keys(cls))
    assert all(f.metadata.get("doc") for f in keys.values()), [k for k, f in keys.items() if not f.metadata.get("doc")]
    result = CliRunner().invoke(app, [section, "--help"], terminal_width=400)
    assert result.exit_code == 0
    listed = {line.split(" = ")[0].strip(" │") for line in result.output.splitlines() if " = " in line}
    assert set(keys) <= listed, sorted(set(keys) - listed)


def test_extract_help_lists_the_keys_of_an_added_teacher():
    from stages.cli import app
    result = CliRunner().invoke(app, ["extract", "--help"], terminal_width=400)
    listed = {line.split(" = ")[0].strip(" │") for line in result.output.splitlines() if " = " in line}
    assert {"<name>.model", "<name>.pretrained", "teachers_dir"} <= listed and "--teacher" in result.output


def test_a_student_is_the_train_section_with_its_own_entry_applied(tmp_path):
    from pipeline.common.config import ConfigError
    from pipeline.common.params import load_params
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  optim: {lr: 0.003}\n  distill: {margin: 0.1}\n"
                      "students:\n  small: {loss: clip}\n  kd: {loss: dsmd, distill: {balancer: {mode: dynamic}}}\n")
    loaded = load_params(params)
    kd = loaded.student("kd")
    # the entry overrides single keys: the rest of the section (and of distill) stays the shared one
    assert (kd.loss, kd.distill.balancer.mode, kd.distill.margin, kd.optim.lr) == ("dsmd", "dynamic", 0.1, 0.003)
    assert stage_config(params, "train", {"optim.lr": 0.01}, None, student="small").optim.lr == 0.01
    assert loaded.evaluate.students == {"small": "outputs/students/small", "kd": "outputs/students/kd"}
    with pytest.raises(ConfigError, match=r"students.nope: no such student; the students section declares \['kd', 'small'\]"):
        loaded.student("nope")
    params.write_text("students:\n  small: {loss: kd}\n")
    with pytest.raises(ConfigError, match="students.small.loss: Invalid value 'kd'"):
        load_params(params)
    params.write_text("students:\n  small: {optim: {nope: 1}}\n")
    with pytest.raises(ConfigError, match="students.small.optim.nope: unknown key"):
        load_params(params)


def _ranged_fields():
    for cls in (config.CorpusConfig, full.OptimConfig, full.PretrainConfig, config.ExtractConfig, config.MineConfig,
                full.BalancerConfig, full.DistillConfig, full.TrainConfig, full.EvaluateConfig, full.ExportConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("range"):
                yield cls, f, hints[f.name]


def test_every_range_is_checked_once_by_the_config_on_construction():
    """Each bound refuses the value just past it (naming the params key) and accepts the bound itself when inclusive."""
    checked = 0
    for cls, f, hint in _ranged_fields():
        step = 1 if hint is int or typing.get_args(hint) == (int, type(None)) else 0.5
        for kind, bound in f.metadata["range"].items():
            outside = {"at_least": bound - step, "above": bound, "at_most": bound + step, "below": bound}[kind]
            with pytest.raises(ConfigError, match=rf"^{cls.KEY}\.{f.name} must be .*, got {outside!r}$"):
                cls(**{f.name: outside})
            if kind in ("at_least", "at_most"):
                assert getattr(cls(**{f.name: bound}), f.name) == bound
            checked += 1
    assert checked > 50


def test_an_out_of_range_value_in_params_is_refused_at_load_naming_the_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  optim:\n    lr: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: optim.lr must be > 0, got 0.0$"):
        load_params(path)
    path = write(tmp_path, "students:\n  small:\n    distill:\n      balancer:\n        task_share: 1.0\n")
    with pytest.raises(ConfigError, match=r"balancer.task_share must be in \[0, 1\), got 1.0"):
        load_params(path)
    with pytest.raises(ConfigError, match=r"extract.verify_min_cosine must be in \(0, 1\], got 0.0"):
        stage_config(None, "extract", {"verify_min_cosine": 0.0})


def test_the_help_states_each_range():
    assert "(>= 1)" in config.section_help("extract") and "in (0, 1]" in config.section_help("extract")
    assert config.option_help("extract", "batch_size").endswith("; >= 1 (params: extract.batch_size)")


def test_each_cli_option_is_generated_from_its_one_declaration():
    """No stage writes a config option out by hand: each comes from config_options, with the key's type and help."""
    import ast
    from pathlib import Path
    stages = Path(__file__).resolve().parent.parent / "stages"
    for path in (p for p in stages.glob("*.py") if p.name != "_common.py"):  # _common.py is the generator
        calls = {node.func.id for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert "option_help" not in calls, f"{path.name} declares a config option by hand"
    import typer.main

    from stages.cli import app
    commands = typer.main.get_command(app).commands
    extract = {p.opts[0]: p for p in commands["extract"].params}
    assert extract["--batch-size"].help == config.option_help("extract", "batch_size")  # the key's one description
    assert extract["--precision"].type_descriptor.annotation is config.Precision  # a mode lists its choices
    assert extract["--split"].multiple and extract["--teacher-model"].help == config.option_help("teacher", "model")
    assert "--no-onnx" in {p.opts[0]: p for p in commands["export"].params}["--onnx"].secondary_opts


def test_a_generated_option_reaches_the_config_and_is_checked_there(tmp_path, monkeypatch):
    """`--lr` sets train.optim.lr (over --set), a repeatable option gives a list, an unused one leaves params alone."""
    import typer

    from stages._common import config_options
    seen = {}
    app = typer.Typer()

    @app.command()
    @config_options(Params, train=["optim.lr", "loss"], extract=["splits:split", "zeroshot"])
    def main(options: dict = None) -> None:
        seen.update(options)

    runner = CliRunner()
    assert runner.invoke(app, ["--lr", "0.01", "--split", "a", "--split", "b", "--no-zeroshot"]).exit_code == 0
    assert seen == {"train": {"optim.lr": 0.01, "loss": None}, "extract": {"splits": ["a", "b"], "zeroshot": False}}
    assert stage_config(None, "train", seen["train"], ["optim.lr=0.5"]).optim.lr == 0.01
    assert runner.invoke(app, []).exit_code == 0
    assert seen == {"train": {"optim.lr": None, "loss": None}, "extract": {"splits": None, "zeroshot": None}}
    refused = runner.invoke(app, ["--loss", "kd"])
    assert refused.exit_code == 2 and "'kd' is not one of 'dsmd', 'clip'" in refused.output
    with pytest.raises(ConfigError, match=r"^train.optim.lr must be > 0, got -1.0$|optim.lr must be > 0"):
        stage_config(None, "train", {"optim.lr": -1.0})


def test_help_shows_the_defaults_a_section_is_made_with():
    """pretrain.optim is made by its own factory (batch 256, lr 0.004): --help shows those, not OptimConfig()'s."""
    pretrain, train = full.section_help("pretrain"), full.section_help("train")
    made = full.PretrainConfig().optim
    assert f"optim.lr = {made.lr!r}:" in pretrain and f"optim.batch_size = {made.batch_size!r}:" in pretrain
    assert f"optim.lr = {full.OptimConfig().lr!r}:" in train and made.lr != full.OptimConfig().lr
