"""Peak memory of this process (host RSS high-water mark, CUDA allocator peak), and the same
facts for every process of a torchrun launch, gathered for rank 0's report (`gsq.dist`)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from gsq import dist


def reset_peak_memory(device: torch.device) -> None:
    """Restart peak-memory tracking (host: Linux's VmHWM via /proc/self/clear_refs; CUDA stats)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS (GiB) of this process since the last reset, and peak CUDA allocation."""
    try:
        status = Path("/proc/self/status").read_text()
        kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_host_rss_gib": kib / 2**20}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def rank_entries(device: torch.device, **facts: float) -> list[dict]:
    """On every rank, one entry per rank in rank order: {"rank", "peak_host_rss_gib",
    "peak_cuda_gib" (CUDA only), **facts} (e.g. rows computed), each rank's own numbers
    (`dist.all_gather_object`); a single process gets its one entry. A collective: every rank
    calls it at the same point."""
    mine = {"rank": dist.world().rank, **peak_memory(device), **facts}
    return dist.all_gather_object(mine)
