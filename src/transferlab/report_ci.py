"""Confidence intervals and multiplicity correction for the report's tables.

A t-based 95 % confidence interval for every mean over replicates and every paired difference
(``scipy.stats.t``), and Holm–Bonferroni adjusted p-values over each table's family of comparisons
(one family per metric and table; the raw p stays in the CSV beside it). Checked against statsmodels'
``multipletests(method="holm")`` and scipy's ``t.interval`` in tests/test_report_select.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """The t-based 95 % confidence interval of the mean of ``values`` (NaN below two values)."""
    from scipy import stats

    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(data) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.975, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data))
    return float(data.mean() - half), float(data.mean() + half)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN and is not
    counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    known = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    order = known[np.argsort(p[known], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
