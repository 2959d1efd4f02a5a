"""The prefix cache: keys and values of requests' tokens, kept so that a prompt starting with the
same tokens copies them instead of computing them again (vLLM's automatic prefix caching).

Used by `engine.Engine` (what `scratchlm serve` runs); sized by `serve --prefix-cache-mb`.
docs/serving.md, "Prefix caching", explains it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from scratchlm.model import KVCache

PREFIX_BLOCK = 16
"""The prefix cache finds shared starts by whole blocks of this many tokens (vLLM's block size),
then extends a match token by token within the next block."""


@dataclass(eq=False)  # entries are found by identity
class _Prefix:
    tokens: list[int]  # the ids whose keys and values these are
    k: list[torch.Tensor]  # per layer (nkv, n, hs)
    v: list[torch.Tensor]
    nbytes: int
    hashes: list[int]  # of tokens[:PREFIX_BLOCK], tokens[:2 * PREFIX_BLOCK], ... (whole blocks)


def block_hashes(tokens: list[int], limit: int | None = None) -> list[int]:
    """A hash of each whole block of `tokens[:limit]` chained with the blocks before it, so that
    equal hashes mean (unless they collide) equal tokens up to that block's end."""
    h, out = 0, []
    for i in range(PREFIX_BLOCK, (len(tokens) if limit is None else limit) + 1, PREFIX_BLOCK):
        h = hash((h, *tokens[i - PREFIX_BLOCK : i]))
        out.append(h)
    return out


def shared_start(a: list[int], b: list[int]) -> int:
    """How many first ids two id lists have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Keys and values of requests' tokens, kept after their slots are freed, so that a prompt
    that starts with the same tokens copies them instead of computing them again: the next
    turn of a chat (its prompt is the whole conversation so far), a shared system prompt or
    few-shot context, a retried request, `n` copies of one prompt. vLLM calls this automatic
    prefix caching.

    An entry is one row: its tokens and, per layer, the keys and values of positions 0..n-1.
    Keys and values of a position depend only on the tokens up to it (attention is causal), so
    the first m positions of an entry are what a prefill of any prompt that starts with the
    same m tokens would compute. Entries are found through the hashes of their whole blocks of
    PREFIX_BLOCK tokens (a prompt is matched block by block, a dict lookup each, then token by
    token in the block after), kept least recently used first and dropped from that end to
    stay within `max_bytes`; an entry whose tokens start a new one's (the previous turn of the
    same chat) is dropped for it. Engine thread only.
    """

    def __init__(self, max_bytes: int, token_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.token_bytes = token_bytes  # keys and values of one position, all layers
        self.entries: OrderedDict[int, _Prefix] = OrderedDict()  # by id(), least recently used first
        self.blocks: dict[int, list[_Prefix]] = {}  # block hash -> entries holding that start
        self.ends: dict[int, list[_Prefix]] = {}  # hash of an entry's last whole block -> entries
        self.nbytes = 0

    def match(self, prompt: list[int], touch: bool = True) -> tuple[_Prefix | None, int]:
        """The entry sharing the longest start with `prompt`, and how many tokens it shares: at
        most len(prompt) - 1, as the last prompt token must run to give the first new token.
        Only starts of at least one whole block are found. `touch`: the entry becomes the most
        recently used."""
        limit = len(prompt) - 1
        found: list[_Prefix] = []
        n = 0
        for i, h in enumerate(block_hashes(prompt, limit)):
            if h not in self.blocks:
                break
            found, n = self.blocks[h], (i + 1) * PREFIX_BLOCK
        best, best_n = None, 0
        for e in sorted(found, key=lambda e: -self._extend(e, prompt, n, limit)):
            if e.tokens[:n] == prompt[:n]:  # else a hash collision
                best, best_n = e, self._extend(e, prompt, n, limit)
                break
        if best is not None and touch:
            self.entries.move_to_end(id(best))
        return best, best_n

    @staticmethod
    def _extend(e: _Prefix, prompt: list[int], n: int, limit: int) -> int:
        m, end = n, min(len(e.tokens), limit)
        while m < end and e.tokens[m] == prompt[m]:
            m += 1
        return m

    def load(self, entry: _Prefix, n: int, cache: KVCache, row: int) -> None:
        """Write the entry's first n positions into a cache row, which then holds n tokens."""
        for ck, cv, k, v in zip(cache.k, cache.v, entry.k, entry.v):
            ck[row, :, :n] = k[:, :n]
            cv[row, :, :n] = v[:, :n]
        cache.pos[row] = n

    def store(self, tokens: list[int], cache: KVCache, row: int) -> None:
        """Keep a cache row's keys and values for `tokens` (positions 0..len-1), or for as many
        of its first tokens as `max_bytes` holds."""
        tokens = tokens[: self.max_bytes // self.token_bytes]
        n = len(tokens)
        hashes = block_hashes(tokens)
        if not hashes:
            return  # shorter than a block: nothing a prompt could find
        for e in self.blocks.get(hashes[-1], ()):
            if len(e.tokens) >= n and e.tokens[:n] == tokens:  # nothing new
                self.entries.move_to_end(id(e))
                return
        for i, h in enumerate(hashes):  # entries this one extends (each seen at its last block)
            for e in list(self.ends.get(h, ())):
                if len(e.hashes) == i + 1 and len(e.tokens) <= n and tokens[: len(e.tokens)] == e.tokens:
                    self._drop(e)
        nbytes = n * self.token_bytes
        while self.nbytes + nbytes > self.max_bytes:  # before the copy: the bound holds at all times
            self._drop(next(iter(self.entries.values())))
        k = [ck[row, :, :n].clone() for ck in cache.k]
        v = [cv[row, :, :n].clone() for cv in cache.v]
        entry = _Prefix(tokens, k, v, nbytes, hashes)
        self.entries[id(entry)] = entry
        for h in hashes:
            self.blocks.setdefault(h, []).append(entry)
        self.ends.setdefault(hashes[-1], []).append(entry)
        self.nbytes += nbytes

    def _drop(self, entry: _Prefix) -> None:
        del self.entries[id(entry)]
        for h in entry.hashes:
            holders = self.blocks[h]
            holders.remove(entry)
            if not holders:
                del self.blocks[h]
        ends = self.ends[entry.hashes[-1]]
        ends.remove(entry)
        if not ends:
            del self.ends[entry.hashes[-1]]
        self.nbytes -= entry.nbytes
