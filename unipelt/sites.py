"""The core's own plugin: attaching branches at every kind of hook point.

- ``linear`` (a wrapped leaf projection), ``output`` (a sublayer's output), ``io`` (parallel to a
  sublayer: its input, added to its output) and ``renorm`` (a residual sum re-normalised after
  the branches) are served by a :class:`unipelt.runtime.Host` at one module: the branch's entry
  joins the site runtime there.
- ``kv``: the branch's ``kv_prefix(...)`` is served inside attention (:mod:`unipelt.attention`).
- ``embed``: the branch's ``prompt()`` tokens are inserted into every call (:mod:`unipelt.inputs`).
- ``params``: the base tensors of the branch's ``external_parameters()`` are trained in place;
  detaching restores their values and flags.
Nothing here names a method: a third-party method whose branch follows the kind's protocol
(:mod:`unipelt.types`) attaches the same way. Registered by the registry before any entry-point
plugin, and ``trylast``, so a plugin may take over a kind (a 4-bit base, a kernel).
"""
from __future__ import annotations

from unipelt.hookspecs import hookimpl
import torch

from unipelt.state import attach_embed, attach_kv, detach_embed, detach_kv, host_for, inplace_users, stash_input

HOST_KINDS = ("linear", "output", "io", "renorm")


@hookimpl(trylast=True)
def unipelt_attach_branch(model, state, site, entry, graph, registry):
    if site.kind == "kv":
        attach_kv(model, state, site, entry)
        return True
    if site.kind == "embed":
        attach_embed(model, state, entry)
        return True
    if site.kind == "params":
        # Several adapters may train the same base tensor in place (two classifiers' heads): the
        # tensor holds one adapter's values at a time, the others' are kept aside and swapped in
        # when their adapter becomes active (ModelState.sync_inplace). A new adapter starts from
        # the base values, not from another adapter's trained ones.
        selected = [p for _, p in entry.branch.external_parameters()]
        entry.saved, entry.held = [], [None] * len(selected)
        with torch.no_grad():
            for p in selected:
                users = inplace_users(state, p)
                holder = next(((e, i) for _, e, i in users if e.held[i] is None), None)
                base = users[0][1].saved[users[0][2]][1] if users else p.detach().clone()
                if holder is not None:
                    he, hi = holder
                    he.held[hi] = p.detach().clone()
                    p.copy_(base)
                entry.saved.append((p, base))
                p.requires_grad_(True)
        return True
    if site.kind not in HOST_KINDS:
        return None
    host = host_for(model, state, site, registry)
    width = site.out_features * site.part[1] if site.out_slice is not None else None
    rt = host.runtime(site.key, site.kind, site.out_slice, width)
    rt.mode[entry.adapter] = graph.combine.get(site.key, "parallel")
    if site.kind == "renorm" and not site.input_path:
        rt.norm = site.module  # post-LN: the hooked module is the sublayer's norm
    rt.entries.append(entry)
    order = graph.order.get(site.key)
    if order:
        # sequential stacking runs in the spec's `combine.<site>.order`, not in the order the
        # nodes happen to be written under `modules:`
        mine = sorted((e for e in rt.entries if e.adapter == entry.adapter), key=lambda e: order.index(e.node))
        rt.entries = [e for e in rt.entries if e.adapter != entry.adapter] + mine
    if site.kind == "io" or (site.kind == "renorm" and site.input_path):
        stash_input(model, state, site)  # the FFN input / a pre-LN sublayer's residual
    return True


@hookimpl(trylast=True)
def unipelt_detach_branch(model, state, site, entry):
    if site.kind == "kv":
        detach_kv(model, state, site, entry)
        return True
    if site.kind == "embed":
        detach_embed(model, state, entry)
        return True
    if site.kind == "params":
        if entry.saved is not None:
            with torch.no_grad():
                for i, (p, orig) in enumerate(entry.saved):
                    others = [u for u in inplace_users(state, p) if u[1] is not entry]
                    if entry.held is None or entry.held[i] is None:
                        p.copy_(orig)  # it held this adapter's values: back to the base's
                    if not others:
                        p.requires_grad_(False)
            entry.saved = entry.held = None
        return True
    if site.kind not in HOST_KINDS:
        return None
    host = state.hosts.get(site.path)
    if host is not None:
        rt = host.runtimes.get(site.key)
        if rt is not None:
            rt.entries = [e for e in rt.entries if e is not entry]
            if not any(e.adapter == entry.adapter for e in rt.entries):
                rt.mode.pop(entry.adapter, None)
    return True
