"""Lay out the model storage a KServe ``InferenceService`` with the TorchServe predictor reads from its
``storageUri`` (deploy/kubernetes/kserve/inferenceservice.yaml, docs/DEPLOY.md):

    <output>/config/config.properties
    <output>/model-store/skin_lesion.mar

    python scripts/kserve_store.py [--mar dist/skin_lesion.mar] [--output dist/kserve]

The InferenceService runs ``serve.py start --foreground --mar /mnt/models/model-store/skin_lesion.mar
--ts_config /mnt/models/config/config.properties`` (where KServe's TorchServe runtime would run ``torchserve``
over the same files), and KServe sets ``TS_SERVICE_ENVELOPE`` to ``kservev2`` for ``protocolVersion: v2``. The
config written here is ``handler/config.properties`` (the one source of the server settings) with what KServe's
pod needs instead, each override beside the reason for it in ``KSERVE_SETTINGS``.
"""

import shutil
import sys
import zipfile
from pathlib import Path

import fire

from handler.control import DEFAULT_MAR, TS_CONFIG

# KServe sends the predictor's traffic to container port 8080.
KSERVE_INFERENCE_ADDRESS = "http://0.0.0.0:8080"
MODEL_STORE = "/mnt/models/model-store"
# Token authorisation is off in the pod (TorchServe 0.12 draws its keys at random per process, so replicas
# cannot share one): KServe's ingress authenticates (docs/DEPLOY.md). So no key guards management either:
# a Unix socket in the pod, not a port.
MANAGEMENT_SOCKET = "unix:/tmp/skin_lesion_management.sock"
# TorchServe's kservev2 envelope reads only the first request of a batch and answers it alone, so the
# frontend must not put two requests in one batch; one v2 request carries several images instead.
KSERVE_BATCH_SIZE = 1


def kserve_settings(mar: Path) -> dict[str, tuple[str, str]]:
    """What KServe's pod needs instead of handler/config.properties' settings for the archive ``mar``:
    key -> (value, why)."""
    return {
        "inference_address": (KSERVE_INFERENCE_ADDRESS, "KServe sends the predictor's traffic to port 8080"),
        "management_address": (MANAGEMENT_SOCKET, "no key guards management in the pod: a socket, not a port"),
        "service_envelope": ("kservev2", "Open Inference Protocol (KServe v2) on /v2/models/<name>/infer"),
        "disable_token_authorization": ("true", "replicas cannot share TorchServe's keys: the ingress authenticates"),
        "model_store": (MODEL_STORE, "where KServe's storage initializer puts <storageUri>/model-store"),
        "load_models": (mar.name, "the archive, loaded at start"),
    }


def check_batch_size(mar: Path) -> None:
    """The archive must not batch requests (``KSERVE_BATCH_SIZE``). Its model-config.yaml decides: TorchServe
    0.12 prefers it to a ``models`` line in config.properties (measured once by hand, 2026-12-05: docs/DEPLOY.md)."""
    batch_size = _archived_model_config(mar).get("batchSize")
    if batch_size != KSERVE_BATCH_SIZE:
        raise ValueError(
            f"{mar} batches {batch_size} requests (batchSize in its model-config.yaml), but TorchServe's kservev2 "
            f"envelope answers only the first request of a batch: package it for KServe with "
            f"scripts/package_mar.py --batch_size {KSERVE_BATCH_SIZE} (one v2 request carries several images)"
        )


def write_store(mar: str = str(DEFAULT_MAR), output: str = "dist/kserve") -> Path:
    """Write ``<output>/config/config.properties`` and ``<output>/model-store/<mar>``, replacing them; return
    ``output``."""
    mar_path, output_path = Path(mar), Path(output)
    if not mar_path.is_file():
        raise FileNotFoundError(f"model archive {mar_path} not found: build it with scripts/package_mar.py")
    check_batch_size(mar_path)
    settings = kserve_settings(mar_path)
    for folder in ("config", "model-store"):
        shutil.rmtree(output_path / folder, ignore_errors=True)
        (output_path / folder).mkdir(parents=True)
    shutil.copy(mar_path, output_path / "model-store" / mar_path.name)
    (output_path / "config" / "config.properties").write_text(kserve_config(settings))
    return output_path


def kserve_config(settings: dict[str, tuple[str, str]]) -> str:
    """handler/config.properties' settings (its comments describe the local server, so they stay there), with
    ``settings`` replacing those of the same keys, each after a comment saying why."""
    base = [line for line in TS_CONFIG.read_text().splitlines() if "=" in line and not line.lstrip().startswith("#")]
    lines = [
        "# Written by scripts/kserve_store.py from handler/config.properties for KServe's TorchServe runtime:",
        "# edit those, not this file.",
    ]
    for line in base:
        key = line.split("=", 1)[0].strip()
        if key not in settings:
            lines.append(line)
    for key, (value, why) in settings.items():
        lines += [f"# {why}", f"{key}={value}"]
    return "\n".join(lines) + "\n"


def _archived_model_config(mar: Path) -> dict:
    """The archive's model-config.yaml (flat ``key: value`` lines; handler/mar.py writes it)."""
    text = _archived_text(mar, "model-config.yaml")
    config = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip() and not line.startswith(" "):
            config[key.strip()] = int(value)
    return config


def _archived_text(mar: Path, name: str) -> str:
    try:
        with zipfile.ZipFile(mar) as archive:
            return archive.read(name).decode()
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{mar} is not a model archive written by scripts/package_mar.py: {error}") from None


def main(mar: str = str(DEFAULT_MAR), output: str = "dist/kserve") -> None:
    try:
        store = write_store(mar, output)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {store / 'config' / 'config.properties'} and {store / 'model-store' / Path(mar).name}")


if __name__ == "__main__":
    fire.Fire(main)
