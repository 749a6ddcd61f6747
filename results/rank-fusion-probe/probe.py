"""Scratch probe: rank-based fusions against today's score fusion, on the kept candidate scores.

    python results/rank-fusion-probe/probe.py   (from the repository root; prints recall@1 %)

Reciprocal rank fusion (each signal's rank r among a question's candidates counts w / (k + r))
and z-scored fusion (each signal standardised over the question's candidates, then weighted),
against the engine's fusion (adapter 0.25, dense 30, BM25 48, noise 3, floor 16), on the same
sets as benchmarks/fusion_kept.py. Not a setting: a record of what did not pay.
"""
import gzip, json, sys
sys.path.insert(0, "benchmarks")
R = "results/"
def load(p): return json.load(gzip.open(p, "rt"))
obs = load(R+"locomo-observations-candidates.json.gz")
turns = load(R+"locomo-turns-today/locomo-turns-candidates.json.gz")
demo = load(R+"demo-candidates.json.gz")
TUNE = ("conv-26", "conv-30", "conv-41"); HELD = ("conv-42", "conv-43")
sets = {"obs tune": [q for c in TUNE for q in obs[c]], "obs held": [q for c in HELD for q in obs[c]],
        "turns tune": [q for c in TUNE for q in turns[c]], "turns held": [q for c in HELD for q in turns[c]], "demo": demo}
def fused(c, a=0.25, d=30, b=48, noise=3, floor=16):
    scale = max(max(v[2] for v in c.values()), floor)
    return {m: a*v[0] + d*v[1] + b/scale*max(0, v[2]-noise) for m, v in c.items()}
def ranks(vals):  # rank 1 = best
    order = sorted(vals, key=lambda m: -vals[m])
    return {m: i+1 for i, m in enumerate(order)}
def rrf(c, w=(1,1,1), k=60):
    rs = [ranks({m: v[i] for m, v in c.items()}) for i in range(3)]
    return {m: sum(w[i]/(k+rs[i][m]) for i in range(3)) for m in c}
def znorm(c, w):
    out = {m: 0.0 for m in c}
    for i in range(3):
        xs = [v[i] for v in c.values()]; mu = sum(xs)/len(xs); sd = (sum((x-mu)**2 for x in xs)/len(xs))**.5 or 1
        for m, v in c.items(): out[m] += w[i]*(v[i]-mu)/sd
    return out
def r1(items, f):
    n = 0
    for q in items:
        s = f(q["candidates"]); top = max(s, key=lambda m: (s[m], m))
        n += top in q["gold"]
    return 100*n/len(items)
def row(name, f): print(f"{name:28s}", " ".join(f"{r1(v, f):5.1f}" for v in sets.values()))
print(" "*28, " ".join(f"{k[:5]:>5s}" for k in sets))
row("default fusion", fused)
for k in (1, 5, 20, 60):
    for w in ((1,1,1), (0.5,1,1), (0.5,1.5,1), (0.5,1,1.5), (0,1,1)):
        row(f"rrf k={k} w={w}", lambda c, w=w, k=k: rrf(c, w, k))
for w in ((0.5,1,1), (0.3,1,1), (0.3,1.5,1), (0.3,1,0.7), (0.2,1,1), (0,1,1), (0.5,1,0.5)):
    row(f"znorm w={w}", lambda c, w=w: znorm(c, w))
