"""The house rules, checked on the code (docs/design.md, "Rooms and directions"): imports flow one way
(function-level imports included), the bookkeeping rooms import no torch, no module is over 500 lines, no
private name crosses a module boundary, and every name that moved keeps working for one release with a
DeprecationWarning saying where it went."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import SAFETY_NET

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fgds_engine"


def module_imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package at ``root`` -> the package's modules it imports anywhere in its file (at
    the top or inside a function: both run, sooner or later)."""
    top = root.name
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == top:
                    target = node.module
                else:
                    continue
                for alias in node.names:  # `from . import x` may name a module
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle found in ``graph`` (a -> ... -> a), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import x\n")
    graph = module_imports(pkg)
    assert graph["toy.a"] == {"toy.sub.b"} and graph["toy.sub.b"] == {"toy.a"}
    assert find_cycle(graph) == ["toy.a", "toy.sub.b", "toy.a"]
    (pkg / "sub" / "b.py").write_text("def thing():\n    pass\n")
    assert find_cycle(module_imports(pkg)) is None


def test_the_package_imports_one_way():
    """No import cycle between the package's modules, function-level imports included: the spine runs
    leaves (errors, fields, config) -> engine -> production -> apps -> cli, nothing reaches back up."""
    graph = module_imports(PKG)
    assert "fgds_engine.pipes" in graph["fgds_engine.sampler"]  # not vacuous: the sampler uses the adapters
    assert "fgds_engine.solvers.registry" in graph["fgds_engine.config"]  # function-level imports are seen
    assert find_cycle(graph) is None


LEAVES = ("fgds_engine.errors", "fgds_engine.fields", "fgds_engine.config", "fgds_engine.progress_bars",
          "fgds_engine.deprecation")


def test_the_leaves_import_nothing_above_them():
    """The torch-free leaves import only each other (config's one function-level import, the scheduler
    registry, checks a named scheduler when a config is built)."""
    graph = module_imports(PKG)
    for leaf in LEAVES:
        allowed = set(LEAVES) | ({"fgds_engine.solvers.registry"} if leaf == "fgds_engine.config" else set())
        assert graph[leaf] <= allowed, leaf


def _imported_by(code: str) -> set[str]:
    run = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=SAFETY_NET, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_production_and_the_bookkeeping_rooms_import_no_torch():
    mods = _imported_by("import fgds_engine.production, fgds_engine.plan, fgds_engine.config, "
                        "fgds_engine.options")
    assert "fgds_engine.production.run" in mods  # not vacuous
    assert not {m for m in mods if m.split(".")[0] in ("torch", "diffusers", "transformers")}


def _fgds_imports(*argv: str) -> tuple[str, set[str]]:
    """What ``fgds ARGV`` printed, and the top-level packages and fgds_engine modules it imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "fgds_engine.cli", *argv],
                         capture_output=True, text=True, timeout=SAFETY_NET, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line}


HEAVY = ("torch", "diffusers", "transformers")


def test_fgds_plan_and_status_import_no_torch(tmp_path):
    """``fgds plan`` and ``fgds status`` on a small ImageFolder: their output, and no torch among what they
    imported (the bookkeeping of a 10 M-job folder does not wait for torch)."""
    from PIL import Image

    for c, n in (("cat", 3), ("dog", 1)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    printed, imported = _fgds_imports("plan", str(tmp_path / "data"), str(tmp_path / "out"), "--quiet")
    assert "planned 3 synthetic images to reach 3 per class" in printed  # 2 for dog, 1 at least per class
    assert "fgds_engine.plan" in imported and not {m for m in imported if m.split(".")[0] in HEAVY}
    printed, imported = _fgds_imports("status", str(tmp_path / "out"))
    assert printed.splitlines()[-1].split() == ["total", "3", "0", "0", "3"]
    assert "fgds_engine.production.status" in imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := p.read_text(encoding="utf-8").count("\n")) > 500}
    assert long == {}


def _own_modules() -> set[str]:
    names = {p.stem for d in ("tests", "benchmarks") for p in (ROOT / d).glob("*.py")}
    return names | {"fgds_engine"}


def test_no_private_name_is_imported_across_modules():
    """``from x import _y`` of the project's own modules (package, tests, benchmarks): a name another module
    needs is public (third-party privates, e.g. open_clip's config registry in tests, are theirs)."""
    own = _own_modules()
    found = []
    for d in ("fgds_engine", "tests", "benchmarks"):
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if not (node.level or (node.module or "").split(".")[0] in own):
                    continue
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


# ------------------------------------------------------------------------------------------- what moved


def _fresh_import(name: str):
    for m in [m for m in sys.modules if m == name]:
        del sys.modules[m]
    return importlib.import_module(name)


@pytest.mark.parametrize(("old", "new", "name"), [
    ("fgds_engine.scheduler", "fgds_engine.dropin_scheduler", "FusedDDIMScheduler"),
    ("fgds_engine.reference", "fgds_engine.reference_loop", "sample_one"),
    ("fgds_engine.schedule", "fgds_engine.solvers.ddim_schedule", "make_timesteps"),
    ("fgds_engine.ops.reference", "fgds_engine.ops.formulas", "guided_ddim_step"),
])
def test_a_moved_module_still_imports_with_a_warning(old, new, name):
    with pytest.warns(DeprecationWarning, match=f"^{old} moved to {new}; the old name goes in the next "
                      "release$"):
        module = _fresh_import(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize(("module", "name", "new"), [
    ("fgds_engine.cli", "option_tables", "fgds_engine.options"),
    ("fgds_engine.cli", "GENERATE_DEFAULTS", "fgds_engine.options"),
    ("fgds_engine.options", "CLASSIFIER_HELP", "fgds_engine.config"),
    ("fgds_engine.assemble", "PRESETS", "fgds_engine.assemble.MODEL_PRESETS"),
    ("fgds_engine.bench", "PRESETS", "fgds_engine.bench.measure.BENCH_PRESETS"),
    ("fgds_engine.bench.measure", "PRESETS", "fgds_engine.bench.measure.BENCH_PRESETS"),
])
def test_a_moved_name_still_works_with_a_warning(module, name, new):
    """``new``: the module the name moved to, or module.NEW_NAME where it was renamed too."""
    where, attr = (new, name) if new.rsplit(".", 1)[-1].islower() else new.rsplit(".", 1)
    with pytest.warns(DeprecationWarning, match=f"^{module}.{name} moved to {where}.{attr}; "):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(where), attr)


def test_the_runtime_fields_given_to_sampler_config_still_reach_the_sampler(tiny):
    from fgds_engine import FeedbackGuidedSampler, RuntimeOptions, SamplerConfig

    with pytest.warns(DeprecationWarning, match=r"^SamplerConfig\(dtype=, cuda_graphs=\) moved to "
                      r"RuntimeOptions: pass runtime=RuntimeOptions\(\.\.\.\) to the sampler; "):
        config = SamplerConfig(num_inference_steps=4, dtype="float32", cuda_graphs=False)
    assert config == SamplerConfig(num_inference_steps=4)  # not a field: the run's identity is unchanged
    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler, config)
    assert sampler.runtime == RuntimeOptions(dtype="float32", cuda_graphs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SamplerConfig(num_inference_steps=4).moved_runtime is None  # the new call warns nothing


def test_the_package_exports_what_users_import():
    import fgds_engine

    assert fgds_engine.FusedDDIMScheduler is importlib.import_module(
        "fgds_engine.dropin_scheduler").FusedDDIMScheduler
    for name in fgds_engine.__all__:
        assert getattr(fgds_engine, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        fgds_engine.nothing  # noqa: B018


def test_the_leaves_declarations_equal_the_engines_tables():
    """The torch-free leaves hold copies of a few names the engine declares (so that options are checked
    without importing torch): the copies equal their sources."""
    from fgds_engine import config
    from fgds_engine.criteria import CRITERIA, criterion_help
    from fgds_engine.ops import BACKENDS

    assert config.CRITERION_NAMES == tuple(CRITERIA)
    assert config.CRITERION_HELP == criterion_help()
    assert BACKENDS is config.BACKENDS
    assert {n: str(d) for n, d in config.DTYPES.items()} == {
        "float32": "torch.float32", "float16": "torch.float16", "bfloat16": "torch.bfloat16"}


def test_every_doc_the_code_cites_is_in_the_repository():
    """The code cites docs/method.md and docs/design.md (the repository explains itself): each cited file
    exists, each quoted section is a heading of it, and nothing points at a file outside the repository."""
    import re

    cited = 0
    for path in [*PKG.rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<![\w/])(METHOD|DESIGN)\.md", text), path
        for doc, section in re.findall(r"(docs/[\w-]+\.md)(?:, \"([^\"]+)\")?", text):
            cited += 1
            assert (ROOT / doc).is_file(), f"{path}: {doc}"
            if section:
                headings = re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(encoding="utf-8"), flags=re.M)
                assert any(h.startswith(section) for h in headings), f"{path}: {doc}, {section!r}"
    assert cited >= 10  # not vacuous


def test_no_script_edits_sys_path_or_imports_another_script():
    """Scripts import the package, never each other, and nothing edits ``sys.path`` (tests load a script by
    its path: ``conftest.load_script``)."""
    import re

    edit = re.compile(r"sys\.path\.(insert|append)\(")
    scripts = {p.stem for p in (ROOT / "benchmarks").rglob("*.py")}
    for path in [*PKG.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert not edit.search(text), path
        if path.is_relative_to(ROOT / "benchmarks"):
            for node in ast.walk(ast.parse(text)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                assert not {n.split(".")[0] for n in names} & scripts, f"{path}: {names}"
    assert {"budget", "driver", "bench_step"} <= scripts  # not vacuous


def test_no_script_shadows_a_module():
    """A script runs with its folder first on ``sys.path``: one named like a module (``select.py``) would be
    imported in its place by whatever imports that module (subprocess imports select)."""
    import importlib.util

    for path in (ROOT / "benchmarks").rglob("*.py"):
        name = path.stem
        assert name not in sys.stdlib_module_names and importlib.util.find_spec(name) is None, path


def test_the_design_doc_names_every_room_of_the_package():
    """docs/design.md's rooms match the tree: every module and subpackage of fgds_engine is named there (as
    ``name.py`` or ``name/``), and every ``*.py`` it names in backquotes exists."""
    import re

    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    shipped = {p.name for p in PKG.glob("*.py") if p.name != "__init__.py"}
    shipped |= {p.name + "/" for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert {n for n in shipped if f"`{n}`" not in text and f"`{n.removesuffix('/')}/" not in text} == set()
    named = set(re.findall(r"`((?:[\w]+/)*[\w]+\.py)`", text))
    assert len(named) > 20  # not vacuous
    missing = {n for n in named if not (ROOT / n).is_file()
               and not any(list((ROOT / d).rglob(n)) for d in ("fgds_engine", "tests", "benchmarks"))}
    assert missing == set()


def test_the_renamed_criterion_still_works_and_keeps_the_run_identity():
    """The batch-level criterion on the classifier's features is "feature-repulsion" ("repulsion" is the
    latent-space term, ``repulsion_scale``); its old name warns, gives the new one, and a run folder
    recorded under it keeps its identity (it is hashed under the old spelling)."""
    from fgds_engine.config import SamplerConfig
    from fgds_engine.criteria import CRITERIA, get_criterion
    from fgds_engine.production import run_identity

    with pytest.warns(DeprecationWarning, match=r"^criterion 'repulsion' is now 'feature-repulsion' \(the "
                      "latent-space repulsion is repulsion_scale\\); the old name goes in the next release$"):
        old = SamplerConfig(criterion="repulsion")
    assert old == SamplerConfig(criterion="feature-repulsion")
    with pytest.warns(DeprecationWarning, match="^criterion 'repulsion' is now 'feature-repulsion'; "):
        assert get_criterion("repulsion") is CRITERIA["feature-repulsion"]
    recorded = {"sampler": {"criterion": "repulsion", "feedback_scale": 0.03}, "plan": "p"}
    now = {"sampler": {"criterion": "feature-repulsion", "feedback_scale": 0.03}, "plan": "p"}
    assert run_identity(now) == run_identity(recorded)
    assert run_identity({**now, "sampler": now["sampler"] | {"criterion": "entropy"}}) != run_identity(now)


def test_the_terms_cfg_attribute_still_works_with_a_warning(tiny):
    from fgds_engine import FeedbackGuidedSampler, SamplerConfig

    sampler = FeedbackGuidedSampler(tiny.unet, tiny.vae, tiny.classifier, tiny.scheduler,
                                    SamplerConfig(num_inference_steps=4))
    assert sampler.terms.unconditional is sampler.terms.get("cfg") is not None
    with pytest.warns(DeprecationWarning, match=r"^Terms.cfg moved to Terms.unconditional; "):
        assert sampler.terms.cfg is sampler.terms.unconditional
