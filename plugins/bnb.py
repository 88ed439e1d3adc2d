"""Quantized frozen bases through bitsandbytes: 4-bit NF4/FP4 (QLoRA) and 8-bit (LLM.int8()).

Written as a third-party plugin would be (an entry point in the ``unipelt`` group, nothing in
the core names bitsandbytes): ``unipelt_wrap_leaf`` is ``tryfirst`` and takes bitsandbytes'
``Linear4bit`` and ``Linear8bitLt`` (both subclasses of ``nn.Linear``, so the plain wrapper
would otherwise take them and merge into packed storage). The leaf it returns is the core's
:class:`unipelt.runtime.LeafWrapper` with a weight backend that dequantizes: branches read the
layer's input and output exactly as on a float base, merge swaps in a dequantized float copy
(unmerge restores the quantized module bit-exactly), and exporters read ``dense_weight()``.

Besides the hook, three helpers for users and the CLI:
  :func:`quantize_model` converts a float model's linears in place (tests, tiny models, a model
  already in memory); :func:`bnb_config` is the ``BitsAndBytesConfig`` for ``from_pretrained``;
  :func:`prepare_model` does what PEFT's ``prepare_model_for_kbit_training`` leaves to the user
  (float32 norms and head on an fp16 base, input gradients for reentrant gradient checkpointing).

The optional fast path (:func:`set_dequant_backend` ``"triton"``) computes a 4-bit leaf (NF4 or
FP4) as one dequantization by :mod:`unipelt_kernels.nf4`, then one GEMM, inside the torch custom
op ``unipelt_kernels::nf4_linear``: ``torch.compile`` captures it with ``fullgraph=True`` (and
CUDA graphs), and its backward dequantizes again instead of keeping the float weight (QLoRA's
memory promise). bitsandbytes' own path compiles too (bitsandbytes 0.50 registers its
dequantization as torch.library ops).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from unipelt.hookspecs import hookimpl
from unipelt.runtime import LeafWrapper

QUANT_KINDS = ("nf4", "fp4", "int8")
Quant = Literal["nf4", "fp4", "int8"]
# modules left in float by quantize_model (as transformers' bitsandbytes integration leaves the
# LM head, and a classifier head is trained or read at full precision)
DEFAULT_SKIP = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler")


def _bnb():
    import bitsandbytes as bnb  # imported on use: the plugin loads without bitsandbytes installed

    return bnb


def _loaded_bnb():
    # a model can hold bitsandbytes layers only once bitsandbytes was imported: checking
    # sys.modules keeps the plain-float path from importing it (a second or two, and a log line)
    return sys.modules.get("bitsandbytes")


def is_4bit(module: nn.Module) -> bool:
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module: nn.Module) -> bool:
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_4bit(m) or is_8bit(m) for m in model.modules())


# ------------------------------------------------------------------------------------------
# the weight backends
# ------------------------------------------------------------------------------------------
class Linear4bitLeaf(LeafWrapper):
    """A wrapped bitsandbytes ``Linear4bit`` (NF4 or FP4, with or without double quantization)."""

    quantized = True

    # While merged, ``base_layer`` is the dequantized float copy (LeafWrapper.merge_delta) and the
    # packed layer waits in ``_merged_backup``: the plain leaf's reading applies then.

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.merged_dequantized:
            return self.base_layer.weight.dtype
        cd = getattr(self.base_layer, "compute_dtype", None)
        return cd if isinstance(cd, torch.dtype) else torch.float32

    @property
    def quant_type(self) -> str:
        layer = self._merged_backup if self.merged_dequantized else self.base_layer
        return layer.weight.quant_state.quant_type

    def dense_weight(self) -> Tensor:
        if self.merged_dequantized:
            return LeafWrapper.dense_weight(self)
        w = self.base_layer.weight
        return _bnb().functional.dequantize_4bit(w.data, w.quant_state).to(self.compute_dtype)

    def base_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if _BACKEND.name == "triton" and not args and not kwargs and not self.merged_dequantized:
            return _triton_linear(x, self.base_layer)
        return self.base_layer(x, *args, **kwargs)


class Linear8bitLeaf(LeafWrapper):
    """A wrapped bitsandbytes ``Linear8bitLt`` (row-wise absmax int8 weights, ``has_fp16_weights=False``)."""

    quantized = True

    @property
    def compute_dtype(self) -> torch.dtype:
        b = self.bias
        return b.dtype if b is not None and b.is_floating_point() else torch.float16 if self.weight.is_cuda else torch.float32

    def dense_weight(self) -> Tensor:
        if self.merged_dequantized:
            return LeafWrapper.dense_weight(self)
        layer = self.base_layer
        w = layer.weight
        if w.dtype != torch.int8:  # has_fp16_weights=True: the weight is still float
            return w.detach().to(self.compute_dtype)
        # the row scales move from the parameter to the layer's state on the first forward
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        return (w.data.float() * (scb.float().unsqueeze(1) / 127.0)).to(self.compute_dtype)


def _no_cpu_repack(module: nn.Module) -> None:
    """bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place on its first eval-mode,
    no-grad forward on an AVX512-bf16 CPU (another layout, bf16 absmax), and back on every
    ``state_dict()``; the round trip breaks the layer ("shape '[32, 0]' is invalid"), and
    ``dequantize_4bit`` cannot read the packed layout. Layers unipelt wraps stay unpacked
    (a layer packed already is unpacked first)."""
    if not is_4bit(module):
        return
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state)
    module.support_avx512bf16_for_cpu = False


@hookimpl(tryfirst=True)
def unipelt_wrap_leaf(module: nn.Module, site):
    if isinstance(module, LeafWrapper):
        return None  # already wrapped by an earlier adapter
    if is_4bit(module):
        if getattr(module.weight, "quant_state", None) is None:
            raise _unquantized_error(site)
        _no_cpu_repack(module)
        return Linear4bitLeaf(module, host=None)
    if is_8bit(module):
        return Linear8bitLeaf(module, host=None)
    return None


def _unquantized_error(site):
    from unipelt.errors import ModelError

    # bitsandbytes quantizes a Linear4bit only on an explicit .to(device): before that its
    # weight is float storage that forward would quantize on the fly, on the first call only
    return ModelError(f"{site.path}: this bitsandbytes Linear4bit is not quantized yet (its weight has no "
                      "quant_state); move the model with .to(device) first, or use unipelt_plugins.bnb.quantize_model")


# ------------------------------------------------------------------------------------------
# the Triton fast path: one dequantization, one GEMM, as a torch custom op
# ------------------------------------------------------------------------------------------
@dataclass
class _Backend:
    name: Literal["bnb", "triton"] = "bnb"


_BACKEND = _Backend()


def set_dequant_backend(name: Literal["bnb", "triton"]) -> None:
    """``bnb``: bitsandbytes' own ``Linear4bit.forward``; ``triton``: 4-bit leaves compute through
    the ``unipelt_kernels::nf4_linear`` op (:mod:`unipelt_kernels.nf4`: the Triton kernel on CUDA
    and under the interpreter, its PyTorch reference elsewhere), which ``torch.compile`` traces
    with ``fullgraph=True``."""
    if name not in ("bnb", "triton"):
        raise ValueError(f"dequantization backend {name!r}: expected 'bnb' or 'triton'")
    _BACKEND.name = name


def _triton_linear(x: Tensor, layer: nn.Module) -> Tensor:
    """What bitsandbytes' ``Linear4bit.forward`` computes (input cast to the compute dtype, output
    back to the input's), through the custom op: its backward dequantizes again instead of keeping
    the float weight."""
    from unipelt_kernels.nf4 import nf4_linear

    cd = getattr(layer, "compute_dtype", None)
    dtype = cd if isinstance(cd, torch.dtype) else x.dtype
    bias = layer.bias.to(dtype) if layer.bias is not None else None
    w = layer.weight  # the Params4bit itself: its .data recurses in its __torch_function__ under dynamo
    return nf4_linear(x.to(dtype), w, w.quant_state, bias).to(x.dtype)


# ------------------------------------------------------------------------------------------
# converting and preparing models
# ------------------------------------------------------------------------------------------
def bnb_config(quant: Quant, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True):
    """The ``transformers.BitsAndBytesConfig`` for ``from_pretrained(..., quantization_config=)``."""
    from transformers import BitsAndBytesConfig

    _check_quant(quant)
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def _check_quant(quant: str) -> None:
    if quant not in QUANT_KINDS:
        from unipelt.errors import ModelError

        raise ModelError(f"quantize={quant!r}: expected one of {', '.join(QUANT_KINDS)}")


def quantize_model(model: nn.Module, quant: Quant = "nf4", *, compute_dtype: torch.dtype | None = None,
                   double_quant: bool = False, skip: tuple[str, ...] = DEFAULT_SKIP,
                   device: torch.device | str | None = None) -> nn.Module:
    """Replace the model's ``nn.Linear`` (and GPT-2 ``Conv1D``) layers by bitsandbytes ones in
    place, leaving modules whose path contains a ``skip`` name in float; returns the model.

    compute_dtype (4-bit): what the layers compute in (default: the weight's dtype). The
    layers are quantized by moving them to ``device`` (default: where the weights are).
    """
    _check_quant(quant)
    bnb = _bnb()
    targets = []
    for path, mod in model.named_modules():
        if any(part in skip for part in path.split(".")):
            continue
        conv1d = type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")
        if (type(mod) is nn.Linear or conv1d) and path:
            targets.append((path, mod, conv1d))
    for path, mod, conv1d in targets:
        w = mod.weight.detach()
        w = w.T.contiguous() if conv1d else w  # Conv1D keeps (in, out)
        out_f, in_f = w.shape
        dev = device if device is not None else w.device
        bias = mod.bias is not None
        if quant == "int8":
            new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=0.0)
            new.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            cd = compute_dtype or w.dtype
            new = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=cd, quant_type=quant,
                                    compress_statistics=double_quant)
            new.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant,
                                           compress_statistics=double_quant)
        if bias:
            new.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        new = new.to(dev).train(mod.training)  # .to quantizes; the mode is the replaced layer's
        _no_cpu_repack(new)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, new)
    return model


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, _NORM_TYPES) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm"))


@dataclass
class Prepared:
    """What :func:`prepare_model` did, for the report."""

    upcast: list[str]
    input_grads: bool


def prepare_model(model: nn.Module, *, gradient_checkpointing: bool = False) -> Prepared:
    """What PEFT's ``prepare_model_for_kbit_training`` leaves to its user, for a quantized base:

    - on an fp16 base, the float parameters (norms, embeddings, head) go to float32, as QLoRA
      trains: fp16 norms overflow and an fp16 head rounds the loss (bf16 and fp32 bases keep
      their dtype: the norms already compute in float32 inside, and an upcast would double the
      activations' memory for nothing);
    - with gradient checkpointing, the input embeddings' output requires grad, so a reentrant
      checkpoint of a block whose every weight is frozen still carries the adapters' gradients.
    """
    upcast = []
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if floats and any(p.dtype == torch.float16 for p in floats):
        for name, p in model.named_parameters():
            if p.dtype == torch.float16:
                p.data = p.data.float()
                upcast.append(name)
    grads = False
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        grads = True
    return Prepared(upcast=upcast, input_grads=grads)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every bitsandbytes layer by a plain ``nn.Linear`` holding its dequantized weight
    in ``dtype`` (the weights the quantized model computes with, not the original ones); returns
    the paths. For writing a merged 16-bit model from a quantized run."""
    done = []
    for path, mod in list(model.named_modules()):
        if not (is_4bit(mod) or is_8bit(mod)):
            continue
        leaf = Linear4bitLeaf(mod, host=None) if is_4bit(mod) else Linear8bitLeaf(mod, host=None)
        if is_4bit(mod):
            _no_cpu_repack(mod)
        w = leaf.dense_weight().to(dtype)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.to(dtype))
        lin.train(mod.training)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, lin)
        done.append(path)
    for p in model.parameters():  # norms and embeddings too: one dtype in the written model
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if hasattr(model, "config"):
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, key):
                try:
                    delattr(model.config, key)
                except AttributeError:
                    pass
        model.is_quantized = False
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return done
