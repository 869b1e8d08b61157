"""Data parallelism across processes (torchrun). Each rank computes gradients on its slice of the
global batch; gradients (and logged values) are summed over ranks before every optimiser step --
what DistributedDataParallel does, written out so that the autoencoder's adaptive weight can use
all-reduced gradient norms and so that results do not depend on the process count (every random
draw is keyed to the global sample index). CPU: gloo; GPU: nccl (not testable on this machine)."""

import os

import torch
import torch.distributed as dist

from ldmkit.errors import ConfigError


def init_from_env() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank(), size()


def shutdown() -> None:
    """Leave the process group: wait for every rank (a rank that exits while another still talks to
    it can abort), then destroy it before the interpreter's teardown, when gloo's worker threads would
    release tensors without the GIL (SIGABRT at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_slice(indices: range) -> range:
    """This rank's contiguous share of a global batch's sample indices."""
    n, r = size(), rank()
    per = len(indices) // n
    if per * n != len(indices):
        raise ConfigError(
            f"run.batch_size: {len(indices)} does not split evenly over {n} processes; allowed: a multiple of {n}"
        )
    return range(indices.start + r * per, indices.start + (r + 1) * per)


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum in place over ranks (one flat buffer: one message)."""
    if size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_grads_(params) -> None:
    all_reduce_([p.grad for p in params if p.grad is not None])


def sum_values(values: dict[str, float]) -> dict[str, float]:
    if size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def global_count(n: int) -> int:
    if size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """Whether the flag is set on any rank (every rank gets the same answer)."""
    return global_count(int(flag)) > 0
