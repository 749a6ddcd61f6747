"""The fast decoder against brute force, on a tiny random model (with a random LoRA)."""

import math
import weakref

import pytest
import torch

from ipm.model import Runner, id_token_ids, prompt_ids
from ipm.search import GenerateDecoder, RunnerDecoder
from ipm.trie import Trie

IDS = ["personal_pet_max", "personal_pet_luna", "health_allergy_penicillin", "family_sister_anna",
       "family_sister_anna_2", "work_job_acme", "food_favorite_sushi"]


@pytest.fixture(scope="module")
def lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            layers_to_transform=[2, 3], init_lora_weights=False))
    peft.eval()
    return peft, tok


def test_runner_matches_the_model_forward(lora_model):
    model, tok = lora_model
    ids = torch.tensor([prompt_ids(tok, "what is my dog called?") + id_token_ids(tok, "personal_pet_max")])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        r = Runner(model)
        lower = r.hidden(ids, 0, 2)
        ours = r.logits(r.hidden(None, 2, None, x=lower))
    assert torch.allclose(ref, ours, atol=1e-4)


def test_training_loss_is_the_models_own_cross_entropy_over_the_id_vocabulary(lora_model):
    """The fast path's loss (the lower layers' states cached, the softmax over the ID tokens)
    equals the cross-entropy of the model's own full forward at the ID positions, restricted to
    the same tokens, for a batch of right-padded sequences of different lengths; and so do the
    adapter's gradients."""
    import torch.nn.functional as F

    from ipm.train import _fast_loss, _targets

    model, tok = lora_model
    runner = Runner(model)
    ids = ["personal_pet_max", "family_sister_anna", "food_favorite_sushi"]
    questions = ["what is my dog called?", "where does my sister live these days, and with whom?", "sushi?"]
    seqs = [(prompt_ids(tok, q) + id_token_ids(tok, m), len(prompt_ids(tok, q))) for q, m in zip(questions, ids)]
    vocab = sorted({t for s, n in seqs for t in s[n:]})
    col = torch.full((len(tok),), -1, dtype=torch.long)
    col[torch.tensor(vocab)] = torch.arange(len(vocab))
    model.train()
    with torch.no_grad():
        lower = [runner.hidden(torch.tensor([s]), 0, 2)[0] for s, _ in seqs]
    ours = _fast_loss(runner, seqs, lower, 2, torch.tensor(vocab), col, "cpu")
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    refs = []
    for r, (s, n) in enumerate(seqs):
        logits = model(input_ids=torch.tensor([s])).logits[0]
        rows = [t for rr, t in zip(*_targets(seqs)[:2]) if rr == r]
        refs.append(F.cross_entropy(logits[rows][:, vocab], col[torch.tensor(s[n:])], reduction="sum"))
    ref = sum(refs) / len(_targets(seqs)[0])
    ref.backward()
    model.eval()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
    model.zero_grad()


def test_runner_merges_the_adapter_it_serves_and_follows_its_changes(tiny_model):
    """Without gradients the runner applies each LoRA linear as one merged weight, cached: the
    cache must follow an optimiser step, a switch of adapter (and back), a disabled adapter and
    an adapter loaded again under the same name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], init_lora_weights=False))
    model.eval()
    r = Runner(model)
    ids = torch.tensor([list(range(5, 17))])

    def runner_logits():
        with torch.no_grad():
            return r.logits(r.hidden(ids))

    def model_logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    first = runner_logits()
    assert torch.allclose(first, model_logits(), atol=1e-4)
    assert r._merged, "no merged weight was cached"
    lora_b = next(m for m in model.modules() if hasattr(m, "lora_B")).lora_B["default"].weight
    with torch.no_grad():
        lora_b.add_(0.5)  # as an optimiser step does, in place
    moved = runner_logits()
    assert not torch.allclose(moved, first, atol=1e-3)
    assert torch.allclose(moved, model_logits(), atol=1e-4)
    with torch.enable_grad():  # the unmerged path, as in training
        assert torch.allclose(r.logits(r.hidden(ids)).detach(), moved, atol=1e-4)
    model.set_adapter("other")
    other = runner_logits()
    assert torch.allclose(other, model_logits(), atol=1e-4)
    assert not torch.allclose(other, moved, atol=1e-3)
    with model.disable_adapter():
        assert torch.allclose(runner_logits(), model_logits(), atol=1e-4)
        base = runner_logits()
    assert not torch.allclose(runner_logits(), base, atol=1e-3)
    model.set_adapter("default")  # back again: served from its kept merge, still right
    assert torch.allclose(runner_logits(), moved, atol=1e-5)
    # A namespace retrained and loaded again under the same adapter name gets new tensors.
    model.set_adapter("other")
    model.delete_adapter("other")
    torch.manual_seed(3)
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], init_lora_weights=False))
    model.set_adapter("other")
    model.eval()
    assert torch.allclose(runner_logits(), model_logits(), atol=1e-4)
    assert not torch.allclose(runner_logits(), other, atol=1e-3)


def test_runner_packs_the_weights_it_reads_and_follows_their_changes(tiny_model):
    """On a CPU with oneDNN, asks apply every linear map through oneDNN with its weight packed
    once (Runner._packed_weight): the same numbers as the model's own forward, a weight changed
    in place is packed again, and a pack is dropped with the weight it was made from."""
    import gc

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ipm.model import onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this PyTorch has no oneDNN matmul: nothing is packed")
    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    r = Runner(model)
    ids = torch.tensor([list(range(5, 17))])

    def both():
        with torch.no_grad():
            return r.logits(r.hidden(ids)), model(input_ids=ids).logits

    ours, ref = both()
    assert torch.allclose(ours, ref, atol=1e-4)
    inner = model.get_base_model().model
    plain = inner.layers[0].mlp.down_proj.weight  # a plain nn.Linear's weight
    assert any(entry[0]() is plain for entry in r._packed.values())
    n = len(r._packed)
    with torch.no_grad():
        plain.mul_(3.0)  # changed in place: its version moves on
    moved, ref = both()
    assert torch.allclose(moved, ref, atol=1e-4) and not torch.allclose(moved, ours, atol=1e-3)
    lora_b = inner.layers[0].self_attn.q_proj.lora_B["default"].weight
    with torch.no_grad():
        lora_b.add_(0.5)  # a new merged weight: packed anew, the old merge's pack dropped with it
    again, ref = both()
    assert torch.allclose(again, ref, atol=1e-4) and not torch.allclose(again, moved, atol=1e-3)
    gc.collect()
    assert len(r._packed) == n and all(entry[0]() is not None for entry in r._packed.values())
    with torch.enable_grad():  # training's path is PyTorch's own, with gradients
        out = r.logits(r.hidden(ids))
    assert out.requires_grad and torch.allclose(out.detach(), again, atol=1e-4)
    fresh = Runner(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: PyTorch's own matmul
        fresh.hidden(ids)
    assert fresh._packed == {}
    # A runner dropped frees its packs at once (no reference cycle left for the collector).
    other = Runner(model)
    with torch.no_grad():
        other.hidden(ids)
    packs = [weakref.ref(entry[2]) for entry in other._packed.values()]
    assert packs and Runner(model, pack_weights=False)._packed == {}
    del other
    assert all(ref() is None for ref in packs)


def test_runner_packs_bf16_weights_where_onednn_runs_bf16(tiny_model):
    from transformers import AutoModelForCausalLM

    from ipm.model import onednn_linear_available

    if not onednn_linear_available(torch.bfloat16):
        pytest.skip("oneDNN does not run bf16 on this CPU: bf16 weights are not packed")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.bfloat16).eval()
    r = Runner(model)
    ids = torch.tensor([list(range(5, 17))])
    with torch.no_grad():
        ours = r.logits(r.hidden(ids)).float()
        ref = model(input_ids=ids).logits.float()
    assert r._packed and all(entry[2].dtype == torch.bfloat16 for entry in r._packed.values())
    assert (ours - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def exact_scores(model, tok, question, trie):
    """P(ID) = product over branching nodes of softmax over the allowed children."""
    prompt = prompt_ids(tok, question)
    out = {}
    with torch.no_grad():
        for mid, seq in trie.sequences.items():
            logits = model(input_ids=torch.tensor([prompt + list(seq)])).logits[0]
            logp, node = 0.0, trie.root
            for j, t in enumerate(seq):
                allowed = node.allowed()
                if len(allowed) > 1:
                    row = logits[len(prompt) - 1 + j, allowed]
                    logp += torch.log_softmax(row, -1)[allowed.index(t)].item()
                node = node.children[t]
            out[mid] = math.exp(logp)
    return out


@pytest.mark.parametrize("question", ["what is my dog called?", "Which medicine can't I take?", "x"])
def test_beam_search_returns_exact_constrained_probabilities(lora_model, question):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in IDS)
    hits = RunnerDecoder(Runner(model), tok).search(question, trie, k=len(IDS), beam_size=len(IDS))
    exact = exact_scores(model, tok, question, trie)
    assert sorted(m for m, _ in hits) == sorted(IDS)
    assert sum(p for _, p in hits) == pytest.approx(1.0, abs=1e-4)
    for mid, p in hits:
        assert p == pytest.approx(exact[mid], rel=1e-3, abs=1e-6)
    assert [m for m, _ in hits] == sorted(exact, key=lambda m: -exact[m])


@pytest.mark.parametrize("subset", [IDS, IDS[:2], IDS[3:5], IDS[:1], ["family_sister_anna", "food_favorite_sushi", "work_job_acme"]])
@pytest.mark.parametrize("question", ["what is my dog called?", "x"])
def test_tree_scoring_gives_every_id_its_exact_probability_in_one_pass(lora_model, question, subset):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in subset)
    scores = RunnerDecoder(Runner(model), tok).score(question, trie)
    exact = exact_scores(model, tok, question, trie)
    assert set(scores) == set(subset)
    for mid in subset:
        assert scores[mid] == pytest.approx(exact[mid], rel=1e-3, abs=1e-6)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    # The generic decoder (any HF model) scores through `generate`: every ID, approximately.
    assert set(GenerateDecoder(model, tok).score(question, trie)) == set(subset)


def test_batched_tree_scoring_equals_one_question_at_a_time(lora_model):
    model, tok = lora_model
    decoder = RunnerDecoder(Runner(model), tok)
    items = [("what is my dog called?", IDS), ("a much longer question about my sister and where she works now", IDS[2:6]),
             ("x", IDS[:1]), ("sushi?", ["food_favorite_sushi", "work_job_acme"]), ("nothing", [])]
    items = [(q, Trie((m, id_token_ids(tok, m)) for m in ids)) for q, ids in items]
    batched = decoder.score_many(items)
    assert batched[2] == {"personal_pet_max": 1.0} and batched[4] == {}
    for (q, trie), got in zip(items, batched):
        one = decoder.score(q, trie)
        assert set(got) == set(one)
        for mid in one:
            assert got[mid] == pytest.approx(one[mid], rel=1e-4, abs=1e-7)


def test_top1_equals_best_exact_id_with_a_small_beam(lora_model):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in IDS)
    hits = RunnerDecoder(Runner(model), tok).search("my sister", trie, k=1, beam_size=len(IDS))
    exact = exact_scores(model, tok, "my sister", trie)
    assert hits[0][0] == max(exact, key=exact.get)


def test_generate_decoder_only_returns_ids_in_the_trie(lora_model):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in IDS[:4])
    for q in ["what is my dog called?", "anna", "penicillin", "hello"]:
        hits = GenerateDecoder(model, tok).search(q, trie, k=3, beam_size=3)
        assert hits and all(m in IDS[:4] for m, _ in hits)


def test_forgotten_ids_are_never_decoded(lora_model):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in IDS)
    decoder = RunnerDecoder(Runner(model), tok)
    for gone in IDS[:-1]:
        trie.remove(gone)
        for q in ["what is my dog called?", gone.replace("_", " "), "anna"]:
            hits = decoder.search(q, trie, k=len(IDS), beam_size=len(IDS))
            assert gone not in [m for m, _ in hits]
            assert {m for m, _ in hits} <= set(trie.sequences)
    assert decoder.search("anything", trie, k=3) == [(IDS[-1], 1.0)]


def test_fuse_is_a_distribution_and_each_weight_counts():
    from ipm.search import Signals, fuse

    sig = {"a_b_c": Signals(lora=-0.1, dense=0.2, bm25=0.0),   # the adapter's pick
           "d_e_f": Signals(lora=-3.0, dense=0.9, bm25=0.1),   # dense retrieval's pick
           "g_h_i": Signals(lora=-3.0, dense=0.1, bm25=1.0)}   # BM25's pick
    for weights in [(0, 0), (40, 0), (0, 8), (20, 2)]:
        ranked = fuse(sig, *weights)
        assert sum(p for _, p in ranked) == pytest.approx(1.0)
        assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    assert fuse(sig, 0, 0)[0][0] == "a_b_c"
    assert fuse(sig, 40, 0)[0][0] == "d_e_f"
    assert fuse(sig, 0, 8)[0][0] == "g_h_i"
    assert fuse(sig, 0, 0, lora_weight=0)[0][1] == pytest.approx(1 / 3)
    assert fuse({}, 1, 1) == []


def test_fuse_divides_bm25_by_the_best_score_or_the_floor():
    from ipm.search import Signals, fuse

    def pair(bm25):  # dense retrieval's pick, and a memory with a BM25 score 2 dense-points behind
        return {"a_b_c": Signals(lora=0.0, dense=0.50, bm25=0.0), "d_e_f": Signals(lora=0.0, dense=0.45, bm25=bm25)}

    weak, strong = pair(0.8), pair(12.0)
    assert fuse(weak, 40, 16)[0][0] == "d_e_f"  # divided by the best alone, one weak shared word counts fully
    assert fuse(weak, 40, 16, bm25_floor=8)[0][0] == "a_b_c"  # 16 * 0.8 / 8 = 1.6 < 2
    assert fuse(strong, 40, 16, bm25_floor=8)[0][0] == "d_e_f"  # above the floor: divided by the best
    assert fuse(strong, 40, 16, bm25_floor=8) == fuse(strong, 40, 16)
    assert sum(p for _, p in fuse(weak, 40, 16, bm25_floor=8)) == pytest.approx(1.0)
    zero = {"a_b_c": Signals(0.0, 0.5, 0.0), "d_e_f": Signals(0.0, 0.4, 0.0)}
    assert fuse(zero, 40, 16)[0][0] == "a_b_c"  # no word shared: BM25 adds nothing, no division by 0


def test_fuse_takes_the_bm25_noise_off_every_score():
    from ipm.search import Signals, fuse

    def pair(bm25):  # dense retrieval's pick, and a memory with a BM25 score 2 dense-points behind
        return {"a_b_c": Signals(lora=0.0, dense=0.50, bm25=0.0), "d_e_f": Signals(lora=0.0, dense=0.45, bm25=bm25)}

    weak, strong = pair(3.0), pair(20.0)
    assert fuse(weak, 40, 16, bm25_floor=16)[0][0] == "d_e_f"  # 16 * 3 / 16 = 3 > 2
    assert fuse(weak, 40, 16, bm25_floor=16, bm25_noise=3.0) == fuse(weak, 40, 0)  # one incidental word: nothing
    assert fuse(weak, 40, 16, bm25_floor=16, bm25_noise=4.0) == fuse(weak, 40, 0)  # never below 0
    # a strong match keeps its lead, less the noise: 16 * (20 - 3) / 20 = 13.6 > 2
    assert fuse(strong, 40, 16, bm25_floor=16, bm25_noise=3.0)[0][0] == "d_e_f"
    assert sum(p for _, p in fuse(strong, 40, 16, bm25_floor=16, bm25_noise=3.0)) == pytest.approx(1.0)


def test_hard_negative_choices_are_the_tokens_where_ids_part():
    from ipm.train import _choices

    col = torch.arange(20)
    gold = [5, 6, 7, 2]
    negatives = [[5, 6, 8, 2], [5, 9, 2], [4, 2], [5, 6, 7, 3, 2]]
    assert _choices(gold, negatives, col) == [[4, 5], [6, 9], [7, 8], [2, 3]]
    assert _choices(gold, [], col) == [None] * 4
    assert _choices(gold, [[4, 2]], col) == [[4, 5], None, None, None]


def test_hard_negative_loss_is_minus_log_of_the_hybrid_score(lora_model):
    """The hard-negative term of the training loss is what hybrid decoding scores: -log P(right
    ID among the candidates), spread over the tokens where they part (a mean, as the loss is)."""
    from ipm.train import _choices, _fast_loss

    model, tok = lora_model
    runner = Runner(model)
    seqs = {m: id_token_ids(tok, m) for m in IDS}
    vocab = sorted({t for s in seqs.values() for t in s})
    col = torch.full((len(tok),), -1, dtype=torch.long)
    col[torch.tensor(vocab)] = torch.arange(len(vocab))
    question, gold = "where does my sister live?", "family_sister_anna"
    negatives = ["family_sister_anna_2", "food_favorite_sushi", "personal_pet_max"]
    p = prompt_ids(tok, question)
    example = [(p + seqs[gold], len(p))]
    choices = [_choices(seqs[gold], [seqs[n] for n in negatives], col)]
    with torch.no_grad():
        lower = [runner.hidden(torch.tensor([example[0][0]]), 0, 2)[0]]
        plain = _fast_loss(runner, example, lower, 2, torch.tensor(vocab), col, "cpu")
        hard = _fast_loss(runner, example, lower, 2, torch.tensor(vocab), col, "cpu", choices, 0.5)
    parts = sum(c is not None for c in choices[0])
    p_gold = RunnerDecoder(runner, tok).score(question, Trie((m, seqs[m]) for m in [gold, *negatives]))[gold]
    assert parts >= 2
    assert (hard - plain).item() == pytest.approx(0.5 * -math.log(p_gold) / parts, rel=1e-4)


@pytest.mark.parametrize("name", ["fusion_adapter", "fusion_dense", "fusion_bm25", "fusion_bm25_floor", "fusion_bm25_noise"])
def test_a_negative_fusion_setting_is_refused(name):
    from ipm.config import Config
    from ipm.errors import InvalidInput

    with pytest.raises(InvalidInput, match=f"option {name} must be at least 0, got -1.0$"):
        Config().updated(**{name: -1.0})
    assert getattr(Config().updated(**{name: 2.0}), name) == 2.0


# Where the CPU has no VNNI the weights are rounded to 7 bits (model._cpu_has_vnni), twice the
# step of 8; int16 sums that saturated (the bug this guards against) were off by 40% and more.
INT8_ERROR = 0.1 if __import__("ipm.model", fromlist=["x"])._cpu_has_vnni() else 0.2
int8 = pytest.mark.skipif(not __import__("ipm.model", fromlist=["x"]).int8_available(),
                          reason="this PyTorch has no oneDNN int8 matmul")


def int8_hidden(r, ids):
    """The runner's last hidden states with every layer's linear maps in int8."""
    w8 = r.int8_weights()
    with torch.inference_mode():
        x = r.embed(ids)
        cos, sin = r.rope(x, torch.arange(ids.shape[1])[None])
        for i in range(r.n_layers):
            x, _ = r.layer(i, x, cos, sin, causal=True, int8=w8[i])
    return x


@int8
def test_int8_layers_stay_close_to_the_models_own_and_follow_the_adapter(tiny_model):
    """quantize = "int8": each layer's linear maps in int8 (per output channel, per token), made
    from the weights the runner would apply, merged adapter included, and made again when it
    changes: an optimiser step in place, a switch of adapter, a disabled adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ipm.model import INT8_SETS

    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                      layers_to_transform=[2, 3], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    model.eval()
    r = Runner(model)
    ids = torch.tensor([list(range(5, 30))])

    def close_to_float():
        with torch.no_grad():
            ref = r.hidden(ids)
        got = int8_hidden(r, ids)
        assert got.dtype == torch.float32
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < INT8_ERROR, err  # 8-bit rounding through 4 random layers: ~7%; the adapter's change below moves more
        return got

    first = close_to_float()
    lora_b = model.base_model.model.model.layers[3].mlp.down_proj.lora_B["default"].weight
    with torch.no_grad():
        lora_b.add_(1.0)
    moved = close_to_float()
    assert ((moved - first).norm() / first.norm()).item() > 0.3
    model.set_adapter("other")
    close_to_float()
    with model.disable_adapter():
        close_to_float()
    model.set_adapter("default")
    assert torch.equal(close_to_float(), moved)
    assert all(len(kept) <= INT8_SETS for kept in r._int8.values())


@int8
@pytest.mark.parametrize("question", ["what is my dog called?", "Which medicine can't I take?"])
def test_int8_decoding_gives_nearly_the_exact_probabilities(lora_model, question):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in IDS)
    exact = exact_scores(model, tok, question, trie)
    decoder = RunnerDecoder(Runner(model), tok, int8=True)
    scored = decoder.score(question, trie)
    searched = dict(decoder.search(question, trie, k=len(IDS), beam_size=len(IDS)))
    assert set(scored) == set(searched) == set(IDS)
    assert sum(scored.values()) == pytest.approx(1.0, abs=1e-4)
    for mid in IDS:
        # Each token is quantized on its own (per-token scales), so how tokens are batched
        # (one tree pass, or beam steps over a cache) does not change its numbers.
        assert searched[mid] == pytest.approx(scored[mid], rel=1e-3, abs=1e-6)
        # 8-bit noise on this random model (hidden size 64, large weights) moves a probability
        # by up to ~0.15 on some questions; the mean error is the tighter test (below)
        assert scored[mid] == pytest.approx(exact[mid], abs=2 * INT8_ERROR)


@int8
def test_int8_decoding_is_close_to_the_exact_probabilities_on_average(lora_model):
    model, tok = lora_model
    trie = Trie((m, id_token_ids(tok, m)) for m in IDS)
    decoder = RunnerDecoder(Runner(model), tok, int8=True)
    errors = []
    for question in ["what is my dog called?", "Which medicine can't I take?", "Where does my sister live?",
                     "What is my job?", "my allergies", "who is anna?"]:
        exact, scored = exact_scores(model, tok, question, trie), decoder.score(question, trie)
        errors += [abs(scored[mid] - exact[mid]) for mid in IDS]
    assert sum(errors) / len(errors) < INT8_ERROR / 4  # 0.016 measured


@int8
def test_int8_on_a_bf16_model_with_biases_scores_every_id(tiny_model, tmp_path):
    """The benchmarked case (a bf16 base, float32 int8 path, logits read in bf16) and linear
    maps with biases (Qwen2-style q/k/v), which are fused with their weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = LlamaConfig.from_pretrained(tiny_model)
    cfg.attention_bias = cfg.mlp_bias = True
    torch.manual_seed(5)
    for model in (AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.bfloat16),
                  LlamaForCausalLM(cfg).eval()):
        r = Runner(model)
        ids = torch.tensor([list(range(5, 30))])
        with torch.no_grad():
            ref = r.hidden(ids).float()
        err = ((int8_hidden(r, ids) - ref).norm() / ref.norm()).item()
        assert err < INT8_ERROR, err
        trie = Trie((m, id_token_ids(tok, m)) for m in IDS)
        scores = RunnerDecoder(r, tok, int8=True).score("what is my dog called?", trie)
        assert set(scores) == set(IDS) and sum(scores.values()) == pytest.approx(1.0, abs=1e-3)


def test_query_likelihood_is_the_base_models_log_probability_of_the_question(lora_model):
    """Batched and right-padded, with the adapter switched off, it must equal summing the base
    model's own next-token log-probabilities over the question, one pair at a time."""
    from ipm.search import likelihood_prompt, query_likelihood

    model, tok = lora_model
    pairs = [("what is my dog called?", "My dog's name is Max."),
             ("what is my dog called?", "I can't take penicillin; it gives me hives, and my doctor has it on file."),
             ("x", "Anna is my sister.")]

    def one(question, text, adapter: bool):
        prompt = likelihood_prompt(tok, text)
        q = tok(" " + question, add_special_tokens=False).input_ids
        with torch.no_grad():
            if adapter:
                logits = model(input_ids=torch.tensor([prompt + q])).logits[0]
            else:
                with model.disable_adapter():
                    logits = model(input_ids=torch.tensor([prompt + q])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(q))

    got = query_likelihood(model, tok, pairs)
    for (question, text), value in zip(pairs, got):
        assert value == pytest.approx(one(question, text, adapter=False), abs=1e-3)
        assert value != pytest.approx(one(question, text, adapter=True), abs=1e-3)  # the adapter is off
    assert got[0] != pytest.approx(got[1], abs=1e-3)  # the text matters
    assert query_likelihood(model, tok, []) == []
    # Both decoders offer it, on the model they decode with.
    assert RunnerDecoder(Runner(model), tok, model=model).likelihood(pairs) == pytest.approx(got, abs=1e-4)
    assert GenerateDecoder(model, tok).likelihood(pairs) == pytest.approx(got, abs=1e-4)


def test_a_long_memory_is_read_up_to_the_likelihood_limit(lora_model):
    from ipm.search import LIKELIHOOD_TEXT_TOKENS, likelihood_prompt

    _, tok = lora_model
    long = " ".join(["word"] * (3 * LIKELIHOOD_TEXT_TOKENS))
    assert LIKELIHOOD_TEXT_TOKENS < len(likelihood_prompt(tok, long)) < LIKELIHOOD_TEXT_TOKENS + 30
    short = likelihood_prompt(tok, "My dog's name is Max.")
    assert tok.decode(short).count("Max") == 1


def test_rerank_orders_the_best_few_again_above_the_rest():
    from ipm.search import rerank

    fused = [("a_b_c", 0.5), ("d_e_f", 0.3), ("g_h_i", 0.15), ("j_k_l", 0.05)]
    lk = {"a_b_c": -20.0, "d_e_f": -5.0}  # the likelihood favours d_e_f strongly
    out = rerank(fused, lk, 1.0)
    assert [m for m, _ in out] == ["d_e_f", "a_b_c", "g_h_i", "j_k_l"]  # the two read stay above the rest
    assert sum(p for _, p in out) == pytest.approx(1.0)
    # p ∝ p_fused · exp(w · likelihood), those not read taking the lowest likelihood read.
    w = 0.1
    z = {"a_b_c": math.log(0.5) - 20 * w, "d_e_f": math.log(0.3) - 5 * w,
         "g_h_i": math.log(0.15) - 20 * w, "j_k_l": math.log(0.05) - 20 * w}
    total = sum(math.exp(v) for v in z.values())
    assert dict(rerank(fused, lk, w)) == pytest.approx({m: math.exp(v) / total for m, v in z.items()})
    # Weight 0, or fewer than two candidates read: nothing moves.
    assert rerank(fused, lk, 0.0) == fused
    assert rerank(fused, {"d_e_f": -5.0}, 1.0) == fused
