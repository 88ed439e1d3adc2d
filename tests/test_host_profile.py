"""benchmarks/host_profile.py on CPU (tiny BERT, aot_eager): one summary record per variant with the
phases' host times and the step's counts, the tables written, a failing variant recorded as an
error without losing the others; and what it counts for a compiled unipelt LoRA step: one
compiled region per step (the model's forward; its root hooks run eagerly), as PEFT's."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("host_profile", ROOT / "benchmarks" / "host_profile.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["host_profile"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_host_profile_tiny_cpu(tmp_path):
    hp = _load()
    rc = hp.main(["--tiny", "--device", "cpu", "--backend", "aot_eager", "--mode", "compiled",
                  "--variants", "lora-r16-all,no-such-variant,peft-lora-r16-all", "--steps", "2",
                  "--warmup", "1", "--rows", "5", "--tag", "t-", "--out", str(tmp_path)])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "t-summary.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in recs] == ["lora-r16-all", "no-such-variant", "peft-lora-r16-all"]
    assert "error" in recs[1] and "KeyError" in recs[1]["error"]
    for r in (recs[0], recs[2]):
        assert set(r["host_ms"]) == {"forward", "backward", "optimizer", "sync_wait", "step_host"}
        assert all(v > 0 for k, v in r["host_ms"].items() if k != "sync_wait")
        assert len(r["event_ms"]) == 4 and r["trainable_tensors"] == 24  # 2 layers x 6 linears x (A, B)
        regions = {k: v for k, v in r["per_step_counts"].items() if k.startswith("Torch-Compiled Region")}
        assert sum(regions.values()) == 1.0, regions
        assert r["per_step_counts"]["torch::autograd::AccumulateGrad"] == 24.0
        text = (tmp_path / f"t-{r['variant']}.txt").read_text()
        assert "torch.profiler" in text and "cProfile" in text
