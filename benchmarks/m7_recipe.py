"""Choose m7's quick recipe on the world's validation split (never the test split): train SimCLR
or MoCo with one setting, print the linear-probe and kNN accuracy of the val split's features
(the CLS token and the mean patch token), and the untrained encoder's.

    python -m benchmarks.m7_recipe STEPS BATCH METHOD CROP_MIN JITTER HUE LR TEMPERATURE POOL
    python -m benchmarks.m7_recipe 600 128 simclr 0.8 0.8 0.5 1e-3 0.2 mean    # the quick recipe

The figures behind milestones/m7_ssl.py's recipe comment were printed by this script (one torch
thread, two runs at a time on a 2-core AMD EPYC). Probes: scikit-learn logistic regression on
5,000 training images' standardised features, weighted kNN (k 20, t 0.1), as eval/representation.py.
"""
import sys, time, torch, numpy as np
from sklearn.linear_model import LogisticRegression
from mmsys.ssl import SSLModel, SSLConfig
from mmsys.views import two_views, ViewConfig
from mmsys.train import Trainer, TrainConfig
from milestones.base import RunContext
from milestones.common import world_split
torch.set_num_threads(1)
steps, bs, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lo, js, hue, lr, tau, pool = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8]), sys.argv[9]
ctx = RunContext()
tr = world_split(ctx, "train", 20000, single=True, captions=False)
te = world_split(ctx, "val", 2000, single=True, captions=False)
cfg = SSLConfig(method=method, proj_hidden=512, temperature=tau, queue_size=4096, pool=pool)
torch.manual_seed(0)
model = SSLModel(cfg)
vc = ViewConfig(crop_scale=(lo, 1.0), brightness=js, contrast=js, saturation=js, hue=hue)
POOL = ["cls"]
def feats(m, x):
    m.eval()
    f = (lambda y: m.encoder.tokens(y)[0][:, 0]) if POOL[0] == "cls" else (lambda y: m.encoder.tokens(y)[0][:, 1:].mean(1))
    with torch.no_grad():
        return torch.cat([f(x[i:i+500].float()/127.5-1) for i in range(0, len(x), 500)]).numpy()
def probe(m, n=5000):
    a, b = feats(m, tr.images[:n]), feats(m, te.images)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    clf = LogisticRegression(max_iter=1000).fit((a-mu)/sd, tr.labels[:n].numpy())
    lin = clf.score((b-mu)/sd, te.labels.numpy())
    # kNN cos k=20
    an = a/np.linalg.norm(a,axis=1,keepdims=True); bn = b/np.linalg.norm(b,axis=1,keepdims=True)
    s = bn @ an.T; idx = np.argsort(-s, 1)[:, :20]; lab = tr.labels[:n].numpy()[idx]
    w = np.exp(np.take_along_axis(s, idx, 1)/0.1); votes = np.zeros((len(b), 10))
    for c in range(10): votes[:, c] = (w*(lab==c)).sum(1)
    return lin, (votes.argmax(1) == te.labels.numpy()).mean()
t0 = time.time(); print(sys.argv[1:], "untrained cls", probe(model), time.time()-t0, flush=True); POOL[0] = "mean"; print("untrained mean", probe(model), flush=True); POOL[0] = "cls"
def loss_fn(m, v):
    B = len(v); v = torch.cat([v[:, 0], v[:, 1]])
    return m.loss(v)
tcfg = TrainConfig(steps=steps, batch_size=bs, lr=lr, weight_decay=0.05, warmup_steps=min(50, steps//10), progress=False, log_every=50)
trainer = Trainer(model, tcfg, loss_fn=loss_fn, data_size=len(tr.images), get_batch=lambda idx, g: two_views(tr.images[idx], g, vc).view(2, len(idx), 3, 32, 32).transpose(0, 1), kind="ssl")
t0 = time.time(); s = trainer.fit(); print("train", time.time()-t0, s["final_metrics"], flush=True)
print("trained", probe(model)); POOL[0] = "mean"; print("trained mean-pool", probe(model))
