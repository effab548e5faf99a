"""The methods' random plans, over many draws, against the paper's released trainers.

Each expected distribution is derived here independently of flowbp's samplers: analytically (P(j) ∝ j, the
DRTune stride formula) or by re-running the trainers' own sampling loop, written out below with torch's
``randperm`` / ``multinomial`` as in ``trainers/*/flowbp_bridge.py``, ``flowbp_sparse.py`` and
``drtune.py``, and comparing frequencies.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import shifted

import flowbp
from flowbp.methods._common import index_window, train_window
from flowbp.trajectory import training_sigmas

DRAWS = 2000


def plans(method: str, sigmas: torch.Tensor, draws: int = DRAWS, **overrides: object) -> list[flowbp.Plan]:
    gen = torch.Generator().manual_seed(7)
    return [flowbp.make_plan(method, sigmas, gen, **overrides) for _ in range(draws)]


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


# ---------------------------------------------------------------------------- the trainers' loops, written out
def trainer_late_biased(start: int, end: int, count: int, bias: float, gen: torch.Generator) -> list[int]:
    """``_sample_late_biased_indices``: (i + 1)^bias over [start, end), multinomial without replacement."""
    count = max(1, min(count, end - start))
    if count >= end - start:
        return list(range(start, end))
    w = (torch.arange(start, end, dtype=torch.float32) + 1.0).pow(bias)
    return sorted(start + int(k) for k in torch.multinomial(w / w.sum(), count, replacement=False, generator=gen))


def trainer_bridge(n: int, k_total: int, bias: float, gen: torch.Generator) -> tuple[int, list[int]]:
    """FlowBP-Bridge's sampling loop (tail ratio 1): j, then the active nodes."""
    pair = torch.randperm(n, generator=gen)[:2] + 1  # reverse indices in [1, N + 1)
    j = n - int(pair.min())  # the later node in forward time
    pre_len, post_len = j, n - j
    total = min(k_total, pre_len + post_len)
    pre = min(max(round(total * pre_len / float(pre_len + post_len)), 1), pre_len)
    post = total - pre
    if post < 1:
        post, pre = 1, total - 1
    if post > post_len:
        post, pre = post_len, total - post_len
    pre, post = min(max(pre, 1), pre_len), min(max(post, 1), post_len)
    pre_nodes = trainer_late_biased(0, pre_len, pre, bias, gen)  # offsets of [0, j)
    post_nodes = [j]
    if post - 1 > 0:
        post_nodes += [j + 1 + o for o in trainer_late_biased(0, post_len - 1, post - 1, bias, gen)]
    return j, sorted(pre_nodes + post_nodes)


def trainer_drtune(n: int, k: int, ratio: float, gen: torch.Generator) -> tuple[int, list[int]]:
    """DRTune's ``_sample_drtune_early_stop_idx`` + ``_sample_equally_spaced_train_indices``."""
    m = n - int(torch.randint(1, round(n * ratio) + 1, (1,), generator=gen))
    total = m + 1
    stride = max(1, total // k)
    max_start = total - 1 - (k - 1) * stride
    start = int(torch.randint(0, max_start + 1, (1,), generator=gen))
    return m, [start + i * stride for i in range(k)]


# ---------------------------------------------------------------------------- FlowBP-Bridge
@pytest.mark.parametrize("n", [10, 25])
def test_bridge_j_is_the_later_of_two_uniform_draws(n: int) -> None:
    drawn = plans("flowbp-bridge", training_sigmas(n, 1.0))
    js = np.array([p.anchors[1] for p in drawn])
    # P(j = i) = i / C(N, 2) for i = 1..N−1 (i pairs have i as their larger element), so
    # E[j/N] = Σ i² / (C(N, 2)·N) = (2N − 1) / (3N).
    expected = (2 * n - 1) / (3 * n)
    se = js.std() / n / math.sqrt(len(js))
    assert abs(js.mean() / n - expected) < 4 * se
    pmf = Counter({i: i / math.comb(n, 2) * len(js) for i in range(1, n)})
    assert total_variation(Counter(js.tolist()), pmf) < 0.05
    assert js.min() >= 1 and js.max() <= n - 1


def test_bridge_always_has_active_nodes_on_both_sides_of_an_active_j() -> None:
    for n, k in ((25, 5), (25, 3), (25, 2), (10, 5)):
        for p in plans("flowbp-bridge", training_sigmas(n, 1.0), 500, num_active=k):
            j = p.anchors[1]
            assert j in p.active and len(p.active) == k
            assert min(p.active) < j  # the nested term has something to carry
            assert p.coupling == {j: pytest.approx(0.1)}
    with pytest.raises(ValueError, match=r"num_active: must be >= 2"):
        flowbp.make_plan("flowbp-bridge", shifted(25), 0, num_active=1)


def test_bridge_active_sets_match_the_trainers_sampling_loop() -> None:
    n, k, bias = 25, 5, 2.0
    ours = plans("flowbp-bridge", training_sigmas(n, 1.0), 3000)
    gen = torch.Generator().manual_seed(3)
    theirs = [trainer_bridge(n, k, bias, gen) for _ in range(3000)]
    # How often each node is active, and how many active nodes sit before j.
    ours_nodes = Counter(i for p in ours for i in p.active)
    their_nodes = Counter(i for _, a in theirs for i in a)
    assert total_variation(ours_nodes, their_nodes) < 0.04
    ours_pre = Counter(sum(i < p.anchors[1] for i in p.active) for p in ours)
    their_pre = Counter(sum(i < j for i in a) for j, a in theirs)
    assert total_variation(ours_pre, their_pre) < 0.04
    # Late bias within the segment: the position of the pre-j nodes relative to j.
    ours_rel = Counter(round(10 * i / p.anchors[1]) for p in ours for i in p.active if i < p.anchors[1])
    their_rel = Counter(round(10 * i / j) for j, a in theirs for i in a if i < j)
    assert total_variation(ours_rel, their_rel) < 0.04


def test_bridge_grad_rescale_is_one_factor_over_the_window() -> None:
    sigmas = training_sigmas(25, 3.0)
    s = sigmas.tolist()
    for p in plans("flowbp-bridge", sigmas, 200, grad_rescale=0.5):
        steps = [abs(s[i + 1] - s[i]) for i in range(25)]
        expected = 1 + 0.5 * (sum(steps) / sum(steps[i] for i in p.active) - 1)
        assert set(p.grad_scale) == set(p.active)
        assert all(g == pytest.approx(expected, rel=1e-12) for g in p.grad_scale.values())


def test_bridge_tail_ratio_keeps_every_active_node_in_the_window() -> None:
    # FLUX.2-Klein's 0.7 at N = 25: the last ⌈17.5⌉ = 18 steps, forward 7..24.
    assert (train_window(25, 0.7).lo, train_window(25, 0.7).hi) == (7, 24)
    sigmas = training_sigmas(25, 3.0)
    s = sigmas.tolist()
    window = range(7, 25)
    for p in plans("flowbp-bridge", sigmas, 300, tail_ratio=0.7, grad_rescale=1.0):
        assert min(p.active) >= 7 and p.anchors[1] > 7 and min(p.active) < p.anchors[1]
        total = sum(abs(s[i + 1] - s[i]) for i in window)
        act = sum(abs(s[i + 1] - s[i]) for i in p.active)
        assert all(g == pytest.approx(total / act, rel=1e-12) for g in p.grad_scale.values())


# ---------------------------------------------------------------------------- DRTune
def test_drtune_stride_and_how_often_m_is_active() -> None:
    n, k = 25, 3
    drawn = plans("drtune", training_sigmas(n, 1.0), 3000)
    # Analytically: m = N − r, r ~ U{1..10}; with T = m + 1 nodes the stride is ⌊T/3⌋ and the start is uniform
    # over 0..T−1−2·stride, so m is active only for the last start: P = 1 / (T − 2·⌊T/3⌋).
    p_m = sum(1 / (m + 1 - 2 * ((m + 1) // k)) for m in range(n - 10, n)) / 10
    assert p_m == pytest.approx(0.1359, abs=1e-4)
    stops = [p.anchors[1] for p in drawn]
    m_active = np.array([p.anchors[1] in p.active for p in drawn], dtype=float)
    assert abs(m_active.mean() - p_m) < 4 * math.sqrt(p_m * (1 - p_m) / len(drawn))
    assert Counter(stops).keys() == set(range(n - 10, n))
    for p in drawn:
        m, a = p.anchors[1], p.active
        stride = (m + 1) // k
        assert len(a) == k and max(a) <= m and all(b - c == stride for b, c in zip(a[1:], a[:-1], strict=False))
        assert p.reward_input == "posterior_mean" and p.segments[-1].support == (m,)
    gen = torch.Generator().manual_seed(5)
    theirs = Counter(i for _ in range(3000) for i in trainer_drtune(n, k, 0.4, gen)[1])
    assert total_variation(Counter(i for p in drawn for i in p.active), theirs) < 0.04


def test_drtune_clamps_k_to_the_nodes_before_m_like_the_trainer() -> None:
    p = flowbp.make_plan("drtune", shifted(5), 0, num_train_steps=9)
    assert p.active == tuple(range(p.anchors[1] + 1))


# ---------------------------------------------------------------------------- FlowBP-Sparse
def test_sparse_tail_ratio_rescales_over_the_window_only() -> None:
    sigmas = training_sigmas(25, 3.0)
    s = sigmas.tolist()
    drawn = plans("flowbp-sparse", sigmas, 300, tail_ratio=0.6)  # last ⌈15⌉ steps: 10..24
    for p in drawn:
        assert min(p.active) >= 10
        total = sum(abs(s[i + 1] - s[i]) for i in range(10, 25))
        act = sum(abs(s[i + 1] - s[i]) for i in p.active)
        assert all(g == pytest.approx(total / act, rel=1e-12) for g in p.grad_scale.values())


def test_sparse_node_frequencies_match_the_trainer() -> None:
    drawn = plans("flowbp-sparse", training_sigmas(25, 1.0), 3000)
    gen = torch.Generator().manual_seed(11)
    theirs = Counter(i for _ in range(3000) for i in trainer_late_biased(0, 25, 3, 2.0, gen))
    assert total_variation(Counter(i for p in drawn for i in p.active), theirs) < 0.04


def test_jk_window_clips_to_the_tail_like_the_trainers() -> None:
    # make_jk_window_args: window ⌈ratio·N⌉ (>= 3) -> reverse [1, N − start + 1).
    for n, ratio in ((25, 0.7), (25, 0.61), (10, 0.2), (50, 0.33)):
        length = min(max(3, math.ceil(n * ratio)), n)
        w = index_window(n, 1, None, ratio)
        assert (w.lo, w.hi) == (n - length, n - 1)


# ---------------------------------------------------------------------------- FlowBP-Lagrange anchor_lambda
def lagrange_weights_by_polyfit(s: list[float], nodes: list[int], start: int, end: int) -> list[float]:
    """∫ of each Lagrange basis polynomial over [σ_start, σ_end], via numpy's polynomial fit (independent)."""
    out = []
    for i in range(len(nodes)):
        basis = np.polynomial.Polynomial.fit([s[k] for k in nodes], np.eye(len(nodes))[i], len(nodes) - 1)
        integral = basis.integ()
        out.append(float(integral(s[end]) - integral(s[start])))
    return out


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_anchor_lambda_blends_only_k_to_j(lam: float) -> None:
    sigmas = training_sigmas(25, 3.0)
    s = sigmas.tolist()
    for seed in range(20):
        p = flowbp.make_plan("flowbp-lagrange", sigmas, seed, anchor_lambda=lam, grad_rescale=0.5)
        k, j, n = p.anchors
        first, second = p.segments
        lag_kj = lagrange_weights_by_polyfit(s, list(first.support), k, j)
        lag_jn = lagrange_weights_by_polyfit(s, list(second.support), j, n)
        blended = [lam * w for w in lag_kj]
        blended[0] += (1 - lam) * (s[j] - s[k])
        assert list(first.weights) == pytest.approx(blended, rel=1e-7, abs=1e-10)
        assert list(second.weights) == pytest.approx(lag_jn, rel=1e-7, abs=1e-10)  # never blended
        # Backward coefficient of v_k: (1 − λ)·(σ_j − σ_k) from the leap (unscaled) + λ·f·w_k from the
        # Lagrange part, f = 1 + 0.5·(Σ|w| / Σ|w| over the active supports − 1) of the *unblended* weights.
        act = [0, 1][: len(first.support)]
        f = 1 + 0.5 * (sum(map(abs, lag_kj)) / sum(abs(lag_kj[a]) for a in act) - 1)
        coeff_k = p.grad_scale[k] * first.weights[0]
        assert coeff_k == pytest.approx((1 - lam) * (s[j] - s[k]) + lam * f * lag_kj[0], rel=1e-7, abs=1e-12)
        if len(first.support) > 1 and lam > 0:
            i1 = first.support[1]
            assert p.grad_scale[i1] * first.weights[1] == pytest.approx(lam * f * 0.25 * lag_kj[1], rel=1e-7)
