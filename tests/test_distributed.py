"""Data-parallel training (``--distributed ddp|fsdp2``) on CPU with the gloo backend: two processes
started with torch.multiprocessing, as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

The claim checked: two processes, each training on its share of every micro-batch, end with the
adapter of a one-process run on the same global batches (float tolerance: the shares' losses are
summed in another order); checkpoints are written once, by rank 0; a run resumes with another
process count (1 -> 2 and 2 -> 1); a rank killed mid-run leaves the last checkpoint complete.

The micro-batches are chosen to be awkward: 3 rows over 2 ranks (shares of 2 and 1 rows), a last
micro-batch of 1 row (rank 1 takes part at weight 0), LM rows of different lengths (the loss
is a mean over target tokens, so the shares are weighted by tokens, not rows), and the UniPELT spec
(gated LoRA, gated prefix with its MLP, gated adapter).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from unipelt.data import Example
from unipelt.train import TrainConfig, TrainingError, list_checkpoints, train

SPEC = "specs/unipelt.yaml"
ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-4, atol=1e-5)
# fork: the workers start with torch, transformers and unipelt already imported (spawn re-imports
# them in each worker: about 6 s of CPU apiece on the 2-core runner)
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch built without torch.distributed / gloo")


def lm_rows() -> list[Example]:
    # lengths differ: the LM loss is a mean over target tokens, so each rank's share is weighted by them
    return [Example(text=f"the cat number {i} sat" + " on the mat" * (i % 4), line=i + 1) for i in range(10)]


def cls_rows() -> list[Example]:
    return [Example(text=("good fine great " if i % 3 else "bad awful poor ") + str(i) * (1 + i % 3),
                    label="pos" if i % 3 else "neg", line=i + 1) for i in range(10)]


# 10 rows in micro-batches of 3: 3, 3, 3, 1 (the last leaves rank 1 without rows)
LM = dict(model="tiny-llama", rows="lm", cfg=dict(epochs=3, batch_size=3, grad_accum=2, lr=1e-2, save_steps=1,
                                                   save_total_limit=None, progress=False, device="cpu", seed=3))
CLS = dict(model="tiny-bert", rows="cls", cfg=dict(epochs=2, batch_size=3, lr=1e-2, progress=False, device="cpu",
                                                    seed=1))


def _config(case: dict, out: Path, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out), **{**case["cfg"], **kw})


def _train(case: dict, cfg: TrainConfig):
    """``train`` on the case's model; BERT's dropout is turned off (a one-process run and two
    processes draw different dropout masks for the same row, so only dropout-free runs agree)."""
    from unipelt.models import load_model

    if case["model"] != "tiny-bert":
        return train(SPEC, case["model"], _rows(case), None, cfg)
    net, tok = load_model("tiny-bert", task="classification", num_labels=2)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return train(SPEC, net, _rows(case), None, cfg, tokenizer=tok)


def _rows(case: dict) -> list[Example]:
    return lm_rows() if case["rows"] == "lm" else cls_rows()


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def assert_same_adapter(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------
# two processes, as torchrun starts them
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, case: dict, out: str, kw: dict, kill_at: int | None) -> None:
    """One process of the run: the launcher's environment, then ``train`` as ``unipelt train`` calls it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.chdir(ROOT)
    torch.set_num_threads(1)
    if kill_at is not None and rank == 1:
        import unipelt.training.loop as loop

        original = loop._optimizer_step

        def dying_step(run, micro, t_start):
            if run.state.step == kill_at:  # killed as a crashed GPU or OOM-killer would: no cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            original(run, micro, t_start)

        loop._optimizer_step = dying_step
    try:
        report = _train(case, _config(case, Path(out), **kw))
        if rank == 0:
            torch.save({"distributed": report["distributed"], "epochs": report["epochs"],
                        "steps": report["steps"]}, Path(out) / "rank0-report.pt")
        if kw.get("distributed") == "fsdp2":
            # merging into a base FSDP2 sharded is refused with a message, not an error from DTensor
            try:
                report.handle.merge()
                message = "merged"
            except Exception as e:  # noqa: BLE001 - the message is the test's subject
                message = f"{type(e).__name__}: {e}"
            (Path(out) / f"merge-rank{rank}.txt").write_text(message)
    except BaseException:
        (Path(out) / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def run_two(case: dict, out: Path, kill_at: int | None = None, **kw) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(2, _free_port(), case, str(out), kw, kill_at), nprocs=2, join=False,
                             start_method=START)
    try:
        while not ctx.join(timeout=120):
            pass
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-rank*.txt")))
        raise AssertionError(f"a rank failed:\n{errors}") from None


@pytest.fixture(scope="module")
def lm_reference(tmp_path_factory) -> Path:
    """The one-process LM run every two-process run is compared with (checkpoints at every step)."""
    out = tmp_path_factory.mktemp("lm-one") / "run"
    train(SPEC, LM["model"], lm_rows(), None, _config(LM, out))
    return out


# ------------------------------------------------------------------------------------------
# equality with the one-process run
# ------------------------------------------------------------------------------------------
def test_ddp_two_processes_train_the_one_process_adapter(tmp_path):
    """DDP, classification (BERT, the head added and trained in place, gated prefix MLP): the same
    adapter, the same per-epoch losses, one set of checkpoints written by rank 0."""
    one = tmp_path / "one"
    ref = _train(CLS, _config(CLS, one))
    two = tmp_path / "two"
    run_two(CLS, two, distributed="ddp")
    assert_same_adapter(adapter(two / "adapter"), adapter(one / "adapter"))
    rep = torch.load(two / "rank0-report.pt", weights_only=False)
    assert rep["distributed"]["mode"] == "ddp" and rep["distributed"]["world_size"] == 2
    assert rep["steps"] == ref["steps"] == 8
    for got, want in zip(rep["epochs"], ref["epochs"]):  # the step losses are summed over the ranks
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    assert [p.name for p in list_checkpoints(two)] == [p.name for p in list_checkpoints(one)]
    assert not [p.name for p in two.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # the checkpoint's state is the global position, the same as the one-process run's
    got, want = (json.loads((list_checkpoints(d)[-1] / "trainer_state.json").read_text()) for d in (two, one))
    assert {k: got[k] for k in ("step", "epoch", "group_in_epoch", "fingerprint")} == \
        {k: want[k] for k in ("step", "epoch", "group_in_epoch", "fingerprint")}


def test_fsdp2_resumes_a_one_process_checkpoint_with_two_processes(tmp_path, lm_reference):
    """FSDP2 (the frozen Llama base sharded per block, the adapter whole on each rank), causal LM:
    resuming the one-process run's checkpoint-2 with two processes ends with its final adapter;
    merging into the sharded base is refused with a message."""
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(lm_reference / "checkpoint-2", part / "checkpoint-2")
    run_two(LM, part, distributed="fsdp2", resume=True)
    assert_same_adapter(adapter(part / "adapter"), adapter(lm_reference / "adapter"))
    rep = torch.load(part / "rank0-report.pt", weights_only=False)
    assert rep["distributed"]["mode"] == "fsdp2" and rep["steps"] == 6
    for rank in (0, 1):
        msg = (part / f"merge-rank{rank}.txt").read_text()
        assert msg.startswith("ModelError") and "FSDP2" in msg and "unipelt merge" in msg, msg
    # the checkpoints the two-process run wrote resume a one-process run to the same end
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(part / "checkpoint-4", again / "checkpoint-4")
    train(SPEC, LM["model"], lm_rows(), None, _config(LM, again, resume=True))
    assert_same_adapter(adapter(again / "adapter"), adapter(lm_reference / "adapter"))


def test_a_killed_rank_leaves_the_last_checkpoint_complete(tmp_path, lm_reference):
    """DDP, causal LM, a checkpoint every step: rank 1 is killed (SIGKILL) as step 4 begins. The
    launcher stops rank 0; checkpoint-3 is complete, and one process resumes it to the end of the
    one-process run."""
    out = tmp_path / "run"
    with pytest.raises(mp.ProcessExitedException) as failed:
        run_two(LM, out, kill_at=3, distributed="ddp")
    assert failed.value.error_index == 1 and failed.value.exit_code == -signal.SIGKILL
    assert list_checkpoints(out)[-1].name == "checkpoint-3"
    assert not (out / "adapter").exists()
    assert_same_adapter(adapter(out / "checkpoint-3" / "adapter"), adapter(lm_reference / "checkpoint-3" / "adapter"))
    report = train(SPEC, LM["model"], lm_rows(), None, _config(LM, out, resume=True))
    assert report["resumed_from"].endswith("checkpoint-3") and report["distributed"]["mode"] == "none"
    assert_same_adapter(adapter(out / "adapter"), adapter(lm_reference / "adapter"))


# ------------------------------------------------------------------------------------------
# choices and refusals (one process, no process group)
# ------------------------------------------------------------------------------------------
def test_mode_choice_and_launch_errors(monkeypatch, tmp_path):
    from unipelt.training.distributed import choose_mode, setup

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    assert choose_mode("auto", 1) == "none" and choose_mode("auto", 2) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
    assert choose_mode("auto", 2) == "fsdp2" and choose_mode("ddp", 2) == "ddp"
    with pytest.raises(TrainingError, match="--distributed none, but the launcher started 2 processes"):
        choose_mode("none", 2)
    with pytest.raises(TrainingError, match="no launcher environment.*torchrun --nproc-per-node N -m unipelt"):
        setup("ddp", "cpu")
    with pytest.raises(TrainingError, match="unknown distributed mode 'dp'"):
        train(SPEC, "tiny-llama", lm_rows(), None, TrainConfig(distributed="dp"))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TrainingError, match="WORLD_SIZE='two': not an integer"):
        setup("auto", None)


def test_fsdp2_refuses_a_quantized_base_before_sharding():
    """A base with integer (packed 4-bit/8-bit) weights is refused by name, before any collective."""
    import unipelt
    from unipelt.errors import ModelError
    from unipelt.models import load_model
    from unipelt.training.distributed import DistContext, wrap

    net, _ = load_model("tiny-llama")
    handle = unipelt.compile(net, {"version": 1, "modules": {"lora": {"method": "lora", "sites": "attn.q", "r": 2}}})
    mlp = net.model.layers[0].mlp.down_proj
    mlp.weight = torch.nn.Parameter(torch.zeros(mlp.weight.shape, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ModelError, match=r"fsdp2: the base holds quantized parameters \(model\.layers\.0\.mlp"
                                         r"\.down_proj\.weight: torch\.uint8"):
        wrap(DistContext(mode="fsdp2", world=2, device=torch.device("cpu")), net, handle)
    # a base parameter left trainable outside the adapter is refused for both modes
    net.model.norm.weight.requires_grad_(True)
    with pytest.raises(ModelError, match=r"ddp: base parameters require grad but are not the adapter's "
                                         r"\(model\.norm\.weight\)"):
        wrap(DistContext(mode="ddp", world=2, device=torch.device("cpu")), net, handle)


# ------------------------------------------------------------------------------------------
# the user's own Trainer script, started on two processes
# ------------------------------------------------------------------------------------------
TRAINER_SPEC = {"version": 1, "modules": {
    "lora": {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4, "gate": True},
    "head": {"method": "train", "sites": "head"}}}


def _trainer_run(out: Path, per_device_batch: int) -> dict[str, torch.Tensor]:
    """A compiled classifier trained by transformers' Trainer, as a user's script would; returns
    the adapter's tensors at the end (on every rank)."""
    from transformers import Trainer, TrainingArguments

    import unipelt
    from unipelt.data import collate, encode_classification
    from unipelt.models import load_model
    from unipelt.train import UnipeltCallback, param_groups

    model, tok = load_model("tiny-bert", task="classification", num_labels=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    handle = unipelt.compile(model, TRAINER_SPEC)
    rows = [vars(r) for r in encode_classification(cls_rows()[:8], tok, ["neg", "pos"], 32)]
    args = TrainingArguments(str(out), report_to=[], use_cpu=True, num_train_epochs=2, save_steps=2,
                             per_device_train_batch_size=per_device_batch, learning_rate=1e-2, disable_tqdm=True,
                             logging_strategy="no", seed=5, save_only_model=True,
                             # Trainer multiplies the loss by the world size when it counts loss items
                             # across devices, for losses that divide by that count; a classifier's
                             # mean loss does not, so its gradients would double (and clip differently)
                             average_tokens_across_devices=False,
                             ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(b, tok.pad_token_id),
                      optimizers=(torch.optim.AdamW(param_groups(handle, 1e-2)), None),
                      callbacks=[UnipeltCallback(handle, out)])
    trainer.train()
    return {k: v.detach().clone() for k, v in handle.state_dict().items()}


def _trainer_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.save(_trainer_run(Path(out), 2), Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def test_trainer_script_on_two_processes_trains_the_one_process_adapter(tmp_path):
    """transformers' Trainer (through accelerate, DDP over gloo) trains a compiled model as it is:
    both ranks end with the same adapter, which is the one a single process trains on the same
    global batches (4 rows a step: 2 per rank); UnipeltCallback saves once, from rank 0."""
    pytest.importorskip("accelerate")
    two = tmp_path / "two"
    two.mkdir()
    ctx = mp.start_processes(_trainer_worker, args=(2, _free_port(), str(two)), nprocs=2, join=False,
                             start_method=START)
    try:
        while not ctx.join(timeout=120):
            pass
    except mp.ProcessRaisedException:
        raise AssertionError("a rank failed:\n" + "\n".join(p.read_text() for p in two.glob("error-rank*.txt"))) \
            from None
    ranks = [torch.load(two / f"rank{r}.pt") for r in (0, 1)]
    assert_same_adapter(ranks[1], ranks[0])
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    one = _trainer_run(tmp_path / "one", 4)
    assert_same_adapter(ranks[0], one)
    saved = adapter(two / "adapter")
    assert_same_adapter({k: saved[k] for k in one}, one)
    assert sorted(p.parent.name for p in two.glob("checkpoint-*/adapter")) == ["checkpoint-2", "checkpoint-4"]


# ------------------------------------------------------------------------------------------
# benchmarks/speed.py --gpus 2, on CPU (the timings are noise here; the harness is checked)
# ------------------------------------------------------------------------------------------
def _speed_worker(rank: int, world: int, port: int, out: str) -> None:
    import importlib.util

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    spec = importlib.util.spec_from_file_location("speed_gpus", ROOT / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = speed  # dataclasses resolve annotations through the module
    spec.loader.exec_module(speed)
    code = speed.main(["--gpus", "2", "--tiny", "--device", "cpu", "--scenarios", "llama", "--variants",
                       "lora-r8-qv,full", "--warmup", "1", "--iters", "2", "--out", out])
    if code:
        raise SystemExit(code)


def test_speed_benchmark_gpus_2_records_scaling_and_memory_per_rank(tmp_path):
    out = tmp_path / "gpus.jsonl"
    ctx = mp.start_processes(_speed_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False,
                             start_method=START)
    while not ctx.join(timeout=120):
        pass
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    head, recs = lines[0], lines[1:]
    assert head["gpus"] == 2 and head["distributed_modes"] == ["ddp", "fsdp2"]
    assert head["command"].startswith("torchrun --nproc-per-node 2 benchmarks/speed.py --gpus 2")
    by = {(r["variant"], r.get("distributed")): r for r in recs}
    assert by[("full", None)]["error"] == "--gpus measures unipelt variants"  # recorded, not measured
    one = by[("lora-r8-qv", "none")]
    assert one["gpus"] == 1 and one["error"] is None and one["median_ms"] > 0
    for mode in ("ddp", "fsdp2"):
        r = by[("lora-r8-qv", mode)]
        assert r["error"] is None and r["gpus"] == 2 and len(r["ranks"]) == 2
        assert r["slowest_median_ms"] == max(x["median_ms"] for x in r["ranks"])
        assert r["scaling_efficiency"] == pytest.approx(one["median_ms"] / r["slowest_median_ms"], rel=1e-3)
        assert r["examples_per_s_per_gpu"] == pytest.approx(2 / (r["slowest_median_ms"] / 1e3), rel=1e-3)


# ------------------------------------------------------------------------------------------
# the command line under torchrun
# ------------------------------------------------------------------------------------------
def test_torchrun_module_entry_trains_and_rank_0_alone_prints(tmp_path):
    """``torchrun --nproc-per-node 2 -m unipelt train ...`` (the real launcher and module entry):
    DDP over gloo, one adapter and report, the result printed once."""
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in lm_rows()))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "unipelt", "train", SPEC, "tiny-llama", "--data", str(data), "--out", str(out), "--max-steps", "2",
         "--batch-size", "3", "--device", "cpu", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [x.split()[0] for x in lines if x.startswith(("task ", "adapter ", "report "))] == \
        ["task", "adapter", "report"], proc.stdout  # rank 1 prints nothing
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"] == {"mode": "ddp", "world_size": 2, "rank": 0, "backend": "gloo",
                                     "find_unused_parameters": False}
    assert report["steps"] == 2 and (out / "adapter" / "adapter.safetensors").is_file()
