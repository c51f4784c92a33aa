"""One LQF fit on several processes: torch.distributed, data-parallel over training items.

Everything the fit computes from the data is a sum over items: the ridge head's moments,
the K-FAC factors, the right-hand side J^T r and every CG iteration's product J^T J v.
So each process (a *rank*) holds a contiguous shard of the items: it runs the frozen
prefix on its images only, computes its shard's part of each sum, and one all-reduce
adds the parts. The parameter-sized vectors (dw, the CG directions) are replicated:
every rank gets the same reduced products, so every rank takes the same CG steps and
ends with the same dw, which rank 0 turns into the model.

Rank 0 is the caller (a training job's process) and hosts the rendezvous (a TCPStore).
It starts ranks 1..W-1 as child processes on the same host, or has a `RankLauncher`
start them elsewhere (the service's other workers); gloo on CPU, NCCL on GPU. They stop
when the fit ends, fails or is cancelled. A rank that dies makes the next collective
fail: the fit raises DistributedFitError instead of hanging (and every collective, like
the rendezvous, has a timeout).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lqf_core.errors import LQFError

# How long a collective waits for the other ranks (the slowest rank's share of one pass),
# and how long rank 0 waits for them all to join.
COLLECTIVE_TIMEOUT_S = 600.0
RENDEZVOUS_TIMEOUT_S = 300.0


class DistributedFitError(LQFError):
    """A rank of a distributed fit failed or disappeared."""


@dataclass
class Shard:
    """This process's place in a distributed fit: rank `rank` of `world`; it counts what
    it all-reduced (bench.scale)."""

    rank: int
    world: int
    reduced_bytes: int = 0
    reductions: int = 0

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n items (sizes differ by at most one)."""
        return shard_slice(n, self.rank, self.world)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over every rank (the same tensor on each), in place."""
        try:
            # gloo reduces CPU tensors only; NCCL wants them on the GPU.
            work = t if dist.get_backend() != "gloo" or t.device.type == "cpu" else t.cpu()
            dist.all_reduce(work)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise DistributedFitError(
                f"a rank of the distributed fit stopped answering ({exc}); the fit is "
                "abandoned") from None
        if work is not t:
            t.copy_(work)
        self.reduced_bytes += t.numel() * t.element_size()
        self.reductions += 1
        return t

    def total(self, value: float) -> float:
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64))[0])


def shard_slice(n: int, rank: int, world: int) -> slice:
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def join(rank: int, world: int, address: str, device: torch.device,
         rendezvous_s: float = RENDEZVOUS_TIMEOUT_S) -> Shard:
    """Meet the other ranks at `address` ("host:port", served by rank 0) -> this Shard.
    Waiting for them is bounded by `rendezvous_s`, each collective later by its own."""
    host, _, port = address.rpartition(":")
    try:
        store = dist.TCPStore(host, int(port), world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=rendezvous_s),
                              wait_for_workers=True)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except (RuntimeError, dist.DistBackendError, dist.DistStoreError) as exc:
        raise DistributedFitError(f"the {world} ranks of the distributed fit did not meet "
                                  f"at {address} within {rendezvous_s:.0f} s: {exc}") from None
    return Shard(rank, world)


def threads_per_rank(world: int) -> int:
    """The host's cores shared out among the ranks (oversubscribing them slows all)."""
    return max(1, (os.cpu_count() or 1) // world)


# A rank's work: given its Shard, compute its part (same collectives, same order as rank 0).
RankWork = Callable[[Shard], Any]


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when rank 0's process dies, even by SIGKILL (a lost training
    worker must not leave ranks waiting on a collective)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def usable_ranks(device: torch.device) -> int:
    """How many ranks this host can run side by side: a GPU each (NCCL allows one rank
    per device), or a core each on the CPU."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def run_rank(rank: int, world: int, address: str, device: str, work: RankWork,
             shares_host: bool = False) -> None:
    """Be rank `rank` of a fit whose rank 0 serves `address`: join, work, leave. Ranks
    that share rank 0's host share its cores too."""
    if shares_host:
        torch.set_num_threads(threads_per_rank(world))
    if torch.device(device).type == "cuda" and rank < torch.cuda.device_count():
        torch.cuda.set_device(rank)  # "cuda" now means this rank's own GPU
    shard = join(rank, world, address, torch.device(device))
    try:
        work(shard)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _child_rank(rank: int, world: int, address: str, device: str, work: RankWork) -> None:
    _die_with_parent()
    run_rank(rank, world, address, device, work, shares_host=True)


# Starts ranks 1..world-1 somewhere else (other hosts), given rank 0's address and the
# world size; they must have left (or never joined) when the context ends.
RankLauncher = Callable[[str, int], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def ranks(world: int, device: torch.device, helpers: Sequence[RankWork] = (),
          launcher: RankLauncher | None = None, host: str = "127.0.0.1") -> Iterator[Shard]:
    """Make this process rank 0 of `world` -> its Shard. Ranks 1..world-1 are child
    processes on this host running `helpers[rank - 1]` or, with `launcher`, whatever it
    starts (e.g. on other hosts, which reach rank 0 at `host`). On the way out every
    rank is stopped, whatever happened. On CUDA, local rank r runs on GPU r."""
    address = f"{host}:{_free_port(host)}"
    children = []
    remote: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if launcher is None:
        assert len(helpers) == world - 1 and world <= usable_ranks(device)
        context = mp.get_context("spawn")
        children = [context.Process(target=_child_rank, daemon=True,
                                    args=(rank, world, address, str(device), helpers[rank - 1]))
                    for rank in range(1, world)]
    else:
        remote = launcher(address, world)
    threads = torch.get_num_threads()
    if launcher is None:
        torch.set_num_threads(threads_per_rank(world))
    try:
        with remote:
            for child in children:
                child.start()
            shard = join(0, world, address, device)
            yield shard
    finally:
        torch.set_num_threads(threads)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
