"""Peak memory of one call, for the benchmark scripts: the profiler's allocation records on CPU,
the allocator's peak on CUDA. ``check_cpu_memory_method`` checks the CPU method on known
allocations first, since it is the only memory figure there."""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_cpu_bytes(fn: Callable[[], None]) -> int:
    """Peak of the bytes allocated (running sum of allocations and frees) while ``fn`` runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())  # stable: same-time records keep their recorded order
    running = peak = 0
    for record in records:
        running += record.nbytes()
        peak = max(peak, running)
    return peak


def peak_cuda_bytes(fn: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def check_cpu_memory_method() -> None:
    """Stop unless peak_cpu_bytes gives known peaks: it is the only memory figure on CPU."""
    mib = 2**20

    def freed_then_smaller() -> None:
        big = torch.empty(8 * mib, dtype=torch.uint8)
        del big
        small = torch.empty(3 * mib, dtype=torch.uint8)
        del small

    leaf = torch.randn(mib, requires_grad=True)  # 4 MiB

    def forward_backward_known() -> None:
        # forward: leaf * 2 (4 MiB, freed once summed); backward: the gradient, 4 MiB, kept as leaf.grad.
        (leaf * 2).sum().backward()

    for name, fn, expected in (("freed buffer", freed_then_smaller, 8 * mib),
                               ("forward + backward", forward_backward_known, 4 * mib)):
        measured = peak_cpu_bytes(fn)
        if not expected <= measured <= expected * 1.01 + 4096:
            raise SystemExit(f"memory method check '{name}': measured {measured} bytes, expected {expected}; "
                             "the profiler's memory records cannot be trusted on this torch build")
