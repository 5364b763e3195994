"""Measure one decode case in this process: its decoder (measure/decode.py) on the case's
backend (measure/decode_steps.py), its peak memory (the decoder's own: the cache, the prompt
prefilled into it a chunk at a time, the steps), and its check against full attention."""

from __future__ import annotations

from typing import Any

from sparsebench.errors import BackendUnavailable
from sparsebench.measure import decode_steps
from sparsebench.scenario import Case

# Decode steps are checked against attention under the pattern's mask over the cache; the
# quality against full attention is a property of the pattern on the inputs, measured in the
# forward and backward cases of the same pattern.
QUALITY_NOTE = "decode mode: quality against full attention is measured in forward and backward mode"


def run_case(case: Case) -> dict[str, Any]:
    """The measured record fields of a decode case (the runner adds the identity fields);
    BackendUnavailable (a skipped case) where its backend cannot decode here."""
    from sparsebench.backends.base import BACKENDS
    from sparsebench.measure import harness
    from sparsebench.measure.decode import measure_decode
    from sparsebench.measure.memory import PeakMemory

    p = harness.make_problem(case)
    why = decode_steps.unsupported(case.backend, p.device, p.dtype)
    if why:
        raise BackendUnavailable(why)
    compiled = decode_steps.STEPS[case.backend].compiled
    if compiled:  # a compiler's modules are the process's one-time cost, not this case's
        harness.load_backend(BACKENDS.get(case.backend)(), p.device)
    with PeakMemory(p.device) as pm:
        fields = measure_decode(
            p.pattern,
            case.seq_len,
            tokens=case.decode_tokens,
            batch=case.batch,
            heads=case.heads,
            kv_heads=decode_steps.kv_heads_of(case),
            head_dim=case.head_dim,
            dtype=p.dtype,
            device=case.device,
            warmup=max(1, case.warmup),
            causal=case.causal,
            backend=case.backend,
            # a compiling backend's first step is its compilation: its scratch and what it leaves
            # resident are out of the decoder's peak (as for the other modes' first call)
            first_call=(lambda: pm.one_time(keep_peak=False)) if compiled else None,
        )
    fields.setdefault("peak_mem_bytes", pm.peak_bytes)
    fields["check"] = "exact"
    fields["quality_note"] = QUALITY_NOTE
    fields["noisy"] = harness.Measurement(tuple(fields["times_s"])).noisy
    return harness.judge(fields, case.dtype)
