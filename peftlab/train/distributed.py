"""Data-parallel adapter training under ``torchrun``.

Every rank holds the whole (frozen) base model and the same adapters. Each optimizer step's global
batch is the one a single process would draw; its micro-batches are dealt out round-robin, so every
rank reads a disjoint shard. After the rank's backward passes, the adapter gradients are summed over
ranks in one flat all-reduce; since each rank divides its loss by the *global* supervised-token count,
that sum is exactly the single-process gradient. Clipping, method hooks and AdamW then run on equal
gradients, so the replicas stay equal without further communication.

The reduction is manual rather than DistributedDataParallel: ``SupervisedLoss`` calls the model's body
and head directly, so a DDP wrapper's forward would never run and its reducer would not engage, and
one reduction per step (after gradient accumulation) is what DDP's ``no_sync`` dance would amount to.
"""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from peftlab.core.errors import PeftlabError
from peftlab.core.files import pin_weight_samples
from peftlab.core.hf import backbone_path, repeated_blocks


def environment_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batch_split(batch_size: int, micro_batch_size: int, world_size: int) -> None:
    if batch_size % (world_size * micro_batch_size):
        raise PeftlabError(f"batch_size {batch_size} must be a multiple of world_size x micro_batch_size = "
                           f"{world_size} x {micro_batch_size}, so every rank gets the same number of "
                           f"micro-batches per step")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; with ``world_size == 1`` every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank's model lives: its own GPU under NCCL, else the CPU."""
        return self.comm_device

    def owns(self, micro_index: int) -> bool:
        """Whether the step's ``micro_index``-th micro-batch is this rank's."""
        return micro_index % self.world_size == self.rank

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (in float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def all(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] == self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Copy rank 0's values into every rank, so replicas start equal whatever an initialiser drew."""
        if not self.enabled:
            return
        with torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=0)

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks, in one flat fp32 buffer.

        A rank whose shard never reached a parameter (a task-specific adapter, say) has no gradient for
        it; it contributes zeros. A parameter no rank reached keeps ``grad = None``, as it would in one
        process, so AdamW skips it instead of decaying it on a zero gradient.
        """
        if not self.enabled or not params:
            return
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        flat = torch.cat([torch.cat(pieces).to(self.comm_device), reached.to(self.comm_device)])
        dist.all_reduce(flat)
        offset = 0
        for param, count in zip(params, flat[-len(params):].tolist()):
            size = param.numel()
            if count > 0:
                param.grad = flat[offset:offset + size].view_as(param).to(param.device, param.dtype).clone()
            offset += size

    def seed(self, seed: int) -> None:
        """Give this rank its own random streams (dropout masks must differ between shards)."""
        if self.enabled:
            derived = seed * 1_000_003 + self.rank
            random.seed(derived)
            torch.manual_seed(derived)


def shard_frozen_base(model: torch.nn.Module, job: Distributed) -> None:
    """Split the frozen weights of every transformer block across the ranks (FSDP2 ``fully_shard``).

    Each block's frozen parameters become 1/world_size shards on the rank's device, gathered for that block's
    forward and again for its backward, then freed. The trainable (adapter) parameters are left out of the
    shards (``ignored_params``): they stay whole on every rank, so the gradient reduction, clipping, method
    hooks, the optimizer and checkpoints work as in plain data parallelism. Weights outside the blocks
    (embeddings, final norm, output head: tied ones among them) stay whole too; the body is made the FSDP
    root so that one forward drives the blocks' gathers. Everything not sharded moves to the rank's device.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    path = backbone_path(model)
    body = model.get_submodule(path) if path else model
    blocks = repeated_blocks(body)
    if not blocks:
        raise PeftlabError(f"shard: {type(model).__name__} has no list of repeated transformer blocks to shard")
    pin_weight_samples(model)  # rank 0 saves adapters alone, and their files record a sample of the base
    mesh = init_device_mesh(job.device.type, (job.world_size,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    in_blocks: set[torch.nn.Parameter] = set()
    for block in blocks:
        own = set(block.parameters())
        fully_shard(block, mesh=mesh, ignored_params=own & trainable)
        in_blocks |= own
    fully_shard(body, mesh=mesh, ignored_params=(set(body.parameters()) - in_blocks) | trainable)
    _move_unsharded(model, job.device)


def _move_unsharded(model: torch.nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that FSDP left whole to ``device``, keeping each Parameter object."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for param in model.parameters():
            if not isinstance(param, DTensor) and param.device != device:
                param.data = param.data.to(device)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device != device:
                    setattr(module, name, buffer.to(device))


def from_environment() -> Distributed:
    """Join the job torchrun describes in the environment (init the process group once per process)."""
    world_size = environment_world_size()
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave)
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", local_rank) if nccl else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
