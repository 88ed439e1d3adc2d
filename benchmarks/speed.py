"""Speed benchmark: unipelt's train and inference step against the frozen floor (PERFORMANCE.md's protocol).

Two scenarios, random weights, bf16 on one GPU (float32 on CPU), ``torch.optim.AdamW`` over the
trainable parameters:

- **bert**: ``BertForSequenceClassification(BertConfig(num_labels=2))`` (BERT-base), train and
  inference batch 32 x 128 (attention mask of ones, random labels; ``problem_type`` preset to the
  value BERT's first forward writes, a write that would recompile the whole model under torch.compile).
- **llama**: ``LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=5632,
  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000))``, SDPA,
  train batch 4 x 1024 (labels = inputs), inference batch 8 x 512.

One train step = forward + ``loss.backward()`` + ``optimizer.step()`` + ``zero_grad``; inference =
forward under ``no_grad``. 10 warm-up iterations (the first one compiles, and is reported as
``compile_s``), the median of 30 timed ones, each timed by CUDA events (``perf_counter`` on CPU).

**Frozen floor**: the base model with every weight frozen and ``model.enable_input_require_grads()``,
no optimizer (train); the plain base forward (inference). It is measured at the start and at the end
of every (scenario, mode) block, after a few seconds of GPU warm-up at process start; every ratio is
``median_ms / floor_ms`` with ``floor_ms`` the mean of the two floors of the same scenario, mode and
phase (only the start floor while a block is still running, ``ratio_basis`` says which). In the
compiled modes the train floor reaches the embedding output through a 0-d zero parameter added to
it instead of ``enable_input_require_grads()``, whose ``requires_grad_()`` hook breaks the graph
(the graph-broken floor would be slower and flatter every compiled ratio); ``floor_form`` says which.

Variants (``--variants``; default: the first six): ``unipelt`` (specs/unipelt.yaml, APL, gates live),
``lora-r16-all`` (unipelt LoRA r16, alpha 32, on every linear of the blocks), ``lora-r8-qv`` (r8,
alpha 16, on q and v), ``full`` (full fine-tuning), ``peft-lora-r16-all`` / ``peft-lora-r8-qv``
(HF PEFT's LoRA on the same modules, same r/alpha, adapter weights in the model's dtype:
``autocast_adapter_dtype=False``, as unipelt's); optional: ``prefix``, ``pfeiffer``, ``mam``,
``unipelt-al``, ``ia3``, ``vera`` (the spec files of the same names), ``dora-r16-all`` /
``peft-dora-r16-all`` (unipelt's DoRA / PEFT's ``use_dora=True``, r16, alpha 32, every linear),
``peft-ia3`` / ``peft-vera`` (PEFT's IA3 / VeRA on the modules of specs/ia3.yaml / vera.yaml),
``adalora`` / ``peft-adalora`` (specs/adalora.yaml with its orthogonality penalty in the loss, and
PEFT's AdaLoRA with the same fields; neither row calls the per-step rank allocation),
``unipelt-collapsed`` / ``unipelt-collapsed-closed`` / ``unipelt-adapterdrop`` (issue 12), ``lora-r8-qv-mixed8`` (eight ``lora-r8-qv``
adapters on one model, the batch's rows served round-robin by them through ``adapter_names=``,
all eight trained: issue 12's target is its time at most 1.2x ``lora-r8-qv``'s, one adapter per
batch; it also runs compiled, fullgraph: the forward reads the rows as a tensor, so one graph serves
every call; packed by ``unipelt.pack_mixed``, one A and one B tensor per projection for all eight,
against ``lora-r8-qv-mixed8-unpacked``, each adapter's own tensors), ``unipelt-mixed4`` / ``unipelt-mixed8`` (four / eight specs/unipelt.yaml adapters mixed the same
way, against ``unipelt``: gated methods run as segments, each adapter on its rows). ``--adamw fused``
(or ``foreach``) sets AdamW's implementation for every row; ``--no-floors`` skips the floors (a
comparison between variants only); ``--split-optimizer`` also times eager train rows' forward +
backward and optimizer step apart (``fwd_bwd_ms``, ``optimizer_ms``). The classifier head stays
frozen for every variant but ``full``: the same work for unipelt and PEFT. On llama the UniPELT gates are causal
(``pooling: auto`` -> per token); on BERT they pool with the padding-masked mean.

Modes (``--modes``): ``eager``; ``compiled`` (``torch.compile(model)``, default mode);
``reduce-overhead`` (``mode="reduce-overhead"``, CUDA graphs, ``cudagraph_mark_step_begin()`` per
step). Compiled modes try ``fullgraph=True`` first; if the first step fails, the error is recorded
(``fullgraph_error``) and the model is rebuilt and compiled with ``fullgraph=False``.
``graph-step`` / ``graph-step-compiled`` (asked for by name; train only, CUDA only, skipped with the
reason elsewhere): the whole train step -- forward, backward, AdamW (``capturable=True``) -- captured
as one CUDA graph by ``unipelt.training.graphed.GraphedTrainStep`` after its eager warm-up steps and
replayed, the model eager or compiled with inductor's default mode inside the capture; the floor is
the same floor (no optimizer) captured the same way, so the ratio is to the floor of that mode.
``torch._dynamo.reset()`` runs before each model: without it the recompile limit silently sends later
models to eager. Train and inference are measured on separate model instances (same seed, same
weights), so that each phase's peak memory is its own: ``torch.cuda.max_memory_allocated`` over the
timed steps, ``reset_peak_memory_stats`` after the warm-up (weights, optimizer state and CUDA-graph
pools count; compilation's one-off allocations do not).

Robust by construction: a measurement that fails (exception, OOM, ``--variant-timeout``) is recorded
with its error and the run goes on; the JSONL file is rewritten atomically after every measurement,
so a run killed at its time limit keeps everything measured so far. ``--budget-s`` skips the remaining
variants of a block (recorded as skipped) when the end floor would no longer fit.

Commands (on the GPU machine, from the repo root). Eager costs seconds per measurement; a compiled
measurement costs its compilation, 20-40 s per model and phase (a block = 2 + 2 floors + 2 per
variant; the end floor mostly hits the on-disk compile caches), so compiled blocks are split to stay
within a 10-minute call; ``--budget-s`` stops starting variants in time for the end floor:

    PYTHONPATH=. python benchmarks/speed.py --modes eager --out $OUT/eager-1.jsonl        # ~2-3 min: both scenarios, 6 variants
    PYTHONPATH=. python benchmarks/speed.py --modes eager --out $OUT/eager-2.jsonl        # the second run
    PYTHONPATH=. python benchmarks/speed.py --scenarios llama --modes compiled --variants unipelt,lora-r16-all,peft-lora-r16-all --budget-s 540 --out $OUT/llama-compiled-a.jsonl
    PYTHONPATH=. python benchmarks/speed.py --scenarios llama --modes compiled --variants lora-r8-qv,peft-lora-r8-qv,full --budget-s 540 --out $OUT/llama-compiled-b.jsonl
    PYTHONPATH=. python benchmarks/speed.py --scenarios bert --modes compiled --variants unipelt,lora-r16-all,peft-lora-r16-all --budget-s 540 --out $OUT/bert-compiled-a.jsonl
    PYTHONPATH=. python benchmarks/speed.py --scenarios llama --modes reduce-overhead --variants unipelt,lora-r16-all,peft-lora-r16-all --budget-s 540 --out $OUT/llama-ro-a.jsonl
    PYTHONPATH=. python benchmarks/speed.py --variants all --modes eager --out $OUT/eager-all.jsonl   # + prefix, pfeiffer, mam, unipelt-al
    PYTHONPATH=. python benchmarks/speed.py       # everything (both scenarios, 3 modes, 6 variants): 30+ min, more than one call allows

    python benchmarks/speed.py --report eager-1.jsonl eager-2.jsonl           # markdown: "run 1 / run 2", targets met / missed
    python benchmarks/speed.py --report eager-1.jsonl,llama-compiled-a.jsonl eager-2.jsonl,llama-compiled-a2.jsonl
                                                  # one run split over several files: join them with commas
    python benchmarks/speed.py --tiny --modes eager --out /tmp/tiny.jsonl     # tiny configs on CPU in seconds (what the test runs)

Data-parallel scaling (``--gpus N``, under ``torchrun --nproc-per-node N``; eager train steps of the
unipelt variants, each GPU its own batch of the scenario's train shape): the one-GPU step (rank 0
alone), then the N-GPU step under DDP and FSDP2 (``--distributed-modes``), the wrapping that
``unipelt train --distributed`` uses; per record the slowest rank's median, examples/s per GPU
against one GPU (``scaling_efficiency``; issue 15's target: >= 0.9 for DDP on llama) and every
rank's peak memory (``peak_gib_per_gpu``: what FSDP2's sharded base saves):

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/speed.py --gpus 2 --scenarios llama --variants unipelt,lora-r16-all,lora-r8-qv --out $OUT/gpus2-1.jsonl
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/speed.py --gpus 2 --tiny --device cpu --out /tmp/g.jsonl   # CPU/gloo check

``--tiny`` runs the same code path with 2-layer, 64-wide models, 2 warm-up and 3 timed iterations
(``--dtype bfloat16 --backend eager`` also exercise the GPU run's dtype and the compiled path on CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("eager", "compiled", "reduce-overhead", "graph-step", "graph-step-compiled")
DEFAULT_MODES = ("eager", "compiled", "reduce-overhead")  # the graph-step modes run when asked for
# one CUDA graph per train step (unipelt.training.graphed.GraphedTrainStep): the model eager or
# compiled with inductor's default mode inside the capture
GRAPH_MODES: dict[str, str | None] = {"graph-step": None, "graph-step-compiled": "default"}
PHASES = ("train", "infer")
LR = 1e-4  # the value does not change the cost of a step


# ------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One model and its batch shapes; ``linears`` are unipelt's sites for "all linears" and
    ``peft_*`` the module-name suffixes PEFT targets for the same layers."""

    name: str
    family: str  # "bert" | "llama"
    config: dict
    train_shape: tuple[int, int]  # batch, tokens
    infer_shape: tuple[int, int]
    linears: tuple[str, ...]
    peft_all: tuple[str, ...]
    peft_qv: tuple[str, ...]


_BERT_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")
# "output.dense" matches attention.output.dense and the layer's output.dense, not pooler.dense
# (PEFT's "all-linear" would also take the pooler, which unipelt's sites do not cover)
_BERT_PEFT_ALL = ("query", "key", "value", "output.dense", "intermediate.dense")
_LLAMA_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down")
_LLAMA_PEFT_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# problem_type: BERT's forward sets it on its first call with labels (to the value given here), and
# under torch.compile that write fails a guard and compiles the whole model a second time
_BERT_CLS = {"num_labels": 2, "problem_type": "single_label_classification"}
SCENARIOS: dict[str, Scenario] = {
    "bert": Scenario("bert", "bert", _BERT_CLS, (32, 128), (32, 128),
                     _BERT_LINEARS, _BERT_PEFT_ALL, ("query", "value")),
    "llama": Scenario("llama", "llama",
                      {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
                       "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
                       "attn_implementation": "sdpa"},
                      (4, 1024), (8, 512), _LLAMA_LINEARS, _LLAMA_PEFT_ALL, ("q_proj", "v_proj")),
}
TINY: dict[str, Scenario] = {
    "bert": Scenario("bert", "bert",
                     {**_BERT_CLS, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 64},
                     (2, 16), (2, 16), _BERT_LINEARS, _BERT_PEFT_ALL, ("query", "value")),
    "llama": Scenario("llama", "llama",
                      {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                       "max_position_embeddings": 128, "attn_implementation": "sdpa"},
                      (2, 32), (2, 32), _LLAMA_LINEARS, _LLAMA_PEFT_ALL, ("q_proj", "v_proj")),
}


def build_base(scn: Scenario, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The random base model, the same weights for every variant (seeded), on ``device`` in ``dtype``."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # initialising on the GPU takes a fraction of a second; the 0.5B llama on the CPU takes many
    with torch.device(device):
        if scn.family == "bert":
            model = BertForSequenceClassification(BertConfig(**scn.config))
        else:
            model = LlamaForCausalLM(LlamaConfig(**scn.config))
    return model.to(device=device, dtype=dtype)  # device too: a buffer made with an explicit device must follow


def make_batch(scn: Scenario, phase: str, vocab: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = scn.train_shape if phase == "train" else scn.infer_shape
    ids = torch.randint(0, vocab, (b, t), generator=g)
    batch = {"input_ids": ids}
    if scn.family == "bert":
        # a real classification batch carries its mask; the masked-mean gates read it
        batch["attention_mask"] = torch.ones_like(ids)
        if phase == "train":
            batch["labels"] = torch.randint(0, scn.config.get("num_labels", 2), (b,), generator=g)
    elif phase == "train":
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------
def ensure_plugins() -> str:
    """Make the in-tree plugins available; returns where they came from.

    unipelt finds its methods through the ``unipelt`` entry points of an installed package. On a
    machine where the repository is only on ``PYTHONPATH`` (the GPU machine: ``PYTHONPATH=.``) there
    are none, and every unipelt variant would fail with an unknown method; then the modules that
    pyproject.toml names are loaded from ``plugins/`` (as the package ``unipelt_plugins``, the name
    they are installed under) and registered explicitly.
    """
    import importlib
    import importlib.util

    from unipelt import registry as reg

    if "lora" in reg.get_registry().methods:
        return "entry points"
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["unipelt"]
    for package, folder in (("unipelt_plugins", "plugins"), ("unipelt_kernels", "kernels")):
        init = ROOT / folder / "__init__.py"
        if package in sys.modules or not init.is_file():
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(init.parent)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[package] = mod
            spec.loader.exec_module(mod)
    plugins = []
    for target in eps.values():
        module, _, attr = target.partition(":")
        obj = importlib.import_module(module.strip())
        plugins.append(getattr(obj, attr.strip()) if attr else obj)
    reg.use_registry(reg.Registry(reg.make_plugin_manager(tuple(plugins), load_entrypoints=False)))
    return f"{ROOT / 'plugins'} (no installed entry points)"


@dataclass
class Prepared:
    """A model ready to measure: what the step calls, and what the optimizer updates."""

    model: nn.Module
    params: list[nn.Parameter] | list[dict]  # AdamW's argument; empty = no optimizer
    trainable: int
    keep: Any = None  # the unipelt handle / PEFT wrapper: alive as long as the model
    call_kwargs: dict = field(default_factory=dict)  # added to every call (adapter_names=)


def _lora_all(scn: Scenario) -> dict:
    return {"version": 1, "name": "lora-r16-all", "modules": {"lora": {
        "method": "lora", "sites": list(scn.linears), "r": 16, "alpha": 32, "dropout": 0.0}}}


def _lora_qv(scn: Scenario) -> dict:
    return {"version": 1, "name": "lora-r8-qv", "modules": {"lora": {
        "method": "lora", "sites": ["attn.q", "attn.v"], "r": 8, "alpha": 16, "dropout": 0.0}}}


def _lora_qv_d01(scn: Scenario) -> dict:
    spec = _lora_qv(scn)
    return {**spec, "name": "lora-r8-qv-d01", "modules": {"lora": {**spec["modules"]["lora"], "dropout": 0.1}}}


def _dora_all(scn: Scenario) -> dict:
    return {"version": 1, "name": "dora-r16-all", "modules": {"dora": {
        "method": "dora", "sites": list(scn.linears), "r": 16, "alpha": 32, "dropout": 0.0}}}


def _spec_file(name: str) -> Callable[[Scenario], Path]:
    return lambda scn: ROOT / "specs" / name


def _with(name: str, **extra) -> Callable[[Scenario], dict]:
    """A spec file with top-level keys added (``drop:``): extra values may depend on the scenario."""
    def make(scn: Scenario) -> dict:
        import yaml

        spec = yaml.safe_load((ROOT / "specs" / name).read_text(encoding="utf-8"))
        spec.update({k: (v(scn) if callable(v) else v) for k, v in extra.items()})
        return spec
    return make


def _first_half(scn: Scenario) -> dict:
    # AdapterDrop's inference setting (Rücklé et al. drop the first 5 of 12 layers): the first half
    n = scn.config.get("num_hidden_layers", 12 if scn.family == "bert" else 2)
    return {"layers": f":{max(1, n // 2)}"}


def _collapse(closed: tuple[str, ...]) -> Callable[[Any, Scenario, torch.device], None]:
    """Make the gates of a fresh UniPELT constant (weights 0: every gate is sigmoid(bias)) and the
    gates of the ``closed`` modules closed (bias -12), then collapse it on one inference batch: LoRA
    merged, the closed modules pruned, the rest kept under constant gates, the prefix without its
    MLP. The state a trained UniPELT whose gates settled would collapse to."""
    def post(handle, scn: Scenario, device: torch.device) -> None:
        with torch.no_grad():
            for key, gate in handle.gate_modules.items():
                gate.linear.weight.zero_()
                if key.split("@")[0].split(".")[0] in closed:
                    gate.linear.bias.fill_(-12.0)
        vocab = handle.model.get_input_embeddings().num_embeddings
        batch = make_batch(scn, "infer", vocab, device)
        handle.collapse([{k: v for k, v in batch.items() if k != "labels"}])
    return post


def _peft_ia3(scn: Scenario) -> dict:
    # unipelt's attn.k, attn.v and ffn.down (the FFN intermediate, PEFT's feedforward_modules). On
    # BERT "output.dense" would also take attention.output.dense: full-name regexes instead
    if scn.family == "bert":
        return {"target_modules": r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                "feedforward_modules": r".*layer\.\d+\.output\.dense"}
    return {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


def _peft_adalora(scn: Scenario) -> dict:
    """PEFT's AdaLoraConfig for specs/adalora.yaml: the same modules (q, k, v, o, up, down) and
    schedule fields; lora_alpha is the spec's alpha."""
    import yaml

    node = yaml.safe_load((ROOT / "specs" / "adalora.yaml").read_text(encoding="utf-8"))["modules"]["adalora"]
    names = {"attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.o": "o", "ffn.up": "up", "ffn.down": "down"}
    assert set(node["sites"]) == set(names), node["sites"]
    if scn.family == "bert":  # output.dense: attention.output.dense (o) and the layer's output.dense (down)
        targets = ["query", "key", "value", "output.dense", "intermediate.dense"]
    else:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    return {"target_modules": targets, "init_r": node["init_r"], "target_r": node["target_r"],
            "lora_alpha": node["alpha"], "total_step": node["total_step"], "tinit": node["tinit"],
            "tfinal": node["tfinal"], "deltaT": node["deltaT"], "beta1": node["beta1"], "beta2": node["beta2"],
            "orth_reg_weight": node["orth_reg_weight"], "lora_dropout": 0.0}


class _Regularized(nn.Module):
    """The model whose loss carries the training controllers' regularizers (``unipelt train``'s
    loss), in one module so that torch.compile traces both, as PEFT's AdaLoRA forward does."""

    def __init__(self, model: nn.Module, controllers: list):
        super().__init__()
        self.model = model
        self.__dict__["controllers"] = controllers  # plain objects holding the model's own branches

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        if getattr(out, "loss", None) is not None:
            from unipelt.training.optim import controller_loss

            out.loss = controller_loss(self.controllers, out.loss)
        return out


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "floor" | "unipelt" | "peft" | "full"
    description: str
    spec: Callable[[Scenario], dict | Path] | None = None
    peft: Callable[[Scenario], dict] | None = None
    post: Callable[[Any, Scenario, torch.device], None] | None = None  # unipelt: after compile (collapse)
    # QLoRA rows: the base's linears in bitsandbytes NF4 (compute dtype = the run's dtype), and
    # how unipelt's 4-bit leaves dequantize ("bnb": Linear4bit.forward; "triton": kernels/nf4.py
    # into a reused buffer + one GEMM)
    quant: str | None = None
    dequant: str = "bnb"
    # PEFT rows: the config class of ``peft`` (issue 11: IA3, VeRA, AdaLoRA besides LoRA)
    peft_type: str = "LORA"
    # unipelt rows whose training adds a controller's regularizer to the loss (AdaLoRA's
    # orthogonality penalty, as ``unipelt train`` adds it to every micro-batch; PEFT's AdaLoRA
    # model adds its own inside forward)
    regularized: bool = False
    # "mixed" rows: how many adapters of ``spec`` share the batch, rows round-robin (issue 12), and
    # whether their stacked LoRA tensors are packed into one Parameter per projection
    # (unipelt.pack_mixed: the optimizer gets those; only where every projection stacks, which a
    # dropout on the PyTorch executors or a gated LoRA does not)
    mixed_adapters: int = 8
    packed: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("unipelt", "unipelt", "specs/unipelt.yaml (APL, gates live)", spec=_spec_file("unipelt.yaml")),
    Variant("lora-r16-all", "unipelt", "unipelt LoRA r16 on all linears", spec=_lora_all),
    Variant("lora-r8-qv", "unipelt", "unipelt LoRA r8 on q,v", spec=_lora_qv),
    Variant("full", "full", "full fine-tuning"),
    Variant("peft-lora-r16-all", "peft", "PEFT LoRA r16 on all linears",
            peft=lambda scn: {"r": 16, "lora_alpha": 32, "target_modules": list(scn.peft_all)}),
    Variant("peft-lora-r8-qv", "peft", "PEFT LoRA r8 on q,v",
            peft=lambda scn: {"r": 8, "lora_alpha": 16, "target_modules": list(scn.peft_qv)}),
    Variant("prefix", "unipelt", "specs/prefix.yaml", spec=_spec_file("prefix.yaml")),
    Variant("pfeiffer", "unipelt", "specs/pfeiffer.yaml", spec=_spec_file("pfeiffer.yaml")),
    Variant("mam", "unipelt", "specs/mam.yaml", spec=_spec_file("mam.yaml")),
    Variant("unipelt-al", "unipelt", "specs/unipelt-al.yaml", spec=_spec_file("unipelt-al.yaml")),
    Variant("dora-r16-all", "unipelt", "unipelt DoRA r16 on all linears", spec=_dora_all),
    Variant("peft-dora-r16-all", "peft", "PEFT DoRA (use_dora) r16 on all linears",
            peft=lambda scn: {"r": 16, "lora_alpha": 32, "target_modules": list(scn.peft_all), "use_dora": True}),
    Variant("ia3", "unipelt", "specs/ia3.yaml (k, v, ffn.down)", spec=_spec_file("ia3.yaml")),
    Variant("vera", "unipelt", "specs/vera.yaml (r256 on q, v)", spec=_spec_file("vera.yaml")),
    # issue 12: serving a collapsed UniPELT (target: <= 1.05x the base forward), and AdapterDrop
    Variant("unipelt-collapsed", "unipelt", "specs/unipelt.yaml collapsed with every gate constant: LoRA merged, "
            "prefix (no MLP) and adapter under constant gates", spec=_spec_file("unipelt.yaml"), post=_collapse(())),
    Variant("unipelt-collapsed-closed", "unipelt", "specs/unipelt.yaml collapsed with the adapter gates closed: LoRA "
            "merged, adapter pruned, prefix under a constant gate", spec=_spec_file("unipelt.yaml"),
            post=_collapse(("adapter",))),
    Variant("unipelt-adapterdrop", "unipelt", "specs/unipelt.yaml with AdapterDrop of the first half of the layers "
            "(drop.layers)", spec=_with("unipelt.yaml", drop=_first_half)),
    Variant("lora-r8-qv-mixed8", "mixed", "8 unipelt LoRA r8 q,v adapters, rows round-robin (adapter_names), "
            "packed (unipelt.pack_mixed: one A and one B tensor per projection)", spec=_lora_qv, packed=True),
    Variant("lora-r8-qv-mixed8-unpacked", "mixed", "8 unipelt LoRA r8 q,v adapters, rows round-robin "
            "(adapter_names), each adapter's own tensors trained (no pack_mixed)", spec=_lora_qv),
    # mixed batches with LoRA dropout 0.1 (what training configs use): on the PyTorch path an active
    # dropout runs as segments (each adapter on its own rows), on the Triton path it stacks (one
    # shrink with each adapter's mask as a column segment, one expand)
    Variant("lora-r8-qv-d01", "unipelt", "unipelt LoRA r8 on q,v, dropout 0.1", spec=_lora_qv_d01),
    Variant("lora-r8-qv-d01-mixed8", "mixed", "8 unipelt LoRA r8 q,v dropout 0.1 adapters, rows round-robin",
            spec=_lora_qv_d01),
    Variant("lora-r8-qv-d01-triton", "unipelt", "unipelt LoRA r8 on q,v, dropout 0.1, executor: triton",
            spec=lambda scn: {**_lora_qv_d01(scn), "executor": "triton"}),
    Variant("lora-r8-qv-d01-mixed8-triton", "mixed", "8 unipelt LoRA r8 q,v dropout 0.1 adapters, rows "
            "round-robin, executor: triton (stacked kernels), packed (unipelt.pack_mixed)",
            spec=lambda scn: {**_lora_qv_d01(scn), "executor": "triton"}, packed=True),
    Variant("lora-r8-qv-d01-mixed8-triton-unpacked", "mixed", "8 unipelt LoRA r8 q,v dropout 0.1 adapters, rows "
            "round-robin, executor: triton (stacked kernels), no pack_mixed",
            spec=lambda scn: {**_lora_qv_d01(scn), "executor": "triton"}),
    Variant("qlora-nf4-r16-all", "unipelt", "unipelt LoRA r16 on all linears, NF4 base (bnb dequant)",
            spec=_lora_all, quant="nf4"),
    Variant("qlora-nf4-r16-all-triton", "unipelt", "unipelt LoRA r16 on all linears, NF4 base (Triton dequant)",
            spec=_lora_all, quant="nf4", dequant="triton"),
    Variant("unipelt-nf4-triton", "unipelt", "specs/unipelt.yaml on an NF4 base (Triton dequant)",
            spec=_spec_file("unipelt.yaml"), quant="nf4", dequant="triton"),
    Variant("peft-qlora-nf4-r16-all", "peft", "PEFT + bitsandbytes QLoRA r16 on all linears, NF4 base",
            peft=lambda scn: {"r": 16, "lora_alpha": 32, "target_modules": list(scn.peft_all)}, quant="nf4"),
    # issue 11: every unipelt method row next to PEFT's on the same modules with the same settings
    # (IA3 and VeRA against the existing ia3 / vera rows; AdaLoRA: specs/adalora.yaml)
    Variant("peft-ia3", "peft", "PEFT IA3 on k, v, ffn.down (down as feedforward), as specs/ia3.yaml",
            peft=lambda scn: _peft_ia3(scn), peft_type="IA3"),
    Variant("peft-vera", "peft", "PEFT VeRA r256 on q, v, as specs/vera.yaml",
            peft=lambda scn: {"r": 256, "target_modules": list(scn.peft_qv), "vera_dropout": 0.0,
                              "d_initial": 0.1, "projection_prng_key": 0, "save_projection": True},
            peft_type="VERA"),
    Variant("adalora", "unipelt", "specs/adalora.yaml (init_r 12, q k v o up down) + its orthogonality penalty",
            spec=_spec_file("adalora.yaml"), regularized=True),
    Variant("peft-adalora", "peft", "PEFT AdaLoRA as specs/adalora.yaml, called through AdaLoraModel.forward (which adds the penalty)",
            peft=lambda scn: _peft_adalora(scn), peft_type="ADALORA"),
    # issue 9: the same specs run by the Triton kernels (spec field ``executor: triton``), to compare
    # with lora-r16-all / unipelt (the grouped PyTorch executor) and PEFT in one run
    Variant("lora-r16-all-triton", "unipelt", "unipelt LoRA r16 on all linears, executor: triton (Triton kernels)",
            spec=lambda scn: {**_lora_all(scn), "name": "lora-r16-all-triton", "executor": "triton"}),
    Variant("lora-r16-all-d01", "unipelt", "unipelt LoRA r16 on all linears, dropout 0.1",
            spec=lambda scn: {**_lora_all(scn), "name": "lora-r16-all-d01",
                              "modules": {"lora": {**_lora_all(scn)["modules"]["lora"], "dropout": 0.1}}}),
    Variant("lora-r16-all-d01-triton", "unipelt", "unipelt LoRA r16 on all linears, dropout 0.1, executor: triton",
            spec=lambda scn: {**_lora_all(scn), "name": "lora-r16-all-d01-triton", "executor": "triton",
                              "modules": {"lora": {**_lora_all(scn)["modules"]["lora"], "dropout": 0.1}}}),
    Variant("peft-lora-r16-all-d01", "peft", "PEFT LoRA r16 on all linears, dropout 0.1",
            peft=lambda scn: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": list(scn.peft_all)}),
    Variant("unipelt-triton", "unipelt", "specs/unipelt.yaml (APL, gates live), executor: triton",
            spec=_with("unipelt.yaml", executor="triton")),
    # executor: auto runs plain LoRA groups on the kernels where the forward is compiled or graphed
    # (session 12); these pin the grouped PyTorch executor for the same specs, to compare in one run
    Variant("lora-r16-all-grouped", "unipelt", "unipelt LoRA r16 on all linears, executor: grouped",
            spec=lambda scn: {**_lora_all(scn), "name": "lora-r16-all-grouped", "executor": "grouped"}),
    Variant("lora-r16-all-d01-grouped", "unipelt", "unipelt LoRA r16 on all linears, dropout 0.1, executor: grouped",
            spec=lambda scn: {**_lora_all(scn), "name": "lora-r16-all-d01-grouped", "executor": "grouped",
                              "modules": {"lora": {**_lora_all(scn)["modules"]["lora"], "dropout": 0.1}}}),
    # issue 12: gated methods in a mixed batch (segments: each adapter's branches on its rows), against
    # the unipelt row (one adapter per batch)
    Variant("unipelt-mixed4", "mixed", "4 specs/unipelt.yaml adapters (gates live), rows round-robin (adapter_names)",
            spec=_spec_file("unipelt.yaml"), mixed_adapters=4),
    Variant("unipelt-mixed8", "mixed", "8 specs/unipelt.yaml adapters (gates live), rows round-robin (adapter_names)",
            spec=_spec_file("unipelt.yaml"), mixed_adapters=8),
]}
MIXED_ADAPTERS = 8
QLORA_VARIANTS = ("qlora-nf4-r16-all", "qlora-nf4-r16-all-triton", "unipelt-nf4-triton", "peft-qlora-nf4-r16-all")
DEFAULT_VARIANTS = ("unipelt", "lora-r16-all", "lora-r8-qv", "full", "peft-lora-r16-all", "peft-lora-r8-qv")
FLOOR = Variant("floor", "floor", "frozen base (train: gradients to the embedding output, no optimizer; infer: base forward)")


FLOOR_FORMS = {
    "eager": "enable_input_require_grads()",
    "compiled": "embedding output + a 0-d zero parameter (traceable)",
}


def adamw_kwargs(adamw: str) -> dict:
    """torch.optim.AdamW's implementation switch for ``--adamw`` (default: PyTorch's choice)."""
    return {"fused": True} if adamw == "fused" else {"foreach": True} if adamw == "foreach" else {}


def _floor_form(mode: str) -> str:
    return "eager" if mode in ("eager", "graph-step") else "compiled"


def prepare(variant: Variant, scn: Scenario, phase: str, device: torch.device, dtype: torch.dtype,
            traceable_floor: bool = False) -> Prepared:
    model = build_base(scn, device, dtype)
    if variant.quant is not None:
        from unipelt_plugins.bnb import quantize_model, set_dequant_backend

        # compute in the run's dtype; the head stays in it too (as transformers' bnb loading)
        quantize_model(model, variant.quant, compute_dtype=dtype, device=device)
        set_dequant_backend(variant.dequant)
    if variant.kind == "floor":
        model.requires_grad_(False)
        if phase == "train" and not traceable_floor:
            model.enable_input_require_grads()  # gradients flow to the embeddings' output: the backward any PEFT pays
        elif phase == "train":
            # enable_input_require_grads' hook (output.requires_grad_()) breaks the graph under
            # torch.compile ("returning intermediate with requires_grad_()"), which would leave the
            # compiled floor slower than it can be and flatter every compiled ratio. Adding a 0-d zero
            # parameter makes the same backward flow into the embedding output; inductor fuses the add
            # into the gather, and its gradient is one reduction over the embedding output.
            emb = model.get_input_embeddings()
            emb.register_parameter("floor_probe", nn.Parameter(torch.zeros((), device=device, dtype=dtype)))
            emb.register_forward_hook(lambda mod, args, out: out + mod.floor_probe)
        return Prepared(model, [], 0)
    if variant.kind == "full":
        params = [p for p in model.parameters() if p.requires_grad]
        return Prepared(model, params, sum(p.numel() for p in params))
    if variant.kind == "unipelt":
        import unipelt
        from unipelt.train import param_groups

        handle = unipelt.compile(model, variant.spec(scn))
        if variant.post is not None:
            variant.post(handle, scn, device)
        groups = param_groups(handle, LR)
        run = model
        if variant.regularized:
            from unipelt.training.optim import collect_controllers

            run = _Regularized(model, collect_controllers(handle))
        return Prepared(run, groups, sum(p.numel() for g in groups for p in g["params"]), handle)
    if variant.kind == "mixed":
        import unipelt
        from unipelt.train import param_groups

        handles = [unipelt.compile(model, variant.spec(scn), name=f"m{i}") for i in range(variant.mixed_adapters)]
        # one optimizer group per distinct setting (as one adapter has), not eight times as many
        merged: dict[tuple, dict] = {}
        for h in handles:
            for g in param_groups(h, LR):
                key = tuple(sorted((k, v) for k, v in g.items() if k != "params"))
                merged.setdefault(key, {**g, "params": []})["params"].extend(g["params"])
        groups = list(merged.values())
        if variant.packed:
            # the adapters' LoRA tensors are frozen views of the stacks from here on (param_groups
            # above listed them while still trainable): the optimizer gets the adapters' other
            # trainable tensors and the stacks
            packed = unipelt.pack_mixed(model)
            for g in groups:
                g["params"] = [p for p in g["params"] if p.requires_grad]
            groups = [g for g in groups if g["params"]]
            groups.append({"name": "packed", "params": packed, "lr": LR, "weight_decay": groups[0]["weight_decay"]
                           if groups else 0.0})
        rows = (scn.train_shape if phase == "train" else scn.infer_shape)[0]
        names = [f"m{i % variant.mixed_adapters}" for i in range(rows)]
        return Prepared(model, groups, sum(p.numel() for g in groups for p in g["params"]), handles,
                        call_kwargs={"adapter_names": names})
    if variant.kind == "peft":
        import peft
        from peft import LoraConfig, get_peft_model

        if variant.peft_type == "LORA":
            cfg = LoraConfig(**{"lora_dropout": 0.0, "bias": "none", **variant.peft(scn)})  # a variant may set dropout
        else:
            config_class = {"IA3": peft.IA3Config, "VERA": peft.VeraConfig, "ADALORA": peft.AdaLoraConfig}
            cfg = config_class[variant.peft_type](**variant.peft(scn))
        # adapter weights in the base dtype, as unipelt's (PEFT's default upcasts them to float32)
        wrapped = get_peft_model(model, cfg, autocast_adapter_dtype=False)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        run = wrapped
        if variant.peft_type == "ADALORA":
            # AdaLoraModel.forward adds the orthogonality penalty to the loss; a PeftModel built
            # without task_type (as here: the config has none, to keep the heads as unipelt's)
            # calls the transformers model under it directly and never adds it. Call AdaLoraModel
            # itself, so that PEFT's row does the work unipelt's does.
            run = wrapped.base_model
        return Prepared(run, params, sum(p.numel() for p in params), wrapped)
    raise ValueError(f"variant {variant.name!r}: unknown kind {variant.kind!r}")


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    iters: int
    backend: str
    variant_timeout: float  # seconds per measurement, 0 = none
    gpu_warmup_s: float
    # issue 12: AdamW's implementation for every row (default: PyTorch's choice, foreach on CUDA),
    # and whether eager train rows also time forward+backward and the optimizer step apart
    adamw: str = "default"
    split_optimizer: bool = False
    # benchmarks/speed_turns.py (models compiled in parallel processes, timed one at a time): the
    # timed steps run ``passes`` times, each inside ``turn(i)`` (which waits for this process's turn
    # on the GPU and hands it back), after ``turn_warmup`` untimed steps in the same turn
    turn: Callable[[int], Any] | None = None
    passes: int = 1
    turn_warmup: int = 0


class MeasurementTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` inside dynamo or
    inductor swallows it."""


class _alarm:
    """``--variant-timeout`` for one measurement (SIGALRM: main thread, POSIX; a no-op elsewhere)."""

    def __init__(self, seconds: float):
        import threading

        self.seconds = seconds
        self.active = (seconds > 0 and hasattr(signal, "setitimer")
                       and threading.current_thread() is threading.main_thread())

    def _fire(self, signum, frame):
        raise MeasurementTimeout(f"time limit of {self.seconds:g} s reached")

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``n`` calls: CUDA events around each step (no sync in between, so
    a host-bound step shows its host time and a GPU-bound one its GPU time), else perf_counter."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            s.record()
            step()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _split_optimizer(fn, batch: dict, opt, s: Settings) -> dict[str, float]:
    """Medians of forward + backward and of AdamW's step + zero_grad over ``s.iters`` train steps
    (CUDA events between the two parts, no sync inside a step; perf_counter on CPU)."""
    cuda = s.device.type == "cuda"
    fb, op = [], []
    for _ in range(s.iters):
        if cuda:
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
        else:
            t0 = time.perf_counter()
        fn(**batch).loss.backward()
        if cuda:
            e[1].record()
        else:
            t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            e[2].record()
            fb.append(e)
        else:
            t2 = time.perf_counter()
            fb.append((t1 - t0) * 1e3)
            op.append((t2 - t1) * 1e3)
    if cuda:
        torch.cuda.synchronize(s.device)
        fb, op = [e[0].elapsed_time(e[1]) for e in fb], [e[1].elapsed_time(e[2]) for e in fb]
    return {"fwd_bwd_ms": round(statistics.median(fb), 4), "optimizer_ms": round(statistics.median(op), 4)}


def _dynamo_stats() -> dict[str, int]:
    """Graph breaks, recompilations and captured graphs since the last reset (cheap counters)."""
    from torch._dynamo import utils as dutils

    c = dutils.counters
    failures = [reason for reasons in getattr(dutils, "guard_failures", {}).values() for reason in reasons]
    stats: dict[str, Any] = {"graph_breaks": int(sum(c["graph_break"].values())),
                             "unique_graphs": int(c["stats"].get("unique_graphs", 0)),
                             "recompiles": len(failures)}
    if failures:  # the guard that failed, first line of each (the rest is a stack trace)
        stats["recompile_reasons"] = [str(f).splitlines()[0][:300] for f in failures[:3]]
    if c["graph_break"]:
        stats["graph_break_reasons"] = [str(k)[:300] for k in list(c["graph_break"])[:3]]
    skips = c["inductor"].get("cudagraph_skips", 0)
    if skips:
        stats["cudagraph_skips"] = int(skips)
    return stats


def _reset_compiler() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() leaves the counters


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:400]


def _attempt(variant: Variant, scn: Scenario, mode: str, phase: str, s: Settings, fullgraph: bool | None,
             rec: dict) -> None:
    """Build, (compile), warm up and time one model; fills ``rec``. An exception in the first step is
    tagged ``first_step`` so that the caller can retry without fullgraph."""
    if mode in GRAPH_MODES:
        return _attempt_graphed(variant, scn, mode, phase, s, rec)
    if mode != "eager":
        _reset_compiler()
        _free(s.device)  # the caches just dropped may have held the previous model
    prep = prepare(variant, scn, phase, s.device, s.dtype, traceable_floor=mode != "eager")
    rec["trainable_params"] = prep.trainable
    if variant.kind == "floor" and phase == "train":
        rec["floor_form"] = FLOOR_FORMS["eager" if mode == "eager" else "compiled"]
    model = prep.model
    model.train(phase == "train")
    fn: Callable[..., Any] = model
    if mode != "eager":
        kwargs: dict[str, Any] = {"fullgraph": bool(fullgraph), "backend": s.backend}
        if mode == "reduce-overhead":
            if s.backend != "inductor":
                raise RuntimeError("reduce-overhead needs the inductor backend")
            kwargs["mode"] = "reduce-overhead"
        fn = torch.compile(model, **kwargs)
    opt_kwargs = adamw_kwargs(s.adamw)
    opt = torch.optim.AdamW(prep.params, lr=LR, **opt_kwargs) if phase == "train" and prep.params else None
    vocab = model.get_input_embeddings().num_embeddings
    batch = {**make_batch(scn, phase, vocab, s.device), **prep.call_kwargs}
    mark = mode == "reduce-overhead"  # CUDA graphs: a new step begins, earlier outputs may be overwritten
    # without an optimizer (the floor) nobody clears the probe's .grad; under CUDA graphs a gradient
    # kept alive across steps would live in the graph's memory pool and force a new recording
    loose = [p for p in model.parameters() if p.requires_grad] if opt is None else []

    if phase == "train":
        def step() -> None:
            if mark:
                torch.compiler.cudagraph_mark_step_begin()
            loss = fn(**batch).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for p in loose:
                p.grad = None
    else:
        def step() -> None:
            if mark:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                fn(**batch)

    _sync(s.device)
    t0 = time.perf_counter()
    try:
        step()
        _sync(s.device)
    except Exception as exc:
        exc.first_step = True  # type: ignore[attr-defined]
        raise
    first = time.perf_counter() - t0
    rec["compile_s" if mode != "eager" else "first_step_s"] = round(first, 3)
    for _ in range(max(s.warmup - 1, 0)):
        step()
    if s.device.type == "cuda":
        # the steady state's peak: weights, optimizer state and CUDA-graph pools are in place (they
        # count); what compilation and the first step allocated once does not
        _sync(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
    runs: list[list[float]] = []
    for i in range(s.passes):
        with s.turn(i) if s.turn is not None else contextlib.nullcontext() as held:
            for _ in range(s.turn_warmup):
                step()
            runs.append(time_steps(step, s.iters, s.device))
            if held is not None:
                held.times = [round(t, 4) for t in runs[-1]]  # the turn hands them on as it ends
    times = runs[0]
    rec["times_ms"] = [round(t, 4) for t in times]
    rec["median_ms"] = round(statistics.median(times), 4)
    if s.passes > 1:
        rec["pass_times_ms"] = [[round(t, 4) for t in r] for r in runs]
        rec["pass_medians_ms"] = [round(statistics.median(r), 4) for r in runs]
    if s.split_optimizer and phase == "train" and opt is not None and mode == "eager":
        # issue 12 (where a mixed train step's time goes): after the timed steps, as many more with
        # the optimizer's step + zero_grad timed apart from forward + backward
        rec.update(_split_optimizer(fn, batch, opt, s))
    if s.device.type == "cuda":
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 4)
    if mode != "eager":
        rec.update(_dynamo_stats())


def _attempt_graphed(variant: Variant, scn: Scenario, mode: str, phase: str, s: Settings, rec: dict) -> None:
    """The graph-step modes: the same train step (forward, backward, AdamW step; the floor without
    an optimizer) captured whole as one CUDA graph by GraphedTrainStep after its eager warm-up
    steps, then replayed; timed by the same code as the other modes. AdamW is built with
    ``capturable=True``, fused unless ``--adamw foreach`` is given: capturable foreach AdamW divides
    every parameter's second moment by 0-dim device tensors (its bias corrections and step size, two
    ``_foreach_div_`` calls per step), which the foreach fast path does not take (the sizes differ),
    so it runs as two non-vectorized broadcast kernels per parameter: 288 launches, 0.93 ms of GPU
    per BERT LoRA r16 all-linear step on the H200, against 0.16 ms for the rest of the optimizer
    (benchmarks/RESULTS.md, "Session 10 (helper bert10)"). ``compile_s`` is the first step
    (compilation in graph-step-compiled), ``capture_s`` the capture."""
    from unipelt.training.graphed import GraphedTrainStep

    compile_mode = GRAPH_MODES[mode]
    _reset_compiler()
    _free(s.device)
    prep = prepare(variant, scn, phase, s.device, s.dtype, traceable_floor=_floor_form(mode) == "compiled")
    rec["trainable_params"] = prep.trainable
    if variant.kind == "floor":
        rec["floor_form"] = FLOOR_FORMS[_floor_form(mode)]
    model = prep.model
    model.train(True)
    adamw = graph_adamw(s.adamw)
    opt = torch.optim.AdamW(prep.params, lr=LR, capturable=True, **adamw_kwargs(adamw)) if prep.params else None
    vocab = model.get_input_embeddings().num_embeddings
    batch = make_batch(scn, phase, vocab, s.device)
    gstep = GraphedTrainStep(model, opt, batch, call_kwargs=prep.call_kwargs, compile=compile_mode,
                             warmup=max(1, min(3, s.warmup - 1)))

    def step() -> None:
        gstep.step(batch)

    _sync(s.device)
    t0 = time.perf_counter()
    step()
    _sync(s.device)
    rec["compile_s" if compile_mode else "first_step_s"] = round(time.perf_counter() - t0, 3)
    for _ in range(max(s.warmup - 1, 0)):
        step()
    if gstep.graph is None:
        raise RuntimeError(f"no graph captured after {s.warmup} warm-up steps (GraphedTrainStep warmup "
                           f"{gstep.warmup}); raise --warmup")
    _sync(s.device)
    torch.cuda.reset_peak_memory_stats(s.device)
    times = time_steps(step, s.iters, s.device)
    rec["times_ms"] = [round(t, 4) for t in times]
    rec["median_ms"] = round(statistics.median(times), 4)
    rec["peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 4)
    rec["capture_s"] = round(gstep.capture_s, 3)
    rec["graph_warmup_steps"] = gstep.warmup
    rec["adamw"] = f"{adamw} capturable" if opt is not None else None
    if compile_mode:
        rec.update(_dynamo_stats())


def graph_adamw(adamw: str) -> str:
    """The AdamW implementation of the graph-step rows for ``--adamw``: fused unless foreach is asked
    for (``default``, PyTorch's choice elsewhere, would be the capturable foreach one: see
    :func:`_attempt_graphed`)."""
    return "foreach" if adamw == "foreach" else "fused"


def _graph_skip(mode: str, phase: str, s: Settings) -> str | None:
    """Why a graph-step measurement cannot run here, or None."""
    if mode not in GRAPH_MODES:
        return None
    if s.device.type != "cuda":
        return f"skipped: {mode} captures the train step in a CUDA graph; device {s.device} has none"
    if phase != "train":
        return f"skipped: {mode} measures train steps only (inference under CUDA graphs: reduce-overhead)"
    return None


def _record(scn: Scenario, mode: str, phase: str, variant: str, **extra) -> dict:
    return {"kind": "measurement", "scenario": scn.name, "mode": mode, "phase": phase, "variant": variant,
            **extra, "median_ms": None, "ratio": None, "floor_ms": None, "peak_gib": None, "compile_s": None,
            "error": None}


def _skipped(scn: Scenario, mode: str, phase: str, variant: str, why: str) -> dict:
    rec = _record(scn, mode, phase, variant)
    rec["error"] = why
    return rec


def measure(variant: Variant, scn: Scenario, mode: str, phase: str, s: Settings, **extra) -> dict:
    """One JSONL record: the median of the timed steps, or the error that stopped it."""
    rec = _record(scn, mode, phase, variant.name, **extra)
    why = _graph_skip(mode, phase, s)
    if why is not None:
        rec.update(error=why, wall_s=0.0, fullgraph=None)
        return rec
    t0 = time.perf_counter()
    fullgraph: bool | None = True if mode not in ("eager", "graph-step") else None
    with _alarm(s.variant_timeout):
        try:
            retry = False
            try:
                _attempt(variant, scn, mode, phase, s, fullgraph, rec)
            except Exception as exc:
                retry = bool(fullgraph and getattr(exc, "first_step", False)
                             and not isinstance(exc, torch.cuda.OutOfMemoryError))
                if not retry:
                    raise
                rec["fullgraph_error"] = _short(exc)
                rec["fullgraph_attempt_s"] = round(time.perf_counter() - t0, 3)
            if retry:
                # outside the except block: its traceback holds the first model, which must be
                # freed before the second is built (it would count in the peak memory)
                fullgraph = False
                _free(s.device)
                _attempt(variant, scn, mode, phase, s, fullgraph, rec)
        except MeasurementTimeout as exc:
            rec["error"] = str(exc)
        except torch.cuda.OutOfMemoryError as exc:
            rec["error"] = "OOM: " + _short(exc)
        except Exception as exc:
            rec["error"] = _short(exc)
            rec["traceback_tail"] = traceback.format_exc(limit=-4)[-2000:]
    rec["fullgraph"] = fullgraph
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    if rec["error"] is not None:
        rec["median_ms"] = rec["times_ms"] = None
    _free(s.device)  # the model is gone once the attempt returned: its memory must not count in the next peak
    return rec


def gpu_warmup(seconds: float, device: torch.device) -> None:
    """Bring the GPU's clocks up: the first measurement in a cold process came out up to 40% slow."""
    if device.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)
    del a
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# --gpus N: data-parallel scaling (DDP, FSDP2) under torchrun
# ------------------------------------------------------------------------------------------
SCALING_MODES = ("ddp", "fsdp2")


def _scaling_step(prepared: Prepared, module: nn.Module, batch: dict, ctx, optimizer) -> Callable[[], None]:
    """One data-parallel train step as ``unipelt train`` takes it: forward and backward of this
    rank's batch, the gradient reduction (DDP: during backward; FSDP2's replicated adapter: one
    all-reduce after it), AdamW, zero_grad."""
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> None:
        module(**batch).loss.backward()
        ctx.reduce_gradients(trainable)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _scaling_measure(variant: Variant, scn: Scenario, mode: str, s: Settings, ctx, alone: bool) -> dict:
    """The median train step of ``variant`` on this rank: alone (``mode`` none: the one-GPU
    baseline, run by rank 0 while the others wait) or wrapped for ``mode`` on every rank."""
    from unipelt.training.distributed import DistContext, wrap

    rec = _record(scn, "eager", "train", variant.name, distributed=mode if not alone else "none",
                  gpus=1 if alone else ctx.world, per_gpu_batch=list(scn.train_shape))
    t0 = time.perf_counter()
    try:
        prepared = prepare(variant, scn, "train", s.device, s.dtype)
        here = DistContext() if alone else DistContext(mode=mode, rank=ctx.rank, world=ctx.world,
                                                       local_rank=ctx.local_rank, device=ctx.device)
        module = prepared.model if alone else wrap(here, prepared.model, prepared.keep)
        optimizer = torch.optim.AdamW(prepared.params, lr=LR)
        # every rank its own batch (seeded by rank): weak scaling, the global batch grows with the GPUs
        batch = make_batch(scn, "train", scn.config["vocab_size"], s.device, seed=1 + (0 if alone else ctx.rank))
        step = _scaling_step(prepared, module, batch, here, optimizer)
        time_steps(step, s.warmup, s.device)
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        times = time_steps(step, s.iters, s.device)
        rec.update(times_ms=[round(t, 4) for t in times], median_ms=round(statistics.median(times), 4),
                   trainable=prepared.trainable)
        if s.device.type == "cuda":
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 4)
        del module, optimizer, step, prepared
    except torch.cuda.OutOfMemoryError as exc:
        rec["error"] = "OOM: " + _short(exc)
    except Exception as exc:
        rec["error"] = _short(exc)
        rec["traceback_tail"] = traceback.format_exc(limit=-4)[-2000:]
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    _free(s.device)
    return rec


def _gather_ranks(ctx, rec: dict) -> list[dict]:
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, rec)
    return out


def run_scaling(args: argparse.Namespace, argv: Sequence[str]) -> list[dict]:
    """``--gpus N``: per (scenario, variant), the one-GPU train step (rank 0 alone) and the
    N-process step under each of ``--distributed-modes``; throughput per GPU against one GPU
    (``scaling_efficiency`` = one-GPU step time / N-GPU step time of the slowest rank, the same
    per-GPU batch) and every rank's peak memory. Rank 0 writes the JSONL."""
    from unipelt.training.distributed import launched_world, setup

    world = launched_world()
    if world != args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: start one process per GPU, e.g. torchrun --nproc-per-node "
                         f"{args.gpus} benchmarks/speed.py --gpus {args.gpus} ... (WORLD_SIZE is {world})")
    ctx = setup("ddp", args.device)  # the process group (NCCL on CUDA, gloo with --device cpu) and this rank's device
    try:
        if args.tiny and ctx.device.type == "cpu":
            torch.set_num_threads(1)
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
            args.dtype, torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
        settings = Settings(device=ctx.device, dtype=dtype, warmup=args.warmup, iters=args.iters,
                            backend=args.backend, variant_timeout=0.0, gpu_warmup_s=args.gpu_warmup_s)
        records: list[dict] = [dict(header(argv, settings, args), gpus=args.gpus,
                                    distributed_modes=list(args.distributed_modes))]
        records[0]["command"] = f"torchrun --nproc-per-node {args.gpus} benchmarks/speed.py " + shlex.join(argv)
        records[0]["plugins"] = ensure_plugins()
        if ctx.main:
            write_jsonl(args.out, records)
        scenarios = TINY if args.tiny else SCENARIOS
        gpu_warmup(settings.gpu_warmup_s, ctx.device)
        for scn_name in args.scenarios:
            scn = scenarios[scn_name]
            for vname in args.variants:
                variant = VARIANTS[vname]
                if variant.kind != "unipelt":
                    if ctx.main:
                        records.append(_skipped(scn, "eager", "train", vname, "--gpus measures unipelt variants"))
                    continue
                one = _scaling_measure(variant, scn, "none", settings, ctx, alone=True) if ctx.main else None
                ctx.barrier()
                if ctx.main:
                    records.append(one)
                    print(f"{scn_name} {vname} 1 GPU: {one['median_ms']} ms", flush=True)
                for mode in args.distributed_modes:
                    ranks = _gather_ranks(ctx, _scaling_measure(variant, scn, mode, settings, ctx, alone=False))
                    if not ctx.main:
                        continue
                    ok = [r for r in ranks if r["error"] is None]
                    rec = dict(ranks[0], ranks=[{k: r.get(k) for k in ("median_ms", "peak_gib", "error")}
                                                for r in ranks])
                    if len(ok) == len(ranks) and one["error"] is None:
                        slowest = max(r["median_ms"] for r in ranks)
                        b = scn.train_shape[0]
                        rec.update(slowest_median_ms=slowest,
                                   examples_per_s_per_gpu=round(b / (slowest / 1e3), 3),
                                   one_gpu_examples_per_s=round(b / (one["median_ms"] / 1e3), 3),
                                   scaling_efficiency=round(one["median_ms"] / slowest, 4),
                                   peak_gib_per_gpu=[r.get("peak_gib") for r in ranks])
                    else:
                        rec["error"] = rec["error"] or next((r["error"] for r in ranks if r["error"]), None) \
                            or "the one-GPU baseline failed"
                    records.append(rec)
                    print(f"{scn_name} {vname} {args.gpus} GPUs {mode}: slowest rank {rec.get('slowest_median_ms')} ms, "
                          f"efficiency {rec.get('scaling_efficiency')}, peak GiB {rec.get('peak_gib_per_gpu')}"
                          + (f" ERROR {rec['error']}" if rec["error"] else ""), flush=True)
                if ctx.main:
                    write_jsonl(args.out, records)
        if ctx.main:
            write_jsonl(args.out, records)
        return records
    finally:
        ctx.finish()


# ------------------------------------------------------------------------------------------
# records and the run
# ------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """The whole file, atomically: a run killed mid-write keeps the previous complete file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, allow_nan=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{i}: not a JSON line ({e.msg})") from None
    return out


def apply_floor(block: list[dict]) -> None:
    """Ratios of one (scenario, mode) block against the mean of its start and end floors per phase."""
    for phase in PHASES:
        floors = {r["floor_at"]: r["median_ms"] for r in block
                  if r["variant"] == "floor" and r["phase"] == phase and r["median_ms"]}
        if not floors:
            continue
        basis = "mean of start and end floor" if len(floors) == 2 else f"{next(iter(floors))} floor only"
        floor_ms = statistics.fmean(floors.values())
        for r in block:
            if r["phase"] != phase:
                continue
            r["floor_start_ms"] = floors.get("start")
            r["floor_end_ms"] = floors.get("end")
            r["floor_ms"] = round(floor_ms, 4)
            r["ratio_basis"] = basis
            r["ratio"] = round(r["median_ms"] / floor_ms, 4) if r["median_ms"] else None


def header(argv: Sequence[str], settings: Settings, args: argparse.Namespace) -> dict:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    dev = settings.device
    return {"kind": "header", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "device": str(dev), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": version("transformers"), "peft": version("peft"),
            "git_commit": commit, "command": "python benchmarks/speed.py " + shlex.join(argv),
            "dtype": str(settings.dtype).replace("torch.", ""), "warmup": settings.warmup, "iters": settings.iters,
            "backend": settings.backend, "variant_timeout_s": settings.variant_timeout,
            "budget_s": args.budget_s, "tiny": args.tiny, "prefix_attention": args.prefix_attention,
            "scenarios": {n: {"config": s.config, "train": s.train_shape, "infer": s.infer_shape}
                          for n, s in (TINY if args.tiny else SCENARIOS).items() if n in args.scenarios}}


def run(args: argparse.Namespace, argv: Sequence[str]) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny and device.type == "cpu":
        # tiny models on a shared CPU: one thread avoids OpenMP stalls of 100 ms that drown the step
        torch.set_num_threads(1)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = Settings(device=device, dtype=dtype,
                        warmup=args.warmup, iters=args.iters, backend=args.backend,
                        variant_timeout=args.variant_timeout, gpu_warmup_s=args.gpu_warmup_s,
                        adamw=args.adamw, split_optimizer=args.split_optimizer)
    import unipelt.attention

    unipelt.attention.SPLIT_PREFIX = args.prefix_attention
    records: list[dict] = [header(argv, settings, args)]
    out: Path = args.out
    write_jsonl(out, records)
    scenarios = TINY if args.tiny else SCENARIOS
    t_run = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_run:7.1f}s] {msg}", flush=True)

    def note(r: dict) -> None:
        if r["error"]:
            log(f"{r['scenario']} {r['mode']} {r['variant']} {r['phase']}: ERROR {r['error']}")
            return
        extra = f" compile {r['compile_s']:.1f}s" if r.get("compile_s") is not None else ""
        if r.get("fullgraph_error"):
            extra += " (fullgraph failed: fell back)"
        if r.get("graph_breaks"):
            extra += f" graph breaks {r['graph_breaks']}"
        peak = f" peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
        ratio = f" x{r['ratio']:.2f}" if r.get("ratio") else ""
        log(f"{r['scenario']} {r['mode']} {r['variant']} {r['phase']}: {r['median_ms']:.2f} ms{ratio}{peak}{extra}")

    log(f"device {device} ({records[0]['gpu'] or records[0]['cpu']}), torch {torch.__version__}; out {out}")
    # import what the variants use now, then freeze the heap: the gc.collect() after every
    # measurement (which must run, or a dead model's tensors count in the next peak) then walks
    # only the objects created since, not the whole of torch and transformers
    import transformers  # noqa: F401
    import unipelt.train  # noqa: F401
    records[0]["plugins"] = ensure_plugins()
    write_jsonl(out, records)
    log(f"unipelt {Path(unipelt.train.__file__).parent}, plugins from {records[0]['plugins']}")
    if any(VARIANTS[v].kind == "peft" for v in args.variants):
        try:
            import peft  # noqa: F401
        except ImportError:
            pass  # the PEFT variants will record the ImportError
    gc.collect()
    gc.freeze()
    try:
        gpu_warmup(settings.gpu_warmup_s, device)
        for scn_name in args.scenarios:
            for mode in args.modes:
                block: list[dict] = []

                def add(r: dict) -> dict:
                    block.append(r)
                    records.append(r)
                    apply_floor(block)
                    note(r)
                    write_jsonl(out, records)
                    return r

                scn = scenarios[scn_name]
                phases = args.phases
                floor_cost = sum(add(measure(FLOOR, scn, mode, phase, settings, floor_at="start"))["wall_s"]
                                 for phase in args.phases) if args.floors else 0.0
                for vname in args.variants:
                    for phase in args.phases:
                        elapsed = time.perf_counter() - t_run
                        if args.budget_s and elapsed + floor_cost > args.budget_s:
                            add(_skipped(scn, mode, phase, vname, f"skipped: --budget-s {args.budget_s:g} (at "
                                         f"{elapsed:.0f} s, the end floor needs ~{floor_cost:.0f} s)"))
                        else:
                            add(measure(VARIANTS[vname], scn, mode, phase, settings))
                for phase in args.phases if args.floors else ():
                    add(measure(FLOOR, scn, mode, phase, settings, floor_at="end"))
                for phase in args.phases if args.floors else ():
                    ms = " -> ".join(f"{r['median_ms']:.2f}" if r["median_ms"] else "error"
                                     for r in block if r["variant"] == "floor" and r["phase"] == phase)
                    log(f"{scn.name} {mode} floor {phase} start -> end: {ms} ms")
    finally:
        gc.unfreeze()
    log(f"done: {len(records) - 1} measurements in {out}")
    return records


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
# issue 8's targets: ratio to the floor of the same mode, the best mode per scenario counts
TARGETS: dict[str, dict[tuple[str, str], float]] = {
    "unipelt": {("llama", "train"): 1.15, ("bert", "train"): 1.30, ("llama", "infer"): 1.10, ("bert", "infer"): 1.25},
    "lora-r16-all": {("llama", "train"): 1.25, ("bert", "train"): 1.50, ("llama", "infer"): 1.15, ("bert", "infer"): 1.30},
    "lora-r8-qv": {("llama", "train"): 1.05, ("bert", "train"): 1.15, ("llama", "infer"): 1.05, ("bert", "infer"): 1.10},
}
# memory: (reference variant, factor): peak of the train step <= factor x the reference's, same mode
MEMORY_TARGETS: dict[str, tuple[str, float]] = {"unipelt": ("floor", 1.25), "lora-r16-all": ("peft-lora-r16-all", 1.0)}
COLUMNS = (("llama", "train"), ("bert", "train"), ("llama", "infer"), ("bert", "infer"))


@dataclass
class Run:
    """One run (one or more JSONL files): its headers and its measurements by key."""

    files: list[str]
    headers: list[dict] = field(default_factory=list)
    by_key: dict[tuple[str, str, str, str], dict] = field(default_factory=dict)  # scenario, mode, phase, variant
    floors: dict[tuple[str, str, str], list[dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, spec: str) -> "Run":
        run = cls(files=spec.split(","))
        for name in run.files:
            path = Path(name)
            if not path.is_file():
                raise SystemExit(f"--report: {path}: no such file")
            for r in read_jsonl(path):
                if r.get("kind") == "header":
                    run.headers.append(r)
                elif r.get("kind") == "measurement":
                    for k in ("scenario", "mode", "phase", "variant"):
                        if k not in r:
                            raise SystemExit(f"--report: {path}: a measurement without the field {k!r}")
                    if r["variant"] == "floor":
                        run.floors.setdefault((r["scenario"], r["mode"], r["phase"]), []).append(r)
                    else:
                        run.by_key[(r["scenario"], r["mode"], r["phase"], r["variant"])] = r
        return run

    def get(self, scenario: str, mode: str, phase: str, variant: str) -> dict | None:
        return self.by_key.get((scenario, mode, phase, variant))

    def floor_peak(self, scenario: str, mode: str, phase: str) -> float | None:
        peaks = [r["peak_gib"] for r in self.floors.get((scenario, mode, phase), []) if r.get("peak_gib")]
        return statistics.fmean(peaks) if peaks else None

    def modes(self) -> list[str]:
        seen = {k[1] for k in self.by_key} | {k[1] for k in self.floors}
        return [m for m in MODES if m in seen]

    def variants(self) -> list[str]:
        seen = {k[3] for k in self.by_key}
        return [v for v in VARIANTS if v in seen] + sorted(seen - set(VARIANTS))

    def best(self, scenario: str, phase: str, variant: str) -> dict | None:
        """The mode a user would get: the lowest median time among the modes measured."""
        cands = [r for m in MODES if (r := self.get(scenario, m, phase, variant)) and r.get("ratio")]
        return min(cands, key=lambda r: r["median_ms"]) if cands else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cell(rec: dict | None, what: str = "ratio") -> str:
    if rec is None:
        return "—"
    err = rec.get("error")
    if err:  # one word in the table; the Details table has the message
        if err.startswith("skipped"):
            return "skipped"
        if "time limit" in err:
            return "timeout"
        return "OOM" if err.startswith("OOM") else "error"
    return _fmt(rec.get(what))


def report(specs: Sequence[str]) -> str:
    runs = [Run.load(s) for s in specs]
    n = len(runs)
    join = " / ".join
    lines: list[str] = []
    lines.append(f"Speed, {'runs ' + ' / '.join(str(i + 1) for i in range(n)) if n > 1 else 'one run'}"
                 " (ratios to the frozen floor of the same mode and phase, measured in the same process).")
    lines.append("")
    for i, run in enumerate(runs, 1):
        for h in run.headers:
            lines.append(f"- run {i}: {h.get('date')}, {h.get('gpu') or h.get('device')}, torch {h.get('torch')}, "
                         f"transformers {h.get('transformers')}, peft {h.get('peft')}, {h.get('dtype')}"
                         f"{', TINY configs' if h.get('tiny') else ''}; `{h.get('command')}`")
    lines.append("")

    # targets --------------------------------------------------------------------------
    lines.append("### Targets (issue 8): the fastest mode measured for each cell (lowest median ms), its ratio to that mode's floor")
    lines.append("")
    lines.append("| variant | " + " | ".join(f"{s} {p}" for s, p in COLUMNS) + " | memory (train peak) |")
    lines.append("|---|" + "---|" * (len(COLUMNS) + 1))
    for vname, targets in TARGETS.items():
        cells = []
        for scn, phase in COLUMNS:
            limit = targets[(scn, phase)]
            parts = []
            for run in runs:
                r = run.best(scn, phase, vname)
                if r is None:
                    parts.append("—")
                else:
                    parts.append(f"{r['ratio']:.2f} {r['mode']} {'met' if r['ratio'] <= limit else 'missed'}")
            cells.append(f"{join(parts)} (≤ {limit:.2f})")
        mem = "—"
        if vname in MEMORY_TARGETS:
            ref, factor = MEMORY_TARGETS[vname]
            mparts = []
            for scn in ("llama", "bert"):
                parts = []
                for run in runs:
                    r = run.best(scn, "train", vname)
                    if r is None or r.get("peak_gib") is None:
                        parts.append("—")
                        continue
                    if ref == "floor":
                        refpk = run.floor_peak(scn, r["mode"], "train")
                    else:
                        rr = run.get(scn, r["mode"], "train", ref)
                        refpk = rr.get("peak_gib") if rr and not rr.get("error") else None
                    if not refpk:
                        parts.append(f"{r['peak_gib']:.2f} GiB (no {ref})")
                        continue
                    ok = r["peak_gib"] <= factor * refpk
                    parts.append(f"{r['peak_gib']:.2f} vs {refpk:.2f} GiB {'met' if ok else 'missed'}")
                mparts.append(f"{scn} {join(parts)}")
            limit_txt = f"≤ floor + {round((factor - 1) * 100)}%" if ref == "floor" else f"≤ {ref}"
            mem = "; ".join(mparts) + f" ({limit_txt})"
        lines.append(f"| {vname} | " + " | ".join(cells) + f" | {mem} |")
    lines.append("")

    # every mode ------------------------------------------------------------------------
    modes = [m for m in MODES if any(m in run.modes() for run in runs)]
    seen = {v for run in runs for v in run.variants()}
    variants = [v for v in VARIANTS if v in seen] + sorted(seen - set(VARIANTS))
    for mode in modes:
        lines.append(f"### {mode}: ratio to the floor (train peak GiB)")
        lines.append("")
        lines.append("| variant | " + " | ".join(f"{s} {p}" for s, p in COLUMNS) + " | llama train peak | bert train peak |")
        lines.append("|---|" + "---|" * (len(COLUMNS) + 2))
        fl = []
        for scn, phase in COLUMNS:
            parts = []
            for run in runs:
                fs = run.floors.get((scn, mode, phase), [])
                parts.append(" → ".join(_fmt(r.get("median_ms")) if not r.get("error") else "error" for r in fs) or "—")
            fl.append(join(parts) + " ms")
        fpk = [join(_fmt(run.floor_peak(scn, mode, "train")) for run in runs) for scn in ("llama", "bert")]
        lines.append("| floor (start → end) | " + " | ".join(fl) + f" | {fpk[0]} | {fpk[1]} |")
        for v in variants:
            if not any(run.get(scn, mode, phase, v) for run in runs for scn, phase in COLUMNS):
                continue
            cells = [join(_cell(run.get(scn, mode, phase, v)) for run in runs) for scn, phase in COLUMNS]
            pk = [join(_cell(run.get(scn, mode, "train", v), "peak_gib") for run in runs) for scn in ("llama", "bert")]
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {pk[0]} | {pk[1]} |")
        lines.append("")

    # details ---------------------------------------------------------------------------
    lines.append("### Details")
    lines.append("")
    lines.append("| run | scenario | mode | phase | variant | median ms | ratio | peak GiB | compile s | fullgraph | graph breaks | recompiles | error |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, run in enumerate(runs, 1):
        recs = [r for fs in run.floors.values() for r in fs] + list(run.by_key.values())
        order = {m: j for j, m in enumerate(MODES)}
        recs.sort(key=lambda r: (r["scenario"], order.get(r["mode"], 9), r["phase"], r["variant"] != "floor"))
        for r in recs:
            name = r["variant"] + (f" ({r['floor_at']})" if r.get("floor_at") else "")
            fg = "" if r.get("fullgraph") is None else ("yes" if r["fullgraph"] else "no: " + (r.get("fullgraph_error") or "")[:80])
            err = (r.get("error") or "").replace("|", "/")[:120]
            lines.append(f"| {i} | {r['scenario']} | {r['mode']} | {r['phase']} | {name} | {_fmt(r.get('median_ms'))} | "
                         f"{_fmt(r.get('ratio'))} | {_fmt(r.get('peak_gib'))} | {_fmt(r.get('compile_s'), 1)} | "
                         f"{fg.replace('|', '/')} | {r.get('graph_breaks', '')} | {r.get('recompiles', '')} | {err} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def _choices(value: str, allowed: Sequence[str], flag: str, aliases: dict[str, Sequence[str]] | None = None) -> list[str]:
    out: list[str] = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        expanded = (aliases or {}).get(item, [item])
        for x in expanded:
            if x not in allowed:
                raise argparse.ArgumentTypeError(f"{flag}: unknown {x!r}; expected one of {', '.join(allowed)}")
            if x not in out:
                out.append(x)
    if not out:
        raise argparse.ArgumentTypeError(f"{flag}: empty list")
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/speed.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="bert,llama",
                   type=lambda v: _choices(v, list(SCENARIOS), "--scenarios"))
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), type=lambda v: _choices(v, MODES, "--modes"),
                   help=f"comma-separated, of {', '.join(MODES)} (default: {', '.join(DEFAULT_MODES)}); the "
                        "graph-step modes capture each train step whole in one CUDA graph (GraphedTrainStep: "
                        "the model eager, or compiled in inductor's default mode), CUDA only")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   type=lambda v: _choices(v, list(VARIANTS), "--variants",
                                           {"all": list(VARIANTS), "default": DEFAULT_VARIANTS}),
                   help=f"comma-separated, 'default' or 'all'; known: {', '.join(VARIANTS)}")
    p.add_argument("--phases", default=",".join(PHASES), type=lambda v: _choices(v, PHASES, "--phases"),
                   help="train, infer or both (default); the floors are measured for the phases run")
    p.add_argument("--out", type=Path, help="JSONL file (default speed-<UTC time>.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--report", nargs="+", metavar="RUN",
                   help="print the markdown tables of 1 or 2 runs (each a JSONL file or a comma-separated list)")
    p.add_argument("--tiny", action="store_true", help="tiny configs, 2 warm-up / 3 timed iterations (CPU, seconds)")
    p.add_argument("--warmup", type=int, help="warm-up iterations, the first compiles (default 10; tiny 2)")
    p.add_argument("--iters", type=int, help="timed iterations (default 30; tiny 3)")
    p.add_argument("--variant-timeout", type=float, default=300.0,
                   help="seconds per measurement (one variant, one phase, compilation included); 0 = none")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting variants when the end floor would finish after this many seconds (0 = none)")
    p.add_argument("--gpu-warmup-s", type=float, default=5.0, help="seconds of GEMMs before the first measurement")
    p.add_argument("--no-floors", dest="floors", action="store_false",
                   help="measure no frozen floor (ratios stay empty): for comparisons between variants, "
                        "e.g. lora-r8-qv-mixed8 / lora-r8-qv, where the floors' compilations would cost the budget")
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default",
                   help="AdamW implementation for every row (default: PyTorch's choice, foreach on CUDA; "
                        "the graph-step modes: fused, capturable)")
    p.add_argument("--split-optimizer", action="store_true",
                   help="eager train rows also time forward+backward and AdamW step+zero_grad apart "
                        "(fwd_bwd_ms, optimizer_ms: as many steps again)")
    p.add_argument("--prefix-attention", choices=("never", "compiled", "always"), default="never",
                   help="how plain key/value prefixes join the real keys (unipelt.attention.SPLIT_PREFIX): "
                        "never = concatenated in front of them (the default); compiled = the softmax split, "
                        "no K/V concatenation, under torch.compile (measured slower on the H200, session 8)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA (the protocol), float32 on CPU")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager tests the compiled path on CPU)")
    p.add_argument("--gpus", type=int, help="data-parallel scaling on N GPUs (eager train steps, unipelt variants): "
                                            "start with torchrun --nproc-per-node N; see run_scaling")
    p.add_argument("--distributed-modes", default=",".join(SCALING_MODES),
                   type=lambda v: _choices(v, SCALING_MODES, "--distributed-modes"), help="with --gpus (default: both)")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 2:
        p.error("--gpus: at least 2 (one GPU is the ordinary run)")
    if args.report is not None:
        if not 1 <= len(args.report) <= 2:
            p.error("--report: give one or two runs (a run may be several files joined by commas)")
        return args
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 10)
    args.iters = args.iters if args.iters is not None else (3 if args.tiny else 30)
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be at least 1")
    if args.out is None:
        args.out = Path(f"speed-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}.jsonl")
    if args.out.exists() and not args.overwrite:
        p.error(f"--out: {args.out} exists; choose another file or pass --overwrite")
    if not args.out.parent.is_dir():
        p.error(f"--out: directory {args.out.parent} does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report is not None:
        sys.stdout.write(report(args.report))
        return 0
    if args.gpus is not None:
        records = run_scaling(args, argv)
        return 0 if all(r.get("error") is None for r in records[1:] if r.get("gpus")) else 1
    records = run(args, argv)
    # a floor skipped on purpose (a graph-step mode on CPU) is no failure
    return 0 if all(r.get("error") is None or r["error"].startswith("skipped")
                    for r in records[1:] if r.get("variant") == "floor") else 1


if __name__ == "__main__":
    sys.exit(main())
