import pytest

from ipm.retrieve import Candidates, load_dense_encoder

from tests.conftest import MEMORIES


def test_candidates_for_a_batch_match_one_by_one():
    ids, texts = list(MEMORIES), list(MEMORIES.values())
    candidates = Candidates(ids, texts, load_dense_encoder())
    questions = ["what is my dog called?", "Which medicine can't I take?", "zzz", "where does Anna live?"]
    batch = candidates.many(questions, 2)
    assert candidates.many([], 2) == []
    for q, got in zip(questions, batch):
        one = candidates(q, 2)
        assert set(got) == set(one)
        for mid, (cos, bm) in got.items():
            assert cos == pytest.approx(one[mid][0], abs=1e-5) and bm == pytest.approx(one[mid][1])
    # BM25 adds its own top 2 where it matches; dense always proposes its top 2
    assert "health_allergy_penicillin" in batch[1] and len(batch[2]) == 2
