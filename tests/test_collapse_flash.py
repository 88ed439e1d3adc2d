"""The opt-in flash path for causal layers with a plain prefix (unipelt.attention.PREFIX_CAUSAL =
"flash"), on CPU: the branch's plumbing (which keys it gets, the layout it returns) against the
default masked path, with the kernel replaced by an independent lower-right causal reference
written from the definition (query i of T sees key j of L + T iff j <= i + L). Whether the CUDA
flash kernel itself aligns its causal flag lower-right is measured on the GPU
(benchmarks/results-2026-12-02/coll10/collapse_profile2.py, row closed-flash: outputs against the
masked path).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import unipelt.attention as attention
from unipelt.attention import KVPrefix, install, set_kv_provider

L = 3


def _lower_right_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    T, S = q.shape[2], k.shape[2]
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k.double()) * scale
    i = torch.arange(T).view(T, 1)
    j = torch.arange(S).view(1, S)
    scores = scores.masked_fill(j > i + (S - T), float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v.double()).to(q.dtype)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_flash_branch_matches_masked_path(monkeypatch):
    model = _model()
    install(model)
    torch.manual_seed(1)
    pk, pv = torch.randn(1, 4, L, 8), torch.randn(1, 4, L, 8)
    gate = torch.tensor([0.4, 0.8]).view(2, 1, 1, 1)  # one gate per example: a plain prefix
    for layer in model.model.layers:
        set_kv_provider(layer.self_attn, lambda m, q, k, v: KVPrefix(pk, pv, gate))
    ids = torch.randint(1, 50, (2, 7))
    masked = _logits(model, ids)

    calls = []

    def fake_flash(q, k, v, scale):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return _lower_right_reference(q, k, v, scale)

    monkeypatch.setattr(attention, "_can_flash_lower_right", lambda *a: True)
    monkeypatch.setattr(attention, "_flash_causal", fake_flash)
    flashed = _logits(model, ids)
    # every layer took the branch, with the L prefix keys in front of the 7 real ones
    assert calls == [((2, 4, 7, 8), (2, 4, 7 + L, 8))] * 2
    torch.testing.assert_close(flashed, masked, atol=1e-5, rtol=1e-5)
    # and the prefix matters here (a branch that dropped it would not match the masked path)
    for layer in model.model.layers:
        attention.clear_kv_provider(layer.self_attn)
    assert (_logits(model, ids) - masked).abs().max() > 1e-3


@pytest.mark.parametrize("setting", ["mask", "flash"])
def test_flash_branch_never_taken_eager_or_on_cpu(monkeypatch, setting):
    monkeypatch.setattr(attention, "PREFIX_CAUSAL", setting)
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    # not compiling (eager) and CPU tensors: the masked path, whatever the setting
    assert attention._can_flash_lower_right(q, q, q, {}) is False
