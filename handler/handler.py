"""TorchServe handler for the skin-lesion bundle: a batch of requests in, one JSON answer and status each out.

Thin on purpose: ``bundle.predictor.Predictor`` does all the model work, loaded from the files inside
the archive (``configs/``, ``bundle/``, the weights). This file only turns requests into image bytes and
the predictor's results into JSON and HTTP status codes, so one bad image gets its own 4xx while the
rest of its batch is answered normally. Each batch's outcomes (images classified by class, refused by
reason, flagged out of distribution) are added to the model's metrics (``bundle.serving_metrics``).

Under TorchServe's ``kservev2`` envelope (``service_envelope=kservev2``, as KServe runs it) the batch is the
inputs of one Open Inference Protocol request, one image each (BYTES, base64), and the answer is one v2
response: per input, an output of the same name holding one BYTES element, the JSON answer the plain route
gives for that image (or ``{"error", "status"}`` for a refused one), so one bad image still gets its own error.
"""

from __future__ import annotations

import http
import json
import logging
from collections import Counter
from pathlib import Path

from ts.handler_utils.timer import timed
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from bundle.payloads import JSON_TYPE, USAGE, RequestError, image_bytes, image_from_v2_input, rejection_status
from bundle.predictor import MAX_PIXELS, Prediction, Predictor, Rejection, worker_device
from bundle.serving_metrics import IMAGES_CLASSIFIED, IMAGES_REFUSED, MODEL_LEVEL, NO_CLASS, OUT_OF_DISTRIBUTION

logger = logging.getLogger(__name__)

# Form fields an image may come in; TorchServe names a raw body's parameter "body".
IMAGE_FIELDS = ("body", "data", "image", "file")


class SkinLesionHandler(BaseHandler):
    """Loads the bundle once per worker; classifies each batch TorchServe forms from concurrent requests."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        options = (context.model_yaml_config or {}).get("handler", {})
        self.predictor = Predictor(
            model_dir,
            model_dir / context.manifest["model"]["serializedFile"],
            worker_device(properties.get("gpu_id")),
            max_pixels=int(options.get("max_pixels", MAX_PIXELS)),
        )
        self.initialized = True

    @timed
    def preprocess(self, requests: list[dict]) -> list[bytes | RequestError]:
        """Each request's image bytes, or the reason it has none."""
        images = []
        for index, request in enumerate(requests):
            try:
                images.append(self._image_bytes(request, index))
            except RequestError as error:
                images.append(error)
            except Exception:  # a bug reading one request must not fail the others in its batch
                logger.exception("cannot read request %s", self._request_id(index))
                images.append(
                    RequestError(
                        http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error reading the request (see the model log)"
                    )
                )
        return images

    @timed
    def inference(self, images: list[bytes | RequestError]) -> list[Prediction | Rejection | RequestError]:
        """Classify every request that has image bytes in one predictor batch; keep the others' errors."""
        positions = [i for i, image in enumerate(images) if isinstance(image, bytes)]
        results: list = list(images)
        for position, result in zip(positions, self.predictor.predict([images[i] for i in positions]), strict=True):
            results[position] = result
        predictions = [result for result in results if isinstance(result, Prediction)]
        logger.info(
            "batch of %d requests: %d classified, %d refused, %d out of distribution",
            len(results),
            len(predictions),
            len(results) - len(predictions),
            sum(bool(prediction.out_of_distribution) for prediction in predictions),
        )
        return results

    @timed
    def postprocess(self, results: list[Prediction | Rejection | RequestError]) -> list[str]:
        answers, outcomes = [], Counter()
        for index, result in enumerate(results):
            if isinstance(result, Prediction):
                status, body = http.HTTPStatus.OK, result.to_json()
                outcomes[IMAGES_CLASSIFIED, body["class"] or NO_CLASS] += 1
                if result.out_of_distribution:
                    outcomes[OUT_OF_DISTRIBUTION, None] += 1
            elif isinstance(result, Rejection):
                status, body = rejection_status(result), result.to_json()
                outcomes[IMAGES_REFUSED, result.kind.value] += 1
            else:
                status, body = result.status, {"error": result.error}
                outcomes[IMAGES_REFUSED, result.status.name.lower()] += 1
            if status != http.HTTPStatus.OK:  # which request, and why, for whoever reads the model log
                logger.info("request %s refused: %d %s", self._request_id(index), status.value, body["error"])
            if self._open_inference_protocol():
                # one v2 response answers all inputs: a refused image's status travels in its own output
                if status != http.HTTPStatus.OK:
                    body["status"] = status.value
            else:
                self.context.set_response_status(status.value, status.phrase, idx=index)
                self.context.set_response_content_type(index, JSON_TYPE)
            answers.append(json.dumps(body))
        self._count(outcomes)
        return answers

    def _request_id(self, index: int) -> str:
        """TorchServe's id of the batch's ``index``-th request (its access log and the client's answer carry it);
        under the kservev2 envelope the one request's id and the input's position in it."""
        if self._open_inference_protocol():
            return f"{self.context.get_request_id(0)} input {index}"
        return str(self.context.get_request_id(index))

    def _open_inference_protocol(self) -> bool:
        """Whether TorchServe's kservev2 envelope called: it names the request's inputs in the context."""
        return hasattr(self.context, "input_names")

    def _count(self, outcomes: Counter) -> None:
        """Add the batch's outcomes to the model's counters: TorchServe writes them to model_metrics.log, or
        serves them on /metrics in metrics_mode=prometheus."""
        for (metric, label_value), count in outcomes.items():
            values = [self.context.model_name, MODEL_LEVEL, *([label_value] if metric.label else [])]
            dimensions = [Dimension(name, value) for name, value in zip(metric.dimensions, values, strict=True)]
            self.context.metrics.add_counter(metric.name, count, dimensions=dimensions)

    def _image_bytes(self, request: dict, index: int) -> bytes:
        """The raw body, or the first image field of a form, with the content type it came with; under the
        kservev2 envelope, the base64 image of one v2 input."""
        if self._open_inference_protocol():
            return image_from_v2_input(request)
        for field in IMAGE_FIELDS:
            if field in request:
                # TorchServe puts the request's headers in the same dict: a client header named like the field
                # is a string there, not the field's own headers
                headers = self.context.get_request_header(index, field)
                content_type = (headers.get("content-type") if isinstance(headers, dict) else None) or ""
                return image_bytes(request[field], content_type)
        raise RequestError(http.HTTPStatus.BAD_REQUEST, f"the request holds no image: {USAGE}")
