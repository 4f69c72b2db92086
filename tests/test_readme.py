"""Every Python block of the README runs as written, so that a pasted snippet cannot rot.

Each block runs in a fresh process in an empty directory (the files it writes, such as ckpt/, land
there); the block that loads a cos-train run finds one there, written by the README's main job
(`cos-train pretrain`) shortened to two steps.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cos_kernels.train.cli import main as cos_train

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_the_readme_has_its_python_blocks():
    """The extraction finds the API, transformers and loading snippets (a changed fence would
    otherwise leave the test below with nothing to run)."""
    blocks = python_blocks()
    assert len(blocks) == 3, f"expected the README's 3 python blocks, found {len(blocks)}"
    assert all(block.strip() for block in blocks)


def _short_pretrain_run(directory: Path) -> None:
    """runs/pretrain under ``directory``, as `cos-train pretrain` writes it (2 steps, no LLM warm-up)."""
    code = cos_train(["pretrain", "--out-dir", str(directory / "runs" / "pretrain"), "--steps", "2",
                      "--global-batch", "2", "--train-samples", "8", "--eval-samples", "0",
                      "--llm-warmup-steps", "0", "--device", "cpu", "--backend", "torch"])
    assert code == 0


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path):
    block = python_blocks()[index]
    if "runs/pretrain" in block:
        _short_pretrain_run(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: backend "auto" takes what the machine offers
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"README python block {index + 1} failed:\n{block}\n{result.stderr[-3000:]}"
