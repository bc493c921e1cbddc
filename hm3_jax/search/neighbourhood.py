"""The architecture level's refinement after PPO: first-order local search over single-step path edits.

`neighbour_moves` lists every path one edit away (source swaps, deletions, repeats, insertions of another source's
block, neighbouring layers), `order_moves` the order a budgeted search scores them in (the kinds taking turns,
each kind's moves spread over the depth), and `neighbourhood_search` climbs under the RL reward
(`hm3_jax.arch.env.host_reward`) with at most a given number of new path evaluations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from hm3_jax.arch.env import host_reward

# The single-step edits of a path, by kind (`config.arch.neighbourhood_kinds` names them).
MOVE_KINDS = ("swap", "delete", "repeat", "insert", "layer")
# The neighbourhood before issue 20 (no insertions), listed kind by kind: `benchmarks/arch_headroom.py`'s one-edit
# set, so its published tables reproduce.
KINDS_WITHOUT_INSERTION = ("swap", "delete", "repeat", "layer")
NEIGHBOURHOOD_ORDERS = ("round_robin", "by_kind")
# `run_arch_level` draws the neighbourhood orders from `fold_in(key, NEIGHBOURHOOD_STREAM)`, a stream of the arch
# level's key that the PPO loop never draws from.
NEIGHBOURHOOD_STREAM = 0x6E62


class Moves(NamedTuple):
    """Every path one edit away from a path, listed kind by kind (`kinds` order), then step by step.

    paths: [M, T_max] int32 pool indices m * L + l, -1 padded; kind: [M] index into the `kinds` they were made
    for; step: [M] the step t the edit is at (the step replaced, deleted, repeated, or inserted after).
    """

    paths: np.ndarray  # [M, T_max]
    kind: np.ndarray  # [M]
    step: np.ndarray  # [M]
    num_steps: int  # T, the steps of the path the moves edit


def check_neighbourhood(kinds, order: str) -> None:
    """ValueError naming the setting unless `kinds` (a non-empty subset of MOVE_KINDS, no repeats) and `order`
    (one of NEIGHBOURHOOD_ORDERS) are usable (`config.arch.neighbourhood_kinds` / `neighbourhood_order`)."""
    kinds = tuple(kinds)
    if not kinds or len(set(kinds)) != len(kinds) or any(k not in MOVE_KINDS for k in kinds):
        raise ValueError(f"arch.neighbourhood_kinds must be distinct names from {MOVE_KINDS}, got {kinds!r}")
    if order not in NEIGHBOURHOOD_ORDERS:
        raise ValueError(f"arch.neighbourhood_order must be one of {NEIGHBOURHOOD_ORDERS}, got {order!r}")


def neighbour_moves(
    path, num_sources: int, num_layers: int, t_min: int, t_max: int, kinds=MOVE_KINDS
) -> Moves:
    """Every path one edit away from `path` [T_max] (T steps, step t = block (m_t, l_t)), without `path` itself.

    Kinds (HM3_SPEC "Architecture space": blocks may be swapped between sources, repeated or skipped):
      swap: step t replaced by another source's block of the same layer, (m', l_t) with m' != m_t: the stitch
        that mixes experts' skills (num_sources - 1 per step);
      delete: step t removed (if T > t_min);
      repeat: step t run twice (if T < t_max);
      insert: another source's block of the same layer, (m', l_t) with m' != m_t, run after step t (if
        T < t_max): a path longer than the models, as depth up-scaling inserts blocks (docs/headroom.md: at
        16 blocks the best one-edit paths of the balanced Theta(lambda) are one more block at layer 10-11).
        With m' = m_t it would be the repeat; other layers are left to the search's next steps (with `layer`),
        so the neighbourhood stays linear in T (num_sources - 1 per step);
      layer: step t replaced by the same source's neighbouring layer (m_t, l_t +- 1).
    Within a kind, moves are listed step by step (t ascending), then by source / layer ascending. A path that
    two kinds make (e.g. inserting (m', l) after a step that is followed by (m', l) repeats that block) is
    listed under the first of `kinds` only, and once.
    Returns: Moves (paths [M, T_max], kind [M], step [M], num_steps T).
    """
    check_neighbourhood(kinds, "by_kind")
    steps = [int(a) for a in np.asarray(path, np.int32) if a >= 0]
    T, L = len(steps), num_layers
    made: dict[str, list[tuple[int, list[int]]]] = {k: [] for k in MOVE_KINDS}  # kind -> [(step, path)]
    for t, a in enumerate(steps):
        m, l = divmod(a, L)
        others = [m2 * L + l for m2 in range(num_sources) if m2 != m]
        made["swap"] += [(t, steps[:t] + [b] + steps[t + 1 :]) for b in others]
        if T > t_min:
            made["delete"].append((t, steps[:t] + steps[t + 1 :]))
        if T < t_max:
            made["repeat"].append((t, steps[: t + 1] + [a] + steps[t + 1 :]))
            made["insert"] += [(t, steps[: t + 1] + [b] + steps[t + 1 :]) for b in others]
        made["layer"] += [
            (t, steps[:t] + [m * L + l2] + steps[t + 1 :]) for l2 in (l - 1, l + 1) if 0 <= l2 < L
        ]
    seen, rows, kind, step = {tuple(steps)}, [], [], []
    for k, name in enumerate(kinds):
        for t, cand in made[name]:
            if tuple(cand) not in seen:
                seen.add(tuple(cand))
                rows.append(cand + [-1] * (t_max - len(cand)))
                kind.append(k)
                step.append(t)
    rows = np.asarray(rows, np.int32).reshape(-1, t_max)
    return Moves(rows, np.asarray(kind, np.int32), np.asarray(step, np.int32), T)


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput (bit-reversal) order, e.g. n = 8: 0 4 2 6 1 5 3 7: every prefix is spread over
    the range (the first 2^j are 2^-j of the range apart), so a search that stops early has looked everywhere."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def order_moves(moves: Moves, order: str = "round_robin", key=None) -> np.ndarray:
    """[M] the order (indices into `moves`) in which a budgeted search scores the moves.

    "by_kind": as listed (kind by kind, step by step): the order before issue 20. At L = 16 it puts 48 source
    swaps before the first deletion, so a budget of 16 (the full config's) never left the swaps, and on the
    deep tiny3 the depth edits that pay were out of reach (docs/headroom.md).
    "round_robin" (default): the kinds take turns (one swap, one deletion, one repeat, one insertion, one
    neighbouring layer, then the next of each; a kind that has run out is skipped), so the first B moves hold
    min(floor(B / kinds), M_kind) of every kind: no prior says which kind pays (on tiny3 none did; on the deep
    tiny3 the edits over 2 SE were repeats, insertions and a deletion, no swap), so a small budget is shared
    evenly. Within a kind the
    steps are visited in `spread_order` rotated by an offset, and a step's moves (which source, which
    neighbouring layer) are taken one per step per pass, so a kind's first moves are spread over the whole
    depth instead of crowding its first layers; with a `key` the offset and each step's move order are drawn
    from it (host-side numpy Generator seeded by the key's data), so each preference (its own key) looks at
    other layers and the preferences together cover the depth; with `key=None` the offset is 0 and moves are
    taken in listed order (deterministic).
    """
    if order not in NEIGHBOURHOOD_ORDERS:
        raise ValueError(f"arch.neighbourhood_order must be one of {NEIGHBOURHOOD_ORDERS}, got {order!r}")
    M = len(moves.kind)
    if order == "by_kind" or M == 0:
        return np.arange(M)
    rng = (
        None if key is None else np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    )
    T = moves.num_steps
    queues = []
    for k in np.unique(moves.kind):  # ascending = `kinds` order
        offset = 0 if rng is None else int(rng.integers(T))
        by_step = []
        for v in spread_order(T):
            idx = np.nonzero((moves.kind == k) & (moves.step == (v + offset) % T))[0]
            by_step.append(idx if rng is None else rng.permutation(idx))
        # pass p takes the p-th move of every step, in the steps' spread order
        queues.append([int(g[p]) for p in range(max(len(g) for g in by_step)) for g in by_step if p < len(g)])
    out = [q[i] for i in range(max(len(q) for q in queues)) for q in queues if i < len(q)]
    return np.asarray(out, np.int64)


def neighbours(
    path,
    num_sources: int,
    num_layers: int,
    t_min: int,
    t_max: int,
    *,
    kinds=MOVE_KINDS,
    order: str = "round_robin",
    key=None,
) -> np.ndarray:
    """[M, T_max] every path one edit away from `path` (`neighbour_moves`: int32 pool indices m * L + l, -1
    padded, no repeats, not `path` itself) in the order a budgeted search scores them (`order_moves`).

    `kinds=KINDS_WITHOUT_INSERTION, order="by_kind"` is the neighbourhood before issue 20, in its order.
    """
    moves = neighbour_moves(path, num_sources, num_layers, t_min, t_max, kinds)
    return moves.paths[order_moves(moves, order, key)]


def neighbourhood_search(
    score_fn,
    path,
    preference,
    *,
    num_sources: int,
    num_layers: int,
    t_min: int,
    t_max: int,
    beta1: float,
    budget: int,
    known: dict | None = None,
    kinds=MOVE_KINDS,
    order: str = "round_robin",
    key=None,
) -> dict:
    """Best-improvement hill climbing over `neighbours` under the RL reward, at most `budget` new evaluations.

    Args:
      score_fn: `paths [M, T_max] -> normalised search scores [M, K]` (e.g. a PathScorer for one preference).
      path: the start [T_max]; preference [K]; known: {path bytes: normalised scores} already scored (free).
      kinds, order: the moves and the order they are scored in (`neighbour_moves`, `order_moves`); key: None or
        a PRNG key; round r orders its moves with `fold_in(key, r)`.
    Returns: {"path", "scores", "reward", "evaluations" (new ones), "steps" (accepted moves), "moves" (the kind
    of each accepted move), "evaluated" ({kind: new evaluations}), "scored" ([(path, scores)] of the new ones, in
    the order scored)}.
    Each round scores the unscored neighbours of the current path in `order` (truncated to the remaining budget,
    so the order decides which moves a small budget sees) and moves to the best scored neighbour if it raises
    the reward; it stops at a local optimum or when the budget is spent.
    """
    check_neighbourhood(kinds, order)
    kinds = tuple(kinds)
    known = dict(known or {})
    cur = np.asarray(path, np.int32)
    lengths = lambda ps: (np.asarray(ps) >= 0).sum(-1)
    evaluations, accepted, evaluated, new = 0, [], dict.fromkeys(kinds, 0), []
    if cur.tobytes() not in known:
        known[cur.tobytes()] = np.asarray(score_fn(cur[None]))[0]
        new.append((cur, known[cur.tobytes()]))
        evaluations += 1
    cur_r = float(host_reward(known[cur.tobytes()], preference, lengths(cur), beta1, t_max))
    while evaluations < budget:
        moves = neighbour_moves(cur, num_sources, num_layers, t_min, t_max, kinds)
        round_key = None if key is None else jax.random.fold_in(key, len(accepted))
        ordered = order_moves(moves, order, round_key)
        nb, nb_kind = moves.paths[ordered], moves.kind[ordered]
        fresh = np.asarray([p.tobytes() not in known for p in nb], bool)
        take = np.nonzero(fresh)[0][: budget - evaluations]
        if len(take):
            for p, sc in zip(nb[take], np.asarray(score_fn(nb[take])), strict=True):
                known[p.tobytes()] = sc
                new.append((p, sc))
            evaluations += len(take)
            for k in nb_kind[take]:
                evaluated[kinds[k]] += 1
        scored = np.asarray([p.tobytes() in known for p in nb], bool)
        nb, nb_kind = nb[scored], nb_kind[scored]
        if not len(nb):
            break
        r = host_reward(np.stack([known[p.tobytes()] for p in nb]), preference, lengths(nb), beta1, t_max)
        j = int(np.argmax(r))
        if r[j] <= cur_r + 1e-9:
            break
        cur, cur_r = nb[j], float(r[j])
        accepted.append(kinds[nb_kind[j]])
    return {
        "path": cur,
        "scores": known[cur.tobytes()],
        "reward": cur_r,
        "evaluations": evaluations,
        "steps": len(accepted),
        "moves": accepted,
        "evaluated": evaluated,
        "scored": new,
    }


def neighbourhood_budget(cfg, num_layers: int) -> int:
    """New path evaluations per preference for the refinement after PPO (0 = off): `cfg.neighbourhood_evaluations`,
    or `cfg.neighbourhood_evaluations_per_layer * L` when that is > 0 (issue 20: at L = 16 a fixed 16 reaches
    10% of the ~158 one-edit moves; 5 x L gives each of the five move kinds about L evaluations, so every
    deletion and repeat is scored). The path baselines get HM3's total, so it costs every path method alike."""
    per_layer = int(cfg.get("neighbourhood_evaluations_per_layer", 0))
    return per_layer * int(num_layers) if per_layer > 0 else int(cfg.get("neighbourhood_evaluations", 0))


NEIGHBOURHOOD_STARTS = ("best", "theta")  # `arch.neighbourhood_start`


def neighbourhood_start(cfg, best_path, identity, num_sources: int, num_tasks: int) -> np.ndarray:
    """Where the refinement after PPO climbs from (`arch.neighbourhood_start`): "best" (the default), the best
    path the search scored on the capped search split; "theta", Theta(lambda)'s identity path (the upper
    level's answer, source K = `num_sources - 1`), as HM3's hierarchy starts the lower level from it. On the
    deep tiny3 the search's best (on 100 examples per task) was many edits from Theta and the depth edits that
    beat Theta on the whole search split were one edit from Theta (docs/headroom.md). Without a Theta in the
    pool (the no-parameter-level ablation) "theta" climbs from the best path too."""
    start = cfg.get("neighbourhood_start", "best")
    if start not in NEIGHBOURHOOD_STARTS:
        raise ValueError(f"arch.neighbourhood_start must be one of {NEIGHBOURHOOD_STARTS}, got {start!r}")
    return identity[num_sources - 1] if start == "theta" and num_sources > num_tasks else best_path


def best_scored(scored, pref, acfg, top: int, first) -> np.ndarray:
    """[1 + <= top, T_max]: `first` (the refinement's answer), then the `top` best other paths of `scored`
    ([(path, normalised capped-split scores)]: what the refinement scored) by the RL reward on the capped split.
    With `arch.confirm_neighbours = top > 0` they all join the confirmation's shortlist: on the deep tiny3 the
    refinement's one answer was the noisiest of ~80 capped-split scores, while a quarter of the one-edit
    neighbours of Theta beat it on the whole search split (docs/headroom.md), so more of them are re-scored
    there (each charged like every confirmation)."""
    others = [(p, s) for p, s in scored if not np.array_equal(p, first)]
    if top <= 0 or not others:
        return np.asarray(first, np.int32)[None]
    paths = np.stack([p for p, _ in others])
    r = host_reward(np.stack([s for _, s in others]), pref, (paths >= 0).sum(-1), acfg.beta1, acfg.t_max)
    return np.concatenate([np.asarray(first, np.int32)[None], paths[np.argsort(-r, kind="stable")[:top]]])
