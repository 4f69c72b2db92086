"""Process groups under torchrun, and wrapping the model for DDP or FSDP2."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..resampler import check_device
from .config import TrainConfig

__all__ = ["DistEnv", "setup_distributed", "wrap_model", "all_reduce_sum", "all_reduce_max"]


@dataclass
class DistEnv:
    """This process's place: mode "none" | "ddp" | "fsdp", rank, world_size, device."""

    mode: str
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The CoSMLLM inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
        return model.module if self.mode == "ddp" else model

    def gradient_sync(self, model: nn.Module, enabled: bool):
        """A context for one micro-batch's backward: gradients are reduced across ranks only when
        ``enabled`` (the last micro-batch of a step)."""
        if self.mode == "ddp" and not enabled:
            return model.no_sync()
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda":
        check_device(device, fix="use device='cpu' or 'auto'")  # as given: CUDA available, its index visible
        if device.index is None:
            device = check_device(f"cuda:{local_rank}")
    return device


def setup_distributed(config: TrainConfig) -> DistEnv:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) when launched by torchrun."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    mode = config.distributed
    if mode == "auto":
        mode = "ddp" if launched and int(os.environ["WORLD_SIZE"]) > 1 else "none"
    if mode != "none" and not launched:
        raise ValueError(
            f"distributed={config.distributed!r} needs torchrun: torchrun --nproc-per-node N -m cos_kernels.train ..."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _resolve_device(config.device, local_rank)
    if mode == "none":
        return DistEnv("none", 0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(mode, dist.get_rank(), dist.get_world_size(), device)


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP over the trainable parameters, or FSDP2 (fully_shard) on: each ViT and LLM layer, the rest
    of the vision tower, the LLM's input embedding (called on its own), the bridge, and the root (the
    LLM's final norm and head). Each unit then holds one dtype (frozen parts may be bf16, trained
    ones fp32). ``generate`` is registered as a forward method."""
    if env.mode == "none":
        return model
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    layer_classes = {*getattr(model.vision.vit, "_no_split_modules", []), *getattr(model.llm, "_no_split_modules", [])}
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    for unit in [*layers, model.vision, model.llm.get_input_embeddings(), model.bridge, model]:
        fully_shard(unit, mesh=mesh)
    register_fsdp_forward_method(model, "generate")
    return model


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In place, summed over ranks (a no-op in a single process)."""
    if env.mode != "none":
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In place, the maximum over ranks (a no-op in a single process)."""
    if env.mode != "none":
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
