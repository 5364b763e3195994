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
    """Rows ``offset + m*sm + r*sr`` (m < M, r < R) of every sequence of an (X, n, d) tensor, as
    an (X, M, R, d) view: a block of consecutive rows (sr = 1), overlapping key windows
    (0 < sm < R), one block repeated (sm = 0), or residue classes (sr = D)."""

    M: int
    R: int
    sm: int
    offset: int
    sr: int = 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.as_strided((t.shape[0], self.M, self.R), (t.stride(0), self.sm, self.sr), t.storage_offset() + self.offset)

    def data(self, t: torch.Tensor) -> torch.Tensor:
        d = t.shape[-1]
        return t.as_strided(
            (t.shape[0], self.M, self.R, d),
            (t.stride(0), self.sm * d, self.sr * d, 1),
            t.storage_offset() + self.offset * d,
        )

    def positions(self, length: int) -> torch.Tensor:
        return (self.offset + self.sm * torch.arange(self.M)[:, None] + self.sr * torch.arange(self.R)).flatten()

    def sub(self, m0: int, m1: int) -> "Strided":
        return Strided(m1 - m0, self.R, self.sm, self.offset + m0 * self.sm, self.sr)

    def add_into(self, t: torch.Tensor, g: torch.Tensor) -> None:
        """t[rows] += g, where rows of the view may repeat (overlapping windows, stride 0)."""
        if self.M > 1 and self.sm == 0:
            Strided(1, self.R, 0, self.offset, self.sr).data(t).add_(g.sum(1, keepdim=True))
        elif self.M == 1 or self.sm >= self.R * self.sr or self.sr >= self.M * self.sm:
            self.data(t).add_(g)  # no row twice
        else:  # overlapping windows: add one slab of non-overlapping rows at a time
            step = self.sm // self.sr
            for j in range(0, self.R, step):
                r = min(step, self.R - j)
                Strided(self.M, r, self.sm, self.offset + j * self.sr, self.sr).data(t).add_(g[:, :, j : j + r])


@dataclass(frozen=True, eq=False)
class Gather:
    """Rows ``index`` of every sequence as an (X, M, R, d) copy: M*R positions, or, with
    ``shared``, R positions gathered once and broadcast to all M (stride 0)."""

    index: torch.Tensor
    M: int
    R: int
    shared: bool = False

    def native_index(self) -> torch.Tensor:
        """(M or 1, R) int32 rows, for the native kernel (made once)."""
        idx = self.__dict__.get("_native")
        if idx is None:
            idx = self.index.view(1 if self.shared else self.M, self.R).to(torch.int32).contiguous()
            object.__setattr__(self, "_native", idx)
        return idx

    def _view(self, g: torch.Tensor) -> torch.Tensor:
        X, rest = g.shape[0], g.shape[2:]
        if self.shared:
            return g.view((X, 1, self.R) + rest).expand((X, self.M, self.R) + rest)
        return g.view((X, self.M, self.R) + rest)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return self._view(t.index_select(1, self.index))

    def data(self, t: torch.Tensor) -> torch.Tensor:
        return self._view(t.index_select(1, self.index))

    def positions(self, length: int) -> torch.Tensor:
        return self.index.cpu()

    def sub(self, m0: int, m1: int) -> "Gather":
        if self.shared:
            return Gather(self.index, m1 - m0, self.R, True)
        return Gather(self.index.view(self.M, self.R)[m0:m1].reshape(-1), m1 - m0, self.R)

    def add_into(self, t: torch.Tensor, g: torch.Tensor) -> None:
        if self.shared:
            g = g.sum(1)
        t.index_add_(1, self.index, g.reshape(t.shape[0], -1, t.shape[-1]).to(t.dtype))

    def write(self, t: torch.Tensor, value: torch.Tensor) -> None:
        t.index_copy_(1, self.index, value.reshape(t.shape[0], -1, *t.shape[2:]).to(t.dtype))


View = Strided | Gather
