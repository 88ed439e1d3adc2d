"""Shared fixtures: tiny models built from configs (no downloads), a padded batch, helpers.

Every model is float32, two layers, hidden 32 (64 where a test needs a second shape), vocab 100,
with dropout off so that train-mode forwards are deterministic. A factory takes ``seed`` so that
"a fresh base model" is the same base weights every time it is asked for.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from torch import nn

# The Triton kernels (unipelt_kernels) run on CPU only under the interpreter, which must be chosen
# before any @triton.jit decoration runs (docs/ENVIRONMENT.md); on a GPU machine they run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from unipelt.compiler import get_state

VOCAB = 100

# The models are tiny: one thread avoids scheduling overhead (and contention on shared runners).
torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# model factories
# ------------------------------------------------------------------------------------------
def make_bert(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64, type_vocab_size=2, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def make_gpt2(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def make_llama(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Llama with grouped-query attention: 4 query heads sharing 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_qwen2(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Qwen2: the Llama layout with biases on q/k/v (GQA as above)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def make_gemma(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides) -> nn.Module:
    """Gemma (v1): the Llama layout with (1 + w) RMSNorms, sqrt(d)-scaled embeddings, GELU-tanh gate."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=64,
        attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GemmaForCausalLM(GemmaConfig(**cfg)).eval()
    # Gemma initialises its norms' w to 0 (scale 1 + w = 1); nonzero w makes LN tuning and the
    # renorm hook points see a norm that is not the identity
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    return model


FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "bert": make_bert, "gpt2": make_gpt2, "llama": make_llama, "qwen2": make_qwen2, "gemma": make_gemma,
}


@pytest.fixture
def bert() -> nn.Module:
    return make_bert()


@pytest.fixture
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def qwen2() -> nn.Module:
    return make_qwen2()


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def make_batch(seed: int = 1, batch: int = 3, length: int = 7, lengths: tuple[int, ...] | None = None) -> dict:
    """Token ids with a right-padded attention mask: example i has ``lengths[i]`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    lengths = lengths or tuple(max(1, length - 2 * i) for i in range(batch))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def batch() -> dict:
    return make_batch()


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------------
# helpers shared by several test files
# ------------------------------------------------------------------------------------------
def randomize(handle, seed: int = 123, std: float = 0.3) -> None:
    """Give every adapter parameter non-zero random values (so no branch is an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(handle.named_parameters().items()):
            p.copy_(torch.randn(p.shape, generator=g) * std + 0.05)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without unipelt's own tensors, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("unipelt.")}


class Snapshot:
    """What "the model is untouched" means: the same module objects under the same names, the
    same parameter flags and values, no hooks and no unipelt state."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = {n: m for n, m in model.named_modules()}
        self.types = {n: type(m) for n, m in self.modules.items()}
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.hooks = {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in self.modules.items()
        }

    def assert_same(self) -> None:
        model = self.model
        assert get_state(model) is None, "unipelt state left on the model"
        assert "unipelt" not in model._modules, "unipelt container left on the model"
        now = {n: m for n, m in model.named_modules()}
        assert list(now) == list(self.modules), "module names changed"
        for n, m in now.items():
            assert m is self.modules[n], f"module {n!r} is not the original object"
            assert type(m) is self.types[n]
            assert (len(m._forward_hooks), len(m._forward_pre_hooks)) == self.hooks[n], f"hooks left on {n!r}"
        sd = model.state_dict()
        assert list(sd) == list(self.state), "state dict keys changed"
        for k, v in self.state.items():
            assert torch.equal(sd[k], v), f"base tensor {k!r} changed"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.flags


@pytest.fixture
def fresh_registry():
    """Restore the process-wide registry after a test that replaces it."""
    yield
    from unipelt.registry import use_registry

    use_registry(None)


__all__ = [
    "make_bert", "make_gpt2", "make_llama", "make_qwen2", "make_batch", "logits", "randomize",
    "base_state", "Snapshot", "FACTORIES",
]


def _with_plugin(plugin, present: bool):
    """``plugin`` registered for one test, even where the installed entry points predate it."""
    from unipelt.registry import Registry, make_plugin_manager, use_registry

    if present:
        yield
        return
    use_registry(Registry(make_plugin_manager(extra_plugins=(plugin,))))
    yield
    use_registry(None)


@pytest.fixture
def fusion_registry():
    """The AdapterFusion plugin registered."""
    from unipelt.registry import get_registry
    from unipelt_plugins import fusion

    yield from _with_plugin(fusion, "fusion" in get_registry().methods)


@pytest.fixture
def prune_plugin():
    """The training controllers' plugin (gate pruning, AdapterDrop's ranking) registered."""
    import unipelt_plugins.prune as plugin
    from unipelt.registry import get_registry

    yield from _with_plugin(plugin, get_registry().pm.is_registered(plugin))
