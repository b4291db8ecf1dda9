"""The import arrows of docs/architecture.md, read from the source files (module-level imports).

cli -> pipelines -> library; the library never imports pipelines or cli; the modules of stages
two and three (training, evaluation, the cache they read) never import a source's model library
(diffusers, transformers) or stage one's modules at import time, so `pip install dhf-cache` users
who only train and evaluate from a cache never load them (a run-time check of a training run is
in test_train.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dhf_cache": ROOT / "dhf_cache", "dhf_cache.pipelines": ROOT / "pipelines", "dhf_cache.cli": ROOT / "cli"}
STAGE_ONE = ("diffusers", "transformers", "dhf_cache.sources", "dhf_cache.pipelines.build")
# stages two and three: these packages whole, and the pipelines that train and evaluate
STAGES_TWO_THREE_PACKAGES = ("dhf_cache.cache", "dhf_cache.aggregator", "dhf_cache.correspondence",
                             "dhf_cache.reports", "dhf_cache.datasets")
STAGES_TWO_THREE_MODULES = ("dhf_cache.config", "dhf_cache.errors", "dhf_cache.pipelines.train",
                            "dhf_cache.pipelines.evaluate", "dhf_cache.pipelines.run_folder")
# the library's folders follow the contract (docs/architecture.md); only cross-cutting modules at the top
LIBRARY_PACKAGES = {"cache", "sources", "aggregator", "correspondence", "datasets", "reports", "viewer"}
TOP_LEVEL_MODULES = {"__init__", "api", "config", "device", "errors", "openmp", "progress"}


def module_imports() -> dict[str, set[str]]:
    """Each module's module-level imports (not those inside functions: lazy, on a path that needs them)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            tree = ast.parse(path.read_text())
            names = set()
            for node in tree.body:  # module level only
                if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
                    continue
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module)
            found[name] = names
    return found


def starts(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_library_never_imports_pipelines_or_cli():
    bad = {m: sorted(i for i in imports if starts(i, ("dhf_cache.pipelines", "dhf_cache.cli")))
           for m, imports in module_imports().items()
           if not starts(m, ("dhf_cache.pipelines", "dhf_cache.cli"))}
    assert {m: v for m, v in bad.items() if v} == {}


def test_pipelines_never_import_cli():
    bad = {m: sorted(i for i in imports if starts(i, ("dhf_cache.cli",)))
           for m, imports in module_imports().items() if starts(m, ("dhf_cache.pipelines",))}
    assert {m: v for m, v in bad.items() if v} == {}


def test_stages_two_and_three_never_import_a_model_library_or_stage_one():
    imports = module_imports()
    assert set(STAGES_TWO_THREE_MODULES) <= set(imports), set(STAGES_TWO_THREE_MODULES) - set(imports)
    stages = [m for m in imports if starts(m, STAGES_TWO_THREE_PACKAGES) or m in STAGES_TWO_THREE_MODULES]
    assert len(stages) > 25  # the packages were found
    bad = {m: sorted(i for i in imports[m] if starts(i, STAGE_ONE)) for m in stages}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_library_is_grouped_by_stage():
    library = ROOT / "dhf_cache"
    assert {p.name for p in library.iterdir() if (p / "__init__.py").is_file()} == LIBRARY_PACKAGES
    assert {p.stem for p in library.glob("*.py")} == TOP_LEVEL_MODULES


def test_no_module_imports_another_modules_private_names():
    bad = []
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dhf_cache"):
                    bad += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []


def test_commands_that_run_models_name_the_build_extra_when_its_libraries_are_absent(monkeypatch, tmp_path):
    """As on a `pip install dhf-cache` without [build]: the libraries are hidden from the finder."""
    import importlib.util

    from conftest import invoke

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("diffusers", "transformers") else real(name, *a, **k))
    result = invoke("tiny-model", tmp_path / "m")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "needs diffusers and transformers: pip install 'dhf-cache[build]'" in result.output
    assert not (tmp_path / "m").exists()
