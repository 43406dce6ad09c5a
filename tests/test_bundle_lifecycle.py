"""What happens around a training run: kills and resumes, DDP, MLflow tracking, bad input, metadata."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.optimizers import WarmupCosineSchedule

from bundle import data
from bundle.labels import CLASS_NAMES
from bundle.sidecar import verified_sidecar
from tests.bundle_runs import (
    EVALUATE,
    FAST,
    INFERENCE,
    MULTI_GPU,
    REPO,
    TRAIN,
    TRAIN_CHAIN,
    bundle_command,
    bundle_env,
    read_json,
    run_bundle,
)
from tests.serving import bundle_with_random_weights
from tests.test_train_config import TINY_DENSENET, training_workflow

CALIBRATE = "['configs/train.json','configs/calibrate.json']"


@pytest.fixture(scope="module")
def dataset(synthetic_dir, tmp_path_factory):
    datalist = tmp_path_factory.mktemp("lifecycle") / "datalist.json"
    data.write_datalist(data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=0), datalist, synthetic_dir)
    return {"dataset_dir": synthetic_dir, "datalist": datalist}


def test_a_killed_run_resumes_losing_at_most_one_epoch(dataset, tmp_path):
    command = bundle_command(TRAIN, bundle_root=tmp_path, max_epochs=3, **dataset, **FAST)
    checkpoint = tmp_path / "models" / "checkpoint_last.pt"
    log = open(tmp_path / "first_run.log", "w")
    first = subprocess.Popen(command, cwd=REPO, env=bundle_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no chance to clean up, as with a lost machine
    first.wait()
    assert checkpoint.exists(), (tmp_path / "first_run.log").read_text()[-3000:]
    saved_epoch = read_json(tmp_path / "models" / "history.json")[-1]["epoch"]
    assert saved_epoch < 3, "the run finished before it could be killed"

    second = run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=3, **dataset, **FAST)
    assert f"at epoch {saved_epoch} of 3" in second.stdout
    history = read_json(tmp_path / "models" / "history.json")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 3 * state["trainer"]["epoch_length"]
    assert state["best_model_saver"]["best_metric"] == pytest.approx(max(row["val_auc"] for row in history))


def test_a_resumed_run_follows_its_own_epochs_batch_size_and_learning_rate(synthetic_dir, tmp_path):
    """Raising max_epochs to train on (and changing the batch size, learning rate or weight decay with it): the
    checkpoint gives the epochs done, the weights and the moments; the schedule is this run's, at the steps
    this run's epochs have, so it anneals to 0 at the new last epoch instead of restarting or ending mid-way."""
    common = {"network_arch": TINY_DENSENET, "num_workers": 0, "warmup_epochs": 1}
    first = training_workflow(synthetic_dir, tmp_path, max_epochs=2, batch_size=32, learning_rate=1e-3, **common)
    first.initialize()
    first.run()
    first.finalize()
    second = training_workflow(
        synthetic_dir, tmp_path, max_epochs=4, batch_size=64, learning_rate=4e-3, weight_decay=0.1, **common
    )
    second.initialize()
    parser = second.parser
    trainer, optimizer = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("optimizer")
    steps = []
    trainer.add_event_handler(
        Events.ITERATION_STARTED,
        lambda engine: steps.append((engine.state.epoch, engine.state.iteration, optimizer.param_groups[0]["lr"])),
    )
    second.run()
    second.finalize()

    epoch_length = len(parser.get_parsed_content("train#dataloader"))  # batches of 64
    reference = WarmupCosineSchedule(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=parser.get_parsed_content("optimizer#lr")),
        warmup_steps=epoch_length,
        t_total=4 * epoch_length,
    )
    expected = []
    for _ in range(4 * epoch_length):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [(epoch, iteration) for epoch, iteration, _ in steps] == [
        (3 + i // epoch_length, 2 * epoch_length + i + 1) for i in range(2 * epoch_length)
    ], "epochs 3 and 4, at this run's batches per epoch"
    assert [lr for *_, lr in steps] == pytest.approx(expected[2 * epoch_length :])
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert [row["epoch"] for row in read_json(tmp_path / "models" / "history.json")] == [1, 2, 3, 4]


@pytest.mark.parametrize("overlays", [(), ("train_chain.json",)], ids=["cached", "chain"])
def test_a_resumed_run_draws_the_batches_the_uninterrupted_run_draws(synthetic_dir, tmp_path, overlays):
    """The random streams of the data path are in the checkpoint: epoch 2 of a run stopped after epoch 1 and
    resumed gets the batches (order, class-balanced draws, augmentation, mixing) that an uninterrupted run's
    epoch 2 gets, not a replay of epoch 1's."""
    settings = {"network_arch": TINY_DENSENET, "num_workers": 0, "batch_size": 32, "augment#prob": 0.5}
    if not overlays:
        settings |= {"augment#mixup_alpha": 0.4, "augment#mix_prob": 0.5, "augment#colour_prob": 0.5}

    def first_batches(root, max_epochs: int) -> dict[int, tuple]:
        workflow = training_workflow(synthetic_dir, root, overlays, max_epochs=max_epochs, **settings)
        workflow.initialize()
        seen = {}

        def record(engine) -> None:
            if engine.state.epoch not in seen:
                batch = engine.state.batch
                seen[engine.state.epoch] = (batch["label"].clone(), batch["image"].clone())

        workflow.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED, record)
        workflow.run()
        workflow.finalize()
        return seen

    whole = first_batches(tmp_path / "whole", 2)
    first_batches(tmp_path / "cut", 1)
    resumed = first_batches(tmp_path / "cut", 2)
    assert list(resumed) == [2]
    assert torch.equal(resumed[2][0], whole[2][0]) and torch.allclose(resumed[2][1], whole[2][1])
    assert not torch.equal(whole[2][1], whole[1][1])


def test_resume_false_starts_over(dataset, tmp_path):
    run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=1, **dataset, **FAST)
    again = run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=1, resume="false", **dataset, **FAST)  # as typed
    assert "resumed from" not in again.stdout
    assert [row["epoch"] for row in read_json(tmp_path / "models" / "history.json")] == [1]


def test_resume_refuses_a_checkpoint_trained_on_another_datalist_size_or_network(dataset, tmp_path):
    """Before any work: no cache is built, model.pt is untouched, and the error names --resume false."""
    run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=1, **dataset, **FAST)
    model, checkpoint = tmp_path / "models" / "model.pt", tmp_path / "models" / "checkpoint_last.pt"
    saved, caches = model.read_bytes(), sorted((tmp_path / "cache").iterdir())
    content = read_json(dataset["datalist"])
    content["training"] = content["training"][1:]
    other = tmp_path / "one_image_less.json"
    other.write_text(json.dumps(content))
    growth_rate_16 = {
        "_target_": "DenseNet121",
        "spatial_dims": 2,
        "in_channels": 3,
        "out_channels": 7,
        "growth_rate": 16,
    }
    for overrides, named in [
        ({"image_size": "[48,48]"}, "image_size [32, 32], this run's is [48, 48]"),
        ({"datalist": other}, "datalist 'sha256:"),
        ({"network_def": json.dumps(growth_rate_16)}, "network 'DenseNet121:sha256:"),
    ]:
        result = run_bundle(
            TRAIN, expect_ok=False, bundle_root=tmp_path, max_epochs=2, **{**dataset, **FAST, **overrides}
        )
        assert f"cannot resume from {checkpoint}: it was trained on something else: " in result.stderr, result.stderr
        assert named in result.stderr and "Pass --resume false to start over" in result.stderr
        assert "preflight" not in result.stdout + result.stderr, "stopped before checking, let alone caching, images"
        assert model.read_bytes() == saved and sorted((tmp_path / "cache").iterdir()) == caches


def test_every_bundle_config_refuses_weights_without_a_sidecar_unless_allowed(dataset, tmp_path):
    root = bundle_with_random_weights(tmp_path / "bundle", trained_image_size=[32, 32])
    weights = root / "models" / "model.pt"
    (root / "models" / "model.json").unlink()
    for config, extra in [(EVALUATE, {}), (CALIBRATE, {}), (INFERENCE, {"input": dataset["datalist"]})]:
        result = run_bundle(config, expect_ok=False, bundle_root=root, **dataset, **FAST, **extra)
        assert f"weights {weights} have no sidecar {root / 'models' / 'model.json'}" in result.stderr, result.stderr
        assert "--allow_missing_sidecar true" in result.stderr
    # the way in for weights trained elsewhere: calibrate.json writes the sidecar, which every loader then accepts
    run_bundle(CALIBRATE, bundle_root=root, allow_missing_sidecar="true", **dataset, **FAST)
    record = verified_sidecar(weights)
    assert record["image_size"] == [32, 32] and record["class_names"] == list(CLASS_NAMES)
    assert record["calibration"]["fit"]["n_images"] == len(read_json(dataset["datalist"])["validation"])


def test_inference_over_a_datalist_runs_the_preflight(synthetic_dir, tmp_path):
    dataset_dir = tmp_path / "dataset"
    shutil.copytree(synthetic_dir, dataset_dir)
    outside = tmp_path / "outside.jpg"
    shutil.copy(next((dataset_dir / "images").glob("*.jpg")), outside)
    (dataset_dir / "images" / "link.jpg").symlink_to(outside)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": "images/link.jpg"}, {"image": "images/absent.jpg"}]}))
    root = bundle_with_random_weights(tmp_path / "bundle", trained_image_size=[32, 32])
    result = run_bundle(
        INFERENCE,
        expect_ok=False,
        bundle_root=root,
        input=datalist,
        dataset_dir=dataset_dir,
        output_dir=tmp_path / "out",
        **FAST,
    )
    assert f"testing[0] images/link.jpg: resolves to {outside.resolve()}, outside dataset_dir" in result.stderr
    assert "testing[1] images/absent.jpg: file not found" in result.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_the_per_sample_chain_still_trains(dataset, tmp_path):
    """configs/train_chain.json: MONAI transforms per sample in loader workers, no decoded-image cache."""
    run_bundle(TRAIN_CHAIN, bundle_root=tmp_path, max_epochs=1, **dataset, **dict(FAST, num_workers=2))
    assert (tmp_path / "models" / "model.pt").exists()
    assert not list((tmp_path / "cache").glob("*.npy"))
    # the guard's statistics from the chain's own pass over the training images, without augmentation
    guard = read_json(tmp_path / "models" / "model.json")["ood"]["fit"]
    n_training = len(read_json(dataset["datalist"])["training"])
    assert guard["statistics_split"] == "training" and guard["n_statistics_images"] == n_training


def test_a_second_run_reuses_the_cache_even_memory_mapped(dataset, tmp_path):
    run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=1, **dataset, **FAST)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")}
    assert sorted(p.name.split("-")[0] for p in files) == ["training", "validation"]
    # as for a dataset larger than memory: batches read from the file on disk
    again = run_bundle(
        TRAIN, bundle_root=tmp_path, max_epochs=1, resume="false", cache_storage="memmap", **dataset, **FAST
    )
    assert read_json(tmp_path / "models" / "history.json")[0]["val_auc"] > 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")} == files
    assert (again.stdout + again.stderr).count("reusing the image cache") == 2


def test_two_process_ddp_on_cpu_with_gloo(dataset, tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    result = run_bundle(MULTI_GPU, launcher=torchrun, bundle_root=tmp_path, max_epochs=2, **dataset, **FAST)
    log = result.stdout + result.stderr
    assert log.count("epoch 2/2:") == 1, "only rank 0 logs the epoch summary"
    history = read_json(tmp_path / "models" / "history.json")
    assert [row["epoch"] for row in history] == [1, 2]
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in state), "saved without the DDP wrapper"
    n_training = len(read_json(dataset["datalist"])["training"])
    shards = [len(np.load(p, mmap_mode="r")) for p in (tmp_path / "cache").glob("training-*.npy")]
    assert len(shards) == 2 and sum(shards) >= n_training and max(shards) <= n_training // 2 + 1, (
        "each rank caches only its own shard"
    )
    # the guard's statistics gathered from both ranks' shards, its thresholds from both validation shards
    guard = read_json(tmp_path / "models" / "model.json")["ood"]["fit"]
    assert guard["statistics_split"] == "training" and guard["n_statistics_images"] == sum(shards)
    assert guard["n_images"] == len(read_json(dataset["datalist"])["validation"])
    # the DDP-trained model evaluates with the single-process config
    run_bundle(EVALUATE, bundle_root=tmp_path, **dataset, **FAST)
    assert read_json(tmp_path / "eval" / "metrics.json")["n_images"] == len(read_json(dataset["datalist"])["testing"])
    # and its checkpoint trains on in one process (a multi-GPU job's checkpoint on a one-GPU instance)
    resumed = run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=3, **dataset, **FAST)
    assert "at epoch 2 of 3" in resumed.stdout
    assert [row["epoch"] for row in read_json(tmp_path / "models" / "history.json")] == [1, 2, 3]


def test_mlflow_tracking_records_the_run(dataset, tmp_path):
    run_bundle(TRAIN, bundle_root=tmp_path, max_epochs=1, tracking="mlflow", **dataset, **FAST)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, "no MLflow run was recorded"
    metrics = set().union(*(run.data.metrics for run in runs))
    assert {"train_loss", "val_auc"} <= metrics


def test_preflight_failure_names_every_bad_file_and_keeps_the_old_model(dataset, tmp_path):
    content = read_json(dataset["datalist"])
    content["training"][0]["image"] = "images/missing.jpg"
    content["validation"][1]["image"] = "../outside.jpg"
    datalist = tmp_path / "bad.json"
    datalist.write_text(json.dumps(content))
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"previous model")
    result = run_bundle(
        TRAIN, expect_ok=False, bundle_root=tmp_path, dataset_dir=dataset["dataset_dir"], datalist=datalist, **FAST
    )
    output = result.stdout + result.stderr
    assert "training[0] images/missing.jpg: file not found" in output
    assert "validation[1] ../outside.jpg" in output
    assert model.read_bytes() == b"previous model"


def test_a_config_typo_is_named(dataset, tmp_path):
    result = run_bundle(
        TRAIN, expect_ok=False, bundle_root=tmp_path, max_epochs=1, **{"optimizer#lrr": 0.1}, **dataset, **FAST
    )
    assert "lrr" in result.stderr


def test_evaluating_without_a_model_says_which_key(dataset, tmp_path):
    result = run_bundle(EVALUATE, expect_ok=False, bundle_root=tmp_path, **dataset, **FAST)
    assert "ckpt_path" in result.stderr and "does not exist" in result.stderr


def test_metadata_verifies_offline_and_matches_the_class_list():
    subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            "configs/metadata.json",
            "--filepath",
            "configs/schema/metadata_schema.json",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        env=dict(os.environ, no_proxy="*"),
    )
    metadata = read_json(REPO / "configs" / "metadata.json")
    outputs = metadata["network_data_format"]["outputs"]["pred"]
    assert [outputs["channel_def"][str(i)] for i in range(len(CLASS_NAMES))] == list(CLASS_NAMES)
    inputs = metadata["network_data_format"]["inputs"]["image"]
    assert inputs["spatial_shape"] == read_json(REPO / "configs" / "inference.json")["image_size"]
