"""AdapterDrop (Rücklé et al., 2021): dropped layers' branches are not computed (checked against a
model built without them), random per-step drops during training come back to the inference
choice after each step, the gradient-norm ranking is g_l = ||dL/dTheta_l|| and its choice is
recorded in the spec, so the saved adapter loads with it."""
from __future__ import annotations

import json
import random

import pytest
import torch

import unipelt
from conftest import make_batch, make_llama, randomize
from unipelt.data import Example
from unipelt.errors import SpecError
from unipelt.train import TrainConfig, train
from unipelt.training.optim import collect_controllers

LORA = {"method": "lora", "sites": ["attn.q", "attn.v"], "r": 4}
ADAPTER = {"method": "adapter", "sites": "ffn.out", "reduction_factor": 4}


# the controllers' plugin registered for every test here (conftest.prune_plugin)
pytestmark = pytest.mark.usefixtures("prune_plugin")


def spec(drop=None, layers="all", **mods) -> dict:
    s = {"version": 1, "modules": {"lora": dict(LORA, layers=layers), "adapter": dict(ADAPTER, layers=layers)}}
    if drop is not None:
        s["drop"] = drop
    return s


def out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_fixed_drop_equals_a_model_without_those_layers():
    batch = make_batch()
    model = make_llama(layers=3)
    h = unipelt.compile(model, spec())
    randomize(h)
    full = out(model, batch)
    ref_model = make_llama(layers=3)
    ref = unipelt.compile(ref_model, spec(layers=[1]))
    ref.load_state_dict({k: v for k, v in h.state_dict().items() if k in ref.state_dict()})
    dropped_model = make_llama(layers=3)
    d = unipelt.compile(dropped_model, spec(drop={"layers": [0, 2]}))
    d.load_state_dict(h.state_dict())
    assert all(e.dropped == (e.layer != 1) for e in d.entries.values())
    torch.testing.assert_close(out(dropped_model, batch), out(ref_model, batch), rtol=0, atol=0)
    assert not torch.allclose(out(dropped_model, batch), full)
    # dropped branches keep their parameters (a later choice may use them): all are saved
    assert sorted(d.state_dict()) == sorted(h.state_dict())


def test_drop_modules_restricts_what_is_dropped():
    model = make_llama()
    h = unipelt.compile(model, spec(drop={"layers": [0], "modules": ["adapter"]}))
    assert {k for k, e in h.entries.items() if e.dropped} == {"adapter.0.ffn.out"}


def test_spec_errors_name_the_field():
    for drop, where in [({"layers": [0], "lowest": 1}, "drop"), ({"lowest": 0}, "drop.lowest"),
                        ({"layers": [0], "random": 2}, "drop.random"), ({"layers": [0], "modules": ["x"]},
                                                                        r"drop.modules\[0\]"),
                        ({"lowest": 1, "random": True}, "drop.random"), ({"layers": [0], "rank_steps": 3},
                                                                         "drop.rank_steps")]:
        with pytest.raises(SpecError, match=where):
            unipelt.compile(make_llama(), spec(drop=drop))
    with pytest.raises(SpecError, match=r"drop.layers.*out of range"):
        unipelt.compile(make_llama(), spec(drop={"layers": [5]}))


def test_random_drop_per_step_then_back_to_the_inference_choice():
    model = make_llama(layers=4)
    h = unipelt.compile(model, spec(drop={"layers": [3], "random": True}))
    (c,) = collect_controllers(h)
    assert {e.layer for e in h.entries.values() if e.dropped} == {3}
    seen = set()
    for step in range(12):
        c.before_step(step)
        now = sorted({e.layer for e in h.entries.values() if e.dropped})
        n = len(now)
        assert now == list(range(n))  # the paper's scheme: the first n layers
        rng = random.Random(f"{c.seed}:{step}")
        assert n == rng.randint(0, 3)  # a function of the seed and the step alone (resume); the last layer trains
        seen.add(n)
        # what runs is decided at refresh: the dropped layers' branches have no gradient
        model.zero_grad(set_to_none=True)
        model(**make_batch()).logits.sum().backward()
        for k, e in h.entries.items():
            grads = [p.grad for p in e.branch.parameters()]
            assert all(g is None for g in grads) if e.dropped else all(g is not None for g in grads), k
        c.on_step(step + 1, None)
        assert {e.layer for e in h.entries.values() if e.dropped} == {3}
    assert len(seen) > 2


def test_probability_drop_is_independent_per_layer():
    model = make_llama(layers=4)
    h = unipelt.compile(model, spec(drop={"layers": [0], "random": 0.5}))
    (c,) = collect_controllers(h)
    patterns = set()
    for step in range(20):
        c.before_step(step)
        patterns.add(tuple(sorted({e.layer for e in h.entries.values() if e.dropped})))
    assert any(p and p[0] != 0 for p in patterns)  # not only prefixes of the layer list


def test_gradient_norm_ranking_is_the_formula_and_its_choice_is_saved(tmp_path):
    model = make_llama(layers=3)
    h = unipelt.compile(model, spec(drop={"lowest": 1, "rank_steps": 1, "modules": ["lora"]}))
    randomize(h)
    (c,) = collect_controllers(h)
    c.before_step(0)
    model(**make_batch(), labels=make_batch()["input_ids"]).loss.backward()
    expected = []
    for layer in range(3):
        sq = sum(float(p.grad.pow(2).sum()) for k in (f"lora.{layer}.attn.q", f"lora.{layer}.attn.v")
                 for p in h.branch_modules[k].parameters())
        expected.append(sq ** 0.5)
    c.on_step(1, None)
    (ev,) = c.events()
    assert ev["event"] == "dropped" and ev["layers"] == [min(range(3), key=expected.__getitem__)]
    for layer in range(3):
        assert ev["grad_norm"][str(layer)] == pytest.approx(expected[layer], rel=1e-5)
    low = ev["layers"][0]
    assert {k for k, e in h.entries.items() if e.dropped} == {f"lora.{low}.attn.q", f"lora.{low}.attn.v"}
    h.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "unipelt.json").read_text())["spec"]["drop"] == {"layers": [low],
                                                                                          "modules": ["lora"]}
    fresh = make_llama(layers=3)
    loaded = unipelt.load(fresh, tmp_path / "a")
    assert {k for k, e in loaded.entries.items() if e.dropped} == {f"lora.{low}.attn.q", f"lora.{low}.attn.v"}
    model.eval()
    torch.testing.assert_close(out(fresh, make_batch()), out(model, make_batch()))


def test_random_drop_in_training_and_resume(tmp_path):
    rows = [Example(text=f"the cat number {i} sat on the mat", line=i + 1) for i in range(8)]
    s = {"version": 1, "modules": {"lora": LORA}, "drop": {"layers": [0], "random": True}}
    kw = dict(epochs=1, batch_size=2, lr=1e-2, save_steps=1, save_total_limit=None, progress=False)
    full = train(s, "tiny-llama", rows, None, TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    assert full["controllers"]["adapterdrop"]["inference_layers"] == [0]
    part = tmp_path / "part"
    part.mkdir()
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-2", part / "checkpoint-2")
    train(s, "tiny-llama", rows, None, TrainConfig(out_dir=str(part), resume=True, **kw))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(part / "adapter" / "adapter.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the same per-step choices after resuming


def test_random_drop_under_torch_compile_is_one_graph_per_choice():
    """fullgraph capture sees a static structure per choice: at most L graphs for `random: true`
    (n in 0..L-1), each equal to the eager forward with the same choice."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = make_llama(layers=3)
    h = unipelt.compile(model, spec(drop={"layers": [0], "random": True}))
    randomize(h)
    (c,) = collect_controllers(h)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    batch = make_batch()
    for step in range(10):
        c.before_step(step)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits)
        c.on_step(step + 1, None)
    assert 1 < len(graphs) <= 3
    torch._dynamo.reset()


def _drop_cli_run(tmp_path, drop, *extra):
    from unipelt.cli import main

    s = {"version": 1, "modules": {"lora": LORA}, "drop": drop}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(s))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat"}) + "\n" for i in range(6)))
    out = tmp_path / "run"
    code = main(["train", str(path), "tiny-llama", "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                 "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("progress", [True, False])
def test_fixed_drop_is_reported_by_train(tmp_path, capsys, progress):
    """A fixed AdapterDrop (`drop: {layers: ...}`) had no controller: `unipelt train` said nothing
    of the dropped layers (random and ranked drops and pruning did) and report.json had no record.
    Now one event at the start (in the progress output and in controllers.adapterdrop.events), the
    layers in the report, and a summary line."""
    report = _drop_cli_run(tmp_path, {"layers": [0]}, *([] if progress else ["--no-progress"]))
    cap = capsys.readouterr()
    text = cap.out + cap.err
    ctl = report["controllers"]["adapterdrop"]
    assert ctl["inference_layers"] == [0] and ctl["training_layers"] == [0]
    (ev,) = ctl["events"]
    assert ev["event"] == "dropped" and ev["layers"] == [0] and ev["step"] == 0
    assert "adapterdrop   layers 0 dropped in training and at inference" in text
    p = report["params"]
    assert p["dropped"] > 0 and p["active"] == p["kept"] - p["dropped"]
    assert f"{p['dropped']:,} of them in AdapterDrop's fixed layers, saved but not computed" in text
    if progress:
        assert "step 0: adapterdrop dropped (layers=[0]" in text
    # the fixed choice changes nothing between steps: a fixed drop trains as before (one graph)
    assert report["controllers"]["adapterdrop"]["random"] is False


def test_fixed_drop_event_once_after_resume(tmp_path):
    rows = [Example(text=f"the cat number {i} sat on the mat", line=i + 1) for i in range(8)]
    s = {"version": 1, "modules": {"lora": LORA}, "drop": {"layers": [1]}}
    kw = dict(batch_size=2, lr=1e-2, save_steps=1, save_total_limit=None, progress=False)
    train(s, "tiny-llama", rows, None, TrainConfig(out_dir=str(tmp_path / "r"), max_steps=2, **kw))
    rep = train(s, "tiny-llama", rows, None, TrainConfig(out_dir=str(tmp_path / "r"), max_steps=4, resume=True, **kw))
    evs = rep["controllers"]["adapterdrop"]["events"]
    assert [e["event"] for e in evs] == ["dropped"] and evs[0]["layers"] == [1]


def test_fixed_drop_does_not_stop_a_graphed_step():
    """The fixed choice's controller only reports (static): one CUDA graph per step may replay it;
    the random choice still changes what runs and is refused."""
    from unipelt.training.graphed import GraphCaptureError, check_adapters

    model = make_llama(layers=3)
    unipelt.compile(model, spec(drop={"layers": [0]}))
    check_adapters(model)
    model = make_llama(layers=3)
    unipelt.compile(model, spec(drop={"random": True}))
    with pytest.raises(GraphCaptureError, match="adapterdrop"):
        check_adapters(model)


def test_compile_report_says_dropped_groups_are_not_computed():
    """The compile report said a dropped layer's fusion group was 'computed alone (fewer than two
    live readers ...)': nothing of it is computed."""
    from unipelt.report import report_dict

    s = {"version": 1, "modules": {"lora": dict(LORA, gate={"input": "layer"})}, "drop": {"layers": [0]}}
    h = unipelt.compile(make_llama(layers=3), s)
    groups = {g["layer"]: g for g in report_dict(h)["fusion_groups"]}
    assert "not computed" in groups[0]["reason"] and "AdapterDrop" in groups[0]["reason"]
    assert "not computed" not in groups[1]["reason"]
