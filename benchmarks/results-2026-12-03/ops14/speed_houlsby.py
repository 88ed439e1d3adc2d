"""benchmarks/speed.py with two bottleneck-adapter rows it does not have, then its own main.

``houlsby-triton``: specs/houlsby.yaml (serial adapters at attn.out and ffn.out, swish, m = d/16)
with ``executor: triton``, where the bottleneck kernel takes both placements (its down-projection as
the group's shrink, ``kernels/bottleneck.py`` the rest: ``unipelt::bottleneck_up`` or, compiled on
CUDA, its triton_op twin). ``houlsby``: the same spec on the default executor (``auto`` keeps every
adapter in PyTorch), for reference. speed.py's ``pfeiffer`` row does not reach the kernel on llama
(Pfeiffer's renormalised ffn.res stays on the reference path), nor ``mam`` under ``auto``.

    PYTHONPATH=. python3 benchmarks/results-2026-12-03/ops14/speed_houlsby.py --scenarios llama \\
        --modes compiled --phases train --variants houlsby-triton ...   # speed.py's arguments
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
speed = importlib.util.module_from_spec(spec)
sys.modules["speed"] = speed  # (its dataclasses look their module up)
spec.loader.exec_module(speed)

for v in (speed.Variant("houlsby-triton", "unipelt", "specs/houlsby.yaml (serial adapters at attn.out, ffn.out), "
                        "executor: triton (the bottleneck kernel)", spec=speed._with("houlsby.yaml", executor="triton")),
          speed.Variant("houlsby", "unipelt", "specs/houlsby.yaml, default executor (auto: the adapters in PyTorch)",
                        spec=speed._spec_file("houlsby.yaml"))):
    speed.VARIANTS[v.name] = v

if __name__ == "__main__":
    sys.exit(speed.main())
