"""Paired statistics: the same documents (or perplexity windows) scored under two settings.

Sign convention, everywhere (tables `paired` and `pooled`, summary.json): a difference is the subject
(the first criterion of a comparison, `simba` by default) minus the other setting, in units where higher
is better (accuracy, log-likelihood): positive means the subject is better.
"""

from __future__ import annotations

import math

import numpy as np

SIGNIFICANT_Z = 2.0  # a paired difference larger than this many standard errors is marked


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same documents, and its standard error."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def pair_row(mean: float, se: float, **fields) -> dict:
    """One table row of a paired difference, with its z and the mark of a difference beyond 2 se."""
    z = mean / se if se > 0 else 0.0
    mark = ("better" if z > 0 else "worse") if abs(z) > SIGNIFICANT_Z else ""
    return {**fields, "diff": mean, "stderr": se, "z": z, "beyond_2se": mark}


def pooled_z(pairs: list[dict]) -> list[dict]:
    """One line per subject and other setting: the paired differences of the subject against it (every model,
    keep and task, in their own units) pooled as Stouffer's z = sum(diff / stderr) / sqrt(n); positive means
    the subject is better. A comparison whose documents all agree (stderr 0) counts as z = 0."""
    out = []
    for subject, vs in dict.fromkeys((p.get("subject"), p["vs"]) for p in pairs):
        zs = [p["diff"] / p["stderr"] if p["stderr"] > 0 else 0.0 for p in pairs
              if p["vs"] == vs and p.get("subject") == subject]
        head = {} if subject is None else {"subject": subject}
        out.append({**head, "vs": vs, "comparisons": len(zs), "z": sum(zs) / math.sqrt(len(zs)),
                    "better": sum(z > 0 for z in zs), "worse": sum(z < 0 for z in zs)})
    return out
