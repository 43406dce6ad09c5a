"""Serve the skin-lesion archive with TorchServe: start (returns once the model answers) and stop.

Classify with ``scripts/predict.py``, which finds the server and its key through the run folder.

    python scripts/serve.py start [--mar dist/skin_lesion.mar] [--run_dir runs/serve]
        [--inference_port 8080 --management_port 8081]
        [--metrics_port PORT [--metrics_mode log|prometheus] [--metrics_host 127.0.0.1]]
        [--grpc_inference_port 7070 --grpc_management_port 7071] [--token_expiration_min 1440]
        [--sagemaker | --authenticated_by FRONT] [--foreground [--drain_s 30]] [--ts_config FILE]
    python scripts/serve.py rotate_keys [--run_dir runs/serve]
    python scripts/serve.py stop [--run_dir runs/serve]

What listens where, the keys' lifetime and how start waits for health: ``handler/control.py``.
"""

import signal
import sys
import threading
from pathlib import Path

import fire
import psutil

from handler import MODEL_NAME, control


def start(
    mar: str = str(control.DEFAULT_MAR),
    run_dir: str = str(control.DEFAULT_RUN_DIR),
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int | None = None,
    grpc_inference_port: int = 7070,
    grpc_management_port: int = 7071,
    sagemaker: bool = False,
    timeout_s: float = 300,
    foreground: bool = False,
    token_expiration_min: float | None = None,
    authenticated_by: str | None = None,
    metrics_mode: str = "log",
    metrics_host: str = "127.0.0.1",
    drain_s: float = 30,
    ts_config: str = str(control.TS_CONFIG),
) -> None:
    """Start TorchServe with the archive ``mar``, wait until the model answers, print the URLs.

    ``mar``: a ``.mar`` (scripts/package_mar.py), or a model directory as scripts/package_sagemaker.py lays it out
    (a training job's model, an extracted model.tar.gz), served in place.

    Every port must be free, the gRPC ones too (TorchServe always opens them, on loopback).
    ``foreground`` then blocks until the server ends (a container's main process), copying TorchServe's console
    (its own log lines, the access log and the model's log) to stdout, the pod's log. SIGTERM drains it, then stops
    it: the ready file goes (a readiness probe's), and the requests already sent are answered, for up to
    ``drain_s`` seconds (``control.drain``); then TorchServe stops, which resets any connection still open.
    ``metrics_port``: serve TorchServe's metrics API there (off by default), on ``metrics_host`` (loopback;
    it carries no key). ``metrics_mode``: ``log`` (metrics to logs/*metrics.log) or ``prometheus`` (served on
    ``/metrics`` of the metrics port, the model's own counters included: docs/SERVING.md, "Metrics").
    ``token_expiration_min``: the keys' lifetime (default: config.properties, 1440). ``authenticated_by``: turn
    token authorisation off and listen on 0.0.0.0 for the named front, which must authenticate every request
    (replicas behind a Kubernetes Service: docs/DEPLOY.md); a warning naming it goes to stderr. ``ts_config``:
    TorchServe's config.properties (default handler/config.properties; KServe's pod: the one
    scripts/kserve_store.py writes, with the kservev2 envelope).
    """
    if authenticated_by is not None:
        print(
            f"WARNING: token authorisation is OFF: 0.0.0.0:{inference_port} answers "
            f"anyone who reaches it; only {authenticated_by!r} may reach it, and it must authenticate every request",
            file=sys.stderr,
        )
    if foreground:  # from the first moment: a pod may be stopped while the model still loads
        signal.signal(signal.SIGTERM, _terminate)
        # TorchServe's console (its log lines, the access log, the model's log) to ours: a container's log
        console = _Console(Path(run_dir) / "torchserve.out")
    server = None
    try:
        server = control.start_server(
            mar,
            run_dir,
            inference_port,
            management_port,
            metrics_port,
            grpc_inference_port,
            grpc_management_port,
            sagemaker,
            timeout_s,
            token_expiration_min,
            authenticated_by,
            metrics_mode=metrics_mode,
            metrics_host=metrics_host,
            ts_config=ts_config,
        )
        _announce(server, run_dir, sagemaker)
        if foreground:
            psutil.Process(server["pid"]).wait()
    except control.ServeError as error:
        sys.exit(f"error: {error}")
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time; the pod's grace period bounds it
        if server is not None:
            left = control.drain(run_dir, drain_s)
            if left:
                print(f"stopping with {left} requests still queued after {drain_s} s of draining", file=sys.stderr)
        control.stop_server(run_dir)
    finally:
        if foreground:
            console.close()


class _Console:
    """Copies what TorchServe writes to ``path`` from now on to this process's stdout, every half second, until
    ``close``, which copies the rest (the server's last lines)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.is_file() else 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed.wait(0.5):
            self._copy()
        self._copy()

    def _copy(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=10)


class _Terminated(Exception):
    """SIGTERM arrived: the server started so far is stopped before exiting."""


def _terminate(signum, frame):
    raise _Terminated


def _announce(server: dict, run_dir: str, sagemaker: bool) -> None:
    print(
        f"serving {MODEL_NAME}: POST {server['inference_url']}/predictions/{MODEL_NAME}"
        f"{' and /invocations' if sagemaker else ''}; logs in {Path(run_dir) / 'logs'}"
    )
    if server["metrics_mode"] == "prometheus":
        print(f"Prometheus metrics (no key): GET {server['metrics_url']}/metrics")
    if server["token_auth"]:
        print(
            f"token authorisation on: send 'Authorization: Bearer <key>', the inference key in "
            f"{Path(run_dir) / 'key_file.json'}; keys expire, renew them with scripts/serve.py rotate_keys"
        )


def stop(run_dir: str = str(control.DEFAULT_RUN_DIR)) -> None:
    """Stop the TorchServe started from ``run_dir`` and wait until it and its workers have exited."""
    if control.stop_server(run_dir):
        print(f"stopped TorchServe from {Path(run_dir).resolve()}")
    else:
        print(f"no TorchServe running from {Path(run_dir).resolve()}")


def rotate_keys(run_dir: str = str(control.DEFAULT_RUN_DIR)) -> None:
    try:
        control.rotate_keys(run_dir)
    except control.ServeError as error:
        sys.exit(f"error: {error}")
    print(f"renewed the inference and management keys in {Path(run_dir) / 'key_file.json'}")


if __name__ == "__main__":
    fire.Fire({"start": start, "stop": stop, "rotate_keys": rotate_keys})
