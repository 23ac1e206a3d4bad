"""Drafts from the context (docs/design.md §4): the continuation of the longest n-gram match in the text so far.

Verification is exact whatever the drafts are, so a step's draft slots may hold tokens copied from the prompt
and the generated text (as prompt-lookup decoding does) when that is the likelier source. For sampling a
copied draft is a proposal with probability one on that token.
"""

from __future__ import annotations

MAX_MATCH = 64  # the longest match ``NgramIndex.match`` measures (longer loops are as sure as 64 tokens of one)


class NgramIndex:
    """Per row: the latest earlier occurrence of every n-gram (``min_n <= n <= max_n``) of the sequence.

    ``lookup(k)`` returns ``k`` tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram of the sequence, continued periodically past the end when that occurrence is fewer than ``k`` tokens
    back (empty when no suffix n-gram occurred before). Updates are O(max_n) per token.
    """

    def __init__(self, tokens, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.seq: list[int] = []
        self.index: dict[tuple, int] = {}  # n-gram -> index of the token that followed it (latest occurrence)
        self.extend(tokens)

    def extend(self, tokens) -> None:
        seq, index, lo, hi = self.seq, self.index, self.min_n, self.max_n
        for t in tokens:
            i = len(seq)  # the n-grams ending at i - 1 are followed by the new token at i
            for n in range(lo, min(hi, i) + 1):
                index[tuple(seq[i - n : i])] = i
            seq.append(int(t))

    def lookup(self, k: int) -> list[int]:
        return self.match(k)[0]

    def match(self, k: int, max_len: int = MAX_MATCH) -> tuple[list[int], int]:
        """``(drafts, match length)``: the ``k`` drafts of ``lookup`` and how many tokens (up to ``max_len``) the
        text before that earlier occurrence agrees with the text's end. A long match means the text repeats
        itself (a loop, a copied block): its continuation is likely; a 1-token match says little."""
        seq = self.seq
        if k < 1:
            return [], 0
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            p = self.index.get(tuple(seq[-n:]))
            if p is not None:
                # the text since that occurrence repeats with period d = len - p: continue it past the end (a loop
                # of d tokens predicts itself), so a short period still gives k drafts
                d = len(seq) - p
                L = n
                while L < max_len and p - 1 - L >= 0 and seq[p - 1 - L] == seq[-1 - L]:
                    L += 1
                return [seq[p + (i % d)] for i in range(k)], L
        return [], 0
