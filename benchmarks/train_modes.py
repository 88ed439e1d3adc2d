"""Which ``--compile`` mode makes ``unipelt train`` fastest, measured through the training API itself
(issue 8: "unipelt train picks the fastest mode by itself on a GPU").

Unlike benchmarks/speed.py (fixed batch shapes, one step function), this runs the real loop:
batches of varying length (uniform between --min-len and --max-len tokens), padding, the optimizer,
the schedule, the controllers, bf16 autocast (``--precision auto``). Per mode it reports the median
step time over the steps after the first ``--skip`` (compilation, CUDA-graph recording), the wall
time, and peak memory. ``auto`` must be the fastest of ``off``, ``default`` and ``auto``.

    PYTHONPATH=. python benchmarks/train_modes.py --spec specs/unipelt.yaml --out train-modes.jsonl
    PYTHONPATH=. python benchmarks/train_modes.py --tiny      # CPU smoke run (modes off only)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import ensure_plugins  # noqa: E402

from unipelt.data import Example  # noqa: E402
from unipelt.models import _byte_tokenizer  # noqa: E402
from unipelt.training import TrainConfig, train  # noqa: E402
import unipelt.training.loop as loop  # noqa: E402

LLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16,
         "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
TINY = {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512}


def rows(n: int, lo: int, hi: int, seed: int = 0) -> list[Example]:
    rnd = random.Random(seed)
    words = "the cat sat on a mat while rain fell over quiet hills and rivers ran".split()
    out = []
    for i in range(n):
        length = rnd.randint(lo, hi)
        text = ""
        while len(text) < length:  # the byte tokenizer: about one token per character
            text += rnd.choice(words) + " "
        out.append(Example(text=text[:length], line=i + 1))
    return out


def one(mode: str, spec: str, args, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY if args.tiny else LLAMA), attn_implementation="sdpa"))
    tok = _byte_tokenizer(bert=False, chat=False)
    times: list[float] = []
    real = loop._optimizer_step

    def timed(run, micro, t_start):  # the loop's own step, timed with a device sync around it
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        real(run, micro, t_start)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    loop._optimizer_step = timed
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        report = train(spec, model, rows(args.steps * args.batch_size, args.min_len, args.max_len), None,
                       TrainConfig(task="causal-lm", max_steps=args.steps, batch_size=args.batch_size,
                                   max_length=args.max_len, compile=mode, precision=args.precision, lr=1e-4,
                                   progress=False, use_chat_template=False, device=device), tokenizer=tok)
    finally:
        loop._optimizer_step = real
    wall = time.perf_counter() - t0
    steady = times[args.skip:]
    return {"mode": mode, "spec": spec, "chosen": report["compile"], "precision": report["precision"],
            "steps": len(times), "median_step_s": statistics.median(steady) if steady else None,
            "first_steps_s": [round(t, 3) for t in times[:args.skip]], "wall_s": wall,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "final_loss": report["epochs"][-1]["train_loss"] if report["epochs"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="specs/unipelt.yaml")
    ap.add_argument("--modes", default="off,default,auto")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=12, help="steps left out of the median (compile, graph recording)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ensure_plugins()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.steps, args.skip, args.min_len, args.max_len = 4, 1, 8, 40
    results = []
    for mode in args.modes.split(","):
        r = one(mode, args.spec, args, device)
        results.append(r)
        print(json.dumps(r), flush=True)
    best = min((r for r in results if r["median_step_s"]), key=lambda r: r["median_step_s"])
    base = {r["mode"]: r["median_step_s"] for r in results}
    print("| mode | chosen | median step (ms) | vs off | first steps (s) | wall (s) | peak GiB | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["median_step_s"] / base["off"] if "off" in base and r["median_step_s"] else None
        print(f"| {r['mode']} | {r['chosen']['mode']}{' +buckets' if r['chosen'].get('bucketed') else ''} | "
              f"{1e3 * r['median_step_s']:.1f} | {ratio:.2f} | {r['first_steps_s']} | {r['wall_s']:.0f} | "
              f"{r['peak_gib'] or 0:.2f} | {r['final_loss']:.3f} |" if ratio else f"| {r['mode']} | — |")
    print(f"fastest: {best['mode']}")
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
