"""The one module that knows about process groups and ranks.

Everything else asks these helpers, which are no-ops in a single-process run.

A run is distributed when its launcher describes a group of processes in the environment:
``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
a submitit job (``hydra/launcher=submitit_slurm`` or ``submitit_local``) with several tasks
sets its own variables, which ``init_from_env`` turns into the same five. One process per GPU
(or per CPU process group) either way; segtrain never starts processes itself.

Backends: gloo for CPU tensors, and NCCL for CUDA tensors when CUDA is available
(``cpu:gloo,cuda:nccl``), so a run with ``trainer.device=cpu`` works on a GPU node too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# The start time all ranks use in the run directory's name (configs/train.yaml reads it).
RUN_TIME_ENV = "SEGTRAIN_RUN_TIME"
RUN_TIME_FORMAT = "%Y-%m-%d/%H-%M-%S"
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node, as the launcher set it (0 without one)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def _export_submitit_env() -> None:
    """Inside a submitit job with several tasks, describe the group as torchrun would.

    MASTER_ADDR and MASTER_PORT already in the environment are kept (a test binds 127.0.0.1);
    otherwise the first host of the job and a port derived from the job id, the same on every task.
    """
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    import submitit  # the `slurm` extra; only reached inside a submitit job

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return
    port = 20000 + int(hashlib.sha256(str(job.job_id).encode()).hexdigest(), 16) % 40000
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                      LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes))


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher describes; returns whether the run is distributed.

    Idempotent, and a no-op without a launcher (or with a world of one process). On a machine
    with CUDA the local rank's GPU becomes the current device before the group starts.
    """
    if is_distributed():
        return True
    _export_submitit_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [key for key in _TORCHRUN_KEYS if key not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                           "start distributed runs with torchrun (see README, 'Several GPUs')")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.debug("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def device_for(name: str) -> torch.device:
    """The device this rank trains on: ``cuda`` and ``auto`` mean the local rank's GPU under DDP."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={name!r} but CUDA is not available; use trainer.device=cpu or auto")
        if is_distributed():
            if device.index is not None and world_size() > 1:
                raise ValueError(f"trainer.device={name!r} names one GPU, but {world_size()} ranks share the run; "
                                 "use trainer.device=cuda (each rank takes its LOCAL_RANK's GPU)")
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (pickled through a CPU byte tensor)."""
    if not is_distributed():
        return obj
    # A CPU tensor goes through gloo whatever the CUDA backend; the length travels first.
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if rank() == src else None
    size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src)
    return pickle.loads(payload.numpy().tobytes()) if rank() != src else obj


def on_main_then_broadcast(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` computed on rank 0 only (a cache written once), its result on all ranks.

    If it raises on rank 0, that rank exits and the launcher ends the others, which wait here.
    """
    return broadcast_object(fn(*args, **kwargs) if is_main_process() else None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): without SyncBatchNorm each
    rank updates them from its own batches, and evaluation must use one set, the checkpoint's."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def wrap_model(model: torch.nn.Module, device: torch.device, sync_bn: bool | str = "auto") -> torch.nn.Module:
    """``model`` in DistributedDataParallel (unchanged in a single process).

    ``sync_bn``: ``auto`` converts BatchNorm to SyncBatchNorm under DDP on CUDA; PyTorch's
    SyncBatchNorm has no CPU kernel, so on CPU ``auto`` keeps per-rank statistics and ``true``
    is an error.
    """
    if not is_distributed():
        return model
    if sync_bn == "auto":
        sync_bn = device.type == "cuda"
    elif sync_bn and device.type != "cuda":
        raise ValueError(f"model.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm has no {device.type} "
                         "kernel); use model.sync_bn=auto or false")
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if hasattr(model, "apply_freeze_bn"):
            model.apply_freeze_bn()  # freeze_bn: the converted layers stay frozen
    log.info("DistributedDataParallel over %d ranks, %s", world_size(),
             "SyncBatchNorm" if sync_bn else "BatchNorm statistics per rank")
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def parameters_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name and bytes: equal digests, identical weights. (Buffers are
    left out: without SyncBatchNorm each rank's BatchNorm statistics differ until broadcast.)"""
    digest = hashlib.sha256()
    for name, tensor in unwrap(module).named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def quiet_other_ranks() -> None:
    """On ranks other than 0: no log files (rank 0 writes train.log) and only warnings on the console."""
    if is_main_process():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)
