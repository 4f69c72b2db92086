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
