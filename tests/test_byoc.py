"""The bring-your-own container (docker/), without Docker: its Dockerfile's COPY lines laid out under a
temporary root, then its `serve` command run as SageMaker runs it, answering /ping and /invocations from
the real TorchServe on loopback. Skipped without Java or TorchServe, except under CI=true.

The commands run in the image's Python environment as far as this machine can give it: this venv's
packages less every distribution docker/requirements.txt does not install, and less the checkout's own
packages, which the venv installs (editable) and the image does not (``image_python_env``, through
tests/environments.py). Without that, an import the image lacks passes every run here.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import pytest
import requests

from bundle.predictor import Predictor
from bundle.synthetic import generate
from tests.bundle_runs import REPO
from tests.environments import only_these_packages
from tests.serving import JPEG, SERVED_FIELDS, bundle_with_random_weights, sagemaker_model_dir
from tests.test_torchserve import _free_ports, _package, _port_flags, _require_torchserve

COPY = re.compile(r"^COPY\s+(?P<source>\S+)\s+(?P<target>/\S+)\s*$", re.MULTILINE)


IMAGE_HOME = "/opt/program"  # where docker/Dockerfile copies the project


def image_root(root, mar):
    """The files the Dockerfile copies, where it copies them, under ``root``; dist/ from ``mar``."""
    copies = COPY.findall((REPO / "docker" / "Dockerfile").read_text())
    assert copies, "no COPY lines in docker/Dockerfile"
    for source, target in copies:
        origin = mar if source == "dist/skin_lesion.mar" else REPO / source
        assert origin.is_file(), f"docker/Dockerfile copies {source}, which does not exist"
        assert not left_out_of_the_context(source), f"docker/Dockerfile copies {source}, which .dockerignore leaves out"
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, destination)
    return root


def left_out_of_the_context(source: str) -> bool:
    """Whether .dockerignore's patterns (no negations) match ``source`` or a folder above it."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    parts = Path(source).parts
    return any(
        fnmatch("/".join(parts[:depth]), pattern)
        or (pattern.startswith("**/") and fnmatch(parts[depth - 1], pattern.removeprefix("**/")))
        for pattern in patterns
        if pattern and not pattern.startswith("#")
        for depth in range(1, len(parts) + 1)
    )


def pod_command(container: dict, work: Path, mar: Path, mounts: dict[str, Path]) -> tuple[list, dict, Callable]:
    """A Kubernetes container's command and environment, run over the image's files (laid out under ``work``, with
    ``mar`` as its archive) on this machine: the image's folder and each of ``mounts`` (a path in the pod: its copy
    here) replaced in every argument and value, this Python for python3, the image's packages only. Returns the
    command, the environment and the replacement itself, for other paths of the spec."""
    replacements = {IMAGE_HOME: image_root(work / "image", mar) / IMAGE_HOME.lstrip("/"), **mounts}

    def here(text: str) -> str:
        for in_pod, on_this_machine in replacements.items():
            text = text.replace(in_pod, str(on_this_machine))
        return text

    command = [here(argument) for argument in container["command"]]
    assert command[0] == "python3"
    command[0] = sys.executable
    env = {variable["name"]: here(variable["value"]) for variable in container["env"]}
    env |= {"HOME": str(work), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    env["PYTHONPATH"] += ":" + image_python_env(work / "image_python")["PYTHONPATH"]
    return command, env, here


def image_python_env(directory: Path) -> dict:
    """Environment variables giving a Python process (and TorchServe's workers, which inherit them) the image's
    packages only: docker/requirements.txt's, without the checkout's editable packages."""
    return only_these_packages((REPO / "docker" / "requirements.txt").read_text().splitlines(), directory)


@pytest.fixture(scope="module")
def mar(tmp_path_factory):
    _require_torchserve()
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])
    return _package(root, tmp_path_factory.mktemp("dist"))


def serve_env(root, model_dir, run_dir, python=sys.executable) -> dict:
    env = dict(
        os.environ,
        SKIN_LESION_HOME=str(root / "opt" / "program"),
        SM_MODEL_DIR=str(model_dir),
        SERVE_RUN_DIR=str(run_dir),
        PYTHON=python,
        **image_python_env(run_dir.parent / "image_python"),
    )
    env.pop("SKIN_LESION_MAR", None)
    return env


def test_without_a_mar_in_the_model_archive_the_baked_in_one_is_served(mar, tmp_path):
    root = image_root(tmp_path / "image", mar)
    (tmp_path / "model").mkdir()
    result = subprocess.run(
        [str(root / "usr" / "local" / "bin" / "serve"), "serve"],
        capture_output=True,
        text=True,
        env=serve_env(root, tmp_path / "model", tmp_path / "run", python="echo"),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    baked = root / "opt" / "program" / "dist" / "skin_lesion.mar"
    assert f"start --sagemaker --foreground --mar {baked} --run_dir {tmp_path / 'run'}" in result.stdout


@contextlib.contextmanager
def running_container(root: Path, model_dir: Path, work: Path):
    """The image's ``serve`` command run as SageMaker runs it, with ``model_dir`` as /opt/ml/model; yields the
    inference URL once the model answers, then stops it with SIGTERM (a container's end) and checks it exited 0
    and stopped listening."""
    inference, management, metrics, grpc_inference, grpc_management = _free_ports(5)
    log_path = work / "container.log"
    with log_path.open("w") as log:
        container = subprocess.Popen(
            [
                str(root / "usr" / "local" / "bin" / "serve"),
                "serve",
                *_port_flags(
                    inference=inference,
                    management=management,
                    metrics=metrics,
                    grpc_inference=grpc_inference,
                    grpc_management=grpc_management,
                ),
                "--timeout_s",
                "240",
            ],
            env=serve_env(root, model_dir, work / "run"),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{inference}"
    try:
        deadline = time.monotonic() + 240
        while "serving skin_lesion" not in log_path.read_text():
            assert container.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "the container did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        container.send_signal(signal.SIGTERM)
        code = container.wait(timeout=120)
    assert code == 0, log_path.read_text()[-4000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/ping", timeout=5)


def _lesion_image(work: Path) -> bytes:
    images = generate(work / "data", n_images=42, image_size=(64, 48), seed=2) / "images"
    return sorted(images.glob("*.jpg"))[0].read_bytes()


def test_the_container_command_serves_ping_and_invocations_and_stops_on_sigterm(mar, tmp_path):
    root = image_root(tmp_path / "image", mar)
    model_dir = tmp_path / "opt_ml_model"
    model_dir.mkdir()
    shutil.copy(mar, model_dir / "skin_lesion.mar")  # as extracted from the endpoint's model.tar.gz
    with running_container(root, model_dir, tmp_path) as url:
        assert f"serving {model_dir / 'skin_lesion.mar'}" in (tmp_path / "container.log").read_text()
        assert requests.get(f"{url}/ping", timeout=30).status_code == 200
        response = requests.post(
            f"{url}/invocations", data=_lesion_image(tmp_path), headers={"Content-Type": JPEG}, timeout=120
        )
        assert response.status_code == 200, response.text
        assert set(response.json()) == SERVED_FIELDS


def test_a_sagemaker_model_directory_is_served_in_place_not_the_model_baked_into_the_image(mar, tmp_path):
    """What `sagemaker_deploy.py deploy --model <a training job's model.tar.gz> --image <this image>` runs:
    /opt/ml/model holds package_sagemaker.py's layout, no .mar, and its own weights must answer."""
    root = image_root(tmp_path / "image", mar)  # baked in: random weights of seed 0
    other = bundle_with_random_weights(tmp_path / "other", seed=1, trained_image_size=[48, 48])
    model_dir = sagemaker_model_dir(other, tmp_path)
    image = _lesion_image(tmp_path)
    expected = Predictor(other, device="cpu").predict([image])[0].probabilities
    with running_container(root, model_dir, tmp_path) as url:
        assert f"serving {model_dir}\n" in (tmp_path / "container.log").read_text()
        response = requests.post(f"{url}/invocations", data=image, headers={"Content-Type": JPEG}, timeout=120)
        assert response.status_code == 200, response.text
    served = response.json()["probabilities"]
    assert served == pytest.approx(expected, abs=1e-4)
    baked = Predictor(other, weights=_baked_weights(mar, tmp_path), device="cpu").predict([image])[0].probabilities
    assert served != pytest.approx(baked, abs=1e-3), "the baked-in model answered"


def _baked_weights(mar: Path, work: Path) -> Path:
    """The weights inside ``mar`` (a zip), extracted with their sidecar."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(work / "baked")
    (weights,) = (work / "baked").glob("model.pt")
    return weights


def test_a_model_archive_with_neither_a_mar_nor_a_model_directory_is_refused(mar, tmp_path):
    root = image_root(tmp_path / "image", mar)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pth").write_bytes(b"weights for another server")
    result = subprocess.run(
        [str(root / "usr" / "local" / "bin" / "serve"), "serve"],
        capture_output=True,
        text=True,
        env=serve_env(root, model_dir, tmp_path / "run", python="echo"),
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert f"{model_dir} holds neither a .mar nor a model directory" in result.stderr
