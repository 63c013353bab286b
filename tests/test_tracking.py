"""tracking=mlflow against a real MLflow server on 127.0.0.1 (started here, stopped at the end) and against the
local store: what TensorBoard gets MLflow gets at the same steps, params, artefacts, sweeps as parent and children,
a resumed run in the same MLflow run, a server that dies mid-run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from conftest import train_then_signal  # noqa: E402
from segtrain.config import compose_config  # noqa: E402
from segtrain.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1):
                return process, uri
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    _stop(process)
    raise RuntimeError(f"the MLflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    """The server and its workers (its own process group, started here)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, uri = _start_server(tmp_path_factory.mktemp("mlflow_server"))
    yield uri
    _stop(process)


def _overrides(tmp: Path, uri: str | None, experiment: str, *extra: str) -> list[str]:
    return ["debug=fast", f"dataset.root={tmp / 'data'}", "trainer.max_steps=4", "tracking=mlflow",
            f"tracking.experiment={experiment}", *([f"tracking.uri={uri}"] if uri else []), *extra]


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow.json").read_text())["run_id"]


def _check_run_like_tensorboard(client: MlflowClient, run_dir: Path) -> None:
    run = client.get_run(_run_id(run_dir))
    assert run.info.status == "FINISHED"
    assert run.data.params["weights.strategy"] == "median_freq" and run.data.params["loss.terms.ce.loss_weight"]
    assert run.data.tags["segtrain.version"] and "segtrain.command" in run.data.tags
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if not tag.startswith("hparam/")]
    assert {"train/loss", "val/dice/spot", "val/ece/spot", "train/lr"} <= set(tags)
    for tag in tags:
        expected = [(e.step, e.value) for e in events.Scalars(tag)]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert [s for s, _ in history] == [s for s, _ in expected], tag
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "model_card.md", "eval", "data"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval/val")} >= {"eval/val/report.md",
                                                                                     "eval/val/per_image.csv"}


def test_a_run_logs_what_tensorboard_shows(server, tmp_path):
    overrides = _overrides(tmp_path, server, "one_run")
    train(compose_config(overrides), tmp_path / "run", overrides=overrides)
    _check_run_like_tensorboard(MlflowClient(server), tmp_path / "run")


def test_the_local_store_needs_no_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local store is outputs/ of the directory run from
    overrides = _overrides(tmp_path, None, "local")
    train(compose_config(overrides), tmp_path / "run", overrides=overrides)
    assert (tmp_path / "outputs/mlflow.db").is_file()
    _check_run_like_tensorboard(MlflowClient(f"sqlite:///{tmp_path / 'outputs/mlflow.db'}"), tmp_path / "run")


def test_a_run_stopped_by_sigusr2_and_resumed_continues_its_mlflow_run(server, tmp_path):
    common = [*_overrides(tmp_path, server, "resumed"), "trainer.epochs=3", "trainer.max_steps=null",
              "trainer.log_every=1"]  # 8 images, batch 2: 12 steps
    run = tmp_path / "run"
    returncode, log = train_then_signal(common, run, tmp_path)
    assert returncode == 75 and "stopped by SIGUSR2" in log, log[-3000:]
    run_id = _run_id(run)
    client = MlflowClient(server)
    assert client.get_run(run_id).info.status == "KILLED"
    stopped_at = max(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert 0 < stopped_at < 12
    train(compose_config([*common, "trainer.resume=auto"]), run, overrides=common)
    assert _run_id(run) == run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 13))
    assert len(client.search_runs([client.get_experiment_by_name("resumed").experiment_id])) == 1
    _check_run_like_tensorboard(client, run)


def test_a_sweep_is_one_parent_run_with_a_child_per_job(server, tmp_path):
    command = [sys.executable, "-m", "segtrain", "-m", *_overrides(tmp_path, server, "sweep"), "loss=ce,focal",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.progress=false"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted("ce" if "loss.terms.ce.loss_weight" in c.data.params else "focal" for c in children) == ["ce", "focal"]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_training_goes_on_when_the_server_dies(tmp_path):
    process, uri = _start_server(tmp_path / "server")
    command = [sys.executable, "-m", "segtrain", *_overrides(tmp_path, uri, "dies"), "trainer.max_steps=40",
               "trainer.epochs=10", f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=false"]
    training = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(uri)
        for _ in range(600):  # until the run has logged something
            if (tmp_path / "run/mlflow.json").is_file() and client.get_metric_history(_run_id(tmp_path / "run"),
                                                                                      "train/loss"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no metric logged")
    finally:
        _stop(process)
    output, _ = training.communicate(timeout=600)
    assert training.returncode == 0, output[-3000:]
    assert output.count("tracking stops here, training goes on") == 1
    for name in ("metrics.json", "config.yaml", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/model_card.md", "eval/val/report.md"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run/metrics.json").read_text())["steps"] == 40


def test_a_bad_tracking_uri_stops_before_anything_is_written(tmp_path):
    command = [sys.executable, "-m", "segtrain", *_overrides(tmp_path, f"http://127.0.0.1:{_free_port()}", "bad"),
               f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "tracking.uri=http://127.0.0.1:" in done.stderr
    assert "no MLflow server answered" in done.stderr and not (tmp_path / "run").exists()


def test_a_stored_optuna_study_is_refused_before_the_sweep():
    from omegaconf import OmegaConf

    from segtrain.train import check_sweep_storage

    check_sweep_storage(OmegaConf.create({"hydra": {"sweeper": {"storage": None}}}))  # in memory: fine
    with pytest.raises(ValueError, match=r"storage=sqlite:///x.db: optuna 2.10 .* SQLAlchemy 2\."):
        check_sweep_storage(OmegaConf.create({"hydra": {"sweeper": {"storage": "sqlite:///x.db"}}}))


def test_registered_model_loads_and_segments_as_predict(server, trained, tmp_path):
    """export register=<name> -> mlflow.pyfunc.load_model("models:/<name>/1") -> the mask segtrain.predict writes."""
    import numpy as np
    from PIL import Image

    from segtrain.export import main as export_main
    from segtrain.predict import main as predict_main

    checkpoint = trained / "run/checkpoints/last.pt"
    assert export_main([f"checkpoint={checkpoint}", "format=onnx", f"output={tmp_path / 'model.onnx'}", "size=64",
                        "verify_size=96", "register=segtrain-test", f"tracking_uri={server}"]) == 0
    mlflow.set_tracking_uri(server)
    model = mlflow.pyfunc.load_model("models:/segtrain-test/1")
    assert model.metadata.metadata["class_names"] == ["background", "region", "spot"]
    image_path = sorted((trained / "data/images/val").glob("*.png"))[0]
    mask = model.predict(np.asarray(Image.open(image_path).convert("RGB")))
    assert predict_main([f"checkpoint={checkpoint}", f"input={image_path}", f"output={tmp_path / 'pred'}",
                         "progress=false"]) == 0
    np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "pred" / image_path.name)))
    local = Path(mlflow.artifacts.download_artifacts("models:/segtrain-test/1", dst_path=str(tmp_path / "dl")))
    names = {p.name for p in (local / "artifacts").iterdir()}
    assert names == {"last.pt", "model.onnx", "model_card.md"}, names
