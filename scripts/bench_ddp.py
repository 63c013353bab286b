"""Training throughput of one process against DDP ranks under torchrun, as ratios in one run.

Every variant is a real ``python -m segtrain`` run (the default model and synthetic dataset
unless overridden) for ``--steps`` optimizer steps; the figure is ``images_per_s`` from its
metrics.json: images over all ranks divided by the time spent in training steps (evaluation
and start-up excluded). Variants run one after another, the reference first and again last,
so drift of a shared machine shows up as a difference between the two reference rows.

    python scripts/bench_ddp.py                          # CPU: 1 process vs 2 ranks
    python scripts/bench_ddp.py --nproc 2 4 --steps 30   # on a GPU node: 1 vs 2 vs 4 GPUs
    python scripts/bench_ddp.py model.encoder=mobilenet_v3_large

On CPU the machine's cores are split evenly between the ranks (``OMP_NUM_THREADS``), so the
comparison is the same cores used by one process or by several. The rendezvous and gloo stay
on 127.0.0.1; where ``unshare -n`` is allowed the ranks run in a private network namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isolation() -> list[str]:
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    return []


def run_variant(nproc: int, batch: int, threads: int, steps: int, overrides: list[str], out: Path,
                isolate: list[str]) -> dict:
    run_dir = out / f"nproc{nproc}_batch{batch}_{len(list(out.iterdir()))}"
    args = ["-m", "segtrain", f"hydra.run.dir={run_dir}", f"trainer.batch_size={batch}", f"trainer.max_steps={steps}",
            "trainer.epochs=1", "trainer.progress=false", "trainer.num_workers=0", "trainer.log_every=5", *overrides]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nnodes=1", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(isolate + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"images_per_s": metrics["images_per_s"], "steps": metrics["steps"], "world_size": metrics["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="rank counts to compare with 1 process")
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch of the reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    isolate = _isolation()
    gpu = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        out = Path(tmp)
        variants = [(1, args.batch, "reference")]
        for n in args.nproc:
            variants.append((n, args.batch, f"same batch per rank (global {args.batch * n})"))
            if args.batch % n == 0:
                variants.append((n, args.batch // n, f"same global batch {args.batch}"))
        variants.append((1, args.batch, "reference, again"))
        for nproc, batch, note in variants:
            threads = max(1, args.cores // nproc)
            result = run_variant(nproc, batch, threads, args.steps, args.overrides, out, isolate)
            rows.append((nproc, batch, threads, note, result))
            print(f"{nproc} process(es), batch {batch}/rank, {threads} thread(s): "
                  f"{result['images_per_s']:.1f} images/s", file=sys.stderr)
    reference = (rows[0][4]["images_per_s"] + rows[-1][4]["images_per_s"]) / 2
    print(f"`python scripts/bench_ddp.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    device = torch.cuda.get_device_name() if gpu else f"CPU, {args.cores} threads split over the ranks"
    print(f"torch {torch.__version__}, {device}, {args.steps} steps per run, "
          f"network namespace: {'private' if isolate else 'host'}")
    print()
    print("| processes | batch per rank | threads per rank | images/s (all ranks) | vs 1 process | run |")
    print("|---|---|---|---|---|---|")
    for nproc, batch, threads, note, result in rows:
        print(f"| {nproc} | {batch} | {threads if not gpu else '-'} | {result['images_per_s']:.1f} | "
              f"{result['images_per_s'] / reference:.2f}x | {note} |")
    print()
    print("ratio: against the mean of the two reference rows")


if __name__ == "__main__":
    main()
