"""Data-parallel training across processes started by ``torchrun``.

Each process holds a full copy of the model and works on its slice of every global
batch; after ``backward`` the gradients are averaged over processes with one
``all_reduce`` of a flat buffer, so every replica takes the same optimiser step. This
is the synchronisation ``DistributedDataParallel`` performs, done explicitly so that it
also serves models with several optimisers and double backward (the WGAN-GP gradient
penalty), which DDP's automatic hooks do not handle. The backend is NCCL on GPUs and
gloo on CPUs (so it is tested on a laptop).

Launch::

    torchrun --nproc_per_node 4 -m galgen train --config vae.yaml --data train.h5 --out runs/vae
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_distributed", "average_gradients"]


@dataclass
class DistributedContext:
    """Where this process stands in a data-parallel run.

    Parameters
    ----------
    rank : int
        Global rank (0 for a single process).
    world_size : int
        Number of processes.
    local_rank : int
        Rank on this node (selects the GPU).
    backend : str or None
        ``"nccl"``, ``"gloo"``, or None when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    def sync(self, params) -> None:
        """Average the gradients of ``params`` over all processes (no-op alone).

        Parameters
        ----------
        params : iterable of torch.nn.Parameter
        """
        if self.active:
            average_gradients(params, self.world_size)

    def barrier(self) -> None:
        """Wait for every process (no-op alone)."""
        if self.active:
            dist.barrier()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process.

        Parameters
        ----------
        module : torch.nn.Module
        """
        if self.active:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (a copy alone).

        Parameters
        ----------
        t : torch.Tensor

        Returns
        -------
        torch.Tensor
        """
        t = t.clone()
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        """Leave the process group."""
        if self.active and dist.is_initialized():
            dist.barrier()  # nobody leaves while another process still works
            dist.destroy_process_group()


def init_distributed(device: str = "cpu") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment.

    Parameters
    ----------
    device : str, optional
        ``"cuda"`` selects NCCL and the GPU ``LOCAL_RANK``; anything else gloo.

    Returns
    -------
    DistributedContext
        A single-process context when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def average_gradients(params, world_size: int) -> None:
    """Average gradients over processes with one all-reduce of a flat buffer.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        Parameters whose ``.grad`` to average; those without a gradient are skipped
        (the same ones on every process, since replicas run the same code).
    world_size : int
        Number of processes.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
