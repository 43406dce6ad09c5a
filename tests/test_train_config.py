"""train.json's choices that depend on the device, checked without one: the config resolves them from
``device`` alone, so pointing ``device`` at CUDA shows what a GPU run gets."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.metrics import compute_roc_auc
from torch.utils._python_dispatch import TorchDispatchMode

from bundle import data, training
from bundle.cache import ImageCache
from bundle.fastpath import CachedBatchLoader
from bundle.handlers import PredictionsToCPU
from bundle.training import scaled_learning_rate, trainer_iteration
from tests.serving import bundle_with_random_weights

REPO = Path(__file__).resolve().parents[1]


# a DenseNet small enough for CPU epochs in seconds
TINY_DENSENET = {
    "_target_": "DenseNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": "@num_classes",
    "init_features": 8,
    "growth_rate": 4,
    "block_config": [2, 2],
}


def train_config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    parser.update(overrides)
    return parser


def training_workflow(synthetic_dir: Path, bundle_root: Path, overlays=(), **overrides) -> ConfigWorkflow:
    """train.json (plus ``overlays``) as ``monai.bundle run`` builds it, at 32 px on a lesion-level split
    of the synthetic set."""
    datalist = bundle_root / "datalist.json"
    data.write_datalist(data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=0), datalist, synthetic_dir)
    return ConfigWorkflow(
        config_file=[str(REPO / "configs" / name) for name in ["train.json", *overlays]],
        meta_file=str(REPO / "configs" / "metadata.json"),
        logging_file=str(REPO / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=str(synthetic_dir),
        datalist=str(datalist),
        image_size=[32, 32],
        **overrides,
    )


def test_a_gpu_run_gets_large_batches_bf16_channels_last_and_autotuning():
    parser = train_config(device="$torch.device('cuda:0')")
    assert parser.get_parsed_content("batch_size") == 512
    assert parser.get_parsed_content("amp") is True
    assert parser.get_parsed_content("amp_kwargs") == {"dtype": torch.bfloat16}
    assert parser.get_parsed_content("memory_format") == torch.channels_last
    assert parser.get_parsed_content("cudnn_benchmark") is True


def test_a_cpu_run_keeps_the_tutorials_batch_and_full_precision():
    parser = train_config(device="$torch.device('cpu')")
    assert parser.get_parsed_content("batch_size") == 64
    assert parser.get_parsed_content("amp") is False
    assert parser.get_parsed_content("memory_format") == torch.preserve_format


def test_a_gpu_run_steps_adamw_fused():
    parser = train_config(device="$torch.device('cuda:0')", network=torch.nn.Linear(2, 2))
    assert parser.get_parsed_content("optimizer").defaults["fused"] is True
    parser = train_config(device="$torch.device('cpu')", network=torch.nn.Linear(2, 2))
    assert parser.get_parsed_content("optimizer").defaults["fused"] is False


@pytest.mark.parametrize("dtype, keeps_scaler", [(torch.bfloat16, False), (torch.float16, True)])
def test_the_trainer_iteration_drops_loss_scaling_for_bf16_only_and_hands_on_the_whole_batch(dtype, keeps_scaler):
    torch.manual_seed(0)
    network = torch.nn.Linear(4, 3)
    before = network.weight.detach().clone()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.rand(8, 4), "label": torch.arange(8) % 3}] * 2,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.5),
        loss_function=torch.nn.CrossEntropyLoss(),
        amp=True,
        amp_kwargs={"dtype": dtype},
        decollate=False,
        iteration_update=trainer_iteration,
    )
    # MONAI's run() makes a CUDA scaler, which a CPU disables; an enabled CPU one stands in for it
    trainer.add_event_handler(Events.STARTED, lambda engine: setattr(engine, "scaler", torch.amp.GradScaler("cpu")))
    trainer.run()
    assert trainer.scaler.is_enabled() is keeps_scaler
    assert not torch.equal(network.weight, before), "the optimizer stepped"
    (output,) = trainer.state.output
    assert output["loss"].ndim == 0 and output["pred"].shape == (8, 3)


def test_the_learning_rate_follows_the_batch_size():
    network = torch.nn.Linear(2, 2)
    parser = train_config(device="$torch.device('cpu')", batch_size=256, network=network)
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(0.002)  # sqrt(256/64) x
    parser = train_config(device="$torch.device('cpu')", batch_size=256, lr_scaling="none", network=network)
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(0.001)


def test_validation_postprocessing_takes_bf16_predictions_to_roc_auc():
    """Under bfloat16 autocast the network's outputs are bfloat16, which numpy (and ROC AUC) can't take."""
    postprocessing = train_config().get_parsed_content("validate#postprocessing")
    logits = torch.randn(14, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    items = [postprocessing({"pred": logits[i], "label": i % 7}) for i in range(14)]
    preds, labels = torch.stack([i["pred"] for i in items]), torch.stack([i["label"] for i in items])
    assert preds.dtype == torch.float32 and preds.sum(1).allclose(torch.ones(14), atol=1e-2)
    assert labels.shape == (14, 7)
    assert 0.0 <= compute_roc_auc(preds, labels) <= 1.0


def test_moving_predictions_to_the_cpu_a_batch_at_a_time_changes_nothing_validation_computes():
    """The batch moves to the CPU before it is split per image: the same float32 predictions and the same
    macro ROC AUC as MONAI's own iteration, from bfloat16 logits as under autocast."""
    torch.manual_seed(0)
    images, labels = torch.rand(40, 5), torch.arange(40) % 7
    network = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Identity()).to(torch.bfloat16)
    parser = train_config()

    def validate(handlers):
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=[
                {"image": images[i : i + 10].bfloat16(), "label": labels[i : i + 10]} for i in range(0, 40, 10)
            ],
            network=network,
            postprocessing=parser.get_parsed_content("validate#postprocessing"),
            key_val_metric=parser.get_parsed_content("validate#key_metric"),
            val_handlers=handlers,
        )
        batch_dtypes = []
        evaluator.add_event_handler(  # after the handlers: what the split into images receives
            IterationEvents.FORWARD_COMPLETED, lambda engine: batch_dtypes.append(engine.state.output["pred"].dtype)
        )
        evaluator.run()
        return evaluator.state.metrics["val_auc"], evaluator.state.output, batch_dtypes

    (plain_auc, plain, plain_dtypes), (auc, ours, dtypes) = validate([]), validate([PredictionsToCPU()])
    assert plain_dtypes == [torch.bfloat16] * 4 and dtypes == [torch.float32] * 4, "moved before the split"
    assert auc == pytest.approx(plain_auc) and 0 < auc < 1
    for mine, theirs in zip(ours, plain, strict=True):
        assert mine["pred"].dtype == torch.float32 and mine["pred"].device.type == "cpu"
        assert torch.equal(mine["pred"], theirs["pred"]) and torch.equal(mine["label"], theirs["label"])


def test_learning_rate_scaling():
    assert scaled_learning_rate(1e-3, 256, 64, "sqrt") == pytest.approx(2e-3)
    assert scaled_learning_rate(1e-3, 256, 64, "linear") == pytest.approx(4e-3)
    assert scaled_learning_rate(1e-3, 256, 64, "none") == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_learning_rate(1e-3, 256, 64, "cubic")


@pytest.mark.parametrize(
    "overlays, dataset_type, loader_type",
    [
        ([], ImageCache, CachedBatchLoader),
        (["train_chain.json"], CacheDataset, DataLoader),
    ],
)
def test_the_training_workflow_has_monais_bundle_properties_and_one_data_path(
    overlays, dataset_type, loader_type, synthetic_dir, tmp_path
):
    """MONAI's ConfigWorkflow finds every required training property (train#trainer, train#dataset,
    train#inferer, ...) and the optional ones under the ids it expects; each config builds one data path."""
    workflow = training_workflow(synthetic_dir, tmp_path, overlays, num_workers=0)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 30
    for split in ("train", "validate"):
        assert isinstance(workflow.parser.get_parsed_content(f"{split}#dataset"), dataset_type)
        assert isinstance(workflow.parser.get_parsed_content(f"{split}#dataloader"), loader_type)
    # only the fast path writes decoded images (both leave the preflight's memo in cache_dir)
    assert bool(list((tmp_path / "cache").glob("*.npy"))) == (dataset_type is ImageCache)


def test_the_inference_workflow_has_monais_bundle_properties(synthetic_dir, tmp_path):
    root = bundle_with_random_weights(tmp_path / "bundle", trained_image_size=[32, 32])
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.json"),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(root),
        input=str(synthetic_dir),
        image_size=[32, 32],
        num_workers=0,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert len(workflow.dataset) == len(list(synthetic_dir.rglob("*.jpg")))


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``item()``, ``float()``, ``bool()`` of a tensor, ...):
    on a GPU each one waits until every kernel queued before it has run."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_from_the_device_but_the_logged_loss(synthetic_dir, tmp_path):
    """Every handler of train.json attached, the real trainer: within a step (its iteration and every
    ITERATION_COMPLETED handler) the only value read back is the loss TensorBoard logs every 10 steps.
    A per-step read (a handler's float(loss), a weight average's step counter, per-image labels) would
    make the CPU wait for the GPU every step instead of queuing the next one."""
    steps = 12
    workflow = training_workflow(
        synthetic_dir,
        tmp_path,
        batch_size=8,
        max_epochs=1,
        # fused as on a GPU: the CPU's per-parameter AdamW reads each step count from a CPU tensor
        **{"train#trainer#epoch_length": steps, "optimizer#fused": True},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    reads, per_step = ScalarReads(), []

    def step_started(engine):
        reads.count = 0
        reads.__enter__()

    def step_completed(engine):  # registered after every handler of the config, so it runs last
        reads.__exit__(None, None, None)
        per_step.append(reads.count)

    trainer.add_event_handler(Events.ITERATION_STARTED, step_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, step_completed)
    workflow.run()
    assert len(per_step) == steps
    logged = [i for i in range(steps) if (i + 1) % 10 == 0]
    assert [n for i, n in enumerate(per_step) if i not in logged] == [0] * (steps - len(logged)), per_step
    assert all(per_step[i] == 1 for i in logged), per_step
    history = json.loads((tmp_path / "models" / "history.json").read_text())
    assert history[0]["train_loss"] > 0, "the epoch's mean loss is still recorded"


def test_a_compiled_network_trains_with_every_handler_of_the_config(synthetic_dir, tmp_path):
    """--compile true: the trainer steps a torch.compile'd network (a small DenseNet here, to keep the
    compilation short) while the weight average, the checkpoint and the history read the module itself."""
    steps = 3
    workflow = training_workflow(
        synthetic_dir,
        tmp_path,
        batch_size=8,
        max_epochs=1,
        compile=True,
        network_def=TINY_DENSENET,
        **{"train#trainer#epoch_length": steps},
    )
    workflow.initialize()
    trainer, network = (
        workflow.parser.get_parsed_content("train#trainer"),
        workflow.parser.get_parsed_content("network"),
    )
    average = workflow.parser.get_parsed_content("ema").model
    before = {k: v.clone() for k, v in average.state_dict().items()}
    workflow.run()
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.network._orig_mod is network
    assert trainer.state.iteration == steps
    assert any(not torch.equal(before[k], v) for k, v in average.state_dict().items()), "the average moved"
    history = json.loads((tmp_path / "models" / "history.json").read_text())
    assert np.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_auc"] <= 1
    assert (tmp_path / "models" / "model.pt").exists() and (tmp_path / "models" / "checkpoint_last.pt").exists()


def test_validation_postprocessing_gives_what_monais_chain_gave():
    """bundle.training.ValidationOutputd replaced MONAI's EnsureTyped, CastToTyped, CopyItemsd,
    CalibratedSoftmaxd and AsDiscreted(to_onehot) chain for speed: the same keys, values and dtypes."""
    from monai.transforms import AsDiscreted, CastToTyped, Compose, CopyItemsd, EnsureTyped

    from bundle.calibration import CalibratedSoftmaxd, Calibration

    calibration = Calibration(temperature=1.7)
    monai_chain = Compose(
        [
            EnsureTyped(keys=["pred", "label"], device="cpu", track_meta=False),
            CastToTyped(keys="pred", dtype=torch.float32),
            CopyItemsd(keys="pred", names="logits"),
            CalibratedSoftmaxd(keys="pred", calibration=calibration),
            AsDiscreted(keys="label", to_onehot=7),
        ]
    )
    ours = train_config(calibration=calibration).get_parsed_content("validate#postprocessing")
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    for i in range(6):
        item = {"pred": logits[i], "label": torch.tensor(i % 7), "image_path": f"{i}.jpg"}
        expected, got = monai_chain(dict(item)), ours(dict(item))
        assert set(got) == set(expected)
        for key in ("pred", "logits", "label"):
            assert got[key].dtype == expected[key].dtype == torch.float32
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key
        assert got["image_path"] == f"{i}.jpg"


@pytest.mark.parametrize("text, on", [("false", False), ("true", True), ("False", False), ("1", True)])
def test_boolean_keys_typed_on_the_command_line_mean_what_they_say(text, on):
    """``monai.bundle run --amp false`` hands the config the text 'false' (fire parses only False), which
    Python reads as true: every boolean key must read it as false."""
    parser = train_config(amp=text, compile=text, channels_last=text, cuda_graphs=text, tta=text)
    assert parser.get_parsed_content("train#trainer#amp") is on
    assert parser.get_parsed_content("validate#evaluator#amp") is on
    assert parser.get_parsed_content("train#trainer#compile") is on
    assert parser.get_parsed_content("memory_format") == (torch.channels_last if on else torch.preserve_format)
    assert parser.get_parsed_content("train#trainer#iteration_update").enabled is on
    assert parser.get_parsed_content("validate#inferer").enabled is on
    benchmark = torch.backends.cudnn.benchmark
    try:
        training.seed_run(0, text)
        assert torch.backends.cudnn.benchmark is on
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = False


def test_a_boolean_key_that_is_not_a_boolean_is_named():
    with pytest.raises(ValueError, match="'cudnn_benchmark'"):
        training.seed_run(0, "sometimes")
    with pytest.raises(RuntimeError) as error:
        train_config(amp="sometimes").get_parsed_content("train#trainer#amp")
    assert "'amp'" in str(error.value.__cause__ or error.value)


@pytest.mark.parametrize("overlay", ["evaluate.json", "calibrate.json"])
def test_evaluation_and_calibration_run_in_the_precision_serving_uses(overlay):
    """Training validates in bf16 on a GPU (for speed); the test figures and a refitted calibration come from
    full-precision logits, as the Predictor, TorchServe and SageMaker compute them."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json"), str(REPO / "configs" / overlay)])
    parser.update({"device": "$torch.device('cuda:0')"})
    assert parser.get_parsed_content("amp") is True
    assert parser["validate"]["evaluator"]["amp"] is False
