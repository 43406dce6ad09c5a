"""The recipe levers of issue 17, each a config key whose default leaves training as it was:
logit-adjusted loss, deferred re-sampling, mixup / CutMix, random resized crop, dropout, dihedral TTA."""

import ast
import json

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from bundle import data, imbalance
from bundle.augment import BatchAugmentation, BatchMix, refuse_batch_only
from bundle.fastpath import CachedBatchLoader
from bundle.inferers import FlipAveragingInferer
from bundle.networks import classifier_dropout
from tests.bundle_runs import FAST, REPO, TRAIN, run_bundle
from tests.test_train_config import TINY_DENSENET, ScalarReads, train_config, training_workflow

C = 7
COUNTS = [30, 50, 10, 5, 400, 3, 2]


# --- logit-adjusted cross-entropy ---------------------------------------------------------------------


def test_logit_adjusted_loss_is_cross_entropy_on_logits_shifted_by_tau_log_prior():
    logits, labels = torch.randn(16, C, generator=torch.Generator().manual_seed(0)), torch.arange(16) % C
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    weight = torch.rand(C, generator=torch.Generator().manual_seed(1))
    for tau in (0.0, 0.5, 1.0, 2.0):
        loss = imbalance.LogitAdjustedLoss(COUNTS, tau=tau, label_smoothing=0.1, weight=weight)
        expected = torch.nn.functional.cross_entropy(
            logits + tau * prior.log(), labels, weight=weight, label_smoothing=0.1
        )
        assert loss(logits, labels) == pytest.approx(float(expected), rel=1e-6)
    plain = imbalance.LogitAdjustedLoss(COUNTS, tau=0.0)(logits, labels)
    assert plain == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)


def test_logit_adjusted_loss_at_tau_1_is_the_balanced_softmax():
    """Ren et al.: -log(n_y exp(z_y) / sum_j n_j exp(z_j))."""
    logits, labels = torch.randn(16, C, generator=torch.Generator().manual_seed(0)), torch.arange(16) % C
    n = torch.tensor(COUNTS, dtype=torch.float32)
    balanced = -torch.log((n * logits.exp()) / (n * logits.exp()).sum(1, keepdim=True))[torch.arange(16), labels]
    assert imbalance.LogitAdjustedLoss(COUNTS, tau=1.0)(logits, labels) == pytest.approx(float(balanced.mean()))


def test_logit_adjusted_loss_takes_soft_targets_and_one_hot_equals_indices():
    logits, labels = torch.randn(8, C, generator=torch.Generator().manual_seed(0)), torch.arange(8) % C
    loss = imbalance.LogitAdjustedLoss(COUNTS, tau=1.0, label_smoothing=0.1)
    one_hot = torch.nn.functional.one_hot(labels, C).float()
    assert loss(logits, one_hot) == pytest.approx(float(loss(logits, labels)), rel=1e-6)
    soft = 0.3 * one_hot + 0.7 * one_hot.roll(1, 0)
    assert loss(logits, soft) == pytest.approx(
        0.3 * float(loss(logits, labels)) + 0.7 * float(loss(logits, labels.roll(1)))
    )


def test_the_config_picks_the_loss_by_imbalance_and_keeps_the_old_one_by_default():
    counts = [10, 20, 30, 0, 5, 5, 30]
    for strategy, power in (("sampler", 1.0), ("loss", 0.5), ("none", 1.0)):
        loss = imbalance.cross_entropy(strategy, counts, power, label_smoothing=0.1)
        assert type(loss) is torch.nn.CrossEntropyLoss and loss.label_smoothing == 0.1
        expected = imbalance.loss_weights(strategy, counts, power)
        assert (loss.weight is None) == (expected is None)
        assert expected is None or torch.equal(loss.weight, expected)
    adjusted = imbalance.cross_entropy("logit_adjusted", counts, label_smoothing=0.1, logit_adjust_tau=0.5)
    assert isinstance(adjusted, imbalance.LogitAdjustedLoss) and torch.isfinite(adjusted.adjustment).all()
    assert imbalance.sampler("logit_adjusted", [{"label": 0}]) is None  # plain sampling
    with pytest.raises(ValueError, match="'logit_adjust_tau'"):
        imbalance.LogitAdjustedLoss(counts, tau=-1)
    parsed = train_config(imbalance="logit_adjusted", logit_adjust_tau=0.7, **{"train#class_counts": counts})
    loss = parsed.get_parsed_content("loss")
    assert isinstance(loss, imbalance.LogitAdjustedLoss)
    assert loss.adjustment[0] == pytest.approx(
        0.7 * torch.log(torch.tensor(10 / 101)).item()
    )  # the absent class counts as 1


# --- deferred re-sampling ---------------------------------------------------------------------------


def _items(counts=(90, 10)) -> list[dict]:
    return [{"label": label} for label, n in enumerate(counts) for _ in range(n)]


def test_the_deferred_sampler_is_plain_until_the_last_epochs_then_balanced():
    items = _items()
    sampler = imbalance.sampler("sampler", items, seed=0, deferred_epochs=2, max_epochs=5)
    assert isinstance(sampler, imbalance.DeferredSampler) and len(sampler) == len(items)
    rare = []
    for _ in range(5):
        draws = list(sampler)
        assert len(draws) == len(items)
        rare.append(sum(items[i]["label"] == 1 for i in draws) / len(draws))
    assert rare[:3] == [0.1] * 3, "plain epochs are permutations"
    assert all(0.35 < r < 0.65 for r in rare[3:]), rare
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(len(items)))


def test_deferred_epochs_is_off_by_default_and_refused_without_the_sampler():
    assert type(imbalance.sampler("sampler", _items(), seed=0)).__name__ == "WeightedRandomSampler"
    with pytest.raises(ValueError, match="'deferred_epochs'"):
        imbalance.sampler("loss", _items(), deferred_epochs=2, max_epochs=5)
    with pytest.raises(ValueError, match="'deferred_epochs'"):
        imbalance.sampler("sampler", _items(), deferred_epochs=-1, max_epochs=5)


class _Cache:
    """The parts of an ImageCache a CachedBatchLoader reads: n tiny images, each filled with its index."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)
        self.images = torch.arange(len(labels), dtype=torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 3, 4, 4)
        self.device, self.storage, self.paths = torch.device("cpu"), "device", [str(i) for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]


def test_a_resumed_run_switches_at_the_trainers_epoch_with_the_same_batches():
    """The sampler follows the engine, so a run resumed at epoch 3 is balanced at epochs 4-5 as an
    uninterrupted one is; every epoch has the same number of equal batches across the switch."""
    items = _items()
    seen = {}

    def run(resume_at=None):
        sampler = imbalance.sampler("sampler", items, seed=0, deferred_epochs=2, max_epochs=5)
        loader = CachedBatchLoader(_Cache([i["label"] for i in items]), batch_size=16, sampler=sampler)
        engine = Engine(lambda e, batch: batch["label"])
        imbalance.follow_epochs(sampler, engine)
        shapes = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: shapes.append(e.state.output.shape))
        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: seen.__setitem__(e.state.epoch, sampler.balanced(e.state.epoch))
        )
        if resume_at is not None:  # as ResumeCheckpoint restores the trainer's state
            engine.load_state_dict({"epoch": resume_at, "max_epochs": 5, "epoch_length": len(loader)})
        engine.run(loader, max_epochs=5)
        return shapes, len(loader)

    shapes, batches = run()
    assert seen == {1: False, 2: False, 3: False, 4: True, 5: True}
    assert len(shapes) == 5 * batches and set(shapes) == {torch.Size([len(items) // batches])}, (
        "equal batches, constant count"
    )
    seen.clear()
    shapes, _ = run(resume_at=3)
    assert seen == {4: True, 5: True} and len(shapes) == 2 * batches


def test_train_json_trains_plainly_then_balanced_for_the_deferred_epochs(synthetic_dir, tmp_path):
    """Two real epochs of train.json with deferred_epochs 1: the first sees each training image once,
    the second draws the rare classes more often than they occur; the batch count is the same."""
    workflow = training_workflow(
        synthetic_dir,
        tmp_path,
        deferred_epochs=1,
        max_epochs=2,
        batch_size=32,
        val_interval=5,
        network_arch=TINY_DENSENET,
    )
    workflow.initialize()
    sampler, trainer = (workflow.parser.get_parsed_content(k) for k in ("train#sampler", "train#trainer"))
    assert isinstance(sampler, imbalance.DeferredSampler) and sampler.switch_epoch == 1
    seen = {1: [], 2: []}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen[e.state.epoch].append(e.state.batch["label"].clone())
    )
    workflow.run()
    assert sampler.engine is trainer, "train.json's run lets it follow the trainer's epoch"
    counts = torch.tensor(workflow.parser.get_parsed_content("train#class_counts"))
    plain, balanced = (torch.bincount(torch.cat(seen[epoch]), minlength=C) for epoch in (1, 2))
    assert len(seen[1]) == len(seen[2]) and (plain <= counts).all() and counts.sum() - plain.sum() < len(seen[1])
    assert (balanced > counts).any() and balanced.sum() == plain.sum()


# --- mixup and CutMix --------------------------------------------------------------------------------


def _class_images(labels: torch.Tensor, size=(12, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images filled with a value that names their class: a mixed image's mean is its targets' mix of them."""
    values = torch.linspace(0.0, 1.0, C)
    return values[labels].reshape(-1, 1, 1, 1).expand(-1, 3, *size).clone(), values


def _peek(mix: BatchMix, images: torch.Tensor) -> str:
    """The kind of mix the next call draws, its generator left as it was."""
    state = mix.rng.bit_generator.state
    kind = mix.draw(images.shape[2:])[0]
    mix.rng.bit_generator.state = state
    return kind


@pytest.mark.parametrize(
    "alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}]
)
def test_mixed_labels_sum_to_one_and_are_the_images_mix_weights(alphas):
    mix = BatchMix(C, mix_prob=1.0, seed=0, **alphas)
    labels = torch.arange(16) % C
    kinds = set()
    for _ in range(20):
        images, values = _class_images(labels)
        kind = _peek(mix, images)
        kinds.add(kind)
        mixed, targets = mix(images, labels)
        assert targets.shape == (16, C) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(16))
        # mixup: every pixel is the weights' mix; CutMix: the pasted area is 1 - lam of the image
        assert torch.allclose(mixed.mean((1, 2, 3)), targets @ values, atol=1e-5), kind
        if kind == "cutmix":
            from_partner = (mixed[:, 0] != images[:, 0]).float().mean((1, 2))
            own = targets[torch.arange(16), labels]
            differs = own < 1  # a pair of one class pastes nothing visible
            assert torch.allclose(from_partner[differs], 1 - own[differs], atol=1e-5)
    expected = {k for k in ("mixup", "cutmix") if alphas.get(f"{k}_alpha")}
    assert kinds == expected


def test_every_batch_gets_float_soft_labels_of_one_shape_mixed_or_not_with_no_read_back():
    mix = BatchMix(C, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5, seed=0)
    labels = torch.arange(8) % C
    kinds, reads = [], ScalarReads()
    with reads:
        for _ in range(40):
            images, _values = _class_images(labels)
            kinds.append(_peek(mix, images))
            mixed, targets = mix(images, labels)
            assert mixed.shape == images.shape and targets.shape == (8, C) and targets.dtype == torch.float32
    assert reads.count == 0
    assert 10 < kinds.count("none") < 30 and "mixup" in kinds and "cutmix" in kinds
    unmixed = BatchMix(C, mixup_alpha=1.0, mix_prob=0.0)
    images, _values = _class_images(labels)
    out, targets = unmixed(images, labels)
    assert torch.equal(out, images) and torch.equal(targets, torch.nn.functional.one_hot(labels, C).float())


def test_the_loader_mixes_only_when_a_mix_alpha_is_set():
    cache = _Cache([i % C for i in range(40)])
    plain = next(iter(CachedBatchLoader(cache, batch_size=10, mix=BatchMix(C))))
    assert plain["label"].dtype == torch.long and plain["label"].shape == (10,)
    batches = list(CachedBatchLoader(cache, batch_size=10, shuffle=True, mix=BatchMix(C, mixup_alpha=0.4)))
    assert {(b["image"].shape, b["label"].shape, b["label"].dtype) for b in batches} == {
        (torch.Size([10, 3, 4, 4]), torch.Size([10, C]), torch.float32)
    }


def test_torchs_cross_entropy_takes_the_soft_labels_with_smoothing_and_weights():
    mix = BatchMix(C, mixup_alpha=0.4, seed=0)
    labels = torch.arange(8) % C
    _, targets = mix(_class_images(labels)[0], labels)
    loss = imbalance.cross_entropy("loss", [5] * C, label_smoothing=0.1)
    assert torch.isfinite(loss(torch.randn(8, C), targets))


def test_bad_mix_settings_name_their_key():
    for kwargs, key in (
        ({"mixup_alpha": -1}, "mixup_alpha"),
        ({"cutmix_alpha": -0.1}, "cutmix_alpha"),
        ({"mix_prob": 2}, "mix_prob"),
    ):
        with pytest.raises(ValueError, match=f"'augment#{key}'"):
            BatchMix(C, **kwargs)


def test_the_per_sample_chain_refuses_batch_only_augmentation(synthetic_dir, tmp_path):
    refuse_batch_only({"mixup_alpha": 0.0, "cutmix_alpha": 0, "crop_scale": [1, 1]}, "x.json")
    for key, value in (("mixup_alpha", 0.2), ("cutmix_alpha", 1.0), ("crop_scale", [0.5, 1.0])):
        with pytest.raises(ValueError, match=f"'augment#{key}'"):
            refuse_batch_only({key: value}, "configs/train_chain.json")
    workflow = training_workflow(
        synthetic_dir, tmp_path, ["train_chain.json"], num_workers=0, **{"augment#mixup_alpha": 0.2}
    )
    with pytest.raises(RuntimeError) as refused:  # MONAI wraps the expression's error
        workflow.initialize()
    assert "'augment#mixup_alpha'" in str(refused.value.__cause__)


# --- random resized crop -----------------------------------------------------------------------------


def test_crop_areas_and_ratios_stay_in_range_and_the_crop_fits():
    augmentation = BatchAugmentation(crop_scale=(0.3, 0.8), crop_ratio=(0.75, 4 / 3), seed=0)
    params = augmentation.sample_parameters(5000)
    sides, offset = params["crop"], params["crop_offset"]
    area, ratio = sides.prod(1), sides[:, 1] / sides[:, 0]
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 0.8 + 1e-6
    assert area.mean() == pytest.approx(0.55, abs=0.01)
    assert ratio.min() >= 0.75 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert (sides <= 1).all() and ((offset.abs() + sides / 2) <= 0.5 + 1e-6).all(), "inside the image"
    reads = ScalarReads()
    with reads:
        augmentation(torch.rand(4, 3, 16, 16))
    assert reads.count == 0, "nothing read back from the device"


def test_a_crop_resamples_its_region_like_cropping_then_resizing():
    image = torch.nn.functional.avg_pool2d(
        torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)), 3, 1, 1
    )
    augmentation = BatchAugmentation()
    params = {
        "angle": torch.zeros(1),
        "zoom": torch.ones(1),
        "flip": torch.zeros(1, 2, dtype=torch.bool),
        "crop": torch.tensor([[0.5, 0.5]]),
        "crop_offset": torch.tensor([[0.25, -0.25]]),  # the crop's centre moved down and left by a quarter
    }
    warped = augmentation.warp(image, augmentation.matrices(params, image.shape[2:]))
    region = image[:, :, 16:32, 0:24]
    expected = torch.nn.functional.interpolate(region, size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(warped[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], atol=1e-5)


def test_no_crop_by_default_leaves_every_stream_of_a_seed_unchanged():
    default, uncropped = (
        BatchAugmentation(seed=3),
        BatchAugmentation(seed=3, crop_scale=(1.0, 1.0), crop_ratio=(0.5, 2)),
    )
    assert "crop" not in default.sample_parameters(4)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(BatchAugmentation(seed=3)(images), uncropped(images))
    with pytest.raises(ValueError, match="'augment#crop_scale'"):
        BatchAugmentation(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="'augment#crop_ratio'"):
        BatchAugmentation(crop_ratio=(2, 1))


# --- dropout -----------------------------------------------------------------------------------------


def _dropout(network: torch.nn.Module) -> list[float]:
    return [m.p for m in network.modules() if isinstance(m, torch.nn.Dropout)]


def test_dropout_prob_puts_dropout_before_the_classifier_and_adds_no_weights():
    assert _dropout(train_config().get_parsed_content("network_def")) == []
    network = train_config(dropout_prob=0.2).get_parsed_content("network_def")
    assert _dropout(network) == [0.2]
    assert list(network.class_layers._modules) == ["relu", "pool", "flatten", "dropout", "out"]
    served = ConfigParser()  # inference.json's plain network loads the trained weights key for key
    served.read_config(str(REPO / "configs" / "inference.json"))
    plain = served.get_parsed_content("network_def")
    plain.load_state_dict(network.state_dict())
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(plain.eval()(images), network.eval()(images)), "a no-op in eval mode"
    with pytest.raises(ValueError, match="'dropout_prob'"):
        classifier_dropout(torch.nn.Linear(2, 2), 0.5)


# --- test-time augmentation --------------------------------------------------------------------------


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(C)
    ).eval()


def test_the_dihedral_inferer_is_invariant_to_turning_and_flipping_its_input():
    network, images = _conv_net(), torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    dihedral, flips = FlipAveragingInferer(views="dihedral"), FlipAveragingInferer()
    reference = dihedral(images, network)
    for turned in (
        torch.rot90(images, 1, (2, 3)),
        torch.rot90(images, 3, (2, 3)),
        torch.flip(images, (2,)).transpose(2, 3),
    ):
        assert torch.allclose(dihedral(turned, network), reference, atol=1e-5)
    assert not torch.allclose(flips(torch.rot90(images, 1, (2, 3)), network), flips(images, network), atol=1e-5)
    with pytest.raises(ValueError, match="'tta_views'"):
        dihedral(torch.rand(1, 3, 12, 10), network)
    with pytest.raises(ValueError, match="'tta_views'"):
        FlipAveragingInferer(views="rotations")


def test_tta_views_reaches_validation_and_serving_defaulting_to_flips():
    assert train_config().get_parsed_content("validate#inferer").views == "flips"
    assert train_config(tta_views="dihedral").get_parsed_content("validate#inferer").views == "dihedral"


@pytest.mark.parametrize("views", ["flips", "dihedral"])
def test_the_views_as_one_batch_give_the_logits_of_one_pass_per_view(views):
    """``tta_batched`` stacks the views into one batch (one pass's kernel launches on a GPU); a network in
    eval mode treats each image on its own, so the averaged logits are those of a pass per view."""
    network, images = _conv_net(), torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        per_view = FlipAveragingInferer(views=views)(images, network)
        batched = FlipAveragingInferer(views=views, batched="true")(images, network)
    assert batched.shape == (3, per_view.shape[1])
    torch.testing.assert_close(batched, per_view, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="'tta_batched'"):
        FlipAveragingInferer(batched="sometimes")


def test_crops_add_five_closer_looks_to_every_view():
    """tta_crop_scale 0.75 on a 12 px image: each of the 4 flips whole, then its centre and its four corners
    of 9 px resized back to 12, so 24 passes, batched or not; a constant image gives every crop the same."""
    seen = []

    def network(images):
        seen.append(images.clone())
        return _conv_net()(images)

    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        per_view = FlipAveragingInferer(crop_scale=0.75)(images, network)
        assert len(seen) == 24 and all(view.shape == images.shape for view in seen)
        torch.testing.assert_close(
            seen[2][:, :, :, :],
            torch.nn.functional.interpolate(images[:, :, :9, :9], size=(12, 12), mode="bilinear", align_corners=False),
        )  # the first corner of the unflipped image
        batched = FlipAveragingInferer(crop_scale=0.75, batched=True)(images, network)
        torch.testing.assert_close(batched, per_view, atol=1e-6, rtol=1e-5)
        flat = torch.full((1, 3, 12, 12), 0.3)
        torch.testing.assert_close(FlipAveragingInferer(crop_scale=0.75)(flat, network), _conv_net()(flat))
    for scale in (0.4, 1.2):
        with pytest.raises(ValueError, match="'tta_crop_scale'"):
            FlipAveragingInferer(crop_scale=scale)
    assert train_config(tta_crop_scale=0.875).get_parsed_content("validate#inferer").crop_scale == 0.875
    assert train_config().get_parsed_content("validate#inferer").crop_scale == 1.0


def test_tta_batched_reaches_validation_and_serving_off_on_a_cpu():
    assert train_config().get_parsed_content("validate#inferer").batched is False
    assert train_config(tta_batched=True).get_parsed_content("validate#inferer").batched is True
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    assert parser.get_parsed_content("inferer").batched is False
    parser["tta_batched"] = True
    assert parser.get_parsed_content("inferer", lazy=False).batched is True


# --- every lever at once, as a user runs it ----------------------------------------------------------


def test_monai_bundle_run_trains_with_every_lever_on(synthetic_dir, tmp_path):
    """One real epoch through ``python -m monai.bundle run`` with each new key set (a small DenseNet for
    speed; deferred_epochs, which needs imbalance 'sampler', has its own run above); the run also prints
    what reached the network and the loss, so a key the config ignored would show."""
    datalist = tmp_path / "datalist.json"
    data.write_datalist(data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=0), datalist, synthetic_dir)
    report = (
        "$print('LEVERS', repr({'dropout': [m.p for m in @network.modules() if isinstance(m, torch.nn.Dropout)],"
        " 'loss': type(@loss).__name__, 'views': @validate#inferer.views, 'mix': @train#mix.enabled,"
        " 'crop': list(@train#augmentation.crop_scale)}))"
    )
    result = run_bundle(
        TRAIN,
        bundle_root=tmp_path,
        dataset_dir=synthetic_dir,
        datalist=datalist,
        max_epochs=1,
        imbalance="logit_adjusted",
        logit_adjust_tau=1.0,
        dropout_prob=0.2,
        tta_views="dihedral",
        **{
            "augment#mixup_alpha": 0.2,
            "augment#cutmix_alpha": 1.0,
            "augment#mix_prob": 0.8,
            "augment#crop_scale": "[0.5,1.0]",
            "run": f'["$@train#trainer.run()", "{report}"]',
            "network_arch": json.dumps(TINY_DENSENET),
        },
        **FAST,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("LEVERS"))
    assert ast.literal_eval(line[len("LEVERS ") :]) == {
        "dropout": [0.2],
        "loss": "LogitAdjustedLoss",
        "views": "dihedral",
        "mix": True,
        "crop": [0.5, 1.0],
    }
    history = json.loads((tmp_path / "models" / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_loss"] > 0 and 0 <= history[0]["val_auc"] <= 1
