"""scripts/gpu_check.py's profile of the training steps, run on the CPU: a GPU session runs it unattended,
so what a CPU can catch is caught here."""

import collections
import gzip
import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList, FunctionEvent

from bundle import data
from scripts import gpu_check


@pytest.fixture
def one_thread():
    """One intra-op thread: on two cores shared with other jobs, two OpenMP threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_profile_times_and_profiles_the_bundles_own_training_steps(synthetic_dir, tmp_path, one_thread):
    split = data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=0)
    datalist = data.write_datalist(split, tmp_path / "datalist.json", synthetic_dir)
    out, saved = {}, []
    gpu_check.profile_training(
        str(synthetic_dir), datalist, tmp_path, 2, out, lambda: saved.append(json.dumps(out)), image_size=[32, 32]
    )

    batches = math.ceil(len(json.loads(datalist.read_text())["training"]) / out["batch_size"])
    assert out["device"] == "cpu" and out["image_size"] == [32, 32] and out["amp"] is False
    assert out["warmup_steps"] == batches and out["steps"] == 2
    assert out["timed"]["ms_per_step"] > 0 and out["timed"]["img_per_s"] > 0
    assert "syncs" not in out, "sync debug mode is CUDA's"
    profiler = out["profiler"]
    assert profiler["wall_ms_per_step"] > 0 and "gpu_busy_fraction" not in profiler
    top = profiler["top_self_cpu_time_total"]
    assert len(top) == gpu_check.TOP_OPS
    assert any("convolution" in row["op"] for row in top)
    assert all(row["self_cpu_ms_per_step"] >= 0 and row["calls_per_step"] > 0 for row in top)
    assert top[0]["self_cpu_ms_per_step"] == max(row["self_cpu_ms_per_step"] for row in top)

    assert out["trace"]["steps"] == 2 and out["trace"]["trace"] == "profile_trace.json.gz"
    with gzip.open(tmp_path / "profile_trace.json.gz", "rt") as trace:
        assert json.load(trace)["traceEvents"]
    text = (tmp_path / "profile.txt").read_text()
    assert "timed:" in text and "top 15 ops by self_cpu_time_total" in text and "aten::" in text

    # saved after setting up and after each part, the last save all of it
    assert len(saved) == 5 and json.loads(saved[-1]) == json.loads(json.dumps(out))
    # stopped within the first epoch: no validation, no checkpoint
    assert not list((tmp_path / "profile").rglob("*.pt"))
    assert not (tmp_path / "profile" / "models" / "history.json").exists()


def test_synchronising_calls_are_counted_by_call_site_and_other_warnings_pass():
    syncs = collections.Counter()

    def synchronise():
        warnings.warn(f"called a {gpu_check.SYNC_WARNING}", UserWarning, stacklevel=1)

    def step():
        for _ in range(3):
            synchronise()
        warnings.warn("something else", UserWarning, stacklevel=1)

    with pytest.warns(UserWarning, match="something else"), gpu_check._recorded_syncs(syncs):
        step()
    ((stack, count),) = syncs.items()
    assert count == 3
    assert stack[0].startswith("tests/test_gpu_check.py:") and stack[0].endswith("(synchronise)")
    assert stack[1].endswith("(step)") and len(stack) == 5


def test_a_gpu_profiles_device_figures_come_from_its_kernels():
    """What CUDA activity adds (device time, busy share, kernels per step, the device table), from
    hand-made events over 2 steps: two overlapping kernels, a copy, an annotation spanning the gaps
    on the device's timeline, the CPU ops that launched them."""

    def event(id, name, start, end, device=DeviceType.CPU, **kwargs):
        return FunctionEvent(id, name, 0, start, end, stack=[], use_device="cuda", device_type=device, **kwargs)

    convolution = event(1, "aten::convolution", 0, 400)
    convolution.append_kernel("conv_kernel", 0, 300)
    events = EventList(
        [
            convolution,
            event(2, "aten::item", 400, 1000),
            event(3, "conv_kernel", 100, 400, DeviceType.CUDA),
            event(4, "add_kernel", 300, 500, DeviceType.CUDA),
            event(5, "Memcpy DtoH (Device -> Pageable)", 900, 950, DeviceType.CUDA),
            event(6, "Optimizer.step#AdamW.step", 0, 1000, DeviceType.CUDA, is_user_annotation=True),
        ],
        use_device="cuda",
    )
    events._build_tree()  # as the profiler does
    profile = SimpleNamespace(events=lambda: events, key_averages=events.key_averages)
    summary, text = gpu_check._profile_summary(profile, seconds=0.002, steps=2)

    assert summary["wall_ms_per_step"] == pytest.approx(1.0)
    assert summary["device_ms_per_step"] == pytest.approx((300 + 200 + 50) / 1000 / 2)
    assert summary["gpu_busy_fraction"] == pytest.approx((400 + 50) / 2000), "the overlap counts once"
    assert summary["kernels_per_step"] == 1 and summary["copies_and_fills_per_step"] == 0.5
    assert summary["top_self_cpu_time_total"][0]["op"] == "aten::item"
    device = summary["top_self_device_time_total"]
    assert device[0]["self_device_ms_per_step"] == pytest.approx(0.15) and device[-1]["self_device_ms_per_step"] == 0
    assert "self_device_time_total" in text and "conv_kernel" in text
