"""The sizes each suite runs at: GPU sizes from the issue, small CPU sizes, both settable by options.

GPU (bf16): kernel and module at cos-80 B=256, cos-336 B=64, cos-1296 B=64 (H=16, D=64, widths of
the paper); end to end with the "7b" proxy where the GPU has the memory for it, else "1b".
CPU (fp32): a "tiny" case at which the Triton backend may run under the interpreter, and a few
small cases for the eager backend and the peers; end to end with the "tiny" MLLM.
The GPU check (headline.py) runs the headline subset: cos-80 B=256 and cos-1296 B=64, stage-1 steps
of the 7b and 1b proxies at B=16, T=64; its dry run tiny cases of the same kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelCase:
    preset: str
    batch: int
    heads: int
    head_dim: int
    interpreted_ok: bool = False  # the Triton interpreter may run it (CPU only)

    @property
    def label(self) -> str:
        return f"{self.preset} B={self.batch} H={self.heads} D={self.head_dim}"

    @property
    def key(self) -> str:
        """A short name without spaces (the GPU check's work items)."""
        return f"{self.preset}:{self.batch}x{self.heads}x{self.head_dim}"


@dataclass(frozen=True)
class ModuleCase:
    preset: str
    batch: int
    overrides: tuple = ()  # CoSConfig fields, as (name, value) pairs
    interpreted_ok: bool = False

    @property
    def label(self) -> str:
        width = dict(self.overrides).get("dim")
        return f"{self.preset} B={self.batch}" + (f" dim={width}" if width else "")

    @property
    def key(self) -> str:
        """A short name without spaces (the GPU check's work items)."""
        return f"{self.preset}:{self.batch}"


@dataclass(frozen=True)
class E2ECase:
    stage: str  # "pretrain" (stage 1: bridge trained) or "finetune" (stage 2: bridge + LLM trained)
    model: str  # "tiny", "1b", "7b"
    bridge: str  # an MLLMConfig bridge name
    label_bridge: str  # the name: cos-80, resampler-336, linear-256, mlp-576, cos-1296
    image_px: int  # the paper's resolution (224 / 336 / 448); tiny models map it to grid 16/24/32
    batch: int
    caption_tokens: int

    @property
    def label(self) -> str:
        return f"{self.stage} {self.model} {self.label_bridge} @{self.image_px}px B={self.batch}"

    @property
    def step_label(self) -> str:
        """The table's case: the step of this stage, model, batch and caption length (every bridge)."""
        return f"stage {1 if self.stage == 'pretrain' else 2}, {self.model} B={self.batch} T={self.caption_tokens}"


# CPU module width: small enough for 2 cores, head dim 64 like the paper's
_CPU_MODULE = (("dim", 256), ("vision_dim", 256), ("num_heads", 4), ("llm_dim", 256))
_CPU_TINY_MODULE = (("dim", 64), ("vision_dim", 64), ("num_heads", 2), ("llm_dim", 64))


def _presets(option: str | None) -> list[str] | None:
    if not option:
        return None
    return [p.strip() for p in option.split(",") if p.strip()]


def kernel_cases(device: torch.device, presets: str | None, batch: int | None, heads: int | None,
                 head_dim: int | None) -> list[KernelCase]:
    if device.type == "cuda":
        cases = [KernelCase("cos-80", 256, 16, 64), KernelCase("cos-336", 64, 16, 64),
                 KernelCase("cos-1296", 64, 16, 64)]
        default_batch = 64
    else:
        cases = [KernelCase("cos-80", 1, 2, 32, interpreted_ok=True), KernelCase("cos-80", 4, 16, 64),
                 KernelCase("cos-336", 1, 16, 64), KernelCase("cos-1296", 1, 16, 64)]
        default_batch = 1
    wanted = _presets(presets)
    if wanted is not None:
        kept = [c for c in cases if c.preset in wanted]
        have = {c.preset for c in kept}
        kept += [KernelCase(p, default_batch, 16, 64) for p in wanted if p not in have]
        cases = kept
    out = []
    for c in cases:
        c = KernelCase(c.preset, batch or c.batch, heads or c.heads, head_dim or c.head_dim,
                       c.interpreted_ok and not (batch or heads or head_dim))
        if c not in out:
            out.append(c)
    return out


def module_cases(device: torch.device, presets: str | None, batch: int | None) -> list[ModuleCase]:
    if device.type == "cuda":
        cases = [ModuleCase("cos-80", 256), ModuleCase("cos-336", 64), ModuleCase("cos-1296", 64)]
        default = ModuleCase("", 64)
    else:
        cases = [ModuleCase("cos-80", 1, _CPU_TINY_MODULE, interpreted_ok=True),
                 ModuleCase("cos-80", 4, _CPU_MODULE), ModuleCase("cos-1296", 1, _CPU_MODULE)]
        default = ModuleCase("", 1, _CPU_MODULE)
    wanted = _presets(presets)
    if wanted is not None:
        kept = [c for c in cases if c.preset in wanted]
        have = {c.preset for c in kept}
        kept += [ModuleCase(p, default.batch, default.overrides) for p in wanted if p not in have]
        cases = kept
    out = []
    for c in cases:
        c = ModuleCase(c.preset, batch or c.batch, c.overrides, c.interpreted_ok and not batch)
        if c not in out:
            out.append(c)
    return out


# The issue's bridges: (label, MLLMConfig bridge, image px). resampler-336 first: the others'
# step times are reported relative to it.
PRETRAIN_BRIDGES = [
    ("resampler-336", "resampler-336", 224),
    ("cos-80", "cos-80", 224),
    ("linear-256", "linear", 224),
    ("mlp-576", "mlp2x_gelu", 336),
]
FINETUNE_BRIDGES = [("cos-1296", "cos-1296", 448)]


def e2e_model(device: torch.device, option: str | None, stage: str) -> str:
    """The LLM size: the option, else tiny on a CPU; on a GPU "7b" where its memory suffices (stage 1:
    frozen bf16 7B weights + activations, >= 70 GiB; stage 2: fp32 trained LLM with AdamW, 16 bytes
    per parameter, >= 160 GiB), else "1b"."""
    if option and option != "auto":
        return option
    if device.type != "cuda":
        return "tiny"
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    need = 70 if stage == "pretrain" else 160
    return "7b" if total >= need else "1b"


def e2e_cases(device: torch.device, model: str | None, batch: int | None,
              caption_tokens: int | None, bridges: str | None) -> list[E2ECase]:
    wanted = _presets(bridges)
    out = []
    for stage, table in (("pretrain", PRETRAIN_BRIDGES), ("finetune", FINETUNE_BRIDGES)):
        size = e2e_model(device, model, stage)
        if size == "tiny":
            default_batch = 4 if stage == "pretrain" else 2
        elif size == "1b":
            default_batch = 16 if stage == "pretrain" else 8
        else:
            default_batch = 16 if stage == "pretrain" else 4
        tokens = caption_tokens or (32 if size == "tiny" else 64)
        for label, bridge, px in table:
            if wanted is not None and label not in wanted and bridge not in wanted:
                continue
            out.append(E2ECase(stage, size, bridge, label, px, batch or default_batch, tokens))
    return out


# ---- the GPU check's headline cases (headline.py) ---------------------------------------------------
def headline_kernel_cases(dry: bool) -> list[KernelCase]:
    if dry:  # two cases, so that a group restarted after a crash has an item left
        return [KernelCase("cos-80", 1, 2, 32, interpreted_ok=True),
                KernelCase("cos-80", 1, 1, 16, interpreted_ok=True)]
    return [KernelCase("cos-80", 256, 16, 64), KernelCase("cos-1296", 64, 16, 64)]


def headline_module_cases(dry: bool) -> list[ModuleCase]:
    if dry:
        return [ModuleCase("cos-80", 1, _CPU_TINY_MODULE, interpreted_ok=True)]
    return [ModuleCase("cos-80", 256), ModuleCase("cos-1296", 64)]


def headline_e2e_cases(model: str) -> list[E2ECase]:
    """Stage-1 steps of ``model`` with every PRETRAIN_BRIDGES bridge (tiny: B=2, T=16; else B=16, T=64)."""
    batch, tokens = (2, 16) if model == "tiny" else (16, 64)
    return [E2ECase("pretrain", model, bridge, label, px, batch, tokens) for label, bridge, px in PRETRAIN_BRIDGES]


def case_by_key(cases, key: str):
    for c in cases:
        if c.key == key:
            return c
    raise ValueError(f"no case {key!r}; cases: {[c.key for c in cases]}")
