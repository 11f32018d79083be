"""One run on several processes (and machines): DDP launched by torch.distributed's elastic
launcher, the engine behind `torchrun`. We use that engine; we write no launcher and no
all-reduce of our own.

launch() runs `entry(*args)` in nproc_per_node processes on this machine under an elastic
agent (c10d rendezvous; the agent restarts the whole group, up to max_restarts times, when
one process fails: trainer.train resumes it from the run's latest checkpoint). Each process
first calls init_rank(): the process group (gloo on CPU, nccl on CUDA, one rank per GPU by
LOCAL_RANK) and its share of the machine's threads. World is what train() needs to know of
the group, and the few collectives it uses, which are no-ops for a single process.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.recipe import physical_cores

R = TypeVar("R")
T = TypeVar("T")
# A rank waits this long for the others in a collective before it fails (and the agent
# restarts the group): longer than a recipe probe or a checkpoint on rank 0.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
RENDEZVOUS_TIMEOUT_S = 120  # nodes that do not all arrive fail the run, never hang it


@dataclass(frozen=True)
class World:
    """This process's place in the group; World() is a run on one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = ""  # "gloo" or "nccl"; "" without a process group

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that writes the run's files and reports."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (all ranks agree, e.g. on stopping)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over the ranks (in place, and returned)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, value: T) -> T:
        """Rank 0's value, on every rank (any picklable value)."""
        if self.size == 1:
            return value
        box: list[object] = [value]
        dist.broadcast_object_list(box, src=0, device=self.device())
        return box[0]  # type: ignore[return-value]  # rank 0 sent a T (pickle is untyped)

    def gather(self, value: T) -> list[T]:
        """Every rank's value, in rank order (on every rank)."""
        if self.size == 1:
            return [value]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, value)
        return out  # type: ignore[return-value]  # each rank sent a T (pickle is untyped)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def device(self) -> torch.device | None:
        """Where nccl needs the collectives' tensors (gloo: the CPU)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else None


def current() -> World:
    """The group this process belongs to (World() when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend=str(dist.get_backend()),
    )


def uses_cuda(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def procs_per_node(cfg: TrainConfig) -> int:
    """nproc_per_node resolved: 0 (auto) is one per GPU, or 1 on CPU. More processes than
    GPUs, or than physical cores on CPU, is refused: they would share a device or a core
    and be slower than fewer."""
    if uses_cuda(cfg):
        gpus = torch.cuda.device_count()
        n = cfg.nproc_per_node or gpus
        if n > gpus:
            raise UserError(f"nproc_per_node {n} exceeds the {gpus} GPU(s) of this machine")
        return n
    n = cfg.nproc_per_node or 1
    cores = physical_cores()
    if n > cores:
        raise UserError(
            f"nproc_per_node {n} exceeds the {cores} physical CPU core(s) of this machine"
        )
    return n


def check_world(cfg: TrainConfig, size: int) -> None:
    """What a world size asks of the configuration; a UserError naming the field."""
    if size > 1 and cfg.batch_size % size:
        raise UserError(
            f"batch_size {cfg.batch_size} must be a multiple of the world size {size} "
            "(nproc_per_node x nnodes): every process takes an equal share of each batch"
        )


def rank_threads(cfg: TrainConfig, local_size: int) -> int:
    """This process's torch threads: the machine's (threads, 0 = its physical cores) shared
    out among its processes, so that processes x threads never oversubscribe the cores."""
    return max(1, (cfg.threads or physical_cores()) // local_size)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def start_method(cfg: TrainConfig) -> Literal["fork", "spawn"]:
    """How the agent starts its ranks. fork on CPU: they inherit the training code this
    process imported (seconds per rank, at every restart too), and nothing here has run a
    torch kernel yet (a forked OpenMP pool could hang). spawn on CUDA: a forked process
    cannot use CUDA."""
    return "spawn" if uses_cuda(cfg) else "fork"


def launch(
    entry: Callable[..., R],
    args: tuple[object, ...],
    *,
    nproc: int,
    run_id: str,
    method: Literal["fork", "spawn"] = "spawn",
    nnodes: int = 1,
    max_restarts: int = 2,
    endpoint: str = "",
    host: bool = True,
    local_addr: str = "127.0.0.1",
    rendezvous_timeout_s: int = RENDEZVOUS_TIMEOUT_S,
) -> dict[int, R]:
    """Run entry(*args) in nproc processes here (one node of nnodes) under an elastic agent;
    the return values of this machine's ranks by rank. endpoint: the c10d rendezvous
    (host:port; default a free port on loopback, for one node), which node 0 hosts (host)
    and the other nodes join; local_addr: where the other nodes reach this one. Nodes that
    do not all arrive within rendezvous_timeout_s fail the launch. Raises the launcher's
    ChildFailedError when the group failed more than max_restarts times."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        role="trainer",
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint or f"127.0.0.1:{free_port()}",
        rdzv_configs={
            "is_host": host,
            "timeout": rendezvous_timeout_s,
            "join_timeout": rendezvous_timeout_s,
            # How long an agent waits on the rendezvous store (e.g. for a peer's rank info
            # when a group restarts without a node that died): bounded the same.
            "read_timeout": rendezvous_timeout_s,
        },
        max_restarts=max_restarts,
        monitor_interval=0.2,
        start_method=method,
        logs_specs=DefaultLogsSpecs(),
        local_addr=local_addr,
    )
    results: dict[int, R] = elastic_launch(config, entry)(*args)
    return results


def init_rank(cfg: TrainConfig, host: bool = True) -> World:
    """First thing in a launched process: join the process group and take this rank's share
    of the machine (its GPU, its threads). host: this process runs on node 0, the machine
    that reports the run; its processes take ranks 0.. whatever order the rendezvous gave
    the nodes (it sorts them by address and pid, so another node may come first)."""
    from torch._C._distributed_c10d import PrefixStore, TCPStore  # where their types live

    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ["LOCAL_WORLD_SIZE"])
    torch.set_num_threads(rank_threads(cfg, local_size))
    backend = "nccl" if uses_cuda(cfg) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # The agent's store outlives a restart of the group, and with it the addresses the dead
    # group's ranks published: a key prefix per attempt keeps the new group off them.
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        size,
        is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=COLLECTIVE_TIMEOUT,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = PrefixStore(f"mt/attempt-{attempt}", store)
    # Node 0's first process tells the others its rank; every rank shifts by it (the ranks
    # of a node are consecutive), so that node 0's processes are ranks 0...
    if host and local_rank == 0:
        prefixed.set("host_base_rank", str(rank))
    base = int(prefixed.get("host_base_rank"))
    dist.init_process_group(
        backend,
        store=prefixed,
        rank=(rank - base) % size,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return current()


def close_rank() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()
