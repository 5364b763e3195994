"""The Python API: attention under a named pattern, computed by a named backend, with the two
kept apart. ``pattern`` says which (query, key) pairs attend; ``backend`` says how they are
computed. Every keyword that is not one of the API options below goes to the pattern, always:
``attention(q, k, v, pattern="block_local", block=8)`` is block_local's ``block``, never the
backend's tile size (that is ``tile``).

* ``pattern(name, **params)``: the pattern object (mask, block layout, keys per query, nnz,
  KV retention) for scripts and notebooks.
* ``prepare(pattern, n, batch=..., heads=..., head_dim=...)``: a callable ``fn(q, k, v)`` that
  keeps what does not depend on the inputs (the backend's plan or compiled kernel) across calls,
  so that a model's forward can call it every step.
* ``attention(q, k, v, ...)``: one call; ``prepare`` for the shapes of q, k, v, then the call.
* ``quality(q, k, v, pattern, ...)``: how far the pattern's attention is from full attention on
  these inputs (relative error, recall of full attention's softmax mass), as a run records it.

Torch is imported inside the functions, so that ``import sparsebench`` stays light. Errors are
``sparsebench.errors.SparsebenchError``: ``ScenarioError`` for a bad name, parameter or shape,
``BackendUnavailable`` for a backend that cannot run the problem here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from sparsebench.errors import BackendUnavailable, ScenarioError
from sparsebench.units import COMPUTE_DTYPES  # the names a scenario uses for dtypes, accepted here too

if TYPE_CHECKING:
    import torch

    from sparsebench.backends.base import Problem
    from sparsebench.patterns.base import Pattern

__all__ = ["Attention", "attention", "pattern", "prepare", "quality"]


def pattern(name: str, **params: Any) -> "Pattern":
    """The pattern ``name`` with its parameters, validated (sizes >= 1 ...; checks against a
    sequence length come with ``check(n, causal)``). Its methods answer the questions a script
    asks: ``mask(n, causal)``, ``block_layout(n, tile, causal)``, ``keys_per_query(n, causal)``,
    ``nnz(n, causal)``, ``kv_retained(n)``, ``label()``."""
    from sparsebench.patterns.base import PATTERNS

    return PATTERNS.get(name).from_params(params)


@dataclass(frozen=True)
class Attention:
    """A prepared attention: call it as ``fn(q, k, v)`` with q of shape (batch, heads, n,
    head_dim) and k, v of shape (batch, kv_heads, n, head_dim), in the dtype and on the device it
    was prepared for.

    What does not depend on the inputs is built once, in ``prepare``: the backend's plan (block
    layout, key tables, mask, compiled kernel) is ``static``. Each call checks the shapes (one
    ``ScenarioError`` naming what was prepared and what came) and runs ``for_inputs(q, k)``,
    the one place where per-call work belongs: for the patterns of today it returns ``static``
    unchanged; a pattern whose keys depend on q and k (planned: content-selected patterns) will
    rebuild there only its key selection, per call, and reuse the rest.

    ``kv_heads`` may be fewer than ``heads`` (grouped-query attention: query head h reads key/value
    head h // (heads // kv_heads)); it divides ``heads``."""

    problem: "Problem"
    backend: str
    kv_heads: int
    static: Callable = field(repr=False)
    #: why the backend cannot run backward on this problem (None: it can); raised on a call that
    #: needs gradients, so a forward-only user never pays for the question
    no_backward: str | None

    @property
    def pattern(self) -> "Pattern":
        return self.problem.pattern

    def expected_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(q's shape, k's and v's shape)."""
        p = self.problem
        return (p.batch, p.heads, p.seq_len, p.head_dim), (p.batch, self.kv_heads, p.seq_len, p.head_dim)

    def check(self, q, k, v) -> None:
        """One ScenarioError when q, k, v are not the shapes, dtype and device prepared for."""
        p = self.problem
        q_shape, kv_shape = self.expected_shapes()
        shapes_ok = tuple(q.shape) == q_shape and tuple(k.shape) == kv_shape and tuple(v.shape) == kv_shape
        same = all(t.dtype == p.dtype and _on(t.device, p.device) for t in (q, k, v))
        if not (shapes_ok and same):
            raise ScenarioError(
                f"prepared for q {q_shape}, k and v {kv_shape}, {_dtype_name(p.dtype)} on {p.device}; got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                f"{', '.join(sorted({_dtype_name(t.dtype) for t in (q, k, v)}))} "
                f"on {', '.join(sorted({str(t.device) for t in (q, k, v)}))}"
            )

    def for_inputs(self, q, k) -> Callable:
        """The backend's callable for these inputs: the static plan (see the class docstring)."""
        return self.static

    def __call__(self, q, k, v):
        import torch

        self.check(q, k, v)
        if self.no_backward and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise BackendUnavailable(self.no_backward)
        return self.for_inputs(q, k)(q, k, v)


def prepare(
    pattern: "str | Pattern",
    n: int,
    *,
    backend: str = "block_sparse",
    causal: bool = True,
    batch: int,
    heads: int,
    kv_heads: int | None = None,
    head_dim: int,
    dtype: "torch.dtype | str" = "fp32",
    device: "torch.device | str" = "cpu",
    tile: int | None = None,
    **params: Any,
) -> Attention:
    """Prepare attention over n tokens for repeated calls: ``fn = prepare("sliding_window", 4096,
    window=256, batch=1, heads=8, head_dim=64)``, then ``fn(q, k, v)`` every step.

    ``pattern`` is a name, with its parameters as the other keywords (every keyword that is not
    an API option goes to the pattern), or a pattern object from ``sparsebench.pattern`` (then no
    parameters here). ``dtype``: a torch dtype or fp32 / fp16 / bf16. ``tile``: the
    block_sparse tile size (None: the backend's default, 64). ``kv_heads``: heads of k and v
    (None: ``heads``); fewer than ``heads`` is grouped-query attention (query head h reads
    key/value head h // (heads // kv_heads)), and must divide ``heads``.

    The backend's ``prepare`` (plan, mask, kernel) runs here, once. Raises ScenarioError for a bad
    name, parameter or size, BackendUnavailable when the backend cannot run this problem here."""
    import torch

    from sparsebench.backends.base import BACKENDS, Problem

    pat = _pattern_of(pattern, params)
    for name, value in (("n", n), ("batch", batch), ("heads", heads), ("head_dim", head_dim)):
        _require_positive(name, value)
    if kv_heads is None:
        kv_heads = heads
    _require_positive("kv_heads", kv_heads)
    if kv_heads > heads or heads % kv_heads:
        raise ScenarioError(
            f"kv_heads={kv_heads} must divide heads={heads} (each key/value head serves a group of query heads)"
        )
    if tile is not None:
        _require_positive("tile", tile)
    pat.check(n, causal)
    be = BACKENDS.get(backend)
    dev = torch.device(device)
    extra = {} if tile is None else {"tile": tile}
    problem = Problem(
        pat, n, causal, batch, heads, head_dim, _torch_dtype(dtype), dev, mode="forward", kv_heads=kv_heads, **extra
    )
    impl = be()
    why = be.unavailable(dev) or impl.unsupported(problem)
    if why:
        raise BackendUnavailable(why)
    no_backward = impl.unsupported(replace(problem, mode="backward"))
    return Attention(problem, backend, kv_heads, impl.prepare(problem), no_backward)


def attention(
    q,
    k,
    v,
    pattern: str = "dense",
    backend: str = "block_sparse",
    causal: bool = True,
    tile: int | None = None,
    **params: Any,
):
    """Attention of q (batch, heads, n, head_dim) and k, v (batch, kv_heads, n, head_dim) under a
    named pattern, computed by a named backend: ``prepare`` for their shapes, then the call. k and
    v may have fewer heads than q (grouped-query attention: kv_heads divides heads, query head h
    reads key/value head h // (heads // kv_heads)). Every keyword that is not an API option
    goes to the pattern (``window=256``, ``block=8``); ``tile`` is the block_sparse tile size
    (None: 64). For many calls of one shape, ``prepare`` once instead. Raises
    sparsebench.errors.SparsebenchError for bad names, parameters or shapes."""
    batch, heads, kv_heads, n, head_dim = _shapes(q, k, v)
    fn = prepare(
        pattern,
        n,
        backend=backend,
        causal=causal,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=q.dtype,
        device=q.device,
        tile=tile,
        **params,
    )
    return fn(q, k, v)


def quality(q, k, v, pattern: "str | Pattern", causal: bool = True, rows=None, **params: Any) -> dict[str, Any]:
    """How far attention under ``pattern`` is from full attention on these q, k, v (shapes as for
    ``attention``; k and v may have fewer heads): the figures a run records for each case, with
    the pattern's own masked attention (the reference masked softmax, no backend) as the output.

    Returns ``full_rel_err`` (||O - O_full||_F / ||O_full||_F over the whole output, O_full dense
    attention with the same causality), ``recall_mean`` and ``recall_min`` (the share of full
    attention's softmax mass on the pattern's keys: the mean over batch, heads and query rows, and
    the least row), ``quality_rows`` (the query rows covered) and ``quality_note`` (None; for a
    pattern whose mask is the model's semantics, such as document or prefix_lm, the figures are
    None and the note says why). A content-selected pattern (moba, quest, topk_keys) is judged on
    the keys it selects from these q and k. Computed in fp32 (float64 inputs in float64), a band of query
    rows at a time, so memory stays small; the time is that of dense attention on the rows.

    ``rows``: None (every query row: exact), an integer R (the first, the last and R seeded
    random query rows, as a run's check samples them), or a sequence of query rows. Every other
    keyword goes to the pattern. Raises ScenarioError for a bad name, parameter, shape or row."""
    import torch

    from sparsebench.patterns.selection import content_selected
    from sparsebench.quality_figures import measure, not_measured, sampled_rows

    batch, _, kv_heads, n, head_dim = _shapes(q, k, v)
    want = (batch, kv_heads, n, head_dim)
    if tuple(k.shape) != want or tuple(v.shape) != want:
        raise ScenarioError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v need q's batch, length and "
            f"head_dim, {want}"
        )
    if not all(t.is_floating_point() and t.device == q.device for t in (q, k, v)):
        raise ScenarioError(
            f"q, k, v must be floating-point tensors on one device; got "
            f"{', '.join(f'{t.dtype} on {t.device}' for t in (q, k, v))}"
        )
    pat = _pattern_of(pattern, params)
    causal = pat.causality(bool(causal))
    pat.check(n, causal)
    why = pat.quality_exempt(causal)
    if why:
        out = not_measured(why)
        del out["full_grad_rel_err"]
        return out
    if rows is None:
        idx = None
    elif isinstance(rows, int) and not isinstance(rows, bool):
        _require_positive("rows", rows)
        idx = sampled_rows(n, rows, 1, q.device)
    else:
        idx = torch.as_tensor(rows).reshape(-1).long().unique()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ScenarioError(f"rows must be query rows in 0..{n - 1} (or a count of rows to sample), got {rows!r}")
    # a content-selected pattern's keys are the selection it makes from these q and k
    attended = pat.select(q, k).mask if content_selected(pat) else (lambda r: pat.rows(r, n, causal))
    figures = measure(q, k, v, causal=causal, attended=attended, rows=idx).fields()
    del figures["full_grad_rel_err"]
    return figures


# ----------------------------------------------------------------------------------------------


def _shapes(q, k, v) -> tuple[int, int, int, int, int]:
    """(batch, heads, kv_heads, n, head_dim) of q (batch, heads, n, head_dim) and k, v (batch,
    kv_heads, n, head_dim), kv_heads dividing heads; one ScenarioError naming the shapes otherwise."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ScenarioError(
            f"q, k, v must be 4-D (batch, heads, n, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    if v.shape[1] != kv_heads or kv_heads < 1 or heads % kv_heads:
        raise ScenarioError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v need the same number of heads, "
            f"one that divides q's {heads} (grouped-query attention: each key/value head serves "
            f"heads / kv_heads query heads)"
        )
    return batch, heads, kv_heads, n, head_dim


def _pattern_of(pattern, params: dict) -> "Pattern":
    from sparsebench.patterns.base import Pattern

    if isinstance(pattern, Pattern):
        if params:
            raise ScenarioError(
                f"pattern {pattern.label()} is already built; give its parameters to sparsebench.pattern(), "
                f"not here ({', '.join(sorted(params))})"
            )
        return pattern
    if not isinstance(pattern, str):
        raise ScenarioError(
            f"pattern must be a name or a sparsebench.pattern(...) object, got {type(pattern).__name__}"
        )
    from sparsebench.patterns.base import PATTERNS

    return PATTERNS.get(pattern).from_params(params)


def _require_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{name} must be a positive integer, got {value!r}")


def _torch_dtype(dtype):
    import torch

    from sparsebench.backends.base import DTYPE_BYTES

    if isinstance(dtype, str):  # "fp32" or torch's own name, "float32"
        dtype = getattr(torch, COMPUTE_DTYPES.get(dtype, dtype), dtype)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPE_BYTES:
        from sparsebench.registry import unknown_choice

        raise ScenarioError(unknown_choice("dtype", str(dtype), COMPUTE_DTYPES))
    return dtype


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return {v: k for k, v in COMPUTE_DTYPES.items()}.get(name, name)


def _on(actual, prepared) -> bool:
    """Whether a tensor on ``actual`` is on the prepared device ("cuda" matches any "cuda:i")."""
    return actual.type == prepared.type and (prepared.index is None or actual.index == prepared.index)
