"""flowbp.stats against hand-computed Student-t values (tables to 6 digits), not against itself."""

from __future__ import annotations

import math

import pytest
import torch

from flowbp.stats import group_means, mean_ci, paired_difference, t_quantile

# Two-sided 95% critical values t_{0.975, df} from any printed t table.
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 7: 2.364624, 19: 2.093024, 199: 1.971957}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantiles_match_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


def test_normal_limit_and_bad_arguments() -> None:
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="prob"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_mean_ci_three_seeds_by_hand() -> None:
    # values 1, 2, 6: mean 3, sample sd sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7), half = 4.302653·sqrt(7)/sqrt(3).
    ci = mean_ci([1.0, 2.0, 6.0])
    half = 4.302653 * math.sqrt(7.0) / math.sqrt(3.0)
    assert ci["mean"] == pytest.approx(3.0)
    assert ci["half"] == pytest.approx(half, rel=1e-6)
    assert ci["ci95_low"] == pytest.approx(3.0 - half, rel=1e-6)
    assert ci["ci95_high"] == pytest.approx(3.0 + half, rel=1e-6)
    assert ci["n"] == 3
    # The normal approximation would have been 2.2× too narrow here.
    assert ci["half"] / (1.959964 * math.sqrt(7.0 / 3.0)) == pytest.approx(4.302653 / 1.959964, rel=1e-6)
    one = mean_ci(torch.tensor([5.0]))
    assert one["mean"] == 5.0 and math.isinf(one["half"])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_paired_difference_removes_shared_variance() -> None:
    # Large shared per-seed offsets, a constant +0.1 advantage: unpaired CIs overlap, the paired one is tight.
    base = torch.tensor([0.0, 10.0, -7.0, 3.0, 25.0], dtype=torch.float64)
    a, b = base + 0.1 + torch.tensor([0.01, -0.01, 0.0, 0.02, -0.02]), base
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.1)
    assert d["significant"] is True and d["ci95_low"] > 0
    ca, cb = mean_ci(a), mean_ci(b)
    assert ca["ci95_low"] < cb["ci95_high"]  # unpaired intervals overlap
    same = paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 3.0])
    assert same["significant"] is False and same["ci95_low"] < 0 < same["ci95_high"]
    with pytest.raises(ValueError, match="same units"):
        paired_difference([1.0, 2.0], [1.0])


def test_group_means_average_within_units_first() -> None:
    values = [1.0, 3.0, 10.0, 20.0, 30.0]
    groups = ["t0", "t0", "t1", "t1", "t1"]
    assert group_means(values, groups).tolist() == [2.0, 20.0]
    with pytest.raises(ValueError, match="one group label per value"):
        group_means(values, groups[:-1])
