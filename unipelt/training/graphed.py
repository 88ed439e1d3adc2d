"""One CUDA graph per train step: forward, backward, gradient clipping and the optimizer step
captured once and replayed (PyTorch's "whole network capture").

Why: on BERT-base-sized steps the host, not the GPU, sets the time. Under ``torch.compile(mode=
"reduce-overhead")`` the forward and the backward are CUDA graphs of their own, but per step the
host still evaluates dynamo's guards, launches both graphs, runs 144 AccumulateGrad nodes and a
foreach AdamW over 144 tensors: 7.5 ms of host time for a step with 4-5 ms of GPU work
(benchmarks/RESULTS.md, "Session 8 (helper prof)"). Captured whole, a step costs the host one
copy per input tensor and one ``cudaGraphLaunch``; the GPU then sets the time.

    opt = torch.optim.AdamW(param_groups(handle, 1e-4), lr=1e-4, capturable=True, fused=True)
    step = GraphedTrainStep(model, opt, example_batch)
    for batch in batches:              # every batch of the example's shapes and dtypes
        loss = step(batch)             # a device tensor; float(loss) waits for the step

Prefer ``fused=True`` with ``capturable=True``: capturable foreach AdamW divides every
parameter's second moment by 0-dim device tensors, off the foreach fast path, i.e. two
non-vectorized kernels per parameter per step (0.93 ms of a BERT-base LoRA r16 all-linear step,
1.1 ms of its time: benchmarks/RESULTS.md, "Session 10 (helper bert10)").

How: the first ``warmup`` calls are ordinary eager (or compiled) steps on a side stream -- real
training steps on their batches, which also create the optimizer state and run any lazy
initialisation outside the capture. The next call captures the step on its batch, copied into
static input buffers, and replays it; every later call copies its batch into those buffers and
replays. Gradients are set to None before the capture, so the captured backward writes them
fresh each replay (no ``zero_grad`` inside the graph).

What cannot be captured is refused with one :class:`GraphCaptureError` naming the reason:

- a model or batch off CUDA;
- a model already compiled (an ``OptimizedModule``): pass the module and ``compile="default"``;
  ``reduce-overhead`` records CUDA graphs of its own, which cannot nest in a captured step;
- an optimizer whose step cannot be captured: ``capturable=False`` in a parameter group (build
  ``torch.optim.AdamW(..., capturable=True)``; ``fused=True`` may be combined with it), or one
  without that option (bitsandbytes' 8-bit AdamW);
- a batch of other keys, shapes, dtypes or devices than the example: the graph's buffers have
  the example's shapes (pad to one shape; a graph per shape is not made here);
- an optimizer hyperparameter changed after the capture (a float ``lr`` is a constant of the
  graph: a scheduler needs a tensor ``lr``, e.g. ``lr=torch.tensor(1e-3, device="cuda")``, which
  it updates in place);
- an adapted model whose adapters change what runs between steps: a training controller (gate
  pruning, AdapterDrop with random layers, AdaLoRA's budget, a fusion regularizer) or an attach /
  switch / merge / detach after the capture (the model state's version moved);
- a host synchronisation inside the step (``.item()``, a copy from pageable host memory,
  ``nonzero``): CUDA refuses it during the capture, and that error is re-raised as a
  GraphCaptureError with CUDA's message. transformers' eager attention is one (it makes its mask
  with ``torch.tensor(0.0, device=...)``, a host copy; seen on the H200): use
  ``attn_implementation="sdpa"``, or ``compile="default"``, under which that line is traced.

What replays correctly: dropout (PyTorch's, inductor's and the Triton kernels' ``new_seed``) draws
from the CUDA generator, whose Philox offset a captured graph advances on every replay, so each
replay draws new masks; a mixed batch's row selection (``adapter_names=`` in ``call_kwargs``: the
same names every step), whose index tensors are made on the device inside the capture
(:func:`unipelt.runtime.host_to_device`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from unipelt.training.options import TrainingError

COMPILE_CHOICES = (None, "default", "max-autotune-no-cudagraphs")


class GraphCaptureError(TrainingError):
    """A train step that cannot be captured as one CUDA graph, or a call that does not fit the
    captured one; the message names the reason."""


@dataclass(frozen=True)
class TensorSlot:
    """One input tensor of the captured step: its key, shape, dtype and device."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def describe(self) -> str:
        return f"shape {tuple(self.shape)}, {str(self.dtype).replace('torch.', '')} on {self.device}"


class BatchSignature:
    """The keys, shapes, dtypes and devices of the batch a graph was captured for; ``check``
    refuses any other (a replay reads the captured buffers, whatever it is given)."""

    def __init__(self, batch: Mapping[str, Tensor]):
        if not isinstance(batch, Mapping) or not batch:
            raise GraphCaptureError("the example batch must be a non-empty dict of tensors (the model's keyword "
                                    "arguments)")
        slots = []
        for key, value in batch.items():
            if not isinstance(value, Tensor):
                raise GraphCaptureError(f"batch[{key!r}]: a {type(value).__name__}, not a tensor; put Python values "
                                        "that stay the same every step in call_kwargs")
            slots.append(TensorSlot(key, tuple(value.shape), value.dtype, value.device))
        self.slots = tuple(slots)

    def check(self, batch: Mapping[str, Tensor]) -> None:
        keys = [s.key for s in self.slots]
        if not isinstance(batch, Mapping) or set(batch) != set(keys):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise GraphCaptureError(f"batch keys {got} differ from the captured batch's {sorted(keys)}")
        for s in self.slots:
            v = batch[s.key]
            if not isinstance(v, Tensor):
                raise GraphCaptureError(f"batch[{s.key!r}]: a {type(v).__name__}, not a tensor")
            if tuple(v.shape) != s.shape or v.dtype != s.dtype or v.device != s.device:
                raise GraphCaptureError(
                    f"batch[{s.key!r}]: {TensorSlot(s.key, tuple(v.shape), v.dtype, v.device).describe()}, but the "
                    f"step was captured for {s.describe()}; a captured graph has fixed shapes (pad every batch to "
                    "one shape, or build a GraphedTrainStep per shape)")

    def devices(self) -> set[torch.device]:
        return {s.device for s in self.slots}


def check_optimizer(optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse an optimizer whose ``step()`` cannot be captured in a CUDA graph."""
    if optimizer is None:
        return
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        if "capturable" not in group:
            raise GraphCaptureError(f"optimizer {name}: it has no capturable option, so its step cannot be captured "
                                    "in a CUDA graph; use torch.optim.AdamW(..., capturable=True)")
        if not group["capturable"]:
            raise GraphCaptureError(f"optimizer {name}: param_groups[{i}] has capturable=False (its step counts on "
                                    "the host and cannot be captured); build it with capturable=True, e.g. "
                                    "torch.optim.AdamW(params, lr=..., capturable=True)")
        if group.get("differentiable"):
            raise GraphCaptureError(f"optimizer {name}: param_groups[{i}] has differentiable=True; not capturable here")


def _hyperparameters(optimizer: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """Each group's settings besides its parameters: floats by value, tensors by identity."""
    if optimizer is None:
        return []
    return [{k: (("tensor", id(v)) if isinstance(v, Tensor) else v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def adapted_states(model: nn.Module) -> list:
    """The unipelt model states (:class:`unipelt.state.ModelState`) inside ``model``."""
    from unipelt.state import get_state

    out, seen = [], set()
    for m in model.modules():
        st = get_state(m)
        if st is not None and id(st) not in seen:
            seen.add(id(st))
            out.append(st)
    return out


def check_adapters(model: nn.Module) -> None:
    """Refuse an adapted model whose training controllers change what runs between steps: a
    captured graph replays what ran at the capture, and a controller's per-step Python work
    (gate statistics read on the host, layers dropped at random, ranks pruned) would not run."""
    from unipelt.training.optim import collect_controllers, controller_name

    for st in adapted_states(model):
        for name, handle in st.handles.items():
            # a static controller (a fixed AdapterDrop) only reports: nothing of it changes between steps
            ctrls = [c for c in collect_controllers(handle) if not getattr(c, "static", False)]
            if ctrls:
                names = ", ".join(controller_name(c) for c in ctrls)
                raise GraphCaptureError(f"adapter {name!r}: its training controller(s) {names} change what runs "
                                        "between steps (pruning, AdapterDrop's random layers, AdaLoRA's budget, "
                                        "regularizers read on the host), which a captured graph would not follow; "
                                        "train it without one CUDA graph per step")


def _default_loss(output: Any, batch: Mapping[str, Tensor]) -> Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise GraphCaptureError("the model returned no loss (give the batch its labels, or pass loss_fn)")
    return loss


class GraphedTrainStep:
    """A train step captured as one CUDA graph; call it with each batch. See the module docstring.

    model: the module to train (eager; ``compile="default"`` compiles it here with
    ``torch.compile(model, fullgraph=...)``). optimizer: over the trainable parameters,
    ``capturable=True`` (None: forward and backward only, as benchmarks/speed.py's frozen floor).
    example_batch: a batch of the shapes every step will have (keyword arguments of the model).
    loss_fn: ``(output, batch) -> loss`` (default: ``output.loss``). call_kwargs: Python keyword
    arguments passed unchanged every step (``adapter_names=``). max_grad_norm: gradient clipping
    inside the graph (foreach, no host sync) over the optimizer's parameters. autocast: a dtype
    for ``torch.autocast`` around forward and loss (its weight cache off, as CUDA graphs need).
    warmup: eager steps before the capture (at least 1: the optimizer state must exist).
    grad_params: parameters whose gradients no optimizer clears (default: every trainable
    parameter outside the optimizer), set to None before each step so none accumulates.

    What the capture fixes stays fixed for every replay: the batch's shapes, ``call_kwargs``, the
    model's train/eval flags (dropout on or off), the optimizer's float hyperparameters.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 example_batch: Mapping[str, Tensor], *, loss_fn: Callable[[Any, Mapping[str, Tensor]], Tensor] | None = None,
                 call_kwargs: Mapping[str, Any] | None = None, compile: str | None = None,
                 fullgraph: bool = True, max_grad_norm: float | None = None, autocast: torch.dtype | None = None,
                 warmup: int = 3, grad_params: Iterable[nn.Parameter] | None = None):
        from torch._dynamo.eval_frame import OptimizedModule

        if isinstance(model, OptimizedModule):
            raise GraphCaptureError("the model is already torch.compile'd; pass the module itself and compile="
                                    "'default' (reduce-overhead records CUDA graphs of its own, which cannot nest "
                                    "inside a captured step)")
        if compile not in COMPILE_CHOICES:
            raise GraphCaptureError(f"compile={compile!r}: expected one of {', '.join(map(repr, COMPILE_CHOICES))} "
                                    "(reduce-overhead and max-autotune record CUDA graphs of their own)")
        if not isinstance(warmup, int) or warmup < 1:
            raise GraphCaptureError(f"warmup={warmup!r}: at least 1 eager step must run before the capture (it "
                                    "creates the optimizer state)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise GraphCaptureError(f"max_grad_norm={max_grad_norm!r}: expected a positive number or None")
        check_optimizer(optimizer)
        self.signature = BatchSignature(example_batch)
        call_kwargs = dict(call_kwargs or {})
        tensors = [k for k, v in call_kwargs.items() if isinstance(v, Tensor)]
        if tensors:
            raise GraphCaptureError(f"call_kwargs {tensors}: tensors belong in the batch (copied every step); "
                                    "call_kwargs are Python values fixed at the capture")
        check_adapters(model)
        devices = self.signature.devices() | {p.device for p in model.parameters()}
        if optimizer is not None:
            devices |= {p.device for g in optimizer.param_groups for p in g["params"]}
        off = sorted(str(d) for d in devices if d.type != "cuda")
        if off:
            raise GraphCaptureError(f"one CUDA graph per step needs CUDA: the model, optimizer or batch is on "
                                    f"{', '.join(off)}")
        if len(devices) > 1:
            raise GraphCaptureError(f"one CUDA graph per step needs one device; found {', '.join(sorted(map(str, devices)))}")
        self.device = next(iter(devices))
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or _default_loss
        self.call_kwargs = call_kwargs
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast
        self.warmup = warmup
        self.compile = compile
        self._fn = torch.compile(model, fullgraph=fullgraph) if compile == "default" else \
            torch.compile(model, fullgraph=fullgraph, mode=compile) if compile else model
        opt_params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        # parameters whose gradients the step makes but no optimizer clears (the floor's probe):
        # set to None before each eager step and before the capture, like the optimizer's
        owned = {id(p) for p in opt_params}
        self._loose = list(grad_params) if grad_params is not None else \
            [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        self._clip = opt_params
        self._states = adapted_states(model)
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, Tensor] | None = None  # the static buffers (after the capture)
        self._loss: Tensor | None = None
        self._versions: list[int] | None = None
        self._hyper: list[dict[str, Any]] | None = None
        self.capture_s: float | None = None
        self._side: torch.cuda.Stream | None = None

    # -- the step's body: the same code warms up, then is captured ----------------------------
    def _body(self, batch: Mapping[str, Tensor]) -> Tensor:
        from unipelt.executor import graphing

        ac = (torch.autocast(device_type="cuda", dtype=self.autocast, cache_enabled=False)
              if self.autocast is not None else contextlib.nullcontext())
        # graphing(): executor auto runs the kernels where it would under torch.compile (a replayed
        # launch costs the host nothing), in the warm-up too, so they load before the capture
        with ac, graphing():
            out = self._fn(**batch, **self.call_kwargs)
            loss = self.loss_fn(out, batch)
        loss.backward()
        if self.max_grad_norm is not None and self._clip:
            # foreach: the total norm and the scale stay on the device (no sync, capturable)
            torch.nn.utils.clip_grad_norm_(self._clip, self.max_grad_norm, foreach=True)
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach()

    def _clear_grads(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self._loose:
            p.grad = None

    def _eager_step(self, batch: Mapping[str, Tensor]) -> Tensor:
        # on a side stream, as PyTorch's whole-network capture recipe warms up: lazy initialisation
        # (cuBLAS workspaces, the optimizer state, autotuning) happens outside the capture
        main = torch.cuda.current_stream(self.device)
        if self._side is None:  # one stream for every warm-up step: its memory blocks are reused
            self._side = torch.cuda.Stream(self.device)
        side = self._side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            loss = self._body(batch)
            self._clear_grads()
        main.wait_stream(side)
        return loss

    def _capture(self, batch: Mapping[str, Tensor]) -> None:
        t0 = time.perf_counter()
        self.inputs = {k: v.detach().clone() for k, v in batch.items()}
        self._clear_grads()  # the captured backward then writes the gradients, not adds to them
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph):
                self._loss = self._body(self.inputs)
        except BaseException as e:
            _recover_from_failed_capture(self.device, stream)
            if isinstance(e, GraphCaptureError) or not isinstance(e, RuntimeError):
                raise
            msg = " ".join(str(e).split())[:400]
            raise GraphCaptureError(f"the train step cannot be captured as one CUDA graph: {msg} (a host "
                                    "synchronisation inside the step -- .item(), nonzero, a copy of a Python value "
                                    "to the GPU such as transformers' eager attention mask: use "
                                    "attn_implementation='sdpa' or compile='default' -- or an op CUDA graphs do not "
                                    "support)") from e
        self.graph = graph
        self._versions = [st.ctx.version for st in self._states]
        self._hyper = _hyperparameters(self.optimizer)
        self.capture_s = time.perf_counter() - t0

    def _check_unchanged(self) -> None:
        if self._versions is not None:
            now = [st.ctx.version for st in self._states]
            if now != self._versions:
                raise GraphCaptureError("the model's adapters changed after the capture (attach, switch, merge, "
                                        "detach or pruning): the graph replays the old ones; build a new "
                                        "GraphedTrainStep")
        if self._hyper is not None:
            why = hyperparameter_change(self._hyper, _hyperparameters(self.optimizer))
            if why:
                raise GraphCaptureError(why)

    def __call__(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.step(batch)

    def step(self, batch: Mapping[str, Tensor]) -> Tensor:
        """One train step on ``batch``; returns its loss (a device tensor of its own)."""
        self.signature.check(batch)
        self._check_unchanged()
        self.steps += 1
        if self.graph is None and self.steps <= self.warmup:
            return self._eager_step(batch)
        if self.graph is None:
            self._capture(batch)  # replayed just below: the capture itself computes nothing
        else:
            for k, v in batch.items():
                if v is not self.inputs[k]:  # a caller may write into step.inputs directly
                    self.inputs[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self._loss.clone()


def _recover_from_failed_capture(device: torch.device, stream: torch.cuda.Stream) -> None:
    """Leave the process as it was before a capture that failed, so that the caller can go on
    without a graph (or try another): PyTorch's ``CUDAGraph.capture_end`` raises at CUDA's end of
    the capture, before it takes the device's random generator out of capture mode and before
    ``torch.cuda.graph`` restores the stream it switched to. Left so, every later random op on the
    device -- a dropout, ``torch.randn``, inductor padding a matmul while it compiles -- fails with
    "Offset increment outside graph capture encountered unexpectedly" (seen on the H200, session
    14: three GPU tests after a refused capture), and the caller's work runs on the capture's side
    stream. The stream is set back to the caller's; a generator left in capture mode (a draw
    fails) gets a state cloned from its own, which keeps the seed and Philox offset but not the
    capture flag. Only then: graphs captured earlier in the process hold the state they captured
    with and advance it on replay, so a generator that still works keeps it."""
    if torch.cuda.current_stream(device) != stream:
        torch.cuda.set_stream(stream)
    try:
        torch.empty(1, device=device).uniform_()
    except RuntimeError:
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        gen.graphsafe_set_state(gen.clone_state())
        torch.empty(1, device=device).uniform_()  # works now, or says why


def hyperparameter_change(was: list[dict[str, Any]], now: list[dict[str, Any]]) -> str | None:
    """Why the optimizer's settings ``now`` (:func:`_hyperparameters`) no longer match those
    captured (``was``), or None: a float is a constant of the captured kernels, so a change the
    graph would not see must stop the run rather than be ignored."""
    if len(was) != len(now):
        return f"the optimizer has {len(now)} parameter groups, {len(was)} when the step was captured"
    for i, (a, b) in enumerate(zip(was, now)):
        for k in a.keys() | b.keys():
            if a.get(k) != b.get(k):
                return (f"optimizer param_groups[{i}][{k!r}] changed after the capture ({_show(a.get(k))} -> "
                        f"{_show(b.get(k))}); a float is a constant of the captured graph: give the optimizer a "
                        f"tensor {k} (e.g. lr=torch.tensor(1e-3, device='cuda')), which a scheduler updates in place")
    return None


def _show(v: Any) -> str:
    return "a tensor" if isinstance(v, tuple) and v[:1] == ("tensor",) else repr(v)
