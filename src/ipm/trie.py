"""Prefix trie over the token sequences of the live memory IDs.

Decoding may only follow edges of this trie, so the model can only ever write an ID that
exists: that is the "no invented IDs" guarantee. Every sequence ends with EOS, so a leaf is
reached exactly when an ID is complete, and no ID is a prefix of another.

The trie changes in place: adding or forgetting one ID touches only that ID's path, and a
forgotten ID is unreachable the moment `remove` returns.
"""

from __future__ import annotations

from typing import Iterable


class Node:
    __slots__ = ("children", "count", "memory_id")

    def __init__(self) -> None:
        self.children: dict[int, Node] | None = None
        self.count = 0  # IDs at or below this node
        self.memory_id: str | None = None  # set on leaves

    def child(self, token: int) -> "Node | None":
        return self.children.get(token) if self.children else None

    def allowed(self) -> list[int]:
        return list(self.children) if self.children else []


class Trie:
    def __init__(self, sequences: Iterable[tuple[str, list[int]]] = ()):
        self.root = Node()
        self.sequences: dict[str, tuple[int, ...]] = {}
        for memory_id, tokens in sequences:
            self.add(memory_id, tokens)

    def __len__(self) -> int:
        return len(self.sequences)

    def __contains__(self, memory_id: str) -> bool:
        return memory_id in self.sequences

    def add(self, memory_id: str, tokens: list[int]) -> None:
        tokens = tuple(tokens)
        if not tokens:
            raise ValueError("an ID's token sequence cannot be empty")
        if memory_id in self.sequences:
            if self.sequences[memory_id] == tokens:
                return
            self.remove(memory_id)
        # Walk first: an existing leaf on this path means another ID has the same tokens.
        node = self.root
        for t in tokens:
            node = node.child(t)
            if node is None:
                break
        else:
            raise ValueError(f"IDs {node.memory_id!r} and {memory_id!r} have the same token sequence")
        node = self.root
        node.count += 1
        for t in tokens:
            if node.children is None:
                node.children = {}
            nxt = node.children.get(t)
            if nxt is None:
                nxt = node.children[t] = Node()
            nxt.count += 1
            node = nxt
        node.memory_id = memory_id
        self.sequences[memory_id] = tokens

    def remove(self, memory_id: str) -> None:
        tokens = self.sequences.pop(memory_id, None)
        if tokens is None:
            return
        node = self.root
        node.count -= 1
        for t in tokens:
            nxt = node.children[t]
            nxt.count -= 1
            if nxt.count == 0:
                del node.children[t]  # the whole branch below was this ID's alone
                if not node.children:
                    node.children = None
                return
            node = nxt

    def walk(self, tokens: Iterable[int]) -> Node | None:
        node = self.root
        for t in tokens:
            node = node.child(t)
            if node is None:
                return None
        return node

    def allowed(self, prefix: Iterable[int]) -> list[int]:
        """Tokens that may follow `prefix`; empty if the prefix leaves the trie or is complete."""
        node = self.walk(prefix)
        return node.allowed() if node is not None else []

    @staticmethod
    def chain(node: Node) -> tuple[list[int], Node]:
        """Follow single-child edges from `node`: they are forced, so no model call is needed
        to choose them. Returns the forced tokens and the node where a choice (or a leaf) is."""
        forced = []
        while node.memory_id is None and node.children and len(node.children) == 1:
            (t, node), = node.children.items()
            forced.append(t)
        return forced, node

    def vocabulary(self) -> list[int]:
        """Every token that appears in some ID sequence."""
        return sorted({t for seq in self.sequences.values() for t in seq})
