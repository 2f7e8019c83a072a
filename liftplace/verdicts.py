"""Verdicts on a comparison with kd, the power a number of seeds has, and how many seeds a
question needs.

Every comparison of a variant with its kd run uses the final FIDs of their seeds:

- a difference is Welch's t-test (unequal variances), two-sided, with Holm's correction over the
  study's comparisons (statsmodels ``multipletests``);
- an equivalence is two one-sided Welch tests (TOST, statsmodels ``ttost_ind``) against a margin
  of +-``margin`` x kd's mean final FID (default 20%), with Holm's correction too;
- the verdict is one of: better, worse (a difference shown), equivalent (within the margin),
  inconclusive (neither: more seeds are needed, and the power line says how many), or too few
  seeds to tell (fewer than ``MIN_SEEDS`` a side, where Welch's test has a degree of freedom or
  two and says nothing useful).

Power is that of the same Welch test at Holm's strictest step (alpha / the number of
comparisons: the level the smallest p-value must clear, so the planned seeds suffice for every
comparison), simulated with ``scipy.stats.power`` from normal seeds with the pilot's standard
deviations.

A study grown seed by seed (``--seeds auto``) looks at its verdicts after each round of seeds.
Looking repeatedly inflates false positives, so each look spends a part of alpha: the
O'Brien-Fleming-type spending function of Lan and DeMets, alpha(t) = 2 - 2 Phi(z_{1-alpha/2} /
sqrt(t)) at information fraction t = seeds so far / the most seeds allowed, and each look tests
at the alpha spent since the last one. By the union bound the false-positive rate over all looks
stays at or under alpha (the tests simulate it); the price is a little power at the last look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
MIN_SEEDS = 3  # Welch's test on 2 vs 2 has one degree of freedom: its intervals say nothing useful
MARGIN = 0.2  # equivalence margin and planned effect: +-20% of kd's mean final FID
MAX_PLANNED = 1000  # seeds per variant beyond which a plan says "more than"
DECIDED = ("better", "worse", "equivalent")  # the verdicts that end a sequential study's growth
SIMULATIONS = 20_000  # simulated studies per power (its standard error is under 0.004)


REFERENCE = "kd"


def finals(summary: pd.DataFrame, variant: str) -> np.ndarray:
    ok = summary[(summary["variant"] == variant) & ~summary["diverged"]]["final_fid"].dropna()
    return ok.to_numpy(dtype=float)


def setting_columns(summary: pd.DataFrame) -> list[str]:
    """The config columns that tell settings apart: those that differ between variants, other
    than the objective's and the seed (``compression``: the pruning ratio; ``teacher_scale``: the
    teacher)."""
    firsts = summary.drop_duplicates("variant").set_index("variant")
    return [c for c in firsts.columns if c.startswith("config/") and not c.startswith("config/objective/")
            and c != "config/train/seed" and firsts[c].astype(str).nunique() > 1]


def setting_keys(summary: pd.DataFrame) -> pd.Series:
    """variant -> its setting (a tuple of the ``setting_columns`` values, as text; () where
    variants differ in the objective alone)."""
    firsts = summary.drop_duplicates("variant").set_index("variant")
    columns = setting_columns(summary)
    if not columns:
        return pd.Series([()] * len(firsts), firsts.index, dtype=object)
    return firsts[columns].astype(str).apply(tuple, axis=1)


def references(summary: pd.DataFrame, reference: str = REFERENCE) -> dict[str, str | None]:
    """For every variant that is not a reference, the kd variant it is compared with: the one
    whose settings, other than the objective's, are the same (the config columns that differ
    between variants, seeds aside). Without config columns, or where a setting has no kd
    variant, the variant named ``reference``; None when there is none."""
    firsts = summary.drop_duplicates("variant").set_index("variant")
    objective = "config/objective/name"
    if objective not in firsts:
        return {v: reference if reference in firsts.index else None for v in firsts.index if v != reference}
    key = setting_keys(summary)
    kds = [v for v in firsts.index if firsts.loc[v, objective] == reference]
    out = {}
    for variant in firsts.index:
        if variant in kds:
            continue
        same = [k for k in kds if key[k] == key[variant]]
        out[variant] = (reference if reference in same else same[0]) if same else (
            reference if reference in firsts.index else None)
    return out


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels); NaN stays NaN and is not counted."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return list(out)


def welch(x, ref) -> tuple[float, float, float, float]:
    """(difference of means, 95% interval low, high, two-sided p) of Welch's t-test, x - ref."""
    test = stats.ttest_ind(x, ref, equal_var=False)
    interval = test.confidence_interval(0.95)
    return float(np.mean(x) - np.mean(ref)), float(interval.low), float(interval.high), float(test.pvalue)


def tost(x, ref, margin: float) -> float:
    """p-value of two one-sided Welch tests that |mean(x) - mean(ref)| < margin (statsmodels)."""
    from statsmodels.stats.weightstats import ttost_ind

    return float(ttost_ind(np.asarray(x, float), np.asarray(ref, float), -margin, margin, usevar="unequal")[0])


def _welch_p(x, y, axis=-1):
    return stats.ttest_ind(x, y, equal_var=False, axis=axis).pvalue


def welch_power(n_a: int, n_b: int, sd_a: float, sd_b: float, effect: float, alpha: float = ALPHA,
                resamples: int = SIMULATIONS) -> float:
    """Power of the two-sided Welch t-test at level ``alpha`` to find a true difference
    ``effect`` between two groups of ``n_a`` and ``n_b`` seeds with these standard deviations:
    the share of ``resamples`` simulated studies (normal seeds, a fixed random stream, so the
    same question gets the same answer) that the test calls different (``scipy.stats.power``).
    The noncentral-t approximation was 0.05 too high at 3 seeds a side, hence the simulation."""
    if min(n_a, n_b) < 2:
        return float("nan")
    if sd_a == 0 and sd_b == 0:
        return 1.0 if effect else 0.0
    rng = np.random.default_rng(0)
    result = stats.power(_welch_p, (lambda size: rng.normal(effect, sd_a, size), lambda size: rng.normal(0.0, sd_b, size)),
                         (n_a, n_b), significance=alpha, n_resamples=resamples, vectorized=True)
    return float(result.power)


def _approximate_power(n: int, sd_a: float, sd_b: float, effect: float, alpha: float) -> float:
    """The noncentral-t approximation of Welch's power (Welch-Satterthwaite degrees of freedom):
    close from ~8 seeds a side, up to 0.05 too high at 3; only a starting point for the search."""
    va, vb = sd_a**2 / n, sd_b**2 / n
    df = (va + vb) ** 2 / ((va**2 + vb**2) / (n - 1))
    shift, crit = abs(effect) / math.sqrt(va + vb), stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, shift) + stats.nct.cdf(-crit, df, shift))


def seeds_needed(sd_a: float, sd_b: float, effect: float, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """The fewest seeds per variant (the same on both sides, at least ``MIN_SEEDS``) at which
    Welch's test has ``power`` to find ``effect`` (simulated); None beyond ``MAX_PLANNED``. The
    approximation picks where to start; the simulation then steps up, or down, one seed at a time."""
    if not effect or not np.isfinite(sd_a) or not np.isfinite(sd_b) or sd_a + sd_b == 0:
        return None if not effect else MIN_SEEDS
    n = next((k for k in range(MIN_SEEDS, MAX_PLANNED + 1) if _approximate_power(k, sd_a, sd_b, effect, alpha) >= power),
             MAX_PLANNED)
    def enough(k):
        return welch_power(k, k, sd_a, sd_b, effect, alpha) >= power

    if enough(n):
        while n > MIN_SEEDS and enough(n - 1):
            n -= 1
        return n
    while n < MAX_PLANNED:
        n += 1
        if enough(n):
            return n
    return None


@dataclass
class Comparison:
    """One variant against its kd run: what the report's table holds."""

    seeds: int
    ref_seeds: int
    difference: float = float("nan")
    ci95_low: float = float("nan")
    ci95_high: float = float("nan")
    p: float = float("nan")
    p_equivalent: float = float("nan")
    margin: float = float("nan")  # in FID


def compare(x, ref, margin: float = MARGIN) -> Comparison:
    """The raw tests of ``x`` (a variant's final FIDs) against ``ref`` (kd's); Holm comes after,
    over the study's comparisons (``decide``)."""
    x, ref = np.asarray(x, float), np.asarray(ref, float)
    out = Comparison(len(x), len(ref))
    if len(ref):
        out.margin = margin * float(np.mean(ref))
    if len(x) and len(ref):
        out.difference = float(x.mean() - ref.mean())
    if len(x) >= 2 and len(ref) >= 2:
        out.difference, out.ci95_low, out.ci95_high, out.p = welch(x, ref)
        out.p_equivalent = tost(x, ref, out.margin)
    return out


def decide(comparisons: list[Comparison], alpha: float = ALPHA) -> list[tuple[str, float, float]]:
    """(verdict word, Holm-adjusted p of the difference, of the equivalence) per comparison:
    better | worse | equivalent | inconclusive | too few seeds."""
    p_diff = holm(c.p if min(c.seeds, c.ref_seeds) >= MIN_SEEDS else np.nan for c in comparisons)
    p_equiv = holm(c.p_equivalent if min(c.seeds, c.ref_seeds) >= MIN_SEEDS else np.nan for c in comparisons)
    out = []
    for c, pd_, pe in zip(comparisons, p_diff, p_equiv):
        if min(c.seeds, c.ref_seeds) < MIN_SEEDS:
            word = "too few seeds"
        elif pd_ < alpha:
            word = "better" if c.difference < 0 else "worse"
        elif pe < alpha:
            word = "equivalent"
        else:
            word = "inconclusive"
        out.append((word, pd_, pe))
    return out


def spending(fraction: float, alpha: float = ALPHA) -> float:
    """Alpha spent by information fraction ``fraction`` (O'Brien-Fleming-type, Lan-DeMets)."""
    if fraction <= 0:
        return 0.0
    fraction = min(fraction, 1.0)
    return float(2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / math.sqrt(fraction)))


def look_alpha(seeds: int, previous: int, max_seeds: int, alpha: float = ALPHA) -> float:
    """The level a look at ``seeds`` seeds per variant tests at, after one at ``previous`` (0:
    the first look), when the study may grow to ``max_seeds``."""
    return spending(seeds / max_seeds, alpha) - spending(previous / max_seeds, alpha)


def table(summary: pd.DataFrame, reference: str = REFERENCE, margin: float = MARGIN, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per variant other than the references (``summary``: one row per run, with
    ``variant``, ``final_fid``, ``diverged``): seeds, means, the difference with its Welch 95%
    interval, ratio, Welch p and the equivalence p (two one-sided tests against +-``margin`` x
    the reference's mean), each raw and Holm-adjusted over the variants, and ``word``: better |
    worse | equivalent | inconclusive | too few seeds, at level ``alpha``. The ``reference``
    column names the kd variant each is compared with (``references``)."""
    rows, tests = [], []
    for variant, against in references(summary, reference).items():
        ref = finals(summary, against) if against is not None else np.array([])
        x = finals(summary, variant)
        test = compare(x, ref, margin)
        tests.append(test)
        rows.append({"variant": variant, "reference": against, "seeds": len(x), f"{reference}_seeds": len(ref),
                     "fid_mean": x.mean() if len(x) else np.nan, f"{reference}_mean": ref.mean() if len(ref) else np.nan,
                     "fid_std": x.std(ddof=1) if len(x) > 1 else np.nan,
                     f"{reference}_std": ref.std(ddof=1) if len(ref) > 1 else np.nan,
                     "ci95_low": test.ci95_low, "ci95_high": test.ci95_high, "p": test.p, "margin": test.margin,
                     "p_equivalent": test.p_equivalent})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["difference"] = out["fid_mean"] - out[f"{reference}_mean"]
    out["ratio"] = out["fid_mean"] / out[f"{reference}_mean"]
    decided = decide(tests, alpha)
    out["p_holm"] = [d[1] for d in decided]
    out["p_equivalent_holm"] = [d[2] for d in decided]
    out["word"] = [d[0] for d in decided]
    return out


def plan_seeds(summary: pd.DataFrame, *, effect: float | None = None, ratio: float = MARGIN, power: float = 0.8,
               alpha: float = ALPHA, reference: str = REFERENCE) -> pd.DataFrame:
    """For every comparison of a pilot study: each side's seed spread, the effect asked about
    (``effect`` FID, else ``ratio`` x the reference's mean), the power the pilot's seeds had to
    find it, and the seeds per variant needed for ``power``, both at Holm's strictest level
    (alpha / the number of comparisons: enough for every comparison)."""
    out = table(summary, reference, alpha=alpha)
    if out.empty:
        return out
    level = alpha / len(out)
    out["effect"] = [effect if effect is not None else ratio * m for m in out[f"{reference}_mean"]]
    out["level"] = level
    out["power_now"] = [welch_power(int(r.seeds), int(r[f"{reference}_seeds"]), r.fid_std, r[f"{reference}_std"], r.effect, level)
                        if min(r.seeds, r[f"{reference}_seeds"]) >= 2 else np.nan for _, r in out.iterrows()]
    out["seeds_needed"] = [seeds_needed(r.fid_std, r[f"{reference}_std"], r.effect, level, power)
                           if min(r.seeds, r[f"{reference}_seeds"]) >= 2 else None for _, r in out.iterrows()]
    return out
