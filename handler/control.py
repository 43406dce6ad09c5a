"""Control of the TorchServe that serves the skin-lesion archive: start it (returning once the model
answers), stop it, read and renew its keys, and send requests with them. ``scripts/serve.py`` is its
command line; ``scripts/predict.py``, the benchmarks and the tests use it directly.
TorchServe runs with ``handler/config.properties`` and its working directory in the run folder, which
collects everything of one server: ``logs/`` (ts_log.log, model_log.log, access and metrics logs),
``torchserve.out`` (its console), ``key_file.json`` (token keys), ``server.json`` (its URLs, for
clients), ``ready`` (present while it takes traffic, for a readiness probe), ``metrics.yaml`` (the
metrics TorchServe reports) and ``tmp/`` (the extracted archive and TorchServe's pid file, so that servers
in different run folders don't see each other).

What listens where (README, "What listens where"):
- inference (/ping, /predictions, /invocations): 127.0.0.1:``inference_port``, the inference key;
  with ``--sagemaker`` 0.0.0.0:``inference_port`` without a key (SageMaker sends none; port 8080, the
  default, is what a SageMaker bring-your-own container must use);
- management (describe, scale workers, the token API; registering models is off): 127.0.0.1:
  ``management_port``, the management key. With ``--sagemaker`` there is no key to require, so it
  listens on no port at all but on the Unix socket ``<run_dir>/management.sock``, which only the
  server's user can open;
- metrics: off, unless ``--metrics_port`` is given (``metrics_host``, 127.0.0.1 by default; no key). With
  ``--metrics_mode prometheus`` its ``/metrics`` serves TorchServe's metrics and the model's own
  (``bundle.serving_metrics``) in Prometheus' text format; in ``log`` mode (the default) they go to
  ``logs/ts_metrics.log`` and ``logs/model_metrics.log``;
- gRPC: 127.0.0.1:``grpc_inference_port`` and ``grpc_management_port`` (TorchServe 0.12 always opens
  them), the same keys; with ``--sagemaker`` without a key.

``--authenticated_by FRONT`` listens as ``--sagemaker`` does (0.0.0.0, no key, management on the Unix
socket) for a server that only ``FRONT`` reaches and that authenticates every request itself: replicas
behind one Kubernetes Service (docs/DEPLOY.md). TorchServe 0.12 cannot take its keys from outside (it
draws them at random when it starts; ``TokenAuthorization`` in its frontend), so replicas cannot share a
key: the credential lives in front of them. The option names that front, and ``start`` prints a warning
with it and records it in server.json, so that no server answers without a key by accident.

Keys expire ``token_expiration_min`` after they were issued (config.properties: 1440, a day). The API
key in key_file.json never expires, and TorchServe's token API renews the others with it:
``rotate_keys`` does that (run it from cron or a timer more often than the expiry), and
``authorised_request`` (which scripts/predict.py uses) renews an expired key itself, re-reading
key_file.json whenever the server refuses a key.

Health, as TorchServe 0.12 behaves (read from its frontend and measured): /ping answers 200
"Healthy" while the worker is still loading the model, and while a worker that fails to load is
within the model's ``maxRetryTimeoutInSec`` of its first failure (300 s by default; it retries with
backoff all along); only then 500 "Unhealthy". The describe API cannot tell the two apart either (a
loading and a dead worker both show "UNLOADING"). So ``start`` waits until a worker is READY and fails
as soon as ts_log.log says a worker died loading the model: it then stops the server and exits
non-zero with the end of the model log. The archive sets ``maxRetryTimeoutInSec`` to 30 s
(``handler/mar.py``), so that a model that cannot load turns /ping to 500 within about 30 s of its
first failure. With token authorisation on, /ping needs the inference key too.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
import yaml

from bundle.serving_metrics import MODEL_METRICS
from handler import MODEL_NAME

TS_CONFIG = Path(__file__).with_name("config.properties")
# Relative to the working directory, the bundle root (where make and the README run every command).
DEFAULT_MAR = Path("dist") / f"{MODEL_NAME}.mar"
DEFAULT_RUN_DIR = Path("runs") / "serve"
LOG_TAIL_LINES = 40
# What TorchServe's ts_log.log says when a worker dies while loading the model.
LOAD_FAILURE_SIGNS = ("Load model failed", "Backend worker process died")
# What TorchServe answers (400) when a key is wrong or expired.
KEY_REFUSED = "Token Authorization failed"
MANAGEMENT_SOCKET = "management.sock"
# Present while the server takes traffic: written once a worker is READY, removed when a drain begins. A
# readiness probe reads it (deploy/kubernetes): /ping says Healthy before the model has loaded.
READY_FILE = "ready"
# A drain ends once the queue has stayed empty this long: time for the batch a worker holds to be answered.
DRAIN_QUIET_S = 3.0
# log: TorchServe's default, metrics to logs/*metrics.log; prometheus: served on the metrics API's /metrics.
METRICS_MODES = ("log", "prometheus")


class ServeError(RuntimeError):
    """TorchServe could not be started, or the model did not become ready."""


def start_server(
    mar: str | os.PathLike,
    run_dir: str | os.PathLike,
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int | None = None,
    grpc_inference_port: int = 7070,
    grpc_management_port: int = 7071,
    sagemaker: bool = False,
    timeout_s: float = 300,
    token_expiration_min: float | None = None,
    authenticated_by: str | None = None,
    metrics_mode: str = "log",
    metrics_host: str = "127.0.0.1",
    ts_config: str | os.PathLike = TS_CONFIG,
) -> dict:
    """Start TorchServe and wait until the model is ready; return the server description (see ``read_server``).

    On failure the server is stopped again and ``ServeError`` says why, with the end of the logs.
    ``metrics_mode``: one of ``METRICS_MODES``; prometheus needs ``metrics_port``. ``metrics_host``: the
    metrics API's bind address (it carries no key: loopback unless a scraper elsewhere must reach it).
    ``ts_config``: TorchServe's config.properties (another one than ``handler/config.properties``: KServe's, as
    scripts/kserve_store.py writes it); what this function sets (addresses, ports, keys) overrides it.
    """
    if metrics_mode not in METRICS_MODES:
        raise ServeError(f"metrics_mode must be one of {METRICS_MODES}, got {metrics_mode!r}")
    if metrics_mode == "prometheus" and metrics_port is None:
        raise ServeError("metrics_mode 'prometheus' serves /metrics on the metrics API: give metrics_port too")
    mar, run_dir = Path(mar).resolve(), Path(run_dir).resolve()
    if authenticated_by is not None and not str(authenticated_by).strip():
        raise ServeError("--authenticated_by needs the name of the front that authenticates every request")
    keyless = sagemaker or authenticated_by is not None
    # a SageMaker model directory (package_sagemaker.py's layout, what a training job writes) is served in place,
    # as AWS's toolkit serves it: its handler and bundle modules are under code/
    model_directory = (mar / "MAR-INF" / "MANIFEST.json").is_file()
    if not (mar.is_file() or model_directory):
        raise ServeError(
            f"model archive {mar} not found: build it with scripts/package_mar.py (or give a model directory "
            "laid out by scripts/package_sagemaker.py)"
        )
    if not Path(ts_config).is_file():
        raise ServeError(f"TorchServe config {ts_config} not found")
    torchserve = _torchserve_executable()
    if _server_pid(run_dir) is not None:
        raise ServeError(f"a TorchServe from {run_dir} is already running: scripts/serve.py stop --run_dir {run_dir}")
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # the key file and the management socket are the server user's alone
    for stale in ("key_file.json", "server.json", MANAGEMENT_SOCKET, READY_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    host = "0.0.0.0" if keyless else "127.0.0.1"
    # Without token authorisation no key can guard management: a Unix socket, not a port, then.
    management = f"unix:{run_dir / MANAGEMENT_SOCKET}" if keyless else f"http://127.0.0.1:{management_port}"
    env = _environment(run_dir) | {
        "TS_INFERENCE_ADDRESS": f"http://{host}:{inference_port}",
        "TS_MANAGEMENT_ADDRESS": management,
        "TS_GRPC_INFERENCE_PORT": str(grpc_inference_port),
        "TS_GRPC_MANAGEMENT_PORT": str(grpc_management_port),
        "TS_METRICS_MODE": metrics_mode,
        "TS_METRICS_CONFIG": str(_write_metrics_config(run_dir)),
    }
    if metrics_port is not None:
        env |= {"TS_ENABLE_METRICS_API": "true", "TS_METRICS_ADDRESS": f"http://{metrics_host}:{metrics_port}"}
    if model_directory:
        env["PYTHONPATH"] = os.pathsep.join(path for path in (str(mar / "code"), env["PYTHONPATH"]) if path)
    if token_expiration_min is not None:
        env["TS_TOKEN_EXPIRATION_TIME_MIN"] = str(
            token_expiration_min
        )  # TorchServe's variable for token_expiration_min
    command = [
        torchserve,
        "--start",
        "--ncs",
        "--ts-config",
        str(Path(ts_config).resolve()),
        "--model-store",
        str(mar.parent),
        "--models",
        f"{MODEL_NAME}={mar.name}",
    ]
    if keyless:
        command.append("--disable-token-auth")
    log_start = _ts_log_size(run_dir)  # a reused run folder's log holds earlier servers' lines
    _run_torchserve(command, run_dir, env)
    pid = _server_pid(run_dir)
    if pid is None:
        raise ServeError(f"TorchServe did not start:\n{_log_tail(run_dir)}")
    server = {
        "pid": pid,
        "inference_url": f"http://127.0.0.1:{inference_port}",
        "management_url": None if keyless else f"http://127.0.0.1:{management_port}",
        "management_socket": str(run_dir / MANAGEMENT_SOCKET) if keyless else None,
        "metrics_url": None if metrics_port is None else f"http://{_local_host(metrics_host)}:{metrics_port}",
        "metrics_mode": metrics_mode,
        "model": MODEL_NAME,
        "token_auth": not keyless,
        "authenticated_by": authenticated_by,
    }
    (run_dir / "server.json").write_text(json.dumps(server, indent=2))
    try:
        _wait_until_ready(server, run_dir, log_start, time.monotonic() + timeout_s)
    except ServeError:
        stop_server(run_dir)
        raise
    (run_dir / READY_FILE).write_text(f"{MODEL_NAME} ready\n")
    return server


def drain(run_dir: str | os.PathLike = DEFAULT_RUN_DIR, timeout_s: float = 30) -> int:
    """Before a stop: stop taking traffic and let the requests already sent be answered.

    Removes the ready file (a readiness probe then takes the server out of its Service), keeps serving, and
    returns once the model's queue has stayed empty for ``DRAIN_QUIET_S`` (the batch a worker holds has that
    long to be answered) or after ``timeout_s``: the number of requests still queued then (TorchServe's own
    stop resets every open connection, queued or not)."""
    run_dir = Path(run_dir).resolve()
    (run_dir / READY_FILE).unlink(missing_ok=True)
    server = read_server(run_dir)
    deadline, quiet_since, pending = time.monotonic() + timeout_s, time.monotonic(), 0
    while time.monotonic() < deadline and psutil.pid_exists(server["pid"]):
        try:
            pending = int(_model_status(server, run_dir)["jobQueueStatus"]["pendingRequests"])
        except (requests.ConnectionError, ServeError, KeyError, IndexError, ValueError):
            return 0  # the frontend no longer answers: nothing left to wait for
        if pending:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= DRAIN_QUIET_S:
            return 0
        time.sleep(0.2)
    return pending


def stop_server(run_dir: str | os.PathLike = DEFAULT_RUN_DIR) -> bool:
    """Stop the TorchServe started from ``run_dir`` and wait until it and its workers have exited;
    False when none was running."""
    run_dir = Path(run_dir).resolve()
    pid = _server_pid(run_dir)
    if pid is None:
        return False
    (run_dir / READY_FILE).unlink(missing_ok=True)
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    _run_torchserve([_torchserve_executable(), "--stop"], run_dir, _environment(run_dir))
    _, alive = psutil.wait_procs(processes, timeout=60)
    for process in alive:  # a worker or frontend that ignored the stop
        process.kill()
    (run_dir / "server.json").unlink(missing_ok=True)
    return True


def read_server(run_dir: str | os.PathLike = DEFAULT_RUN_DIR) -> dict:
    """The running server's URLs and settings, as ``start`` wrote them to ``<run_dir>/server.json``."""
    path = Path(run_dir) / "server.json"
    if not path.is_file():
        raise ServeError(f"no server.json in {run_dir}: start the server with scripts/serve.py start")
    return json.loads(path.read_text())


def read_inference_key(run_dir: str | os.PathLike = DEFAULT_RUN_DIR) -> str:
    """The inference API key of the server started from ``run_dir`` (TorchServe writes key_file.json there)."""
    return _read_key(run_dir, "inference")


def auth_headers(run_dir: str | os.PathLike = DEFAULT_RUN_DIR, api: str = "inference") -> dict:
    """The Authorization header for ``api`` ("inference" or "management"); none when token auth is off."""
    return {"Authorization": f"Bearer {_read_key(run_dir, api)}"} if read_server(run_dir)["token_auth"] else {}


def rotate_keys(run_dir: str = str(DEFAULT_RUN_DIR), apis: tuple[str, ...] = ("inference", "management")) -> None:
    """Issue new keys (valid for another ``token_expiration_min``) through TorchServe's token API; the old ones
    stop working at once. TorchServe rewrites key_file.json, where clients find the new keys."""
    server = read_server(run_dir)
    if not server["token_auth"]:
        raise ServeError(f"the server from {run_dir} runs without token authorisation: there are no keys to renew")
    for api in apis:
        response = requests.post(
            f"{server['management_url']}/token",
            params={"type": api},
            headers={"Authorization": f"Bearer {_read_key(run_dir, 'API')}"},
            timeout=30,
        )
        if response.status_code != 200:
            raise ServeError(
                f"TorchServe refused to renew the {api} key: {response.status_code} {response.text.strip()}"
            )


def authorised_request(
    run_dir: str | os.PathLike, method: str, url: str, api: str = "inference", **kwargs
) -> requests.Response:
    """``requests.request`` with the current key of ``api``. When the server refuses the key, read key_file.json
    again (another client may have renewed it) and, if the key there is the refused one, renew it (it expired)."""
    headers = kwargs.pop("headers", {})
    for attempt in range(3):
        key = _read_key(run_dir, api)
        response = requests.request(method, url, headers={**headers, "Authorization": f"Bearer {key}"}, **kwargs)
        if not _key_refused(response) or attempt == 2:
            return response
        if _read_key(run_dir, api) == key:
            try:
                rotate_keys(run_dir, (api,))
            except ServeError:
                pass  # another client renewed it a moment earlier: its key is in the file
    return response


def _key_refused(response: requests.Response) -> bool:
    return response.status_code in (400, 401) and KEY_REFUSED in response.text


def management_request(server: dict, method: str, path: str, run_dir: str | os.PathLike, **kwargs) -> requests.Response:
    """A management API call, over the port with the management key, or (``--sagemaker``) over the Unix socket."""
    if server.get("management_socket"):
        return _unix_socket_request(server["management_socket"], method, path, kwargs.get("timeout", 30))
    return authorised_request(run_dir, method, f"{server['management_url']}{path}", "management", **kwargs)


def _unix_socket_request(socket_path: str, method: str, path: str, timeout: float) -> requests.Response:
    """An HTTP request over a Unix socket (requests cannot address one), answered as a ``requests.Response``."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(socket_path)

    connection = UnixConnection("localhost", timeout=timeout)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        response = requests.Response()
        response.status_code, response._content = answer.status, answer.read()
        response.headers = requests.structures.CaseInsensitiveDict(answer.getheaders())
        return response
    except OSError as error:
        raise requests.ConnectionError(str(error)) from error
    finally:
        connection.close()


def _read_key(run_dir: str | os.PathLike, api: str) -> str:
    path = Path(run_dir) / "key_file.json"
    for _ in range(20):
        if not path.is_file():
            raise ServeError(f"no key_file.json in {run_dir}: is the server running, with token authorisation on?")
        try:
            return json.loads(path.read_text())[api]["key"]
        except ValueError:  # TorchServe rewrites the file in place while renewing a key
            time.sleep(0.05)
    raise ServeError(f"{path} is not valid JSON")


def _write_metrics_config(run_dir: Path) -> Path:
    """TorchServe's own metrics config (the frontend's metrics and its default model metrics) with the model's
    counters added to ``model_metrics``, as ``<run_dir>/metrics.yaml``: in prometheus mode TorchServe exposes
    only the metrics declared there."""
    config = yaml.safe_load(_torchserve_metrics_config().read_text())
    config["model_metrics"].setdefault("counter", []).extend(
        {"name": metric.name, "unit": "Count", "dimensions": metric.dimensions} for metric in MODEL_METRICS
    )
    path = run_dir / "metrics.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _torchserve_metrics_config() -> Path:
    """``ts/configs/metrics.yaml`` of the installed TorchServe (found without importing it)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("the ts package is not installed: pip install -r requirements.txt (torchserve)")
    path = Path(spec.submodule_search_locations[0]) / "configs" / "metrics.yaml"
    if not path.is_file():
        raise ServeError(f"{path} not found: TorchServe's default metrics config, which serving extends")
    return path


def _local_host(bind_host: str) -> str:
    """Where a client on this machine reaches a server bound to ``bind_host``."""
    return "127.0.0.1" if bind_host == "0.0.0.0" else bind_host


def _wait_until_ready(server: dict, run_dir: Path, log_start: int, deadline: float) -> None:
    """Poll until a worker is READY and /ping says Healthy; fail as soon as a worker dies loading the model."""
    while True:
        if not psutil.pid_exists(server["pid"]):
            raise ServeError(f"TorchServe exited while starting:\n{_log_tail(run_dir)}")
        failure = _load_failure(run_dir, log_start)
        if failure:
            raise ServeError(f"the model failed to load ({failure}):\n{_log_tail(run_dir)}")
        try:
            workers = _model_status(server, run_dir)["workers"]
            ping = requests.get(f"{server['inference_url']}/ping", headers=auth_headers(run_dir), timeout=5)
        except (requests.ConnectionError, ServeError, KeyError, IndexError, ValueError):
            workers, ping = [], None  # not listening yet, or the key file is not written yet
        if ping is not None and ping.status_code != 200:
            raise ServeError(f"/ping answers {ping.status_code} {ping.text.strip()}:\n{_log_tail(run_dir)}")
        if ping is not None and any(worker["status"] == "READY" for worker in workers):
            return
        if time.monotonic() > deadline:
            raise ServeError(f"the model was not ready in time:\n{_log_tail(run_dir)}")
        time.sleep(0.5)


def _model_status(server: dict, run_dir: Path) -> dict:
    """The management API's description of the model: its workers and its queue."""
    return management_request(server, "GET", f"/models/{MODEL_NAME}", run_dir, timeout=5).json()[0]


def _load_failure(run_dir: Path, log_start: int) -> str | None:
    """TorchServe's own words when a worker died loading the model (it would otherwise retry, with backoff)."""
    log = run_dir / "logs" / "ts_log.log"
    if not log.is_file():
        return None
    with open(log, "rb") as f:
        f.seek(log_start)
        lines = f.read().decode(errors="replace").splitlines()
    return next((line.strip() for line in lines if any(sign in line for sign in LOAD_FAILURE_SIGNS)), None)


def _ts_log_size(run_dir: Path) -> int:
    log = run_dir / "logs" / "ts_log.log"
    return log.stat().st_size if log.is_file() else 0


def _log_tail(run_dir: Path) -> str:
    """The end of the model log (the handler's traceback) and of the frontend's own lines (bind errors and
    the like); before the frontend has a log, the launcher's output (e.g. a missing Java)."""
    time.sleep(1)  # a traceback reaches the log a moment after the line that says the worker died
    parts = []
    for name, own_lines in (
        ("logs/model_log.log", lambda line: True),
        ("logs/ts_log.log", lambda line: "MODEL_LOG" not in line and "TS_METRICS" not in line),
        ("torchserve.out", lambda line: not (run_dir / "logs" / "ts_log.log").is_file()),
    ):
        path = run_dir / name
        if path.is_file():
            lines = [line for line in path.read_text(errors="replace").splitlines() if own_lines(line)]
            if lines:
                parts.append(f"--- {path} (last lines)\n" + "\n".join(lines[-LOG_TAIL_LINES:]))
    return "\n".join(parts) or f"(no logs in {run_dir})"


def _run_torchserve(command: list[str], run_dir: Path, env: dict) -> None:
    """Run the torchserve launcher in ``run_dir``. Its output goes to a file, never a pipe: the Java
    server it starts inherits the launcher's stdout, and a pipe would never close."""
    with open(run_dir / "torchserve.out", "ab") as out, open(os.devnull, "rb") as no_input:
        subprocess.run(
            command,
            cwd=run_dir,
            env=env,
            stdin=no_input,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )


def _environment(run_dir: Path) -> dict:
    """Logs and temporary files (and so TorchServe's pid file) inside the run folder, and a PYTHONPATH without
    the folder this control was imported from (/opt/program in the container): TorchServe's workers inherit it,
    and a ``bundle`` there would shadow the one the archive ships with its handler."""
    own_root = Path(__file__).resolve().parents[1]
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(path for path in inherited if path and Path(path).resolve() != own_root),
        LOG_LOCATION=str(run_dir / "logs"),
        METRICS_LOCATION=str(run_dir / "logs"),
        TMPDIR=str(run_dir / "tmp"),
        TEMP=str(run_dir / "tmp"),
    )


def _server_pid(run_dir: Path) -> int | None:
    """The pid of the TorchServe frontend started from ``run_dir``, when it is running."""
    pid_file = run_dir / "tmp" / ".model_server.pid"
    try:
        process = psutil.Process(int(pid_file.read_text().strip()))
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    return process.pid if is_model_server(process) else None


def is_model_server(process: psutil.Process) -> bool:
    """Whether ``process`` is a TorchServe frontend (its Java process)."""
    try:
        return "org.pytorch.serve.ModelServer" in process.cmdline()
    except psutil.Error:  # gone, or not ours to read
        return False


def _torchserve_executable() -> str:
    """The launcher installed next to this Python; TorchServe's frontend also needs Java (17 or newer)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise ServeError(
            "TorchServe needs Java 17 or newer: install a JRE (e.g. openjdk-17-jre-headless) or set JAVA_HOME"
        )
    launcher = Path(sys.executable).parent / "torchserve"
    if not launcher.is_file():
        raise ServeError(f"{launcher} not found: pip install -r requirements.txt (torchserve)")
    return str(launcher)
