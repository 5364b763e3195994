"""PyTorch FlexAttention with a BlockMask, under torch.compile (CPU needs a C++ compiler).

The BlockMask is made from the pattern's own block layout (``Pattern.block_layout``: its
non-empty tiles, and which of them are full) with ``BlockMask.from_kv_blocks``, so no n x n mask
is ever evaluated and nothing is compiled for it (``create_block_mask`` evaluates the mask at
every one of the n^2 pairs, and compiled it adds a compilation per sequence length). Partial
tiles apply the pattern's
``mask_fn`` as the mask_mod. Building it is setup (recorded as setup_s); the first compiled call
is recorded as compile_s, apart from the steady state. Grouped-query inputs (k and v with fewer
heads than q) run with ``enable_gqa=True``: no repeated k and v."""

from __future__ import annotations

import shutil

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem
from sparsebench.patterns.selection import content_selected

FLEX_BLOCK = 128


def _kv_blocks(rows: torch.Tensor, cols: torch.Tensor, nb: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's (kv_num_blocks (1, 1, nb), kv_indices (1, 1, nb, nb)) int32 for the tiles
    (rows[i], cols[i]), listed row by row."""
    num = torch.bincount(rows, minlength=nb)
    start = torch.cumsum(num, 0) - num
    idx = torch.zeros(nb, nb, dtype=torch.int32)
    idx[rows, torch.arange(rows.numel()) - start[rows]] = cols.to(torch.int32)
    return num.to(torch.int32)[None, None].to(device), idx[None, None].to(device)


def block_mask_from_layout(layout, mask_mod, device):
    """A BlockMask with the layout's tiles: full tiles without the mask_mod, the others with it.
    A short last block is never counted full (FlexAttention pads it)."""
    from torch.nn.attention.flex_attention import BlockMask

    nb, rows, cols = layout.num_blocks, layout.row_of_tiles(), layout.col
    full = layout.full & ~layout.at_short_end()
    part_num, part_idx = _kv_blocks(rows[~full], cols[~full], nb, device)
    full_num, full_idx = _kv_blocks(rows[full], cols[full], nb, device)
    return BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=layout.block, mask_mod=mask_mod,
        seq_lengths=(layout.n, layout.n),
    )  # fmt: skip


@BACKENDS.register
class Flex(Backend):
    name = "flex"
    summary = "FlexAttention + BlockMask (from the block layout) under torch.compile"
    sparse = True
    compiled = True

    @classmethod
    def unavailable(cls, device=None):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the torch build
            return f"torch {torch.__version__} has no FlexAttention ({exc})"
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu" and not (shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")):
            return "FlexAttention on CPU needs torch.compile and a C++ compiler (none on PATH)"
        if dev.type == "mps":
            return "FlexAttention does not run on MPS"
        return None

    def unsupported(self, p: Problem):
        if content_selected(p.pattern) and p.pattern.unit == 1:
            return (
                f"flex: {p.pattern.name} selects single keys; a mask_mod reading its selection would need an "
                "n x n table (sparsebench builds none)"
            )
        if p.dtype == torch.float16 and p.device.type == "cpu":
            return "FlexAttention on CPU does not support fp16"
        if p.mode == "backward" and p.device.type == "cpu":
            return "FlexAttention has no backward pass on CPU"
        return super().unsupported(p)

    @classmethod
    def load(cls, device):
        """torch.compile's modules (dynamo, inductor, BlockMask), a hundred MiB or more of
        resident memory: prepared once on a tiny problem, not called (the first call of each
        case compiles, its compile_s)."""
        import importlib

        from sparsebench.patterns.base import PATTERNS

        tiny = Problem(PATTERNS.get("dense")(), FLEX_BLOCK, True, 1, 1, 16, torch.float32, torch.device(device))
        cls().prepare(tiny)
        importlib.import_module("torch._inductor.compile_fx")  # what the first call imports to compile

    def prepare(self, p: Problem):
        from torch.nn.attention.flex_attention import flex_attention

        # A worker runs many cases: past dynamo's recompile limit torch.compile would silently
        # fall back to eager flex_attention, which materialises the full score matrix (slow,
        # and out of memory at long lengths). Each case compiles afresh instead.
        torch._dynamo.reset()
        n = p.seq_len
        if content_selected(p.pattern):
            return _selecting(p, torch.compile(flex_attention, dynamic=False, fullgraph=True))
        allowed = p.pattern.mask_fn(n, p.causal, p.device)

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(q_idx, kv_idx)

        layout = p.pattern.block_layout(n, FLEX_BLOCK, p.causal)
        block_mask = block_mask_from_layout(layout, mask_mod, p.device)
        # fullgraph: a mask_mod that does not trace whole (a graph break) would run flex_attention
        # eagerly, n x n scores and all; an error says so instead
        compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        name = p.pattern.name
        # grouped-query inputs: the kernel reads key/value head h // group for query head h
        gqa = {"enable_gqa": True} if p.group > 1 else {}

        def call(q, k, v):
            try:
                return compiled(q, k, v, block_mask=block_mask, **gqa)
            except Exception as exc:  # noqa: BLE001 - what torch.compile raises varies
                if not any(kind in type(exc).__name__ for kind in ("Unsupported", "Inductor", "Backend")):
                    raise
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RuntimeError(
                    f"flex: the {name} pattern's mask_mod does not compile whole under torch.compile "
                    f"(eager FlexAttention would compute all n x n scores): {type(exc).__name__}: {why}"
                ) from exc

        return call

    def estimate_bytes(self, p: Problem) -> int:
        """q, k, v and the output, and the BlockMask's index tables (nb x nb int32, partial and
        full, by rows and by columns). The compiled CPU kernel works tile by tile (no n x n
        scores); the compilation's scratch and the compiler's resident memory are kept out of
        the peak (harness: Backend.load, PeakMemory.one_time). A content-selected pattern: the
        tables per batch and head, its selection, the (padded) per-query unit table the mask_mod
        reads and the tile table made from the selection (int64 indices of every slot)."""
        nb = -(-p.seq_len // FLEX_BLOCK)
        io = p.io_bytes * (3 if p.mode == "backward" else 1)
        if not content_selected(p.pattern):
            return io + 4 * nb * nb * 4
        bh, unit = p.batch * p.heads, p.pattern.unit
        rows = nb * FLEX_BLOCK
        units = -(-rows // unit) + 1
        slots = p.pattern.slots(p.seq_len)
        return (
            io
            + bh * 6 * nb * nb * 4
            + p.pattern.select_bytes(p.batch, p.heads, p.seq_len, p.head_dim, p.elem_bytes)
            + bh * rows * units
            + bh * nb * (nb + 1)
            + 3 * 8 * bh * p.seq_len * slots
        )


def _touched_blocks(selection, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's (kv_num_blocks (batch, heads, nb), kv_indices (batch, heads, nb, nb))
    int32: per block of FLEX_BLOCK queries, the key blocks that any of its queries' selected
    units touch (up to the query's own block), ascending."""
    u = selection.index.long()
    b, h, n, _ = u.shape
    unit = selection.unit
    qb = (torch.arange(n, device=u.device) // FLEX_BLOCK)[:, None]
    touched = torch.zeros(b, h, nb, nb + 1, dtype=torch.bool, device=u.device)
    bi = torch.arange(b, device=u.device)[:, None, None, None]
    hi = torch.arange(h, device=u.device)[None, :, None, None]
    first = (u * unit) // FLEX_BLOCK
    for step in range(-(-unit // FLEX_BLOCK) + 1):  # the key blocks a unit spans
        blk = first + step
        ok = (u >= 0) & (blk * FLEX_BLOCK < (u + 1) * unit) & (blk <= qb)
        touched[bi, hi, qb, torch.where(ok, blk, nb)] = True
    touched = touched[..., :nb]
    num = touched.sum(-1, dtype=torch.int32)
    col = torch.arange(nb, device=u.device)
    order = torch.where(touched, col, nb + col).argsort(dim=-1)
    return num, order.to(torch.int32)


def _selecting(p: Problem, compiled):
    """The call of a content-selected pattern (moba, quest): select, then a BlockMask made from
    the selection (``_touched_blocks``) whose mask_mod reads a per-query table of the selected
    units, (batch, heads, n, n / unit) bool, filled in place each call (no n x n tensor)."""
    from torch.nn.attention.flex_attention import BlockMask

    from sparsebench.patterns.selection import selecting_call

    n, unit = p.seq_len, p.pattern.unit
    nb = -(-n // FLEX_BLOCK)
    rows = nb * FLEX_BLOCK  # padded: the kernel may read the last block's padding rows
    table = torch.zeros(p.batch, p.heads, rows, -(-rows // unit) + 1, dtype=torch.bool, device=p.device)

    def mask_mod(b, h, q_idx, kv_idx):  # column 0: padding of the index table
        return table[b, h, q_idx, kv_idx // unit + 1] & (kv_idx <= q_idx)

    gqa = {"enable_gqa": True} if p.group > 1 else {}

    def attend(q, k, v, selection):
        table.zero_()
        table[:, :, :n].scatter_(-1, selection.index.long() + 1, True)
        num, idx = _touched_blocks(selection, nb)
        block_mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(n, n))
        return compiled(q, k, v, block_mask=block_mask, **gqa)

    return selecting_call(p.pattern, attend)
