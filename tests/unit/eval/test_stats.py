"""mmdc/eval/stats.py: t quantiles, confidence intervals over seeds, paired differences, the rank AUC."""

from __future__ import annotations

import math
import statistics

import pytest

from mmdc.eval import stats


@pytest.mark.parametrize(
    "df, expected",  # two-sided 95 %: the 0.975 quantile, from any t table
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452), (120, 1.9799)],
)
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_distribution_is_symmetric_and_tends_to_the_normal():
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-stats.t_quantile(0.975, 4))
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_interval_is_the_t_interval_of_the_mean():
    values = [60.0, 70.0, 65.0, 61.0, 64.0]
    ci = stats.interval(values)
    sd = statistics.stdev(values)
    half = 2.7764451 * sd / math.sqrt(5)
    assert ci["mean"] == 64.0 and ci["std"] == pytest.approx(sd) and ci["n"] == 5
    assert ci["half"] == pytest.approx(half) and ci["low"] == pytest.approx(64.0 - half)
    assert (ci["min"], ci["max"]) == (60.0, 70.0)
    lone = stats.interval([3.0])
    assert lone["mean"] == 3.0 and lone["std"] is lone["half"] is lone["low"] is None


def test_paired_differences_pair_by_seed_and_ignore_unmatched_seeds():
    a = {0: 60.0, 1: 70.0, 2: 65.0, 3: 50.0}
    b = {0: 55.0, 1: 66.0, 2: 62.0}  # seed 3 has no plain run
    diff = stats.paired(a, b)
    assert diff["per_seed"] == {0: 5.0, 1: 4.0, 2: 3.0}
    assert diff["mean"] == 4.0 and diff["n"] == 3
    assert diff["half"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3))  # sd of (5, 4, 3) is 1
    # pairing removes the shared seed effect: the unpaired spread of the arms is far wider
    assert diff["half"] < stats.interval(list(b.values()))["half"]
    assert stats.paired({0: 1.0}, {1: 1.0}) is None


def test_rank_auc():
    assert stats.rank_auc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert stats.rank_auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert stats.rank_auc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # ties count one half
    # 2 positives x 2 negatives: (0.9 > 0.3, 0.9 > 0.6, 0.5 > 0.3, 0.5 < 0.6) -> 3 of 4
    assert stats.rank_auc([0.9, 0.5, 0.3, 0.6], [True, True, False, False]) == 0.75
    assert stats.rank_auc([0.4, 0.4, 0.2], [True, False, False]) == pytest.approx(0.75)  # one tie, one win
    assert stats.rank_auc([0.1, 0.2], [True, True]) is None  # one class only
    assert stats.rank_auc([math.nan, 0.2], [True, False]) is None


def test_ratio_of_means_is_none_without_a_gain():
    assert stats.ratio_of_means([100.0, 300.0], [10.0, 30.0]) == 10.0
    assert stats.ratio_of_means([100.0], [0.0]) is None and stats.ratio_of_means([100.0], [-2.0]) is None
    assert stats.ratio_of_means([], []) is None
