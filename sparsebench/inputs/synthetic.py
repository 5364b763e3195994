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

Calibration. The defaults were set against published measurements of trained models
(``python -m sparsebench.inputs.calibration`` measures the generator at the defaults; the
README's table gives both, and says where a figure could not be matched):

- H2O (Zhang et al., NeurIPS 2023, sec. 3.1): in pre-trained OPT models the attention matrices
  are over 95% sparse in almost every layer, an entry counted sparse when it is below 1% of its
  row's largest;
- StreamingLLM (Xiao et al., ICLR 2024, fig. 2): in Llama-2-7B the first token draws a large
  share of every query's attention in all layers but the bottom two; a window of recent keys
  with the first four tokens kept recovers full attention's perplexity where the window alone
  fails;
- Quest (Tang et al., ICML 2024) and MInference (Jiang et al., NeurIPS 2024): a small share of
  the keys (top-k tokens or pages, a few percent of the context) carries nearly all of a query's
  attention in long-context Llama models.
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
    locality: float = 5.0
    #: tokens: the distance scale the shared locality direction lives at (per KV head within 4x of it)
    locality_span: float = 48.0
    #: how many first keys are sinks
    sinks: int = 1
    #: what every query's score of a sink gains (logits)
    sink_strength: float = 7.5
    #: share of the other positions that are heavy hitters (drawn per KV head)
    heavy_hitters: float = 0.003
    #: what every query's score of a heavy hitter gains (logits)
    heavy_strength: float = 4.0
    #: per query head, each strength times exp(U(-head_spread, head_spread))
    head_spread: float = 0.5

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


def rotary(x, theta: float):
    """Rotary embeddings as Llama applies them (rotate-half layout): position i of ``x``
    (..., n, d) rotated by angles i * theta^(-2p/d) in the plane of coordinates (p, p + d/2)."""
    import torch

    n, d = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    half = d // 2
    rotated = torch.cat([-x[..., half : 2 * half], x[..., :half], x[..., 2 * half :]], dim=-1)
    if d % 2:  # an odd last coordinate is not rotated
        cos, sin = torch.cat([cos, torch.ones(n, 1)], -1), torch.cat([sin, torch.zeros(n, 1)], -1)
    return x * cos + rotated * sin


def generate(knobs: Knobs, *, seed: int, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int):
    """q (batch, heads, n, d), k and v (batch, kv_heads, n, d), fp32 on the CPU (see the module's
    docstring for what each knob builds in). A bonus b in logits is split evenly between q and k:
    each gets sqrt(b sqrt(d)) along the shared unit direction, so q . k / sqrt(d) gains b."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d, group = seq_len, head_dim, heads // kv_heads
    sd = math.sqrt(knobs.noise)
    q = torch.randn((batch, heads, n, d), generator=g) * sd
    k = torch.randn((batch, kv_heads, n, d), generator=g) * sd
    v = torch.randn((batch, kv_heads, n, d), generator=g)
    kv_of = torch.arange(heads) // group  # query head h reads KV head h // group

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def share(bonus: float) -> float:
        return math.sqrt(max(bonus, 0.0) * math.sqrt(d))

    # each query head's factor on each of the three strengths
    f_local, f_sink, f_heavy = torch.exp((torch.rand((3, heads), generator=g) * 2 - 1) * knobs.head_spread)
    # locality: a direction per KV head, its energy in the rotary frequencies around 1 / span
    half = d // 2
    inv_freq = knobs.theta ** (-torch.arange(0, half, dtype=torch.float64) * 2 / d)
    span = knobs.locality_span * torch.exp((torch.rand(kv_heads, generator=g, dtype=torch.float64) * 2 - 1) * math.log(4))
    weight = torch.exp(-0.5 * torch.log(inv_freq[None, :] * span[:, None]) ** 2)  # (kv_heads, half)
    phase = torch.rand((kv_heads, half), generator=g, dtype=torch.float64) * 2 * math.pi
    u = torch.zeros(kv_heads, d, dtype=torch.float64)
    u[:, :half], u[:, half : 2 * half] = weight.sqrt() * phase.cos(), weight.sqrt() * phase.sin()
    u = unit(u).float()
    a = share(knobs.locality)
    q = q + (a * f_local)[None, :, None, None] * u[kv_of][None, :, None, :]
    k = k + a * u[None, :, None, :]
    q, k = rotary(q, knobs.theta), rotary(k, knobs.theta)
    # sinks and heavy hitters: directions every query of a KV head's group shares, added after
    # rotation (so the bonus holds at every distance); their keys lie along them
    m_sink, m_heavy = unit(torch.randn((2, kv_heads, d), generator=g))
    s, h = share(knobs.sink_strength), share(knobs.heavy_strength)
    q = q + (s * f_sink)[None, :, None, None] * m_sink[kv_of][None, :, None, :]
    q = q + (h * f_heavy)[None, :, None, None] * m_heavy[kv_of][None, :, None, :]
    sinks = min(int(knobs.sinks), n)
    rest = n - sinks
    count = int(round(knobs.heavy_hitters * rest))
    for kh in range(kv_heads):
        k[:, kh, :sinks] += s * m_sink[kh]
        if count:
            k[:, kh, torch.randperm(rest, generator=g)[:count] + sinks] += h * m_heavy[kh]
    return q, k, v
