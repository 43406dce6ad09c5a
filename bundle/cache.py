"""A persistent uint8 cache of the bundle's preprocessed images: decode each image once, ever.

``ImageCache`` runs the bundle's own ``preprocessing`` (configs/inference.json: decode, RGB,
0-1 scaling, area resize to image_size) on every item once, in DataLoader workers on all cores,
stores the results as one ``(N, C, H, W)`` uint8 ``.npy`` file, and reuses that file on later runs.
The file name carries a fingerprint of everything that decides its contents: the datalist (paths,
sizes and modification times of the images), the preprocessing (every transform's class and
settings, the source of any function it calls) and the library versions. Change any of them and
the next run decodes again into a new file; the file is written under a temporary name and renamed
when complete, so no run ever reads half of one.

Storage, after the build: ``"device"`` holds the whole cache as a tensor on the training device
(the GPU's memory, or RAM on a CPU); ``"memmap"`` leaves it a memory-mapped file and reads only the
rows of each batch, for datasets larger than memory; ``"auto"`` picks ``"device"`` when the cache
fits comfortably and ``"memmap"`` otherwise.
"""

import errno
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import PIL
import torch
from monai.data import DataLoader
from monai.transforms import Compose
from tqdm import tqdm

from bundle.atomic import atomic_write, remove_leftovers

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or the quantisation changes
STORAGES = ("auto", "device", "memmap")
# "auto" keeps the cache on the device when it takes at most this share of the free memory
DEVICE_SHARE = 0.5
# preprocessing must end in [0, 1]: a little float error either side is rounded away
RANGE_TOLERANCE = 1e-3


def describe(obj, _depth: int = 0, _seen: frozenset = frozenset()):
    """A JSON-able description of a (transform) object: its class and settings, recursively.

    Functions are named and, when their source is available, hashed: editing a converter the
    preprocessing calls changes the description. Random states are left out (they don't change
    what a deterministic transform does), and so is thread-local state, which MONAI's traceable
    transforms create on their first call: a transform used in this process describes as an unused one.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return {"array": np.asarray(obj).tolist()}
    if isinstance(obj, (list, tuple)):
        return [describe(x, _depth + 1, _seen) for x in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, _depth + 1, _seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.random.RandomState, torch.Generator)):
        return "<random state>"
    if inspect.isroutine(obj) or inspect.isclass(obj):
        name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
        try:
            return {"function": name, "source_sha256": hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()}
        except (OSError, TypeError):
            return {"function": name}
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, functools.partial):
        return {
            "partial": describe(obj.func, _depth + 1, _seen),
            "args": describe(list(obj.args), _depth + 1, _seen),
            "keywords": describe(obj.keywords, _depth + 1, _seen),
        }
    if not hasattr(obj, "__dict__"):  # torch.dtype, torch.device...: their repr is their value
        text = repr(obj)
        return {"object": kind} if " at 0x" in text else {"object": kind, "repr": text}
    if id(obj) in _seen or _depth > 12:
        return {"object": kind}
    seen = _seen | {id(obj)}
    settings = {k: v for k, v in sorted(vars(obj).items()) if not isinstance(v, threading.local)}
    return {"object": kind, **{k: describe(v, _depth + 1, seen) for k, v in settings.items()}}


def fingerprint(items: Sequence[dict], preprocessing: Sequence[Callable], image_key: str = "image") -> str:
    """A short hash of what decides the cache's contents (see the module docstring)."""
    digest = hashlib.sha256()
    description = describe(list(preprocessing))
    header = {
        "format": CACHE_FORMAT,
        "numpy": np.__version__,
        "torch": torch.__version__.split("+")[0],
        "monai": __import__("monai").__version__,
        "pillow": PIL.__version__,
        "key": image_key,
        "preprocessing": description,
        "code": _own_code(description),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for item in items:
        path = os.fspath(item[image_key])
        stat = os.stat(path)
        # the change time too: a file replaced by another of the same size, its mtime set back, gets a new one
        digest.update(f"\n{path}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}".encode())
    return digest.hexdigest()[:20]


# versioned as a whole (the header's versions): their code is not hashed
LIBRARIES = ("builtins", "collections", "functools", "monai", "numpy", "PIL", "torch")


def _own_code(description) -> dict[str, str]:
    """sha256 of the source file of every module outside the versioned libraries whose class or function the
    preprocessing uses (``bundle.imageio`` for the reader): editing a helper those call, or a constant, changes
    the key, which hashing the functions alone would miss."""
    modules = set()

    def collect(node) -> None:
        if isinstance(node, dict):
            for key in ("object", "function"):
                if isinstance(node.get(key), str):
                    modules.add(node[key].rsplit(".", 1)[0])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(description)
    code = {}
    for name in sorted(modules):
        module = sys.modules.get(name)
        source = getattr(module, "__file__", None)
        if name.split(".")[0] not in LIBRARIES and source and source.endswith(".py"):
            code[name] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return code


class _Decode(torch.utils.data.Dataset):
    """Item i -> its preprocessed image as uint8 (the preprocessing's 0-1 values scaled to 0-255)."""

    def __init__(self, items: Sequence[dict], preprocessing: Sequence[Callable], image_key: str) -> None:
        self.items = items
        self.chain = Compose(list(preprocessing))
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> np.ndarray:
        return self(self.items[index])

    def __call__(self, item: dict) -> np.ndarray:
        image = torch.as_tensor(self.chain(dict(item))[self.image_key]).float()
        low, high = float(image.min()), float(image.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"{item[self.image_key]}: the preprocessing gives values in [{low:.3g}, {high:.3g}], "
                "but the cached data path stores images as uint8 and needs them in [0, 1]; "
                "end the preprocessing in [0, 1] or train with configs/train_chain.json"
            )
        return (image * 255).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) cache file now: on a full disk, writing into its memory map would kill the
    process with SIGBUS, naming nothing. Where the call is missing or the filesystem cannot (macOS, some network
    filesystems), nothing is reserved."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(
                    error.errno,
                    f"no room for the image cache {path} ({size / 2**20:.0f} MiB): free space there or point config "
                    f"key 'cache_dir' elsewhere ({error.strerror})",
                ) from None


def _default_workers() -> int:
    # torchrun starts one process per GPU on a node: share the node's cores between them
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    import psutil  # declared wherever the bundle trains: requirements.txt, metadata.json, a training job's

    return psutil.virtual_memory().available


class ImageCache:
    """Every item's preprocessed image, decoded once into a persistent uint8 cache.

    Args:
        items: datalist items (dicts with absolute image paths under ``image_key`` and, for
            training, an integer ``label``).
        preprocessing: the bundle's preprocessing transforms (``@preprocessing``); they must end in
            a ``(C, H, W)`` image with values in [0, 1].
        cache_dir: where the ``.npy`` files live.
        device: the training device; the cache is served on it.
        storage: "auto", "device" or "memmap" (see the module docstring).
        num_workers: decoding processes; default all cores (shared between torchrun's local ranks).
        progress: show a progress bar while decoding.
        name: file-name prefix, so that people can tell the files apart (e.g. "training").
    """

    def __init__(
        self,
        items: Sequence[dict],
        preprocessing: Sequence[Callable],
        cache_dir: str,
        device: str | torch.device = "cpu",
        storage: str = "auto",
        num_workers: int | None = None,
        progress: bool = True,
        name: str = "images",
        image_key: str = "image",
    ) -> None:
        if storage not in STORAGES:
            raise ValueError(f"config key 'cache_storage' must be one of {STORAGES}, got {storage!r}")
        self.items = list(items)
        if not self.items:
            raise ValueError(f"the {name!r} split is empty: nothing to cache")
        self.image_key = image_key
        self.device = torch.device(device)
        self.paths = [os.fspath(item[image_key]) for item in self.items]
        self.labels = (
            torch.tensor([int(item["label"]) for item in self.items], device=self.device)
            if all("label" in item for item in self.items)
            else None
        )
        self.path = Path(cache_dir) / f"{name}-{fingerprint(self.items, preprocessing, image_key)}.npy"
        self.build_seconds = 0.0
        array = self._open()
        if array is None:
            started = time.perf_counter()
            self._build(preprocessing, num_workers if num_workers is not None else _default_workers(), progress)
            self.build_seconds = time.perf_counter() - started
            array = self._open()
            if array is None:
                raise RuntimeError(f"{self.path}: the cache just written could not be read back")
        else:
            logger.info("reusing the image cache %s (%d images)", self.path, len(array))
        self.shape = tuple(array.shape[1:])
        if storage == "auto":
            storage = "device" if array.nbytes <= DEVICE_SHARE * _free_bytes(self.device) else "memmap"
        self.storage = storage
        self.images = self._load(array) if storage == "device" else array

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return len(self) * math.prod(self.shape)

    def _open(self) -> np.ndarray | None:
        """The cache file, memory-mapped, or None when there is none or it doesn't fit the datalist."""
        if not self.path.exists():
            return None
        try:
            array = np.load(self.path, mmap_mode="r")
        except (ValueError, OSError) as error:
            logger.warning("%s is unreadable (%s): decoding again", self.path, error)
            return None
        if array.dtype != np.uint8 or array.ndim != 4 or len(array) != len(self.items):
            logger.warning(
                "%s holds %s %s, not %d uint8 images: decoding again",
                self.path,
                array.dtype,
                array.shape,
                len(self.items),
            )
            return None
        return array

    def _load(self, array: np.ndarray, chunk: int = 1024) -> torch.Tensor:
        """The whole cache as a tensor on the device, copied in chunks (never a second full copy in RAM)."""
        images = torch.empty(array.shape, dtype=torch.uint8, device=self.device)
        for start in range(0, len(array), chunk):
            images[start : start + chunk].copy_(torch.from_numpy(np.array(array[start : start + chunk])))
        return images

    def _build(self, preprocessing: Sequence[Callable], num_workers: int, progress: bool) -> None:
        for leftover in remove_leftovers(self.path.parent):
            logger.warning("removed %s, left by a run killed while building a cache", leftover)
        images = _Decode([{self.image_key: p} for p in self.paths], preprocessing, self.image_key)
        loader = DataLoader(images, batch_size=16, shuffle=False, num_workers=min(num_workers, len(images)))

        def write(tmp: Path) -> None:
            out, start = None, 0
            with tqdm(
                total=len(images), desc=f"decoding into {self.path.name}", unit="img", disable=not progress
            ) as bar:
                for batch in loader:
                    if out is None:  # the image shape is known once the first one is decoded
                        out = np.lib.format.open_memmap(
                            tmp, mode="w+", dtype=np.uint8, shape=(len(images), *batch.shape[1:])
                        )
                        _reserve(tmp)
                    out[start : start + len(batch)] = batch.numpy()
                    start += len(batch)
                    bar.update(len(batch))
            out.flush()
            del out

        atomic_write(self.path, write)
        logger.info("decoded %d images into %s", len(images), self.path)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``indices`` (a 1-D CPU or device tensor), on the cache's device."""
        if self.storage == "device":
            return self.images.index_select(0, indices.to(self.device))
        order = indices.cpu().numpy()
        rows = torch.from_numpy(self.images[np.sort(order)])  # sorted reads run through the file once
        rows = rows[torch.from_numpy(np.argsort(np.argsort(order)))]  # back to the requested order
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows
