"""Run a script in a fresh interpreter for memory measurements (tests' helper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

MiB = 2**20


def in_fresh_process(script: str) -> Any:
    """Run ``script`` in a new interpreter whose glibc maps every block of 1 MiB or more on its
    own (MALLOC_MMAP_THRESHOLD_), so that freeing such a block leaves the resident set and a new
    one faults its pages in, and return the JSON of its last line of output. In a long test
    process glibc may serve large blocks from its heap instead (resident after free, no faults
    when reused), whatever the caching allocator does. SPARSEBENCH_ALLOCATOR is left unset."""
    env = {k: v for k, v in os.environ.items() if k != "SPARSEBENCH_ALLOCATOR"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(MiB)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
