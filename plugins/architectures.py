"""Architecture catalogs for BERT/RoBERTa, GPT-2 and the Llama family (Llama, Mistral, Qwen2, Qwen3).

Where each model-independent hook point lives in each family (see METHODS.md, "Hook points").
Post-LN encoders (BERT) and pre-LN decoders differ in one place: ``ffn.out`` on BERT is the FFN
sublayer output after its residual add and LayerNorm (Pfeiffer's placement), on pre-LN decoders
the MLP output before the residual add.
"""
from __future__ import annotations

from unipelt.arch import Architecture, SiteTarget
from unipelt.hookspecs import hookimpl

BERT = Architecture(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    layers=("encoder.layer",),
    description="BERT-style post-LN encoders (BERT, RoBERTa, XLM-R, CamemBERT)",
    sites={
        "attn.q": SiteTarget("linear", "attention.self.query", reads="attn.in"),
        "attn.k": SiteTarget("linear", "attention.self.key", reads="attn.in"),
        "attn.v": SiteTarget("linear", "attention.self.value", reads="attn.in"),
        "attn.o": SiteTarget("linear", "attention.output.dense", reads="attn.ctx"),
        "attn.kv": SiteTarget("kv", "attention.self", reads="attn.in"),
        # Houlsby position 1: the attention projection's output, before dropout, residual and LN
        "attn.out": SiteTarget("output", "attention.output.dense"),
        "ffn.up": SiteTarget("linear", "intermediate.dense", reads="ffn.in"),
        "ffn.down": SiteTarget("linear", "output.dense", reads="ffn.mid"),
        # parallel to the whole FFN: reads the FFN input, adds to the down projection's output
        # (before the residual add and LN)
        "ffn": SiteTarget("io", "output.dense", input_path="intermediate", reads="ffn.in"),
        # Pfeiffer / UniPELT: after the FFN sublayer's residual add and LayerNorm
        "ffn.out": SiteTarget("output", "output"),
        "bias": SiteTarget("params", "", select="bias"),
        "norm": SiteTarget("params", "", select="norm"),
    },
    global_sites={
        "embed": SiteTarget("embed", "embeddings.word_embeddings", reads="embed"),
        "head": SiteTarget("params", "classifier|qa_outputs|cls", select="all"),
    },
    # post-LN: the block input is the attention input
    aliases={"layer.in": "attn.in"},
    layer_input="attention",
    causal=False,
)

GPT2 = Architecture(
    name="gpt2",
    model_types=("gpt2",),
    layers=("h",),
    description="GPT-2 (fused c_attn Conv1D split into q/k/v slices)",
    sites={
        "attn.q": SiteTarget("linear", "attn.c_attn", part=(0, 3), reads="attn.in"),
        "attn.k": SiteTarget("linear", "attn.c_attn", part=(1, 3), reads="attn.in"),
        "attn.v": SiteTarget("linear", "attn.c_attn", part=(2, 3), reads="attn.in"),
        "attn.o": SiteTarget("linear", "attn.c_proj", reads="attn.ctx"),
        "attn.kv": SiteTarget("kv", "attn", reads="attn.in"),
        "attn.out": SiteTarget("output", "attn"),
        "ffn.up": SiteTarget("linear", "mlp.c_fc", reads="ffn.in"),
        "ffn.down": SiteTarget("linear", "mlp.c_proj", reads="ffn.mid"),
        "ffn": SiteTarget("io", "mlp", input_path="mlp", reads="ffn.in"),
        "ffn.out": SiteTarget("output", "mlp"),
        "bias": SiteTarget("params", "", select="bias"),
        "norm": SiteTarget("params", "", select="norm"),
    },
    global_sites={
        "embed": SiteTarget("embed", "wte", reads="embed"),
        "head": SiteTarget("params", "score|lm_head", select="all"),
    },
    # pre-LN: the gates' layer input is ln_1's output, which is exactly what attention reads
    aliases={"layer.in": "attn.in"},
    layer_input="ln_1",
    input_norm="ln_1",
    causal=True,
)

LLAMA = Architecture(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers=("layers",),
    description="Llama family: RoPE, grouped-query attention, gated SiLU MLP (Llama, Mistral, Qwen2, Qwen3)",
    sites={
        "attn.q": SiteTarget("linear", "self_attn.q_proj", reads="attn.in"),
        "attn.k": SiteTarget("linear", "self_attn.k_proj", reads="attn.in"),
        "attn.v": SiteTarget("linear", "self_attn.v_proj", reads="attn.in"),
        "attn.o": SiteTarget("linear", "self_attn.o_proj", reads="attn.ctx"),
        "attn.kv": SiteTarget("kv", "self_attn", reads="attn.in"),
        "attn.out": SiteTarget("output", "self_attn"),
        "ffn.up": SiteTarget("linear", "mlp.up_proj", reads="ffn.in"),
        "ffn.gate": SiteTarget("linear", "mlp.gate_proj", reads="ffn.in"),
        "ffn.down": SiteTarget("linear", "mlp.down_proj", reads="ffn.mid"),
        "ffn": SiteTarget("io", "mlp", input_path="mlp", reads="ffn.in"),
        "ffn.out": SiteTarget("output", "mlp"),
        "bias": SiteTarget("params", "", select="bias"),
        "norm": SiteTarget("params", "", select="norm"),
    },
    global_sites={
        "embed": SiteTarget("embed", "embed_tokens", reads="embed"),
        "head": SiteTarget("params", "score|lm_head", select="all"),
    },
    # pre-LN: the gates' layer input is the input norm's output, which is what attention reads
    aliases={"layer.in": "attn.in"},
    layer_input="input_layernorm",
    input_norm="input_layernorm",
    causal=True,
)


@hookimpl
def unipelt_architectures():
    return [BERT, GPT2, LLAMA]
