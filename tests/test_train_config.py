"""train.json's choices that depend on the device, checked without one: the config resolves them from
``device`` alone, so pointing ``device`` at CUDA shows what a GPU run gets."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import CacheDataset, DataLoader
from monai.metrics import compute_roc_auc

from bundle import data
from bundle.cache import ImageCache
from bundle.fastpath import CachedBatchLoader
from bundle.training import scaled_learning_rate
from tests.serving import bundle_with_random_weights

REPO = Path(__file__).resolve().parents[1]


def train_config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    parser.update(overrides)
    return parser


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
    datalist = tmp_path / "datalist.json"
    data.write_datalist(data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=0), datalist, synthetic_dir)
    workflow = ConfigWorkflow(
        config_file=[str(REPO / "configs" / name) for name in ["train.json", *overlays]],
        meta_file=str(REPO / "configs" / "metadata.json"),
        logging_file=str(REPO / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(synthetic_dir),
        datalist=str(datalist),
        image_size=[32, 32],
        num_workers=0,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 30
    for split in ("train", "validate"):
        assert isinstance(workflow.parser.get_parsed_content(f"{split}#dataset"), dataset_type)
        assert isinstance(workflow.parser.get_parsed_content(f"{split}#dataloader"), loader_type)
    assert (tmp_path / "cache").exists() == (dataset_type is ImageCache)


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
