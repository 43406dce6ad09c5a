"""The KServe Python SDK as the consumer, run in its own venv (.venv-kserve: it pins psutil and pandas below
.venv's) by tests/test_kserve_v2.py and tests/test_kubernetes.py. Prints JSON on stdout.

    python tests/kserve_sdk.py infer BASE_URL MODEL IMAGE...   # one v2 request, one BYTES input per image
    python tests/kserve_sdk.py check_inference_service FILE    # FILE against V1beta1InferenceService
"""

import asyncio
import base64
import json
import re
import sys
from pathlib import Path

import kserve.models
import kubernetes.client.models
import yaml
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def infer(base_url: str, model: str, *images: str) -> None:
    """One Open Inference Protocol request through KServe's own REST client, the images as base64 BYTES (JSON,
    not KServe's binary extension, which TorchServe does not read); the parsed response as KServe returns it."""
    inputs = [
        InferInput(f"image-{index}", [1], "BYTES", data=[base64.b64encode(Path(path).read_bytes()).decode()])
        for index, path in enumerate(images)
    ]

    async def send():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            return await client.infer(base_url, InferRequest(model, inputs, request_id="skin-lesion-test"), model)
        finally:
            await client.close()

    response = asyncio.run(send())
    print(
        json.dumps(
            {
                "id": response.id,
                "model_name": response.model_name,
                "outputs": [
                    {
                        "name": output.name,
                        "datatype": output.datatype,
                        "shape": list(output.shape),
                        "data": [str(value) for value in output.as_numpy().tolist()],
                    }
                    for output in response.outputs
                ],
            }
        )
    )


def check_inference_service(path: str) -> None:
    """Build the SDK's V1beta1InferenceService from the file, field by field, through the SDK's models (and the
    Kubernetes client's for the core types they embed): an unknown field, a wrong type or a missing required one
    is an error naming its path. Prints the problems (none: [])."""
    document = yaml.safe_load(Path(path).read_text())
    problems: list[str] = []
    _build(document, "V1beta1InferenceService", "", problems)
    print(json.dumps(problems))


def _build(value, type_name: str, where: str, problems: list[str]):
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_build(item, match[1], f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        item_type = match[1] or match[2]
        return {key: _build(item, item_type, f"{where}.{key}", problems) for key, item in value.items()}
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]):
            problems.append(f"{where}: expected {type_name}, got {value!r}")
        return value
    model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    if model is None:
        problems.append(f"{where}: the SDK has no model {type_name}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a {type_name} mapping, got {value!r}")
        return None
    by_key = {key: attribute for attribute, key in model.attribute_map.items()}
    problems += [f"{where}.{key}: not a field of {type_name}" for key in value if key not in by_key]
    arguments = {
        by_key[key]: _build(item, model.openapi_types[by_key[key]], f"{where}.{key}", problems)
        for key, item in value.items()
        if key in by_key
    }
    try:
        return model(**arguments)
    except ValueError as error:  # the model's own checks: required fields, allowed values
        problems.append(f"{where or type_name}: {error}")
        return None


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"infer": infer, "check_inference_service": check_inference_service}[command](*arguments)
