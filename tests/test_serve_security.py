"""A long-running TorchServe from scripts/serve.py: keys that expire are renewed, and only what must listen does.

Real TorchServe on loopback, on free ports. Skipped without Java or TorchServe, except under CI=true.
"""

import json
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime

import psutil
import pytest
import requests

from bundle.synthetic import generate
from handler import control
from tests.bundle_runs import REPO
from tests.serving import JPEG, bundle_with_random_weights
from tests.test_torchserve import _free_ports, _package, _port_flags, _require_torchserve

EXPIRY_MIN = 1  # the shortest whole-minute expiry: the test waits it out once


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    _require_torchserve()
    root = bundle_with_random_weights(tmp_path_factory.mktemp("bundle"), trained_image_size=[32, 32])
    return _package(root, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return sorted(
        (generate(tmp_path_factory.mktemp("images"), n_images=42, image_size=(64, 48), seed=3) / "images").glob("*.jpg")
    )[0]


def _start(archive, run_dir, *extra) -> dict:
    inference, management, grpc_inference, grpc_management = _free_ports(4)
    result = subprocess.run(
        [
            sys.executable,
            "scripts/serve.py",
            "start",
            "--mar",
            str(archive),
            "--run_dir",
            str(run_dir),
            *_port_flags(
                inference=inference,
                management=management,
                grpc_inference=grpc_inference,
                grpc_management=grpc_management,
            ),
            "--timeout_s",
            "240",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        **control.read_server(run_dir),
        "ports": {
            "inference": inference,
            "management": management,
            "grpc_inference": grpc_inference,
            "grpc_management": grpc_management,
        },
    }


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    """Token auth on, keys valid for one minute."""
    run_dir = tmp_path_factory.mktemp("run")
    try:
        yield {**_start(archive, run_dir, "--token_expiration_min", str(EXPIRY_MIN)), "run_dir": run_dir}
    finally:
        control.stop_server(run_dir)


def _keys(run_dir) -> dict:
    return json.loads((run_dir / "key_file.json").read_text())


def _classify(server, image, key) -> requests.Response:
    return requests.post(
        f"{server['inference_url']}/predictions/skin_lesion",
        data=image.read_bytes(),
        timeout=120,
        headers={"Content-Type": JPEG, "Authorization": f"Bearer {key}"},
    )


def _refused(response: requests.Response) -> bool:
    return response.status_code == 400 and control.KEY_REFUSED in response.text


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses the server process accepts connections on (Java's IPv6 spellings as IPv4)."""
    spelled = {"::": "0.0.0.0"}
    return {
        (spelled.get(ip := connection.laddr.ip.removeprefix("::ffff:"), ip), connection.laddr.port)
        for connection in psutil.Process(pid).net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN
    }


def test_expired_keys_are_renewed_by_clients_and_by_rotate_keys(server, image):
    run_dir = server["run_dir"]
    first = _keys(run_dir)
    assert _classify(server, image, first["inference"]["key"]).status_code == 200
    expiry = datetime.fromisoformat(first["inference"]["expiration time"][:26].rstrip("Z") + "+00:00")
    time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 2)
    # what happened to every client after 24 h: the frontend refuses the old key, /ping included
    assert _refused(_classify(server, image, first["inference"]["key"]))
    assert _refused(
        requests.get(
            f"{server['inference_url']}/ping",
            timeout=30,
            headers={"Authorization": f"Bearer {first['inference']['key']}"},
        )
    )
    # the client reads the refused key again, finds it expired and renews it with the API key
    result = subprocess.run(
        [sys.executable, "scripts/predict.py", str(image), "--run_dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and f"{image}: class: " in result.stdout, result.stdout + result.stderr
    renewed = _keys(run_dir)["inference"]["key"]
    assert renewed != first["inference"]["key"] and _classify(server, image, renewed).status_code == 200
    # an operator's scheduled rotation: new keys at once, the previous ones refused
    rotated = subprocess.run(
        [sys.executable, "scripts/serve.py", "rotate_keys", "--run_dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    latest = _keys(run_dir)
    assert _refused(_classify(server, image, renewed))
    assert _classify(server, image, latest["inference"]["key"]).status_code == 200
    describe = requests.get(
        f"{server['management_url']}/models/skin_lesion",
        timeout=30,
        headers={"Authorization": f"Bearer {latest['management']['key']}"},
    )
    assert describe.status_code == 200, describe.text
    assert _refused(
        requests.get(
            f"{server['management_url']}/models/skin_lesion",
            timeout=30,
            headers={"Authorization": f"Bearer {first['management']['key']}"},
        )
    )


def test_by_default_management_needs_its_key_and_metrics_are_off(server):
    ports = server["ports"]
    assert _listening(server["pid"]) == {("127.0.0.1", ports[name]) for name in ports}
    describe = f"{server['management_url']}/models/skin_lesion"
    inference_key = _keys(server["run_dir"])["inference"]["key"]
    assert _refused(requests.get(describe, timeout=30))
    assert _refused(requests.put(describe, params={"min_worker": 0}, timeout=30))
    assert _refused(requests.get(describe, headers={"Authorization": f"Bearer {inference_key}"}, timeout=30))
    assert server["metrics_url"] is None


def test_under_sagemaker_management_is_a_socket_only_the_server_user_opens(archive, tmp_path):
    run_dir = tmp_path / "run"
    try:
        server = _start(archive, run_dir, "--sagemaker")
        ports = server["ports"]
        # no key exists to guard management, so it is on no port: inference on all interfaces, gRPC on loopback
        assert _listening(server["pid"]) == {
            ("0.0.0.0", ports["inference"]),
            ("127.0.0.1", ports["grpc_inference"]),
            ("127.0.0.1", ports["grpc_management"]),
        }
        socket_path = run_dir / control.MANAGEMENT_SOCKET
        assert server["management_socket"] == str(socket_path) and stat.S_ISSOCK(socket_path.stat().st_mode)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700  # nobody else reaches the socket or the logs
        describe = control.management_request(server, "GET", "/models/skin_lesion", run_dir)
        assert describe.status_code == 200 and describe.json()[0]["workers"], describe.text
        assert requests.get(f"{server['inference_url']}/ping", timeout=30).status_code == 200
    finally:
        control.stop_server(run_dir)
