"""DDP under torchrun (and submitit) on CPU with gloo: one run directory, rank-0-only writing,
metrics equal to a single-process evaluation, identical weights, resume, and failures that end
every rank. The multi-process tests bind their process groups to 127.0.0.1."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from segtrain import distributed
from segtrain.build import build_model
from segtrain.checkpoint import load_checkpoint
from segtrain.data import ShardSampler
from segtrain.evaluate import evaluate_checkpoint
from segtrain.metrics import flatten_metrics

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_network_available() -> bool:
    try:
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# torchrun's agent and rank 0's TCPStore listen on every interface (PyTorch has no bind address
# for them), so the multi-process tests run in a network namespace of their own whose only
# interface is the loopback: nothing outside the test can reach those sockets.
PRIVATE_NETWORK = _private_network_available()
needs_private_network = pytest.mark.skipif(
    not PRIVATE_NETWORK, reason="needs `unshare -n` (a private network namespace) to keep torchrun's "
    "all-interface TCPStore unreachable from outside the machine")


def _isolated(cmd: list[str]) -> list[str]:
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]


def _env() -> dict[str, str]:
    # One thread per rank on a small CI machine; gloo's sockets on the loopback interface.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


def _torchrun(entry: list[str], args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", *entry, *args]
    return subprocess.run(_isolated(cmd), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    # 8 train images, batch 2 per rank x 2 ranks: 2 steps per epoch; every val image its own batch.
    return ["debug=fast", f"dataset.root={tmp_path / 'data'}", "dataset.batch_size_val=1", "trainer.max_steps=null",
            "trainer.epochs=2", *extra]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.slow
@needs_private_network
def test_torchrun_two_ranks_share_one_run_and_match_a_single_process_evaluation(tmp_path):
    runs = tmp_path / "runs"
    proc = _torchrun(["-m", "segtrain"], _overrides(tmp_path, f"hydra.run.dir={runs}/${{oc.env:SEGTRAIN_RUN_TIME}}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # One run directory (named by rank 0's start time on both ranks), one TensorBoard writer,
    # Hydra's files and train.log from rank 0 only.
    run_dirs = [p for p in runs.glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("global batch 4 = 2 per rank x 2 ranks") == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    _assert_ranks_agree_with_the_checkpoint(run_dir, metrics)


def _assert_ranks_agree_with_the_checkpoint(run_dir: Path, metrics: dict) -> None:
    """Identical weights on every rank, and they are last.pt's; the DDP evaluation (val split sharded
    over the ranks, confusion matrix summed) equals a single-process evaluation of last.pt, exactly."""
    digests = metrics["parameters_sha256"]
    assert len(digests) == metrics["world_size"] and len(set(digests)) == 1
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = build_model(OmegaConf.create(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])
    assert distributed.parameters_digest(model) == digests[0]
    single, class_names = evaluate_checkpoint(run_dir / "checkpoints" / "last.pt")
    single = flatten_metrics(single, class_names, "val")
    final = metrics["final"]
    assert set(final) == set(single)
    for key in final:
        if key == "val/loss":  # the mean of per-image losses, added in another order
            assert final[key] == pytest.approx(single[key], rel=1e-6)
        elif key.startswith("val/ece"):  # float64 sums of probabilities per bin, added in another order
            assert final[key] == pytest.approx(single[key], rel=1e-9)
        else:
            assert _same(final[key], single[key]), (key, final[key], single[key])


def _pid_of_rank(rank: int, tag: str, timeout: float = 120, variable: str = "RANK") -> int:
    """The worker process of ``rank`` (``variable`` in its environment: torchrun's RANK, submitit's
    SUBMITIT_LOCAL_GLOBALID) in the job whose environment holds ``tag``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                env = b"\0" + environ.read_bytes()
            except OSError:
                continue
            if tag.encode() in env and f"\0{variable}={rank}\0".encode() in env:
                return int(environ.parent.name)
        time.sleep(0.2)
    raise TimeoutError(f"no rank {rank} process appeared")


@pytest.mark.slow
@needs_private_network
def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_resume_ends_identical(tmp_path):
    """Both ranks save and stop at the step after the signal (one all-reduce per step); torchrun again with
    trainer.resume=auto: both ranks read that last.pt and end with the uninterrupted run's weights."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    longer = ("trainer.epochs=6", "trainer.log_every=1")  # 12 steps: time for the signal to land mid-run
    proc = _torchrun(["-m", "segtrain"], _overrides(tmp_path, f"hydra.run.dir={straight}", *longer))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = f"SEGTRAIN_TEST_TAG={tmp_path.name}"
    cmd = [str(TORCHRUN), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "segtrain",
           *_overrides(tmp_path, f"hydra.run.dir={stopped}", *longer)]
    env = {**_env(), "SEGTRAIN_TEST_TAG": tmp_path.name}
    job = subprocess.Popen(_isolated(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    log = stopped / "train.log"
    deadline = time.monotonic() + 180
    while not (log.is_file() and "checkpoints in" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # both ranks past the handler set-up, a step or two in
    os.kill(_pid_of_rank(1, tag), signal.SIGTERM)
    output = job.communicate(timeout=300)[0]
    assert job.returncode != 0, output[-3000:]  # torchrun reports its workers' exit status 75 as a failure
    step = load_checkpoint(stopped / "checkpoints" / "last.pt")["train_state"]["step"]
    assert 0 < step < 12, output[-3000:]
    text = log.read_text()
    assert f"stopped by SIGTERM at step {step}" in text, text[-3000:]  # rank 0 logs what rank 1 received
    assert not (stopped / "metrics.json").exists()
    proc = _torchrun(["-m", "segtrain"], _overrides(tmp_path, f"hydra.run.dir={stopped}", *longer,
                                                    "trainer.resume=auto"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {step}" in log.read_text().split("resumed from")[1].splitlines()[0]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, stopped))
    assert a["steps"] == b["steps"] == 12 and b["epochs"] == 6
    assert a["parameters_sha256"] == b["parameters_sha256"] and len(set(b["parameters_sha256"])) == 1
    assert a["final"].keys() == b["final"].keys() and all(_same(a["final"][k], b["final"][k]) for k in a["final"])


FAILING_ENTRY = """
import os
import segtrain.training.engine as engine

train_one_epoch = engine.train_one_epoch


def fail_on_rank_1(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected failure on rank 1")
    return train_one_epoch(*args, **kwargs)


engine.train_one_epoch = fail_on_rank_1

from segtrain.__main__ import main

main()
"""


@pytest.mark.slow
@needs_private_network
def test_a_failure_on_one_rank_ends_every_rank_with_its_error(tmp_path):
    """Rank 0 is inside its first DDP step, waiting on rank 1, when rank 1 raises: torchrun must
    end both and report rank 1's error rather than leave rank 0 waiting."""
    entry = tmp_path / "failing_entry.py"
    entry.write_text(textwrap.dedent(FAILING_ENTRY))
    run_dir = tmp_path / "run"
    proc = _torchrun([str(entry)], _overrides(tmp_path, f"hydra.run.dir={run_dir}"), timeout=240)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "injected failure on rank 1" in output
    assert "rank      : 1" in output or "rank: 1" in output  # torchrun's summary names the failing rank
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.json").exists()


@pytest.mark.slow
@needs_private_network
def test_submitit_requeues_a_job_stopped_by_sigusr2_and_it_resumes_in_its_run_directory(tmp_path):
    """``hydra/launcher=submitit_local`` with two tasks per job (each task a rank, the environment a SLURM job gets
    from ``hydra/launcher=slurm_ddp``). SIGUSR2 to every task, as submitit's controller and SLURM send it before the
    time limit: the run writes last.pt, hands the signal to submitit's handler, which pickles the job and requeues
    it; the requeued job resumes in the same run directory (sweep jobs run with trainer.resume=auto) and ends."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep, tag = tmp_path / "sweep", f"SEGTRAIN_TEST_TAG={tmp_path.name}"
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "SEGTRAIN_TEST_TAG": tmp_path.name}
    args = [sys.executable, "-m", "segtrain", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", *_overrides(tmp_path, "trainer.epochs=3"),
            "seed=7"]
    job = subprocess.Popen(_isolated(args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    log = sweep / "0" / "train.log"
    deadline = time.monotonic() + 240
    while not (log.is_file() and "checkpoints in" in log.read_text()) and job.poll() is None:
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    for rank in (0, 1):
        os.kill(_pid_of_rank(rank, tag, variable="SUBMITIT_LOCAL_GLOBALID"), signal.SIGUSR2)
    output = job.communicate(timeout=300)[0]
    submitit_logs = "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert job.returncode == 0, output[-3000:] + submitit_logs[-3000:]
    text = log.read_text()
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+)", text)
    assert stopped and 0 < int(stopped.group(1)) < 6, text[-3000:]
    assert f"{sweep / '0' / 'checkpoints' / 'last.pt'} at epoch" in text and \
        f"step {stopped.group(1)}" in text.split("resumed from")[1], text[-3000:]
    assert "Requeued job" in submitit_logs, submitit_logs[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert len(set(metrics["parameters_sha256"])) == 1


# --- single-process checks of the helpers ---------------------------------------------------


def test_shard_sampler_scores_every_image_once_over_the_ranks():
    for n, world in [(10, 3), (4, 2), (1, 2), (0, 2)]:
        shards = [list(ShardSampler(n, rank=r, world_size=world)) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(n))
        assert [len(ShardSampler(n, rank=r, world_size=world)) for r in range(world)] == [len(s) for s in shards]
    assert list(ShardSampler(5)) == [0, 1, 2, 3, 4]  # a single process: the split in order
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        ShardSampler(5, rank=2, world_size=2)


def test_helpers_are_no_ops_without_a_process_group():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_objects("x") == ["x"]
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert distributed.wrap_model(model, torch.device("cpu"), True) is model


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, through a file store (no socket)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_wrap_model_under_ddp_on_cpu(one_rank_group):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="model.sync_bn=true needs CUDA"):
        distributed.wrap_model(model, torch.device("cpu"), True)
    wrapped = distributed.wrap_model(model, torch.device("cpu"), "auto")
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    assert type(wrapped.module[1]) is torch.nn.BatchNorm2d  # no SyncBatchNorm on CPU
    assert distributed.unwrap(torch.compile(wrapped)) is model
    assert distributed.parameters_digest(wrapped) == distributed.parameters_digest(model)
    assert distributed.broadcast_object([1, "two"]) == [1, "two"]


def test_parameters_digest_sees_one_changed_value():
    model = torch.nn.Linear(3, 2)
    before = distributed.parameters_digest(model)
    with torch.no_grad():
        model.bias[1] += 1e-6
    assert distributed.parameters_digest(model) != before


def test_build_model_leaves_sync_bn_to_the_trainer(compose_cfg, fast_overrides):
    cfg = compose_cfg([*fast_overrides, "model.sync_bn=true"])
    assert cfg.model.sync_bn is True
    assert build_model(cfg.model).__class__.__name__ == "UNet"


SUBMITIT_TASK = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "4",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "2", "SUBMITIT_LOCAL_NODEID": "1", "SUBMITIT_LOCAL_GLOBALID": "3",
                 "SUBMITIT_LOCAL_LOCALID": "1"}


def test_a_submitit_task_is_described_as_torchrun_would(monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(os, "environ", os.environ.copy())  # the export writes variables: keep them in the test
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SUBMITIT_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    distributed._export_submitit_env()
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1"}
    port = int(os.environ["MASTER_PORT"])
    assert 20000 <= port < 60000
    # Every task of the job derives the same port from the job id.
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    for key in ("RANK", "MASTER_PORT"):
        monkeypatch.delenv(key)
    distributed._export_submitit_env()
    assert os.environ["RANK"] == "0" and int(os.environ["MASTER_PORT"]) == port


def test_world_size_without_the_rest_of_torchrun_environment_is_an_error(monkeypatch):
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env()


def test_slurm_ddp_launcher_asks_for_one_task_per_gpu(tmp_path, monkeypatch):
    """configs/hydra/launcher/slurm_ddp.yaml, turned into the sbatch script the way Hydra's submitit
    launcher does (no cluster here: a stand-in `srun` on the PATH lets submitit write the script)."""
    submitit = pytest.importorskip("submitit")
    from conftest import CONFIG_DIR
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm_ddp", "hydra.launcher.gpus_per_node=8",
                                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["tasks_per_node"] == 8  # follows gpus_per_node
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in params.items()
                                  if key not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --nodes=1",
                 "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "export SLURM_KILL_BAD_EXIT=1"):
        assert line in script, line
    assert script.index("export SLURM_KILL_BAD_EXIT=1") < script.index("srun ")
