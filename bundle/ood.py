"""The out-of-distribution guard: know when an image is not a dermoscopy image like the training ones.

The softmax sums to one whatever the input, so a photo of a cat, a blank frame or a screenshot comes
back as a confident-looking lesion class. The guard gives every image a score from the same forward
pass that classifies it, higher meaning further from the training distribution, and flags it when the
score is above a threshold that keeps ``target_share`` (95%) of the validation images. Methods
(``METHODS``; docs/RESULTS.md compares them on real HAM10000):

- ``mahalanobis``: the smallest Mahalanobis distance of the pooled penultimate features to a class
  mean, with one shared covariance (Lee et al., 2018), each class weighted equally in it, shrunk towards
  a multiple of the identity by the Ledoit-Wolf formula, since a few thousand images (~7,000 training or
  ~1,500 validation images) estimate a 1,024-dimensional covariance;
- ``knn``: one minus the cosine similarity of the normalised features to their ``KNN_K``-th nearest
  image of a bank (a subsample of the training images, or the validation images) (Sun et al., 2022);
- ``energy``: the negative log-sum-exp of the logits (Liu et al., 2020);
- ``msp``: minus the maximum softmax probability (Hendrycks and Gimpel, 2017).

The features are what the network's last linear layer reads (``FeatureTap``), averaged over the
test-time views exactly as the logits are, so they are the features of the logits served.

**The fit** (``fit``) reads only in-distribution data, when the calibration is fitted (by training
whenever it saves a better model, or by configs/calibrate.json). Its thresholds come from validation
scores the statistics did not see. The statistics (``STATISTICS``) come from the validation split
itself, with out-of-fold scores for ``mahalanobis`` (``FOLDS`` folds) and leave-one-out for ``knn``
(statistics fitted on the very images they then score would put the threshold too low and flag more
than 5% of new in-distribution images), or from the training split's features, about five times as
many images (``reference``): a better estimated covariance that hides fewer rare lesions
(docs/RESULTS.md), at the cost of one pass over the training split, made once training completes.
Besides each method's one threshold, the fit keeps a threshold per class (``class_thresholds_for``): raised,
for a class whose own validation images score higher, to what keeps ``target_share`` of the images the network
calls that class. Served with ``ood_thresholds`` "class" (the default), an image is judged by the threshold of
its most probable class, so a rare class that varies more than nevi is not hidden (docs/RESULTS.md).
The statistics (class means, shrunk precision matrix, and the kNN bank: the normalised validation features,
or ``KNN_BANK`` training features at most) are too big for the JSON sidecar: they go to a file beside the weights,
named by its content hash (``model.ood-<hash>.pt``), which the sidecar's ``ood`` block names with its
sha256 and the weights' fingerprint. A guard file of other weights, or not the one the sidecar names,
is refused (``Guard.from_sidecar``); a new fit writes a new file before the sidecar names it, so a kill
in between leaves the old pair intact.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bundle.atomic import atomic_write
from bundle.labels import CLASS_NAMES
from bundle.sidecar import FINGERPRINT, SidecarError, read_sidecar, sidecar_path

logger = logging.getLogger(__name__)

METHODS = ("mahalanobis", "knn", "energy", "msp")
FEATURE_METHODS = ("mahalanobis", "knn")
# The config value that serves without a guard.
OFF = "none"
TARGET_SHARE = 0.95
# how the classes weigh in the Mahalanobis covariance: each equally, or by their image counts
CLASS_WEIGHTS = ("equal", "count")
# which split the Mahalanobis and kNN statistics are fitted on (the thresholds always on validation)
STATISTICS = ("validation", "training")
KNN_K = 10
# the kNN bank's rows at most, a seeded subsample of the training split's (about 4 MiB in the guard file)
KNN_BANK = 1024
FOLDS = 5
GUARD_GLOB = "*.ood-*.pt"
# how an image's threshold is chosen (config key ``ood_thresholds``): that of its most probable class, or one for all
THRESHOLDS = ("class", "global")
# a class the network calls fewer validation images than this keeps the one threshold: the 95% quantile of fewer
# than 20 scores is their maximum, which one odd image would set
CLASS_THRESHOLD_MIN_IMAGES = 20


def check_method(method: str) -> str:
    """``method`` if it is one of ``METHODS`` or ``OFF``, else an error naming the config key."""
    if method not in (*METHODS, OFF):
        raise ValueError(f"config key 'ood_method' must be one of {[*METHODS, OFF]}, got {method!r}")
    return method


def check_class_weights(weights: str) -> str:
    """``weights`` if it is one of ``CLASS_WEIGHTS``, else an error naming the config key."""
    if weights not in CLASS_WEIGHTS:
        raise ValueError(f"config key 'ood_class_weights' must be one of {list(CLASS_WEIGHTS)}, got {weights!r}")
    return weights


def check_statistics(split: str) -> str:
    """``split`` if it is one of ``STATISTICS``, else an error naming the config key."""
    if split not in STATISTICS:
        raise ValueError(f"config key 'ood_statistics' must be one of {list(STATISTICS)}, got {split!r}")
    return split


def statistics_split(block: dict) -> str:
    """The split a sidecar's ``ood`` block has its statistics from (fits from before the key: validation)."""
    return (block.get("fit") or {}).get("statistics_split", STATISTICS[0])


def check_thresholds(thresholds: str) -> str:
    """``thresholds`` if it is one of ``THRESHOLDS``, else an error naming the config key."""
    if thresholds not in THRESHOLDS:
        raise ValueError(f"config key 'ood_thresholds' must be one of {list(THRESHOLDS)}, got {thresholds!r}")
    return thresholds


def image_thresholds(threshold: float, class_thresholds: list[float] | None, logits: torch.Tensor) -> np.ndarray:
    """Each image's threshold: with ``class_thresholds``, that of the class its ``logits`` (N, C) make most
    probable, else ``threshold`` for every image."""
    if class_thresholds is None:
        return np.full(len(logits), float(threshold))
    return np.asarray(class_thresholds, dtype=np.float64)[torch.as_tensor(logits).argmax(dim=1).numpy()]


def served_thresholds(block: dict, by_class: bool, logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Every method's threshold of each image from a sidecar's ``ood`` block: its class's with ``by_class`` where
    the fit holds class thresholds, else the one (for comparing the methods as they would be served)."""
    by_method = (block.get("class_thresholds") or {}) if by_class else {}
    return {
        method: image_thresholds(threshold, by_method.get(method), logits)
        for method, threshold in block["thresholds"].items()
    }


def check_target_share(share: float) -> float:
    share = float(share)
    if not 0.5 <= share < 1.0:
        raise ValueError(f"config key 'ood_target_share' must be in [0.5, 1), got {share}")
    return share


class FeatureTap:
    """Reads what ``network``'s last ``nn.Linear`` (the classifier) gets: the pooled penultimate features.

    A forward pre-hook keeps them for every forward pass since the last ``take(batch_size)``, which returns
    each image's mean over its views: with test-time augmentation the inferer averages the logits of several
    views (one pass each, or one pass over all of them stacked view after view), and since the classifier is
    linear the mean of the views' features is exactly the features of the mean logits.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        linear = [module for module in network.modules() if isinstance(module, torch.nn.Linear)]
        if isinstance(network, torch.jit.ScriptModule) or not linear:
            raise ValueError(
                f"the out-of-distribution methods {list(FEATURE_METHODS)} read the features the network's last "
                f"linear layer gets, and {type(network).__name__} exposes none (a TorchScript export hides them): "
                "serve the state_dict weights (models/model.pt), or set the config key 'ood_method' to 'energy' or "
                "'msp'"
            )
        self._passes: list[torch.Tensor] = []
        self._handle = linear[-1].register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple) -> None:
        self._passes.append(inputs[0].detach().float())

    def take(self, batch_size: int) -> torch.Tensor:
        """The features (``batch_size``, F) of the batch's images, each the mean over its views, on the CPU."""
        if not self._passes:
            raise RuntimeError("no forward pass went through the network since the features were last taken")
        features, self._passes = torch.cat(self._passes), []
        if len(features) % batch_size:
            raise RuntimeError(f"{len(features)} feature rows are not whole views of a batch of {batch_size} images")
        return features.view(-1, batch_size, features.shape[-1]).mean(dim=0).cpu()

    def close(self) -> None:
        self._handle.remove()


def _logit_score(method: str, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    if method == "energy":
        return -torch.logsumexp(logits, dim=-1)
    return -torch.softmax(logits, dim=-1).amax(dim=-1)


def whitening(statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``whitener`` W with W Wᵀ the precision, and the class means times W: then a Mahalanobis distance is a
    squared Euclidean one, ``|x W - m W|²``, one (N, F) x (F, F) product a batch instead of one per class (4x
    less time on a CPU for a served batch of 8). Derived once when the statistics are loaded."""
    eigenvalues, eigenvectors = torch.linalg.eigh(statistics["precision"].double())
    whitener = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    return {"whitener": whitener, "whitened_means": statistics["class_means"].double() @ whitener}


def _nearest_mean(whitened: torch.Tensor, whitened_means: torch.Tensor) -> torch.Tensor:
    """Each whitened row's squared distance to the nearest whitened class mean: its Mahalanobis distance."""
    return ((whitened[:, None, :] - whitened_means[None]) ** 2).sum(dim=-1).amin(dim=1)


def _mahalanobis(features: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    if "whitener" not in statistics:
        statistics = whitening(statistics)
    return _nearest_mean(features.double() @ statistics["whitener"], statistics["whitened_means"])


def _knn(features: torch.Tensor, bank: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    similarity = _normalised(features) @ bank.double().T
    if exclude_self:
        similarity.fill_diagonal_(-math.inf)
    k = min(k, similarity.shape[1] - int(exclude_self))
    return 1.0 - similarity.topk(k, dim=1).values[:, -1]


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.double(), dim=-1)


def _ledoit_wolf(centred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The covariance of ``centred`` (N, F) rows shrunk towards ``mu * I`` by the Ledoit-Wolf (2004) formula."""
    n, d = centred.shape
    covariance = centred.T @ centred / n
    mu = torch.trace(covariance) / d
    delta = ((covariance - mu * torch.eye(d, dtype=covariance.dtype)) ** 2).sum() / d
    # the formula's sum over i, j of mean_k(x_ki² x_kj²) is mean_k(|x_k|⁴): no (F, N) x (N, F) product
    fourth = float(((centred**2).sum(dim=1) ** 2).sum()) / n
    beta = min((fourth - float((covariance**2).sum())) / (d * n), float(delta))
    shrinkage = 0.0 if float(delta) == 0 else beta / float(delta)
    return (1 - shrinkage) * covariance + shrinkage * mu * torch.eye(d, dtype=covariance.dtype), shrinkage


def _class_gaussian(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, class_weights: str
) -> tuple[torch.Tensor, ...]:
    """Class means (classes absent from ``labels`` get the overall mean), the shrunk shared covariance's
    Cholesky factor and the shrinkage, in float64.

    With ``class_weights`` "equal" the shared covariance is the mean of the classes' own covariances. By
    image count ("count") it is mostly the nevi's (two thirds of the images), and a rare class whose lesions
    vary where nevi do not (vascular lesions) lies far from its own mean: on four real-data models the
    count-weighted fit flagged 50-77% of the test vascular lesions, the equal one 32-41% (docs/RESULTS.md)."""
    features = features.double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    means = torch.stack([features[labels == c].mean(0) if counts[c] else features.mean(0) for c in range(num_classes)])
    centred = features - means[labels]
    if class_weights == "equal":
        # rows scaled so that X^T X / N is the mean over the present classes of X_c^T X_c / N_c
        centred = centred * (len(labels) / (int((counts > 0).sum()) * counts[labels])).sqrt()[:, None]
    covariance, shrinkage = _ledoit_wolf(centred)
    return means, torch.linalg.cholesky(covariance), shrinkage


def _gaussian(features: torch.Tensor, labels: torch.Tensor, num_classes: int, class_weights: str) -> dict:
    """The served statistics: class means and the shrunk shared precision."""
    means, factor, shrinkage = _class_gaussian(features, labels, num_classes, class_weights)
    return {"class_means": means.float(), "precision": torch.cholesky_inverse(factor).float(), "shrinkage": shrinkage}


def _out_of_fold_mahalanobis(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, class_weights: str
) -> torch.Tensor:
    """Each image's distance under the statistics of the other folds: |L⁻¹(x - m)|² with L the covariance's
    Cholesky factor: two triangular solves a fold rather than a precision and its whitening. Training fits
    the guard at every validation that improves, so this is on its clock: the whole ``fit`` of 1,504 images
    x 1,024 features took 6.0 s before and 1.9 s after, on one busy CPU thread (docs/PERFORMANCE.md)."""
    fold = torch.arange(len(labels)) % FOLDS
    fold = fold[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    scores = torch.empty(len(labels), dtype=torch.float64)
    for f in range(FOLDS):
        held = fold == f
        means, factor, _ = _class_gaussian(features[~held], labels[~held], num_classes, class_weights)
        whitened = torch.linalg.solve_triangular(factor, features[held].double().T, upper=False).T
        whitened_means = torch.linalg.solve_triangular(factor, means.T, upper=False).T
        scores[held] = _nearest_mean(whitened, whitened_means)
    return scores


def threshold_for(scores: np.ndarray | torch.Tensor, target_share: float) -> float:
    """The smallest score that at least ``target_share`` of ``scores`` do not exceed (flagged: ``score > it``)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    k = max(1, math.ceil(target_share * scores.size - 1e-9))
    return float(scores[k - 1])


def class_thresholds_for(
    scores: np.ndarray | torch.Tensor, predicted: np.ndarray, threshold: float, target_share: float, num_classes: int
) -> list[float]:
    """Per class, the threshold of the images the network calls that class (``predicted``): the one
    ``threshold``, raised to what keeps ``target_share`` of that class's own validation images when they score
    higher (a class with fewer than ``CLASS_THRESHOLD_MIN_IMAGES`` keeps the one threshold).

    One threshold for all hides the rare classes: their lesions vary more than nevi's, so a threshold that keeps
    95% of validation (two thirds nevi) flagged a third of the test vascular lesions on three real-data models,
    against 4% of nevi (docs/RESULTS.md). A class's threshold is only ever raised, so no class is flagged more
    than under the one threshold."""
    scores, predicted = np.asarray(scores, dtype=np.float64), np.asarray(predicted)
    raised = []
    for c in range(num_classes):
        own = scores[predicted == c]
        raised.append(
            max(threshold, threshold_for(own, target_share)) if own.size >= CLASS_THRESHOLD_MIN_IMAGES else threshold
        )
    return raised


@dataclass(frozen=True)
class GuardFit:
    """Every method's threshold and statistics, fitted on validation; ``record`` is what the fit measured."""

    thresholds: dict[str, float]
    statistics: dict[str, torch.Tensor]
    target_share: float
    record: dict
    # per method, each class's threshold (``class_thresholds_for``): served with ``ood_thresholds`` "class"
    class_thresholds: dict[str, list[float]] | None = None


def fit(
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    target_share: float = TARGET_SHARE,
    class_weights: str = CLASS_WEIGHTS[0],
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GuardFit:
    """Fit every method on validation ``logits`` (N, C), ``features`` (N, F) and integer ``labels`` (N,); with
    ``reference`` (training features (M, F), labels (M,)) the statistics come from those, and the thresholds
    from the validation images' scores under them."""
    target_share, class_weights = check_target_share(target_share), check_class_weights(class_weights)
    labels = labels.long().reshape(-1)
    num_classes = logits.shape[1]
    if reference is None:
        gaussian = _gaussian(features, labels, num_classes, class_weights)
        bank = _normalised(features).float()
        held_out = {
            "mahalanobis": _out_of_fold_mahalanobis(features, labels, num_classes, class_weights),
            "knn": _knn(features, bank, KNN_K, exclude_self=True),
        }
    else:
        reference_features, reference_labels = reference[0], reference[1].long().reshape(-1)
        gaussian = _gaussian(reference_features, reference_labels, num_classes, class_weights)
        bank = _normalised(_subsample(reference_features, KNN_BANK)).float()
        held_out = {"mahalanobis": _mahalanobis(features, gaussian), "knn": _knn(features, bank, KNN_K)}
    held_out |= {"energy": _logit_score("energy", logits), "msp": _logit_score("msp", logits)}
    thresholds = {method: threshold_for(scores, target_share) for method, scores in held_out.items()}
    predicted = logits.argmax(dim=1).numpy()
    by_class = {
        method: class_thresholds_for(scores, predicted, thresholds[method], target_share, num_classes)
        for method, scores in held_out.items()
    }
    flagged = {
        method: _flagged_shares(scores.numpy() > thresholds[method], labels.numpy(), num_classes)
        for method, scores in held_out.items()
    }
    flagged_by_class = {
        method: _flagged_shares(
            scores.numpy() > image_thresholds(thresholds[method], by_class[method], logits),
            labels.numpy(),
            num_classes,
        )
        for method, scores in held_out.items()
    }
    record = {
        "n_images": len(labels),
        # fits from before this key fitted the statistics on validation
        "statistics_split": STATISTICS[reference is not None],
        "n_statistics_images": len(labels) if reference is None else len(reference_labels),
        "knn_k": KNN_K,
        "folds": FOLDS if reference is None else None,
        "ledoit_wolf_shrinkage": gaussian["shrinkage"],
        # fits from before this key weighted the classes by image count
        "covariance_class_weights": class_weights,
        "validation_flagged_share": flagged,
        "validation_flagged_share_class_thresholds": flagged_by_class,
        "class_threshold_min_images": CLASS_THRESHOLD_MIN_IMAGES,
    }
    statistics = {"class_means": gaussian["class_means"], "precision": gaussian["precision"], "bank": bank}
    return GuardFit(thresholds, statistics, target_share, record, by_class)


def _subsample(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` of ``rows``, drawn without replacement by a fixed seed (the same fit every time)."""
    if len(rows) <= limit:
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:limit].sort().values]


def _flagged_shares(flagged: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """The share flagged in all and per class index (None for a class with no image)."""
    per_class = [float(flagged[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"all": float(flagged.mean()), "per_class": per_class}


def flagged_shares(flagged: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """``{"all": share, "class_mean": share, "per_class": {name: share}}`` of flagged images among labelled
    ones; ``class_mean`` is the mean of the present classes' shares, which a guard that hides a rare class
    raises however few images that class has (as balanced accuracy is to accuracy)."""
    shares = _flagged_shares(np.asarray(flagged, dtype=bool), np.asarray(labels), len(class_names))
    present = [share for share in shares["per_class"] if share is not None]
    return {
        "all": shares["all"],
        "class_mean": float(np.mean(present)),
        "per_class": dict(zip(class_names, shares["per_class"], strict=True)),
    }


OVERFLAG_FACTOR = 2  # a class flagged at more than this many times the target's share is reported


def overflagged(flagged: np.ndarray, labels: np.ndarray, class_names: list[str], target_share: float) -> dict:
    """``{name: {"share", "n"}}`` of the classes flagged at more than ``OVERFLAG_FACTOR`` x ``1 - target_share``.

    Flagged in-distribution images go unanswered, so a class the guard flags far more often than the
    others is one whose lesions it hides: typically a rare class the network's features do not yet hold
    together (docs/RESULTS.md). Evaluation names them so that nobody reads only the overall share."""
    flagged, labels = np.asarray(flagged, dtype=bool), np.asarray(labels)
    limit = OVERFLAG_FACTOR * (1 - target_share)
    return {
        name: {"share": float(flagged[labels == c].mean()), "n": int((labels == c).sum())}
        for c, name in enumerate(class_names)
        if (labels == c).any() and flagged[labels == c].mean() > limit
    }


def guard_path(weights: str | os.PathLike, name: str) -> Path:
    """The guard file ``name`` (as the sidecar names it) beside ``weights``."""
    return Path(weights).with_name(name)


def store(weights: str | os.PathLike, fitted: GuardFit, weights_fingerprint: str) -> dict:
    """Write ``fitted``'s statistics beside ``weights`` under a name of their own hash and return the
    sidecar's ``ood`` block naming them. Call ``remove_stale`` once the sidecar is in place."""
    payload = {**fitted.statistics, FINGERPRINT: weights_fingerprint}
    staging = Path(weights).with_name(f".{Path(weights).stem}.ood.staging")
    staging.parent.mkdir(parents=True, exist_ok=True)  # the first best model of a run comes before its folder
    torch.save(payload, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    name = f"{Path(weights).stem}.ood-{digest[:16]}.pt"
    atomic_write(guard_path(weights, name), lambda tmp: os.replace(staging, tmp))
    return {
        "file": name,
        "sha256": digest,
        "target_share": fitted.target_share,
        "thresholds": fitted.thresholds,
        "class_thresholds": fitted.class_thresholds,
        "fit": fitted.record,
    }


def remove_stale(weights: str | os.PathLike) -> None:
    """Delete guard files beside ``weights`` that its sidecar does not name (left by an earlier fit or a kill)."""
    named = ((read_sidecar(weights) or {}).get("ood") or {}).get("file")
    for path in Path(weights).parent.glob(GUARD_GLOB):
        if path.name.startswith(f"{Path(weights).stem}.ood-") and path.name != named:
            path.unlink(missing_ok=True)


def guard_file(weights: str | os.PathLike) -> Path | None:
    """The guard file the sidecar of ``weights`` names (None when it names none): it travels with them."""
    block = (read_sidecar(weights) or {}).get("ood")
    return None if not block else guard_path(weights, block["file"])


@dataclass(frozen=True)
class OODResult:
    """One image's guard answer."""

    score: float
    threshold: float
    method: str
    target_share: float = TARGET_SHARE
    # the threshold is that of the image's most probable class (``ood_thresholds`` "class")
    by_class: bool = False

    @property
    def flagged(self) -> bool:
        return self.score > self.threshold

    @property
    def reason(self) -> str:
        kept = (
            "the threshold for the class it finds most probable, never below the one that "
            f"{self.target_share:.0%} of the validation lesion images stay under"
            if self.by_class
            else f"which {self.target_share:.0%} of the validation lesion images stay under"
        )
        return (
            f"not answered: this image is unlike the dermoscopy images the model was trained on (its "
            f"{self.method} out-of-distribution score {self.score:.4g} is above {self.threshold:.4g}, {kept}): "
            "send a dermoscopy image of a skin lesion"
        )

    def to_json(self) -> dict:
        return {
            "out_of_distribution": self.flagged,
            "ood_score": self.score,
            "ood_threshold": self.threshold,
            "ood_method": self.method,
        }


@dataclass(frozen=True)
class Guard:
    """One method's threshold (and each class's, when served by class) and the statistics it needs, loaded from
    the weights' sidecar."""

    method: str
    threshold: float
    statistics: dict[str, torch.Tensor]
    target_share: float = TARGET_SHARE
    class_thresholds: tuple[float, ...] | None = None

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def scores(self, logits: torch.Tensor, features: torch.Tensor | None) -> np.ndarray:
        """The score of each image (higher: further from the training data)."""
        return scores(self.method, logits, features, self.statistics).numpy()

    def thresholds(self, logits: torch.Tensor) -> np.ndarray:
        """Each image's threshold (``image_thresholds``)."""
        return image_thresholds(self.threshold, self.class_thresholds, logits)

    def check(self, logits: torch.Tensor, features: torch.Tensor | None) -> list[OODResult]:
        by_class = self.class_thresholds is not None
        return [
            OODResult(float(s), float(t), self.method, self.target_share, by_class)
            for s, t in zip(self.scores(logits, features), self.thresholds(logits), strict=True)
        ]

    @classmethod
    def from_sidecar(cls, weights: str | os.PathLike, method: str, thresholds: str = THRESHOLDS[0]) -> Guard | None:
        """The guard fitted for ``weights`` (call it on weights whose sidecar is verified); None when ``method``
        is ``OFF`` or the sidecar holds no fit (a model from before the guard: served without one, and logged).
        ``thresholds`` "class" serves each class's threshold, where the fit holds them (fits from before them
        serve the one threshold, and say so)."""
        check_method(method)
        check_thresholds(thresholds)
        record = read_sidecar(weights) or {}
        block = record.get("ood")
        if method == OFF:
            return None
        if not block:
            logger.warning(
                "%s holds no out-of-distribution fit: every image is answered; refit the calibration "
                "(configs/calibrate.json) to guard this model",
                sidecar_path(weights),
            )
            return None
        try:
            threshold, target_share = float(block["thresholds"][method]), float(block["target_share"])
            path, digest = guard_path(weights, block["file"]), block["sha256"]
            by_class = (block.get("class_thresholds") or {}).get(method) if thresholds == "class" else None
            by_class = None if by_class is None else tuple(float(t) for t in by_class)
            if by_class is not None and len(by_class) != len(CLASS_NAMES):
                raise ValueError(f"{len(by_class)} class thresholds for {len(CLASS_NAMES)} classes")
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise SidecarError(
                f"{sidecar_path(weights)}: 'ood' must hold 'file', 'sha256', 'target_share' and 'thresholds' with "
                f"the method {method!r} (and 'class_thresholds' a list per method, where present): "
                f"{type(error).__name__}: {error}"
            ) from None
        if thresholds == "class" and by_class is None:
            logger.warning(
                "%s's out-of-distribution fit has no class thresholds (fitted before them): one threshold for "
                "every image; refit the calibration (configs/calibrate.json) for them",
                sidecar_path(weights),
            )
        statistics = {} if method not in FEATURE_METHODS else _verified_statistics(weights, record, path, digest)
        return cls(method, threshold, statistics, target_share, by_class)


def _verified_statistics(weights: str | os.PathLike, record: dict, path: Path, digest: str) -> dict:
    if not path.is_file():
        raise SidecarError(
            f"{sidecar_path(weights)} names the out-of-distribution fit {path.name}, which is not beside {weights}: "
            "copy the weights, their sidecar and that file together"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise SidecarError(
            f"{path} is not the out-of-distribution fit {sidecar_path(weights)} names (sha256 differs): refused"
        )
    statistics = torch.load(path, map_location="cpu", weights_only=True)
    if statistics.get(FINGERPRINT) != record.get(FINGERPRINT):
        raise SidecarError(
            f"{path} was fitted for other weights than {weights} (its {FINGERPRINT} differs from theirs): refused"
        )
    statistics = {key: value for key, value in statistics.items() if key != FINGERPRINT}
    return statistics | whitening(statistics)


def scores(
    method: str, logits: torch.Tensor, features: torch.Tensor | None, statistics: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Every image's ``method`` score from its ``logits`` (N, C) and pooled ``features`` (N, F)."""
    if method not in FEATURE_METHODS:
        return _logit_score(method, torch.as_tensor(logits))
    if features is None:
        raise ValueError(f"the out-of-distribution method {method!r} needs the network's features")
    if method == "mahalanobis":
        return _mahalanobis(features, statistics)
    return _knn(features, statistics["bank"], KNN_K)


def all_scores(
    logits: torch.Tensor, features: torch.Tensor, statistics: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Every method's scores, for comparing them (scripts/evaluate_ood.py, evaluation)."""
    return {method: scores(method, logits, features, statistics).numpy() for method in METHODS}


def load_fit(weights: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The sidecar's ``ood`` block and every method's statistics, verified (for comparing the methods)."""
    record = read_sidecar(weights) or {}
    block = record.get("ood")
    if not block:
        raise SidecarError(f"{sidecar_path(weights)} holds no out-of-distribution fit: refit the calibration first")
    return block, _verified_statistics(weights, record, guard_path(weights, block["file"]), block["sha256"])
