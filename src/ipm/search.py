"""Constrained recall: the model writes an ID, one trie edge at a time, and can write nothing else.

Beam search over the trie of live IDs. At each branching node the model's next-token logits
are computed for the allowed children only and renormalised over them, so an ID's score is
its probability among the IDs that exist (the scores of all IDs sum to 1). Single-child
chains are forced: they cost no choice, and their tokens are fed to the model together with
the next choice, in one forward pass. The prompt's keys and values are computed once per
question and shared by every beam.

Two decoders share this contract: `RunnerDecoder` (Llama-family models, fast path) and
`GenerateDecoder` (any HF causal LM, via `generate` with `prefix_allowed_tokens_fn`).

Hybrid decoding scores every ID of a small trie (the IDs that BM25 and dense retrieval
propose) in one forward pass with a tree-shaped attention mask (`RunnerDecoder.score`): the
same probabilities an exhaustive beam search gives. `fuse` combines them with the retrievers'
scores; optionally (`rerank`) the base model's likelihood of the question given each of the
best few candidates' texts (`query_likelihood`) orders those again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import PROMPT, Runner, prompt_ids
from .trie import Node, Trie


@dataclass(frozen=True)
class Signals:
    """What each scorer says about one candidate memory in hybrid decoding."""

    lora: float  # log-probability of the ID among the candidates, from the adapter
    dense: float  # cosine similarity of question and memory text (MiniLM)
    bm25: float  # the memory's BM25 score for the question (bm25s; 0 = no shared word)
    # log P(question | memory text) under the base model (query_likelihood); None where not
    # computed (rerank off, or the candidate was not among the best few)
    likelihood: float | None = None

    def to_dict(self) -> dict:
        out = {"lora": round(self.lora, 4), "dense": round(self.dense, 4), "bm25": round(self.bm25, 4)}
        return out if self.likelihood is None else {**out, "likelihood": round(self.likelihood, 4)}


def fuse(signals: dict[str, Signals], dense_weight: float, bm25_weight: float,
         lora_weight: float = 1.0, bm25_floor: float = 0.0, bm25_noise: float = 0.0) -> list[tuple[str, float]]:
    """Rank candidates by a product of experts, best first, with probabilities that sum to 1:
    p(id) ∝ p_lora(id)^lora_weight · exp(dense_weight·cosine
                                         + bm25_weight·max(0, bm25 - bm25_noise) / max(best bm25, bm25_floor)).

    BM25 scores are divided by the best one among the candidates (hybrid decoding's
    candidates always include BM25's own top pick), so a strong lexical match counts the same
    whatever the question's length. The floor keeps a weak one weak: a paraphrased question that shares one incidental word with
    some memory ("old" in "how old is our cat?" and "a 4-year-old corgi") would otherwise give
    that memory the full BM25 weight; below the floor, scores stay on their absolute scale.
    `bm25_noise` is the part of a BM25 score that one incidental shared word earns: taken off
    every candidate's score (never below 0), so that such a match adds nothing at all, and BM25
    can be given more weight where questions really share words with their memory."""
    if not signals:
        return []
    scale = max(max(s.bm25 for s in signals.values()), bm25_floor)
    bm25_factor = bm25_weight / scale if scale > 0 else 0.0
    return _ranked({mid: lora_weight * s.lora + dense_weight * s.dense + bm25_factor * max(0.0, s.bm25 - bm25_noise)
                    for mid, s in signals.items()})


def _ranked(z: dict[str, float]) -> list[tuple[str, float]]:
    """Log-scores turned into probabilities that sum to 1, best first (ties by ID)."""
    top = max(z.values())
    total = sum(math.exp(v - top) for v in z.values())
    return sorted(((mid, math.exp(v - top) / total) for mid, v in z.items()), key=lambda x: (-x[1], x[0]))


def rerank(fused: list[tuple[str, float]], likelihood: dict[str, float], weight: float) -> list[tuple[str, float]]:
    """`fused` (best first) ranked again by p(id) ∝ p_fused(id) · exp(weight · log P(question | text)),
    renormalised: the candidates in `likelihood` (the best few) by their own likelihood, the
    others, which were not read, by the lowest of those. So the ones read may change places
    among themselves but stay above the rest, in the order the fusion gave them."""
    if len(likelihood) < 2 or weight == 0:
        return fused
    floor = min(likelihood.values())
    return _ranked({mid: math.log(max(p, 1e-300)) + weight * likelihood.get(mid, floor) for mid, p in fused})


LIKELIHOOD_TEXT_TOKENS = 256  # a longer memory is read up to here: a bound on the rerank's cost


def likelihood_prompt(tokenizer, text: str) -> list[int]:
    """What the question's likelihood is conditioned on: the memory's text, then a cue."""
    text = " ".join(text.split())
    head = tokenizer(" " + text, add_special_tokens=False).input_ids
    if len(head) > LIKELIHOOD_TEXT_TOKENS:
        text = tokenizer.decode(head[:LIKELIHOOD_TEXT_TOKENS]).strip()
    return tokenizer(f"Memory: {text}\nA question about this memory:", add_special_tokens=True).input_ids


def query_likelihood(model, tokenizer, pairs: list[tuple[str, str]], device: str = "cpu") -> list[float]:
    """log P(question | memory text) for each (question, text), summed over the question's
    tokens, under the base model with any adapter turned off: a zero-shot judge of whether the
    text answers the question, as query-likelihood rerankers use a language model. Unlike the
    adapter (which maps questions to IDs it was trained on) and the retrievers (which compare
    words or one vector each), it reads the memory's text and the question together: on the
    demo set's paraphrased questions it ranks 75% of them first alone (the adapter 61%).
    One batched forward pass, logits only at the question's tokens."""
    import contextlib

    import torch

    if not pairs:
        return []
    seqs, asked = [], []
    for question, text in pairs:
        q = tokenizer(" " + " ".join(question.split()), add_special_tokens=False).input_ids
        seqs.append(likelihood_prompt(tokenizer, text) + q)
        asked.append(len(q))
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tokenizer.eos_token_id, dtype=torch.long)
    attention = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        attention[b, :len(s)] = 1
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    # Each question token is predicted from the position before it.
    rows = torch.tensor([b for b, (s, n) in enumerate(zip(seqs, asked)) for _ in range(n)])
    cols = torch.tensor([len(s) - n - 1 + j for s, n in zip(seqs, asked) for j in range(n)])
    targets = torch.tensor([t for s, n in zip(seqs, asked) for t in s[len(s) - n:]])
    with torch.inference_mode(), off:
        h = inner.get_decoder()(input_ids=ids.to(device), attention_mask=attention.to(device),
                                use_cache=False).last_hidden_state
        head = inner.get_output_embeddings()
        logp = torch.log_softmax(head(h[rows.to(device), cols.to(device)]).float(), dim=-1)
        token_logp = logp[torch.arange(len(targets), device=device), targets.to(device)].cpu()
    out, j = [], 0
    for n in asked:
        out.append(float(token_logp[j:j + n].sum()))
        j += n
    return out


@dataclass
class Beam:
    logp: float
    node: Node
    parent: int  # row of the parent beam in the previous step's key/value batch
    new_tokens: list[int]


class RunnerDecoder:
    """Beam search with our own key/value tensors (see module docstring)."""

    def __init__(self, runner: Runner, tokenizer, device: str = "cpu", int8: bool = False, model=None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.device = device
        self.int8 = int8  # the model's linear maps in int8 (Config.quantize; CPU only)
        self.model = model  # the (PEFT) model the runner runs, for `likelihood`

    def likelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        """query_likelihood of each (question, memory text), with the base model's own weights."""
        if self.model is None:
            raise ValueError("RunnerDecoder was made without its model: pass model= to rerank")
        return query_likelihood(self.model, self.tokenizer, pairs, self.device)

    def search(self, question: str, trie: Trie, k: int = 1, beam_size: int = 4,
               prompt: str = PROMPT) -> list[tuple[str, float]]:
        """The top-k IDs of `trie` and their probabilities; `prompt`: the template the index was
        trained with (its manifest's)."""
        import torch

        if len(trie) == 0:
            return []
        r = self.runner
        beam_size = max(beam_size, k)
        forced, start = Trie.chain(trie.root)
        if start.memory_id is not None:  # only one ID exists
            return [(start.memory_id, 1.0)]
        ids = torch.tensor([prompt_ids(self.tokenizer, question, prompt) + forced], device=self.device)
        with torch.inference_mode():
            x = r.embed(ids)
            T = ids.shape[1]
            pos = torch.arange(T, device=self.device).unsqueeze(0)
            cos, sin = r.rope(x, pos)
            prompt_kv = []
            w8 = self._int8_weights()
            for i in range(r.n_layers):
                x, kv = r.layer(i, x, cos, sin, causal=True, int8=w8[i])
                prompt_kv.append(kv)
            h = x[:, -1]
            beams = [Beam(0.0, start, 0, [])]
            suffix_kv: list | None = None  # per layer (k, v) of beam tokens after the prompt, (B, kv, S, d)
            suffix_valid = None  # (B, S) bool: real token (not padding)
            finished: list[tuple[float, str]] = []
            while beams:
                # Score every allowed child of every beam from its last hidden state.
                top = self._expand(h, beams, beam_size)
                nxt: list[Beam] = []
                for logp, bi, t in top:
                    forced, node = Trie.chain(beams[bi].node.children[t])
                    if node.memory_id is not None:
                        finished.append((logp, node.memory_id))
                    else:
                        nxt.append(Beam(logp, node, bi, [t] + forced))
                finished.sort(reverse=True)
                # Scores only fall with depth: stop once k finished IDs beat every open beam.
                if len(finished) >= k and (not nxt or nxt[0].logp <= finished[k - 1][0]):
                    break
                if not nxt:
                    break
                beams = nxt
                h, suffix_kv, suffix_valid = self._step(beams, prompt_kv, suffix_kv, suffix_valid, T)
            return [(mid, math.exp(lp)) for lp, mid in finished[:k]]

    def score(self, question: str, trie: Trie, prompt: str = PROMPT) -> dict[str, float]:
        """The exact probability of every ID in `trie`, in one forward pass (tree attention).

        The prompt and the trie's nodes go in as one sequence: a node sees the prompt and its
        own ancestors only, at the position it would have in its ID, so its hidden state is
        the one decoding would reach there. Only nodes with two or more IDs below are fed (a
        node with one ID below leads to no further choice). Same numbers as an exhaustive beam
        search, at the cost of one prompt-sized forward pass: meant for small tries (hybrid
        decoding's candidates)."""
        return self.score_many([(question, trie)], prompt)[0]

    def score_many(self, items: list[tuple[str, Trie]], prompt: str = PROMPT) -> list[dict[str, float]]:
        """`score` for several (question, trie) pairs in one batched forward pass."""
        import torch

        out: list[dict[str, float] | None] = [None] * len(items)
        trees = []
        for i, (question, trie) in enumerate(items):
            if len(trie) <= 1:
                out[i] = {mid: 1.0 for mid in trie.sequences}
            else:
                trees.append((i, _Tree(prompt_ids(self.tokenizer, question, prompt), trie)))
        if not trees:
            return out
        r = self.runner
        L = max(t.length for _, t in trees)
        pad = self.tokenizer.eos_token_id
        ids = torch.full((len(trees), L), pad, dtype=torch.long)
        pos = torch.zeros(len(trees), L, dtype=torch.long)
        mask = torch.eye(L, dtype=torch.bool).repeat(len(trees), 1, 1)  # padding sees itself only
        for b, (_, t) in enumerate(trees):
            ids[b, :t.length] = torch.tensor(t.tokens)
            pos[b, :t.length] = torch.tensor(t.positions)
            mask[b, :t.length, :t.length] = t.mask
        with torch.inference_mode():
            x = r.embed(ids.to(self.device))
            cos, sin = r.rope(x, pos.to(self.device))
            m = mask.to(self.device)[:, None]
            w8 = self._int8_weights()
            for i in range(r.n_layers):
                x, _ = r.layer(i, x, cos, sin, mask=m, int8=w8[i])
            rows = [(b, row) for b, (_, t) in enumerate(trees) for row in t.branch_rows]
            h = x[torch.tensor([b for b, _ in rows]), torch.tensor([row for _, row in rows])]
            logp, vocab = self._allowed_logp(h, [a for _, t in trees for a in t.allowed])
            logp = logp.tolist()
        col = {tok: j for j, tok in enumerate(vocab)}
        j = 0
        for i, t in trees:
            choices = {}
            for node, a in zip(t.branch_nodes, t.allowed):
                choices[id(node)] = {tok: logp[j][col[tok]] for tok in a}
                j += 1
            out[i] = t.probabilities(choices)
        return out

    def _int8_weights(self) -> list:
        """Per layer, the int8 weights to apply (`self.int8`), or None for the model's own."""
        return self.runner.int8_weights() if self.int8 else [None] * self.runner.n_layers

    def _expand(self, h, beams: list[Beam], beam_size: int) -> list[tuple[float, int, int]]:
        """The best (logp, beam row, token) continuations: logits over the union of the beams'
        allowed children, masked per beam, renormalised, plus each beam's score; one top-k."""
        import torch

        allowed = [b.node.allowed() for b in beams]
        logp, vocab = self._allowed_logp(h, allowed)
        logp = logp + torch.tensor([b.logp for b in beams], device=self.device)[:, None]
        n = min(beam_size, sum(len(a) for a in allowed))
        values, flat = torch.topk(logp.flatten(), n)
        width = len(vocab)
        return [(v, i // width, vocab[i % width]) for v, i in zip(values.tolist(), flat.tolist())]

    def _allowed_logp(self, h, allowed: list[list[int]]):
        """Log-probabilities of each row's allowed tokens, renormalised over them: a (rows,
        vocab) tensor over the union `vocab` of the allowed tokens, -inf where not allowed."""
        import torch

        vocab = sorted({t for a in allowed for t in a})
        col = {t: j for j, t in enumerate(vocab)}
        logits = self.runner.logits(h, torch.tensor(vocab, device=self.device)).float()
        rows = torch.tensor([r for r, a in enumerate(allowed) for _ in a], device=self.device)
        cols = torch.tensor([col[t] for a in allowed for t in a], device=self.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[rows, cols] = logits[rows, cols]
        return torch.log_softmax(masked, dim=-1), vocab

    def _step(self, beams, prompt_kv, suffix_kv, suffix_valid, prompt_len):
        """Feed each beam's new tokens (right-padded) on top of its parent's keys/values."""
        import torch

        r = self.runner
        B = len(beams)
        L = max(len(b.new_tokens) for b in beams)
        pad = self.tokenizer.eos_token_id
        new = torch.tensor([b.new_tokens + [pad] * (L - len(b.new_tokens)) for b in beams], device=self.device)
        new_valid = torch.tensor([[j < len(b.new_tokens) for j in range(L)] for b in beams], device=self.device)
        parents = torch.tensor([b.parent for b in beams], device=self.device)
        if suffix_valid is None:
            old_valid = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        else:
            old_valid = suffix_valid[parents]
        S_old = old_valid.shape[1]
        # Positions continue from each beam's count of real tokens so far.
        base = prompt_len + old_valid.sum(1, keepdim=True)
        pos = base + torch.arange(L, device=self.device).unsqueeze(0)
        # Mask: prompt always visible; old suffix where real; new tokens causally.
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=self.device))
        mask = torch.cat([
            torch.ones(B, L, prompt_len, dtype=torch.bool, device=self.device),
            old_valid.unsqueeze(1).expand(B, L, S_old),
            causal.unsqueeze(0).expand(B, L, L),
        ], dim=2).unsqueeze(1)
        x = r.embed(new)
        cos, sin = r.rope(x, pos)
        out_kv = []
        w8 = self._int8_weights()
        for i in range(r.n_layers):
            pk, pv = prompt_kv[i]
            if suffix_kv is None:
                past = (pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1))
            else:
                sk, sv = suffix_kv[i]
                past = (torch.cat([pk.expand(B, -1, -1, -1), sk[parents]], 2),
                        torch.cat([pv.expand(B, -1, -1, -1), sv[parents]], 2))
            x, (k, v) = r.layer(i, x, cos, sin, past=past, mask=mask, int8=w8[i])
            out_kv.append((k[:, :, prompt_len:], v[:, :, prompt_len:]))
        last = torch.tensor([len(b.new_tokens) - 1 for b in beams], device=self.device)
        h = x[torch.arange(B, device=self.device), last]
        return h, out_kv, torch.cat([old_valid, new_valid], dim=1)


class _Tree:
    """One question's tree-attention input: the prompt, then the trie nodes with two or more
    IDs below, each seeing the prompt and its ancestors at the position it has in its ID."""

    def __init__(self, prompt: list[int], trie: Trie):
        import torch

        self.trie = trie
        T = len(prompt)
        nodes, parents, depths, tokens = [], [], [], []

        def visit(node: Node, row: int, depth: int) -> None:
            for tok, child in (node.children or {}).items():
                if child.count >= 2:
                    tokens.append(tok)
                    parents.append(row)
                    depths.append(depth + 1)
                    nodes.append(child)
                    visit(child, len(tokens) - 1, depth + 1)

        visit(trie.root, -1, 0)
        N = len(tokens)
        self.length = T + N
        self.tokens = prompt + tokens
        self.positions = list(range(T)) + [T - 1 + d for d in depths]
        mask = torch.zeros(T + N, T + N, dtype=torch.bool)
        mask[:, :T] = torch.tril(torch.ones(T + N, T, dtype=torch.bool))
        for j in range(N):
            mask[T + j, T + j] = True
            a = parents[j]
            while a >= 0:
                mask[T + j, T + a] = True
                a = parents[a]
        self.mask = mask
        # The branching points and the row whose hidden state chooses among their children:
        # the prompt's last token for the root.
        branch = [(T - 1, trie.root)] + [(T + j, n) for j, n in enumerate(nodes)]
        branch = [(row, n) for row, n in branch if n.children and len(n.children) >= 2]
        self.branch_rows = [row for row, _ in branch]
        self.branch_nodes = [n for _, n in branch]
        self.allowed = [n.allowed() for n in self.branch_nodes]

    def probabilities(self, choices: dict[int, dict[int, float]]) -> dict[str, float]:
        """Each ID's probability: the sum of its choices' log-probabilities, exponentiated."""
        out = {}
        for mid, seq in self.trie.sequences.items():
            node, total = self.trie.root, 0.0
            for tok in seq:
                if id(node) in choices:
                    total += choices[id(node)][tok]
                node = node.children[tok]
            out[mid] = math.exp(total)
        return out


class GenerateDecoder:
    """Constrained beam search through `model.generate` (works for any HF causal LM)."""

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    def search(self, question: str, trie: Trie, k: int = 1, beam_size: int = 4,
               prompt: str = PROMPT) -> list[tuple[str, float]]:
        import torch

        if len(trie) == 0:
            return []
        prompt = prompt_ids(self.tokenizer, question, prompt)
        n = len(prompt)
        beam_size = max(beam_size, k)
        eos = self.tokenizer.eos_token_id

        def allowed(_batch, seq):
            toks = trie.allowed(seq[n:].tolist())
            return toks or [eos]

        depth = max(len(s) for s in trie.sequences.values())
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor([prompt], device=self.device),
                attention_mask=torch.ones(1, n, dtype=torch.long, device=self.device),
                max_new_tokens=depth, num_beams=beam_size, num_return_sequences=beam_size,
                prefix_allowed_tokens_fn=allowed, do_sample=False, length_penalty=0.0,
                output_scores=True, return_dict_in_generate=True, pad_token_id=eos, eos_token_id=eos,
            )
        hits, seen = [], set()
        scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else [0.0] * len(out.sequences)
        for seq, score in zip(out.sequences, scores):
            toks = seq[n:].tolist()
            node = trie.walk(toks[: toks.index(eos) + 1] if eos in toks else toks)
            if node is not None and node.memory_id is not None and node.memory_id not in seen:
                seen.add(node.memory_id)
                hits.append((node.memory_id, math.exp(score)))
        return hits[:k]

    def score(self, question: str, trie: Trie, prompt: str = PROMPT) -> dict[str, float]:
        """The probability of every ID in `trie`: a beam as wide as the trie is exhaustive."""
        return dict(self.search(question, trie, k=len(trie), beam_size=len(trie), prompt=prompt)) if len(trie) else {}

    def score_many(self, items: list[tuple[str, Trie]], prompt: str = PROMPT) -> list[dict[str, float]]:
        return [self.score(q, trie, prompt) for q, trie in items]

    def likelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        return query_likelihood(self.model, self.tokenizer, pairs, self.device)
