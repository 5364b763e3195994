"""An example plugin: one pattern and one backend, registered the way sparsebench's own are.

    sparsebench list --plugin examples/plugin_example.py
    sparsebench show dilated_sink -n 32 -p window=4 -p dilation=3 --plugin examples/plugin_example.py
    sparsebench run my.yaml --plugin examples/plugin_example.py     # patterns: [{name: dilated_sink, ...}]

From Python: ``sparsebench.plugins.load(["examples/plugin_example.py"])``, then
``sparsebench.attention(q, k, v, pattern="dilated_sink", window=8, dilation=4)``.

A pattern says which (query i, key j) pairs attend; every backend (block_sparse included) can
run it. A backend computes attention for any pattern; every run checks its output against dense
attention under the same mask, so a wrong backend is marked "wrong", not fast.
"""

from dataclasses import dataclass

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem, masked_softmax_attention
from sparsebench.patterns.base import PATTERNS, Pattern, param, require_at_most_n, require_positive
from sparsebench.patterns.geometry import Intervals, band, fixed_keys


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class DilatedSink(Pattern):
    """Attention sinks plus a dilated window: the first S tokens, and every D-th key back from
    the query, W of them (the query itself included)."""

    name = "dilated_sink"  # the name scenarios, `show` and the API use
    rule = "j < S, or i - j = kD with 0 <= k < W (|i - j| bidirectional)"  # shown by `sparsebench list`
    bounded_kv = True  # a decoder can drop keys older than the window (see kv_retained)

    # The parameters: dataclass fields; `param` gives each a help line (and a default, or none:
    # then it is required). Scenarios give them under `params:`, the CLI as -p key=value, the API
    # as keywords.
    sinks: int = param("leading sink tokens S", 1)
    window: int = param("keys in the dilated window, the query included (W)")
    dilation: int = param("gap between window keys (D)", 2)

    def validate(self):
        """Checks that need no sequence length (raise PatternError; require_* do)."""
        require_positive(self, "sinks", "window", "dilation")

    def check(self, n, causal):
        """Checks against the sequence length n."""
        require_at_most_n(self, n, "sinks", "window")

    def _allowed(self, q, k, n, causal):
        """The semantics: a bool tensor over broadcast query and key indices. Causality
        (k <= q) is applied by the base class, once."""
        d = (q - k).abs()
        return (k < self.sinks) | ((d % self.dilation == 0) & (d < self.window * self.dilation))

    def key_intervals(self, n, block, causal):
        """A cheap superset of the keys each query block may touch (inclusive ranges): the
        block layout evaluates ``_allowed`` on these tiles only. Without it (the default is every
        key), layouts cost n^2 / block^2 tile checks."""
        reach = (self.window - 1) * self.dilation
        return Intervals.cat([band(n, block, reach, 0 if causal else reach), fixed_keys(n, block, 0, self.sinks - 1)])

    def kv_retained(self, n):
        """Tokens a decoder keeps after n tokens: the sinks and the window's reach."""
        return min(n, self.sinks + (self.window - 1) * self.dilation + 1)


@BACKENDS.register
class RowChunks(Backend):
    """The textbook, a band of query rows at a time: the score matrix of one band is alive at
    once, never all n x n of it."""

    name = "row_chunks"
    summary = "plugin example: masked softmax attention, 256 query rows at a time"
    rows = 256

    # Backend.unavailable(device) -> None or why not (a missing library, device); the default says
    # it runs everywhere. Backend.unsupported(problem) -> None or why this problem is skipped.

    def prepare(self, p: Problem):
        """Setup work, kept out of the timed call: here the mask of each band of rows. ``p`` holds
        the pattern object and the sizes: seq_len, causal, batch, heads, head_dim, dtype, device,
        mode ("forward" or "backward") and tile (block_sparse's tile size)."""
        bands = []
        for r0 in range(0, p.seq_len, self.rows):
            rows = torch.arange(r0, min(p.seq_len, r0 + self.rows), device=p.device)
            bands.append((slice(r0, r0 + len(rows)), p.pattern.rows(rows, p.seq_len, p.causal)))

        def fn(q, k, v):  # (batch, heads, n, head_dim) each; autograd gives the backward pass
            return torch.cat([masked_softmax_attention(q[:, :, s], k, v, mask) for s, mask in bands], dim=2)

        return fn

    def estimate_bytes(self, p: Problem) -> int:
        """Analytic peak memory (for --max-memory): inputs and output, the masks, and three
        score-sized tensors of one band."""
        band_scores = p.batch * p.heads * min(self.rows, p.seq_len) * p.seq_len * p.elem_bytes
        io = 3 * p.io_bytes if p.mode == "backward" else p.io_bytes
        return io + p.seq_len * p.seq_len + 3 * band_scores
