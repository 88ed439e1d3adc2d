# CPU probe, session 7: python THIS_FILE TREE VARIANTS (PYTHONPATH=TREE/.pyshim)
# ops dispatched outside the compiled graph in one compiled train step (CPU, aot_eager): old vs new tree
import sys, collections
root = sys.argv[1]
exec(open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'bert_graph_probe.py')).read().split("from torch._dynamo.backends.common")[0])
from torch.profiler import profile, ProfilerActivity
scn = speed.Scenario("bert", "bert", {**speed._BERT_CLS, "hidden_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
                     "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 64}, (2, 16), (2, 16),
                     speed._BERT_LINEARS, speed._BERT_PEFT_ALL, ("query", "value"))
for v in sys.argv[2].split(","):
    torch._dynamo.reset()
    prep = speed.prepare(speed.VARIANTS[v], scn, "train", torch.device("cpu"), torch.float32)
    model = prep.model; model.train()
    fn = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = torch.optim.AdamW(prep.params, lr=1e-4)
    batch = speed.make_batch(scn, "train", 512, torch.device("cpu"))
    def fwdbwd():
        fn(**batch).loss.backward()
    for _ in range(3):
        fwdbwd(); opt.step(); opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwdbwd()
    ev = prof.events()
    # top-level ranges: everything not inside a CompiledFunction / its backward
    comp = [e for e in ev if "CompiledFunction" in e.name or "Torch-Compiled Region" in e.name]
    spans = [(e.time_range.start, e.time_range.end) for e in comp]
    def inside(e):
        return any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans)
    outside = collections.Counter(e.name for e in ev if e.name.startswith("aten::") and not inside(e))
    print(v, "compiled ranges", collections.Counter(e.name for e in comp), "aten ops outside:", sum(outside.values()), outside.most_common(10))
