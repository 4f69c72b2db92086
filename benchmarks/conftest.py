"""pytest set-up of the benchmark suites: options, the device, the session environment, parametrisation.

    python -m pytest benchmarks --benchmark-only --benchmark-json benchmarks/results/cpu.json
    python -m pytest -q benchmarks --benchmark-disable        # CI: every body once, nothing timed

Options (all optional): --cos-device {auto,cpu,cuda}, --cos-dtype {auto,fp32,bf16,fp16},
--cos-presets cos-80,cos-1296 (kernel and module), --cos-batch N, --cos-heads H, --cos-head-dim D,
--cos-kv-layout {contiguous,fused}, --cos-llm {auto,tiny,1b,7b}, --cos-e2e-batch N,
--cos-caption-tokens T, --cos-bridges cos-80,linear-256, --cos-threads N.
"""

from __future__ import annotations

import os

import pytest
import torch

# Where no CUDA device exists, the Triton backend can only run under its interpreter, which must be
# switched on before triton is first imported (tests/conftest.py does the same).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from . import cases as _cases  # noqa: E402
from .common import DTYPES, make_env  # noqa: E402
from .harness import Store  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("cos_kernels benchmarks")
    g.addoption("--cos-device", default="auto", choices=["auto", "cpu", "cuda"],
                help="device of the benchmarks (auto: cuda where available)")
    g.addoption("--cos-dtype", default="auto", choices=["auto", *DTYPES],
                help="dtype of kernel/module/e2e benchmarks (auto: bf16 on a GPU, fp32 on a CPU)")
    g.addoption("--cos-presets", default=None, help="comma-separated CoSConfig presets (kernel, module)")
    g.addoption("--cos-batch", type=int, default=None, help="batch of every kernel and module case")
    g.addoption("--cos-heads", type=int, default=None, help="heads of every kernel case")
    g.addoption("--cos-head-dim", type=int, default=None, help="head dim of every kernel case")
    g.addoption("--cos-kv-layout", default="contiguous", choices=["contiguous", "fused"],
                help="kernel K/V: contiguous (B, S, N, H, D) tensors, or strided views into one "
                     "(B, N, S, 2, H, D) projection output as the fused resampler passes them")
    g.addoption("--cos-llm", default="auto", choices=["auto", "tiny", "1b", "7b"],
                help="end-to-end model size (auto: tiny on a CPU, 7b or 1b by GPU memory)")
    g.addoption("--cos-e2e-batch", type=int, default=None, help="end-to-end batch")
    g.addoption("--cos-caption-tokens", type=int, default=None, help="end-to-end caption tokens per sample")
    g.addoption("--cos-bridges", default=None,
                help="comma-separated end-to-end bridges (resampler-336,cos-80,linear-256,mlp-576,cos-1296)")
    g.addoption("--cos-threads", type=int, default=None, help="torch.set_num_threads for CPU runs")


def bench_device(config) -> torch.device:
    choice = config.getoption("--cos-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--cos-device cuda but CUDA is not available")
    return torch.device(choice)


def bench_dtype(config) -> torch.dtype:
    choice = config.getoption("--cos-dtype")
    if choice == "auto":
        return torch.bfloat16 if bench_device(config).type == "cuda" else torch.float32
    return DTYPES[choice]


def pytest_configure(config):
    threads = config.getoption("--cos-threads")
    if threads:
        torch.set_num_threads(threads)


def pytest_report_header(config):
    device = bench_device(config)
    return (f"cos_kernels benchmarks: device {device}, dtype {bench_dtype(config)}, torch "
            f"{torch.__version__}, threads {torch.get_num_threads()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = bench_device(config)
    opt = config.getoption
    if "kernel_case" in metafunc.fixturenames:
        cs = _cases.kernel_cases(device, opt("--cos-presets"), opt("--cos-batch"), opt("--cos-heads"),
                                 opt("--cos-head-dim"))
        metafunc.parametrize("kernel_case", cs, ids=[c.label.replace(" ", "_") for c in cs])
    if "module_case" in metafunc.fixturenames:
        cs = _cases.module_cases(device, opt("--cos-presets"), opt("--cos-batch"))
        metafunc.parametrize("module_case", cs, ids=[c.label.replace(" ", "_") for c in cs])
    if "e2e_case" in metafunc.fixturenames:
        cs = _cases.e2e_cases(device, opt("--cos-llm"), opt("--cos-e2e-batch"), opt("--cos-caption-tokens"),
                              opt("--cos-bridges"))
        metafunc.parametrize("e2e_case", cs, ids=[c.label.replace(" ", "_") for c in cs])


@pytest.fixture(scope="session")
def bench_env(pytestconfig):
    """Device, dtype, versions and the copy bandwidth, measured once per session."""
    return make_env(bench_device(pytestconfig), bench_dtype(pytestconfig))


@pytest.fixture(scope="session")
def store():
    return Store()


@pytest.fixture(scope="session")
def kv_layout(pytestconfig) -> str:
    return pytestconfig.getoption("--cos-kv-layout")
