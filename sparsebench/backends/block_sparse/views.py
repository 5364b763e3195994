"""Views of the (X, n, d) query, key and value tensors (X = batch * heads sequences) as the
(X, windows, length, d) operands of one fused attention call: ``Strided`` rows read in place
through ``as_strided`` (blocks of consecutive rows, overlapping key windows, one block repeated,
residue classes), or ``Gather`` rows copied by index. A plan's calls (``plan.py``) are made of
them; the executor (``execute.py``) reads operands through them and writes results back."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Strided:
    """Rows ``offset + m * window_stride + r * row_stride`` (m < windows, r < length) of every
    sequence of an (X, n, d) tensor, as an (X, windows, length, d) view: a block of consecutive
    rows (row_stride 1), overlapping key windows (0 < window_stride < length), one block repeated
    (window_stride 0), or residue classes (row_stride: the residue band's step)."""

    windows: int
    length: int
    window_stride: int
    offset: int
    row_stride: int = 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The view's rows of an (X, n) tensor (per-row values: log-sum-exps)."""
        return t.as_strided(
            (t.shape[0], self.windows, self.length),
            (t.stride(0), self.window_stride, self.row_stride),
            t.storage_offset() + self.offset,
        )

    def data(self, t: torch.Tensor) -> torch.Tensor:
        """The view's rows of an (X, n, d) tensor (queries, keys, values, outputs, gradients)."""
        d = t.shape[-1]
        return t.as_strided(
            (t.shape[0], self.windows, self.length, d),
            (t.stride(0), self.window_stride * d, self.row_stride * d, 1),
            t.storage_offset() + self.offset * d,
        )

    def positions(self, n: int) -> torch.Tensor:
        """The sequence positions of the view's rows, window by window."""
        windows = self.window_stride * torch.arange(self.windows)[:, None]
        return (self.offset + windows + self.row_stride * torch.arange(self.length)).flatten()

    def sub(self, m0: int, m1: int) -> "Strided":
        """Windows m0..m1-1 only."""
        return Strided(m1 - m0, self.length, self.window_stride, self.offset + m0 * self.window_stride, self.row_stride)

    def add_into(self, t: torch.Tensor, g: torch.Tensor) -> None:
        """t[rows] += g, where rows of the view may repeat (overlapping windows, stride 0)."""
        if self.windows > 1 and self.window_stride == 0:
            Strided(1, self.length, 0, self.offset, self.row_stride).data(t).add_(g.sum(1, keepdim=True))
        elif (
            self.windows == 1
            or self.window_stride >= self.length * self.row_stride
            or self.row_stride >= self.windows * self.window_stride
        ):
            self.data(t).add_(g)  # no row twice
        else:  # overlapping windows: add one slab of non-overlapping rows at a time
            slab = self.window_stride // self.row_stride
            for j in range(0, self.length, slab):
                rows = min(slab, self.length - j)
                offset = self.offset + j * self.row_stride
                slab_rows = Strided(self.windows, rows, self.window_stride, offset, self.row_stride)
                slab_rows.data(t).add_(g[:, :, j : j + rows])


@dataclass(frozen=True, eq=False)
class Gather:
    """Rows ``index`` of every sequence as an (X, windows, length, d) copy: windows * length
    positions, or, with ``shared``, ``length`` positions gathered once and broadcast to all
    windows (stride 0)."""

    index: torch.Tensor
    windows: int
    length: int
    shared: bool = False

    def native_index(self) -> torch.Tensor:
        """(windows or 1, length) int32 rows, for the native kernel (made once)."""
        idx = self.__dict__.get("_native")
        if idx is None:
            idx = self.index.view(1 if self.shared else self.windows, self.length).to(torch.int32).contiguous()
            object.__setattr__(self, "_native", idx)
        return idx

    def _view(self, g: torch.Tensor) -> torch.Tensor:
        X, rest = g.shape[0], g.shape[2:]
        if self.shared:
            return g.view((X, 1, self.length) + rest).expand((X, self.windows, self.length) + rest)
        return g.view((X, self.windows, self.length) + rest)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The gathered rows of an (X, n) tensor (per-row values: log-sum-exps)."""
        return self._view(t.index_select(1, self.index))

    def data(self, t: torch.Tensor) -> torch.Tensor:
        """The gathered rows of an (X, n, d) tensor."""
        return self._view(t.index_select(1, self.index))

    def positions(self, n: int) -> torch.Tensor:
        """The sequence positions of the rows, window by window."""
        return self.index.cpu()

    def sub(self, m0: int, m1: int) -> "Gather":
        """Windows m0..m1-1 only."""
        if self.shared:
            return Gather(self.index, m1 - m0, self.length, True)
        return Gather(self.index.view(self.windows, self.length)[m0:m1].reshape(-1), m1 - m0, self.length)

    def add_into(self, t: torch.Tensor, g: torch.Tensor) -> None:
        """t[rows] += g (rows that repeat add up)."""
        if self.shared:
            g = g.sum(1)
        t.index_add_(1, self.index, g.reshape(t.shape[0], -1, t.shape[-1]).to(t.dtype))

    def write(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """t[rows] = value."""
        t.index_copy_(1, self.index, value.reshape(t.shape[0], -1, *t.shape[2:]).to(t.dtype))


# The operand of a call: its query rows, or its key (and value) rows.
View = Strided | Gather
