"""The build's own checks: the CUDA toolkit is found through an nvcc wrapper script, and an
old setuptools is refused up front with the command that fixes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cuda_build import find_cuda_home  # noqa: E402


def test_cuda_home_is_found_through_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    home = find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{home}/bin/nvcc" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    found = find_cuda_home()  # torch would guess tmp_path, the wrapper's grandparent
    assert found == home and (Path(found) / "include" / "cuda_runtime_api.h").is_file()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # a CUDA_HOME without the toolkit is passed over
    assert find_cuda_home() == home


def test_old_setuptools_without_wheel_is_refused_with_the_fix():
    script = (
        "import sys, setuptools\n"
        "setuptools.__version__ = '65.5.0'\n"
        "sys.modules['wheel'] = None\n"  # import wheel fails, as where it is not installed
        "sys.argv = ['setup.py', '--version']\n"
        f"path = {str(ROOT / 'setup.py')!r}\n"
        "exec(compile(open(path).read(), path, 'exec'), {'__file__': path, '__name__': '__main__'})\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "setuptools 65.5.0 cannot build a wheel" in out.stderr and "pip install 'setuptools>=70.1'" in out.stderr


# Imported only inside a guard that reports their absence (peers that may be missing).
OPTIONAL_IMPORTS = {"flash_attn"}


def _requirements(extras: tuple[str, ...]) -> set[str]:
    """Distribution names (normalised) of pyproject's dependencies and the named extras, with
    self-referencing extras (cos_kernels[train]) followed."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names, todo = set(), [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    while todo:
        requirement = todo.pop()
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name == "cos-kernels":
            inner = re.search(r"\[(.*)\]", requirement).group(1).split(",")
            todo += [r for e in inner for r in project["optional-dependencies"][e.strip()]]
        else:
            names.add(name)
    return names


def _third_party_imports(*folders: str) -> dict[str, str]:
    """{top-level module: a file importing it} for the modules imported under ``folders``, less the
    standard library and the repository's own."""
    import ast

    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folders, extras", [(("cos_kernels",), ("train",)), (("cos_kernels", "benchmarks"), ("bench",))])
def test_every_import_is_a_declared_dependency(folders, extras):
    """`pip install -e ".[bench]"` then `pytest benchmarks/ --benchmark-only` must find every package the
    suites import (the bench extra once lacked pillow, which the end-to-end suite needs)."""
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    declared = _requirements(extras)
    for module, where in _third_party_imports(*folders).items():
        if module in OPTIONAL_IMPORTS:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & declared, f"{where} imports {module} ({sorted(names)}), which {list(extras)} does not declare"
