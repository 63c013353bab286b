"""One training run in MLflow: params, tags, metrics at the TensorBoard log's steps, artefacts.

Every call to the tracker only queues work: one background thread talks to MLflow, so a log point costs the
training loop a queue put (the scalars are host floats already: no device sync is added). The first failure
(a server that stopped answering, a full artefact store) is logged once as a warning and tracking stops there;
training goes on and the run directory, which has everything, is untouched.

The run's id is kept in ``<run dir>/mlflow.json``: a resumed or requeued run (``trainer.resume``) continues the
same MLflow run. In a Hydra sweep every job is a child of one parent run per sweep directory, whose id the
first job writes into ``<sweep dir>/mlflow_parent.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import segtrain
from segtrain.atomic import atomic_write

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"
PARENT_FILE = "mlflow_parent.json"
EXTRA_HINT = "pip install -e '.[mlflow]' (or pip install mlflow)"
# MLflow's limits: a param value of 6000 characters, a batch of 1000 metrics or 100 params.
PARAM_VALUE_LIMIT = 6000
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
_STOP = object()
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def require_mlflow() -> None:
    try:
        importlib.import_module("mlflow")  # an optional extra
    except ImportError as err:
        raise ImportError(f"tracking=mlflow needs MLflow, which is not installed: {EXTRA_HINT}") from err


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a.b.c": "value"}`` of a nested config, values as strings cut to MLflow's limit."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        text = json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)
        return {prefix: text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def git_commit(where: Path) -> str | None:
    """The commit of the git checkout that holds ``where``, when there is one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


class MlflowTracker:
    """The MLflow side of one run: ``scalars``/``text``/``artifact`` queue work for the sender thread; ``close``
    waits for it (at most ``timeout`` seconds) and marks the run finished, failed or killed."""

    def __init__(self, client, run_id: str, timeout: float = 60.0, resumed: bool = False) -> None:
        self.client, self.run_id, self.timeout = client, run_id, timeout
        self.resumed = resumed  # an earlier part of the run logged its params already
        self.failed: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._send, name="segtrain-mlflow", daemon=True)
        self._thread.start()

    # -- the sender thread
    def _send(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            call, args = item
            if self.failed is not None:
                continue  # dropped: tracking stopped at the first failure
            try:
                call(*args)
            except Exception as err:  # noqa: BLE001  (any failure of the tracker must not reach training)
                self.failed = err
                log.warning("MLflow (%s) failed: %s: %s; tracking stops here, training goes on and the run "
                            "directory keeps everything", getattr(self.client, "tracking_uri", "?"),
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def _submit(self, call: Callable, *args: Any) -> None:
        if self.failed is None:
            self._queue.put((call, args))

    # -- what the run logs
    def params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        items = [Param(key[:250], value) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._submit(self._log_batch, [], items[start : start + PARAMS_PER_BATCH])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, int(step)) for key, value in values.items()
                 if value is not None and math.isfinite(float(value))]
        for start in range(0, len(items), METRICS_PER_BATCH):
            self._submit(self._log_batch, items[start : start + METRICS_PER_BATCH], [])

    def _log_batch(self, metrics: list, params: list) -> None:
        self.client.log_batch(self.run_id, metrics=metrics, params=params, synchronous=True)

    def text(self, name: str, body: str) -> None:
        self._submit(self.client.log_text, self.run_id, body, name)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """A file or a folder (``log_artifacts``) under ``folder`` in the run's artefacts, when it exists."""
        path = Path(path)
        if path.is_dir():
            self._submit(self.client.log_artifacts, self.run_id, str(path), folder)
        elif path.is_file():
            self._submit(self.client.log_artifact, self.run_id, str(path), folder)

    def close(self, status: str = "FINISHED") -> None:
        self._queue.put(_STOP)
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            log.warning("MLflow: queued logging did not finish within %g s; leaving it", self.timeout)
            return
        if self.failed is None:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as err:  # noqa: BLE001
                log.warning("MLflow: could not mark run %s %s: %s", self.run_id, status, err)


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _experiment_id(client, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except Exception:  # noqa: BLE001  (another job created it first)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _parent_run(client, experiment_id: str, sweep_dir: Path, tags: dict[str, str]) -> str:
    """The sweep's parent run: created by the first job (an exclusive file create decides which), read by the
    others."""
    path = sweep_dir / PARENT_FILE
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        for _ in range(600):  # the first job is creating it
            try:
                return json.loads(path.read_text())["run_id"]
            except (ValueError, KeyError):
                time.sleep(0.1)
        raise RuntimeError(f"{path}: no parent run id written within 60 s")
    run = client.create_run(experiment_id, run_name=sweep_dir.name, tags={**tags, "segtrain.sweep_dir": str(sweep_dir)})
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"run_id": run.info.run_id, "experiment_id": experiment_id}) + "\n")
    return run.info.run_id


def start_run(tracking: Any, run_dir: Path, overrides: list[str], sweep_dir: Path | None) -> MlflowTracker:
    """The tracker of the run in ``run_dir``: its MLflow run resumed when ``run_dir/mlflow.json`` names one on
    the same server, else a new run (a child of the sweep's parent when ``sweep_dir`` is given)."""
    require_mlflow()
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    # MLflow retries a failed request 7 times with growing pauses (minutes in all): a server gone mid-run would hold
    # the run's logging that long. A few quick retries unless the user set their own.
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri, artifact_root = resolve_uri(tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    saved = run_dir / RUN_FILE
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("tracking_uri") == uri:
            client.update_run(previous["run_id"], status="RUNNING")
            log.info("MLflow: continuing run %s at %s", previous["run_id"], uri)
            return MlflowTracker(client, previous["run_id"], resumed=True)
        log.warning("MLflow: %s names a run at %s, not %s: starting a new run", saved, previous.get("tracking_uri"),
                    uri)
    experiment_id = _experiment_id(client, tracking.experiment, artifact_root)
    tags = {"segtrain.version": segtrain.__version__, "segtrain.command": " ".join(sys.argv),
            "segtrain.run_dir": str(run_dir.resolve()), "mlflow.source.name": "segtrain"}
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if sweep_dir is not None:
        tags["mlflow.parentRunId"] = _parent_run(client, experiment_id, sweep_dir, {
            "segtrain.version": segtrain.__version__, "segtrain.command": " ".join(sys.argv)})
    run = client.create_run(experiment_id, run_name=tracking.run_name or run_dir.name, tags=tags)
    _write_json(saved, {"run_id": run.info.run_id, "tracking_uri": uri, "experiment_id": experiment_id})
    log.info("MLflow: run %s in experiment %r at %s", run.info.run_id, tracking.experiment, uri)
    return MlflowTracker(client, run.info.run_id)


def end_sweep(tracking: Any, sweep_dir: Path) -> None:
    """Mark the sweep's parent run finished (Hydra's on_multirun_end)."""
    path = sweep_dir / PARENT_FILE
    if not path.is_file():
        return
    require_mlflow()
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    try:
        MlflowClient(tracking_uri=resolve_uri(tracking.uri)[0]).set_terminated(json.loads(path.read_text())["run_id"])
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not mark the sweep's parent run finished: %s", err)


def resolve_uri(uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, artefact root for a new experiment): ``None`` is the local store under ``outputs/`` of the
    directory run from (an SQLite file, artefacts beside it); anything else is MLflow's own."""
    if uri is None:
        outputs = Path.cwd() / "outputs"
        outputs.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{outputs / 'mlflow.db'}", (outputs / "mlartifacts").as_uri()
    return str(uri), None


def check_uri(uri: str | None, timeout: float = 5.0) -> None:
    """Before training: MLflow importable, a server URI answering its health check."""
    require_mlflow()
    if uri is None:
        return
    text = str(uri)
    if text.startswith(("http://", "https://")):
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        try:
            with urllib.request.urlopen(text.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ValueError(f"tracking.uri={text}: no MLflow server answered ({err}); start one (mlflow server "
                             "--host 127.0.0.1 --port 5000) or leave tracking.uri null for the local store") from None
    elif "://" not in text and not text.startswith("databricks"):
        raise ValueError(f"tracking.uri={text!r}: expected http(s)://host:port, sqlite:///<file>, databricks, or null "
                         "for the local store under outputs/")
