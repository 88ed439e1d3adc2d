"""Data-parallel training under ``torchrun`` / ``accelerate launch``: DDP or FSDP2.

A launcher starts one process per GPU (or per CPU worker with the gloo backend) and tells each
its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`setup` reads it and makes a :class:`DistContext`; the loop asks it for

- its share of each micro-batch (:meth:`DistContext.shard`): every process draws the same seeded
  epoch order (:func:`unipelt.training.inputs.epoch_order`) and the same micro-batches as a
  one-process run, then takes every ``world``-th row of each. The loss of a share is weighted by
  its share of the micro-batch's loss items (rows for classification, target tokens for causal LM),
  so the reduced gradient is the gradient of the one-process run's loss on the same global batch;
- the training module (:func:`wrap`): ``ddp`` wraps the model in ``DistributedDataParallel`` (only
  the adapter requires grad, so only the adapter's gradients are reduced); ``fsdp2`` shards the frozen
  base with ``torch.distributed.fsdp.fully_shard`` (one unit per transformer block, the rest in the
  root unit) and leaves every adapter parameter out of the shards (``ignored_params``): the adapter
  is small and stays whole on every process, its gradients all-reduced after the backward pass
  (:meth:`DistContext.reduce_gradients`). Saving therefore needs no gather, the handle, optimizer
  and executors keep their parameters (tracked by identity), and the adapter keeps its own dtype
  beside a bf16 base;
- who writes (:meth:`DistContext.on_main`): rank 0 alone writes checkpoints, the final adapter and
  the report (atomically, as in a one-process run); the other ranks wait for it and get its
  result, or its error, so a failed write stops every rank with the same message.

The checkpoint stores the global position (optimizer step, epoch, accumulation group), never a
per-rank one: ``--resume`` continues with any number of processes.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import nn

from unipelt.errors import ModelError
from unipelt.training.options import DISTRIBUTED_MODES, TrainingError

T = TypeVar("T")

LAUNCH_HINT = "launch it with torchrun --nproc-per-node N -m unipelt train ... or accelerate launch -m unipelt train ..."


@dataclass
class DistContext:
    """One process's place in a data-parallel run (``mode`` ``none``: a run of one process)."""

    mode: str = "none"                  # none | ddp | fsdp2
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False            # this run initialised the process group, so it ends it
    find_unused: bool = False           # DDP: some adapter parameter took no gradient in the probe
    notes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"mode": self.mode, "world_size": self.world, "rank": self.rank,
                "backend": _backend() if self.active else None, "find_unused_parameters": self.find_unused}

    # -- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on rank 0 while the others wait; every rank returns rank 0's result. An error
        on rank 0 is raised there and, as a TrainingError naming ``what``, on every other rank
        (they would otherwise wait for rank 0 forever)."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
                error = e
                box[0] = ("error", f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status == "error":
            raise TrainingError(f"rank 0 failed to {what}: {value}")
        return value

    def sum_float(self, value: float) -> float:
        """The sum of ``value`` over the ranks (the step loss: each rank holds its weighted share)."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """FSDP2: average the replicated adapter's gradients over the ranks (one all-reduce of one
        flat buffer; a parameter without a gradient on a rank counts as zeros there, so every rank
        sends the same layout). DDP reduced them during the backward pass already."""
        if self.mode != "fsdp2" or not params:
            return
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                          for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    # -- the data ------------------------------------------------------------------------------
    def shard(self, idx: Sequence[int]) -> list[int]:
        """This rank's rows of a micro-batch: every ``world``-th, starting at ``rank``."""
        return list(idx[self.rank::self.world]) if self.active else list(idx)

    def no_sync(self, module: nn.Module, last: bool):
        """DDP: skip the gradient all-reduce on every micro-batch of a step but the last."""
        if self.mode == "ddp" and not last and hasattr(module, "no_sync"):
            return module.no_sync()
        return nullcontext()

    def finish(self) -> None:
        """End the process group if this run started it (a caller's own group is left alone)."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise TrainingError(f"environment variable {name}={value!r}: not an integer (set by the launcher)") from None


def launched_world() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return _env_int("WORLD_SIZE") or 1


def choose_mode(requested: str, world: int) -> str:
    """``auto``: FSDP2 when accelerate was configured for FSDP (``ACCELERATE_USE_FSDP``), else DDP
    when there are several processes, else none. An explicit mode with one process trains alone."""
    if requested not in DISTRIBUTED_MODES:
        raise TrainingError(f"unknown distributed mode {requested!r}; expected one of: {', '.join(DISTRIBUTED_MODES)}")
    if requested == "none":
        if world > 1:
            raise TrainingError(f"--distributed none, but the launcher started {world} processes (WORLD_SIZE={world}): "
                                "each would train the whole run and write the same directory; use --distributed "
                                "auto, ddp or fsdp2, or start one process")
        return "none"
    if requested == "auto":
        if world <= 1:
            return "none"
        return "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes") else "ddp"
    return requested


def setup(requested: str, device: str | None) -> DistContext:
    """The process's :class:`DistContext`: reads the launcher's environment and, for a
    distributed mode, initialises the process group (NCCL on CUDA, gloo on CPU) unless the
    caller already has."""
    world = launched_world()
    mode = choose_mode(requested, world)
    if mode == "none":
        return DistContext()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or os.environ.get("MASTER_ADDR") is None:
        raise TrainingError(f"--distributed {mode}: no launcher environment (RANK, WORLD_SIZE, MASTER_ADDR); "
                            + LAUNCH_HINT)
    local_rank = rank if local_rank is None else local_rank
    import torch.distributed as dist

    dev = _process_device(device, local_rank, world)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        owns = True
    elif dist.get_world_size() != world:
        raise TrainingError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE is {world}")
    return DistContext(mode=mode, rank=dist.get_rank(), world=world, local_rank=local_rank, device=dev,
                       owns_group=owns)


def _process_device(device: str | None, local_rank: int, world: int) -> torch.device:
    """Each process trains on ``cuda:LOCAL_RANK`` (or the CPU with ``--device cpu``)."""
    if device in (None, "", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                                "device(s); start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device in (None, "", "cpu"):
        return torch.device("cpu")
    raise TrainingError(f"--device {device}: with {world} processes each takes cuda:LOCAL_RANK; leave --device out "
                        "(or say cuda), or use --device cpu")


# ------------------------------------------------------------------------------------------
# weighting a rank's share of a micro-batch
# ------------------------------------------------------------------------------------------
def loss_items(row, task: str) -> int:
    """How many terms a row adds to the model's mean loss: one class label, or the token targets
    that the shifted causal-LM loss reads (every label after the first that is not ignored)."""
    if task == "classification":
        return 1
    from unipelt.data import IGNORE_INDEX

    return sum(1 for t in row.labels[1:] if t != IGNORE_INDEX)


# ------------------------------------------------------------------------------------------
# the training module
# ------------------------------------------------------------------------------------------
def wrap(ctx: DistContext, net: nn.Module, handle, probe: Callable[[], torch.Tensor] | None = None) -> nn.Module:
    """The module the training forward calls: ``net`` itself, its DDP wrapper, or ``net`` with its
    frozen base sharded by FSDP2 (in place; the adapter left whole)."""
    if not ctx.active:
        return net
    adapter = {id(p) for p in handle.parameters()}
    stray = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in adapter]
    if stray:  # DDP would reduce them and FSDP2 shard them: neither is what the adapter's optimizer expects
        raise ModelError(f"--distributed {ctx.mode}: base parameters require grad but are not the adapter's "
                         f"({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}); freeze them first")
    if ctx.mode == "ddp":
        return _ddp(ctx, net, handle, probe)
    return _fsdp2(ctx, net, handle)


def _ddp(ctx: DistContext, net: nn.Module, handle, probe) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # DDP's default expects a gradient for every trainable parameter in every backward pass; one
    # that takes none (a module the graph never reaches) makes the next step fail. One probe
    # forward/backward finds them; only then is the graph walked every step (find_unused_parameters).
    unused = _unused_parameters(handle, probe) if probe is not None else []
    ctx.find_unused = bool(unused)
    if unused:
        ctx.notes.append(f"DDP: {len(unused)} adapter parameter(s) take no gradient ({', '.join(unused[:3])}"
                         f"{', ...' if len(unused) > 3 else ''}); using find_unused_parameters=True")
    dev = ctx.device
    # no buffer sync at each forward: every rank built the same buffers, and a running state a
    # gate keeps is the rank's own; parameters (and buffers) are broadcast from rank 0 once, when
    # DDP is built (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
    import inspect

    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers")
    return DDP(net, device_ids=[dev.index] if dev is not None and dev.type == "cuda" else None,
               find_unused_parameters=ctx.find_unused, **{sync: False})


def _unused_parameters(handle, probe: Callable[[], torch.Tensor]) -> list[str]:
    """The adapter parameters that one forward/backward of ``probe()`` gives no gradient (the
    gradients and the RNG state are restored afterwards)."""
    params = handle.named_parameters()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        probe().backward()
        return [k for k, p in params.items() if p.requires_grad and p.grad is None]
    finally:
        for p in params.values():
            p.grad = None
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _fsdp2(ctx: DistContext, net: nn.Module, handle) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    adapter = set(handle.parameters())
    adapter_ids = {id(p) for p in adapter}
    quantized = [(n, p.dtype) for n, p in net.named_parameters()
                 if id(p) not in adapter_ids and not p.dtype.is_floating_point]
    if quantized:
        n, dt = quantized[0]
        raise ModelError(f"--distributed fsdp2: the base holds quantized parameters ({n}: {dt}, and "
                         f"{len(quantized) - 1} more); sharding a 4-bit/8-bit base with FSDP2 is not supported: "
                         "use --distributed ddp (every GPU holds the whole quantized base)")
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    # one unit per transformer block (its frozen weights gathered just before it runs, freed
    # after), the embeddings, final norm and head in the root unit; the adapter in none of them
    for layer in handle.info.layers:
        fully_shard(layer, mesh=mesh, ignored_params=adapter)
    fully_shard(net, mesh=mesh, ignored_params=adapter)
    return net


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter FSDP2 sharded)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)
