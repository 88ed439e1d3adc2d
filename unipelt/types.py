"""What the engine reads off the objects plugins give it: one dependency-free module of protocols.

A method plugin builds modules; the compiler, the runtime, the handle, the trainer and the
exporters read the attributes declared here and nothing else (STYLE.md, 16). Everything marked
optional has a documented default, which is what the engine assumes when it is absent.
"""
from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

# The kinds of hook point (arch.SiteTarget.kind), and what a branch reads at each.
SiteKind = Literal["linear", "output", "io", "renorm", "kv", "embed", "params"]
SITE_KINDS: tuple[str, ...] = ("linear", "output", "io", "renorm", "kv", "embed", "params")
BranchReads = Literal["input", "output", "scale", "kv", "embed", "params"]
BRANCH_READS: tuple[str, ...] = ("input", "output", "scale", "kv", "embed", "params")


@runtime_checkable
class Branch(Protocol):
    """A trainable branch at one hook point of one layer.

    Required:
      reads: what the branch computes from (``BRANCH_READS``): the hook point's ``input`` (LoRA,
        a parallel adapter) or ``output`` (a serial adapter, IA3's output scaling); ``scale``: at a
        ``linear`` hook point, the branch rescales the projection's input before the base layer
        runs (IA3 on ``ffn.down``): ``forward(x)`` returns the rescaled input, not a delta, and the
        site's other branches still read the original input; ``kv``/``embed``/``params`` branches
        are served by their kind's mechanism instead of running at a host (the hook
        ``unipelt_attach_branch``; the core's implementations are in :mod:`unipelt.sites`).
      forward(x, gate=None): the delta to add, shaped like the hook point's output; ``gate`` is None
        or a tensor broadcastable to (batch, tokens, 1). The reference executor calls this.

    Optional (default when absent):
      mergeable (False) and delta_weight(): an (out, in) matrix added to the base weight by merge();
        delta_bias() (None): a vector added to the base bias as well (IA3 scales the bias).
      reads_base (False): an ``input`` branch whose delta also depends on the hook point's base
        output y (DoRA rescales it): called as ``forward(x, gate, base=y)`` and
        ``expand(u, gate, base=y)``, y the base projection's output (its slice, on a fused one).
      num_params(kept) (all parameters): parameters kept after training (``kept=True``) or used in it.
      materialize() (nothing to drop): drop a training-time reparameterisation; returns the spec
        fields that describe the branch afterwards (``{field: value}``, None removes a field).
      configure_gate(gate_spec) (ignored): told the gate options of the gate that scales it.
      param_roles() ({}): ``{parameter attribute: role}`` (``lora_A``, ``lora_B``) for trainer rules.
      lr_ratio (None): LoRA+ ratio of the ``lora_B`` role's learning rate.
      persistent_buffers (True): whether buffers are saved with the adapter.
      kv_prefix(ctx, entry, batch, site_key, dtype): required of ``kv`` branches, the prefix of one
        attention call (a :class:`unipelt.attention.KVPrefix`).
      prompt(), length, after: required of ``embed`` branches: the (length, d) virtual tokens, of
        which the last ``after`` go after the input.
      external_parameters(): required of ``params`` branches: ``(name, parameter)`` pairs of the
        base tensors trained in place.
      shrink_params()/expand(u, gate): the group protocol, :class:`Shrinkable`.
    """

    reads: str

    def forward(self, x: Any, gate: Any = None) -> Any: ...


@runtime_checkable
class Shrinkable(Protocol):
    """A branch whose delta starts with a bias-free matrix product of its input (LoRA's A, an
    adapter's down-projection): a group executor computes that product for all members at once.

    shrink_params(): ``(W, None)`` with W of shape (k, d_in), or None when the branch cannot join
      a group now (input dropout: it reads a dropped-out copy of x of its own).
    expand(u, gate): the delta from u = x·Wᵀ (shape (..., k)); equal to ``forward(x, gate)``.
    """

    def shrink_params(self) -> tuple[Any, Any] | None: ...

    def expand(self, u: Any, gate: Any = None) -> Any: ...


@runtime_checkable
class GateModule(Protocol):
    """A gate: ``forward(x, ctx)`` returns values in (0, 1), shaped (B, T, k) or (B, 1, k).

    spec: the validated ``GateSpec`` (input, pooling, lora_scale, kv, ...).
    Optional group protocol (:class:`GroupGate`): logit_params() and activate(logits, ctx).
    """

    spec: Any

    def forward(self, x: Any, ctx: Any) -> Any: ...


@runtime_checkable
class GroupGate(Protocol):
    """A gate whose logits are a matrix product of its input: ``logit_params() -> (W, b)`` with W
    (k, d); ``activate(x·Wᵀ, ctx)`` adds b, applies the nonlinearity and pools, equal to ``forward``.
    Optional ``joint_pooling`` (a pooling name): the gate is exactly sigmoid(x·Wᵀ + b) pooled that
    way, so a group activates and pools all such gates of one pooling together."""

    def logit_params(self) -> tuple[Any, Any]: ...

    def activate(self, logits: Any, ctx: Any) -> Any: ...


@runtime_checkable
class TrainingController(Protocol):
    """A training-time controller a plugin contributes (``unipelt_training_controllers``): AdaLoRA's
    rank budget, gate pruning, AdapterDrop. ``unipelt train`` and :class:`unipelt.training.callback.
    UnipeltCallback` (``transformers.Trainer``) drive the same members, in this order per
    optimizer step; every member is optional.

      name (the class name): the key of its report and checkpoint state.
      param_groups(handle, lr): extra optimizer groups (their parameters leave the default groups).
      before_step(step): before the step's first forward (``step`` = optimizer steps done so far).
      regularizer() -> Tensor: added to every micro-batch's loss (``unipelt train``; under Trainer
        add :func:`unipelt.training.controller_loss` in ``compute_loss``).
      lr_factor(step, scheduled) -> float: before the step's forward, a multiplier on every group's
        scheduled rate (``scheduled``: the schedule's factor now); gate pruning's re-warm.
      on_step(step, loss): after ``optimizer.step()`` and before ``zero_grad``, so gradients are
        still readable (AdaLoRA's sensitivity); ``step`` counts the step just taken (1-based).
      events() -> list[dict]: what happened since the last call (``{"step", "event", ...}``), for the
        progress output and ``report.json``'s ``controllers.<name>.events``.
      report() -> dict: the controller's final summary in ``report.json`` (``controllers.<name>``).
      state_dict() / load_state_dict(d): JSON-able state kept in checkpoints, for ``--resume``.
      static: True when it changes nothing between steps and only reports (a fixed AdapterDrop), so
        :class:`unipelt.training.graphed.GraphedTrainStep` may capture its model.
    """

    name: str
