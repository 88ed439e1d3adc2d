# CPU probe, session 7: python THIS_FILE TREE VARIANTS (PYTHONPATH=TREE/.pyshim)
import sys, logging, io
root = sys.argv[1]
exec(open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'bert_graph_probe.py')).read().split("from torch._dynamo.backends.common")[0])
import torch._logging
buf = io.StringIO()
h = logging.StreamHandler(buf)
logging.getLogger("torch._dynamo.guards").addHandler(h)
torch._logging.set_logs(guards=True)
scn = speed.Scenario("bert", "bert", {**speed._BERT_CLS, "hidden_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4,
                     "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 64}, (2, 16), (2, 16),
                     speed._BERT_LINEARS, speed._BERT_PEFT_ALL, ("query", "value"))
for v in sys.argv[2].split(","):
    torch._dynamo.reset(); buf.truncate(0); buf.seek(0)
    prep = speed.prepare(speed.VARIANTS[v], scn, "train", torch.device("cpu"), torch.float32)
    fn = torch.compile(prep.model, backend="eager", fullgraph=True)
    batch = speed.make_batch(scn, "train", 512, torch.device("cpu"))
    fn(**batch).loss.backward()
    text = buf.getvalue()
    lines = [l for l in text.splitlines() if l.strip().startswith(("|", "+-", "TREE_GUARD", "GuardManager")) or "Guard" in l]
    print(v, "guard log lines", len(text.splitlines()), "guard-ish", len(lines))
    open(f"/tmp/kern_guards_{v}_{root.replace('/','_')}.txt", "w").write(text)
