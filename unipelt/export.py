"""Leaving unipelt: an adapter exported in Hugging Face PEFT's LoRA (or IA3) format, or merged
into a standalone model directory.

    export_peft("runs/lora/adapter", "runs/lora/peft")                   # model from the training record
    export_peft("adapter", "peft", model="tiny-llama")                   # or named
    merge_adapter("runs/lora/adapter", "tiny-llama", "runs/lora/merged")  # save_pretrained + tokenizer

**DoRA** adapters (every linear node ``dora``) are written as PEFT's LoRA with ``use_dora``: the
same A, B and alpha, and each module's ``lora_magnitude_vector`` (on GPT-2's fused c_attn: each
slice's rows, ‖W0_i‖ on the rows of an unadapted slice). PEFT always detaches the norm, so a
``detach_norm: false`` adapter computes the same outputs there but not the same gradients.

**PEFT export.** PEFT's LoRA format says, per target module, h = W0·x + (lora_alpha/r)·B·A·x
(``lora_alpha/sqrt(r)`` with ``use_rslora``). A unipelt adapter translates exactly when every
node is an ungated ``lora`` at linear hook points, or a ``train`` node at ``head`` (written as
``modules_to_save``). The writer needs the model to know the module paths, so it loads the base
model (the name recorded at train time, or ``model=``) and attaches the adapter. Per module:

- one LoRA branch on a whole projection: A and B as they are; ``lora_alpha`` = unipelt's alpha
  (``use_rslora`` when every node is rsLoRA), so PEFT computes the same scale the same way;
- several branches on one module (GPT-2's fused ``c_attn``, whose q/k/v slices are separate
  hook points, or two lora nodes at one site): one LoRA of the summed rank, A stacked and B
  block-placed into the output rows of each slice, each branch's scale folded into its B
  (and ``lora_alpha`` = r, scale 1). Equal outputs up to float rounding;
- modules with another rank or alpha than the most common go to ``rank_pattern`` /
  ``alpha_pattern``; ``target_modules`` lists full module paths, so layer subsets are exact.

An adapter whose nodes are all ``ia3`` (plus, optionally, ``train`` at ``head``) is written in
PEFT's IA3 format instead: per module ``ia3_l`` shaped (d_out, 1) for an output-side vector (PEFT
rescales the bias with it too, as unipelt does) or (1, d_in) for an input-side one, those modules
listed in ``feedforward_modules``; GPT-2's k and v slices share one c_attn vector, 1 on the q rows.
Imported back (plugins/ia3.py's translator) the tensors are the same.

An adapter of one ``prompt`` node on a decoder is written as PEFT's prompt tuning
(``prompt_embeddings``, L × d): both put the virtual tokens first, at positions 0..L-1. On an
encoder (unipelt: after [CLS], PEFT: before it) or a decoder classifier (PEFT pools the last
position, padding on padded rows) it is refused. A prefix is refused: PEFT's prefix moves the
real tokens' positions to L.., unipelt's does not, so the same tensor computes another function.

Anything else (gates, adapters, prefixes, BitFit, LayerNorm tuning, averaged combination, LoRA
and IA3 in one adapter) is refused with a message naming the module: PEFT's LoRA format cannot
express it.

**Merge.** ``handle.merge()`` folds every ungated LoRA into its weight; parameters trained in
place (the head, biases, norms) already are the model's. The merged base state dict is copied,
the adapter detached, and the copy loaded back, so the result is a plain transformers model
saved with ``save_pretrained`` (and the tokenizer). Gated branches, adapters and prefixes have no
weight form: merge refuses, naming the module and the reason.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch

from unipelt.errors import UnipeltError
from unipelt.io import atomic_output, check_output_path

PEFT_DIR = "PEFT adapter directory"
MODEL_DIR = "model directory"


def _is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


class ExportError(UnipeltError):
    """An adapter that the requested format cannot express; names the module and why."""


def _peft_type(spec) -> str:
    """``IA3`` when the adapter's nodes (besides a head trained in full) are all ``ia3``,
    ``PROMPT_TUNING`` for one ``prompt`` node alone, else ``LORA`` (whose checks then name what
    does not fit)."""
    methods = [n.method for n in spec.modules.values() if not (n.method == "train" and list(n.sites) == ["head"])]
    if set(methods) == {"ia3"}:
        return "IA3"
    if methods == ["prompt"] and len(spec.modules) == 1:
        return "PROMPT_TUNING"
    return "LORA"


def _uses_dora(spec) -> bool:
    return any(n.method == "dora" for n in spec.modules.values())


def _node_problems(spec, handle=None) -> list[str]:
    """Why each node cannot be written as PEFT LoRA (DoRA), or PEFT IA3 (empty when all can)."""
    problems = []
    ia3 = _peft_type(spec) == "IA3"
    dora = _uses_dora(spec)
    if _peft_type(spec) == "PROMPT_TUNING":
        return []
    for name, node in spec.modules.items():
        gate = spec.gate_for(node)
        if ia3 and node.method == "ia3":
            if gate is not None:  # pragma: no cover - ia3 is not gateable (MethodDef.gateable)
                problems.append(f"module {name!r} (ia3) is gated: PEFT's IA3 has no gates")
        elif node.method == "dora":
            continue  # not gateable (MethodDef.gateable); PEFT's use_dora
        elif node.method == "lora" and dora:
            problems.append(f"module {name!r} (lora) is in an adapter with dora modules: PEFT's use_dora is one "
                            "flag for the whole adapter")
        elif node.method == "lora":
            # a collapsed adapter's gates may be constants (checked per branch once loaded:
            # _gate_factor); an uncollapsed gate is refused here, before any model is loaded
            if gate is not None and not spec.collapsed:
                problems.append(f"module {name!r} (lora) is gated: PEFT's LoRA has no gates "
                                "(its delta is scaled by an input-dependent gate; `unipelt collapse` folds gates "
                                "that hardly vary into constants, which export)")
        elif node.method == "train" and list(node.sites) == ["head"]:
            continue
        elif node.method == "prefix":
            problems.append(f"module {name!r} (prefix): PEFT's prefix tuning moves the real tokens to positions "
                            "L.. (its prefix sits in the KV cache) and unipelt's prefix does not, so the same tensor "
                            "would compute another function there")
        else:
            problems.append(f"module {name!r} (method {node.method} at {', '.join(node.sites)}) has no PEFT LoRA form; "
                            "only ungated lora (or only dora, or only ia3) at linear hook points and train at head "
                            "can be exported")
    return problems


def export_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None,
                base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_dir`` as a PEFT LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) into ``out_dir``; loadable with ``PeftModel.from_pretrained``.
    ``model`` names the base (default: the one recorded at train time). See the module docstring."""
    from unipelt.io import read_adapter_meta
    from unipelt.spec import parse_spec
    from unipelt.train import load_adapted, training_info

    # the output first: a path that cannot take the result is refused before any model is loaded
    check_output_path(out_dir, kind="dir", what=PEFT_DIR, replaces=_is_peft_dir)
    meta = read_adapter_meta(adapter_dir)
    spec = parse_spec(meta["spec"])
    problems = _node_problems(spec)
    if problems:
        raise ExportError(f"{adapter_dir}: cannot export to PEFT: " + "; ".join(problems))
    info = training_info(adapter_dir)
    net, _tok, handle, resolved = load_adapted(adapter_dir, model, device="cpu")
    other = {"PROMPT_TUNING": _prompt_export, "IA3": _ia3_export}.get(_peft_type(spec))
    if other is not None:
        try:
            tensors, config, provenance = other(adapter_dir, net, handle, resolved, info, meta, base_model_name_or_path)
        finally:
            handle.detach()
        return _write_peft(out_dir, tensors, config, provenance)
    # a PiSSA / OLoRA branch saved mid-training becomes the plain rank-2r LoRA it equals
    handle.drop_reparameterization()
    try:
        branches_by_path: dict[str, list] = defaultdict(list)
        head_paths: list[str] = []
        pruned = set(handle.spec.pruned)
        for bp in handle.graph.branches:
            if bp.node.method == "train":
                head_paths.append(bp.site.path)
                continue
            if bp.key in pruned:
                continue  # switched off for good by gate pruning or collapse: not computed, not exported
            if bp.site.kind != "linear":  # pragma: no cover - lora only attaches to linear sites
                raise ExportError(f"{adapter_dir}: module {bp.node.name!r} at {bp.site.key} is not on a linear layer")
            mode = handle.graph.combine.get(bp.site.key, "parallel")
            branches_by_path[bp.site.path].append((bp, handle.branch_modules[bp.key], mode))
        transposed = set()
        for path, items in branches_by_path.items():
            # averaged combination divides by the number of branches at the site: foldable, but
            # only when every branch there is in this adapter; keep it simple and refuse it.
            for bp, _, mode in items:
                if mode == "average" and sum(1 for b, _, _ in items if b.site.key == bp.site.key) > 1:
                    raise ExportError(f"{adapter_dir}: module {bp.node.name!r} at {bp.site.key} is averaged with "
                                      "other branches (combine: average): PEFT sums LoRA deltas")
            base = getattr(net.get_submodule(path), "base_layer", None)
            if base is not None and type(base).__name__ == "Conv1D":
                transposed.add(path)
        if transposed and len(transposed) != len(branches_by_path):  # pragma: no cover - no such model known
            raise ExportError(f"{adapter_dir}: mixes Conv1D and Linear targets; PEFT's fan_in_fan_out is global")

        all_rslora = all(b.node.config.rslora for items in branches_by_path.values() for b, _, _ in items)
        dora = _uses_dora(spec)
        tensors: dict[str, torch.Tensor] = {}
        per_path: dict[str, tuple[int, float]] = {}
        dropouts = set()
        for path, items in branches_by_path.items():
            key = f"base_model.model.{path}"
            for bp, _, _ in items:
                dropouts.add(float(bp.node.config.dropout))
            factors = [_gate_factor(adapter_dir, bp, handle.entries[bp.key], mod) for bp, mod, _ in items]
            if len(items) == 1 and items[0][0].site.out_slice is None and handle.entries[items[0][0].key].gate is None:
                bp, mod, _ = items[0]
                cfg = bp.node.config
                alpha = cfg.alpha if cfg.alpha is not None else 2.0 * cfg.r
                if cfg.rslora and not all_rslora:
                    alpha = mod.scale * cfg.r  # no use_rslora: alpha/r must equal the rsLoRA scale
                A, B = mod.lora_A.detach(), mod.lora_B.detach()
                per_path[path] = (cfg.r, float(alpha))
                if dora:
                    tensors[f"{key}.lora_magnitude_vector"] = mod.magnitude.detach().to("cpu").contiguous().clone()
            else:
                # stacked: A = [A_1; A_2; ...], B's columns of branch i hold s_i·B_i in its slice's rows
                module = net.get_submodule(path)
                base = getattr(module, "base_layer", module)
                out_full = int(base.nf) if path in transposed else int(base.out_features)
                # a gated PiSSA / OLoRA keeps its residual's correction -s·B0·A0 (ungated: not
                # under the collapsed constant), written as r more columns: [c·B, -s·B0]·[A; A0]
                A = torch.cat([t.detach() for _, mod, _ in items
                               for t in ((mod.lora_A,) if getattr(mod, "base_A", None) is None
                                         else (mod.lora_A, mod.base_A.to(mod.lora_A.dtype)))], 0)
                rank = A.shape[0]
                B = torch.zeros(out_full, rank, dtype=A.dtype)
                col = 0
                for (bp, mod, _), factor in zip(items, factors):
                    o0, o1 = bp.site.out_slice or (0, out_full)
                    B[o0:o1, col:col + mod.r] = mod.lora_B.detach() * factor
                    col += mod.r
                    if getattr(mod, "base_A", None) is not None:
                        B[o0:o1, col:col + mod.r] = mod.base_B.detach().to(B.dtype) * (-float(mod.scale))
                        col += mod.r
                # scale 1: lora_alpha = r, or sqrt(r) under use_rslora
                per_path[path] = (rank, float(rank ** 0.5 if all_rslora else rank))
                if dora:
                    tensors[f"{key}.lora_magnitude_vector"] = _dora_magnitude(adapter_dir, path, base, items, out_full,
                                                                              path in transposed)
            tensors[f"{key}.lora_A.weight"] = A.to("cpu").contiguous().clone()
            tensors[f"{key}.lora_B.weight"] = B.to("cpu").contiguous().clone()
        if not branches_by_path:
            raise ExportError(f"{adapter_dir}: no LoRA module to export")
        task = resolved.get("task")
        modules_to_save, head = _head_tensors(net, handle, head_paths, task, source=adapter_dir)
        tensors.update(head)

        common_r, common_alpha = Counter(per_path.values()).most_common(1)[0][0]
        rank_pattern = {_pattern(p): r for p, (r, a) in per_path.items() if r != common_r}
        alpha_pattern = {_pattern(p): a for p, (r, a) in per_path.items() if a != common_alpha}
        task_type = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS" if task == "classification" else None
        base_name = base_model_name_or_path or resolved.get("model") or info.get("model")
        config = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_name,
            "r": int(common_r),
            "lora_alpha": _num(common_alpha),
            "use_rslora": bool(all_rslora),
            "target_modules": sorted(per_path),
            "rank_pattern": rank_pattern,
            "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
            "lora_dropout": max(dropouts) if dropouts else 0.0,
            "fan_in_fan_out": bool(transposed),
            "bias": "none",
            "modules_to_save": modules_to_save or None,
            "init_lora_weights": True,
            "inference_mode": True,
            "use_dora": dora,
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
        }
        provenance = {"exported_from": str(Path(adapter_dir).resolve()), "base_model": base_name,
                      "task": task, "labels": resolved.get("labels"), "spec": meta.get("spec")}
    finally:
        handle.detach()
    return _write_peft(out_dir, tensors, config, provenance)


def _gate_factor(adapter_dir, bp, entry, mod) -> float:
    """What multiplies B·A in the branch's delta: its scale alone, or, under a gate that collapse
    replaced by its constant value c, c (the gate replacing alpha/r, the reference's rule) or
    c·alpha/r (``lora_scale: multiply``). A gate that still depends on the input has no PEFT form."""
    from unipelt.pruning import ConstantGate

    gate = entry.gate
    if gate is None:
        return float(mod.scale)
    if not isinstance(gate, ConstantGate) or gate.value.numel() != 1:
        raise ExportError(f"{adapter_dir}: cannot export to PEFT: module {bp.node.name!r} (lora) at "
                          f"{bp.site.key} is gated and its gate was not collapsed to a constant (it depends on "
                          "the input); PEFT's LoRA has no gates")
    c = float(gate.value.reshape(()))
    return c if mod.gate_scale == "replace" else c * float(mod.scale)


def _dora_magnitude(adapter_dir, path: str, base, items, out_full: int, transposed: bool) -> torch.Tensor:
    """PEFT's one magnitude of a module whose rows several DoRA branches share (GPT-2's fused
    c_attn): each slice's rows from its branch (the norm is per output row, so the stacked A and
    block-placed B give each row its own norm), and ‖W0_i‖ on rows no branch adapts (g = 1 there:
    unchanged, as in unipelt). Two DoRA branches on the same rows have no PEFT form."""
    W = base.weight.detach().float()
    W = W.T if transposed else W
    m = torch.linalg.norm(W, dim=1)
    seen: set[tuple[int, int]] = set()
    for bp, mod, _ in items:
        o0, o1 = bp.site.out_slice or (0, out_full)
        if (o0, o1) in seen or bp.site.out_slice is None:
            raise ExportError(f"{adapter_dir}: two DoRA modules at {path} ({bp.site.key}): the product of their "
                              "rescalings is not a DoRA; PEFT's use_dora has one per module")
        seen.add((o0, o1))
        m[o0:o1] = mod.magnitude.detach().float().to("cpu")
    return m.contiguous()


def _head_tensors(net, handle, head_paths: list[str], task, source=None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``modules_to_save`` and its tensors: the head trained in full, or, for a classifier whose
    head was not trained, the base head as it is (PEFT's SEQ_CLS always restores it from the file)."""
    paths = list(head_paths)
    if task == "classification" and not paths:
        try:
            paths = [handle.info.resolve("head", None).path]
        except Exception:  # pragma: no cover - every catalog has a head
            paths = []
    from unipelt.peft_import import _tied_to_input_embeddings

    tensors = {}
    for path in paths:
        if path in head_paths and _tied_to_input_embeddings(net, path):
            # PEFT's modules_to_save trains a copy, so its input embeddings would keep their values
            raise ExportError(f"{source}: the module at head ({path}) trained the weight this model ties to its "
                              "input embeddings: PEFT's modules_to_save would load it as an untied copy, another "
                              "function")
        for pname, p in net.get_submodule(path).state_dict().items():
            tensors[f"base_model.model.{path}.{pname}"] = p.detach().to("cpu").contiguous().clone()
    return paths, tensors


def _ia3_export(adapter_dir, net, handle, resolved, info, meta, base_model_name_or_path):
    """PEFT's IA3 format: per module ``ia3_l`` shaped (d_out, 1) (output side, bias rescaled too,
    as unipelt's) or (1, d_in) for the modules in ``feedforward_modules`` (input side). The slices
    of a fused projection (GPT-2's c_attn) share one vector: ones where no slice is adapted."""
    vectors: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    head_paths: list[str] = []
    transposed = set()
    for bp in handle.graph.branches:
        if bp.node.method == "train":
            head_paths.append(bp.site.path)
            continue
        br = handle.branch_modules[bp.key]
        path = bp.site.path
        l = br.ia3_l.detach().to("cpu")
        base = getattr(net.get_submodule(path), "base_layer", None)
        if base is not None and type(base).__name__ == "Conv1D":
            transposed.add(path)
        if br.side == "input":
            if path in vectors:
                raise ExportError(f"{adapter_dir}: module {bp.node.name!r}: two IA3 vectors at the input of {path}; "
                                  "PEFT's IA3 has one per module")
            vectors[path] = l.reshape(1, -1).clone()
            feedforward.append(path)
            continue
        if bp.site.out_slice is None:
            if path in vectors:
                raise ExportError(f"{adapter_dir}: module {bp.node.name!r}: two IA3 vectors on {path}; PEFT's IA3 "
                                  "has one per module")
            vectors[path] = l.reshape(-1, 1).clone()
            continue
        full = vectors.get(path)
        if full is None:
            module = net.get_submodule(path)
            b = getattr(module, "base_layer", module)
            width = int(b.nf) if path in transposed else int(b.out_features)
            full = vectors[path] = torch.ones(width, 1, dtype=l.dtype)
        o0, o1 = bp.site.out_slice
        full[o0:o1, 0] = l
    if transposed and len(transposed) != len(vectors):  # pragma: no cover - no such model known
        raise ExportError(f"{adapter_dir}: mixes Conv1D and Linear targets; PEFT's fan_in_fan_out is global")
    task = resolved.get("task")
    modules_to_save, tensors = _head_tensors(net, handle, head_paths, task, source=adapter_dir)
    tensors.update({f"base_model.model.{p}.ia3_l": v.contiguous() for p, v in vectors.items()})
    base_name = base_model_name_or_path or resolved.get("model") or info.get("model")
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS" if task == "classification" else None,
        "base_model_name_or_path": base_name,
        # full module names (PEFT matches a listed name as the whole name or its dotted tail)
        "target_modules": sorted(vectors),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": bool(transposed),
        "modules_to_save": modules_to_save or None,
        "init_ia3_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    provenance = {"exported_from": str(Path(adapter_dir).resolve()), "base_model": base_name,
                  "task": task, "labels": resolved.get("labels"), "spec": meta.get("spec")}
    return tensors, config, provenance


def _prompt_export(adapter_dir, net, handle, resolved, info, meta, base_model_name_or_path):
    """PEFT's prompt tuning: the L virtual token embeddings as ``prompt_embeddings`` (L, d). Only on
    a decoder, where both put the prompt before the input and give it positions 0..L-1; on an
    encoder unipelt puts it after [CLS] and PEFT before it, which is another function."""
    (bp,) = handle.graph.branches
    if not handle.info.causal:
        raise ExportError(f"{adapter_dir}: module {bp.node.name!r} (prompt) on an encoder "
                          f"({handle.info.arch.name}): unipelt puts the virtual tokens after [CLS], PEFT before it")
    task = resolved.get("task")
    if task == "classification":
        raise ExportError(f"{adapter_dir}: module {bp.node.name!r} (prompt) on a decoder classifier: PEFT's prompt "
                          "tuning pools the last position, a padding token for padded rows")
    emb = handle.branch_modules[bp.key].prompt().detach().to("cpu").contiguous().clone()
    cfg = handle.info.config
    base_name = base_model_name_or_path or resolved.get("model") or info.get("model")
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "num_virtual_tokens": int(emb.shape[0]),
        "token_dim": int(emb.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")),
        "num_layers": int(handle.info.num_layers),
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
        "revision": None,
    }
    provenance = {"exported_from": str(Path(adapter_dir).resolve()), "base_model": base_name,
                  "task": task, "labels": resolved.get("labels"), "spec": meta.get("spec")}
    return {"prompt_embeddings": emb}, config, provenance


def _write_peft(out_dir, tensors: dict, config: dict, provenance: dict) -> Path:
    from safetensors.torch import save_file

    dest = Path(out_dir)
    with atomic_output(dest, kind="dir", what=PEFT_DIR, replaces=_is_peft_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(tmp / "adapter_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        with open(tmp / "unipelt-export.json", "w", encoding="utf-8") as f:  # provenance, ignored by PEFT
            json.dump(provenance, f, indent=2, default=str)
            f.write("\n")
    return dest


def _pattern(path: str) -> str:
    # PEFT matches pattern keys as regular expressions against the module name (re.match of
    # "(.*\.)?(KEY)$"): escape the dots so the key is exactly this module.
    import re

    return re.escape(path)


def _num(v: float):
    return int(v) if float(v).is_integer() else float(v)



def merge_problems(handle) -> list[str]:
    """Why each branch of ``handle`` left live by ``handle.merge()`` cannot be merged, one line per
    module (call it after ``merge``)."""
    from unipelt.pruning import ConstantGate

    reasons: dict[str, str] = {}
    for bp in handle.graph.branches:
        e = handle.entries[bp.key]
        mod = e.branch
        if getattr(mod, "reads", None) == "params" or e.merged:
            continue  # trained in place: already part of the weights
        if e.off:
            continue  # pruned or dropped: computes nothing, so the merged model leaves it out too
        if bp.node.name in reasons:
            continue
        if e.gate is not None and not isinstance(e.gate, ConstantGate):
            reasons[bp.node.name] = (f"module {bp.node.name!r} ({bp.node.method}) is gated: its gate depends on the "
                                     "input, so its delta has no fixed weight form")
        elif not getattr(mod, "mergeable", False):
            reasons[bp.node.name] = (f"module {bp.node.name!r} ({bp.node.method} at {bp.site.site}) is not mergeable: "
                                     "it is not a linear change of a weight")
        elif handle.graph.combine.get(bp.site.key, "parallel") == "average":
            reasons[bp.node.name] = (f"module {bp.node.name!r} at {bp.site.site} is averaged with other branches "
                                     "(combine: average)")
        else:
            reasons[bp.node.name] = f"module {bp.node.name!r} at {bp.site.key}: the hook point cannot take a merged delta"
    return list(reasons.values())


def training_info_quantize(adapter_dir) -> str | None:
    """The bitsandbytes quantization the adapter was trained on (``nf4``/``fp4``/``int8``), or None."""
    from unipelt.training.record import training_info

    return training_info(adapter_dir).get("quantize")


def _load_dequantized(adapter_dir, model: str | None, quant: str):
    """The base a quantized run trained on, loaded quantized and dequantized to bf16 (the weights
    the adapter was trained against, not the original 16-bit ones), with the adapter attached."""
    import unipelt
    from unipelt.models import load_model
    from unipelt.training.record import name_labels, training_info
    from unipelt_plugins.bnb import dequantize_model

    info = training_info(adapter_dir)
    name = model or info.get("model")
    if not name:
        raise ExportError(f"{adapter_dir}: no base model recorded with this adapter; name the model")
    task, labels = info.get("task"), info.get("labels")
    net, tok = load_model(str(name), task=task, num_labels=len(labels) if labels else None, quantize=quant)
    if task == "classification" and labels:
        name_labels(net, labels)
    dequantized = dequantize_model(net, torch.bfloat16)
    handle = unipelt.load(net, adapter_dir)
    print(f"merge: the base was trained in {quant}; dequantized {len(dequantized)} layers and writing a bfloat16 model")
    return net, tok, handle, {**info, "model": str(name)}, dequantized


def merge_adapter(adapter_dir: str | os.PathLike, model: str | None, out_dir: str | os.PathLike) -> Path:
    """Merge ``adapter_dir`` into ``model`` (default: the recorded base) and ``save_pretrained`` the
    result (plus the tokenizer) into ``out_dir``. Refuses, naming the module, when a branch cannot
    be merged. The result loads with ``AutoModelFor...from_pretrained`` without unipelt."""
    from unipelt.train import load_adapted

    check_output_path(out_dir, kind="dir", what=MODEL_DIR, replaces=_is_model_dir)
    quantized = training_info_quantize(adapter_dir)
    if quantized:
        net, tok, handle, info, dequantized = _load_dequantized(adapter_dir, model, quantized)
    else:
        net, tok, handle, info = load_adapted(adapter_dir, model, device="cpu")
        dequantized = []
    handle.merge()
    problems = merge_problems(handle)
    if problems:
        handle.detach()
        raise ExportError(f"{adapter_dir}: cannot merge: " + "; ".join(problems)
                          + ". Merge works for ungated LoRA (or one whose gate unipelt collapse made a constant) "
                          "and parameters trained in place (head, bias, norm).")
    merged = {k: v.detach().clone() for k, v in net.state_dict().items()
              if not (k.startswith("unipelt.") or ".unipelt." in k)}
    handle.detach()  # restores the original modules (and the original weights)
    net.load_state_dict(merged, strict=True)
    dest = Path(out_dir)
    with atomic_output(dest, kind="dir", what=MODEL_DIR, replaces=_is_model_dir) as tmp:
        net.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        with open(tmp / "unipelt-merged.json", "w", encoding="utf-8") as f:
            json.dump({"adapter": str(Path(adapter_dir).resolve()), "base_model": info.get("model"),
                       "task": info.get("task"), "labels": info.get("labels"),
                       # a quantized run merges into the weights it trained against, dequantized
                       **({"dequantized_from": quantized, "dtype": "bfloat16", "dequantized_layers": len(dequantized)}
                          if quantized else {})}, f, indent=2)
            f.write("\n")
    return dest


__all__ = ["ExportError", "export_peft", "merge_adapter", "merge_problems"]
