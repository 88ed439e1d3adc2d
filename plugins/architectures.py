"""Architecture catalogs for BERT/RoBERTa, GPT-2 and the Llama family (Llama, Mistral, Qwen2, Qwen3).

Where each model-independent hook point lives in each family (see METHODS.md, "Hook points").
The serial adapter positions, as AdapterHub ``adapters`` 1.3 computes them (x the sublayer's input,
h its output projection, N its norm after the residual add: LayerNorm on post-LN encoders, the
identity on pre-LN decoders):

- ``attn.out`` / ``ffn.out``: h itself, before the residual add (and before BERT's dropout and
  LayerNorm): a serial adapter there gives N(x + h + Delta(h)), Houlsby's placement.
- ``attn.res`` / ``ffn.res``: the re-normalised residual sum (a ``renorm`` site): the adapter reads
  a = N(h + x) and the result is N(h + x + Delta(a)), Pfeiffer's (``seq_bn``). On pre-LN decoders
  that is h + x + Delta(h + x): the adapter reads the residual stream after the add, as
  ``adapters``' seq_bn does on GPT-2 and Llama (``original_ln_before``/``original_ln_after`` with
  no layer norm passed: only the residual adds remain).
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
        # Houlsby: the attention projection's output, before dropout, residual and LN
        "attn.out": SiteTarget("output", "attention.output.dense"),
        # Pfeiffer at the attention sublayer: its LayerNorm reads s = h + x; out = LN(s + Delta(LN(s)))
        "attn.res": SiteTarget("renorm", "attention.output.LayerNorm"),
        "ffn.up": SiteTarget("linear", "intermediate.dense", reads="ffn.in"),
        "ffn.down": SiteTarget("linear", "output.dense", reads="ffn.mid"),
        # parallel to the whole FFN: reads the FFN input, adds to the down projection's output
        # (before the residual add and LN)
        "ffn": SiteTarget("io", "output.dense", input_path="intermediate", reads="ffn.in"),
        # Houlsby: the FFN's output projection, before dropout, residual and LN
        "ffn.out": SiteTarget("output", "output.dense"),
        # Pfeiffer / UniPELT: the FFN sublayer's LayerNorm reads s = h + x; out = LN(s + Delta(LN(s)))
        "ffn.res": SiteTarget("renorm", "output.LayerNorm"),
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
        # pre-LN: the residual is ln_1's input; the adapter reads h + x, the block adds x
        "attn.res": SiteTarget("renorm", "attn", input_path="ln_1"),
        "ffn.up": SiteTarget("linear", "mlp.c_fc", reads="ffn.in"),
        "ffn.down": SiteTarget("linear", "mlp.c_proj", reads="ffn.mid"),
        "ffn": SiteTarget("io", "mlp", input_path="mlp", reads="ffn.in"),
        "ffn.out": SiteTarget("output", "mlp"),
        "ffn.res": SiteTarget("renorm", "mlp", input_path="ln_2"),
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
    # Gemma (v1) has the same module tree: its differences (RMSNorm scaled by 1 + w, embeddings
    # multiplied by sqrt(d), a GELU-tanh gate) are inside modules the hook points do not replace.
    # Gemma 2/3 are not listed: their extra pre/post-feedforward norms move what ffn.res reads.
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"),
    layers=("layers",),
    description="Llama family: RoPE, grouped-query attention, gated MLP (Llama, Mistral, Qwen2, Qwen3, Gemma)",
    sites={
        "attn.q": SiteTarget("linear", "self_attn.q_proj", reads="attn.in"),
        "attn.k": SiteTarget("linear", "self_attn.k_proj", reads="attn.in"),
        "attn.v": SiteTarget("linear", "self_attn.v_proj", reads="attn.in"),
        "attn.o": SiteTarget("linear", "self_attn.o_proj", reads="attn.ctx"),
        "attn.kv": SiteTarget("kv", "self_attn", reads="attn.in"),
        "attn.out": SiteTarget("output", "self_attn"),
        "attn.res": SiteTarget("renorm", "self_attn", input_path="input_layernorm"),
        "ffn.up": SiteTarget("linear", "mlp.up_proj", reads="ffn.in"),
        "ffn.gate": SiteTarget("linear", "mlp.gate_proj", reads="ffn.in"),
        "ffn.down": SiteTarget("linear", "mlp.down_proj", reads="ffn.mid"),
        "ffn": SiteTarget("io", "mlp", input_path="mlp", reads="ffn.in"),
        "ffn.out": SiteTarget("output", "mlp"),
        "ffn.res": SiteTarget("renorm", "mlp", input_path="post_attention_layernorm"),
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
