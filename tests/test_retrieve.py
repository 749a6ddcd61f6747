import heapq

import pytest

from ipm.retrieve import Candidates, load_dense_encoder

from tests.conftest import MEMORIES


def expected(candidates: Candidates, question: str, n: int) -> dict:
    """The candidate rule computed here from the retrievers' raw scores, one question at a time."""
    cos = (candidates.dense.encoder.encode([question]) @ candidates.dense.emb.T)[0].tolist()
    bm = candidates.bm25.scores(question)
    top = set(heapq.nlargest(n, range(len(cos)), key=cos.__getitem__))
    top |= {i for i in heapq.nlargest(n, range(len(bm)), key=bm.__getitem__) if bm[i] > 0}
    return {candidates.ids[i]: (cos[i], bm[i]) for i in top}


def test_candidates_for_a_batch_match_one_by_one():
    ids, texts = list(MEMORIES), list(MEMORIES.values())
    candidates = Candidates(ids, texts, load_dense_encoder())
    questions = ["what is my dog called?", "Which medicine can't I take?", "zzz", "where does Anna live?"]
    batch = candidates.many(questions, 2)
    assert candidates.many([], 2) == []
    for q, got in zip(questions, batch):
        want = expected(candidates, q, 2)
        assert set(got) == set(want) == set(candidates.many([q], 2)[0])
        for mid, (cos, bm) in got.items():
            assert cos == pytest.approx(want[mid][0], abs=1e-5) and bm == pytest.approx(want[mid][1])
    # "Anna" is a BM25 match that dense retrieval may or may not rank in its top 2: it is proposed
    assert "family_sister_anna" in batch[3] and len(batch[2]) == 2  # "zzz": dense's top 2 only
