"""Running under ``torchrun``: the process group, which batches are this process's, exact gathering.

Started by ``torchrun --nproc_per_node N beta-diag ...`` (WORLD_SIZE > 1), every command joins
one process group: gloo on CPU, NCCL on CUDA (one GPU per process, by LOCAL_RANK).

- Evaluation and attribution hand out whole batches round-robin (batch b to process b mod N), so
  each batch is computed exactly as in one process; per-example rows are gathered in order, and
  sums are added in the single-process order. Rankings are therefore identical, bit for bit, to a
  single process running with as many threads as each of these (torchrun's default is one; CPU
  kernels round differently with other thread counts).
- Training splits each global batch into N contiguous slices under DistributedDataParallel; the
  loss is scaled so that the averaged gradient is the gradient of the global batch's mean loss.
  Buffers (BatchNorm statistics) are copied from process 0 after every epoch, so that every
  process evaluates, and process 0 saves, one and the same model.
- Only process 0 writes files and prints results; the others print only their own errors, marked
  with their process number. torchrun exits 1 when any process fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _group() -> Any | None:
    """torch.distributed when this process has joined a group, else None. Torch is not imported for
    this: a process whose torch is not loaded yet (the command line answering --help) has joined none."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_number: int) -> bool:
        return batch_number % self.size == self.rank

    def gather_rows(self, parts: Iterable[tuple[int, torch.Tensor]], rows: int) -> torch.Tensor | None:
        """(first row, block) pieces from every process -> the (rows, ...) tensor, in row order, on CPU."""
        mine = [(start, block.cpu()) for start, block in parts]
        if self.size > 1:
            everyone: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(self.size)]
            _joined().all_gather_object(everyone, mine)
            mine = [piece for pieces in everyone for piece in pieces]
        if not mine:
            return None
        first = mine[0][1]
        out = first.new_zeros((rows, *first.shape[1:]))
        for start, block in mine:
            out[start : start + block.shape[0]] = block
        return out

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Copy process 0's buffers (BatchNorm running statistics) to every process."""
        if self.size > 1:
            for buffer in model.buffers():
                _joined().broadcast(buffer, 0)

    def total(self, values: list[float], device: torch.device) -> list[float]:
        """Sums over processes (float64)."""
        if self.size == 1:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=device)
        _joined().all_reduce(t)
        return t.tolist()

    def round(self, result: object) -> list[object]:
        """One result per process (None for none) -> all of them in process order, on every process."""
        if self.size == 1:
            return [] if result is None else [result]
        everyone: list[object] = [None] * self.size
        _joined().all_gather_object(everyone, result)
        return [r for r in everyone if r is not None]


def _joined() -> Any:
    """torch.distributed, for a World of more than one process (which has joined a group)."""
    import torch.distributed as dist

    return dist


def current() -> World:
    dist = _group()
    if dist is not None:
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main() -> bool:
    """Process 0, or a process started alone; before joining the group, torchrun's RANK decides."""
    dist = _group()
    if dist is not None:
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def label() -> str:
    """How messages of this process start: nothing on process 0, ``[process N] `` on the others."""
    return "" if is_main() else f"[process {os.environ.get('RANK', '?')}] "


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA); return this process's device."""
    import torch
    import torch.distributed as dist

    if not launched() or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave(clean: bool = True) -> None:
    """Leave the process group. After a clean run every process first waits for the others, so that
    none tears down its connections while a peer still uses them (gloo then aborts the peer with
    'terminate called without an active exception', seen once in CI). After an error there is no
    wait: torchrun stops the other processes."""
    dist = _group()
    if dist is not None:
        if clean:
            dist.barrier()
        dist.destroy_process_group()
