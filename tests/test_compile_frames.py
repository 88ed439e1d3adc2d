"""Compiling a unipelt model itself (``torch.compile(model)``) captures one frame per call, the
model's forward: its root hooks run as frames of their own around the graph, and those are
skipped (run eagerly), not compiled, so no call pays their cache lookups and guards (session 8's
H200 profile of a BERT LoRA step under CUDA graphs: 2 compiled regions per step, PEFT 1)."""
from __future__ import annotations

import torch

import unipelt
from unipelt.state import RootPostHook, RootPreHook, get_state
from conftest import FACTORIES, make_batch, randomize
from test_conformance import CASES

# gated UniPELT on BERT: its gates read the layer inputs, which the forward keeps in the context
CASE = next(c for c in CASES if c.name == "unipelt_al-bert")


def _cache_entries(fn) -> list:
    return torch._C._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)


def test_root_hooks_are_not_compiled_frames():
    torch._dynamo.reset()
    model = FACTORIES["bert"]()
    handle = unipelt.compile(model, CASE.spec)
    randomize(handle, seed=3, std=0.2)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batch = make_batch(batch=2, length=7, lengths=(7, 4))
    want = model(**batch).logits
    for _ in range(2):
        got = compiled(**batch).logits
        got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert _cache_entries(RootPreHook.__call__) == []
    assert _cache_entries(RootPostHook.__call__) == [], "the root post-hook was compiled as a frame"
    # it still runs: the call's tensors are gone from the context after the call (the forward
    # filled them: a post-hook that did not run would leave the layer inputs there)
    ctx = get_state(model).ctx
    seen = []
    hook = model.register_forward_hook(lambda m, a, o: seen.append(len(ctx.layer_inputs)), prepend=True)
    compiled(**batch)
    hook.remove()
    assert seen and seen[0] > 0
    assert ctx.layer_inputs == {} and ctx.stash == {} and ctx.group_out == {}
