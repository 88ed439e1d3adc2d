# CPU probe, session 7: python THIS_FILE TREE VARIANTS (PYTHONPATH=TREE/.pyshim): aten ops of the
# AOT graphs and the step time of a compiled tiny 12-layer BERT
# host cost of a compiled BERT LoRA r16 all-linear train step at a given tree (CPU, tiny shapes)
import sys, time, statistics, collections
root = sys.argv[1]
sys.path.insert(0, root + "/benchmarks")
import torch
torch.set_num_threads(1)
import speed
import importlib, tomllib
from unipelt import registry as reg
eps = tomllib.loads(open(root + "/pyproject.toml").read())["project"]["entry-points"]["unipelt"]
plugins = []
for target in eps.values():
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module.strip())
    plugins.append(getattr(obj, attr.strip()) if attr else obj)
reg.use_registry(reg.Registry(reg.make_plugin_manager(tuple(plugins), load_entrypoints=False)))
import unipelt_plugins; print("plugins from", unipelt_plugins.__file__)
import unipelt
print("unipelt from", unipelt.__file__)
from torch._dynamo.backends.common import aot_autograd
counts = {}
def counter(tag):
    def f(gm, ex):
        ops = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        counts[tag] = ops
        return gm.forward
    return f
backend = aot_autograd(fw_compiler=counter("fw"), bw_compiler=counter("bw"))
scn = speed.Scenario("bert", "bert", {**speed._BERT_CLS, "hidden_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
                     "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 64}, (2, 16), (2, 16),
                     speed._BERT_LINEARS, speed._BERT_PEFT_ALL, ("query", "value"))
for v in sys.argv[2].split(","):
    torch._dynamo.reset()
    prep = speed.prepare(speed.VARIANTS[v], scn, "train", torch.device("cpu"), torch.float32)
    model = prep.model; model.train()
    fn = torch.compile(model, backend=backend, fullgraph=True)
    opt = torch.optim.AdamW(prep.params, lr=1e-4)
    batch = speed.make_batch(scn, "train", 512, torch.device("cpu"))
    def step():
        fn(**batch).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3): step()
    # guard cost alone: the compiled forward under no_grad is not this graph; time fwd+bwd+opt
    ts = []
    for _ in range(40):
        t0 = time.perf_counter(); step(); ts.append((time.perf_counter() - t0) * 1e3)
    fw, bw = counts["fw"], counts["bw"]
    print(f"{v}: step {statistics.median(ts):.2f} ms; fw ops {sum(fw.values())}, bw ops {sum(bw.values())}")
    print("  fw top:", fw.most_common(8))
    print("  bw top:", bw.most_common(8))
