"""Saving a unipelt adapter from ``transformers.Trainer`` (:class:`UnipeltCallback`)."""
from __future__ import annotations

import os
from pathlib import Path

try:
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # pragma: no cover - transformers is a dependency, Trainer needs accelerate
    _CallbackBase = object


class UnipeltCallback(_CallbackBase):
    """Save a unipelt adapter from ``transformers.Trainer``.

    At each of Trainer's save steps the adapter goes to ``out_dir/checkpoint-N/adapter`` (next to
    Trainer's own checkpoint files when ``out_dir`` is the Trainer's ``output_dir``); at the end of
    training to ``out_dir/adapter``. ``out_dir`` defaults to ``args.output_dir``. Pass
    ``drop_reparameterization=True`` to drop training-only parameters (the prefix MLP) before the
    final save; checkpoints always keep them.

        handle = unipelt.compile(model, spec)
        trainer = Trainer(model=model, args=TrainingArguments(out, report_to=[]), train_dataset=rows,
                          data_collator=collate_fn, callbacks=[UnipeltCallback(handle, out)])
        trainer.train()
    """

    def __init__(self, handle, out_dir: str | os.PathLike | None = None, *, drop_reparameterization: bool = False):
        self.handle = handle
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.drop = drop_reparameterization
        self.saved: list[Path] = []
        # the plugins' training controllers (unipelt.types.TrainingController): AdaLoRA, pruning,
        # AdapterDrop run under Trainer as under ``unipelt train``. Their regularizers need the
        # loss: a Trainer subclass adds ``controller_loss(callback.controllers, loss)`` in compute_loss.
        from unipelt.training.optim import collect_controllers

        self.controllers = collect_controllers(handle)
        self.events: list[dict] = []

    def _root(self, args) -> Path:
        return self.out_dir if self.out_dir is not None else Path(args.output_dir)

    def on_step_begin(self, args, state, control, **kwargs):
        for c in self.controllers:
            if hasattr(c, "before_step"):
                c.before_step(state.global_step)
        opt, sched = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if opt is not None and sched is not None and hasattr(sched, "get_last_lr"):
            # Trainer has stepped its schedule: the controllers' factor (pruning's re-warm) on top
            from unipelt.training.optim import apply_lr_factors

            apply_lr_factors(self.controllers, getattr(opt, "optimizer", opt), sched, state.global_step)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Trainer calls this after optimizer.step() and before zero_grad (gradients readable);
        # global_step is incremented after it, so the step just taken is global_step + 1
        from unipelt.training.optim import controller_name

        for c in self.controllers:
            if hasattr(c, "on_step"):
                c.on_step(state.global_step + 1, None)
            if hasattr(c, "events"):
                self.events += [dict(e, controller=controller_name(c)) for e in c.events() or []]
        return control

    def on_save(self, args, state, control, **kwargs):
        if getattr(state, "is_world_process_zero", True):
            dest = self._root(args) / f"checkpoint-{state.global_step}" / "adapter"
            self.saved.append(self.handle.save(dest))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if getattr(state, "is_world_process_zero", True):
            if self.drop:
                was = self.handle.model.training
                self.handle.model.eval()
                self.handle.drop_reparameterization()
                self.handle.model.train(was)
            self.saved.append(self.handle.save(self._root(args) / "adapter"))
        return control
