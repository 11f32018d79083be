"""`scripts/bench train --nproc N`: one run on N processes x 1 thread (DDP, gloo on CPU)
against one process x N threads, on the same machine, batches and steps.

Three runs of trainer.train (gpt2 tiny, fp32, no compile, the bench's batch and sequence):

- 1 process x N threads;
- N processes x 1 thread through the elastic launcher (DDP);
- the same N processes with DDP's gradient exchange replaced by a hook that hands each
  rank its own gradients back (the ranks then drift apart: timing only). The gap between
  this and the real DDP run is what the exchange costs: the communication share of a step.

Rates are the steady ones: tokens of the steps after the warm-up that ran no validation,
over their wall time (the processes' start-up and imports are left out).
"""

import itertools
import os
import shutil
import time
from pathlib import Path

import msgspec
import torch
from torch._C._distributed_c10d import GradBucket  # where its type lives

from trainer.config import TrainConfig
from trainer.report import Progress


def _steady(stamps: list[tuple[int, float, bool]], warmup: int, tokens_per_step: int) -> float:
    """Tokens per second of the steps after the warm-up that did not validate."""
    seconds, steps = 0.0, 0
    for (_, before, _), (step, at, validated) in itertools.pairwise(stamps):
        if step > warmup and not validated:
            seconds += at - before
            steps += 1
    return steps * tokens_per_step / seconds if seconds > 0 else 0.0


def _run(
    cfg: TrainConfig, corpus: Path, tok: Path, run_dir: Path, warmup: int, leader: bool = True
) -> float:
    """A run's steady rate; the leader (rank 0: the one that writes) clears its folder."""
    from trainer.train import train

    stamps: list[tuple[int, float, bool]] = []

    def on_progress(p: Progress) -> None:
        stamps.append((p.step, time.perf_counter(), p.val_loss is not None))

    if leader:
        shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    try:
        train(cfg, corpus, tok, run_dir, on_progress=on_progress)
    finally:
        if leader:
            shutil.rmtree(run_dir, ignore_errors=True)
    return _steady(stamps, warmup, cfg.batch_size * cfg.max_seq_len)


def _own_gradients(state: object, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that exchanges nothing: each rank keeps its own gradients."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _rank(
    cfg: TrainConfig, corpus: Path, tok: Path, run_dir: Path, warmup: int, exchange: bool
) -> float:
    """One process of the DDP runs; rank 0's steady rate (all ranks' tokens)."""
    from torch.nn.parallel import DistributedDataParallel

    import trainer.train as loop
    from trainer.distributed import close_rank, init_rank

    if not exchange:

        class NoExchange(DistributedDataParallel):
            def __init__(
                self,
                module: torch.nn.Module,
                device_ids: list[int] | None = None,
                forward_sync_buffers: bool = True,
            ) -> None:
                super().__init__(
                    module, device_ids=device_ids, forward_sync_buffers=forward_sync_buffers
                )
                self.register_comm_hook(None, _own_gradients)

        # Timing only: this process's training loop wraps its model in NoExchange.
        vars(loop)["DistributedDataParallel"] = NoExchange
    world = init_rank(cfg)
    try:
        return _run(cfg, corpus, tok, run_dir, warmup, world.leader)
    finally:
        close_rank()


def bench_ddp(
    nproc: int, corpus: Path, tok: Path, work: Path, steps: int, warmup: int, batch: int, seq: int
) -> None:
    from trainer.distributed import launch

    cfg = TrainConfig(
        model_family="gpt2",
        model_size="tiny",
        max_seq_len=seq,
        batch_size=batch,
        max_steps=steps,
        precision="fp32",
        compile="off",
        threads=nproc,
        eval_every=10 * steps,
        checkpoint_every=10 * steps,
    )
    print(
        f"ddp bench: gpt2 tiny, seq {seq}, global batch {batch}, {steps} steps ({warmup} "
        f"warm-up), fp32 eager; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    one = _run(cfg, corpus, tok, work / "ddp-one", warmup)
    print(f"  1 process x {nproc} threads:            {one:9,.0f} tok/s", flush=True)
    rates: dict[bool, float] = {}
    for exchange in (True, False):
        ddp = msgspec.structs.replace(cfg, nproc_per_node=nproc)
        results = launch(
            _rank,
            (ddp, corpus, tok, work / "ddp-many", warmup, exchange),
            nproc=nproc,
            run_id=f"bench-{os.getpid()}-{int(exchange)}",
            max_restarts=0,
        )
        rates[exchange] = results[0]
    real, alone = rates[True], rates[False]
    print(
        f"  {nproc} processes x 1 thread (gloo DDP):   {real:9,.0f} tok/s "
        f"({real / one:.2f}x the single process)"
    )
    print(f"  the same, no gradient exchange:       {alone:9,.0f} tok/s")
    share = 1 - real / alone if alone > 0 else 0.0
    print(f"  communication share of a DDP step:    {share:9.0%}")
    if share < 0:  # the exchange cannot make a step faster: the machine's load moved
        print("  (negative: the load of this machine changed between the runs; rerun)")
    verdict = "faster" if real > one else "slower"
    print(f"  on this machine DDP is {verdict} than threads in one process ({real / one:.2f}x)")
