"""The statistics behind every verdict: power, seeds needed, equivalence, and sequential looks."""

from unittest import mock

import numpy as np
import pytest
from scipy import stats

from liftplace import verdicts
from liftplace.verdicts import Comparison, compare, decide, look_alpha, seeds_needed, spending, welch_power

# statsmodels' Holm branch calls gc.collect() on every call (~85 ms in a process holding torch);
# the simulations below call it thousands of times.
no_gc = mock.patch("gc.collect", lambda *args: 0)


def simulated_power(n_a, n_b, sd_a, sd_b, effect, alpha, studies=20_000, seed=1):
    """Welch's test run on simulated studies, independently of the planner's simulation."""
    rng = np.random.default_rng(seed)
    a = rng.normal(effect, sd_a, (studies, n_a))
    b = rng.normal(0.0, sd_b, (studies, n_b))
    return float((stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < alpha).mean())


@pytest.mark.parametrize("n,sd_a,sd_b,effect,alpha", [
    (3, 0.8, 0.8, 1.0, 0.05), (4, 0.8, 0.8, 1.0, 0.05), (8, 0.8, 0.8, 1.0, 0.05), (12, 0.8, 0.8, 1.0, 0.05),
    (4, 7.4, 0.6, 10.0, 0.01), (6, 5.0, 1.0, -4.0, 0.0125), (3, 1.0, 3.0, 3.0, 0.05)])
def test_planned_power_matches_a_simulation_of_the_same_test(n, sd_a, sd_b, effect, alpha):
    assert welch_power(n, n, sd_a, sd_b, effect, alpha) == pytest.approx(
        simulated_power(n, n, sd_a, sd_b, effect, alpha), abs=0.05)


def test_power_rises_with_seeds_and_the_plan_is_the_fewest_that_reach_it():
    powers = [welch_power(n, n, 0.8, 0.8, 1.0) for n in (3, 4, 6, 8, 12)]
    assert powers == sorted(powers) and powers[0] < 0.2 and powers[-1] > 0.8  # the 0.17 ... 0.82
    n = seeds_needed(0.8, 0.8, 1.0, power=0.8)
    assert welch_power(n, n, 0.8, 0.8, 1.0) >= 0.8 > welch_power(n - 1, n - 1, 0.8, 0.8, 1.0)
    assert seeds_needed(0.8, 0.8, 1.0, alpha=0.01) > n  # a stricter level needs more seeds
    assert seeds_needed(0.8, 0.8, 0.01) is None  # beyond any plan
    assert seeds_needed(0.1, 0.1, 5.0) == verdicts.MIN_SEEDS


def test_equivalence_is_two_one_sided_welch_tests():
    x, ref, margin = np.array([10.2, 9.8, 10.5, 10.1]), np.array([10.0, 10.4, 9.7, 10.3, 9.9]), 1.0
    lower = stats.ttest_ind(x + margin, ref, equal_var=False, alternative="greater").pvalue
    upper = stats.ttest_ind(x - margin, ref, equal_var=False, alternative="less").pvalue
    assert verdicts.tost(x, ref, margin) == pytest.approx(max(lower, upper))


def test_verdicts_tell_better_worse_equivalent_inconclusive_and_too_few_apart():
    rng = np.random.default_rng(0)
    kd = 10 + 0.3 * rng.standard_normal(8)
    cases = {
        "better": 6 + 0.3 * rng.standard_normal(8),
        "worse": 14 + 0.3 * rng.standard_normal(8),
        "equivalent": 10.1 + 0.3 * rng.standard_normal(8),  # margin: 20% of 10 = 2 FID
        "inconclusive": 11 + 6 * rng.standard_normal(4),
        "too few seeds": np.array([3.0, 4.0]),
    }
    words = [w for w, _, _ in decide([compare(x, kd) for x in cases.values()])]
    assert words == list(cases)
    assert compare(cases["better"], kd).margin == pytest.approx(0.2 * kd.mean())
    # a narrower margin leaves the close variant undecided
    assert decide([compare(cases["equivalent"], kd, margin=0.01)])[0][0] == "inconclusive"


def test_alpha_spending_spends_alpha_by_the_last_look_and_little_early():
    assert spending(1.0) == pytest.approx(0.05) and spending(0.0) == 0.0
    assert spending(0.25) < 0.001 < spending(0.5) < spending(0.75) < 0.05  # O'Brien-Fleming: little at first
    looks = [3, 5, 7, 9, 12]
    levels = [look_alpha(n, prev, 12) for n, prev in zip(looks, [0, *looks[:-1]])]
    assert sum(levels) == pytest.approx(0.05) and all(level > 0 for level in levels)


def sequential(effect, studies, looks, max_seeds, rng, sd=1.0, kd_mean=10.0, alpha=0.05):
    """(share of studies that called any of two variants better or worse, mean seeds at the
    stop) of studies grown look by look with the module's rule, variants differing from kd by
    ``effect``. Welch and TOST p-values are vectorized here (TOST as two one-sided Welch tests,
    the identity checked above); the verdicts and levels are the module's."""
    kd = rng.normal(kd_mean, sd, (studies, max_seeds))
    arms = [rng.normal(kd_mean + effect, sd, (studies, max_seeds)) for _ in range(2)]
    any_difference = np.zeros(studies, bool)
    stopped_at = np.full(studies, looks[-1])
    open_ = np.ones(studies, bool)
    previous = 0
    for n in looks:
        level = look_alpha(n, previous, max_seeds, alpha)
        previous = n
        ref = kd[:, :n]
        margin = 0.2 * ref.mean(axis=1)
        tests = []
        for x in (a[:, :n] for a in arms):
            p = stats.ttest_ind(x, ref, axis=1, equal_var=False).pvalue
            lower = stats.ttest_ind(x + margin[:, None], ref, axis=1, equal_var=False, alternative="greater").pvalue
            upper = stats.ttest_ind(x - margin[:, None], ref, axis=1, equal_var=False, alternative="less").pvalue
            tests.append((x.mean(axis=1) - ref.mean(axis=1), p, np.maximum(lower, upper)))
        for i in np.flatnonzero(open_):
            words = [w for w, _, _ in decide([Comparison(n, n, difference=d[i], p=p[i], p_equivalent=e[i])
                                              for d, p, e in tests], level)]
            any_difference[i] |= any(w in ("better", "worse") for w in words)
            if all(w in verdicts.DECIDED for w in words):
                open_[i] = False
                stopped_at[i] = n
    return any_difference.mean(), stopped_at.mean()


def test_sequential_looks_keep_false_positives_at_alpha_and_stop_early_on_a_large_effect():
    rng = np.random.default_rng(7)
    looks = [3, 5, 7, 9, 12]
    with no_gc:
        false_positive, _ = sequential(0.0, 2000, looks, 12, rng)
        found, stop = sequential(3.0, 300, looks, 12, rng)  # 3 standard deviations
    assert false_positive <= 0.05
    assert found == 1.0 and stop < 7
