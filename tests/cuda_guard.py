"""pytest plugin (imported by tests/conftest.py): after every GPU test the CUDA context must still
run work. Where it does not (a sticky error such as an illegal address poisons the whole process,
so every later test on that process would fail for the wrong reason), the process ends: under
pytest-xdist the worker exits and xdist starts a fresh one for the tests left (the test in flight is
reported as crashed); without xdist the session stops with the reason."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # the repository's benchmarks package, also under a plain `pytest tests`
    sys.path.insert(0, ROOT)

from benchmarks.common import cuda_context_error  # noqa: E402


def cuda_error() -> str | None:
    """None where this process has no CUDA context or it still runs work, else the error."""
    return cuda_context_error()


@pytest.fixture(autouse=True)
def _cuda_context_guard(request):
    yield
    if request.node.get_closest_marker("gpu") is None:
        return
    error = cuda_error()
    if error is None:
        return
    message = f"the CUDA context is unusable after {request.node.nodeid}: {error}"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:  # else the message would go to the capture buffer, lost with the process
            capture.suspend_global_capture(in_=True)
        sys.stderr.write(f"{message}; ending this pytest-xdist worker so that a fresh one runs the tests left\n")
        sys.stderr.flush()
        os._exit(3)
    pytest.exit(f"{message}; stopping here, as every later GPU test in this process would fail", returncode=3)
