"""Multi-process data-parallel training under ``torchrun`` (DistributedDataParallel).

``torchrun --standalone --nproc_per_node=K -m anchorflow train {backbone,sidenet} ...`` starts K
processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`from_env` joins them into
one process group (gloo on CPU, nccl when CUDA is present) and returns a :class:`Dist`.

How a run stays equal to a single-process run with the same global batch and seed:

* every rank holds the same generator (same seed) and draws every random number for the WHOLE
  global batch (row indices, t, noise, offsets, label dropout), then keeps its own contiguous
  block of rows (:meth:`Dist.take`); so the random streams never diverge and rank r computes
  exactly rows ``[r b, (r + 1) b)`` of the single-process batch (b = global batch / K);
* each rank's loss is the mean over its b rows and DDP averages the gradients over the K ranks,
  which is the mean over the global batch; clipping, AdamW and EMA then see the same gradient
  on every rank, so the weights stay identical across ranks (up to float reduction order);
* rank 0 alone writes checkpoints (atomically, through ``anchorflow.base._io``) and shows progress;
  the others wait at a barrier. Resume: every rank reads the same saved state.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..base.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly 1-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: Optional[str] = None

    @property
    def main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.rank == 0

    def local_batch(self, batch: int) -> int:
        """Rows per rank for a global ``batch``; refuses a batch the ranks cannot share evenly."""
        if batch % self.world:
            raise ConfigError(f"--batch {batch} (the global batch) must be divisible by the number of "
                              f"processes ({self.world}); choose e.g. {batch - batch % self.world or self.world}")
        return batch // self.world

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of a tensor whose leading axis is the global batch."""
        if self.world == 1:
            return rows
        b = rows.shape[0] // self.world
        return rows[self.rank * b:(self.rank + 1) * b]

    def draw(self, fn: Any, gen: torch.Generator, rows: int, *rest: int, **kw: Any) -> torch.Tensor:
        """This rank's block of ``fn((world * rows, *rest), generator=gen)`` drawn on the CPU, on :attr:`device`.

        ``fn`` is ``torch.rand`` / ``torch.randn`` (or ``lambda shape, **kw: torch.randint(hi, shape, **kw)``);
        ``rows`` is the LOCAL row count. Every rank draws the global tensor, so the generators stay in step.
        """
        return self.take(fn((self.world * rows, *rest), generator=gen, **kw)).to(self.device)

    def mean(self, value: float) -> float:
        """The average of a float over the ranks (for logging the global batch's loss)."""
        if self.world == 1:
            return value
        buf = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(buf)
        return float(buf) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped in DistributedDataParallel (itself in a 1-process run)."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(module, device_ids=ids)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def from_env() -> Dist:
    """The run this process belongs to, from torchrun's environment; joins the process group.

    Without ``WORLD_SIZE`` (or with 1) it is a single-process run on the CPU (or ``cuda`` when
    torch sees a GPU and ``ANCHORFLOW_DEVICE`` is not ``cpu``). With several processes the
    group uses nccl on GPUs (one per local rank) and gloo otherwise.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _device(local)
    if world <= 1:
        return Dist(device=device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist = torch.distributed
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local, device=device, backend=backend)


def _device(local_rank: int) -> str:
    want = os.environ.get("ANCHORFLOW_DEVICE", "auto").strip().lower()
    if want not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"ANCHORFLOW_DEVICE must be auto, cpu or cuda, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("ANCHORFLOW_DEVICE=cuda but torch sees no CUDA GPU; unset it to train on the CPU")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    return f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if use_cuda else "cpu"


@contextlib.contextmanager
def session() -> Iterator[Dist]:
    """``from_env()`` for the duration of a command; leaves the process group it joined."""
    joined = torch.distributed.is_available() and not torch.distributed.is_initialized()
    d = from_env()
    try:
        yield d
    finally:
        if d.world > 1 and joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def unwrap(module: Any) -> Any:
    """The plain module inside a DDP wrapper (itself otherwise)."""
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module
