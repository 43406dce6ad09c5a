"""The model's own serving metrics: images classified (by class), refused (by reason) and flagged out of
distribution. One declaration: the TorchServe handler emits these names with these dimensions, and
``handler.control`` declares them to TorchServe (its metrics config's ``model_metrics``), which in
``metrics_mode=prometheus`` exposes only metrics declared there.

Every metric is a counter with TorchServe's two default model dimensions first (``ModelName``, ``Level``;
the frontend adds ``Hostname``) and then its own ``label``, if any. The dimensions are given in exactly
this order when emitting: TorchServe pairs a declared metric's dimension names with the values by
position.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DIMENSIONS = ("ModelName", "Level")
# The value TorchServe gives the Level dimension of a model's metrics.
MODEL_LEVEL = "Model"
# The Class of an image answered without a diagnosis (the guard flagged it and withheld the class).
NO_CLASS = "none"


@dataclass(frozen=True)
class ModelMetric:
    name: str
    label: str | None  # the dimension that splits the count; None: one series per model
    meaning: str

    @property
    def dimensions(self) -> list[str]:
        return [*DEFAULT_DIMENSIONS, *([self.label] if self.label else [])]


IMAGES_CLASSIFIED = ModelMetric(
    "skin_lesion_images_classified_total",
    "Class",
    f"images answered 200, by the class answered ({NO_CLASS!r} when the guard withheld it)",
)
IMAGES_REFUSED = ModelMetric(
    "skin_lesion_images_refused_total",
    "Reason",
    "requests answered with an error, by reason: the predictor's RejectionKind for an image it refused, "
    "the HTTP status name for a request that carried no usable image",
)
OUT_OF_DISTRIBUTION = ModelMetric(
    "skin_lesion_out_of_distribution_total",
    None,
    "images the out-of-distribution guard flagged (also counted as classified)",
)
MODEL_METRICS = (IMAGES_CLASSIFIED, IMAGES_REFUSED, OUT_OF_DISTRIBUTION)
