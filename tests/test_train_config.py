"""train.json's choices that depend on the device, checked without one: the config resolves them from
``device`` alone, so pointing ``device`` at CUDA shows what a GPU run gets."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc

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
    assert parser.get_parsed_content("data_path") == "fast"


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
