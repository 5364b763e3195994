"""``kind: synthetic``: seeded q, k and v whose attention has the structure of a trained model's.

On i.i.d. normal q and k attention is nearly uniform, and every pattern's recall of full
attention is about its density. Trained models' attention is concentrated: a few first tokens
draw a large share of it (attention sinks, StreamingLLM), rotary embeddings make scores decay
with distance (locality), a few keys anywhere draw attention from most queries (heavy hitters,
H2O), and heads differ. This generator builds those four properties into q and k directly, in
O(n d) per head (no n x n product), and every strength is in logit units: what it adds to
q . k / sqrt(d) (the score softmax sees).

- content: q and k start as independent normals of variance ``noise`` per coordinate (a score
  spread of ``noise``), v as standard normals;
- locality: q and k of a head share a direction u (the same at every position), added before
  rotary embeddings (base ``theta``, the rotate-half layout of Llama); after rotation the score
  of query i and key j gains ``locality`` x sum_p w_p cos((i - j) theta_p), largest at i = j and
  decaying with distance. u's energy lies in the rotary frequencies around 1 / span, where each
  KV head draws its span log-uniformly within a factor of 4 of ``locality_span`` (tokens);
- sinks: the first ``sinks`` keys gain a component along a direction m that every query of the
  head shares (added after rotation, so it holds at every distance): each query's score of a
  sink gains ``sink_strength``;
- heavy hitters: a share ``heavy_hitters`` of the other positions, drawn per KV head, gain
  ``heavy_strength`` the same way;
- per-head variety: each query head multiplies each of the three strengths by its own
  exp(U(-head_spread, head_spread)).

Grouped-query attention keeps the model's structure: the directions and the heavy-hitter
positions belong to a KV head, shared by its query heads; the strengths vary by query head.

Calibration. The defaults were set against published measurements of trained models;
``python -m sparsebench.inputs.calibration`` measures the generator (8 heads, head_dim 64,
n = 4096, seeds 0-2; means over 32 query rows from position 256 on and over the heads), and the
README gives both side by side:

- StreamingLLM (Xiao et al., ICLR 2024, fig. 12, appendix F): in Llama-2-7B on 4096-token
  sequences the first token takes 0.6-0.9 of the attention in most layers above the bottom two
  (read from the figure). The generator's default: 0.655 on the first token, its heads from
  0.12 to 0.99 (``sink_strength`` 14, ``head_spread`` 0.4).
- H2O (Zhang et al., NeurIPS 2023, sec. 3.1): the attention matrices of pre-trained OPT models
  are over 95% sparse in almost every layer, an entry counted sparse when it is below 1% of its
  row's largest. The generator's default: 98.9%.
- StreamingLLM, table 2: Llama-2-7B needs about four initial tokens kept (perplexity 11.88 with
  one, 9.59 with four, 9.54 with eight): its sink is spread over the first few tokens. Not
  matched: the default puts the sink on the first token only (``sinks`` 1); a perplexity is not
  a share of attention this generator can be held to.
- Locality and heavy hitters: this project found no published share of attention mass for a
  given window or token budget (Quest and MInference report accuracy at a budget, not the mass
  it covers). At the defaults a window of the last 256 keys holds 0.20 of the mass (0.86 with
  the first four keys), and a query's top 2% of keys 0.93; given as measured, not as matched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Knobs:
    """The generator's knobs (``kind: synthetic`` in a scenario takes each as a key)."""

    #: rotary base (Llama 2: 10000; Llama 3: 500000)
    theta: float = 10000.0
    #: spread of the content part of the scores (their standard deviation, in logits)
    noise: float = 1.0
    #: the locality bonus at distance 0 (logits), decaying with distance through the rotary frequencies
    locality: float = 6.0
    #: tokens: the distance scale the shared locality direction lives at (per KV head within 4x of it)
    locality_span: float = 48.0
    #: how many first keys are sinks
    sinks: int = 1
    #: what every query's score of a sink gains (logits)
    sink_strength: float = 12.0
    #: share of the other positions that are heavy hitters (drawn per KV head)
    heavy_hitters: float = 0.003
    #: what every query's score of a heavy hitter gains (logits)
    heavy_strength: float = 4.0
    #: per query head, each strength times exp(U(-head_spread, head_spread))
    head_spread: float = 0.4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"knob {f.name} must be a finite number, got {value!r}")
        if self.theta <= 1:
            raise ValueError(f"knob theta must be above 1 (a rotary base), got {self.theta!r}")
        if self.locality_span <= 0:
            raise ValueError(f"knob locality_span must be positive (tokens), got {self.locality_span!r}")
        if self.noise < 0 or self.head_spread < 0:
            raise ValueError("knobs noise and head_spread must be >= 0")
        if self.sinks < 0 or int(self.sinks) != self.sinks:
            raise ValueError(f"knob sinks must be a whole number >= 0, got {self.sinks!r}")
        if not 0 <= self.heavy_hitters <= 1:
            raise ValueError(f"knob heavy_hitters is a share of the positions, 0..1, got {self.heavy_hitters!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def changed(self) -> dict[str, float]:
        """The knobs that differ from their defaults."""
        default = Knobs()
        return {n: getattr(self, n) for n in self.names() if getattr(self, n) != getattr(default, n)}


CHUNK = 1 << 16  # positions generated at a time: what the generator holds beside its output


def rotary(x, theta: float, start: int = 0):
    """Rotary embeddings as Llama applies them (rotate-half layout): position start + i of ``x``
    (..., n, d) rotated by angles (start + i) * theta^(-2p/d) in the plane of coordinates
    (p, p + d/2); an odd last coordinate is left as it is."""
    return _rotate(x, *_angles(start, start + x.shape[-2], x.shape[-1], theta))


def _angles(start: int, stop: int, d: int, theta: float):
    """cos and sin (stop - start, d // 2) of the rotary angles of positions start..stop-1."""
    import torch

    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.arange(start, stop, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = x.clone()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half : 2 * half] = x2 * cos + x1 * sin
    return out


def generate(
    knobs: Knobs,
    *,
    seed: int,
    batch: int,
    heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype=None,
    device=None,
):
    """q (batch, heads, n, d), k and v (batch, kv_heads, n, d) in ``dtype`` on ``device`` (see the
    module's docstring for what each knob builds in). A bonus b in logits is split evenly
    between q and k: each gets sqrt(b sqrt(d)) along the shared unit direction, so that
    q . k / sqrt(d) gains b. Built a head and ``CHUNK`` positions at a time in fp32 on the CPU,
    so that the generator holds little beside its output: O(n d) work per head, no n x n."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d, group = seq_len, head_dim, heads // kv_heads
    dtype = dtype if dtype is not None else torch.float32

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def share(bonus: float) -> float:
        return math.sqrt(max(bonus, 0.0) * math.sqrt(d))

    # what the heads draw first, all small: each query head's factor on each of the three
    # strengths; per KV head the locality direction (its energy in the rotary frequencies
    # around 1 / span), the sink and heavy-hitter directions and the heavy hitters' positions
    f_local, f_sink, f_heavy = torch.exp((torch.rand((3, heads), generator=g) * 2 - 1) * knobs.head_spread).tolist()
    half = d // 2
    inv_freq = knobs.theta ** (-torch.arange(0, half, dtype=torch.float64) * 2 / d)
    spread = torch.rand(kv_heads, generator=g, dtype=torch.float64) * 2 - 1
    span = knobs.locality_span * torch.exp(spread * math.log(4))  # per KV head, within 4x
    weight = torch.exp(-0.5 * torch.log(inv_freq[None, :] * span[:, None]) ** 2)  # (kv_heads, half)
    phase = torch.rand((kv_heads, half), generator=g, dtype=torch.float64) * 2 * math.pi
    u = torch.zeros(kv_heads, d, dtype=torch.float64)
    u[:, :half], u[:, half : 2 * half] = weight.sqrt() * phase.cos(), weight.sqrt() * phase.sin()
    u = unit(u).float()
    m_sink, m_heavy = unit(torch.randn((2, kv_heads, d), generator=g))
    m_heavy = unit(m_heavy - (m_heavy * m_sink).sum(-1, keepdim=True) * m_sink)  # orthogonal to m_sink
    sinks = min(int(knobs.sinks), n)
    count = int(round(knobs.heavy_hitters * (n - sinks)))
    heavy = [torch.randperm(n - sinks, generator=g)[:count] + sinks for _ in range(kv_heads)]
    a = share(knobs.locality)
    s = share(knobs.sink_strength) if sinks else 0.0
    h = share(knobs.heavy_strength) if count else 0.0
    sd = math.sqrt(knobs.noise)

    q = torch.empty((batch, heads, n, d), dtype=dtype, device=device)
    k = torch.empty((batch, kv_heads, n, d), dtype=dtype, device=device)
    v = torch.empty((batch, kv_heads, n, d), dtype=dtype, device=device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        cos, sin = _angles(start, stop, d, knobs.theta)
        pos = torch.arange(start, stop)
        for kh in range(kv_heads):
            part = _rotate(torch.randn((batch, stop - start, d), generator=g) * sd + a * u[kh], cos, sin)
            # no key but the sinks and heavy hitters lies along their directions: a query's share of
            # them would otherwise favour some ordinary keys over others
            for m in (m_sink[kh], m_heavy[kh]):
                part -= (part @ m)[..., None] * m
            part += (pos < sinks).float()[None, :, None] * s * m_sink[kh]
            is_heavy = torch.zeros(stop - start, dtype=torch.bool)
            is_heavy[heavy[kh][(heavy[kh] >= start) & (heavy[kh] < stop)] - start] = True
            part += is_heavy.float()[None, :, None] * h * m_heavy[kh]
            k[:, kh, start:stop] = part.to(device=device, dtype=dtype)
            v[:, kh, start:stop] = torch.randn((batch, stop - start, d), generator=g).to(device=device, dtype=dtype)
        for qh in range(heads):
            kh = qh // group
            part = torch.randn((batch, stop - start, d), generator=g) * sd + a * f_local[qh] * u[kh]
            part = _rotate(part, cos, sin) + s * f_sink[qh] * m_sink[kh] + h * f_heavy[qh] * m_heavy[kh]
            q[:, qh, start:stop] = part.to(device=device, dtype=dtype)
    return q, k, v
