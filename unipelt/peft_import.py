"""Coming in from Hugging Face PEFT: a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) read into a unipelt spec and adapter with the same outputs.

    handle = unipelt.load(model, "peft-dir")          # a PEFT directory is recognised by its config
    import_peft("peft-dir", "out/adapter", model="tiny-llama")   # unipelt import-peft DIR --out OUT

One translator per ``peft_type``: plugins go first through the hook ``unipelt_import_peft``
(first result wins; ``IA3`` is plugins/ia3.py's), then the built-in ones below:

- ``LORA``: each ``<module>.lora_A.weight`` / ``lora_B.weight`` pair becomes a ``lora`` branch at
  the hook point of that module (rank from the tensors, alpha from ``lora_alpha`` /
  ``alpha_pattern``, ``use_rslora``, ``lora_dropout``); on a fused projection split into hook
  points (GPT-2's ``c_attn``) every slice gets A and its rows of B, which sum to the same delta;
  ``modules_to_save`` on the task head becomes a ``train`` node at ``head``.
- ``PROMPT_TUNING``: ``prompt_embeddings`` (L, d) becomes a ``prompt`` node of length L (decoders:
  PEFT and unipelt both put the virtual tokens in front, at positions 0..L-1).
- ``PREFIX_TUNING`` (without a projection kept, i.e. as saved for inference): ``prompt_embeddings``
  (L, layers·2·H_kv·D) becomes a ``prefix`` node with ``reparam: none``: layer i's keys are block
  2i, its values block 2i+1 (PEFT's ``past_key_values`` layout). PEFT gives the real tokens the
  positions after the L cached ones (and adds L to a caller's ``position_ids``); unipelt's prefix
  takes no position, so the imported prefix gives PEFT's outputs when called with
  ``position_ids = L + arange(T)``, and otherwise the same prefix at the real tokens' own positions.
  Under a sliding window (transformers windows by cache slot, not position) PEFT given
  ``position_ids = arange(T) - L`` is unipelt at its own positions (tests/test_prefix_oracle.py).

Anything else (DoRA, a LoRA on an embedding, bias training, PiSSA/OLoRA weights saved without
conversion, an unknown type) is one :class:`AdapterFileError` naming the file and the field.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unipelt.errors import AdapterFileError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft_dir(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """The config and tensors of a PEFT adapter directory, each failure one AdapterFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    cfg_path, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise AdapterFileError(f"{d}: no such PEFT adapter directory")
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path}: missing (not a PEFT adapter directory)")
    try:
        from unipelt.spec import loads_json

        config = loads_json(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterFileError(f"{cfg_path}: corrupt JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_path}: not a JSON object")
    if not isinstance(config.get("peft_type"), str):
        raise AdapterFileError(f"{cfg_path}: field 'peft_type': missing or not a string")
    if not weights.is_file():
        other = " (only adapter_model.safetensors is read, not adapter_model.bin)" if (d / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{weights}: missing{other}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterFileError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterFileError(f"{weights}: tensor {k!r} has NaN or infinite values")
    return config, tensors


class ImportContext:
    """What a translator gets: the file names (for errors), the resolved model, and a map
    from module paths to the hook points that sit on them."""

    def __init__(self, path: Path, model: nn.Module, info):
        self.path = path
        self.config_file = path / CONFIG_FILE
        self.weights_file = path / WEIGHTS_FILE
        self.model = model
        self.info = info
        self._linear: dict[str, list] | None = None

    def linear_sites(self) -> dict[str, list]:
        """``module path -> [ResolvedSite, ...]`` of every linear hook point of the model (several
        for a fused projection split into slices)."""
        if self._linear is None:
            out: dict[str, list] = defaultdict(list)
            for site, target in self.info.arch.sites.items():
                if target.kind != "linear":
                    continue
                for layer in range(self.info.num_layers):
                    try:
                        rs = self.info.resolve(site, layer)
                    except Exception:  # noqa: BLE001 - a hook point this model lacks
                        continue
                    out[rs.path].append(rs)
            self._linear = dict(out)
        return self._linear

    def error(self, field: str, message: str, *, weights: bool = False) -> AdapterFileError:
        where = self.weights_file if weights else self.config_file
        return AdapterFileError(f"{where}: {'tensor' if weights else 'field'} {field!r}: {message}")


def translate(path: str | os.PathLike, model: nn.Module, *, registry=None) -> tuple[dict, dict[str, Tensor]]:
    """``(spec, tensors)`` of the PEFT adapter at ``path`` for ``model``: a unipelt spec (a dict)
    and its tensors under canonical keys, ready for ``compile`` + ``load_state_dict``."""
    from unipelt.registry import get_registry
    from unipelt.state import get_state
    from unipelt.arch import resolve_model

    registry = registry or get_registry()
    d = Path(path)
    config, tensors = read_peft_dir(d)
    state = get_state(model)
    info = state.info if state is not None else resolve_model(model, registry.architectures)
    ctx = ImportContext(d, model, info)
    peft_type = config["peft_type"]
    result = registry.hook.unipelt_import_peft(peft_type=peft_type, config=config, tensors=tensors, context=ctx)
    if result is None:
        fn = BUILTIN.get(peft_type)
        if fn is None:
            known = sorted(set(BUILTIN))
            raise ctx.error("peft_type", f"{peft_type!r} cannot be imported (known: {', '.join(known)}; a plugin "
                                         "adds more through unipelt_import_peft)")
        result = fn(config, tensors, ctx)
    spec, out = result
    spec = {"version": 1, **spec}
    return spec, out


def load_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, registry=None):
    """Attach the PEFT adapter at ``path`` to ``model`` as a unipelt adapter; returns the handle.
    The model is left as it was when anything does not fit."""
    from unipelt.compiler import compile as _compile
    from unipelt.errors import ModelError, SpecError

    d = Path(path)
    spec, tensors = translate(d, model, registry=registry)
    try:
        handle = _compile(model, spec, name or "default", registry=registry)
    except (SpecError, ModelError) as e:
        raise AdapterFileError(f"{d / CONFIG_FILE}: the PEFT adapter does not fit this model: {e}") from None
    try:
        handle.load_state_dict(tensors, source=str(d / WEIGHTS_FILE))
    except BaseException:
        handle.detach()
        raise
    return handle


def import_peft(path: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None) -> Path:
    """Convert the PEFT adapter at ``path`` into a unipelt adapter directory ``out``. ``model``
    names the base (default: the config's ``base_model_name_or_path``)."""
    from unipelt.io import check_output_path, is_adapter_dir
    from unipelt.models import load_model

    d = Path(path)
    dest = check_output_path(out, kind="dir", what="unipelt adapter directory", replaces=is_adapter_dir)
    config, tensors = read_peft_dir(d)
    name = model or config.get("base_model_name_or_path")
    if not name:
        raise AdapterFileError(f"{d / CONFIG_FILE}: field 'base_model_name_or_path': empty; name the base model "
                               "(--model)")
    task = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}.get(config.get("task_type") or "")
    labels = None
    if task == "classification":
        # the head's row count, when PEFT saved the head (modules_to_save)
        rows = [t.shape[0] for k, t in tensors.items() if k.endswith(".weight") and "lora_" not in k and t.dim() == 2]
        labels = rows[-1] if rows else None
    net, _tok = load_model(name, task=task, num_labels=labels)
    handle = load_peft(net, d)
    try:
        return handle.save(dest)
    finally:
        handle.detach()


# ------------------------------------------------------------------------------------------
# the built-in translators
# ------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, path: str, default):
    # PEFT matches each key as a regular expression against the module name: "(.*\.)?KEY$"
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _group_nodes(method: str, items: dict[tuple[int, str], dict], base_name: str) -> tuple[dict, dict[tuple[int, str], str]]:
    """Spec nodes for hook points with per-point options (``items[(layer, site)] = options``):
    one node when all agree and the layers are the same for every site, else one per
    (site, options). Returns the modules and each hook point's node name."""
    by_opts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for (layer, site), opts in sorted(items.items()):
        by_opts[json.dumps(opts, sort_keys=True)][site].append(layer)
    modules: dict[str, dict] = {}
    node_of: dict[tuple[int, str], str] = {}
    single = len(by_opts) == 1 and len({tuple(v) for v in next(iter(by_opts.values())).values()}) == 1
    for i, (key, sites) in enumerate(by_opts.items()):
        opts = json.loads(key)
        if single:
            layers = next(iter(sites.values()))
            modules[base_name] = {"method": method, "sites": list(sites), "layers": layers, **opts}
            for site in sites:
                for layer in layers:
                    node_of[(layer, site)] = base_name
            continue
        for site, layers in sites.items():
            name = f"{base_name}_{site.replace('.', '_')}_{i}"
            modules[name] = {"method": method, "site": site, "layers": layers, **opts}
            for layer in layers:
                node_of[(layer, site)] = name
    return modules, node_of


def head_module_path(config: dict, ctx: ImportContext) -> str | None:
    """The task head's module path when ``modules_to_save`` names it (None when it names nothing
    this model has); any other module there is refused: only the head is trained in full."""
    to_save = list(config.get("modules_to_save") or [])
    if not to_save:
        return None
    try:
        head_path = ctx.info.resolve("head", None).path
    except Exception:  # noqa: BLE001 - an architecture without a head hook point
        head_path = None
    names = [n for n, _ in ctx.model.named_modules()]
    for m in to_save:
        # PEFT skips names the model does not have (SEQ_CLS lists both "classifier" and "score")
        present = any(n == m or n.endswith(f".{m}") for n in names)
        if present and (head_path is None or not (head_path == m or head_path.endswith(f".{m}"))):
            raise ctx.error("modules_to_save", f"{m!r} is not the task head of this model ({head_path}); "
                                               "only the head can be trained in full")
        if present and _tied_to_input_embeddings(ctx.model, head_path):
            # PEFT's ModulesToSaveWrapper trains a copy: the input embeddings keep their values
            raise ctx.error("modules_to_save", f"{m!r} shares its weight with the input embeddings in this model "
                                               "(tied): PEFT trained a separate copy of it, unipelt's train at head "
                                               "trains the tied weight, which would change the input embeddings too")
    return head_path


def _tied_to_input_embeddings(model: nn.Module, head_path: str | None) -> bool:
    if head_path is None:
        return False
    try:
        head = model.get_submodule(head_path)
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    w = getattr(head, "weight", None)
    return w is not None and emb is not None and w is getattr(emb, "weight", None)


def add_head(modules: dict, out: dict[str, Tensor], head: dict[str, Tensor]) -> None:
    """The head's saved tensors as a ``train`` node at ``head`` (PEFT's ``modules_to_save``)."""
    if head:
        modules["head"] = {"method": "train", "site": "head"}
        for pname, t in head.items():
            out[f"head.head.{pname}"] = t


group_nodes = _group_nodes  # for the plugins' translators


# PEFT 0.21's LoraConfig fields that make another function of the same factors (activated LoRA,
# QA-LoRA's pooled input, BD-LoRA, Arrow routing, KaSA, MonteCLoRA, VeLoRA's state, replicated
# layers); use_dora is read by the DoRA plugin's translator
LORA_VARIANTS = ("alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
                 "monteclora_config", "velora_config", "layer_replication")


def _lora(config: dict, tensors: dict[str, Tensor], ctx: ImportContext) -> tuple[dict, dict[str, Tensor]]:
    if config.get("use_dora"):
        raise ctx.error("use_dora", "DoRA is not a plain LoRA (import it with a DoRA plugin)")
    if config.get("bias", "none") != "none":
        raise ctx.error("bias", f"{config.get('bias')!r}: bias training is not part of a unipelt LoRA node; "
                                "only bias: none is imported")
    if config.get("lora_bias"):
        raise ctx.error("lora_bias", "a bias on B (PEFT's lora_bias) is not part of a unipelt LoRA")
    for name in LORA_VARIANTS:
        if config.get(name) is not None and config.get(name) is not False:  # {} is a default sub-config: set
            raise ctx.error(name, f"{config.get(name)!r}: a PEFT LoRA variant whose function is not "
                                  "h = W0·x + s·B·A·x; unipelt has no method for it")
    init = config.get("init_lora_weights", True)
    # the initialisations that rewrite the base weight (EVA, orthogonal, MiCA, gaussian leave it)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise ctx.error("init_lora_weights", f"{init!r}: the adapter goes with a rewritten base weight; convert it to "
                                             "a plain LoRA when saving (PEFT's path_initial_model_for_weight_conversion)")
    if config.get("target_parameters"):
        raise ctx.error("target_parameters", "LoRA on bare parameters has no unipelt hook point")
    alpha0 = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    sites = ctx.linear_sites()
    pairs: dict[str, dict[str, Tensor]] = defaultdict(dict)
    head: dict[str, Tensor] = {}
    head_path = head_module_path(config, ctx)
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ctx.error(key, f"does not start with {PREFIX!r} (not a PEFT adapter file)", weights=True)
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if m:
            pairs[m.group(1)][m.group(2)] = t
            continue
        if "lora_embedding" in rest or "lora_magnitude" in rest:
            raise ctx.error(key, "a LoRA on an embedding or a DoRA magnitude is not a plain linear LoRA", weights=True)
        if head_path is not None and rest.startswith(head_path + "."):
            head[rest[len(head_path) + 1:]] = t
            continue
        raise ctx.error(key, "not a LoRA factor, and not under modules_to_save", weights=True)
    if not pairs:
        raise ctx.error("target_modules", "the file holds no LoRA factors (lora_A / lora_B)")
    items: dict[tuple[int, str], dict] = {}
    factors: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for path, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(p)).pop()
            raise ctx.error(f"{PREFIX}{path}.{missing}.weight", "missing (each LoRA needs A and B)", weights=True)
        A, B = p["lora_A"], p["lora_B"]
        targets = sites.get(path)
        if not targets:
            raise ctx.error(f"{PREFIX}{path}.lora_A.weight", f"module {path!r} is not a linear hook point of this "
                            f"{ctx.info.arch.name} model (target_modules: {config.get('target_modules')})", weights=True)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ctx.error(f"{PREFIX}{path}.lora_A.weight", f"shapes {tuple(A.shape)} and {tuple(B.shape)} are not "
                                                             "an (r, in) / (out, r) pair", weights=True)
        r = A.shape[0]
        full_out = max((t.out_slice[1] if t.out_slice else t.out_features) for t in targets)
        if A.shape[1] != targets[0].in_features or B.shape[0] != full_out:
            raise ctx.error(f"{PREFIX}{path}.lora_A.weight", f"shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                            f"{path} ({targets[0].in_features} -> {full_out})", weights=True)
        alpha = _pattern_value(config.get("alpha_pattern"), path, alpha0)
        for t in targets:
            o0, o1 = t.out_slice or (0, t.out_features)
            items[(t.layer, t.site)] = {"r": int(r), "alpha": alpha, "rslora": rslora, "dropout": dropout}
            factors[(t.layer, t.site)] = (A, B[o0:o1])
    modules, node_of = _group_nodes("lora", items, "lora")
    out: dict[str, Tensor] = {}
    for (layer, site), (A, B) in factors.items():
        key = f"{node_of[(layer, site)]}.{layer}.{site}"
        out[f"{key}.lora_A"] = A.contiguous()
        out[f"{key}.lora_B"] = B.contiguous()
    add_head(modules, out, head)
    return {"modules": modules}, out


def _prompt_tensor(config: dict, tensors: dict[str, Tensor], ctx: ImportContext) -> tuple[Tensor, dict[str, Tensor]]:
    """The prompt (or prefix) tensor, and the task head's tensors when ``modules_to_save`` saved it
    (PEFT does for SEQ_CLS; a prompt-learning model's keys are ``base_model.<module path>``)."""
    head_path = head_module_path(config, ctx)
    head_prefix = None if head_path is None else f"base_model.{head_path}."
    head = {k[len(head_prefix):]: t for k, t in tensors.items() if head_prefix and k.startswith(head_prefix)}
    rest = set(tensors) - {head_prefix + k for k in head} if head_prefix else set(tensors)
    if rest != {"prompt_embeddings"}:
        extra = sorted(rest - {"prompt_embeddings"}) or ["prompt_embeddings (missing)"]
        raise ctx.error(extra[0], "a prompt-learning adapter holds one tensor, prompt_embeddings (and the task head "
                                  "under modules_to_save)", weights=True)
    t = tensors["prompt_embeddings"]
    n = config.get("num_virtual_tokens")
    if t.dim() != 2 or (isinstance(n, int) and t.shape[0] != n * int(config.get("num_transformer_submodules") or 1)):
        raise ctx.error("prompt_embeddings", f"shape {tuple(t.shape)} does not hold num_virtual_tokens = {n} rows",
                        weights=True)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise ctx.error("num_transformer_submodules", "encoder-decoder prompts have no unipelt form")
    return t, head


def _prompt_tuning(config: dict, tensors: dict[str, Tensor], ctx: ImportContext) -> tuple[dict, dict[str, Tensor]]:
    t, head = _prompt_tensor(config, tensors, ctx)
    d = ctx.info.hidden_size
    if t.shape[1] != d:
        raise ctx.error("prompt_embeddings", f"width {t.shape[1]} is not the model's hidden size {d}", weights=True)
    if not ctx.info.causal:
        # unipelt puts an encoder's virtual tokens after [CLS] (the classifier pools [CLS]); PEFT puts
        # them before it: the same tensor would compute something else
        raise ctx.error("task_type", f"prompt tuning on an encoder ({ctx.info.arch.name}): PEFT places the virtual "
                                     "tokens before [CLS], unipelt after it; only decoders are imported")
    L = int(t.shape[0])
    modules, out = {"prompt": {"method": "prompt", "length": L}}, {"prompt.embed.embedding": t.contiguous()}
    add_head(modules, out, head)
    return {"modules": modules}, out


def _prefix_tuning(config: dict, tensors: dict[str, Tensor], ctx: ImportContext) -> tuple[dict, dict[str, Tensor]]:
    if config.get("prefix_projection") and not config.get("inference_mode", True):
        raise ctx.error("prefix_projection", "a prefix saved with its training projection; save it for inference")
    t, head = _prompt_tensor(config, tensors, ctx)
    layers = ctx.info.num_layers
    cfg = ctx.info.config
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    heads = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or ctx.info.hidden_size // n_heads)
    width = layers * 2 * heads * head_dim
    if t.shape[1] != width:
        raise ctx.error("prompt_embeddings", f"width {t.shape[1]} is not layers·2·kv_heads·head_dim = {layers}·2·{heads}·"
                                             f"{head_dim} = {width} of this model", weights=True)
    L = int(t.shape[0])
    # PEFT: view(L, layers·2, H, D).permute(...) -> block 2i: layer i's keys, 2i+1: its values
    blocks = t.view(L, layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # (layers·2, H, L, D)
    out = {f"prefix.{i}.attn.kv.prefix_kv": blocks[2 * i:2 * i + 2].contiguous() for i in range(layers)}
    modules = {"prefix": {"method": "prefix", "length": L, "reparam": "none"}}
    add_head(modules, out, head)
    return {"modules": modules}, out


BUILTIN: dict[str, Any] = {"LORA": _lora, "PROMPT_TUNING": _prompt_tuning, "PREFIX_TUNING": _prefix_tuning}

__all__ = ["BUILTIN", "ImportContext", "add_head", "group_nodes", "head_module_path", "import_peft", "is_peft_dir", "load_peft", "read_peft_dir", "translate"]
