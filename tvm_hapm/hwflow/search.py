"""HW-Flow's search methods over an :class:`~tvm_hapm.hwflow.env.HWFlowEnv`, each with the same
number of evaluations: the AMC-style RL agent, greedy, evolution, and the uniform and per_mac
bisections (see :mod:`tvm_hapm.hwflow`)."""

from __future__ import annotations

import numpy as np

from .env import ALLOCATIONS, HWFlowEnv

__all__ = [
    "SEARCHES",
    "allocation_bisection",
    "search_evolution",
    "search_greedy",
    "search_per_mac",
    "search_rl",
    "search_start",
    "search_uniform",
]


# ------------------------------------------------------------------------------ search methods
def allocation_bisection(
    env: HWFlowEnv, method: str, budget: int, progress=None, allocation: str = "uniform"
):
    """The largest network-wide grid ratio whose ``allocation`` (:meth:`HWFlowEnv.allocation`)
    keeps the validation drop within the budget: a bisection over the grid (the drop grows about
    monotonically with the ratio), ``ceil(log2(len(grid)))`` evaluations at most, and at most
    ``budget``.  A ratio the allocation cannot reach counts as infeasible without an evaluation.

    Returns ``(grid index, best feasible candidate or None, evaluations used)``."""
    lo, hi = 0, len(env.grid) - 1
    used, best = 0, None
    while lo < hi and used < budget:
        mid = (lo + hi + 1) // 2
        idx = env.allocation(allocation, mid)
        if idx is None:
            hi = mid - 1
            continue
        c = env.evaluate(idx, method)
        used += 1
        if progress:
            progress({"method": method, "episode": used - 1, **c.to_dict()})
        if c.feasible:
            lo, best = mid, c
        else:
            hi = mid - 1
    return lo, best, used


def search_start(env: HWFlowEnv, method: str, budget: int, progress=None, start="best"):
    """Where a search starts: the best feasible candidate (by reward) of the allocation
    bisections ``start`` names (an allocation, ``"best"`` for all of :data:`ALLOCATIONS`, or
    None for none), each with up to ``budget`` evaluations.

    Returns ``(best candidate or None, evaluations used)``."""
    names = ALLOCATIONS if start == "best" else () if start is None else (start,)
    best, used = None, 0
    for name in names:
        _, cand, n = allocation_bisection(env, method, budget, progress, name)
        used += n
        if cand is not None and (best is None or cand.reward > best.reward):
            best = cand
    return best, used


def search_uniform(env: HWFlowEnv, episodes: int, seed: int, progress=None):
    """The no-search baseline: one ratio for every layer, the largest feasible one."""
    _, best, _ = allocation_bisection(env, "uniform", episodes, progress)
    return best


def search_per_mac(env: HWFlowEnv, episodes: int, seed: int, progress=None):
    """The hardware-aware no-search baseline: HAPM's per-MAC allocation of the largest feasible
    network-wide sparsity."""
    _, best, _ = allocation_bisection(env, "per_mac", episodes, progress, "per_mac")
    return best


def search_rl(env: HWFlowEnv, episodes: int, seed: int, progress=None, lr: float = 0.05,
              sigma0: float = 0.25, sigma_min: float = 0.05, warmup: int = 0,
              start: str | None = "best"):  # fmt: skip
    """AMC-style agent: one layer at a time, Gaussian policy
    ``a = clip(sigmoid(w.s + b[layer]) + sigma*e)`` over the ratio (snapped to the grid),
    REINFORCE with a moving-average baseline; ``b`` is a learned per-layer offset.

    With ``start`` the first evaluations are :func:`search_start`'s, and the policy starts at
    the best start candidate (each layer's offset set so that ``sigmoid`` gives its ratio) with
    that candidate's reward as the baseline, instead of a random warm-up: the agent refines the
    start per layer rather than rediscovering it."""
    rng = np.random.default_rng([seed, 1])
    dim = env.static_features.shape[1] + 4
    w = np.zeros(dim)
    w[-1] = -1.0  # start around sigmoid(-1) ~ 0.27 of the largest ratio
    bias = np.zeros(env.n)
    top = env.grid[-1]
    baseline, beta = None, 0.8
    used = 0
    if start is not None:
        best, used = search_start(env, "rl", max(1, episodes // 3), progress, start)
        if best is not None:
            p = np.clip(np.asarray(best.ratios) / top, 0.05, 0.95)
            w[-1] = 0.0
            bias = np.log(p / (1 - p))
            baseline = best.reward
        warmup = 0
    else:
        warmup = warmup or max(2, episodes // 10)
    for ep in range(used, episodes):
        sigma = max(sigma_min, sigma0 * (1 - ep / max(episodes, 1)))
        idx = [0] * env.n
        grads, bgrads, prev = [], np.zeros(env.n), 0.0
        for li in range(env.n):
            s = env.state(li, idx, prev)
            mu = 1.0 / (1.0 + np.exp(-(w @ s + bias[li])))
            if ep < warmup:
                a = float(rng.uniform(0, 1))
            else:
                a = float(np.clip(mu + sigma * rng.standard_normal(), 0.0, 1.0))
            # grad of log N(a; mu, sigma) w.r.t. w and b (through the sigmoid)
            dz = (a - mu) / sigma**2 * mu * (1 - mu)
            grads.append(dz * s)
            bgrads[li] = dz
            gi = int(np.argmin(np.abs(env.grid - a * top)))
            idx[li] = min(gi, env.max_index[li])
            prev = a
        cand = env.evaluate(idx, "rl")
        r = cand.reward
        baseline = r if baseline is None else beta * baseline + (1 - beta) * r
        if ep >= warmup:
            g = np.concatenate([np.sum(grads, axis=0), bgrads])
            step = lr * (r - baseline) * g / (np.linalg.norm(g) + 1e-8) * 10
            w += step[:dim]
            bias += step[dim:]
        if progress:
            progress({"method": "rl", "episode": ep, **cand.to_dict()})
    return env.best("rl") if any(c.method == "rl" and c.feasible for c in env.history) else None


def search_greedy(env: HWFlowEnv, episodes: int, seed: int, progress=None, step: int = 1,
                  accept_frac: float = 0.25, start: str | None = "best"):  # fmt: skip
    """Greedy by latency (objective) saliency: each round evaluates one grid step more on every
    open layer, ranks the moves by objective saved per accuracy point lost and takes the best
    ``accept_frac`` of them together (falling back to the single best) while feasible.  With
    ``start`` it starts from :func:`search_start`'s candidate instead of dense."""
    idx = [0] * env.n
    frozen = {li for li in range(env.n) if env.max_index[li] == 0}
    used = 0
    lc = env.layer_costs()
    if start is not None:
        best, used = search_start(env, "greedy", max(1, episodes // 3), progress, start)
        if best is not None:
            idx = list(best.idx)

    def ev(cand_idx):
        nonlocal used
        used += 1
        c = env.evaluate(cand_idx, "greedy")
        if progress:
            progress({"method": "greedy", "episode": used - 1, **c.to_dict()})
        return c

    cur_acc = env.dense_accuracy if not any(idx) else env.accuracy(idx)
    while used < episodes:
        moves = []
        for li in range(env.n):
            if li in frozen or used >= episodes:
                continue
            nxt = min(idx[li] + step, env.max_index[li])
            if nxt == idx[li]:
                frozen.add(li)
                continue
            trial = list(idx)
            trial[li] = nxt
            c = ev(trial)
            if not c.feasible:
                frozen.add(li)
                continue
            saved = lc[li, idx[li]] - lc[li, nxt]
            lost = max(cur_acc - c.accuracy, 0.0) * 100
            moves.append((saved / (lost + 0.05), li, nxt, c))
        if not moves:
            break
        moves.sort(key=lambda m: (-m[0], m[1]))
        k = max(1, int(round(accept_frac * len(moves))))
        accepted = False
        while k > 1 and used < episodes:
            trial = list(idx)
            for _, li, nxt, _ in moves[:k]:
                trial[li] = nxt
            c = ev(trial)
            if c.feasible:
                idx, cur_acc, accepted = trial, c.accuracy, True
                break
            k //= 2
        if not accepted:
            _, li, nxt, c = moves[0]
            idx[li] = nxt
            cur_acc = c.accuracy
    return (
        env.best("greedy")
        if any(c.method == "greedy" and c.feasible for c in env.history)
        else None
    )


def search_evolution(env: HWFlowEnv, episodes: int, seed: int, progress=None, pop: int = 8,
                     mutate: float = 0.3, start: str | None = "best"):  # fmt: skip
    """(mu + lambda) evolution on the ratio indices; fitness = the environment's reward.  With
    ``start`` the first population is :func:`search_start`'s candidates and mutations of the
    best of them, else it goes from mild to strong random ratios."""
    rng = np.random.default_rng([seed, 2])
    hi = env.max_index
    popl = []
    used = 0
    center = None
    if start is not None:
        best, used = search_start(env, "evolution", max(1, episodes // 3), progress, start)
        popl = [c for c in env.history if c.method == "evolution"][-used:] if used else []
        center = best.idx if best is not None else None
    while used < min(pop, episodes):
        if center is not None:
            idx = [int(np.clip(c + rng.choice([-1, 0, 1]), 0, m)) for c, m in zip(center, hi)]
        else:
            top = max(1, int(round((used + 1) / pop * len(env.grid) / 2)))  # mild to strong
            idx = [int(rng.integers(0, min(m, top) + 1)) if m else 0 for m in hi]
        popl.append(env.evaluate(idx, "evolution"))
        used += 1
        if progress:
            progress({"method": "evolution", "episode": used - 1, **popl[-1].to_dict()})
    while used < episodes:
        popl.sort(key=lambda c: (-c.reward, c.index))
        parents = popl[: max(2, pop // 2)]
        a, b = (parents[i] for i in rng.choice(len(parents), 2, replace=False))
        child = [int(x if rng.random() < 0.5 else y) for x, y in zip(a.idx, b.idx)]
        for li in range(env.n):
            if hi[li] and rng.random() < mutate:
                child[li] = int(np.clip(child[li] + rng.choice([-2, -1, 1, 2]), 0, hi[li]))
        c = env.evaluate(child, "evolution")
        used += 1
        popl.append(c)
        popl = sorted(popl, key=lambda c: (-c.reward, c.index))[:pop]
        if progress:
            progress({"method": "evolution", "episode": used - 1, **c.to_dict()})
    return (
        env.best("evolution")
        if any(c.method == "evolution" and c.feasible for c in env.history)
        else None
    )


SEARCHES = {
    "rl": search_rl,
    "greedy": search_greedy,
    "evolution": search_evolution,
    "uniform": search_uniform,
    "per_mac": search_per_mac,
}
