"""Paired statistics: the same documents (or perplexity windows) scored under two settings.

Sign convention, everywhere (tables `paired` and `pooled`, summary.json): a difference is the subject
(the first criterion of a comparison, `simba` by default) minus the other setting, in units where higher
is better (accuracy, log-likelihood): positive means the subject is better.
"""

from __future__ import annotations

import math
from collections import Counter
from statistics import NormalDist

import numpy as np

SIGNIFICANT_Z = 2.0  # a paired difference larger than this many standard errors is marked


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same documents, and its standard error."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def z_score(mean: float, se: float, n: int) -> float:
    """mean / se. Where every one of n documents differs by the same nonzero amount (se 0), the z of an exact sign
    test (all n one way: one-sided p = 2^-n), not 0 and not infinite; no difference at all, or n < 2: 0."""
    if se > 0:
        return mean / se
    if mean == 0 or n < 2 or math.isnan(mean):
        return 0.0
    return math.copysign(-NormalDist().inv_cdf(max(0.5 ** n, 1e-300)), mean)


def pair_row(mean: float, se: float, docs: int, **fields) -> dict:
    """One table row of a paired difference over `docs` documents, with its z and the mark of a difference beyond
    2 se."""
    z = z_score(mean, se, docs)
    mark = ("better" if z > 0 else "worse") if abs(z) > SIGNIFICANT_Z else ""
    return {**fields, "docs": docs, "diff": mean, "stderr": se, "z": z, "beyond_2se": mark}


def pooled_z(pairs: list[dict], diffs: list[list[float]] | None = None, doc_set=lambda task: task) -> list[dict]:
    """One line per subject and other setting, pooling its paired comparisons (every model, keep and task).

    z_comparisons   Stouffer's z over the comparisons, sum(z) / sqrt(n). It treats them as independent, which
                    they are not where they share documents (several keeps, models or perplexity contexts on
                    the same documents or windows): then it overstates |z|.
    z_documents     with `diffs` (each pair's per-document differences): within each set of documents
                    (`doc_set(task)`), every comparison's difference averaged per document, its paired z over
                    those documents; then Stouffer's over the sets, which share no documents. Dependence within
                    a set is in the per-document averages, so this z does not overstate.
    better, worse   how many comparisons point each way (their z).
    """
    out = []
    for subject, vs in dict.fromkeys((p.get("subject"), p["vs"]) for p in pairs):
        mine = [i for i, p in enumerate(pairs) if p["vs"] == vs and p.get("subject") == subject]
        zs = [pairs[i]["z"] for i in mine]
        head = {} if subject is None else {"subject": subject}
        row = {**head, "vs": vs, "comparisons": len(zs), "z_comparisons": sum(zs) / math.sqrt(len(zs)),
               "better": sum(z > 0 for z in zs), "worse": sum(z < 0 for z in zs)}
        if diffs is not None:
            row.update(zip(("document_sets", "z_documents"), _pooled_by_document(
                [pairs[i]["task"] for i in mine], [diffs[i] for i in mine], doc_set)))
        out.append(row)
    return out


def _pooled_by_document(tasks: list[str], diffs: list[list[float]], doc_set) -> tuple[int, float]:
    sets: dict[str, list[list[float]]] = {}
    for task, d in zip(tasks, diffs):
        sets.setdefault(doc_set(task), []).append(d)
    zs = []
    for group in sets.values():
        n = Counter(len(d) for d in group).most_common(1)[0][0]  # the set's documents (one limit per run)
        per_doc = np.mean([d for d in group if len(d) == n], axis=0)
        mean, se = paired(per_doc, np.zeros(n))
        zs.append(z_score(mean, se, n))
    return len(zs), sum(zs) / math.sqrt(len(zs))
