"""One CUDA graph per train step (unipelt.training.graphed.GraphedTrainStep).

On CPU: what it refuses (a CPU model, an optimizer whose step cannot be captured, a compiled model,
a batch of other shapes, an adapter with a training controller, a hyperparameter changed after the
capture) and the device-independent pieces (the constants a capture makes by kernels,
benchmarks/speed.py's graph-step mode skipped on CPU with its reason). On CUDA (skipped without
it): N graphed steps leave the parameters N eager steps leave (fp32, dropout 0: eager model,
compiled model, gradient clipping, a mixed batch of two adapters), dropout masks differ between
replays (PyTorch's dropout and the Triton kernels' in-shrink mask), a batch of another shape and
a host sync inside the forward are refused.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import unipelt
from unipelt.runtime import device_constant, host_to_device, value_runs
from unipelt.train import param_groups
from unipelt.training.graphed import (BatchSignature, GraphCaptureError, GraphedTrainStep, _hyperparameters,
                                      hyperparameter_change)

from conftest import make_bert

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU (run on the device machine)")


def lora_spec(dropout: float = 0.0, **extra) -> dict:
    return {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q", "attn.v", "ffn.up"], "r": 4,
                                               "alpha": 8, "dropout": dropout, "init": "gaussian"}}, **extra}


def bert_batch(seed: int, device, batch: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row: the mask is read, not ignored
    labels = torch.randint(0, 3, (batch,), generator=g)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def adapted(spec: dict, device, seed: int = 0, **bert_kw):
    # SDPA attention: transformers' eager attention builds its mask from a Python scalar copied to
    # the GPU (torch.tensor(0.0, device=...)), which CUDA graph capture refuses (see the last test)
    model = make_bert(seed, **{"attn_implementation": "sdpa", **bert_kw}).to(device)
    handle = unipelt.compile(model, spec)
    # B != 0 (the gaussian init keeps B at zero): the first steps then move every LoRA parameter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.train()
    return model, handle


def adamw(handle, lr=1e-2, **kw):
    return torch.optim.AdamW(param_groups(handle, lr), lr=lr, **kw)


# ------------------------------------------------------------------------------------------
# refusals (CPU)
# ------------------------------------------------------------------------------------------
def test_cpu_model_is_refused():
    model, handle = adapted(lora_spec(), "cpu")
    with pytest.raises(GraphCaptureError, match=r"needs CUDA: the model, optimizer or batch is on cpu"):
        GraphedTrainStep(model, adamw(handle, capturable=True), bert_batch(0, "cpu"))


def test_non_capturable_optimizer_is_refused():
    model, handle = adapted(lora_spec(), "cpu")
    with pytest.raises(GraphCaptureError, match=r"AdamW: param_groups\[0\] has capturable=False"):
        GraphedTrainStep(model, adamw(handle), bert_batch(0, "cpu"))
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(GraphCaptureError, match=r"SGD: it has no capturable option"):
        GraphedTrainStep(model, sgd, bert_batch(0, "cpu"))


def test_compiled_model_and_cudagraph_modes_are_refused():
    model, handle = adapted(lora_spec(), "cpu")
    opt = adamw(handle, capturable=True)
    with pytest.raises(GraphCaptureError, match=r"already torch.compile'd; pass the module itself"):
        GraphedTrainStep(torch.compile(model), opt, bert_batch(0, "cpu"))
    with pytest.raises(GraphCaptureError, match=r"compile='reduce-overhead'"):
        GraphedTrainStep(model, opt, bert_batch(0, "cpu"), compile="reduce-overhead")
    with pytest.raises(GraphCaptureError, match=r"warmup=0"):
        GraphedTrainStep(model, opt, bert_batch(0, "cpu"), warmup=0)
    with pytest.raises(GraphCaptureError, match=r"call_kwargs \['labels'\]: tensors belong in the batch"):
        GraphedTrainStep(model, opt, {"input_ids": bert_batch(0, "cpu")["input_ids"]},
                         call_kwargs={"labels": torch.zeros(4, dtype=torch.long)})


def test_training_controller_is_refused():
    # gate pruning reads the gates' statistics on the host every step: a replay would not follow it
    spec = {"version": 1, "modules": {"lora": {"method": "lora", "sites": ["attn.q"], "r": 4,
                                               "gate": {"input": "layer"}}},
            "prune": {"epsilon": 0.01, "patience": 2}}
    model, handle = adapted(spec, "cpu")
    with pytest.raises(GraphCaptureError, match=r"adapter 'default': its training controller\(s\) prune "):
        GraphedTrainStep(model, adamw(handle, capturable=True), bert_batch(0, "cpu"))


def test_batch_signature_refuses_other_shapes_dtypes_and_keys():
    sig = BatchSignature(bert_batch(0, "cpu"))
    sig.check(bert_batch(1, "cpu"))  # other values, same shapes: fine
    with pytest.raises(GraphCaptureError, match=r"batch\['input_ids'\]: shape \(4, 16\), int64 on cpu, but the "
                                                r"step was captured for shape \(4, 12\)"):
        sig.check(bert_batch(1, "cpu", length=16))
    other = bert_batch(1, "cpu")
    other["attention_mask"] = other["attention_mask"].float()
    with pytest.raises(GraphCaptureError, match=r"batch\['attention_mask'\]: shape \(4, 12\), float32"):
        sig.check(other)
    with pytest.raises(GraphCaptureError, match=r"batch keys \['input_ids', 'labels'\] differ"):
        sig.check({k: v for k, v in bert_batch(1, "cpu").items() if k != "attention_mask"})
    with pytest.raises(GraphCaptureError, match=r"batch\['x'\]: a int, not a tensor"):
        BatchSignature({"x": 3})


def test_hyperparameter_change_after_capture_is_named():
    # (capturable=False: its step runs on CPU here; what is compared is the same either way)
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    was = _hyperparameters(opt)
    assert hyperparameter_change(was, _hyperparameters(opt)) is None
    p.grad = torch.ones(3)
    opt.step()
    sched.step()  # a float lr: replaced by a new value, which a captured graph would never see
    why = hyperparameter_change(was, _hyperparameters(opt))
    assert why is not None and "param_groups[0]['lr'] changed after the capture (0.001 -> 0.0005)" in why
    # a tensor lr is updated in place by the scheduler: the graph reads the new value, no change
    q = nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([q], lr=torch.tensor(1e-3), foreach=False)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    was2 = _hyperparameters(opt2)
    q.grad = torch.ones(3)
    opt2.step()
    sched2.step()
    assert hyperparameter_change(was2, _hyperparameters(opt2)) is None
    assert float(opt2.param_groups[0]["lr"]) == pytest.approx(5e-4)
    opt2.param_groups[0]["weight_decay"] = 0.5
    assert "['weight_decay'] changed after the capture (0.01 -> 0.5)" in hyperparameter_change(
        was2, _hyperparameters(opt2))


@pytest.mark.parametrize("values, dtype", [
    ([0, 1, 2, 3, 0, 1, 2, 3], torch.long),                          # a mixed batch's row ids
    ([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11], torch.long),            # its permutation (round robin)
    ([5, 4, 3, 7, 7, 7, -2, 9], torch.long),                          # falling, constant, singletons
    ([2.0, 2.0, 2.0, 0.5, 0.5, 0.25], torch.float32),                 # column scales
    ([0.1, 0.2, 0.3], torch.float32),                                 # floats are never progressions
    ([-2, -2, 0, 0, 0, 1], torch.long),
    ([], torch.long),
    ([7], torch.long),
])
def test_device_constant_equals_the_host_tensor(values, dtype):
    got = device_constant(values, dtype, "cpu")
    want = torch.tensor(values, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    # every run reproduces its slice exactly: start + step * i
    i = 0
    for start, step, length in value_runs(values):
        assert values[i:i + length] == [start + step * k for k in range(length)]
        i += length
    assert i == len(values)


def test_float_runs_are_constant_runs():
    assert value_runs([0.1, 0.2, 0.3]) == [(0.1, 0, 1), (0.2, 0, 1), (0.3, 0, 1)]
    assert value_runs([0, 8, 16, 1, 9, 17]) == [(0, 8, 3), (1, 8, 3)]


def _load_speed():
    spec = importlib.util.spec_from_file_location("speed_graph", ROOT / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(CUDA, reason="checks the CPU skip")
def test_speed_graph_step_mode_is_skipped_on_cpu_with_its_reason(tmp_path):
    speed = _load_speed()
    out = tmp_path / "g.jsonl"
    assert speed.main(["--tiny", "--modes", "eager,graph-step", "--scenarios", "bert", "--variants", "lora-r8-qv",
                       "--phases", "train", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()][1:]
    graph = [r for r in recs if r["mode"] == "graph-step"]
    assert {r["variant"] for r in graph} == {"floor", "lora-r8-qv"} and len(graph) == 3
    for r in graph:
        assert r["error"] == "skipped: graph-step captures the train step in a CUDA graph; device cpu has none"
        assert r["median_ms"] is None
    eager = [r for r in recs if r["mode"] == "eager"]
    assert len(eager) == 3 and all(r["error"] is None and r["median_ms"] > 0 for r in eager)  # unchanged


def test_speed_graph_step_rows_use_fused_adamw_unless_foreach_is_asked():
    # capturable foreach AdamW runs two non-vectorized broadcast kernels per parameter per step
    # (benchmarks/RESULTS.md, "Session 10 (helper bert10)"): the graph-step rows default to fused
    speed = _load_speed()
    assert speed.graph_adamw("default") == "fused"
    assert speed.graph_adamw("fused") == "fused"
    assert speed.graph_adamw("foreach") == "foreach"
    assert speed.adamw_kwargs(speed.graph_adamw("default")) == {"fused": True}


# ------------------------------------------------------------------------------------------
# CUDA: the graphed step against eager steps
# ------------------------------------------------------------------------------------------
def _eager_steps(model, opt, batches, call_kwargs=None, max_grad_norm=None) -> list[float]:
    losses = []
    params = [p for g in opt.param_groups for p in g["params"]]
    for b in batches:
        loss = model(**b, **(call_kwargs or {})).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# fp32 on both sides, but not bit for bit: the reference AdamW takes its bias corrections in
# Python floats, the capturable one on the device in fp32, and cuBLAS may pick other kernels
# under capture; after 7 steps of lr 1e-2 (each moves a parameter by up to 1e-2) the
# differences seen are far below 1e-5, and the test also checks that the parameters moved by > 1e-3
def _assert_same_params(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


@needs_cuda
@pytest.mark.parametrize("compile_mode, clip", [(None, None), (None, 0.05), ("default", None)])
def test_graphed_steps_match_eager_steps(compile_mode, clip):
    dev = torch.device("cuda")
    batches = [bert_batch(10 + i, dev) for i in range(7)]  # 3 eager warm-up steps, the capture, 3 replays
    ref_model, ref_handle = adapted(lora_spec(), dev)
    model, handle = adapted(lora_spec(), dev)
    start = _trainable(model)
    _assert_same_params(_trainable(ref_model), start, atol=0, rtol=0)
    # the reference: plain (non-capturable) AdamW, eager steps; the graphed one capturable
    ref_losses = _eager_steps(ref_model, adamw(ref_handle), batches, max_grad_norm=clip)
    step = GraphedTrainStep(model, adamw(handle, capturable=True), batches[0], compile=compile_mode,
                            max_grad_norm=clip, warmup=3)
    losses = [float(step(b)) for b in batches]
    assert step.graph is not None and step.steps == 7
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    got, want = _trainable(model), _trainable(ref_model)
    _assert_same_params(got, want)
    # the parameters moved (the check above is not start == start)
    assert max((got[n] - start[n]).abs().max().item() for n in got) > 1e-3


@needs_cuda
def test_graphed_mixed_batch_matches_eager():
    # two adapters, rows round robin (adapter_names): the row ids are made inside the capture
    dev = torch.device("cuda")

    def build():
        model = make_bert(0, attn_implementation="sdpa").to(dev)
        handles = [unipelt.compile(model, lora_spec(), name=n) for n in ("a", "b")]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "lora_B" in name:
                    p.normal_(0.0, 0.05)
        model.train()
        groups = [g for h in handles for g in param_groups(h, 1e-2)]
        return model, groups

    names = {"adapter_names": ["a", "b", "b", "a"]}
    batches = [bert_batch(20 + i, dev) for i in range(6)]
    ref_model, ref_groups = build()
    ref_losses = _eager_steps(ref_model, torch.optim.AdamW(ref_groups, lr=1e-2), batches, call_kwargs=names)
    model, groups = build()
    step = GraphedTrainStep(model, torch.optim.AdamW(groups, lr=1e-2, capturable=True), batches[0],
                            call_kwargs=names, warmup=2)
    losses = [float(step(b)) for b in batches]
    assert step.graph is not None
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    _assert_same_params(_trainable(model), _trainable(ref_model))


@needs_cuda
@pytest.mark.parametrize("executor", ["grouped", "triton"])
def test_dropout_masks_differ_between_replays(executor):
    # lr 0: the parameters stay, so two replays on one batch differ only by their dropout masks
    dev = torch.device("cuda")
    batch = bert_batch(3, dev)
    losses = {}
    for p in (0.0, 0.3):
        model, handle = adapted(lora_spec(dropout=p, executor=executor), dev)
        step = GraphedTrainStep(model, adamw(handle, lr=0.0, capturable=True), batch, warmup=1)
        step(batch)  # eager
        losses[p] = [float(step(batch)) for _ in range(4)]  # the capture + 3 replays
        assert step.graph is not None
    assert len(set(losses[0.0])) == 1, losses  # no dropout: every replay the same loss
    assert len(set(losses[0.3])) == 4, losses  # dropout: a new mask every replay


@needs_cuda
def test_shape_change_after_capture_is_refused():
    dev = torch.device("cuda")
    model, handle = adapted(lora_spec(), dev)
    step = GraphedTrainStep(model, adamw(handle, capturable=True), bert_batch(0, dev), warmup=1)
    step(bert_batch(0, dev))
    step(bert_batch(1, dev))
    with pytest.raises(GraphCaptureError, match=r"batch\['input_ids'\]: shape \(4, 20\)"):
        step(bert_batch(2, dev, length=20))


@needs_cuda
def test_eager_attention_mask_copy_is_refused_with_cudas_reason():
    # seen on the H200 (session 9, call 1): transformers' eager attention makes its mask with
    # torch.tensor(0.0, device=cuda), a copy from pageable host memory; compiled, it is traced
    dev = torch.device("cuda")
    model, handle = adapted(lora_spec(), dev, attn_implementation="eager")
    step = GraphedTrainStep(model, adamw(handle, capturable=True), bert_batch(0, dev), warmup=1)
    step(bert_batch(0, dev))
    stream = torch.cuda.current_stream(dev)
    with pytest.raises(GraphCaptureError, match=r"cannot be captured as one CUDA graph: Cannot copy between CPU "
                                                r"and CUDA tensors during CUDA graph capture"):
        step(bert_batch(1, dev))
    _assert_usable_after_a_refused_capture(dev, stream)


def _assert_usable_after_a_refused_capture(dev: torch.device, stream) -> None:
    # a refused capture leaves the process as it was (session 14: the CUDA generator stayed in
    # capture mode, so every later random op failed with "Offset increment outside graph capture
    # encountered unexpectedly", and the caller's work ran on the capture's side stream)
    assert torch.cuda.current_stream(dev) == stream
    a, b = torch.randn(64, device=dev), torch.randn(64, device=dev)
    assert not torch.equal(a, b)
    kept = nn.functional.dropout(torch.ones(4096, device=dev), p=0.5, training=True)
    assert 0 < int((kept == 0).sum()) < 4096
    # and a train step that can be captured still is, and replays
    model, handle = adapted(lora_spec(), dev)
    step = GraphedTrainStep(model, adamw(handle, capturable=True), bert_batch(0, dev), warmup=1)
    losses = [float(step(bert_batch(i, dev))) for i in range(3)]
    assert step.graph is not None and all(math.isfinite(x) for x in losses)


class _Syncing(nn.Module):
    """A model whose forward reads a value on the host (``.item()``): no capture can hold it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        scale = float((x.sum() > 0).item()) + 1.0
        return {"loss": (x * self.w * scale).sum()}


@needs_cuda
def test_host_sync_in_forward_is_refused():
    dev = torch.device("cuda")
    model = _Syncing().to(dev)
    step = GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True),
                            {"x": torch.randn(8, device=dev)}, warmup=1)
    step({"x": torch.randn(8, device=dev)})  # eager: fine
    stream = torch.cuda.current_stream(dev)
    with pytest.raises(GraphCaptureError, match=r"cannot be captured as one CUDA graph"):
        step({"x": torch.randn(8, device=dev)})
    _assert_usable_after_a_refused_capture(dev, stream)
