"""dvc.yaml lists exactly the code each stage runs: the pipeline modules its CLI imports, transitively
(every import statement, including those inside functions), and nothing else."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def _module_file(dotted: str) -> str | None:
    """pipeline/a/b.py for `pipeline.a.b`, None for a package (its __init__.py holds only a docstring:
    test_package_inits_hold_no_code) or a name that is not a module."""
    path = REPO.joinpath(*dotted.split(".")).with_suffix(".py")
    return str(path.relative_to(REPO)) if path.exists() else None


def _imported_pipeline_modules(path: Path) -> set[str]:
    """pipeline/.../<name>.py of every pipeline module the file imports, at any depth of the code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(_module_file(node.module))
            found.update(_module_file(f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(_module_file(a.name) for a in node.names if a.name.startswith("pipeline."))
    return found - {None}


def code_closure(stage_module: Path) -> set[str]:
    """pipeline/.../<name>.py of every module reachable from the stage's CLI module."""
    seen, todo = set(), set(_imported_pipeline_modules(stage_module))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= _imported_pipeline_modules(REPO / name)
    return seen


def test_package_inits_hold_no_code():
    """dvc.yaml lists modules, not packages: an __init__.py that ran code would be a dependency no stage lists."""
    for init in (REPO / "pipeline").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) or
                   (isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)) for n in body), init


def test_every_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: its template
        cli = re.match(r"dsmd (\w+)", stage["cmd"]).group(1)
        expected = code_closure(REPO / "stages" / f"{cli}.py")
        listed = {d for d in stage["deps"] if d.startswith("pipeline/") and d.endswith(".py")}
        assert listed == expected, (name, "missing", sorted(expected - listed), "extra", sorted(listed - expected))
        uses_models = "pipeline/models.py" in expected
        assert ("pipeline/model_configs" in stage["deps"]) == uses_models, name
        stage_two = name not in STAGE_ONE
        assert ("pipeline/student_configs" in stage["deps"]) == (uses_models and stage_two), name


def test_closure_follows_imports_inside_functions():
    closure = code_closure(REPO / "stages" / "train.py")
    assert "pipeline/corpus/reader.py" in closure  # data.load_corpus_data imports it inside the function
    assert "pipeline/training/loop.py" in closure and "pipeline/features/extract.py" not in closure


STAGE_ONE = ("corpus", "teacher", "extract", "extract_teacher", "mine")

# Stage one (the teacher pass, paid once) may depend only on what determines its outputs: an edit to the
# training, evaluation or export code must never make DVC re-run it.
NOT_STAGE_ONE = ("pipeline/training/", "pipeline/evaluation/", "pipeline/export.py", "pipeline/plan.py",
                 "pipeline/common/params.py")


def _stage_two(paths: set[str]) -> set[str]:
    return {p for p in paths if p.startswith(NOT_STAGE_ONE)}


def test_stage_one_never_depends_on_training_evaluation_or_export_code():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in STAGE_ONE:
        stage = stages[name].get("do", stages[name])
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        assert not _stage_two(listed), (name, sorted(_stage_two(listed)))
        cli = re.match(r"dsmd (\w+)", stage["cmd"]).group(1)
        assert not _stage_two(code_closure(REPO / "stages" / f"{cli}.py")), name


def test_each_added_teacher_is_a_stage_of_its_own_that_the_students_wait_for():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stage = stages["extract_teacher"]
    assert stage["foreach"] == "${teachers}" and "--teacher ${key}" in stage["do"]["cmd"]
    assert stage["do"]["params"] == ["teachers.${key}", "extract"]  # another teacher's entry never re-runs it
    assert stage["do"]["outs"] == ["${extract.teachers_dir}/${key}"]
    # the students depend on the folder that holds every added teacher and the teacher's identity, so it exists
    # with no added teacher too (a missing dependency fails `dvc repro`)
    assert "${extract.teachers_dir}" in stages["train"]["do"]["deps"]
    # stage one never waits for the added teachers as a whole: adding one re-runs neither extract nor mine
    assert not any(d.startswith("${extract.teachers_dir}") for name in ("extract", "mine") for d in stages[name]["deps"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Path(params["teacher"]["out_dir"]).parent == Path(params["extract"]["teachers_dir"])


def test_each_student_is_a_stage_that_tracks_only_the_shared_section_and_its_own_entry():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert stage["foreach"] == "${students}"
    assert stage["do"]["params"] == ["train", "students.${key}"]
    assert "--student ${key}" in stage["do"]["cmd"]
    # what only the DSMD student reads lives in its own entry, so that an edit there never re-runs the others
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    shared = set(params["train"])
    assert not shared & {"distill", "negatives_dir", "batching", "projection_init", "loss", "out_dir"}, shared
    # the baseline holds nothing of distillation: its loss, its own tuned schedule and whether it reads the views
    baseline = params["students"]["baseline"]
    assert baseline["loss"] == "clip" and set(baseline) <= {"loss", "optim", "use_views"}, baseline


def _sections(hint: object) -> set[type]:
    """The dataclass a type hint names (also as the values of a map) and every one its fields hold, at any depth."""
    found = set()
    for inner in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(inner):
            found.add(inner)
            for field_hint in typing.get_type_hints(inner).values():
                found |= _sections(field_hint)
    return found


def test_no_option_stage_one_never_reads_is_declared_in_code_stage_one_depends_on():
    """Every stage one stage lists the module of its own sections: an option of pretrain, train, students, evaluate
    or export declared there (as init_seed once was) made `dvc repro` re-run the teacher pass when it was added."""
    from pipeline.common.config import StageOneParams
    from pipeline.common.params import Params

    stage_one_code = set().union(*(code_closure(REPO / "stages" / f"{cli}.py") for cli in ("corpus", "teacher", "extract", "mine")))
    assert "pipeline/common/config.py" in stage_one_code  # the probe works
    later = set().union(*(_sections(hint) for name, hint in typing.get_type_hints(Params).items()
                          if name not in {f.name for f in dataclasses.fields(StageOneParams)})) - _sections(StageOneParams)
    assert {"TrainConfig", "OptimConfig", "EvaluateConfig", "ExportConfig", "PretrainConfig"} <= {c.__name__ for c in later}
    for section in later:
        where = str(Path(inspect.getsourcefile(section)).relative_to(REPO))
        assert where not in stage_one_code, (section.__name__, where)
