"""The CUDA kernels of csrc/ compiled for sm_90 (H100 / H200) on a CPU: every instantiation, what
ptxas reports and what the SASS holds (scripts/cuda_compile_table.py, which writes the table in
csrc/README.md).

- fp16 / bf16 run on tensor cores: every one of their kernels holds HMMA, LDSM (ldmatrix) and LDGSTS
  (cp.async) instructions; the fp32 kernels hold no HMMA (exact fp32 on CUDA cores).
- No spills in the tensor-core kernels up to head dim 64, none in any kernel at 33-64 (the presets'
  64); elsewhere at most SPILL_BOUND bytes.
- Shared memory within the launchers' 48 KiB; at least 8 resident warps per SM for the tensor-core
  kernels at head dim 64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import cuda_compile_table as cct  # noqa: E402

SPILL_BOUND = 32  # bytes per thread, of spill stores and of spill loads (as tests/test_sm90_compile.py)

pytestmark = pytest.mark.skipif(cct.find_tool("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")


@pytest.fixture(scope="module")
def table() -> dict:
    return cct.compile_table(jobs=2)


def _name(r: dict) -> str:
    return (f"{r['path']} {r['step']} {r['dtype']} D={r['head_dims']}: {r['registers']} registers, spills "
            f"{r['spill_stores']} / {r['spill_loads']} B")


def test_every_instantiation_compiles(table):
    rows = table["rows"]
    assert len(rows) == 3 * 3 * 4, [_name(r) for r in rows]  # three steps x three dtypes x four head-dim groups
    for r in rows:
        assert (r["path"] == "tensor cores") == (r["dtype"] != "fp32"), _name(r)
        assert 0 < r["registers"] <= 255, _name(r)
        assert r["smem"] <= 48 * 1024, _name(r)


def test_no_spills_up_to_head_dim_64(table):
    spilling = [_name(r) for r in table["rows"] if r["group"] <= 4 and r["path"] == "tensor cores"
                and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling, "\n".join(spilling)
    at_64 = [_name(r) for r in table["rows"] if r["group"] == 4 and (r["spill_stores"] or r["spill_loads"])]
    assert not at_64, "\n".join(at_64)
    over = [_name(r) for r in table["rows"] if max(r["spill_stores"], r["spill_loads"]) > SPILL_BOUND]
    assert not over, "\n".join(over)


def test_tensor_core_kernels_keep_warps_resident(table):
    low = [f"{_name(r)}: {r['warps_per_sm']} warps/SM" for r in table["rows"]
           if r["path"] == "tensor cores" and r["group"] == 4 and r["warps_per_sm"] < 8]
    assert not low, "\n".join(low)


def test_sass_shows_tensor_cores_ldmatrix_and_cp_async(table):
    if not table["sass"]:
        pytest.skip("needs cuobjdump (CUDA toolkit or Triton's bundled copy) to read the SASS")
    for r in table["rows"]:
        if r["path"] == "tensor cores":
            assert r["HMMA"] > 0 and r["LDSM"] > 0 and r["LDGSTS"] > 0, f"{_name(r)}: {r}"
        else:
            assert r["HMMA"] == 0, f"{_name(r)}: fp32 must stay on CUDA cores"
