"""Classify images given as bytes, the way ``configs/inference.json`` classifies files: the serving core.

The TorchServe handler, the SageMaker adapter and the command line all wrap ``Predictor``, so there
is one serving path. It reads the network, the preprocessing, the inferer and the postprocessing
from the bundle's ``configs/inference.json`` (never a second declaration) and runs the config's own
transform chain on each image's bytes in memory (its reader, ``bundle.imageio.ShrinkingPILReader``,
takes bytes as well as a path; no temporary file, so a full disk fails nothing), so a served image
gets exactly the probabilities ``monai.bundle run --config_file configs/inference.json`` writes for
the same file.

A batch goes in; per image comes back either a ``Prediction`` or a ``Rejection`` saying what is wrong
with that image. One bad image never fails the others.

The weights' sidecar (``bundle.sidecar``: ``models/model.json``) gives the image size they were
trained at, which serving resizes to, and the calibration fitted on validation, which the config's
postprocessing applies: served probabilities are temperature-scaled and the class is the configured
decision rule's (``decision_rule``: balanced or argmax), exactly as in the bundle's batch inference and
evaluation; each answer also carries the triage fields (``malignant_probability``, ``refer``). Weights
whose sidecar is missing, belongs to other weights or lists the classes in another order are refused
(``bundle.sidecar.verified_sidecar``), so nothing is served at a guessed size or in a wrong class order.
"""

from __future__ import annotations

import enum
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image, UnidentifiedImageError

from bundle.calibration import check_decision_rule, malignant_probability
from bundle.flags import as_bool
from bundle.imageio import EncodedImage, UnusableImage, decode_problem, png_size_problem, shape_problem
from bundle.labels import CLASS_LABELS
from bundle.ood import FeatureTap, OODResult, guard_file, load_fit
from bundle.sidecar import load_weights, sidecar_path, trained_image_size, verified_sidecar

logger = logging.getLogger(__name__)

INFERENCE_CONFIG = Path("configs") / "inference.json"

# Far above what the network sees and above common phone photos (12-24 MP). A JPEG this size decodes at
# 1/8 scale (bundle.imageio), but a PNG decodes whole: at 25 MP that is ~100 MB and ~0.5 s on one core
# (docs/SERVING.md).
MAX_PIXELS = 25_000_000
# PNG has no reduced-size decoding: this many pixels take ~0.3 s of one core and ~60 MB to decode, so a
# PNG may be a 4000 x 3000 photo but not a 25 MP one (docs/SERVING.md).
MAX_PNG_PIXELS = 12_000_000

# Pillow format -> file suffix; the formats the bundle's inference run reads (bundle.data.IMAGE_SUFFIXES).
# MPO is how Pillow names the multi-picture JPEGs many cameras write.
ACCEPTED_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png"}


def bundle_files(
    bundle_root: str | os.PathLike, weights: str | os.PathLike | None = None, allow_missing_sidecar: bool = False
) -> tuple[Path, Path, Path | None, Path | None]:
    """The bundle root, its weights (default ``models/model.pt``), their sidecar (None only when
    ``allow_missing_sidecar`` and there is none) and the out-of-distribution fit it names (None if none),
    checked as the Predictor checks them: what packaging needs. A malformed sidecar, one that does not belong
    to the weights, or a guard file that is missing or not the sidecar's, fails here, not later in the server."""
    bundle_root = Path(bundle_root)
    weights = Path(weights) if weights else bundle_root / "models" / "model.pt"
    if not (bundle_root / INFERENCE_CONFIG).is_file():
        raise FileNotFoundError(f"{bundle_root / INFERENCE_CONFIG} not found: --bundle_root must be the bundle's root")
    if not weights.is_file():
        raise FileNotFoundError(f"weights {weights} not found: train the bundle first, or pass --weights")
    record = verified_sidecar(weights, allow_missing_sidecar=allow_missing_sidecar)
    if record is None:
        return bundle_root, weights, None, None
    if record.get("ood"):
        load_fit(weights)
    return bundle_root, weights, sidecar_path(weights), guard_file(weights)


def worker_device(gpu_id: int | str | None) -> str:
    """The device of a serving worker to which the model server gave ``gpu_id`` (TorchServe's system property):
    that GPU when there is one, else the CPU."""
    return f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"


class RejectionKind(enum.StrEnum):
    """Which check an image failed; a server maps these to status codes."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_LARGE = "too_large"
    BAD_SHAPE = "bad_shape"
    UNDECODABLE = "undecodable"
    INTERNAL = "internal"  # not the client's fault: a bug, or the machine (memory, disk)


@dataclass(frozen=True)
class Prediction:
    """The calibrated class probabilities of one image, keyed by class name; the class ``decision_rule``
    picks (``balanced``: corrected for class frequency, so not always the most probable one; ``argmax``:
    the most probable) beside ``most_probable_class``; and the triage answer: ``malignant_probability``
    (akiec + bcc + mel) and ``refer`` (it reaches ``refer_threshold``, fitted on validation for 95%
    sensitivity to malignant lesions; None when the model's sidecar holds no threshold)."""

    class_name: str
    probability: float
    probabilities: dict[str, float]
    decision_rule: str = "argmax"
    malignant_probability: float | None = None
    refer: bool | None = None
    refer_threshold: float | None = None
    ood: OODResult | None = None
    ood_probabilities: bool = False

    @property
    def label(self) -> str:
        return CLASS_LABELS[self.class_name]

    @property
    def most_probable_class(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def out_of_distribution(self) -> bool | None:
        """Whether the guard flags the image (None: the model has no guard)."""
        return None if self.ood is None else self.ood.flagged

    def to_json(self) -> dict:
        """The served answer. An image the guard flags gets no diagnosis (``class`` null, the guard's fields
        and the ``reason``) unless ``ood_probabilities``, which adds them to the full answer."""
        guard = (
            self.ood.to_json()
            if self.ood
            else {"out_of_distribution": None, "ood_score": None, "ood_threshold": None, "ood_method": None}
        )
        if self.out_of_distribution:
            guard["reason"] = self.ood.reason
            if not self.ood_probabilities:
                return {"class": None, "label": None, **guard}
        return {
            "class": self.class_name,
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "decision_rule": self.decision_rule,
            "most_probable_class": self.most_probable_class,
            "malignant_probability": self.malignant_probability,
            "refer": self.refer,
            "refer_threshold": self.refer_threshold,
            **guard,
        }


@dataclass(frozen=True)
class Rejection:
    """An image that cannot be classified, and why, in words a client can act on."""

    kind: RejectionKind
    error: str

    def to_json(self) -> dict:
        return {"error": self.error}


class _Rejected(Exception):
    def __init__(self, kind: RejectionKind, error: str) -> None:
        super().__init__(error)
        self.rejection = Rejection(kind, error)


class Predictor:
    """The bundle in ``bundle_root`` (``configs/inference.json`` + weights), ready to classify image bytes.

    ``weights`` defaults to the config's ``ckpt_path`` (``models/model.pt``, a state_dict); a ``.ts``
    file is loaded as TorchScript (``monai.bundle ckpt_export``). ``device`` defaults to the config's
    (the GPU when there is one). Images are resized to the weights' trained ``image_size`` (their
    sidecar's), whatever the config says. Weights without a verified sidecar are refused unless
    ``allow_missing_sidecar``: then they are served at the config's size, uncalibrated. ``decision_rule``
    (``balanced`` or ``argmax``) overrides the config's key of that name.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        max_pixels: int = MAX_PIXELS,
        max_png_pixels: int = MAX_PNG_PIXELS,
        allow_missing_sidecar: bool = False,
        decision_rule: str | None = None,
    ) -> None:
        parser = ConfigParser()
        parser.read_config(Path(bundle_root) / INFERENCE_CONFIG)
        parser["bundle_root"] = str(bundle_root)
        if decision_rule is not None:
            parser["decision_rule"] = check_decision_rule(decision_rule)
        if device is not None:
            parser["device"] = f"$torch.device({str(device)!r})"
        self.weights = Path(weights) if weights is not None else Path(parser.get_parsed_content("ckpt_path"))
        if not self.weights.is_file():
            raise FileNotFoundError(f"model weights {self.weights} do not exist (train the bundle first)")
        parser["ckpt_path"] = str(self.weights)  # the calibration is read from these weights' sidecar
        loaded = load_weights(self.weights)
        # checked against the very tensors served, so no other file can slip in between check and load
        self.sidecar = verified_sidecar(self.weights, loaded, allow_missing_sidecar)
        if self.sidecar is not None:
            parser["image_size"] = trained_image_size(self.weights)
        self.image_size: list[int] = [int(side) for side in parser.get_parsed_content("image_size")]
        self.device: torch.device = parser.get_parsed_content("device")
        self.class_names: list[str] = list(parser.get_parsed_content("class_names"))
        self.max_pixels = max_pixels
        self.max_png_pixels = min(max_png_pixels, max_pixels)
        try:
            self.calibration = parser.get_parsed_content("calibration")  # first: the postprocessing uses it
        except RuntimeError as error:  # MONAI wraps the error naming the sidecar and key, or the config key
            raise (error.__cause__ if isinstance(error.__cause__, ValueError) else error) from None
        self.preprocessing = Compose(parser.get_parsed_content("preprocessing"))
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.network = self._network(parser, loaded)
        self.guard = parser.get_parsed_content("ood_guard")
        self.ood_probabilities = as_bool(parser.get_parsed_content("ood_probabilities"), "ood_probabilities")
        # the features come from the same forward pass; a TorchScript network hides them (fine unless the
        # guard needs them)
        needs_features = self.guard is not None and self.guard.needs_features
        scripted = isinstance(self.network, torch.jit.ScriptModule)
        self._tap = FeatureTap(self.network) if needs_features or not scripted else None

    def _network(self, parser: ConfigParser, loaded: dict | torch.nn.Module) -> torch.nn.Module:
        if isinstance(loaded, torch.nn.Module):  # TorchScript
            network = loaded
        else:
            network = parser.get_parsed_content("network_def")
            network.load_state_dict(loaded)
        return network.to(self.device).eval()

    def predict(self, images: Sequence[bytes]) -> list[Prediction | Rejection]:
        """One result per image, in order; the images that pass every check go through the network together."""
        results: list[Prediction | Rejection | None] = [None] * len(images)
        inputs, positions = [], []
        for position, data in enumerate(images):
            try:
                inputs.append(self.preprocess(data))
                positions.append(position)
            except _Rejected as rejected:
                results[position] = rejected.rejection
            except Exception:  # ours, not the client's: this image fails, never the rest of its batch
                logger.exception("cannot preprocess image %d of the batch", position)
                results[position] = Rejection(
                    RejectionKind.INTERNAL, "internal error preprocessing the image (see the server log)"
                )
        if inputs:
            logits, features = self.forward(torch.stack(inputs))
            guard = self.guard.check(logits, features) if self.guard is not None else [None] * len(positions)
            for position, item, flag in zip(positions, logits, guard, strict=True):
                results[position] = self._prediction(item, flag)
        return results

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The config's inferer on a preprocessed ``batch``: its logits (float32, on the CPU) and, when the guard
        reads them, the pooled features of the same pass."""
        with torch.inference_mode():
            logits = self.inferer(batch.to(self.device), self.network).float().cpu()
            return logits, (self._tap.take(len(batch)) if self._tap is not None else None)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Check the bytes' header, then run the config's transform chain on them, as the bundle run does on
        a file; raises ``_Rejected`` for an image the client must fix."""
        self._check_header(data)
        try:
            return self.preprocessing({"image": EncodedImage(data)})["image"].as_tensor()
        except Exception as error:
            unusable = _unusable_cause(error)
            problem = str(unusable) if unusable else decode_problem(data)
            if problem is None:
                raise  # the image decodes: the failure is ours, not the client's
            raise _Rejected(RejectionKind.UNDECODABLE, problem) from None

    def _check_header(self, data: bytes) -> None:
        """Reject empty, unknown, unsupported, oversized and degenerate images from their header, before
        decoding any pixels."""
        if not data:
            raise _Rejected(RejectionKind.EMPTY, "empty image: no bytes were sent")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format, (width, height) = image.format, image.size
        except UnidentifiedImageError:
            raise _Rejected(RejectionKind.NOT_AN_IMAGE, "not an image: expected JPEG or PNG bytes") from None
        except Image.DecompressionBombError as error:
            raise _Rejected(RejectionKind.TOO_LARGE, f"image too large: {error}") from None
        except (OSError, SyntaxError, ValueError) as error:  # Pillow raises SyntaxError for some corrupt headers
            raise _Rejected(RejectionKind.UNDECODABLE, f"cannot decode: unreadable image header ({error})") from None
        if image_format not in ACCEPTED_FORMATS:
            raise _Rejected(
                RejectionKind.UNSUPPORTED_FORMAT, f"unsupported image format {image_format}: send a JPEG or PNG"
            )
        if problem := shape_problem(width, height):
            raise _Rejected(RejectionKind.BAD_SHAPE, problem)
        if width * height > self.max_pixels:
            raise _Rejected(
                RejectionKind.TOO_LARGE,
                f"image too large: {width} x {height} = {width * height} pixels exceeds the limit of {self.max_pixels}",
            )
        if image_format == "PNG" and width * height > self.max_png_pixels:
            raise _Rejected(
                RejectionKind.TOO_LARGE,
                f"PNG too large: {width} x {height} = {width * height} pixels "
                f"exceeds the PNG limit of {self.max_png_pixels} (PNG decodes at full size; send a "
                f"JPEG of up to {self.max_pixels} pixels)",
            )
        if image_format == "PNG" and (problem := png_size_problem(width, height, len(data))):
            raise _Rejected(RejectionKind.UNDECODABLE, problem)

    def _prediction(self, logits: torch.Tensor, ood: OODResult | None) -> Prediction:
        """The config's postprocessing (calibrated softmax) of one image's logits, as the bundle's evaluator
        applies it, the decision rule's class, the triage answer and the guard's."""
        probabilities = self.postprocessing({"pred": logits})["pred"].float()
        values, top = probabilities.tolist(), int(self.calibration.decide(probabilities.numpy()))
        malignant = float(malignant_probability(probabilities.numpy()))
        return Prediction(
            self.class_names[top],
            values[top],
            dict(zip(self.class_names, values, strict=True)),
            decision_rule=self.calibration.decision_rule,
            malignant_probability=malignant,
            refer=self.calibration.refer(malignant),
            refer_threshold=self.calibration.refer_threshold,
            ood=ood,
            ood_probabilities=self.ood_probabilities,
        )


def _unusable_cause(error: BaseException) -> UnusableImage | None:
    """The reader's ``UnusableImage`` behind ``error`` (MONAI wraps a transform's exception in its own)."""
    while error is not None and not isinstance(error, UnusableImage):
        error = error.__cause__ or error.__context__
    return error
