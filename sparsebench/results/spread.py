"""How a record's spread fields follow from its raw times: ``time_iqr_s`` (the interquartile
range, numpy's linear quantiles) and ``noisy`` (IQR over median above NOISY). One definition for
a case measured once, a decode case and the rounds of a case merged on reading."""

from __future__ import annotations

import statistics
from typing import Sequence

from sparsebench.stats import iqr

NOISY = 0.10


def noisy(times: Sequence[float]) -> bool:
    med = statistics.median(times)
    return med > 0 and iqr(times) / med > NOISY
