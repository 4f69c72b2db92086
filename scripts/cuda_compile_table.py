"""Compile the CUDA kernels of csrc/ for sm_90 (no GPU needed) and tabulate, per instantiation, what
ptxas and the SASS say: registers, spills, stack, shared memory per block, occupancy on an H100 /
H200, and the count of tensor-core (HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) instructions.

    python scripts/cuda_compile_table.py             # print the Markdown table
    python scripts/cuda_compile_table.py --write     # and put it into csrc/README.md (between markers)

tests/test_cuda_sm90_compile.py runs the same compile in CI and holds the tensor-core kernels to it.
Shared memory per block is the plan's (csrc/kernels/window_attention.h make_plan, by head-dim group);
fp32 blocks have up to 128 threads (rows x threads per row, by layout), counted at 128 here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "csrc" / "README.md"
BEGIN, END = "<!-- cuda-compile-table:begin -->", "<!-- cuda-compile-table:end -->"
SOURCES = ("csrc/kernels/forward.cu", "csrc/kernels/backward.cu")
NVCC_FLAGS = ("-std=c++17", "-O3", "-lineinfo", "-Icsrc", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
KERNELS = {  # mangled-name stem -> (step, path)
    "window_attention_forward_kernel": ("forward", "CUDA cores"),
    "window_attention_dq_kernel": ("dQ + delta", "CUDA cores"),
    "window_attention_dkv_kernel": ("dK/dV", "CUDA cores"),
    "tc_forward_kernel": ("forward", "tensor cores"),
    "tc_dq_kernel": ("dQ + delta", "tensor cores"),
    "tc_dkv_kernel": ("dK/dV", "tensor cores"),
}
DTYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
# sm_90 limits (CUDA occupancy calculator)
SM90 = dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=233472, smem_reserved=1024)
# the plan's constants (window_attention.h)
SMEM_FLOATS_PER_OPERAND, TC_CHUNK_ELEMS, TC_ROW_PAD = 2048, 2048, 8


def find_tool(name: str) -> str | None:
    """nvcc / cuobjdump: the CUDA toolkit's (cuda_build.find_cuda_home), else the PATH's, else Triton's
    bundled copy (triton/backends/nvidia/bin)."""
    sys.path.insert(0, str(ROOT))
    try:
        from cuda_build import find_cuda_home
    finally:
        sys.path.remove(str(ROOT))
    home = find_cuda_home()
    candidates = [os.path.join(home, "bin", name)] if home else []
    candidates.append(shutil.which(name))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def smem_bytes(step: str, path: str, group: int) -> int:
    padded = 16 * group
    if path == "tensor cores":
        slots = TC_CHUNK_ELEMS // padded
        rows = 2 * 2 * slots * (padded + TC_ROW_PAD) * 2
        return rows + (2 * 2 * slots * 4 if step == "dK/dV" else 0)
    slots = SMEM_FLOATS_PER_OPERAND // padded
    return 2 * slots * padded * 4 + (2 * slots * 4 if step == "dK/dV" else 0)


def occupancy(registers: int, threads: int, smem: int) -> tuple[int, int]:
    """(blocks, warps) resident per SM on sm_90."""
    warps = (threads + 31) // 32
    per_warp = -(-registers * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = SM90["regs"] // (per_warp * warps)
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    blocks = min(by_regs, by_smem, SM90["warps"] // warps, SM90["blocks"])
    return blocks, blocks * warps


def _compile(nvcc: str, src: str, out_dir: str) -> tuple[str, str]:
    obj = os.path.join(out_dir, Path(src).stem + ".o")
    res = subprocess.run([nvcc, *NVCC_FLAGS, "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c",
                          str(ROOT / src), "-o", obj], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
    return obj, res.stderr


def _parse_ptxas(log: str) -> dict[str, dict]:
    found = {}
    pattern = re.compile(r"Compiling entry function '(\S+)' for 'sm_90'\n(?:.*\n)*?.*?(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads\n.*?Used (\d+) registers")
    for m in pattern.finditer(log):
        found[m.group(1)] = dict(stack=int(m.group(2)), spill_stores=int(m.group(3)), spill_loads=int(m.group(4)),
                                 registers=int(m.group(5)))
    return found


def _sass_counts(cuobjdump: str, obj: str) -> dict[str, dict]:
    res = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed on {obj}: {res.stderr[-2000:]}")
    counts, current = {}, None
    for line in res.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = counts.setdefault(m.group(1), {"HMMA": 0, "LDSM": 0, "LDGSTS": 0})
        elif current is not None:
            for op in current:
                if re.search(rf"\b{op}\.", line):
                    current[op] += 1
    return counts


def _describe(mangled: str) -> dict | None:
    m = re.search(r"detail\d+(\w+?_kernel)I(f|6__half|13__nv_bfloat16)Li(\d)E", mangled)
    if not m or m.group(1) not in KERNELS:
        return None
    step, path = KERNELS[m.group(1)]
    return dict(kernel=m.group(1), step=step, path=path, dtype=DTYPES[m.group(2)], group=int(m.group(3)))


def compile_table(jobs: int = 2) -> dict:
    """Every instantiation: {"rows": [...], "nvcc": version line, "sass": whether SASS was read}."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise RuntimeError("no nvcc found (set CUDA_HOME or put nvcc on PATH)")
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda s: _compile(nvcc, s, tmp), SOURCES))
        ptxas, sass = {}, {}
        for obj, log in results:
            ptxas.update(_parse_ptxas(log))
            if cuobjdump:
                sass.update(_sass_counts(cuobjdump, obj))
    rows = []
    for mangled, figures in ptxas.items():
        info = _describe(mangled)
        if info is None:
            continue
        threads = 32 if info["path"] == "tensor cores" else 128
        smem = smem_bytes(info["step"], info["path"], info["group"])
        blocks, warps = occupancy(figures["registers"], threads, smem)
        rows.append(dict(**info, **figures, head_dims=_head_dims(info["group"]), threads=threads, smem=smem,
                         blocks_per_sm=blocks, warps_per_sm=warps, **sass.get(mangled, {})))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    order = {k: i for i, k in enumerate(KERNELS)}
    rows.sort(key=lambda r: (r["path"] != "tensor cores", order[r["kernel"]], r["dtype"], r["group"]))
    return dict(rows=rows, nvcc=version, sass=cuobjdump is not None)


def _head_dims(group: int) -> str:
    lo = 16 if group == 1 else 8 * group + 1
    return f"{lo}-{16 * group}"


def render(table: dict) -> str:
    cols = ["path", "step", "dtype", "D", "registers", "spills (st/ld B)", "stack B", "threads", "smem KiB",
            "blocks/SM", "warps/SM"] + (["HMMA", "LDSM", "LDGSTS"] if table["sass"] else [])
    lines = [f"sm_90, {table['nvcc']}; `python scripts/cuda_compile_table.py --write` regenerates this table.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table["rows"]:
        cells = [r["path"], r["step"], r["dtype"], r["head_dims"], r["registers"],
                 f"{r['spill_stores']} / {r['spill_loads']}", r["stack"], r["threads"], f"{r['smem'] / 1024:.1f}",
                 r["blocks_per_sm"], r["warps_per_sm"]]
        if table["sass"]:
            cells += [r.get("HMMA", 0), r.get("LDSM", 0), r.get("LDGSTS", 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_readme(text: str) -> None:
    page = README.read_text()
    if BEGIN not in page or END not in page:
        raise RuntimeError(f"{README} lacks the markers {BEGIN} ... {END}")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"replace the table in {README.relative_to(ROOT)}")
    ap.add_argument("--jobs", type=int, default=2, help="nvcc processes side by side (default 2)")
    args = ap.parse_args(argv)
    text = render(compile_table(args.jobs))
    print(text)
    if args.write:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
