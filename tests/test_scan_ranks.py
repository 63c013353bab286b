"""The class-count pass spread over DDP ranks (``segtrain.data.scan_ranks``): two gloo ranks started with
``torch.multiprocessing`` (a file store, gloo's sockets on the loopback interface), against the one-process pass
and a direct bincount of the masks."""

import multiprocessing
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from segtrain.data import FolderDataset, ensure_synthetic
from segtrain.data.folder import read_mask
from segtrain.data.scan import counts_cache_file, image_class_counts
from segtrain.data.scan_ranks import class_counts_over_ranks

WORLD = 2
NUM_CLASSES = 3  # the synthetic set's background, region, spot
IGNORE = 255
WORKERS = (0, 2)
# A guard against a hang, not a speed check: two spawned ranks start and finish in seconds; a rank waiting in a
# collective that the other never joins would wait for the group's 120 s timeout or for ever.
JOIN_TIMEOUT_S = 300


class LoggedMasks:
    """A mask source over the training masks that appends each index it reads to a file of its process (ranks and
    loader workers alike)."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root, self.log_dir = root, log_dir
        self.mask_paths = sorted((root / "masks" / "train").glob("*.png"))

    def load_mask(self, index: int) -> np.ndarray:
        with open(self.log_dir / f"{os.getpid()}.txt", "a") as f:
            f.write(f"{index}\n")
        return read_mask(self.mask_paths[index])


def _reads(log_dir: Path) -> list[int]:
    return sorted(int(line) for path in log_dir.glob("*.txt") for line in path.read_text().split())


def _rank_main(rank: int, store: str, out: str, job) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pair sockets on the loopback only
    torch.set_num_threads(1)
    # Loader workers forked, as in a rank that torchrun starts: a spawned rank would spawn them too, and each
    # would import torch again (seconds per pass).
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        job(rank, Path(out))
    finally:
        dist.destroy_process_group()


def _spawn(job, tmp_path: Path) -> None:
    context = mp.start_processes(_rank_main, args=(str(tmp_path / "store"), str(tmp_path), job), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=5):
            assert time.monotonic() < deadline, f"the ranks still run after {JOIN_TIMEOUT_S} s: a hang"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _pass_job(rank: int, out: Path) -> None:
    """Per worker count: the checked pass of the dataset (cache on, a miss: rank 0 writes it, then the test moves
    it away) and the pass of a logged source; then a logged source twice with its cache, the second time a hit."""
    root = out / "data"
    (out / f"pid-r{rank}.txt").write_text(str(os.getpid()))
    for workers in WORKERS:
        counts = class_counts_over_ranks(FolderDataset(root, "train", NUM_CLASSES), NUM_CLASSES, IGNORE, workers)
        np.save(out / f"counts-w{workers}-r{rank}.npy", counts)
        dist.barrier()  # the cache is written before the move
        if rank == 0:
            (root / ".segtrain").rename(out / f"cache-w{workers}")
        dist.barrier()
        logged = LoggedMasks(root, out / f"reads-w{workers}")
        np.save(out / f"logged-w{workers}-r{rank}.npy",
                class_counts_over_ranks(logged, NUM_CLASSES, IGNORE, workers, cache=False))
    for attempt in ("miss", "hit"):
        logged = LoggedMasks(root, out / f"reads-{attempt}")
        np.save(out / f"{attempt}-r{rank}.npy", class_counts_over_ranks(logged, NUM_CLASSES, IGNORE, 2))
        dist.barrier()  # the miss's cache is written before the second look


@pytest.fixture(scope="module")
def two_rank_passes(tmp_path_factory):
    """The one-process matrix and cache file, then the same passes over two ranks."""
    out = tmp_path_factory.mktemp("scan_ranks")
    root = ensure_synthetic(out / "data", num_train=9, num_val=1, size=32)  # 9 pairs: shares of 5 and 4
    for sub in ("reads-w0", "reads-w2", "reads-miss", "reads-hit"):
        (out / sub).mkdir()
    dataset = FolderDataset(root, "train", NUM_CLASSES)
    single = image_class_counts(dataset, NUM_CLASSES, IGNORE)
    cache_file = counts_cache_file(dataset, NUM_CLASSES, IGNORE)
    with np.load(cache_file) as data:
        single_cache = {key: data[key] for key in data.files}
    shutil.rmtree(root / ".segtrain")  # the ranks' pass must miss
    _spawn(_pass_job, out)
    yield out, root, single, cache_file.name, single_cache
    shutil.rmtree(out)


def test_two_ranks_give_the_one_process_matrix_and_cache_file(two_rank_passes):
    out, root, single, cache_name, single_cache = two_rank_passes
    # the oracle of the oracle: a bincount of each mask as PIL reads it
    masks = [np.asarray(Image.open(p)) for p in sorted((root / "masks" / "train").glob("*.png"))]
    direct = np.stack([np.bincount(m[m != IGNORE].ravel(), minlength=NUM_CLASSES) for m in masks])
    assert np.array_equal(single, direct) and (direct > 0).sum() > len(masks)  # more than one class somewhere
    for workers in WORKERS:
        for rank in range(WORLD):
            counts = np.load(out / f"counts-w{workers}-r{rank}.npy")
            assert counts.dtype == np.int64 and np.array_equal(counts, single), (workers, rank)
            assert np.array_equal(np.load(out / f"logged-w{workers}-r{rank}.npy"), single), (workers, rank)
        written = sorted(p.name for p in (out / f"cache-w{workers}").iterdir())
        assert written == [cache_name]  # one file, the one-process pass's name (fingerprint), no temporary left
        with np.load(out / f"cache-w{workers}" / cache_name) as data:
            assert sorted(data.files) == sorted(single_cache)
            for key, value in single_cache.items():
                assert data[key].dtype == value.dtype and np.array_equal(data[key], value), (workers, key)


def test_each_pair_is_read_once_over_the_ranks_and_a_cache_hit_reads_none(two_rank_passes):
    out, _, single, _, _ = two_rank_passes
    rank_logs = [f"{(out / f'pid-r{rank}.txt').read_text()}.txt" for rank in range(WORLD)]
    for workers in WORKERS:
        assert _reads(out / f"reads-w{workers}") == list(range(len(single))), workers
    for rank, name in enumerate(rank_logs):  # without workers each rank reads its share itself: rank, rank + 2, ...
        assert (out / "reads-w0" / name).read_text().split() == [str(i) for i in range(rank, len(single), WORLD)]
    readers = {p.name for p in (out / "reads-w2").glob("*.txt")}  # with workers, only loader processes read
    assert readers.isdisjoint(rank_logs) and len(readers) == WORLD * WORKERS[1]
    assert _reads(out / "reads-miss") == list(range(len(single))) and _reads(out / "reads-hit") == []
    for rank in range(WORLD):
        assert np.array_equal(np.load(out / f"miss-r{rank}.npy"), single)
        assert np.array_equal(np.load(out / f"hit-r{rank}.npy"), single)


def _failing_job(rank: int, out: Path) -> None:
    """The pass with 0 then 2 workers; each rank writes the error it raised."""
    for workers in WORKERS:
        try:
            class_counts_over_ranks(FolderDataset(out / "data", "train", NUM_CLASSES), NUM_CLASSES, IGNORE, workers)
            message = "no error"
        except Exception as err:  # the test compares the type and message
            message = f"{type(err).__name__}: {err}"
        (out / f"error-w{workers}-r{rank}.txt").write_text(message)


def test_a_bad_mask_in_rank_1s_share_stops_both_ranks_naming_the_file(tmp_path):
    root = ensure_synthetic(tmp_path / "data", num_train=6, num_val=1, size=32)
    bad = FolderDataset(root, "train", NUM_CLASSES).mask_paths[3]  # rank 1 reads 1, 3, 5
    mask = np.asarray(Image.open(bad)).copy()
    mask[0, 0] = 7  # a label outside the 3 classes
    Image.fromarray(mask).save(bad)
    _spawn(_failing_job, tmp_path)
    for workers in WORKERS:
        own = (tmp_path / f"error-w{workers}-r1.txt").read_text()
        assert own.startswith(f"ValueError: {bad}: ") and "7" in own, own
        other = (tmp_path / f"error-w{workers}-r0.txt").read_text()
        assert other == f"RuntimeError: rank 1 stopped the class-count pass of {root}: {own}", other
    assert not (root / ".segtrain").exists() or not any((root / ".segtrain").iterdir())  # nothing cached
