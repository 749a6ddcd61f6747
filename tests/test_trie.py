import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipm.trie import Trie

EOS = 0


def seqs(n, rng):
    out = {}
    while len(out) < n:
        toks = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 4))) + (EOS,)
        if toks not in out.values():
            out[f"id_{len(out)}_x"] = toks
    return out


def test_allowed_follows_only_existing_sequences():
    t = Trie([("a_b_c", [1, 2, EOS]), ("a_b_d", [1, 3, EOS]), ("e_f_g", [4, EOS])])
    assert sorted(t.allowed([])) == [1, 4]
    assert sorted(t.allowed([1])) == [2, 3]
    assert t.allowed([1, 2]) == [EOS]
    assert t.allowed([1, 2, EOS]) == []
    assert t.allowed([9]) == []
    assert t.walk([1, 3, EOS]).memory_id == "a_b_d"


def test_chain_skips_forced_tokens():
    t = Trie([("a_b_c", [1, 2, 3, EOS]), ("a_b_d", [1, 2, 4, EOS])])
    forced, node = Trie.chain(t.root)
    assert forced == [1, 2] and sorted(node.allowed()) == [3, 4]
    forced, leaf = Trie.chain(node.children[3])
    assert forced == [EOS] and leaf.memory_id == "a_b_c"


def test_remove_prunes_only_that_id():
    t = Trie([("a_b_c", [1, 2, EOS]), ("a_b_d", [1, 3, EOS])])
    t.remove("a_b_c")
    assert t.allowed([1]) == [3]
    assert "a_b_c" not in t and len(t) == 1
    t.remove("a_b_d")
    assert t.allowed([]) == [] and t.root.count == 0


def test_same_token_sequence_for_two_ids_is_an_error():
    t = Trie([("a_b_c", [1, 2, EOS])])
    with pytest.raises(ValueError, match="same token sequence"):
        t.add("x_y_z", [1, 2, EOS])
    assert len(t) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.data())
def test_every_complete_walk_is_a_live_id(seed, n, data):
    """Whatever choices a decoder makes among allowed tokens, it ends on a live ID."""
    rng = random.Random(seed)
    table = seqs(n, rng)
    t = Trie(table.items())
    gone = data.draw(st.sets(st.sampled_from(sorted(table)), max_size=n - 1))
    for mid in gone:
        t.remove(mid)
    for _ in range(20):
        prefix = []
        while True:
            allowed = t.allowed(prefix)
            if not allowed:
                break
            prefix.append(rng.choice(allowed))
        node = t.walk(prefix)
        assert node.memory_id in table and node.memory_id not in gone
        assert table[node.memory_id] == tuple(prefix)
