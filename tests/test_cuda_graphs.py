"""The training step replayed as a CUDA graph (bundle.training.GraphedTrainerIteration) trains exactly
as the eager step does. On a CPU it must be the eager step itself; the graph's own equivalence needs a
GPU (no CI machine has one: scripts/gpu_check.py runs this file on the GPU machine)."""

import copy
import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.optimizers import WarmupCosineSchedule

from bundle.training import GraphedTrainerIteration, trainer_iteration

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: scripts/gpu_check.py runs this on the GPU machine"
)


def small_network() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 7),
    )


def batches(device: str, n: int = 10, size: int = 16, soft_labels: bool = False) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 7, (size,), generator=generator)
        if soft_labels:
            labels = torch.nn.functional.one_hot(labels, 7).float() * 0.8 + 0.2 / 7
        out.append({"image": torch.rand(size, 3, 16, 16, generator=generator).to(device), "label": labels.to(device)})
    return out


def train(network, iteration, device: str, data: list[dict], amp: bool = False, fused: bool = False):
    """SupervisedTrainer as train.json builds it (AdamW, warm-up + cosine stepped every iteration, decollate
    off); returns each step's loss, read after the run."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=0.01, weight_decay=0.05, fused=fused)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=3, t_total=len(data))
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=1,
        train_data_loader=data,
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16},
        decollate=False,
        iteration_update=iteration,
        train_handlers=[LrScheduleHandler(schedule, epoch_level=False, print_lr=False)],
    )
    losses = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"].detach().clone())
    )
    trainer.run()
    return [float(loss) for loss in losses], optimizer


def test_on_a_cpu_the_graphed_iteration_is_the_eager_one(caplog):
    torch.manual_seed(0)
    network = small_network()
    twin = copy.deepcopy(network)
    data = batches("cpu", n=4)
    graphed = GraphedTrainerIteration(enabled=True)
    with caplog.at_level(logging.INFO, logger="bundle.training"):
        graphed_losses, _ = train(network, graphed, "cpu", data)
    eager_losses, _ = train(twin, trainer_iteration, "cpu", data)
    assert graphed.graphs == {} and graphed.reason == "CUDA graphs need a CUDA device"
    assert "training steps run eagerly: CUDA graphs need a CUDA device" in caplog.text
    assert graphed_losses == eager_losses
    for a, b in zip(network.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_switched_off_it_says_so():
    iteration = GraphedTrainerIteration(enabled=False)
    assert iteration._why_not(None) == "cuda_graphs is off"


def test_a_memory_mapped_cache_keeps_the_step_eager():
    """Its read-ahead thread copies to the GPU while the main thread would capture: a capture forbids that."""
    from types import SimpleNamespace

    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cuda", 0)),
        data_loader=SimpleNamespace(cache=SimpleNamespace(storage="memmap")),
    )
    assert "memory-mapped" in GraphedTrainerIteration(enabled=True)._why_not(engine)


@needs_cuda
@pytest.mark.parametrize("amp, soft_labels", [(False, False), (True, False), (True, True)])
def test_replayed_steps_train_as_eager_steps_do(amp, soft_labels):
    """Same losses step by step and the same weights at the end, with a learning rate that changes every
    step (so a schedule frozen into the graph would show), batch-norm statistics, bf16 autocast and
    soft (mixed) labels."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(0)
    network = small_network().cuda()
    twin = copy.deepcopy(network)
    data = batches("cuda", n=10, soft_labels=soft_labels)
    graphed = GraphedTrainerIteration(enabled=True, warmup_steps=2)
    graphed_losses, optimizer = train(network, graphed, "cuda", data, amp=amp, fused=True)
    eager_losses, _ = train(twin, trainer_iteration, "cuda", data, amp=amp, fused=True)
    assert graphed.reason == "" and len(graphed.graphs) == 1, "8 of the 10 steps were replays"
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    saved = optimizer.state_dict()["param_groups"][0]
    assert isinstance(saved["lr"], float) and saved["capturable"] is False, "a checkpoint resumes on a CPU too"
    assert saved["lr"] == pytest.approx(float(optimizer.param_groups[0]["lr"]))
    tolerance = 2e-2 if amp else 1e-4
    assert graphed_losses == pytest.approx(eager_losses, rel=tolerance)
    for name, a in network.state_dict().items():
        b = twin.state_dict()[name]
        assert torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance), name
