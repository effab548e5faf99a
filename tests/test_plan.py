"""Quadrature rules, plan validation, bad-input errors, losses and the plan CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MLPField, shifted

import flowbp
from flowbp import quadrature
from flowbp.cli import main
from flowbp.losses import reward_loss, reward_transform
from flowbp.methods._common import index_window, late_biased_choice, sample_jk
from flowbp.plan import Plan, Segment


# ---------------------------------------------------------------------------- 6. quadrature
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("segment", [(0, 25), (3, 21), (21, 25), (10, 16)])
def test_lagrange_exact_on_polynomials_below_degree_p(order: int, segment: tuple[int, int]) -> None:
    sigmas = shifted(25).numpy()
    start, end = segment
    nodes, w = quadrature.lagrange(sigmas, start, end, order)
    assert nodes[0] == start and end not in nodes and len(nodes) == min(order, end - start)
    for degree in range(len(nodes)):
        exact = (sigmas[end] ** (degree + 1) - sigmas[start] ** (degree + 1)) / (degree + 1)
        approx = sum(wi * sigmas[i] ** degree for wi, i in zip(w, nodes, strict=True))
        assert approx == pytest.approx(exact, rel=1e-10, abs=1e-13)
    assert sum(w) == pytest.approx(sigmas[end] - sigmas[start], rel=1e-12)
    if len(nodes) == order:  # degree P is not integrated exactly (the test above could fail)
        exact = (sigmas[end] ** (order + 1) - sigmas[start] ** (order + 1)) / (order + 1)
        approx = sum(wi * sigmas[i] ** order for wi, i in zip(w, nodes, strict=True))
        assert abs(approx - exact) > 1e-9


def test_lagrange_order_one_is_the_leap_and_weights_sum() -> None:
    sigmas = shifted(25)
    assert quadrature.lagrange(sigmas, 4, 17, 1) == quadrature.leap(sigmas, 4, 17)
    nodes, w = quadrature.euler(sigmas, 4, 17)
    assert nodes == list(range(4, 17)) and sum(w) == pytest.approx(float(sigmas[17] - sigmas[4]))
    nodes, w = quadrature.uniform(sigmas, 4, 17, 3)
    assert nodes == [4, 10, 16] and w == pytest.approx([float(sigmas[17] - sigmas[4]) / 3] * 3)


def test_bad_quadrature_inputs() -> None:
    with pytest.raises(ValueError, match=r"order: must be >= 1"):
        quadrature.lagrange(shifted(10), 0, 10, 0)
    with pytest.raises(ValueError, match=r"unknown rule 'simpson'.*euler, leap, lagrange, uniform"):
        quadrature.weights("simpson", shifted(10), 0, 10)
    with pytest.raises(ValueError, match=r"order"):
        flowbp.make_plan("flowbp-lagrange", shifted(25), 0, order=0)


# ---------------------------------------------------------------------------- samplers
def test_index_window_tail_ratio_matches_paper() -> None:
    w = index_window(25, 1, None, 0.7)  # reverse [1, 19) -> forward nodes 7..24
    assert (w.lo, w.hi) == (7, 24)
    assert index_window(25).nodes() == list(range(25))


@pytest.mark.parametrize("mode", ["uniform", "dirichlet", "midpoint", "midpoint_j"])
def test_jk_samples_stay_in_window(mode: str) -> None:
    rng = np.random.default_rng(0)
    w = index_window(25, 1, None, 0.7)
    for _ in range(300):
        k, j = sample_jk(rng, 25, w, mode)
        assert w.lo <= k < j <= w.hi


def test_dirichlet_concentrations_shape_the_draw() -> None:
    rng = np.random.default_rng(0)
    w = index_window(25)
    pairs = np.array([sample_jk(rng, 25, w, "dirichlet", (2.5, 6.0, 2.0)) for _ in range(2000)])
    gap = pairs[:, 1] - pairs[:, 0]
    assert abs(gap.mean() - 25 * 6.0 / 10.5) < 1.0  # E[gap] = span · α_b / Σα
    capped = np.array([sample_jk(rng, 25, w, "dirichlet", (2.5, 6.0, 2.0), max_j_rev=3) for _ in range(500)])
    assert (25 - capped[:, 1] <= 3).all()


def test_late_bias_prefers_late_nodes() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([late_biased_choice(rng, list(range(25)), 1, 2.0)[0] for _ in range(3000)])
    p = (np.arange(25) + 1.0) ** 2
    assert abs(draws.mean() - (np.arange(25) * p).sum() / p.sum()) < 0.5
    assert sorted(late_biased_choice(rng, list(range(5)), 5, 2.0)) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- bad input
def test_unknown_method_lists_known_ones() -> None:
    known = r"known methods: alignprop, coarse-leap, custom, draft-k"
    with pytest.raises(ValueError, match=r"unknown method 'nope'; " + known):
        flowbp.make_plan("nope", shifted(25))


def test_k_larger_than_window() -> None:
    with pytest.raises(ValueError, match=r"num_active: K=30 is larger than the 25 nodes"):
        flowbp.make_plan("flowbp-sparse", shifted(25), 0, num_active=30)
    with pytest.raises(ValueError, match=r"num_active: K=9 is larger than the 8 nodes"):
        flowbp.make_plan("flowbp-sparse", shifted(25), 0, num_active=9, tail_ratio=0.3)
    with pytest.raises(ValueError, match=r"k: K=26 is larger than the number of steps N=25"):
        flowbp.make_plan("draft-k", shifted(25), 0, k=26)


@pytest.mark.parametrize("method", ["leapalign", "flowbp-bridge", "flowbp-lagrange"])
@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval(method: str, alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha: must be in \[0, 1\], got {alpha}"):
        flowbp.make_plan(method, shifted(25), 0, alpha=alpha)


def test_plan_coupling_outside_unit_interval() -> None:
    sig = tuple(shifted(4).tolist())
    with pytest.raises(ValueError, match=r"coupling\[2\]: α must be in \[0, 1\], got 2.0"):
        Plan(sig, (0, 2, 4), (Segment(0, 2, (0,), (-0.1,)), Segment(2, 4, (2,), (-0.1,))), (0, 2), {2: 2.0})


@pytest.mark.parametrize(
    "sigmas,match",
    [
        ([1.0, 0.5, 0.6, 0.0], "strictly decreasing"),
        ([1.0, 0.5, 0.1], "must end at 0"),
        ([1.0], "at least 2"),
        ([1.0, float("nan"), 0.0], "finite"),
    ],
)
def test_bad_sigmas(sigmas, match: str) -> None:
    with pytest.raises(ValueError, match=rf"sigmas: .*{match}"):
        flowbp.make_plan("flowbp-sparse", sigmas, 0, num_active=1)
    with pytest.raises(ValueError, match=rf"sigmas: .*{match}"):
        flowbp.rollout(lambda x, s: x, torch.zeros(1, 2), sigmas)


def test_trajectory_and_plan_lengths_must_match() -> None:
    field = MLPField(2)
    traj = flowbp.rollout(field, torch.zeros(1, 2, dtype=torch.float64), shifted(10))
    with pytest.raises(ValueError, match=r"trajectory: has N=10 steps but the plan was built for N=25"):
        flowbp.surrogate(flowbp.make_plan("refl", shifted(25), 0), traj, field)
    with pytest.raises(ValueError, match=r"sigma grid differs"):
        flowbp.surrogate(flowbp.make_plan("refl", shifted(10, 1.0), 0), traj, field)


def test_unknown_and_mistyped_overrides() -> None:
    with pytest.raises(
        ValueError, match=r"flowbp-sparse: unknown parameter 'k'; allowed: grad_rescale, late_bias"
    ):
        flowbp.make_plan("flowbp-sparse", shifted(25), 0, k=3)
    with pytest.raises(ValueError, match=r"flowbp-sparse.num_active: expected an integer, got 'three'"):
        flowbp.make_plan("flowbp-sparse", shifted(25), 0, num_active="three")
    with pytest.raises(ValueError, match=r"support_mode: got 'some'; allowed: none, start, midpoint, all"):
        flowbp.make_plan("flowbp-lagrange", shifted(25), 0, support_mode="some")


def test_plan_validation_messages() -> None:
    sig = tuple(shifted(4).tolist())
    seg = (Segment(0, 4, (0, 5), (-0.5, -0.5)),)
    with pytest.raises(ValueError, match=r"segments\[0\].support: nodes must be distinct and in \[0, 4\)"):
        Plan(sig, (0, 4), seg, (0,))
    with pytest.raises(ValueError, match=r"active: nodes \[3\] are in no segment's support"):
        Plan(sig, (0, 4), (Segment(0, 4, (0,), (-1.0,)),), (3,))
    with pytest.raises(ValueError, match=r"posterior_mean"):
        Plan(sig, (0, 4), (Segment(0, 4, (0,), (-1.0,)),), (0,), reward_input="posterior_mean")
    with pytest.raises(ValueError, match=r"reward_input: got 'latent'; allowed: endpoint, posterior_mean"):
        Plan(sig, (0, 4), (Segment(0, 4, (0,), (-1.0,)),), (0,), reward_input="latent")


# ---------------------------------------------------------------------------- custom method
def test_custom_plan_reproduces_named_methods() -> None:
    sig = shifted(25)
    la = flowbp.make_plan("leapalign", sig, 3)
    k, j, _ = la.anchors
    custom = flowbp.make_plan(
        "custom", sig, 0, start=k, anchors=[j], weights=["leap"], coupling=[0.3], sample_weight="similarity"
    )
    assert (custom.segments, custom.active, custom.coupling, custom.sample_weight) == (
        la.segments,
        la.active,
        la.coupling,
        la.sample_weight,
    )
    refl = flowbp.make_plan("custom", sig, 0, start=-3, weights=["leap"], reward_input="posterior_mean")
    assert refl.anchors == (22, 25) and not refl.final_connector
    rnd = flowbp.make_plan(
        "custom",
        sig,
        0,
        anchors=[-8],
        weights=["euler", "lagrange"],
        active="random",
        num_active=4,
        late_bias=1.0,
        coupling=[0.5],
    )
    assert rnd.grad_forwards == 4 and rnd.chain_depth <= 1
    with pytest.raises(ValueError, match=r"weights: give one rule or one per segment \(2\)"):
        flowbp.make_plan("custom", sig, 0, anchors=[10], weights=["euler", "leap", "leap"])


# ---------------------------------------------------------------------------- losses
def test_losses() -> None:
    r = torch.tensor([0.2, 0.6, 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        reward_transform(r, "hinge", 0.55), torch.tensor([0.35, 0.0, 0.05], dtype=torch.float64)
    )
    torch.testing.assert_close(reward_transform(r, "linear"), -r)
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert float(reward_loss(r, w, "linear")) == pytest.approx(-(0.2 + 1.2 + 2.0) / 3)
    # several inputs per sample (DRaFT-LV): φ averaged per sample first
    r2 = torch.tensor([0.4, 0.6, 0.7], dtype=torch.float64)
    assert float(reward_loss([r, r2], None, "hinge", 0.55)) == pytest.approx(
        ((0.35 + 0.15) / 2 + 0.05 / 2) / 3
    )
    with pytest.raises(ValueError, match=r"unknown kind 'square'; allowed: hinge, linear"):
        reward_loss(r, None, "square")


# ---------------------------------------------------------------------------- CLI
def test_plan_cli_prints_table_and_json(capsys) -> None:
    assert main(["plan", "flowbp-lagrange", "--steps", "25", "--seed", "114"]) == 0
    text = capsys.readouterr().out
    for word in ("anchors:", "grad forwards: 4", "chain depth: 1", "lagrange", "similarity(tau=0.2)"):
        assert word in text
    assert main(["plan", "flowbp-sparse", "--json", "--set", "num_active=5", "--set", "late_bias=1.0"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["grad_forwards"] == 5 and data["params"]["late_bias"] == 1.0


def test_plan_cli_errors_exit_nonzero(capsys) -> None:
    assert main(["plan", "nope"]) == 2
    assert "unknown method 'nope'; known methods:" in capsys.readouterr().err
    assert main(["plan", "flowbp-bridge", "--set", "alpha=2"]) == 2
    assert "alpha: must be in [0, 1], got 2" in capsys.readouterr().err
    assert main(["plan", "refl", "--set", "oops"]) == 2
    assert "--set: expected key=value" in capsys.readouterr().err
    assert main(["methods"]) == 0
    assert "flowbp-lagrange" in capsys.readouterr().out


def test_plan_cli_shows_the_grid_training_uses(capsys) -> None:
    """`flowbp plan --backbone digits` = the plan flowbp.train draws first: backbone.sigmas(N), plan_seed = --seed."""
    from flowbp.backbones import load_backbone
    from flowbp.trajectory import training_sigmas

    for method in ("flowbp-bridge", "drtune", "flowbp-lagrange"):
        assert main(["plan", method, "--backbone", "digits", "--steps", "10", "--seed", "114", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        # what flowbp/train.py does: sigmas = backbone.sigmas(num_inference_steps), plan generator seeded plan_seed
        trained = flowbp.make_plan(method, load_backbone("digits").sigmas(10), torch.Generator().manual_seed(114))
        assert shown["anchors"] == list(trained.anchors) and shown["active"] == list(trained.active)
        for seg, ref in zip(shown["segments"], trained.segments, strict=True):
            assert seg["support"] == list(ref.support) and seg["weights"] == pytest.approx(ref.weights, rel=1e-15)
        # the digits backbone trains on shift 1: --shift 1 shows the same weights, the SD3 default 3 does not
        assert main(["plan", method, "--shift", "1", "--steps", "10", "--seed", "114", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["segments"] == shown["segments"]
    # the paper's grid itself: the last step runs from 1/N to 0 at shift 1
    assert training_sigmas(10, 1.0)[-2] == pytest.approx(0.1)
    assert main(["plan", "flowbp-sparse", "--steps", "10", "--seed", "1", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["segments"][0]["weights"][-1] == pytest.approx(-float(training_sigmas(10, 3.0)[-2]))
    assert main(["plan", "refl", "--backbone", "digits", "--shift", "2"]) == 2
    assert "--shift: give either --shift or --backbone" in capsys.readouterr().err
    assert main(["plan", "refl", "--backbone", "nope"]) == 2
    assert "unknown backbone 'nope'" in capsys.readouterr().err
