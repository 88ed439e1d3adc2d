"""The ``unipelt`` command line.

    unipelt compile SPEC MODEL [--out DIR] [--json] [--graph FILE]
    unipelt validate SPEC
    unipelt plugins

Errors print one message without a traceback. Exit codes: 2 spec error, 3 model error,
4 adapter file error, 5 data error, 6 plugin error, 7 output path error (an ``--out``, ``--graph``
or ``--plot`` that cannot be written: under a file, an existing file or folder of another kind, a
read-only or full disk), 1 any other unipelt error; 141 when stdout's reader went away
(``unipelt plugins --json | head``), as for a process that SIGPIPE ended.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from unipelt.errors import EXIT_CODES, UnipeltError, exit_code  # noqa: F401 (EXIT_CODES: importable from here)

GRAPH_FILE = "graph file (DOT or Mermaid)"


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar is noise in a report
    except Exception:  # pragma: no cover - transformers without the switch
        pass


def cmd_compile(args: argparse.Namespace) -> int:
    from unipelt.compiler import base_param_count, compile as _compile
    from unipelt.models import load_model
    from unipelt.registry import get_registry
    from unipelt.report import report_dict, report_text
    from unipelt.spec import parse_spec

    from unipelt import io

    spec = parse_spec(args.spec)  # spec errors first, before loading any model
    # then the output paths: refused before the model is loaded and compiled
    if args.out:
        io.check_output_path(args.out, kind="dir", what="unipelt adapter directory", replaces=io.is_adapter_dir)
    if args.graph:
        io.check_output_path(args.graph, kind="file", what=GRAPH_FILE, replaces=is_graph_file)
    model, _ = load_model(args.model)
    base = base_param_count(model)
    handle = _compile(model, spec, args.name, registry=get_registry())
    if args.json:
        print(json.dumps(report_dict(handle, base), indent=2, default=str))
    else:
        print(f"spec          {args.spec}")
        print(f"model         {args.model}")
        print(report_text(handle, base))
    if args.graph:
        text = handle.graph.to_mermaid() if args.graph.endswith((".mmd", ".mermaid", ".md")) else handle.graph.to_dot()
        io.write_text(args.graph, text, what=GRAPH_FILE, replaces=is_graph_file)
        if not args.json:
            print(f"\ngraph written to {args.graph}")
    if args.out:
        handle.save(args.out)
        if not args.json:
            print(f"adapter (initialised) written to {args.out}")
    return 0


def is_graph_file(path: Path) -> bool:
    """A graph written by ``--graph`` before (replaced; any other file is refused)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    return head.startswith((b"digraph unipelt {", b"flowchart LR"))


def cmd_validate(args: argparse.Namespace) -> int:
    from unipelt.spec import parse_spec

    spec = parse_spec(args.spec)
    mods = ", ".join(f"{n} ({m.method} at {', '.join(m.sites)})" for n, m in spec.modules.items())
    print(f"{args.spec}: valid spec (format version {spec.version}); modules: {mods}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from unipelt.registry import config_fields, get_registry

    reg = get_registry()
    if args.json:
        print(json.dumps({
            "plugins": sorted(reg.pm.get_name(p) or str(p) for p in reg.pm.get_plugins()),
            "methods": {n: {"plugin": m.plugin, "site_kinds": sorted(m.site_kinds), "fields": sorted(config_fields(m.config)), "summary": m.summary}
                        for n, m in sorted(reg.methods.items())},
            "architectures": {a.name: {"model_types": list(a.model_types), "causal": a.causal, "sites": {s: t.kind for s, t in {**a.sites, **a.global_sites}.items()}}
                              for a in {id(a): a for a in reg.architectures.values()}.values()},
        }, indent=2))
        return 0
    print("plugins")
    for p in sorted(reg.pm.get_name(p) or str(p) for p in reg.pm.get_plugins()):
        print(f"  {p}")
    print("\nmethods")
    for n, m in sorted(reg.methods.items()):
        print(f"  {n:<12} [{m.plugin}] attaches to {'/'.join(sorted(m.site_kinds))} hook points: {m.summary}")
        print(f"  {'':<12} fields: {', '.join(sorted(config_fields(m.config)))}")
    print("\narchitectures")
    seen = set()
    for arch in reg.architectures.values():
        if arch.name in seen:
            continue
        seen.add(arch.name)
        print(f"  {arch.name:<8} model types: {', '.join(arch.model_types)}; {'causal' if arch.causal else 'encoder'}")
        print(f"  {'':<8} hook points: " + ", ".join(f"{s} ({t.kind})" for s, t in {**arch.sites, **arch.global_sites}.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from unipelt.models import BUILTIN

    p = argparse.ArgumentParser(prog="unipelt", description="Compile declarative PEFT specs onto transformers models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    models_help = "a local Hugging Face model directory, or a built-in name: " + ", ".join(BUILTIN)

    c = sub.add_parser("compile", help="validate a spec against a model, attach it and print the report")
    c.add_argument("spec", help="spec file (YAML or JSON)")
    c.add_argument("model", help=models_help)
    c.add_argument("--out", help="write the initialised adapter (adapter.safetensors + unipelt.json) to this directory")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--graph", help="write the module graph: DOT, or Mermaid if the name ends in .mmd/.md")
    c.add_argument("--name", default="default", help="adapter name (default: default)")
    c.set_defaults(func=cmd_compile)

    v = sub.add_parser("validate", help="validate a spec without a model")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plugins", help="list loaded plugins, methods, architectures and hook points")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    from unipelt.registry import get_registry

    get_registry().hook.unipelt_add_commands(subparsers=sub)
    return p


def _one_line_warnings():
    """unipelt's own warnings (an adapter without checksums) as one ``warning:`` line, like the
    errors, instead of Python's two lines with a source path; other libraries' are left as they are."""
    import warnings

    from unipelt.errors import UnipeltWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnipeltWarning):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    return original, show


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered
    does not raise a second BrokenPipeError (Python's documented recipe, signal module notes)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a replaced stdout without a file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    import warnings

    _quiet_transformers()
    original, warnings.showwarning = _one_line_warnings()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left shows here, inside the handler below, not at exit
        return code
    except UnipeltError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:
        # stdout's reader went away (`unipelt plugins | head`): stop quietly, with the code of a
        # process that SIGPIPE ended, as `ls | head` does, rather than a traceback
        _drop_stdout()
        return 141
    except KeyboardInterrupt:  # pragma: no cover
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = original


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
