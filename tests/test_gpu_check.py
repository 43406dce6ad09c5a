"""scripts/gpu_check.py's profile of the training steps, run on the CPU: a GPU session runs it unattended,
so what a CPU can catch is caught here."""

import collections
import gzip
import json
import math
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList, FunctionEvent

from bundle import data
from scripts import gpu_check
from tests.bundle_runs import REPO


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


def test_the_trainer_is_timed_against_the_model_alone_in_one_process(synthetic_dir, tmp_path, one_thread):
    split = data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=0)
    datalist = data.write_datalist(split, tmp_path / "datalist.json", synthetic_dir)
    out, saved = {}, []
    gpu_check.trainer_vs_model_only(
        str(synthetic_dir), datalist, tmp_path, 2, out, lambda: saved.append(json.dumps(out)), image_size=[32, 32]
    )
    assert out["image_size"] == [32, 32] and out["batch_size"] == 64 and out["amp"] is False
    for name in ("trainer", "trainer_eager", "model_only_eager"):
        assert out[name]["img_per_s"] > 0 and out[name]["ms_per_step"] > 0, name
    assert out["model_only_graphed"] == {"skipped": "CUDA graphs need a CUDA device"}
    assert out["trainer_vs_model_only"] == pytest.approx(
        out["trainer"]["img_per_s"] / out["model_only_eager"]["img_per_s"]
    )
    assert out["graph_speedup"] == pytest.approx(out["trainer"]["img_per_s"] / out["trainer_eager"]["img_per_s"])
    views = out["validation_views"]
    assert views["views"] == "flips" and views["images"] == len(json.loads(datalist.read_text())["validation"])
    assert views["batched_speedup"] == pytest.approx(views["per_view_s"] / views["batched_s"])
    assert json.loads(saved[-1]) == json.loads(json.dumps(out)), "saved after its last part"
    assert not (tmp_path / "speed" / "models" / "history.json").exists(), "stopped within the first epoch"


def test_the_first_step_is_read_from_the_bundles_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("x\n2026-12-04 INFO first training step done 7.25 s after the process started (unix time 1.0)\n")
    assert gpu_check.first_step_s(log) == 7.25
    assert gpu_check.first_step_s(tmp_path / "missing.log") is None


def test_the_whole_check_runs_end_to_end(synthetic_dir, tmp_path):
    """Every part of the unattended GPU check, on a CPU at 32 px: a GPU session cannot afford to find a
    broken step."""
    small = {"image_size": [32, 32], "batch_size": 32}
    gpu_check.check(
        str(synthetic_dir),
        str(tmp_path / "work"),
        epochs=1,
        speed_sizes=(32,),
        speed_steps=2,
        recipes={"tiny": {"max_epochs": 2}},
        seeds=[0, 1],
        parallel=2,
        train_overrides=small,
        require_cuda=False,
    )
    report = json.loads((tmp_path / "work" / "gpu_check.json").read_text())
    assert report["device_name"] == "cpu" and report["train_wall_s"] > 0
    assert report["first_step_s"]["cold"] > 0 and report["first_step_s"]["warm"] > 0
    assert 0 <= report["metrics"]["auc_macro"] <= 1
    assert report["trainer_vs_model_only"]["32"] > 0
    assert report["tta_batched_speedup"]["32"] > 0
    assert [row["name"] for row in report["recipes"]] == ["tiny_s0", "tiny_s1"]
    assert all(row["image_size"] == [32, 32] and row["epochs"] == 2 for row in report["recipes"])
    assert report["recipe_wall_s"] == report["recipes"][0]["train_wall_s"]
    assert report["parallel"]["parallel"] == 2 and report["parallel"]["alone_img_per_s"] > 0


def test_a_failed_run_is_recorded_and_the_check_goes_on_to_its_next_part(synthetic_dir, tmp_path, monkeypatch):
    """The cold run is the first to reach several GPU paths: its failure must not cost the session's other parts."""
    run = gpu_check._run

    def failing_training(command, log):
        if "configs/train.json" in command:  # the cold run, not the speed part's in-process trainer
            log.write_text("RuntimeError: CUDA error: an illegal memory access was encountered\n")
            raise gpu_check.StepFailed(f"failed (1): {' '.join(command)}\n{log.read_text()}")
        return run(command, log)

    monkeypatch.setattr(gpu_check, "_run", failing_training)
    small = {"image_size": [32, 32], "batch_size": 32}
    gpu_check.check(str(synthetic_dir), str(tmp_path), epochs=1, speed_sizes=(32,), speed_steps=2, recipes={},
                    train_overrides=small, require_cuda=False)  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "illegal memory access" in report["errors"]["train"] and set(report["errors"]) == {"train"}
    assert "evaluate_wall_s" not in report, "nothing trained to evaluate"
    assert report["trainer_vs_model_only"]["32"] > 0


def test_require_cuda_false_from_the_command_line_runs_on_a_cpu(synthetic_dir, tmp_path):
    """fire hands ``--require_cuda false`` over as text, which is truthy: it must read as false."""
    command = [sys.executable, "scripts/gpu_check.py", "--dataset_dir", str(synthetic_dir), "--work_dir", str(tmp_path)]
    command += ["--require_cuda", "false", "--epochs", "0", "--speed_sizes", "[]", "--recipes", "{}"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["device_name"] == "cpu"


def test_the_gpu_session_script_runs_end_to_end_on_a_cpu(synthetic_dir, tmp_path):
    """scripts/gpu_session.sh, the one command a lent GPU runs unattended, rehearsed on a CPU: its glue (the
    arguments it hands each script, the first run it finds for the guard, the archive it brings back) fails
    only where a failure costs a GPU session."""
    out, work = tmp_path / "out", tmp_path / "work"
    recipe = {"tiny_s0": {"image_size": [32, 32], "batch_size": 32, "max_epochs": 1, "seed": 0}}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3: this interpreter
        "WORK_DIR": str(work),
        "WHEELS_DIR": str(tmp_path / "no_wheels"),
        "OOD_SETS": str(tmp_path / "no_sets"),
        "EPOCHS": "0",
        "SPEED_SIZES": "[]",
        "SEEDS": "None",
        "GPU_CHECK_ARGS": "--require_cuda false",
    }
    command = ["bash", "scripts/gpu_session.sh", str(synthetic_dir), str(out), json.dumps(recipe)]
    session = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert session.returncode == 0 and session.stdout.rstrip().endswith("gpu_session done"), session.stdout

    report = json.loads((out / "gpu_check.json").read_text())
    assert [row["name"] for row in report["recipes"]] == ["tiny_s0"]
    assert report["recipes"][0]["image_size"] == [32, 32] and report["recipes"][0]["epochs"] == 1
    # the guard measured on that run's weights, refitted with each statistics split and class weighting
    guard = json.loads((out / "ood.json").read_text())
    assert guard["weights"] == str(work / "recipes" / "tiny_s0" / "models" / "model.pt")
    assert len(guard["refits"]) == 4 and {"far_all", "near_blurred"} <= set(guard["sets"])
    assert guard["latency"]["ratio"] > 0
    with tarfile.open(out / "runs.tgz") as archive:
        names = set(archive.getnames())
    assert {"./gpu_check.json", "./recipes/tiny_s0/models/model.json", "./recipes/tiny_s0/eval/metrics.json"} <= names
    assert {"./session/pip_freeze.txt", "./session/importtime.log"} <= names
    assert len(list(out.iterdir())) <= 8, "the device tool brings back eight files at most"
    assert not any("/cache/" in name for name in names)
    assert "passed" in (out / "pytest.log").read_text() or "skipped" in (out / "pytest.log").read_text()
