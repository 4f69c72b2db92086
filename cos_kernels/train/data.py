"""Training data: dataset construction and a resumable, rank-sharded stream of micro-batches."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from ..mllm import CaptionCollator, LlavaPretrainDataset, SyntheticCaptions
from .config import TrainConfig

__all__ = ["check_data", "check_data_paths", "check_images", "build_train_dataset", "build_eval_dataset",
           "EpochSampler", "MicroBatchStream"]

EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic scenes come from another seed


def check_data(config: TrainConfig, log=print) -> None:
    """Every training input, before anything expensive: check_data_paths, then for a LLaVA JSON file
    its entries (parsed as training will) and check_images. Costs one more parse of the file and a
    stat per image (seconds for LLaVA's 558K)."""
    check_data_paths(config)
    if config.data != "synthetic":
        check_images(_llava_dataset(config, image_size=1), log)  # the size matters only when reading images


def check_data_paths(config: TrainConfig) -> None:
    """FileNotFoundError naming the option unless data is 'synthetic' or an existing JSON file and
    image_folder, where given, exists."""
    if config.data != "synthetic" and not Path(config.data).is_file():
        raise FileNotFoundError(f"data must be 'synthetic' or an existing LLaVA JSON file, got {config.data!r}")
    if config.image_folder is not None and not Path(config.image_folder).is_dir():
        raise FileNotFoundError(f"image_folder {config.image_folder!r} does not exist")


def check_images(data: LlavaPretrainDataset, log=print) -> None:
    """FileNotFoundError when none of the images the dataset lists exists; a note counting the
    missing ones when some are (training skips them and counts them in skipped_images). Images that
    exist but cannot be decoded are found when read."""
    images = [image for _, image, _ in data.samples]
    missing = [image for image in images if not (data.image_folder / image).is_file()]
    if not missing:
        return
    where = f"listed in {data.json_path} under image_folder {str(data.image_folder)!r}"
    if len(missing) == len(images):
        raise FileNotFoundError(f"none of the {len(images)} images {where} exists (the first: "
                                f"{data.image_folder / missing[0]}); the JSON file's image paths are relative "
                                f"to image_folder (default: the JSON file's folder)")
    log(f"note: {len(missing)} of the {len(images)} images {where} do not exist (the first: "
        f"{data.image_folder / missing[0]}); training skips them and counts them in skipped_images")


def build_train_dataset(config: TrainConfig, image_size: int) -> Dataset:
    """The synthetic set, or a LLaVA pre-training JSON file with its image folder."""
    check_data_paths(config)
    if config.data == "synthetic":
        return SyntheticCaptions(config.train_samples, image_size, seed=config.seed)
    return _llava_dataset(config, image_size)


def _llava_dataset(config: TrainConfig, image_size: int) -> LlavaPretrainDataset:
    json_path = Path(config.data)
    return LlavaPretrainDataset(json_path, config.image_folder or json_path.parent, image_size)


def build_eval_dataset(config: TrainConfig, image_size: int) -> SyntheticCaptions:
    """Held-out synthetic scenes (never in the training set: another seed)."""
    return SyntheticCaptions(max(config.eval_samples, 1), image_size, seed=config.seed + EVAL_SEED_OFFSET)


class EpochSampler(Sampler):
    """This rank's indices of one epoch: a permutation drawn from (seed, epoch), cut to a multiple of
    world_size * micro_batch, every world_size-th index from ``rank``, starting after ``skip`` of them."""

    def __init__(self, size: int, micro_batch: int, seed: int, epoch: int, rank: int, world_size: int, skip: int = 0):
        per_rank = size // world_size // micro_batch * micro_batch
        if per_rank == 0:
            raise ValueError(
                f"the dataset has {size} samples, fewer than one micro-batch of {micro_batch} per process "
                f"({world_size} processes)"
            )
        order = np.random.default_rng([seed, epoch]).permutation(size)[: per_rank * world_size]
        self.indices = order[rank::world_size][skip:].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class MicroBatchStream:
    """An endless stream of collated micro-batches, epoch after epoch; ``position`` (micro-batches
    consumed by this rank) is all a checkpoint needs to resume it exactly."""

    def __init__(self, dataset: Dataset, collator: CaptionCollator, micro_batch: int, seed: int, rank: int,
                 world_size: int, num_workers: int, position: int = 0):
        self.dataset, self.collator, self.micro_batch = dataset, collator, micro_batch
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.batches_per_epoch = len(EpochSampler(len(dataset), micro_batch, seed, 0, rank, world_size))
        self.batches_per_epoch //= micro_batch
        self.position = position
        self._iterator = self._batches()

    def _batches(self) -> Iterator[dict]:
        epoch, skip = divmod(self.position, self.batches_per_epoch)
        while True:
            sampler = EpochSampler(len(self.dataset), self.micro_batch, self.seed, epoch, self.rank,
                                   self.world_size, skip * self.micro_batch)
            loader = DataLoader(self.dataset, batch_size=self.micro_batch, sampler=sampler,
                                collate_fn=self.collator, num_workers=self.num_workers,
                                persistent_workers=False, pin_memory=False)
            yield from loader
            epoch, skip = epoch + 1, 0

    def next(self) -> dict:
        batch = next(self._iterator)
        self.position += 1
        return batch
