"""Merging several trained LoRA adapters into one, with the semantics of HF PEFT's
``LoraModel.add_weighted_adapter`` (peft 0.21: ``tuners/lora/model.py``, ``utils/merge_utils.py``).

    merge_adapters(["runs/a/adapter", "runs/b/adapter"], "runs/ab", weights=[0.7, 0.3], method="ties", density=0.5)
    unipelt merge-adapters runs/a/adapter runs/b/adapter --weights 0.7 0.3 --method ties --density 0.5 --out runs/ab

Per hook point (layer and site) that any input adapts, with w_i the weights and s_i each LoRA's
scale, the result is a LoRA with alpha = r (scale 1):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the factors
  themselves, A and B separately (so all inputs need the same rank r): A' = comb_i(c_i·A_i),
  B' = comb_i(|c_i|·B_i) with c_i = sign(w_i·s_i)·√|w_i·s_i| (the sign goes to A only, so a negative
  weight subtracts). ``linear`` is the weighted sum Σ c_i·X_i — exact only for one input; PEFT
  calls it a rough approximation. ``ties`` (Yadav et al., 2023): keep the ``density`` fraction of
  each X_i largest in magnitude, elect per entry the sign of the weighted sum, and average the
  weighted entries that agree with it. ``dare_*`` (Yu et al., 2023): drop entries at random with
  probability 1 − density and rescale the rest by 1/density, then sum (``dare_linear``) or
  elect-and-average (``dare_ties``). ``magnitude_prune``: the magnitude pruning of ``ties`` and a sum.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``):
  the same combinations of the full deltas ΔW_i = s_i·B_i·A_i with weights w_i, then the best
  rank-r' approximation (r' = ``svd_rank``, default the largest input rank): B' = U_r'·S_r', A' = V_r'ᵀ;
  ``svd_clamp`` q (PEFT's ``svd_clamp``) then clamps both to ±(the q-quantile of their entries).
- ``cat``: the exact sum Σ w_i·ΔW_i as one LoRA of the summed rank, A' = [w_i·s_i·A_i], B' = [B_i].

The random drop of DARE draws, per hook point in model order, A's masks then B's, input by input,
from a generator seeded with ``seed``: PEFT's order of draws (PEFT takes them from the global
generator, after the new adapter's initialisation has drawn from it; the test hands both the same).

Inputs are unipelt adapters of ungated ``lora`` nodes (PiSSA/OLoRA ones count as the rank-2r LoRA
they equal) made for the same base (the fingerprints must agree); the merged adapter is written
from their tensors alone, without loading the base model, and loads like any other.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from unipelt.errors import AdapterFileError, UnipeltError

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = FACTOR_METHODS + SVD_METHODS + ("cat",)
Method = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd", "ties_svd",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd", "cat"]


SITE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down")

# architectures whose linear hook points are transformers' Conv1D, which stores W as (in, out):
# PEFT's get_delta_weight returns ΔW in that layout (fan_in_fan_out), and the *_svd methods
# combine it so, which matters to DARE's random drop (the same draws land on other entries of
# the (out, in) matrix); the combination here runs in the stored layout too
TRANSPOSED_STORAGE = frozenset({"gpt2"})


class MergeError(UnipeltError):
    """Adapters that cannot be merged with the requested method; names the adapter and why."""


# ------------------------------------------------------------------------------------------
# the combinations of task tensors (stacked on dim 0), as in TIES and DARE
# ------------------------------------------------------------------------------------------
def prune_magnitude(t: Tensor, density: float) -> Tensor:
    """Keep the ``int(density·numel)`` entries of largest magnitude, zero the others."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * keep.view(t.shape)


def prune_random(t: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by 1/density."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def elect_and_average(weighted: Tensor, unweighted: Tensor, majority: str = "total") -> Tensor:
    """TIES' sign election and disjoint mean: per entry, the sign of Σ_i (``total``, of the
    unweighted pruned tensors, as PEFT) or the more frequent sign (``frequency``); the mean of
    the weighted entries of that sign (zero when none)."""
    sign = unweighted.sign()
    votes = unweighted.sum(0) if majority == "total" else sign.sum(0)
    elected = torch.where(votes >= 0, 1, -1)
    agree = sign == elected
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def combine(tensors: list[Tensor], weights: list[float], method: str, density: float,
            majority: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Combine task tensors (all of one shape) with per-tensor ``weights`` by ``method``
    (its name without a ``_svd`` suffix)."""
    base = method.removesuffix("_svd")
    if base in ("linear", "svd"):
        pruned = tensors
    elif base in ("ties", "magnitude_prune"):
        pruned = [prune_magnitude(t, density) for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        pruned = [prune_random(t, density, generator) for t in tensors]
    else:  # pragma: no cover - merge_adapters checks the method
        raise ValueError(method)
    stacked = torch.stack(pruned, 0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if base in ("ties", "dare_ties"):
        return elect_and_average(stacked * w, stacked, majority)
    return (stacked * w).sum(0)


# ------------------------------------------------------------------------------------------
# reading the inputs
# ------------------------------------------------------------------------------------------
@dataclass
class _Lora:
    """One LoRA branch of an input adapter at one hook point: ΔW = scale·B·A."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def r(self) -> int:
        return self.A.shape[0]


@dataclass
class _Input:
    path: Path
    meta: dict
    branches: dict[tuple[int, str], _Lora]  # (layer, site) -> the LoRA there


def _read_input(path: str | os.PathLike) -> _Input:
    from unipelt.io import META_FILE, read_adapter_meta, read_weights
    from unipelt.spec import parse_spec

    d = Path(path)
    meta = read_adapter_meta(d)
    try:
        spec = parse_spec(meta["spec"])
    except UnipeltError as e:
        raise AdapterFileError(f"{d / META_FILE}: field 'spec': {e}") from None
    for name, node in spec.modules.items():
        if node.method != "lora":
            raise MergeError(f"{d}: module {name!r} (method {node.method}) is not a LoRA; merge-adapters merges "
                             "adapters of ungated lora modules only")
        if spec.gate_for(node) is not None:
            raise MergeError(f"{d}: module {name!r} is gated: a gated delta depends on the input and has no "
                             "weight form to merge")
    if any(c.mode == "average" for c in spec.combine.values()):
        raise MergeError(f"{d}: field 'spec.combine': averaged hook points cannot be merged (their deltas are divided "
                         "by the number of live branches)")
    tensors = read_weights(d, meta)
    parts: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        branch, _, pname = key.rpartition(".")
        parts[branch][pname] = t
    branches: dict[tuple[int, str], _Lora] = {}
    for branch, p in parts.items():
        node_name, layer, site = branch.split(".", 2)
        cfg = spec.modules[node_name].config
        if not {"lora_A", "lora_B"} <= set(p):
            raise AdapterFileError(f"{d}: branch {branch!r} has no lora_A/lora_B tensors")
        A, B = p["lora_A"].float(), p["lora_B"].float()
        if "base_A" in p:  # PiSSA / OLoRA not yet materialized: the rank-2r LoRA it equals
            A = torch.cat([A, p["base_A"].float()], 0)
            B = torch.cat([B, -p["base_B"].float()], 1)
        lora = _Lora(A, B, cfg.scale)
        where = (int(layer), site)
        if where in branches:  # two nodes at one hook point: they add, as one LoRA of the summed rank
            prev = branches[where]
            lora = _Lora(torch.cat([prev.A * prev.scale, A * lora.scale], 0), torch.cat([prev.B, B], 1), 1.0)
        branches[where] = lora
    return _Input(d, meta, branches)


# ------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------
def merge_adapters(adapters: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   weights: Sequence[float] | None = None, method: Method = "linear", density: float | None = None,
                   svd_rank: int | None = None, majority_sign: Literal["total", "frequency"] = "total",
                   seed: int = 0, name: str = "merged", svd_clamp: float | None = None) -> Path:
    """Merge the LoRA adapters in ``adapters`` (directories) into one adapter written to ``out``.

    ``weights`` (default all 1) weight each input; ``method`` is one of :data:`METHODS` (module
    docstring); ``density`` (the fraction kept, in (0, 1]) is required by the pruning methods;
    ``svd_rank`` is the rank of the ``*svd`` results (default: the largest input rank);
    ``svd_clamp`` (in [0, 1]) clamps their factors to the quantile of their entries, as PEFT's;
    ``majority_sign`` TIES' sign election; ``seed`` DARE's random drop. Returns the output path.
    """
    from unipelt.io import atomic_output, check_output_path, is_adapter_dir

    if len(adapters) == 0:
        raise MergeError("merge-adapters: no adapter given")
    if method not in METHODS:
        raise MergeError(f"merge-adapters: method {method!r} is not one of {', '.join(METHODS)}")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise MergeError(f"merge-adapters: {len(weights)} weights for {len(adapters)} adapters")
    if any(not math.isfinite(w) for w in weights):
        raise MergeError("merge-adapters: weights must be finite numbers")
    prunes = method.removesuffix("_svd") not in ("linear", "svd", "cat")
    if prunes and density is None:
        raise MergeError(f"merge-adapters: method {method} needs --density (the fraction of entries kept)")
    if density is not None and not (0.0 < density <= 1.0):
        raise MergeError(f"merge-adapters: density {density} is not in (0, 1]")
    if svd_rank is not None and svd_rank < 1:
        raise MergeError(f"merge-adapters: svd_rank {svd_rank} is not a positive integer")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0.0 <= svd_clamp <= 1.0):
        raise MergeError(f"merge-adapters: svd_clamp {svd_clamp} is not a quantile in [0, 1]")
    if svd_clamp is not None and not method.endswith("svd"):
        raise MergeError(f"merge-adapters: svd_clamp clamps the factors of an svd method, not of {method}")
    if majority_sign not in ("total", "frequency"):
        raise MergeError(f"merge-adapters: majority_sign {majority_sign!r} is not total or frequency")
    dest = check_output_path(out, kind="dir", what="unipelt adapter directory", replaces=is_adapter_dir)
    inputs = [_read_input(a) for a in adapters]
    base = _common_base(inputs)
    # PEFT merges a single adapter linearly, whatever was asked
    if len(inputs) == 1:
        method = "linear"
    density = 1.0 if density is None else float(density)

    # hook points in the order of the model's modules (layer, then the projections as the
    # supported architectures define them), which is the order PEFT visits them in: DARE's
    # random stream depends on it
    where_all = sorted({w for inp in inputs for w in inp.branches},
                       key=lambda w: (w[0], SITE_ORDER.index(w[1]) if w[1] in SITE_ORDER else len(SITE_ORDER), w[1]))
    # PEFT's default svd rank: the largest rank of any input
    max_rank = max(l.r for inp in inputs for l in inp.branches.values())
    generator = torch.Generator().manual_seed(int(seed))
    transposed = base.get("architecture") in TRANSPOSED_STORAGE
    merged: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
    for where in where_all:
        present = [(inp, w) for inp, w in zip(inputs, weights) if where in inp.branches]
        loras = [inp.branches[where] for inp, _ in present]
        ws = [w for _, w in present]
        label = f"layer {where[0]} {where[1]}"
        if method == "cat":
            A = torch.cat([w * l.scale * l.A for l, w in zip(loras, ws)], 0)
            B = torch.cat([l.B for l in loras], 1)
        elif method in FACTOR_METHODS:
            ranks = {l.r for l in loras}
            if len(ranks) > 1:
                shown = ", ".join(f"{inp.path}: r={l.r}" for (inp, _), l in zip(present, loras))
                raise MergeError(f"merge-adapters: method {method} combines A and B entry by entry, so every adapter "
                                 f"needs the same rank at {label} ({shown}); use svd or cat")
            c = [w * l.scale for l, w in zip(loras, ws)]
            cA = [math.copysign(math.sqrt(abs(x)), x) for x in c]
            cB = [math.sqrt(abs(x)) for x in c]
            A = combine([l.A for l in loras], cA, method, density, majority_sign, generator)
            B = combine([l.B for l in loras], cB, method, density, majority_sign, generator)
        else:
            rank = svd_rank or max_rank
            deltas = [l.scale * (l.B @ l.A) for l in loras]
            if transposed:  # combined as stored (DARE's draws), decomposed as (out, in)
                delta = combine([d.T for d in deltas], ws, method, density, majority_sign, generator).T
            else:
                delta = combine(deltas, ws, method, density, majority_sign, generator)
            limit = min(delta.shape)
            if rank > limit:
                raise MergeError(f"merge-adapters: svd_rank {rank} is more than min(d_in, d_out) = {limit} at {label}")
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            B, A = U[:, :rank] * S[:rank], Vh[:rank]
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
                B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
        merged[where] = (A.contiguous(), B.contiguous())

    spec, tensors = _as_adapter(merged, name)
    _check_spec(spec, dest)
    meta = _metadata(spec, name, base, tensors, inputs, method=method, weights=weights, density=density,
                     svd_rank=svd_rank, svd_clamp=svd_clamp, majority_sign=majority_sign, seed=seed)
    from safetensors import torch as st

    from unipelt.io import FILE_FORMAT, META_FILE, WEIGHTS_FILE

    with atomic_output(dest, kind="dir", what="unipelt adapter directory", replaces=is_adapter_dir) as tmp:
        st.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FILE_FORMAT})
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    return dest


def _common_base(inputs: list[_Input]) -> dict:
    """The base fingerprint all inputs share (architecture, shapes); sites are united."""
    first = inputs[0]
    fp = first.meta["base"]
    sites: dict[str, list] = {}
    for inp in inputs:
        b = inp.meta["base"]
        for k in ("architecture", "model_type", "num_layers", "hidden_size"):
            if b.get(k) != fp.get(k):
                raise MergeError(f"merge-adapters: {inp.path} was made for another base than {first.path} "
                                 f"(base.{k}: {b.get(k)!r} vs {fp.get(k)!r})")
        for key, shape in (b.get("sites") or {}).items():
            if key in sites and sites[key] != shape:
                raise MergeError(f"merge-adapters: {inp.path}: base.sites.{key} is {shape}, {first.path} has {sites[key]}")
            sites.setdefault(key, shape)
    order = sorted(sites, key=lambda k: int(k.split(".", 1)[0]) if k.split(".", 1)[0].isdigit() else -1)
    return {**{k: fp.get(k) for k in ("architecture", "model_type", "num_layers", "hidden_size")},
            "sites": {k: sites[k] for k in order}}


def _as_adapter(merged: dict[tuple[int, str], tuple[Tensor, Tensor]], name: str) -> tuple[dict, dict[str, Tensor]]:
    """A spec of plain LoRA nodes (alpha = r: scale 1) covering exactly the merged hook points,
    and its tensors under canonical keys. One node when every hook point's layers and rank agree
    (the usual case); otherwise one node per (site, rank)."""
    by_site: dict[str, dict[int, int]] = defaultdict(dict)
    for (layer, site), (A, _) in merged.items():
        by_site[site][layer] = A.shape[0]
    groups: dict[tuple[tuple[int, ...], int], list[str]] = defaultdict(list)
    split = False
    for site, layers in by_site.items():
        ranks = set(layers.values())
        if len(ranks) > 1:
            split = True
        groups[(tuple(sorted(layers)), min(ranks))].append(site)
    modules: dict[str, dict] = {}
    node_of: dict[tuple[int, str], str] = {}
    if not split and len(groups) == 1:
        (layers, r), sites = next(iter(groups.items()))
        modules["lora"] = {"method": "lora", "sites": sites, "layers": list(layers), "r": r, "alpha": r}
        for site in sites:
            for layer in layers:
                node_of[(layer, site)] = "lora"
    else:
        for (layer, site), (A, _) in sorted(merged.items()):
            node = f"lora_{site.replace('.', '_')}_r{A.shape[0]}"
            entry = modules.setdefault(node, {"method": "lora", "site": site, "layers": [], "r": A.shape[0],
                                              "alpha": A.shape[0]})
            entry["layers"].append(layer)
            node_of[(layer, site)] = node
    tensors: dict[str, Tensor] = {}
    for (layer, site), (A, B) in merged.items():
        key = f"{node_of[(layer, site)]}.{layer}.{site}"
        tensors[f"{key}.lora_A"] = A.float().contiguous()
        tensors[f"{key}.lora_B"] = B.float().contiguous()
    return {"version": 1, "name": name, "modules": modules}, tensors


def _check_spec(spec: dict, dest: Path) -> None:
    from unipelt.spec import parse_spec

    try:
        parse_spec(spec)
    except UnipeltError as e:  # pragma: no cover - the spec is built from valid inputs
        raise MergeError(f"{dest}: the merged spec does not validate: {e}") from None


def _metadata(spec: dict, name: str, base: dict, tensors: dict[str, Tensor], inputs: list[_Input], **how) -> dict:
    from unipelt.io import FILE_FORMAT, FILE_FORMAT_VERSION, tensor_records
    from unipelt.spec import FORMAT_VERSION

    meta = {
        "format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, "spec_format_version": FORMAT_VERSION,
        "name": name, "spec": spec, "base": base,
        "merged_from": {"adapters": [str(i.path.resolve()) for i in inputs], **how},
    }
    # what training recorded (the base model's name, task, labels), when every input agrees
    flows = [i.meta.get("workflow") for i in inputs]
    if all(isinstance(f, dict) for f in flows):
        keep = {k: v for k, v in flows[0].items() if k in ("model", "task", "labels", "max_length")
                and all(f.get(k) == v for f in flows)}
        if keep:
            meta["workflow"] = keep
    meta["tensors"] = tensor_records(tensors)
    return meta


__all__ = ["METHODS", "MergeError", "combine", "elect_and_average", "merge_adapters", "prune_magnitude", "prune_random"]
