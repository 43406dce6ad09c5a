"""The cached data path: batches cut straight from an ``ImageCache``, augmented on their device.

The default in train.json; ``configs/train_chain.json`` swaps in the per-sample MONAI chain in
DataLoader workers (the tutorial's way, kept for comparison). With the cache on the GPU a
batch is an ``index_select`` and one warp on the GPU: no workers, no collation, no host-to-device
copy. With a memory-mapped cache a background thread (MONAI's ``ThreadBuffer``) reads the next
batch's rows while the current one trains.
"""

import math
from collections.abc import Iterator

import torch
from monai.data import ThreadBuffer

from bundle.augment import BatchAugmentation, BatchMix
from bundle.cache import ImageCache
from bundle.flags import as_bool


class CachedBatchLoader:
    """Iterates over an ``ImageCache`` in batches of ``{"image", "label"[, "image_path"]}``.

    Args:
        cache: the decoded images.
        batch_size: images per batch at most. An epoch is cut into ``ceil(n / batch_size)`` batches of
            (nearly) equal size, so every image is seen every epoch and no batch is a tiny remainder; into
            up to a third more when that gives every batch one size (one shape for cuDNN to tune).
        shuffle: a new random order every epoch (ignored when ``sampler`` is given).
        equal_batches: with ``shuffle``, leave out the last few images of each epoch's order (fewer
            than one per batch, different ones every epoch) so that every batch has one size, as with a
            ``sampler``: one shape for cuDNN to tune and for the training step's CUDA graph to capture.
        sampler: a torch ``Sampler`` of indices into the cache (e.g. class-balanced), drawn afresh
            every epoch. Its draws are random, so the epoch leaves out its last few (fewer than one
            per batch) to make every batch the same size: a GPU's autotuned convolutions are tuned
            once per batch shape. ``bundle.imbalance.DeferredSampler`` switches from plain to balanced
            draws at an epoch, drawing as many either way, so the batch count stays.
        augmentation: applied to each float batch on its device (None: no augmentation).
        mix: mixup / CutMix after the augmentation (``BatchMix``); when it is enabled every batch's
            label is a float ``(N, num_classes)`` soft target (None or disabled: class indices).
        targets: one training target per cached image, handed on as the batch's ``label`` in place of
            the cache's class index: distillation's float ``(N, num_classes)`` soft rows
            (``bundle.distill``), which ``mix`` then mixes. None: the cache's labels.
        channels_last: hand the network channels-last images (faster convolutions on GPUs).
        with_paths: add each image's file as ``image_path`` (for evaluation reports).
        seed: seeds the shuffling.
    """

    def __init__(
        self,
        cache: ImageCache,
        batch_size: int,
        shuffle: bool = False,
        equal_batches: bool = False,
        sampler: torch.utils.data.Sampler | None = None,
        augmentation: BatchAugmentation | None = None,
        mix: BatchMix | None = None,
        targets: torch.Tensor | None = None,
        channels_last: bool = False,
        with_paths: bool = False,
        seed: int = 0,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"config key 'batch_size' must be at least 1, got {batch_size}")
        self.cache = cache
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.equal_batches = equal_batches
        self.sampler = sampler
        self.augmentation = augmentation
        self.mix = mix if mix is not None and mix.enabled else None
        if targets is not None and len(targets) != len(cache):
            raise ValueError(f"{len(targets)} training targets for {len(cache)} cached images")
        self.labels = cache.labels if targets is None else targets.to(cache.device)
        self.memory_format = torch.channels_last if as_bool(channels_last, "channels_last") else torch.contiguous_format
        self.with_paths = with_paths
        self.generator = torch.Generator().manual_seed(seed)

    def _epoch_order(self) -> torch.Tensor:
        if self.sampler is not None:
            draws = torch.as_tensor(list(self.sampler), dtype=torch.long)
            return draws[: len(self) * (len(draws) // len(self))]
        if self.shuffle:
            order = torch.randperm(len(self.cache), generator=self.generator)
            return order[: len(self) * (len(order) // len(self))] if self.equal_batches else order
        return torch.arange(len(self.cache))

    def _epoch_size(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.cache)

    def __len__(self) -> int:
        size = self._epoch_size()
        count = math.ceil(size / self.batch_size)
        if count <= 1 or self.sampler is not None or (self.shuffle and self.equal_batches):
            return count
        # every image kept (evaluation): one batch size when up to a third more batches divide the epoch, e.g.
        # 1,504 validation images in 4 batches of 376 rather than 502, 501, 501; a GPU autotunes its convolutions
        # for each batch shape it meets, and a second shape is a second tuning of every layer
        return next((k for k in range(count, count + count // 3 + 1) if size % k == 0), count)

    def _batches(self) -> Iterator[dict]:
        order = self._epoch_order()
        # one copy of the epoch's order to the device: a copy per batch would wait for the GPU every step
        on_device = order.to(self.cache.device)
        gather_order = on_device if self.cache.storage == "device" else order
        for indices, device_indices, gather_indices in zip(
            *(torch.tensor_split(o, len(self)) for o in (order, on_device, gather_order)), strict=True
        ):
            batch = {"image": self.cache.gather(gather_indices)}
            if self.labels is not None:
                batch["label"] = self.labels[device_indices]
            if self.with_paths:
                batch["image_path"] = [self.cache.paths[i] for i in indices.tolist()]
            yield batch

    def _to_float(self, batch: dict) -> dict:
        images = batch["image"].float().div_(255)  # the cache holds the preprocessing's 0-1 output x 255
        if self.augmentation is not None:
            images = self.augmentation(images)
        if self.mix is not None:
            if "label" not in batch:
                raise ValueError(
                    "mixup / CutMix (config keys 'augment#mixup_alpha', 'augment#cutmix_alpha') need labels"
                )
            images, batch["label"] = self.mix(images, batch["label"])
        batch["image"] = images.contiguous(memory_format=self.memory_format)
        return batch

    def __iter__(self) -> Iterator[dict]:
        batches = self._batches()
        if self.cache.storage == "memmap":  # read ahead from disk while the current batch trains
            batches = ThreadBuffer(batches, buffer_size=2, timeout=0.01)
        for batch in batches:
            yield self._to_float(batch)
