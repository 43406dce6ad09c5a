"""The persistent image cache and the loader that cuts batches from it."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image

from bundle import cache as cache_module
from bundle.augment import BatchAugmentation
from bundle.cache import ImageCache, fingerprint
from bundle.fastpath import CachedBatchLoader
from bundle.imbalance import sampler
from tests.bundle_runs import finished_pid

REPO = Path(__file__).resolve().parents[1]


def preprocessing(image_size=(32, 32), **overrides):
    """The bundle's own preprocessing from configs/inference.json, at ``image_size``."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    parser.update({"image_size": list(image_size), **overrides})
    return parser.get_parsed_content("preprocessing")


def write_images(folder: Path, n: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(path)
        items.append({"image": str(path), "label": i % 7})
    return items


def solid_images(folder: Path, n: int) -> list[dict]:
    """Images of one flat grey each, grey level 10 * i: an image's identity survives any warp."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"solid{i:03d}.png"
        Image.fromarray(np.full((30, 40, 3), 10 * i, dtype=np.uint8)).save(path)
        items.append({"image": str(path), "label": i % 7})
    return items


def build(items, cache_dir, image_size=(32, 32), **kwargs):
    return ImageCache(items, preprocessing(image_size), str(cache_dir), num_workers=0, progress=False, **kwargs)


def npy_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.npy"))


def test_cache_holds_the_bundle_preprocessing_output(tmp_path):
    items = write_images(tmp_path / "images")
    cache = build(items, tmp_path / "cache")
    chain = Compose(preprocessing())
    for i, item in enumerate(items):
        expected = torch.as_tensor(chain(dict(item))["image"]).float()
        cached = cache.gather(torch.tensor([i]))[0].float() / 255
        assert cached.shape == expected.shape == (3, 32, 32)
        assert torch.equal(cached, expected)  # the preprocessing ends on the 8-bit levels the cache stores
    assert cache.labels.tolist() == [item["label"] for item in items]


def test_a_second_run_reuses_the_file_without_decoding(tmp_path, monkeypatch):
    items = write_images(tmp_path / "images")
    first = build(items, tmp_path / "cache")
    assert first.build_seconds > 0
    modified = first.path.stat().st_mtime_ns
    monkeypatch.setattr(cache_module._Decode, "__call__", lambda self, item: pytest.fail("decoded again"))
    second = build(items, tmp_path / "cache")
    assert second.path == first.path and second.build_seconds == 0
    assert second.path.stat().st_mtime_ns == modified
    assert torch.equal(second.images, first.images)


def test_a_changed_image_rebuilds_the_cache(tmp_path):
    items = write_images(tmp_path / "images")
    old = build(items, tmp_path / "cache")
    Image.fromarray(np.zeros((45, 60, 3), dtype=np.uint8)).save(items[3]["image"])  # new pixels, new size/mtime
    new = build(items, tmp_path / "cache")
    assert new.path != old.path and new.build_seconds > 0
    assert new.gather(torch.tensor([3])).max().item() == 0
    assert torch.equal(new.gather(torch.tensor([2])), old.gather(torch.tensor([2])))


def test_an_image_replaced_by_another_of_the_same_size_and_mtime_rebuilds_the_cache(tmp_path):
    items = write_images(tmp_path / "images")
    base = fingerprint(items, preprocessing())
    path = Path(items[3]["image"])
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `touch -r` from a backup would
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert fingerprint(items, preprocessing()) != base


def test_settings_without_attributes_and_the_projects_own_code_key_the_cache(tmp_path, monkeypatch):
    """A dtype describes as its value (it has no __dict__); editing a module whose class the preprocessing uses
    (a helper or a constant that no hashed function shows) changes the key."""
    items = write_images(tmp_path / "images")
    as_dtype = [
        fingerprint(items, preprocessing(**{"preprocessing#2#dtype": f"$torch.{name}"}))
        for name in ("float16", "float64")
    ]
    assert as_dtype[0] != as_dtype[1]
    module = tmp_path / "cache_probe_module.py"
    module.write_text("SCALE = 1\n\n\nclass Probe:\n    def __call__(self, data):\n        return data\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from cache_probe_module import Probe

    before = fingerprint(items, [*preprocessing(), Probe()])
    module.write_text(module.read_text().replace("SCALE = 1", "SCALE = 2"))
    assert fingerprint(items, [*preprocessing(), Probe()]) != before
    assert "bundle.imageio" in cache_module._own_code(cache_module.describe(preprocessing()))


def test_a_full_disk_stops_the_build_naming_the_file_and_the_key_and_leftovers_go(tmp_path, monkeypatch):
    """Without the space reserved first, writing into the file's memory map on a full disk ends the process
    with SIGBUS; a killed build's temporary file is removed by the next build."""
    items = write_images(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    leftover = cache_dir / f".training-0123.npy.tmp{finished_pid()}"
    leftover.write_bytes(b"half a cache")

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no room for the image cache .*\.tmp\d+ .*config key 'cache_dir'"):
        build(items, cache_dir)
    assert list(cache_dir.iterdir()) == [], "neither the killed run's file nor this one's is left"


def test_size_preprocessing_and_datalist_each_key_the_cache(tmp_path):
    items = write_images(tmp_path / "images")
    base = fingerprint(items, preprocessing())
    assert fingerprint(items, preprocessing()) == base  # stable
    assert fingerprint(items, preprocessing((24, 24))) != base
    assert fingerprint(items, preprocessing(**{"preprocessing#2#a_max": 250.0})) != base
    assert fingerprint(items, preprocessing(**{"preprocessing#3#mode": "bilinear"})) != base
    assert fingerprint(items[:-1], preprocessing()) != base
    assert fingerprint(list(reversed(items)), preprocessing()) != base
    assert build(items, tmp_path / "cache", (24, 24)).shape == (3, 24, 24)


def test_fingerprint_is_the_same_in_a_fresh_process(tmp_path):
    """No object addresses or other per-process values leak into the key."""
    items = write_images(tmp_path / "images")
    code = (
        "import json, sys; from tests.test_cache import preprocessing; from bundle.cache import fingerprint; "
        "print(fingerprint(json.loads(sys.argv[1]), preprocessing()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, json.dumps(items)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == fingerprint(items, preprocessing())


def test_fingerprint_is_the_same_once_the_preprocessing_has_run_in_this_process(tmp_path):
    """MONAI's traceable transforms keep thread-local state from their first call: a cache built without worker
    processes (num_workers 0) ran them here, and the next cache's key must not change for it."""
    items = write_images(tmp_path / "images")
    chain = preprocessing()
    unused = fingerprint(items, chain)
    Compose(chain)({"image": items[0]["image"]})
    assert fingerprint(items, chain) == unused


def test_an_interrupted_build_leaves_nothing_to_read(tmp_path, monkeypatch):
    items = write_images(tmp_path / "images")
    real_call, calls = cache_module._Decode.__call__, []

    def dies_midway(self, item):
        calls.append(item)
        if len(calls) == 7:
            raise KeyboardInterrupt("killed while decoding")
        return real_call(self, item)

    monkeypatch.setattr(cache_module._Decode, "__call__", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build(items, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no cache file, no temporary left behind
    monkeypatch.setattr(cache_module._Decode, "__call__", real_call)
    assert build(items, tmp_path / "cache").build_seconds > 0


def test_a_damaged_cache_file_is_decoded_again(tmp_path):
    items = write_images(tmp_path / "images")
    first = build(items, tmp_path / "cache")
    expected = first.images.clone()
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])  # e.g. a disk that filled up under another tool
    again = build(items, tmp_path / "cache")
    assert again.build_seconds > 0 and torch.equal(again.images, expected)


def test_memmap_storage_serves_the_same_batches_from_disk(tmp_path):
    items = write_images(tmp_path / "images", n=20)
    in_memory = build(items, tmp_path / "cache", storage="device")
    on_disk = build(items, tmp_path / "cache", storage="memmap")
    assert isinstance(on_disk.images, np.memmap)
    indices = torch.tensor([5, 1, 19, 1, 0])  # unsorted, repeated: as a sampler draws them
    assert torch.equal(on_disk.gather(indices), in_memory.gather(indices))
    batches = [list(CachedBatchLoader(c, batch_size=6)) for c in (in_memory, on_disk)]
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_preprocessing_that_leaves_0_1_is_refused_with_the_way_out(tmp_path):
    items = write_images(tmp_path / "images", n=2)
    no_scaling = [t for t in preprocessing() if type(t).__name__ != "ScaleIntensityRanged"]
    with pytest.raises(ValueError, match="train_chain.json"):
        ImageCache(items, no_scaling, str(tmp_path / "cache"), num_workers=0, progress=False)
    assert npy_files(tmp_path / "cache") == []


def test_an_unknown_storage_is_named(tmp_path):
    with pytest.raises(ValueError, match="cache_storage"):
        build(write_images(tmp_path / "images", n=1), tmp_path / "cache", storage="gpu")


def test_every_image_once_per_epoch_in_even_batches(tmp_path):
    cache = build(write_images(tmp_path / "images", n=23), tmp_path / "cache")
    loader = CachedBatchLoader(cache, batch_size=8, shuffle=True, seed=0)
    assert len(loader) == 3
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(b["label"]) for b in batches] == [8, 8, 7]
        identities = torch.cat([b["image"][:, 0, 0, 0] for b in batches])
        epochs.append(identities)
        assert len(torch.unique(torch.cat([b["image"].reshape(len(b["image"]), -1) for b in batches]), dim=0)) == 23
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order each epoch


def test_labels_travel_with_their_images_through_augmentation(tmp_path):
    items = solid_images(tmp_path / "images", 24)
    cache = build(items, tmp_path / "cache", (16, 16))
    augmentation = BatchAugmentation(rotate_prob=1, flip_prob=0.5, zoom_prob=1, seed=3)
    loader = CachedBatchLoader(cache, batch_size=10, shuffle=True, augmentation=augmentation, with_paths=True)
    seen = 0
    for batch in loader:
        grey = (batch["image"].mean(dim=(1, 2, 3)) * 255 / 10).round().long()  # the image's index
        assert batch["label"].tolist() == [items[i]["label"] for i in grey.tolist()]
        assert batch["image_path"] == [items[i]["image"] for i in grey.tolist()]
        seen += len(grey)
    assert seen == 24


def test_a_class_balancing_sampler_sets_the_epoch(tmp_path):
    items = solid_images(tmp_path / "images", 14)
    items = [dict(item, label=0 if i < 12 else 1) for i, item in enumerate(items)]  # 12 vs 2
    cache = build(items, tmp_path / "cache", (8, 8))
    loader = CachedBatchLoader(cache, batch_size=7, sampler=sampler("sampler", items, seed=0))
    labels = torch.cat([b["label"] for _ in range(20) for b in loader])
    assert len(labels) == 20 * 14
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.1)  # balanced, not 2/14


def test_batches_drawn_by_a_sampler_all_have_one_size(tmp_path):
    """23 random draws in batches of 8: 3 batches of 7, the last 2 draws left out (never a second shape)."""
    items = solid_images(tmp_path / "images", 23)
    cache = build(items, tmp_path / "cache", (8, 8))
    loader = CachedBatchLoader(cache, batch_size=8, sampler=sampler("sampler", items, seed=0))
    assert [len(b["label"]) for b in loader] == [7, 7, 7]
    assert [len(b["label"]) for b in CachedBatchLoader(cache, batch_size=8, shuffle=True)] == [8, 8, 7]
    shuffled = CachedBatchLoader(cache, batch_size=8, shuffle=True, equal_batches=True)  # train.json's
    assert [len(b["label"]) for b in shuffled] == [7, 7, 7]
    seen = [torch.cat([b["image"][:, 0, 0, 0] for b in shuffled]) for _ in range(5)]
    assert len(torch.unique(torch.cat(seen))) == 23, "a different few left out every epoch"


def test_an_evaluation_epoch_takes_a_few_more_batches_to_give_them_one_size(tmp_path):
    """Every image kept: 24 images in batches of at most 10 are 3 batches of 8 (ceil(24 / 10) = 3 divides 24);
    28 are 4 of 7 rather than 10, 9, 9 (as 1,504 validation images in batches of at most 512 are 4 of 376);
    25 in batches of at most 9 stay 9, 8, 8 (neither 3 nor 4 divides 25, and 5 is more than a third more)."""
    items = write_images(tmp_path / "images", n=28)
    for n, batch_size, sizes in [(24, 10, [8, 8, 8]), (28, 10, [7] * 4), (25, 9, [9, 8, 8]), (25, 30, [25])]:
        cache = build(items[:n], tmp_path / f"cache{n}", (8, 8))
        loader = CachedBatchLoader(cache, batch_size=batch_size, with_paths=True)
        batches = list(loader)
        assert [len(b["label"]) for b in batches] == sizes and len(loader) == len(sizes)
        assert [p for b in batches for p in b["image_path"]] == [item["image"] for item in items[:n]], "in order"


def test_channels_last_batches(tmp_path):
    cache = build(write_images(tmp_path / "images", n=4), tmp_path / "cache")
    batch = next(iter(CachedBatchLoader(cache, batch_size=4, channels_last=True)))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["image"].dtype == torch.float32 and 0 <= batch["image"].min() and batch["image"].max() <= 1
