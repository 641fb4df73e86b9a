"""Turn pairwise order predictions into one permutation of a story's items.

Conventions
-----------
The pair classifier gives, for every ordered pair ``(i, j)`` of a story's ``n``
items, two logits; class index 1 means "i comes before j" and class 0 means
"j comes before i" (the IterWeGO authors' convention). :func:`pair_logprobs`
turns them into ``logprobs[i, j] = log P_ij(i before j)``: the log-probability
that i precedes j *as predicted when the pair is presented as (i, j)*.

Both presentations ``(i, j)`` and ``(j, i)`` are predicted and need not agree,
so every decoder first combines them (:func:`combine`):

* ``p = clip(exp(logprobs[i, j]), 1e-7, 1 - 1e-7)`` and
  ``z[i, j] = log p - log(1 - p)`` (the logit of P_ij(i before j)), computed in
  log space (``log(-expm1(.))``) so confident predictions keep their precision;
* ``c[i, j] = (z[i, j] - z[j, i]) / 2``, an antisymmetric score (``c[j, i] = -c[i, j]``);
* ``S[i, j] = logsigmoid(c[i, j])``, the combined log P(i before j); by
  construction ``exp(S[i, j]) + exp(S[j, i]) = 1``.

When the two presentations already agree (``P_ji(j before i) = 1 - P_ij(i before j)``)
``S`` equals ``logprobs`` up to the clipping. The diagonal of the input is
ignored (it may hold anything, NaN included); ``S`` has a zero diagonal.
Values are clipped, not rejected, so slightly positive "log-probabilities" from
rounding are accepted; only non-finite off-diagonal values raise ``ValueError``.

Decoders (``DECODERS``)
-----------------------
``"exact"``
    The order maximising ``order_score``: the sum of ``S[i, j]`` over all pairs it
    puts i before j. Dynamic programming over subsets (``O(n 2^n)``, vectorised),
    for ``n <= max_exact`` (default 12, at most 16); larger n raises
    :class:`~iterwego.errors.DecodeError`. Ties: the lexicographically smallest
    optimal order (item indices compared from the front), with scores within
    1e-9 treated as equal so the choice does not depend on rounding.
``"tsort"``
    The authors' rule: an edge i -> j for every pair the combined prediction puts
    i first (``c[i, j] > 0``; an exact tie ``c[i, j] == 0`` gives an edge from the
    lower index), then while the graph has a cycle delete the back edge a
    depth-first search meets, then sort topologically. Made deterministic here:
    every DFS starts from the roots 0, 1, ..., n-1 and follows out-edges in
    ascending target index, and the order is the reverse DFS finishing order.
    Ignores confidence: a strong prediction on a back edge is dropped like a weak one.
``"beam"``
    Beam search building the order front to back on the same objective (each
    placed item is charged for its pairs with every item still unplaced, so
    partial scores are comparable), merging partial orders over the same item
    set, then a best-improvement local search over single-item moves. For long
    stories (n up to hundreds). Exact whenever every layer of subsets fits in the
    beam (e.g. n <= 7 with the default ``beam_size=64``).
``"auto"``
    ``"exact"`` if ``n <= max_exact`` else ``"beam"``.

Position terms (``unary``)
--------------------------
A rank head can also say where each item stands: ``unary[i, k]``, a log-probability
of item i at position k (already weighted). ``"exact"`` and ``"beam"`` (with its local
search) then maximise ``order_score`` plus the sum of ``unary[o_k, k]`` over the
order's positions; the exact DP charges the term when it places an item. ``"tsort"``
ignores it. Pairwise sums alone cannot express that two items whose cue is hidden
should be spread over the gaps between the visible ones: a position term can.

All decoders are deterministic.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from iterwego.config import DECODERS
from iterwego.errors import DecodeError

__all__ = ["DECODERS", "EXACT_HARD_LIMIT", "pair_logprobs", "combine", "decode", "order_score"]

EXACT_HARD_LIMIT = 16  # 2^16 subsets x 16 items of float64 is ~8 MB; beyond that memory and time explode

_EPS = 1e-7
_LOG_LO = float(np.log(_EPS))
_LOG_HI = float(np.log1p(-_EPS))
_UNARY_FLOOR = -1e4  # far below any real position term, far above float trouble
_TIE_TOL = 1e-9  # well above float rounding of sums of <= 120 terms of size <= 17, far below any real difference


def _torch_tensor_type() -> Any:
    # A torch tensor can only exist if torch was already imported, so never import it here.
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _to_numpy(x: Any, what: str) -> np.ndarray:
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(x, tensor_type):
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a numeric array (numpy, torch or nested lists): {err}") from None


def pair_logprobs(logits: Any) -> Any:
    """Log-probability that i precedes j from a pair classifier's 2 logits per ordered pair.

    Args:
        logits: ``(..., n, n, 2)`` logits, class 1 = "i before j"; a numpy array,
            a torch tensor or nested lists.

    Returns:
        ``(..., n, n)`` ``log_softmax(logits)[..., 1]``, a torch tensor for torch
        input (same device and dtype, differentiable) and a numpy array otherwise.
    """
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(logits, tensor_type):
        if logits.ndim < 1 or logits.shape[-1] != 2:
            raise ValueError(f"pair logits must have a last dimension of size 2, got shape {tuple(logits.shape)}")
        return logits.log_softmax(dim=-1)[..., 1]
    arr = np.asarray(logits)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = _to_numpy(arr, "pair logits")
    if arr.ndim < 1 or arr.shape[-1] != 2:
        raise ValueError(f"pair logits must have a last dimension of size 2, got shape {arr.shape}")
    return arr[..., 1] - np.logaddexp(arr[..., 0], arr[..., 1])


def _validated(logprobs: Any, *, batched: bool) -> np.ndarray:
    a = _to_numpy(logprobs, "logprobs")
    if a.shape == (0,):  # [] is how a nested list spells an empty story
        a = a.reshape(0, 0)
    if a.ndim < 2 or (not batched and a.ndim != 2) or a.shape[-1] != a.shape[-2]:
        want = "(..., n, n)" if batched else "(n, n)"
        hint = (
            "; for (n, n, 2) pair logits call pair_logprobs(logits) first" if a.ndim >= 3 and a.shape[-1] == 2 else ""
        )
        raise ValueError(
            f"logprobs must be a square {want} matrix of pair log-probabilities, got shape {a.shape}{hint}"
        )
    n = a.shape[-1]
    off = ~np.eye(n, dtype=bool)
    bad = ~np.isfinite(a) & off
    if bad.any():
        idx = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"logprobs must be finite off the diagonal; found {a[idx]} at index {idx}")
    return a


def _combined_scores(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c, S) for validated logprobs ``a`` of shape (..., n, n); see the module docstring."""
    n = a.shape[-1]
    diag = np.eye(n, dtype=bool)
    lp = np.clip(np.where(diag, np.log(0.5), a), _LOG_LO, _LOG_HI)
    z = lp - np.log(-np.expm1(lp))
    c = 0.5 * (z - np.swapaxes(z, -1, -2))
    c = np.where(diag, 0.0, c)
    s = -np.logaddexp(0.0, -c)
    s = np.where(diag, 0.0, s)
    return c, s


def combine(logprobs: Any) -> np.ndarray:
    """Combine both presentations of every pair into one consistent log P(i before j).

    Args:
        logprobs: ``(..., n, n)`` with ``logprobs[i, j] = log P_ij(i before j)``
            (numpy, torch or nested lists); the diagonal is ignored.

    Returns:
        float64 ``S`` of the same shape with ``S[i, j] = logsigmoid((z[i, j] - z[j, i]) / 2)``,
        ``z`` the clipped logit of the input, so ``exp(S[i, j]) + exp(S[j, i]) = 1``; zero diagonal.

    Raises:
        ValueError: non-square input or a non-finite value off the diagonal.
    """
    _, s = _combined_scores(_validated(logprobs, batched=True))
    return s


def order_score(logprobs: Any, order: Sequence[int], unary: Any = None) -> float:
    """The decoders' objective: sum of the combined ``S[i, j]`` over all pairs ``order`` puts i before j.

    Args:
        logprobs: ``(n, n)`` pair log-probabilities (see :func:`combine`).
        order: a permutation of ``range(n)``, first item first.
        unary: optional ``(n, n)`` position terms, ``unary[i, k]`` for item i at position k (added).

    Returns:
        The log-probability of the order under independent combined pair
        predictions (0 is best; always <= 0), plus its position terms.
    """
    a = _validated(logprobs, batched=False)
    _, s = _combined_scores(a)
    n = a.shape[0]
    pos = _positions(order, n)
    u = _unary(unary, n)
    return float(s[pos[:, None] < pos[None, :]].sum()) + (0.0 if u is None else float(u[np.arange(n), pos].sum()))


def _unary(unary: Any, n: int) -> np.ndarray | None:
    """Validated ``(n, n)`` float64 position terms (clipped below like the pair terms), or None."""
    if unary is None:
        return None
    u = _to_numpy(unary, "unary")
    if u.shape != (n, n):
        raise ValueError(f"unary must be an (n, n) = ({n}, {n}) matrix of position terms, got shape {u.shape}")
    if np.isnan(u).any() or np.isposinf(u).any():
        raise ValueError("unary must not hold NaN or +inf")
    return np.maximum(u, _UNARY_FLOOR)  # -inf (an impossible position) stays finite, so sums compare


def _positions(order: Sequence[int], n: int) -> np.ndarray:
    o = np.asarray(order)
    if (
        o.shape != (n,)
        or (n and not np.issubdtype(o.dtype, np.integer))
        or not np.array_equal(np.sort(o), np.arange(n))
    ):
        raise ValueError(f"order must be a permutation of range({n}), got {list(np.asarray(order).ravel())[:20]}")
    pos = np.empty(n, dtype=np.int64)
    pos[o.astype(np.int64)] = np.arange(n)
    return pos


def decode(
    logprobs: Any,
    method: str = "exact",
    *,
    beam_size: int = 64,
    max_exact: int = 12,
    before: Any = None,
    unary: Any = None,
) -> list[int]:
    """Predict a story's order from its pairwise log-probabilities.

    Args:
        logprobs: ``(n, n)`` with ``logprobs[i, j] = log P_ij(i before j)`` (numpy,
            torch or nested lists); the diagonal is ignored.
        method: one of ``DECODERS``: ``"exact"``, ``"tsort"``, ``"beam"`` or ``"auto"``
            (see the module docstring).
        beam_size: partial orders kept per step by ``"beam"`` (and ``"auto"`` above ``max_exact``).
        max_exact: largest n that ``"exact"`` accepts and that ``"auto"`` decodes exactly;
            at most ``EXACT_HARD_LIMIT`` (16).
        before: optional ``(n, n)`` bool hard constraints, ``before[i, j]``: i must come
            before j (e.g. capture times, :mod:`iterwego.capture_time`); must be acyclic.
            Every decoder's order obeys them; ``"exact"`` returns the best order among those that do.
        unary: optional ``(n, n)`` position terms added to the objective (see the module docstring).

    Returns:
        The item indices in predicted order, first item first (a permutation of ``range(n)``).

    Raises:
        ValueError: bad input (non-square, non-finite off-diagonal, cyclic ``before``), unknown method or bad option.
        DecodeError: ``method="exact"`` with ``n > max_exact``.
    """
    if method not in DECODERS:
        raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(DECODERS)}")
    if not isinstance(max_exact, (int, np.integer)) or not 0 <= max_exact <= EXACT_HARD_LIMIT:
        raise ValueError(f"max_exact must be an integer in 0..{EXACT_HARD_LIMIT}, got {max_exact!r}")
    if not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    a = _validated(logprobs, batched=False)
    n = a.shape[0]
    if method == "auto":
        method = "exact" if n <= max_exact else "beam"
    if method == "exact" and n > max_exact:
        raise DecodeError(
            f"exact decoding supports at most {max_exact} items (max_exact, up to {EXACT_HARD_LIMIT}), "
            f"got n={n}; use method='beam'"
        )
    if n <= 1:
        return list(range(n))
    c, s = _combined_scores(a)
    u = _unary(unary, n)
    must = _constraints(before, n)
    if must is not None:
        c, s = _pinned(c, s, must, u)
    if method == "tsort":
        order = _tsort(c)
    elif method == "exact":
        order = _exact(s, u)
    else:
        order = _local_search(s, _beam(s, int(beam_size), u), u=u)
    return order if must is None else _obey(order, must)


# --------------------------------------------------------------------------- hard constraints


def _constraints(before: Any, n: int) -> np.ndarray | None:
    """Validated ``(n, n)`` bool constraints, or None when there are none."""
    if before is None:
        return None
    b = _to_numpy(before, "before") != 0
    if b.shape != (n, n):
        raise ValueError(f"before must be an (n, n) = ({n}, {n}) boolean matrix, got shape {b.shape}")
    b = b & ~np.eye(n, dtype=bool)
    if not b.any():
        return None
    _obey(list(range(n)), b)  # raises on a cycle
    return b


def _pinned(
    c: np.ndarray, s: np.ndarray, must: np.ndarray, u: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores where breaking one constraint costs more than every other pair (and position term) can gain.

    Any order that obeys the constraints scores at least ``-sum|S| - sum|U|`` and any that
    breaks one at most ``-big``, so the exact decoder, the beam's ranking and the
    local search's improving moves all prefer obeying orders.
    """
    big = 1.0 + float(np.abs(s).sum()) + (0.0 if u is None else float(np.abs(u).sum()))
    s = np.where(must, 0.0, np.where(must.T, -big, s))
    c = np.where(must, big, np.where(must.T, -big, c))
    return c, s


def _obey(order: list[int], must: np.ndarray) -> list[int]:
    """``order`` if it obeys ``must``; else the order that keeps each item as early as its constraints allow.

    tsort can delete a constraint edge while breaking a cycle; this repairs it.
    """
    o = np.asarray(order, dtype=np.int64)
    pos = np.empty(len(o), dtype=np.int64)
    pos[o] = np.arange(len(o))
    if not (must & (pos[:, None] > pos[None, :])).any():
        return [int(x) for x in order]
    left, out = list(order), []
    waiting = must.sum(0)  # unplaced predecessors per item
    while left:
        k = next((k for k, j in enumerate(left) if waiting[j] == 0), None)
        if k is None:
            raise ValueError("before has a cycle: no order can satisfy it")
        j = left.pop(k)
        out.append(j)
        waiting = waiting - must[j]
    return out


# --------------------------------------------------------------------------- tsort


def _tsort(c: np.ndarray) -> list[int]:
    """The authors' cycle-breaking topological sort, in one DFS.

    Restarting the search after each deleted back edge (as the authors do) revisits
    exactly the same nodes in the same order up to the deleted edge, because a DFS
    examines each edge once and the deleted one had not influenced anything before
    it. So one DFS that skips back edges deletes the same edges, and the later
    topological DFS over the resulting DAG (same roots, same edge order) finishes
    nodes in the same order as this one.
    """
    n = c.shape[0]
    lower = np.triu(np.ones((n, n), dtype=bool), k=1)
    edge = (c > 0) | ((c == 0) & lower)
    adj = [np.flatnonzero(edge[u]).tolist() for u in range(n)]  # ascending targets
    state = [0] * n  # 0 unvisited, 1 on the DFS stack, 2 finished
    finished: list[int] = []
    for root in range(n):
        if state[root]:
            continue
        state[root] = 1
        stack = [(root, iter(adj[root]))]
        while stack:
            u, targets = stack[-1]
            for v in targets:
                if state[v] == 0:
                    state[v] = 1
                    stack.append((v, iter(adj[v])))
                    break
                # state 1: a back edge, deleted by the authors' rule; state 2: already finished.
            else:
                state[u] = 2
                finished.append(u)
                stack.pop()
    return finished[::-1]


# --------------------------------------------------------------------------- exact


@lru_cache(maxsize=EXACT_HARD_LIMIT + 1)
def _subset_layers(n: int) -> tuple[np.ndarray, ...]:
    """All masks over n items grouped by popcount (layer k holds the k-item subsets, ascending)."""
    masks = np.arange(1 << n, dtype=np.int64)
    pc = np.zeros(1 << n, dtype=np.int64)
    for b in range(n):
        pc += (masks >> b) & 1
    order = np.argsort(pc, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(pc, minlength=n + 1))])
    layers = tuple(order[bounds[k] : bounds[k + 1]] for k in range(n + 1))
    for layer in layers:
        layer.setflags(write=False)
    return layers


def _exact(s: np.ndarray, u: np.ndarray | None = None) -> list[int]:
    """Subset DP over suffixes: best[m] = best score of ordering the items of mask m among themselves.

    Building suffixes (choose the *first* item of each remaining set) makes the
    lowest-index tie-break at reconstruction give the lexicographically smallest
    optimal order. The first item of a k-item suffix stands at position n - k, where
    its position term ``u[j, n - k]`` is charged.
    """
    n = s.shape[0]
    full = (1 << n) - 1
    # row[m, j] = sum_{k in m} S[j, k]: the gain of putting j before every item of m.
    row = np.zeros((1 << n, n))
    for b in range(n):
        row[1 << b : 2 << b] = row[: 1 << b] + s[:, b]
    best = np.full(1 << n, -np.inf)
    best[0] = 0.0
    first = np.zeros(1 << n, dtype=np.int8)
    bits = np.int64(1) << np.arange(n, dtype=np.int64)
    for k, layer in enumerate(_subset_layers(n)[1:], start=1):
        inside = (layer[:, None] & bits) != 0
        rest = layer[:, None] ^ bits  # for j outside the mask this is a superset; masked out below
        gain = row[rest, np.arange(n)] + best[rest] + (0.0 if u is None else u[:, n - k][None, :])
        cand = np.where(inside, gain, -np.inf)
        top = cand.max(axis=1)
        best[layer] = top
        first[layer] = np.argmax(cand >= (top - _TIE_TOL)[:, None], axis=1)
    order, m = [], full
    for _ in range(n):
        j = int(first[m])
        order.append(j)
        m ^= 1 << j
    return order


# --------------------------------------------------------------------------- beam


def _beam(s: np.ndarray, beam_size: int, u: np.ndarray | None = None) -> list[int]:
    """Front-to-back beam search; partial score = sum of S over pairs with an item already placed (and of
    the placed items' position terms)."""
    n = s.shape[0]
    # Random 64-bit keys identify an item set by XOR; a collision (~2^-64 per pair of states)
    # could only drop a candidate, never produce an invalid order.
    keys = np.random.default_rng(0x17E4).integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64).astype(np.uint64)
    score = np.zeros(1)
    todo = s.sum(axis=1)[None, :]  # todo[b, j] = sum over unplaced k of S[j, k] (S[j, j] = 0)
    placed = np.zeros((1, n), dtype=bool)
    sets = np.zeros(1, dtype=np.uint64)
    orders = np.zeros((1, 0), dtype=np.int64)
    for k in range(n):
        here = score[:, None] + todo + (0.0 if u is None else u[:, k][None, :])
        cand = np.where(placed, -np.inf, here).ravel()
        ranked = np.argsort(-cand, kind="stable")  # ties: earlier beam, then lower item index
        ranked = ranked[np.isfinite(cand[ranked])]
        b, j = np.divmod(ranked, n)
        child = sets[b] ^ keys[j]
        _, first = np.unique(child, return_index=True)  # best-ranked candidate per item set
        keep = np.sort(first)[:beam_size]
        b, j = b[keep], j[keep]
        score = cand[ranked[keep]]
        todo = todo[b] - s[:, j].T
        placed = placed[b]
        placed[np.arange(len(j)), j] = True
        sets = child[keep]
        orders = np.concatenate([orders[b], j[:, None]], axis=1)
    return orders[0].tolist()


def _local_search(
    s: np.ndarray, order: list[int], max_rounds: int | None = None, u: np.ndarray | None = None
) -> list[int]:
    """Best-improvement hill climbing over "move one item to another position".

    With ``e[p, t] = S[o_t, o_p] - S[o_p, o_t]`` (order-permuted), moving the item at
    position p to q > p changes the score by ``sum_{t=p+1..q} e[p, t]`` and to q < p
    by ``-sum_{t=q..p-1} e[p, t]``; one cumulative sum gives all n^2 moves at once.
    Position terms change for the moved item and for each item it jumps over (one
    place left or right), again summed by cumulative sums.
    """
    n = len(order)
    o = np.asarray(order, dtype=np.int64)
    rounds = 10 * n + 100 if max_rounds is None else max_rounds
    cols = np.arange(n)
    for _ in range(rounds):
        a = s[np.ix_(o, o)]
        e = a.T - a
        cum = np.concatenate([np.zeros((n, 1)), np.cumsum(e, axis=1)], axis=1)  # cum[p, t] = sum_{u<t} e[p, u]
        target = cols[None, :] + (cols[None, :] > cols[:, None])
        gain = cum[cols[:, None], target] - cum[cols, cols + 1][:, None]
        if u is not None:
            gain = gain + _position_gain(u[o], cols)
        flat = int(np.argmax(gain))
        if gain.flat[flat] <= _TIE_TOL:
            break
        p, q = divmod(flat, n)
        item = o[p]
        o = np.insert(np.delete(o, p), q, item)
    return o.tolist()


def _position_gain(uo: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``g[p, q]``: change of the position terms when the item at position p moves to q (``uo[t, k]``: the
    term of the item now at t, at position k)."""
    n = len(cols)
    stay = uo[cols, cols]
    left = np.concatenate([[0.0], uo[cols[1:], cols[1:] - 1] - stay[1:]])  # item at t shifted to t - 1
    right = np.concatenate([uo[cols[:-1], cols[:-1] + 1] - stay[:-1], [0.0]])  # item at t shifted to t + 1
    cl = np.concatenate([[0.0], np.cumsum(left)])
    cr = np.concatenate([[0.0], np.cumsum(right)])
    p, q = cols[:, None], cols[None, :]
    jumped = np.where(q > p, cl[np.minimum(q + 1, n)] - cl[p + 1], np.where(q < p, cr[p] - cr[q], 0.0))
    return jumped + uo[p, q] - stay[:, None]


#: The exact decoder's default limit; longer stories fall back to beam search (and callers say so).
MAX_EXACT = 12


def decode_story(
    logprobs: Any, method: str = "exact", *, max_exact: int = MAX_EXACT, before: Any = None, unary: Any = None
) -> tuple[list[int], bool]:
    """:func:`decode` with the one fallback policy: ``exact`` above ``max_exact`` items becomes ``beam``.

    Returns ``(order, fell_back)`` so every caller can tell the user when the exact decoder was not used.
    ``before`` (hard constraints) and ``unary`` (position terms) are passed on to :func:`decode`.
    """
    n = len(logprobs)
    if method == "exact" and n > max_exact:
        return decode(logprobs, method="beam", before=before, unary=unary), True
    return decode(logprobs, method=method, max_exact=max_exact, before=before, unary=unary), False


def decode_stories(
    logprobs: Any, lengths: Sequence[int], method: str = "exact", *, before: Any = None, unary: Any = None
) -> tuple[list[list[int]], int]:
    """Decode each story of a padded ``(B, n, n)`` log-probability batch; returns slot orders and fallback count.

    ``before``: optional padded ``(B, n, n)`` bool hard constraints, in the same slot order;
    ``unary``: optional padded ``(B, n, P)`` position terms (slot, position); a story longer than ``P`` is
    decoded without them.
    """
    lp = _to_numpy(logprobs, "logprobs") if not isinstance(logprobs, np.ndarray) else logprobs
    un = None if unary is None else (_to_numpy(unary, "unary") if not isinstance(unary, np.ndarray) else unary)
    orders, fallbacks = [], 0
    for b, n in enumerate(lengths):
        order, fb = decode_story(
            lp[b, :n, :n],
            method,
            before=None if before is None else before[b][:n, :n],
            unary=None if un is None or un.shape[-1] < n else un[b, :n, :n],
        )
        orders.append(order)
        fallbacks += fb
    return orders, fallbacks
