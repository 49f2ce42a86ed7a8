"""The shape of the house: the folders follow the data flow, and stage one never reaches stage two's code."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE_TWO = ("pipeline.training", "pipeline.evaluation", "pipeline.export", "pipeline.plan", "pipeline.common.params")


def _pipeline_modules_imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('pipeline')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_stage_one_does_not_import_training_or_evaluation_at_run_time():
    for module in ("pipeline.features.extract", "pipeline.mining.negatives", "pipeline.features.teacher",
                   "stages.extract", "stages.mine", "stages.teacher", "stages.corpus"):
        imported = _pipeline_modules_imported_by(module)
        assert "pipeline.common.config" in imported, module  # the probe itself works
        stage_two = {m for m in imported if m.startswith(STAGE_TWO)}
        assert not stage_two, (module, sorted(stage_two))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_folders_follow_the_data_flow():
    """What each folder may import from the others (statements anywhere in the file, also inside functions):
    common/ nothing; corpus/ only common/; features/ and mining/ never training/ or evaluation/;
    evaluation/ never training/."""
    forbidden = {
        "common": ("pipeline.corpus", "pipeline.features", "pipeline.mining", "pipeline.training",
                   "pipeline.evaluation", "pipeline.models", "pipeline.export", "pipeline.plan"),
        "corpus": ("pipeline.features", "pipeline.mining", "pipeline.training", "pipeline.evaluation",
                   "pipeline.models", "pipeline.export", "pipeline.plan", "pipeline.common.params"),
        "features": STAGE_TWO + ("pipeline.mining",),
        "mining": STAGE_TWO,
        "evaluation": ("pipeline.training", "pipeline.export", "pipeline.plan"),
    }
    for folder, banned in forbidden.items():
        files = sorted((REPO / "pipeline" / folder).glob("*.py"))
        assert files, folder
        for path in files:
            bad = {m for m in _imports(path) if m.startswith(banned)}
            assert not bad, (str(path.relative_to(REPO)), sorted(bad))


def _modules_after_console(argv: list[str]) -> tuple[str, set[str]]:
    """What `dsmd <argv>` prints and which modules it has imported by the time it exits."""
    code = ("import sys\nfrom stages.cli import main\nsys.argv = ['dsmd', *sys.argv[1:]]\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint('MODULES', ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO).stdout
    head, _, modules = out.rpartition("MODULES ")
    return head, set(modules.split())


def test_the_console_imports_only_the_stage_it_runs():
    """`dsmd <stage>` builds that stage's command alone: stage one's commands never import stage two's code, and
    corpus and mine start without torch; `dsmd --help` still lists every stage."""
    for stage in ("corpus", "teacher", "extract", "mine"):
        shown, modules = _modules_after_console([stage, "--help"])
        assert f"dsmd {stage}" in shown and "--params" in shown, stage
        assert not {m for m in modules if m.startswith(STAGE_TWO)}, stage
        assert ("torch" in modules) == (stage in ("teacher", "extract")), stage
    shown, modules = _modules_after_console(["--help"])
    assert all(stage in shown for stage in ("corpus", "extract", "train", "evaluate", "export")) and "pipeline.training.loop" in modules
