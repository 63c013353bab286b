"""Two nodes simulated on one machine: two torchrun agents (one rank each) in one private network
namespace, sharing the loopback as nodes share a network and the checkout as nodes share a
filesystem. One run directory named by rank 0's clock, rank-0-only writing, and a SIGTERM to the
second node's agent that stops both nodes at one step and resumes to the uninterrupted weights."""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from test_distributed import (ROOT, TORCHRUN, _assert_ranks_agree_with_the_checkpoint, _env, _free_port, _overrides,
                              _pid_of_rank, _same, _torchrun, needs_private_network)

from segtrain.checkpoint import load_checkpoint

NODES = 2
SKEW_ENV = "SEGTRAIN_TEST_CLOCK_SKEW_S"
# Every process of the second node reads a clock an hour ahead (its datetime.now: segtrain's and Hydra's ${now:}),
# as a node whose clock is off would: a run directory named after each node's own clock would differ by an hour.
SKEWED_CLOCK_ENTRY = """
import datetime
import os

skew = datetime.timedelta(seconds=float(os.environ.get("SEGTRAIN_TEST_CLOCK_SKEW_S", "0")))
if skew:
    real = datetime.datetime

    class SkewedClock(real):
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) + skew

    datetime.datetime = SkewedClock  # before segtrain and Hydra import it

from segtrain.__main__ import main

main()
"""


def _launch(entry: list[str], args: list[str], tag: str, rendezvous: str, node_env: dict[int, str] | None = None,
            stagger_s: float = 1.5) -> subprocess.Popen:
    """Both nodes' agents, the second started ``stagger_s`` after the first, as two ``sh`` jobs of one private network
    namespace. ``rendezvous``: ``static`` (MASTER address and --node_rank, node 0 holds rank 0) or ``c10d`` (one
    rendezvous endpoint and id, the same command on both nodes; the rendezvous numbers the nodes). ``node_env``:
    ``VAR=value`` words for one node's environment. Prints each node's exit status last."""
    port = _free_port()
    if rendezvous == "static":
        launch = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    else:
        launch = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tag}"]
    lines = ["ip link set lo up || exit 1"]
    for node in range(NODES):
        rank = [f"--node-rank={node}"] if rendezvous == "static" else []
        cmd = [str(TORCHRUN), f"--nnodes={NODES}", "--nproc-per-node=1", *launch, *rank, *entry, *args]
        env = (node_env or {}).get(node, "")
        lines += [f"sleep {stagger_s}"] * bool(node) + [f"env {env} {shlex.join(cmd)} & node{node}=$!"]
    lines += ["wait $node0; rc0=$?; wait $node1; rc1=$?", 'echo "node exit statuses: $rc0 $rc1"']
    return subprocess.Popen(["unshare", "-n", "sh", "-c", "\n".join(lines)], cwd=ROOT, start_new_session=True,
                            env={**_env(), "SEGTRAIN_TEST_TAG": tag}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(job: subprocess.Popen, timeout: float = 300) -> tuple[list[int], str]:
    """(each node's exit status, the agents' and ranks' output). A job past ``timeout`` gets SIGTERM: each agent ends
    its worker (which runs in a session of its own) before it exits, SIGKILL after torchrun's shutdown timeout."""
    try:
        output = job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)
        job.communicate(timeout=60)
        raise
    statuses = re.search(r"node exit statuses: (\d+) (\d+)", output)
    assert statuses, output[-3000:]
    return [int(s) for s in statuses.groups()], output


@pytest.mark.slow
@needs_private_network
def test_two_nodes_share_one_run_directory_named_by_rank_0(tmp_path):
    """The static form (--node-rank: node 0 holds global rank 0), the second node started 1.5 s later with its clock
    an hour ahead: one run directory, named by node 0's clock, written by rank 0 alone; the two-node evaluation
    equals a single-process evaluation of last.pt."""
    entry = tmp_path / "skewed_clock_entry.py"
    entry.write_text(SKEWED_CLOCK_ENTRY)
    runs = tmp_path / "runs"
    before = datetime.now().replace(microsecond=0)
    job = _launch([str(entry)], _overrides(tmp_path, f"hydra.run.dir={runs}/${{oc.env:SEGTRAIN_RUN_TIME}}"),
                  tmp_path.name, "static", node_env={1: f"{SKEW_ENV}=3600"})
    statuses, output = _finish(job)
    assert statuses == [0, 0], output[-3000:]

    # One run directory, named by rank 0's (node 0's) clock: within the test's own start and end.
    run_dirs = list(runs.glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert before <= datetime.strptime(str(run_dir.relative_to(runs)), "%Y-%m-%d/%H-%M-%S") <= datetime.now()
    # Written by global rank 0 alone: one TensorBoard writer, Hydra's files and train.log once.
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("global batch 4 = 2 per rank x 2 ranks") == 1 and log_text.count("run directory:") == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    _assert_ranks_agree_with_the_checkpoint(run_dir, metrics)


@pytest.mark.slow
@needs_private_network
def test_sigterm_to_one_nodes_agent_stops_both_nodes_at_one_step_and_the_resume_ends_identical(tmp_path):
    """The reference is one node of two ranks (test_distributed's launch): two nodes of one rank each are the same
    world of two, so the weights must be identical, bit for bit. SIGTERM goes to the agent of the node that does not
    hold rank 0 (the c10d rendezvous decides which); the agent passes it to its worker, the ranks agree on the stop
    after the step in progress, rank 0 writes last.pt."""
    straight, stopped, tag = tmp_path / "straight", tmp_path / "stopped", tmp_path.name
    longer = ("trainer.epochs=6", "trainer.log_every=1")  # 12 steps: time for the signal to land mid-run
    proc = _torchrun(["-m", "segtrain"], _overrides(tmp_path, f"hydra.run.dir={straight}", *longer))
    assert proc.returncode == 0, proc.stderr[-3000:]

    job = _launch(["-m", "segtrain"], _overrides(tmp_path, f"hydra.run.dir={stopped}", *longer), tag, "c10d")
    log = stopped / "train.log"
    deadline = time.monotonic() + 180
    while not (log.is_file() and "checkpoints in" in log.read_text()) and job.poll() is None:
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # both ranks past the handler set-up, a step or two in
    worker = _pid_of_rank(1, tag)
    agent = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the worker's parent
    os.kill(agent, signal.SIGTERM)
    statuses, output = _finish(job)
    assert all(statuses), output[-3000:]  # each agent reports its worker's exit status 75 as a failure

    step = load_checkpoint(stopped / "checkpoints" / "last.pt")["train_state"]["step"]
    assert 0 < step < 12, output[-3000:]
    # Both ranks stopped at that step, each says so on its console: rank 0 names the last.pt it wrote, rank 1, which
    # writes no checkpoint, names none. train.log is rank 0's alone.
    stops = re.findall(r"stopped by SIGTERM at step (\d+); (\S*)last\.pt written", output)
    assert sorted(stops) == [(str(step), ""), (str(step), f"{stopped / 'checkpoints'}/")], output[-3000:]
    assert "exitcode  : 75" in output  # node 0's agent: its worker stopped on the signal it did not receive
    text = log.read_text()
    assert text.count("stopped by SIGTERM at step") == 1 and f"at step {step}; {stopped}" in text, text[-3000:]
    assert not (stopped / "metrics.json").exists()

    job = _launch(["-m", "segtrain"], _overrides(tmp_path, f"hydra.run.dir={stopped}", *longer, "trainer.resume=auto"),
                  tag, "c10d")
    statuses, output = _finish(job)
    assert statuses == [0, 0], output[-3000:]
    assert f"step {step}" in log.read_text().split("resumed from")[1].splitlines()[0]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, stopped))
    assert a["steps"] == b["steps"] == 12 and b["epochs"] == 6 and b["world_size"] == 2
    assert a["parameters_sha256"] == b["parameters_sha256"] and len(set(b["parameters_sha256"])) == 1
    assert a["final"].keys() == b["final"].keys() and all(_same(a["final"][k], b["final"][k]) for k in a["final"])
