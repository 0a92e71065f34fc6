"""Packing: tokenized examples into rows of at most max_seq_length tokens, TRL's three strategies
(SFTConfig.packing_strategy).

- "bfd": `pack_rows` fills rows best fit, longest first, never splitting an example; each is a segment of its own
  (it attends only to itself, its positions start at 0). Given `max_examples` it also evens out the examples per
  row and orders them so that the rows fit cuDNN's ragged layout (`fastlora_jax.packed_attention`);
  `fastlora_jax.packed_batches` does that for a model and batches the rows. Examples must fit max_seq_length
  (the tokenization truncates them).
- "bfd_split": the same after `split_long` has cut the longer examples into pieces that fit: no token is dropped.
- "wrapped": `wrap_rows` concatenates every example and cuts rows of max_seq_length, with no segments.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Sequence

import numpy as np

from fastlora_jax.loss import IGNORE_INDEX
from fastlora_jax.packed_attention import MIN_CHUNK

_SPREAD_GROUP = 1024  # rows that exchange examples among themselves (`_spread`)
_MOST_GIVEN = 16  # the most examples a crowded row gives for one (`_exchange`)
_ORDER_SHUFFLES = 64  # the most shuffled orders `_chunk_order` tries after its two even ones
STRATEGIES = ("bfd", "bfd_split", "wrapped")  # TRL's SFTConfig.packing_strategy


def pack(rows: Sequence[dict[str, np.ndarray]], max_seq_length: int, *, strategy: str = "bfd",
         max_examples: int | None = None) -> list[dict[str, np.ndarray]]:
    """Tokenized examples packed into rows of at most max_seq_length tokens by TRL's packing `strategy` (above).
    max_examples: `pack_rows`' (for the ragged layout); "wrapped" rows have no segments, so it does not apply."""
    check_strategy(strategy)
    if strategy == "wrapped":
        return wrap_rows(rows, max_seq_length)
    if strategy == "bfd_split":
        rows = split_long(rows, max_seq_length)
    return pack_rows(rows, max_seq_length, max_examples=max_examples)


def check_strategy(strategy: str, *, name: str = "strategy") -> None:
    """Raises ValueError naming `strategy` (the argument `name`) unless it is one of STRATEGIES."""
    if strategy not in STRATEGIES:
        raise ValueError(f"{name}={strategy!r}; accepted: {', '.join(map(repr, STRATEGIES))} (TRL's "
                         "packing_strategy)")


def keeps_long_examples(strategy: str) -> bool:
    """Whether `strategy` takes examples longer than max_seq_length whole ("bfd_split" cuts them, "wrapped" wraps
    them), so that the tokenization must not truncate them; "bfd" takes them truncated, as TRL's."""
    return strategy != "bfd"


def split_long(rows: Sequence[dict[str, np.ndarray]], max_seq_length: int) -> list[dict[str, np.ndarray]]:
    """Each example longer than max_seq_length as consecutive pieces of max_seq_length tokens (the last shorter), as
    TRL's "bfd_split": packed, each piece is an example of its own (its positions restart at 0 and it sees nothing
    of the pieces before it). Pieces with no token to train on (labels -100 after the first) are dropped; examples
    that fit are kept as they are, in dataset order."""
    pieces = []
    for row in rows:
        n = len(row["input_ids"])
        if n <= max_seq_length:
            pieces.append(row)
            continue
        for start in range(0, n, max_seq_length):
            piece = {k: v[start: start + max_seq_length] for k, v in row.items()}
            if np.any(piece["labels"][1:] != IGNORE_INDEX):
                pieces.append(piece)
    return pieces


def wrap_rows(rows: Sequence[dict[str, np.ndarray]], max_seq_length: int) -> list[dict[str, np.ndarray]]:
    """TRL's "wrapped" packing: every example's tokens and labels in dataset order, concatenated and cut into rows of
    max_seq_length tokens (the last shorter), with no segment ids. As in TRL, attention and positions run across
    the examples a row holds, and an example's last token is trained to predict the next one's first (where that
    label is not -100). Rows left with no token to train on are dropped."""
    ids = np.concatenate([r["input_ids"] for r in rows])  # [all tokens]
    labels = np.concatenate([r["labels"] for r in rows])  # [all tokens]
    cuts = range(0, len(ids), max_seq_length)
    return [{"input_ids": ids[s: s + max_seq_length], "labels": labels[s: s + max_seq_length]} for s in cuts
            if np.any(labels[s + 1: s + max_seq_length] != IGNORE_INDEX)]


def pack_rows(rows: Sequence[dict[str, np.ndarray]], max_seq_length: int, *,
              max_examples: int | None = None) -> list[dict[str, np.ndarray]]:
    """Packs examples into rows of at most max_seq_length tokens (best fit, longest first); examples never split.

    Each packed row holds "input_ids", "labels", "segment_ids" (1, 2, ... per example) and "positions" (0, 1, ...
    within each example). The first label of each example is set to -100: it is never a target (nothing precedes it
    in its own example), so the packed loss equals the unpacked one even for a loss that ignores segments.

    max_examples: None keeps best fit's rows, each in dataset order. A number K = M - 1 evens out the examples per
    row for cuDNN's ragged layout (`fastlora_jax.packed_attention`: a chunk of a row may start at most M pieces, its
    padding one of them): examples are exchanged between rows, never adding one, until each holds at most K where
    the lengths allow. Where best fit's rows average more than K, the rows are taken as 2, 4, ... chunks (of >=
    MIN_CHUNK tokens), the fewest whose M * chunks - 1 examples a row hold them all, that many at most a row, and
    each row's examples are ordered to start at most M in a chunk where an order tried does (`_chunk_order`). The
    same dataset gives the same rows on any machine.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples!r}; accepted: an int >= 1, or None")
    lengths = np.array([len(r["input_ids"]) for r in rows], np.int64)  # [examples]
    too_long = np.flatnonzero(lengths > max_seq_length)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"row {i} has {lengths[i]} tokens > max_seq_length={max_seq_length}; truncate it first, "
                         "or cut it into pieces that fit (`split_long`, TRL's packing_strategy 'bfd_split')")
    bins = _best_fit(lengths, max_seq_length)
    if max_examples is None:
        bins = [sorted(members) for members in bins]  # dataset order inside a row
    else:
        slots = max_examples + 1  # M: the examples and the padding of a chunk
        chunks = 1  # the fewest chunks of M slots a row whose rows can hold the examples
        while len(rows) > (chunks * slots - 1) * len(bins) and max_seq_length // (2 * chunks) >= MIN_CHUNK:
            chunks *= 2
        bins = [_chunk_order(members, lengths, max_seq_length, chunks, slots, seed=b)
                for b, members in enumerate(_spread(bins, lengths, max_seq_length, chunks * slots - 1))]
    packed = []
    for members in bins:
        ids = np.concatenate([rows[i]["input_ids"] for i in members])
        labels = np.concatenate([_first_ignored(rows[i]["labels"]) for i in members])
        segments = np.concatenate([np.full(len(rows[i]["input_ids"]), s, np.int32) for s, i in enumerate(members, 1)])
        positions = np.concatenate([np.arange(len(rows[i]["input_ids"]), dtype=np.int32) for i in members])
        packed.append({"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": positions})
    return packed


def _best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best fit decreasing: each example (longest first) into the row with the least room that holds it."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            space, b = capacity - n, len(bins) - 1
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            space -= n
        bisect.insort(free, (space, b))
    return bins


def _spread(bins: list[list[int]], lengths: np.ndarray, capacity: int, bound: int) -> list[list[int]]:
    """Rows of at most `bound` examples where exchanges allow (`_exchange`), as many rows as `bins`. The rows are
    dealt into groups of about _SPREAD_GROUP rows, each with its share of crowded and sparse rows (by count, round
    robin), and exchange within their group: the search for a partner grows with the rows it looks at."""
    rows = [sorted(b, key=lambda i: (lengths[i], i)) for b in bins]  # each ascending by length
    groups = -(-len(rows) // _SPREAD_GROUP)
    by_count = sorted(range(len(rows)), key=lambda b: (-len(rows[b]), b))
    for g in range(groups):
        members = by_count[g::groups]
        spread = _exchange([rows[b] for b in members], lengths, capacity, bound)
        for b, row in zip(members, spread):
            rows[b] = row
    return rows


def _exchange(rows: list[list[int]], lengths: np.ndarray, capacity: int, bound: int) -> list[list[int]]:
    """`rows` (each ascending by length) with at most `bound` examples where exchanges allow. A row Z with more than
    `bound` gives its shortest example to a row A with fewer that has room for it, or else a run of j >= 2 of its
    examples (consecutive in length order) to A for one example e of A, so that both rows stay within `capacity`
    and A within `bound`: A with the fewest examples first (the most room to take Z's), then the shortest e, then
    the largest j. Each exchange takes at least one example off Z, so this ends."""
    rows = [list(r) for r in rows]
    count = np.array([len(r) for r in rows])  # [rows]
    free = np.array([capacity - int(lengths[r].sum()) for r in rows])  # [rows]
    examples = np.concatenate(rows)  # [examples] the group's, by row
    row_of = np.repeat(np.arange(len(rows)), count)  # [examples] each one's row
    place = {int(e): k for k, e in enumerate(examples)}  # example -> its index in `examples`

    def exchange(z: int) -> bool:
        zl = lengths[rows[z]]  # [n] ascending
        below = count < bound
        below[z] = False
        movable = np.flatnonzero(below & (free >= zl[0]))
        if movable.size:  # a move: Z's shortest example into the fewest-example row with room for it
            return apply(z, int(movable[np.argmin(count[movable])]), [0], None)
        prefix = np.concatenate([[0], np.cumsum(zl)])  # [n + 1]
        n = len(zl)
        ex = np.flatnonzero(below[row_of])  # candidate e's: the examples of rows below the bound
        a_of, e_len = row_of[ex], lengths[examples[ex]]
        lo, hi = e_len - free[z], e_len + free[a_of]  # [candidates] the window Z's run must fall in
        most = np.minimum(np.minimum(bound - count[a_of] + 1, n - 1), _MOST_GIVEN)  # [candidates] for one e
        best_j = np.zeros(len(ex), np.int64)
        for j in range(2, int(most.max(initial=0)) + 1):
            sums = prefix[j:] - prefix[:-j]  # [n - j + 1] ascending: the runs of j consecutive examples
            at = np.minimum(np.searchsorted(sums, lo), len(sums) - 1)
            fits = (sums[at] >= lo) & (sums[at] <= hi) & (j <= most)
            best_j[fits] = j
        ok = np.flatnonzero(best_j >= 2)
        if not ok.size:
            return False
        pick = ok[np.lexsort((-best_j[ok], e_len[ok], count[a_of[ok]]))[0]]
        j = int(best_j[pick])
        sums = prefix[j:] - prefix[:-j]
        start = int(np.searchsorted(sums, lo[pick]))
        return apply(z, int(a_of[pick]), list(range(start, start + j)), int(examples[ex[pick]]))

    def apply(z: int, a: int, give: list[int], take: int | None) -> bool:
        """Z's examples at positions `give` go to A, A's `take` (or nothing) to Z."""
        taken = [rows[z][k] for k in give]
        for k in reversed(give):
            del rows[z][k]
        if take is not None:
            rows[a].remove(take)
            rows[z].append(take)
            row_of[place[take]] = z
        rows[a] += taken
        row_of[[place[t] for t in taken]] = a
        moved = int(lengths[taken].sum()) - (0 if take is None else int(lengths[take]))
        free[a] -= moved
        free[z] += moved
        for b in (a, z):
            rows[b].sort(key=lambda i: (lengths[i], i))
            count[b] = len(rows[b])
        return True

    for z in sorted(range(len(rows)), key=lambda b: (-len(rows[b]), b)):
        while len(rows[z]) > bound and exchange(z):
            pass
    return rows


def _chunk_order(members: list[int], lengths: np.ndarray, T: int, chunks: int, slots: int, *,
                 seed: int) -> list[int]:
    """A row's examples in an order that starts at most `slots` pieces (examples, and the padding) in each of `chunks`
    chunks of a T-token row, where one of the orders tried does: evenly spaced starts (`_evenly_started`), the same
    reversed, then up to _ORDER_SHUFFLES shuffles seeded by `seed` (the row's index). The first order that fits, else
    the first with the fewest pieces in its fullest chunk; with one chunk, evenly spaced starts."""
    order = _evenly_started(members, lengths)
    if chunks == 1:
        return order
    shuffles = np.random.default_rng(seed)
    tries = itertools.chain([order, order[::-1]], ([members[k] for k in shuffles.permutation(len(members))]
                                                   for _ in range(_ORDER_SHUFFLES)))
    best, fewest = order, None
    for tried in tries:
        fullest = _fullest_chunk(lengths[tried], T, T // chunks)
        if fewest is None or fullest < fewest:
            best, fewest = tried, fullest
        if fewest <= slots:
            break
    return best


def _fullest_chunk(row_lengths: np.ndarray, T: int, chunk: int) -> int:
    """The most pieces that start in one chunk of a row of examples of `row_lengths` in this order, padded to T
    (`packed_attention._Runs.pieces`: each example and the padding run. The layout also cuts the padding at each
    chunk edge, but that puts one piece in a chunk of padding alone, never more than the first chunk's)."""
    ends = np.cumsum(row_lengths)  # [n]
    starts = np.concatenate([[0], ends[:-1], ends[-1:] if ends[-1] < T else []]).astype(np.int64)
    return int(np.bincount(starts // chunk).max())


def _evenly_started(members: list[int], lengths: np.ndarray) -> list[int]:
    """A row's examples in the order that starts them closest to evenly spaced: each next one is the example whose
    length brings the next start nearest to (k + 1) / n of the row's tokens."""
    rest = sorted(members, key=lambda i: (lengths[i], i))
    total, n = int(lengths[members].sum()), len(members)
    order, at = [], 0
    for k in range(n):
        want = (k + 1) * total / n - at
        keys = lengths[rest]
        j = int(np.searchsorted(keys, want))
        pick = min((c for c in (j - 1, j) if 0 <= c < len(rest)), key=lambda c: (abs(keys[c] - want), c))
        i = rest.pop(pick)
        order.append(i)
        at += int(lengths[i])
    return order


def _first_ignored(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    out[:1] = IGNORE_INDEX
    return out
