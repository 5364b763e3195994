// The native CPU kernels of sparsebench (see sparsebench/backends/block_sparse/native/__init__.py, which
// builds this file and allocator.cpp into one extension with torch.utils.cpp_extension.load on first
// use and caches the build). The module's functions are bound at the end of this file.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

// q, k, v: (G, n, d) contiguous fp32. idx: (rows, R) int32 key indices of queries row0..row0+rows-1
// (-1: unused slot). Returns out (G, rows, d) (out_in when given) and lse (G, rows): -inf for rows
// without a key.
// Work runs head by head (one head's K and V stay in cache) and the next query's key rows are
// prefetched while the current one is computed: the loop is bound by reading rows, not by FLOPs.
std::vector<torch::Tensor> table_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor idx, int64_t row0, double scale, torch::Tensor out_in) {
  const int64_t G = q.size(0), n = q.size(1), d = q.size(2);
  const int64_t rows = idx.size(0), R = idx.size(1);
  // out_in: a (G, rows, d) view to write into (unit last stride), or empty to allocate
  auto out = out_in.numel() ? out_in : torch::empty({G, rows, d}, q.options());
  TORCH_CHECK(out.stride(2) == 1, "table_forward: out needs a unit last stride");
  const int64_t osG = out.stride(0), osR = out.stride(1);
  auto lse = torch::empty({G, rows}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const int32_t* I = idx.data_ptr<int32_t>();
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const float NEG = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows * G, 64, [&](int64_t b, int64_t e) {
    std::vector<float> s(R);
    for (int64_t t = b; t < e; ++t) {
      const int64_t g = t / rows, i = t % rows;
      const int32_t* row = I + i * R;
      const float* qi = Q + (g * n + row0 + i) * d;
      const float* Kg = K + g * n * d;
      const float* Vg = V + g * n * d;
      if (i + 1 < rows) {
        const int32_t* next = row + R;
        for (int64_t r = 0; r < R; ++r) {
          if (next[r] < 0) continue;
          const char* p = reinterpret_cast<const char*>(Kg + static_cast<int64_t>(next[r]) * d);
          for (int64_t c = 0; c < d * 4; c += 64) __builtin_prefetch(p + c);
        }
      }
      float mx = NEG;
      for (int64_t r = 0; r < R; ++r) {
        const int32_t j = row[r];
        if (j < 0) { s[r] = NEG; continue; }
        const float* kj = Kg + static_cast<int64_t>(j) * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) acc += qi[c] * kj[c];
        s[r] = acc * sc;
        mx = s[r] > mx ? s[r] : mx;
      }
      float* oi = O + g * osG + i * osR;
      for (int64_t c = 0; c < d; ++c) oi[c] = 0.f;
      if (mx == NEG) { L[g * rows + i] = NEG; continue; }
      float sum = 0.f;
      for (int64_t r = 0; r < R; ++r) {
        if (s[r] == NEG) continue;
        const float p = std::exp(s[r] - mx);
        sum += p;
        const float* vj = Vg + static_cast<int64_t>(row[r]) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) oi[c] += p * vj[c];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) oi[c] *= inv;
      L[g * rows + i] = mx + std::log(sum);
    }
  });
  return {out, lse};
}

// Adds this call's gradients into dq, dk, dv (G, n, d) fp32. go: (G, rows, d) output gradient
// (already scaled by the call's share when calls were merged), o: (G, rows, d) merged output,
// lse: (G, rows) this call's log-sum-exp. Heads run in parallel (keys repeat across queries).
void table_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx, int64_t row0,
                    double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                    torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  const int64_t G = q.size(0), n = q.size(1), d = q.size(2);
  const int64_t rows = idx.size(0), R = idx.size(1);
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const int32_t* I = idx.data_ptr<int32_t>();
  const float* GO = go.data_ptr<float>();
  const float* O = o.data_ptr<float>();
  const float* L = lse.data_ptr<float>();
  float* DQ = dq.data_ptr<float>();
  float* DK = dk.data_ptr<float>();
  float* DV = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, G, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      for (int64_t i = 0; i < rows; ++i) {
        const float li = L[g * rows + i];
        if (!std::isfinite(li)) continue;
        const int32_t* row = I + i * R;
        const float* qi = Q + (g * n + row0 + i) * d;
        const float* gi = GO + (g * rows + i) * d;
        const float* oi = O + (g * rows + i) * d;
        float* dqi = DQ + (g * n + row0 + i) * d;
        float D = 0.f;
#pragma omp simd reduction(+ : D)
        for (int64_t c = 0; c < d; ++c) D += gi[c] * oi[c];
        for (int64_t r = 0; r < R; ++r) {
          const int32_t j = row[r];
          if (j < 0) continue;
          const float* kj = K + (g * n + j) * d;
          const float* vj = V + (g * n + j) * d;
          float s = 0.f, dp = 0.f;
#pragma omp simd reduction(+ : s, dp)
          for (int64_t c = 0; c < d; ++c) { s += qi[c] * kj[c]; dp += gi[c] * vj[c]; }
          const float p = std::exp(s * sc - li);
          const float ds = p * (dp - D) * sc;
          float* dkj = DK + (g * n + j) * d;
          float* dvj = DV + (g * n + j) * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) {
            dqi[c] += ds * kj[c];
            dkj[c] += ds * qi[c];
            dvj[c] += p * gi[c];
          }
        }
      }
    }
  });
}

// Chunk bounds of per-sequence key tables (table_forward_selected's input): idx (G, n, R) int32,
// each row's keys ascending then -1 padding; returns (G, n, chunks + 1) int32, where each row's
// keys of chunk c (keys c * chunk .. (c + 1) * chunk - 1, chunks = ceil(keys / chunk)) begin, the
// last entry the row's number of keys. Binary searches per row: a few hundred steps, not R.
torch::Tensor table_bounds(torch::Tensor idx, int64_t keys, int64_t chunk) {
  TORCH_CHECK(idx.dim() == 3 && idx.is_contiguous() && idx.scalar_type() == torch::kInt32 && chunk >= 1,
              "table_bounds: idx (G, n, R) contiguous int32");
  const int64_t G = idx.size(0), n = idx.size(1), R = idx.size(2), nch = (keys + chunk - 1) / chunk;
  auto out = torch::empty({G, n, nch + 1}, idx.options());
  const int32_t* I = idx.data_ptr<int32_t>();
  int32_t* O = out.data_ptr<int32_t>();
  at::parallel_for(0, G * n, 1024, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int32_t* row = I + r * R;
      // valid keys: the prefix before the first -1 (non-negative, then negative: monotone)
      const int32_t* end = std::partition_point(row, row + R, [](int32_t x) { return x >= 0; });
      int32_t* o = O + r * (nch + 1);
      for (int64_t c = 0; c < nch; ++c)
        o[c] = static_cast<int32_t>(std::lower_bound(row, end, static_cast<int32_t>(std::min(keys, c * chunk))) - row);
      o[nch] = static_cast<int32_t>(end - row);
    }
  });
  return out;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#include <algorithm>

namespace {

// e^x for AVX-512: 2^n * e^r, |r| <= ln2/2, degree-6 polynomial (relative error ~2e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr int RB = 8;   // query rows per register block
constexpr int KT = 32;  // keys per packed tile (two zmm)

// s[r][0..31] = sum_c q[r][c] * kt[c][0..31]: q is RB x d, kt one packed tile (d x 32).
inline void qk_tile(const float* __restrict q, const float* __restrict kt, int64_t d, float* __restrict s, int64_t lds) {
  __m512 a0[RB], a1[RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  for (int64_t c = 0; c < d; ++c) {
    const __m512 k0 = _mm512_loadu_ps(kt + c * KT);
    const __m512 k1 = _mm512_loadu_ps(kt + c * KT + 16);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * d + c]);
      a0[r] = _mm512_fmadd_ps(qb, k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(qb, k1, a1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    _mm512_storeu_ps(s + r * lds, a0[r]);
    _mm512_storeu_ps(s + r * lds + 16, a1[r]);
  }
}

// Rows r < RB of s (lds apart, nj columns; column j is window column j0 + j): scale by sc, mask
// columns outside [lo[r], hi[r]] to -inf, and replace each row by exp(s - max). Writes the row
// max and the sum of the exponentials (rows without a key: max -inf, sum 0, all zeros).
inline void softmax_rows(float* s, int64_t lds, int64_t nj, int64_t j0, const int32_t* lo, const int32_t* hi,
                         float sc, float* mx, float* sum) {
  const float NEG = -std::numeric_limits<float>::infinity();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 vneg = _mm512_set1_ps(NEG), vsc = _mm512_set1_ps(sc);
  for (int r = 0; r < RB; ++r) {
    float* srow = s + r * lds;
    const __m512i av = _mm512_set1_epi32(lo[r]), bv = _mm512_set1_epi32(hi[r]);
    __m512 vmax = vneg;
    for (int64_t j = 0; j < nj; j += 16) {
      const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0 + j)), iota);
      const __mmask16 ok = _mm512_cmpge_epi32_mask(jv, av) & _mm512_cmple_epi32_mask(jv, bv);
      const __m512 sv = _mm512_mask_mul_ps(vneg, ok, _mm512_loadu_ps(srow + j), vsc);
      _mm512_storeu_ps(srow + j, sv);
      vmax = _mm512_max_ps(vmax, sv);
    }
    mx[r] = _mm512_reduce_max_ps(vmax);
    __m512 vs = _mm512_setzero_ps();
    if (mx[r] == NEG) {
      for (int64_t j = 0; j < nj; j += 16) _mm512_storeu_ps(srow + j, _mm512_setzero_ps());
    } else {
      const __m512 mv = _mm512_set1_ps(mx[r]);
      for (int64_t j = 0; j < nj; j += 16) {
        const __m512 sv = _mm512_loadu_ps(srow + j);
        const __mmask16 fin = _mm512_cmp_ps_mask(sv, vneg, _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(fin, exp512(_mm512_sub_ps(sv, mv)));
        _mm512_storeu_ps(srow + j, e);
        vs = _mm512_add_ps(vs, e);
      }
    }
    sum[r] = _mm512_reduce_add_ps(vs);
  }
}

// Key or value rows of a window: row j at base + j * ld (a view of K or V), or at ptr[j]
// (gathered rows); elements fp32, or bf16 / fp16 widened to fp32 as they are loaded.
template <class T>
struct StridedRowsT {
  const T* base;
  int64_t ld;
  const T* operator[](int64_t j) const { return base + j * ld; }
};
template <class T>
struct GatheredRowsT {
  const T* const* ptr;
  const T* operator[](int64_t j) const { return ptr[j]; }
};
using StridedRows = StridedRowsT<float>;
using GatheredRows = GatheredRowsT<float>;

// 16 consecutive elements as fp32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16: the high half of an fp32
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// o[r][c0..c0+31] = sum_j p[r][j] * v[j0 + j][c0..c0+31] for RB rows, j < nj.
template <class Rows>
inline void pv_block(const float* __restrict p, int64_t ldp, Rows v, int64_t j0, int64_t nj, int64_t c0,
                     float* __restrict o, int64_t d) {
  __m512 a0[RB], a1[RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  for (int64_t j = 0; j < nj; ++j) {
    const auto* vj = v[j0 + j];
    const __m512 v0 = load16(vj + c0);
    const __m512 v1 = load16(vj + c0 + 16);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * ldp + j]);
      a0[r] = _mm512_fmadd_ps(pb, v0, a0[r]);
      a1[r] = _mm512_fmadd_ps(pb, v1, a1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    _mm512_storeu_ps(o + r * d + c0, a0[r]);
    _mm512_storeu_ps(o + r * d + c0 + 16, a1[r]);
  }
}

// dst[c * 32 + j] = src[j][c] for j < rows (zero rows past it), c < d: one packed tile from up
// to 32 key rows, 16 x 16 blocks transposed in registers.
template <class Rows>
inline void pack_tile(Rows src, int64_t rows, int64_t d, float* __restrict dst) {
  for (int half = 0; half < 2; ++half) {
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t row = half * 16 + j;
        r[j] = row < rows ? load16(src[row] + c0) : _mm512_setzero_ps();
      }
      __m512 t[16];
      for (int j = 0; j < 8; ++j) {
        t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
      }
      for (int j = 0; j < 4; ++j) {
        for (int h = 0; h < 2; ++h) {
          const __m512 a = t[4 * j + h], b = t[4 * j + 2 + h];
          r[4 * j + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
          r[4 * j + 2 + h] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
        }
      }
      // r[4j + {0,1,2,3}] now hold, for rows 4j..4j+3, columns {0,4,8,12}+{0,1,2,3} per 128-bit lane
      for (int j = 0; j < 2; ++j) {
        for (int h = 0; h < 4; ++h) {
          const __m512 a = r[8 * j + h], b = r[8 * j + 4 + h];
          t[8 * j + h] = _mm512_shuffle_f32x4(a, b, 0x88);
          t[8 * j + 4 + h] = _mm512_shuffle_f32x4(a, b, 0xDD);
        }
      }
      for (int h = 0; h < 8; ++h) {
        const __m512 a = t[h], b = t[8 + h];
        r[h] = _mm512_shuffle_f32x4(a, b, 0x88);
        r[8 + h] = _mm512_shuffle_f32x4(a, b, 0xDD);
      }
      // column c0 + i of the 16 rows is in r[perm[i]]
      static const int perm[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
      for (int i = 0; i < 16; ++i) {
        if (c0 + i < d) _mm512_storeu_ps(dst + (c0 + i) * KT + half * 16, r[perm[i]]);
      }
    }
  }
}

// Rows r < rb of a finished block (obuf: unnormalised sum p v, mx / sum: row max and sum of
// exponentials): out row = obuf / sum and the call's lse into lw (0 for rows without keys, as
// ATen's flash kernel). With li (the plan's merged log-sum-exps, liR apart), the row is merged
// with what out and li already hold: weights exp(lse - max) of both, so calls over disjoint
// key sets of the same queries combine exactly (a row never written has li = -inf).
inline void finish_rows(const float* obuf, const float* mx, const float* sum, int rb, int64_t d, float* ow,
                        int64_t osR, float* lw, float* li, int64_t liR) {
  const float NEG = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rb; ++r) {
    const float lnew = sum[r] > 0.f ? mx[r] + std::log(sum[r]) : NEG;
    lw[r] = sum[r] > 0.f ? lnew : 0.f;
    float* orow = ow + r * osR;
    const float* brow = obuf + r * d;
    if (li == nullptr) {
      const __m512 iv = _mm512_set1_ps(sum[r] > 0.f ? 1.f / sum[r] : 0.f);
      for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(orow + c, _mm512_mul_ps(_mm512_loadu_ps(brow + c), iv));
      continue;
    }
    float* lrow = li + r * liR;
    const float lold = *lrow;
    if (lnew == NEG) continue;  // no key here: the row keeps what it has
    if (lold == NEG) {          // first part of this row: a plain write
      const __m512 iv = _mm512_set1_ps(1.f / sum[r]);
      for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(orow + c, _mm512_mul_ps(_mm512_loadu_ps(brow + c), iv));
      *lrow = lnew;
      continue;
    }
    const float mm = std::max(lold, lnew);
    const float wa = std::exp(lold - mm), wb = std::exp(lnew - mm), tot = wa + wb;
    const __m512 ca = _mm512_set1_ps(wa / tot), cb = _mm512_set1_ps(wb / (tot * sum[r]));
    for (int64_t c = 0; c < d; c += 16)
      _mm512_storeu_ps(orow + c, _mm512_fmadd_ps(_mm512_loadu_ps(brow + c), cb, _mm512_mul_ps(_mm512_loadu_ps(orow + c), ca)));
    *lrow = mm + std::log(tot);
  }
}

// Rows r0 .. r0 + rb - 1 (rb <= RB) of a call: each row's key range lo[r]..hi[r] clipped to the
// window's S keys (rows past rb: empty), and the union glo..ghi (ghi < 0: no key in the block).
inline void block_ranges(const int32_t* LO, const int32_t* HI, int64_t r0, int rb, int64_t S, int32_t* lo,
                         int32_t* hi, int32_t& glo, int32_t& ghi) {
  glo = INT32_MAX;
  ghi = -1;
  for (int r = 0; r < RB; ++r) {
    lo[r] = r < rb ? std::max<int32_t>(LO[r0 + r], 0) : 1;
    hi[r] = r < rb ? std::min<int32_t>(HI[r0 + r], static_cast<int32_t>(S) - 1) : 0;
    if (lo[r] <= hi[r]) { glo = std::min(glo, lo[r]); ghi = std::max(ghi, hi[r]); }
  }
}

// Per-thread scratch of the forward kernels: scores (RB rows, lds apart), query rows, P V rows.
struct Scratch {
  std::vector<float> s, q, o;
  int64_t lds;
  Scratch(int64_t S, int64_t d) : lds((S + 2 * KT + 15) / 16 * 16) { s.resize(RB * lds); q.resize(RB * d); o.resize(RB * d); }
};

// One block of RB query rows (r0 ..) of a window: scores against the packed key tiles kt (window
// column u is packed column koff + u) over the block's key range only, softmax, P V with the
// window's value rows v, then the rows written into ow / lw, or merged (li: the window's merged
// log-sum-exps, liR apart; nullptr: plain write).
template <class T, class Rows>
inline void forward_block(const T* qw, int64_t qsR, int64_t r0, int64_t L, int64_t S, const int32_t* LO,
                          const int32_t* HI, const float* kt, int64_t koff, Rows v, float sc, int64_t d, Scratch& w,
                          float* ow, int64_t osR, float* lw, float* li, int64_t liR) {
  const int rb = static_cast<int>(std::min<int64_t>(RB, L - r0));
  int32_t lo[RB], hi[RB], glo, ghi;
  block_ranges(LO, HI, r0, rb, S, lo, hi, glo, ghi);
  if (ghi < 0) {  // no key in the block: zero rows (merging: they keep what they have)
    for (int r = 0; r < rb; ++r) {
      if (li == nullptr) std::fill(ow + (r0 + r) * osR, ow + (r0 + r) * osR + d, 0.f);
      lw[r0 + r] = 0.f;
    }
    return;
  }
  for (int r = 0; r < RB; ++r) {
    const T* src = qw + (r0 + (r < rb ? r : 0)) * qsR;
    for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(w.q.data() + r * d + c, load16(src + c));
  }
  const int64_t t0 = (koff + glo) / KT, t1 = (koff + ghi) / KT;
  const int64_t j0 = t0 * KT - koff;  // window column of the first tile (may be < 0)
  for (int64_t t = t0; t <= t1; ++t) qk_tile(w.q.data(), kt + t * d * KT, d, w.s.data() + (t - t0) * KT, w.lds);
  float mx[RB], sum[RB];
  // softmax over the 16-column groups that hold keys of some row, P V over those keys only
  const int64_t sj0 = j0 + (glo - j0) / 16 * 16, snj = (ghi + 1 - sj0 + 15) / 16 * 16;
  softmax_rows(w.s.data() + (sj0 - j0), w.lds, snj, sj0, lo, hi, sc, mx, sum);
  for (int64_t c0 = 0; c0 < d; c0 += 32)
    pv_block(w.s.data() + (glo - j0), w.lds, v, glo, ghi - glo + 1, c0, w.o.data(), d);
  finish_rows(w.o.data(), mx, sum, rb, d, ow + r0 * osR, osR, lw + r0, li == nullptr ? nullptr : li + r0 * liR, liR);
}

// The output side of a window or gathered-key forward call (q: (X, M, L, d)): out (out_in when
// given: a view with a unit last stride), the call's lse (X, M, L), and with lse_in (the plan's
// merged log-sum-exps of these rows) the rows are merged into out instead of written.
struct ForwardOut {
  torch::Tensor out, lse;
  float *O, *LS, *LI = nullptr;
  int64_t osX, osM, osR, liX = 0, liM = 0, liR = 0;
  ForwardOut(const torch::Tensor& q, const torch::Tensor& out_in, const torch::Tensor& lse_in, const char* name) {
    const int64_t X = q.size(0), M = q.size(1), L = q.size(2), d = q.size(3);
    const auto f32 = q.options().dtype(torch::kFloat32);  // fp32 whatever q's dtype
    out = out_in.numel() ? out_in : torch::empty({X, M, L, d}, f32);
    TORCH_CHECK(out.stride(3) == 1 && out.scalar_type() == torch::kFloat32, name, ": out needs fp32 and a unit last stride");
    lse = torch::empty({X, M, L}, f32);
    O = out.data_ptr<float>();
    LS = lse.data_ptr<float>();
    osX = out.stride(0), osM = out.stride(1), osR = out.stride(2);
    if (lse_in.numel()) {
      TORCH_CHECK(out_in.numel() > 0, name, ": merging needs the output rows to merge into");
      LI = lse_in.data_ptr<float>();
      liX = lse_in.stride(0), liM = lse_in.stride(1), liR = lse_in.stride(2);
    }
  }
  float* out_rows(int64_t x, int64_t m) const { return O + x * osX + m * osM; }
  float* lse_rows(int64_t x, int64_t m) const { return LS + (x * lse.size(1) + m) * lse.size(2); }
  float* merged(int64_t x, int64_t m) const { return LI == nullptr ? nullptr : LI + x * liX + m * liM; }
};

// f(T{}) for T the element type of q, which the tensors in `same` share: fp32, bf16 or fp16 (the
// kernels widen the low precisions to fp32 as they load them).
template <class F>
auto by_dtype(const char* name, const torch::Tensor& q, std::initializer_list<torch::Tensor> same, F&& f) {
  const auto t = q.scalar_type();
  for (const auto& x : same) TORCH_CHECK(x.scalar_type() == t, name, ": q, k, v (go, o) dtypes differ");
  if (t == torch::kBFloat16) return f(at::BFloat16{});
  if (t == torch::kFloat16) return f(at::Half{});
  TORCH_CHECK(t == torch::kFloat32, name, ": fp32, bf16 or fp16");
  return f(0.f);
}

}  // namespace

// Attention of q (X, M, L, d) against k, v (X, M, S, d) views (unit last stride; the key windows
// of consecutive m may overlap). Query row t of every
// window sees keys lo[t]..hi[t] (inclusive). Returns out (X, M, L, d) and lse (X, M, L) with the
// conventions of ATen's CPU flash attention (a row without keys: zeros and lse 0).
// Per thread, the keys of a run of windows of one sequence are packed once into 32-key tiles
// (d x 32, contiguous), so that each 8-row block of queries is a register-blocked product with
// few loads per FMA; softmax is two passes over the row block's scores (S is small).
template <class T>
std::vector<torch::Tensor> window_forward_t(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                            torch::Tensor lo_t, torch::Tensor hi_t, double scale, torch::Tensor out_in,
                                            torch::Tensor lse_in) {
  const int64_t X = q.size(0), M = q.size(1), L = q.size(2), d = q.size(3), S = k.size(2);
  TORCH_CHECK(d % 32 == 0, "window_forward: head_dim must be a multiple of 32");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "window_forward: last stride must be 1");
  const int64_t ksR = k.stride(2), ksM = k.stride(1), vsR = v.stride(2);
  // windows that advance by whole key rows share one packed run; others are packed one by one
  const bool runs = M > 1 && ksM >= 0 && ksM % ksR == 0 && ksM / ksR < S;
  const ForwardOut io(q, out_in, lse_in, "window_forward");
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* LO = lo_t.data_ptr<int32_t>();
  const int32_t* HI = hi_t.data_ptr<int32_t>();
  const int64_t qsX = q.stride(0), qsM = q.stride(1), qsR = q.stride(2);
  const int64_t ksX = k.stride(0), vsX = v.stride(0), vsM = v.stride(1);
  const int64_t step_rows = runs ? ksM / ksR : 0;  // key rows between consecutive windows
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, X * M, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> kt_buf;
    Scratch w(S, d);
    int64_t item = b0;
    while (item < b1) {
      const int64_t x = item / M, m_first = item % M;
      const int64_t m_last = runs ? std::min(M - 1, m_first + (b1 - item) - 1) : m_first;
      // the run's keys: rows 0 .. nrows-1 of k from window m_first's first key, ksR apart
      const T* kbase = K + x * ksX + m_first * ksM;
      const int64_t nrows = (m_last - m_first) * step_rows + S;
      const int64_t nblk = (nrows + KT - 1) / KT + 1;
      kt_buf.resize(nblk * d * KT);
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(KT, nrows - blk * KT));
        pack_tile(StridedRowsT<T>{kbase + blk * KT * ksR, ksR}, rows, d, kt_buf.data() + blk * d * KT);
      }
      for (int64_t m = m_first; m <= m_last; ++m) {
        const int64_t koff = (m - m_first) * step_rows;  // window's first key in packed rows
        const StridedRowsT<T> vw{V + x * vsX + m * vsM, vsR};
        for (int64_t r0 = 0; r0 < L; r0 += RB)
          forward_block(Q + x * qsX + m * qsM, qsR, r0, L, S, LO, HI, kt_buf.data(), koff, vw, sc, d, w,
                        io.out_rows(x, m), io.osR, io.lse_rows(x, m), io.merged(x, m), io.liR);
      }
      item += m_last - m_first + 1;
    }
  });
  return {io.out, io.lse};
}

// As window_forward, with the keys of window m gathered: rows idx[m][0..S-1] of k, v (X, n, d)
// (idx (M, S) int32, or (1, S): the same keys for every window). The rows are copied once,
// into the packed tiles, instead of into a gathered tensor first.
template <class T>
std::vector<torch::Tensor> gather_forward_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                            torch::Tensor lo_t, torch::Tensor hi_t, double scale, torch::Tensor out_in,
                                            torch::Tensor lse_in) {
  const int64_t X = q.size(0), M = q.size(1), L = q.size(2), d = q.size(3), S = idx.size(1);
  const bool shared = idx.size(0) == 1;
  TORCH_CHECK(d % 32 == 0, "gather_forward: head_dim must be a multiple of 32");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "gather_forward: last stride must be 1");
  const ForwardOut io(q, out_in, lse_in, "gather_forward");
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* IDX = idx.data_ptr<int32_t>();
  const int32_t* LO = lo_t.data_ptr<int32_t>();
  const int32_t* HI = hi_t.data_ptr<int32_t>();
  const int64_t qsX = q.stride(0), qsM = q.stride(1), qsR = q.stride(2);
  const int64_t ksX = k.stride(0), ksR = k.stride(1), vsX = v.stride(0), vsR = v.stride(1);
  const float sc = static_cast<float>(scale);
  const int64_t nblk = (S + KT - 1) / KT + 1;

  at::parallel_for(0, X * M, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> kt(nblk * d * KT);
    Scratch w(S, d);
    std::vector<const T*> krows(nblk * KT), vrows(S);
    int64_t packed_x = -1, packed_m = -1;
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t x = item / M, m = item % M;
      const int32_t* row = IDX + (shared ? 0 : m) * S;
      if (!(shared ? packed_x == x : (packed_x == x && packed_m == m))) {
        for (int64_t u = 0; u < S; ++u) krows[u] = K + x * ksX + static_cast<int64_t>(row[u]) * ksR;
        for (int64_t blk = 0; blk < nblk; ++blk)
          pack_tile(GatheredRowsT<T>{krows.data() + blk * KT}, std::max<int64_t>(0, std::min<int64_t>(KT, S - blk * KT)), d,
                    kt.data() + blk * d * KT);
        for (int64_t u = 0; u < S; ++u) vrows[u] = V + x * vsX + static_cast<int64_t>(row[u]) * vsR;
        packed_x = x;
        packed_m = m;
      }
      for (int64_t r0 = 0; r0 < L; r0 += RB)
        forward_block(Q + x * qsX + m * qsM, qsR, r0, L, S, LO, HI, kt.data(), 0, GatheredRowsT<T>{vrows.data()}, sc, d, w,
                      io.out_rows(x, m), io.osR, io.lse_rows(x, m), io.merged(x, m), io.liR);
    }
  });
  return {io.out, io.lse};
}

// fp32, bf16 or fp16 inputs (fp32 arithmetic, fp32 output and lse)
std::vector<torch::Tensor> window_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                          torch::Tensor lo_t, torch::Tensor hi_t, double scale, torch::Tensor out_in,
                                          torch::Tensor lse_in) {
  return by_dtype("window_forward", q, {k, v}, [&](auto z) {
    return window_forward_t<decltype(z)>(q, k, v, lo_t, hi_t, scale, out_in, lse_in);
  });
}

std::vector<torch::Tensor> gather_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                          torch::Tensor lo_t, torch::Tensor hi_t, double scale, torch::Tensor out_in,
                                          torch::Tensor lse_in) {
  return by_dtype("gather_forward", q, {k, v}, [&](auto z) {
    return gather_forward_t<decltype(z)>(q, k, v, idx, lo_t, hi_t, scale, out_in, lse_in);
  });
}

// acc[j][c0..c0+31] += sum_r w[r][j] * x[r][c0..c0+31] for j < nj, r < nr (nr rows of w, stride
// ldw; x rows of d floats): the rank-nr updates of dK (w = dS, x = Q) and dV (w = P, x = dO). A
// block of 4 acc rows x 32 columns stays in registers over all nr rows, so each acc row is read
// and written once per nr rows (the rows of acc live in L2).
inline void outer_acc(const float* __restrict w, int64_t ldw, const float* __restrict x, int64_t d, int nr,
                      int64_t nj, int64_t c0, float* __restrict acc, int64_t lda) {
  int64_t j = 0;
  for (; j + 4 <= nj; j += 4) {
    __m512 a[4][2];
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      a[t][0] = _mm512_loadu_ps(acc + (j + t) * lda + c0);
      a[t][1] = _mm512_loadu_ps(acc + (j + t) * lda + c0 + 16);
    }
    for (int r = 0; r < nr; ++r) {
      const __m512 xa = _mm512_loadu_ps(x + r * d + c0), xb = _mm512_loadu_ps(x + r * d + c0 + 16);
      const float* wr = w + r * ldw + j;
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __m512 wb = _mm512_set1_ps(wr[t]);
        a[t][0] = _mm512_fmadd_ps(wb, xa, a[t][0]);
        a[t][1] = _mm512_fmadd_ps(wb, xb, a[t][1]);
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      _mm512_storeu_ps(acc + (j + t) * lda + c0, a[t][0]);
      _mm512_storeu_ps(acc + (j + t) * lda + c0 + 16, a[t][1]);
    }
  }
  for (; j < nj; ++j) {
    __m512 a0 = _mm512_loadu_ps(acc + j * lda + c0), a1 = _mm512_loadu_ps(acc + j * lda + c0 + 16);
    for (int r = 0; r < nr; ++r) {
      const __m512 wb = _mm512_set1_ps(w[r * ldw + j]);
      a0 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(x + r * d + c0), a0);
      a1 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(x + r * d + c0 + 16), a1);
    }
    _mm512_storeu_ps(acc + j * lda + c0, a0);
    _mm512_storeu_ps(acc + j * lda + c0 + 16, a1);
  }
}

constexpr int SB = 4;  // register blocks of RB query rows whose key gradients are added together

// Backward of window_forward, and of gather_forward when idx is given. go: (X, M, L, d) output
// gradient, o: the merged output rows, lse: this call's log-sum-exp (0 for rows without keys),
// lm_t: the merged log-sum-exps of the rows (X, M, L) when calls were merged (empty: not merged),
// each row's go scaled by this call's share exp(lse - lm). Adds into dq (a view with q's
// geometry) and into dk, dv: views with k's and v's geometry, or, with idx, (X, n, d) like k and v,
// at the rows idx names. Per thread, a run of windows of one sequence accumulates its keys'
// gradients in a private buffer, added under a lock at the end of the run (runs of two threads,
// or gathered windows, may share keys).
template <class T>
void window_backward_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lo_t, torch::Tensor hi_t,
                     double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                     torch::Tensor dq, torch::Tensor dk, torch::Tensor dv, torch::Tensor idx,
                     torch::Tensor lm_t) {
  const bool gathered = idx.numel() > 0;
  const int64_t X = q.size(0), M = q.size(1), L = q.size(2), d = q.size(3), S = gathered ? idx.size(1) : k.size(2);
  TORCH_CHECK(d % 32 == 0, "window_backward: head_dim must be a multiple of 32");
  // window geometry: key row u of window m is row m * step_rows + u of a run (views of k), or
  // row idx[m][u] of k (X, n, d) (idx (M, S), or (1, S): the same keys for every window)
  const int rd = gathered ? 1 : 2;  // dimension of k's rows
  const int64_t ksR = k.stride(rd), ksM = gathered ? 0 : k.stride(1), vsR = v.stride(rd);
  TORCH_CHECK(gathered ? (k.dim() == 3 && dk.dim() == 3 && dv.dim() == 3 && idx.scalar_type() == torch::kInt32 &&
                          idx.is_contiguous())
                       : (v.stride(1) * ksR == ksM * vsR && dk.stride(1) * ksR == ksM * dk.stride(2) &&
                          dv.stride(1) * ksR == ksM * dv.stride(2)),
              "window_backward: k, v, dk, dv must share one window geometry");
  const bool shared = gathered && idx.size(0) == 1;
  const bool runs = M > 1 && (gathered ? shared : ksM >= 0 && ksM % ksR == 0 && ksM / ksR < S);
  const int64_t step_rows = runs && !gathered ? ksM / ksR : 0;
  const int32_t* IDX = gathered ? idx.data_ptr<int32_t>() : nullptr;
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const T* GO = go.data_ptr<T>();
  const T* OO = o.data_ptr<T>();
  const float* LSE = lse.data_ptr<float>();
  const float* LM = lm_t.numel() ? lm_t.data_ptr<float>() : nullptr;
  const int64_t lmX = LM ? lm_t.stride(0) : 0, lmM = LM ? lm_t.stride(1) : 0, lmR = LM ? lm_t.stride(2) : 0;
  const int32_t* LO = lo_t.data_ptr<int32_t>();
  const int32_t* HI = hi_t.data_ptr<int32_t>();
  float* DQ = dq.data_ptr<float>();
  float* DK = dk.data_ptr<float>();
  float* DV = dv.data_ptr<float>();
  const int64_t qsX = q.stride(0), qsM = q.stride(1), qsR = q.stride(2);
  const int64_t ksX = k.stride(0), vsX = v.stride(0), vsM = gathered ? 0 : v.stride(1);
  const int64_t gsX = go.stride(0), gsM = go.stride(1), gsR = go.stride(2);
  const int64_t osX = o.stride(0), osM = o.stride(1), osR = o.stride(2);
  const int64_t lsX = lse.stride(0), lsM = lse.stride(1), lsR = lse.stride(2);
  const int64_t dqX = dq.stride(0), dqM = dq.stride(1), dqR = dq.stride(2);
  const int64_t dkX = dk.stride(0), dkR = dk.stride(rd), dvX = dv.stride(0), dvR = dv.stride(rd);
  const int64_t dkM = gathered ? 0 : dk.stride(1), dvM = gathered ? 0 : dv.stride(1);
  const float sc = static_cast<float>(scale);
  const int64_t lds = (S + 2 * KT + 15) / 16 * 16;
  std::mutex lock;

  at::parallel_for(0, X * M, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> kt_buf, vt_buf, dk_buf, dv_buf;
    std::vector<float> pbuf(SB * RB * lds), dsbuf(SB * RB * lds), qbuf(SB * RB * d), gbuf(SB * RB * d), obuf(RB * d);
    std::vector<const T*> krows, vrows;
    int64_t item = b0;
    while (item < b1) {
      const int64_t x = item / M, m_first = item % M;
      const int64_t m_last = runs ? std::min(M - 1, m_first + (b1 - item) - 1) : m_first;
      const int32_t* keys = gathered ? IDX + (shared ? 0 : m_first) * S : nullptr;  // the run's key rows
      const int64_t nrows = (m_last - m_first) * step_rows + S;
      const int64_t nblk = (nrows + KT - 1) / KT + 1;
      krows.resize(nrows);
      vrows.resize(nrows);
      for (int64_t u = 0; u < nrows; ++u) {
        const int64_t kr = gathered ? keys[u] : u;
        krows[u] = K + x * ksX + m_first * ksM + kr * ksR;
        vrows[u] = V + x * vsX + m_first * vsM + kr * vsR;
      }
      kt_buf.resize(nblk * d * KT);
      vt_buf.resize(nblk * d * KT);
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(KT, nrows - blk * KT));
        pack_tile(GatheredRowsT<T>{krows.data() + blk * KT}, rows, d, kt_buf.data() + blk * d * KT);
        pack_tile(GatheredRowsT<T>{vrows.data() + blk * KT}, rows, d, vt_buf.data() + blk * d * KT);
      }
      dk_buf.assign((nblk * KT) * d, 0.f);
      dv_buf.assign((nblk * KT) * d, 0.f);
      for (int64_t m = m_first; m <= m_last; ++m) {
        const int64_t koff = (m - m_first) * step_rows;
        // SB blocks of RB rows at a time: each block's scores, P and dS over its own key tiles,
        // its dq rows; then the key gradients of the union of their tiles, all SB * RB rows at once
        for (int64_t R0 = 0; R0 < L; R0 += SB * RB) {
          int32_t lo[SB][RB], hi[SB][RB], glo[SB], ghi[SB];
          int64_t T0 = INT64_MAX, T1 = -1;
          for (int b = 0; b < SB; ++b) {
            const int64_t r0 = R0 + b * RB;
            const int rb = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(RB, L - r0)));
            if (rb == 0) { ghi[b] = -1; continue; }
            block_ranges(LO, HI, r0, rb, S, lo[b], hi[b], glo[b], ghi[b]);
            if (ghi[b] < 0) continue;
            T0 = std::min<int64_t>(T0, (koff + glo[b]) / KT);
            T1 = std::max<int64_t>(T1, (koff + ghi[b]) / KT);
          }
          if (T1 < 0) continue;
          const int64_t J0 = T0 * KT - koff;  // window column of the union's first tile
          const int64_t nJ = (T1 - T0 + 1) * KT;
          int nb = 0;  // blocks holding rows (the last ones may be past L)
          for (int b = 0; b < SB; ++b) {
            const int64_t r0 = R0 + b * RB;
            if (r0 >= L) break;
            nb = b + 1;
            float* prows = pbuf.data() + b * RB * lds;
            float* srows = dsbuf.data() + b * RB * lds;
            float* qb = qbuf.data() + b * RB * d;
            float* gb = gbuf.data() + b * RB * d;
            if (ghi[b] < 0) {  // no key: rows of zeros (they add nothing to the key gradients)
              std::fill(qb, qb + RB * d, 0.f);
              std::fill(gb, gb + RB * d, 0.f);
              for (int r = 0; r < RB; ++r) {
                std::fill(prows + r * lds, prows + r * lds + nJ, 0.f);
                std::fill(srows + r * lds, srows + r * lds + nJ, 0.f);
              }
              continue;
            }
            const int rb = static_cast<int>(std::min<int64_t>(RB, L - r0));
            float lrow[RB], drow[RB];
            for (int r = 0; r < RB; ++r) {
              const int64_t rr = r0 + (r < rb ? r : 0);
              const T* qs = Q + x * qsX + m * qsM + rr * qsR;
              const T* gs = GO + x * gsX + m * gsM + rr * gsR;
              const T* os = OO + x * osX + m * osM + rr * osR;
              lrow[r] = LSE[x * lsX + m * lsM + rr * lsR];
              // this call's share of the merged row: exp(lse - merged lse)
              // (0 for padding rows and rows without a key in this call: their lse is a stand-in)
              float share = r < rb && lo[b][r] <= hi[b][r] ? 1.f : 0.f;
              if (LM != nullptr && share != 0.f) {
                const float lm = LM[x * lmX + m * lmM + rr * lmR];
                share = std::isfinite(lm) ? std::exp(lrow[r] - lm) : 0.f;
              }
              float D = 0.f;
              for (int64_t c = 0; c < d; ++c) {
                qb[r * d + c] = static_cast<float>(qs[c]);
                const float gv = static_cast<float>(gs[c]) * share;
                gb[r * d + c] = gv;
                D += gv * static_cast<float>(os[c]);
              }
              drow[r] = D;
            }
            const int64_t t0 = (koff + glo[b]) / KT, t1 = (koff + ghi[b]) / KT;
            const int64_t u0 = (t0 - T0) * KT, u1 = (t1 - T0 + 1) * KT;  // this block's columns
            for (int r = 0; r < RB; ++r) {
              std::fill(prows + r * lds, prows + r * lds + u0, 0.f);
              std::fill(srows + r * lds, srows + r * lds + u0, 0.f);
              std::fill(prows + r * lds + u1, prows + r * lds + nJ, 0.f);
              std::fill(srows + r * lds + u1, srows + r * lds + nJ, 0.f);
            }
            for (int64_t t = t0; t <= t1; ++t) {
              qk_tile(qb, kt_buf.data() + t * d * KT, d, prows + (t - T0) * KT, lds);
              qk_tile(gb, vt_buf.data() + t * d * KT, d, srows + (t - T0) * KT, lds);
            }
            const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512 vsc = _mm512_set1_ps(sc);
            for (int r = 0; r < RB; ++r) {
              float* prow = prows + r * lds;
              float* srow = srows + r * lds;
              const __m512i av = _mm512_set1_epi32(lo[b][r]), bv = _mm512_set1_epi32(hi[b][r]);
              const __m512 lv = _mm512_set1_ps(lrow[r]), dvv = _mm512_set1_ps(drow[r]);
              for (int64_t j = u0; j < u1; j += 16) {
                const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(J0 + j)), iota);
                const __mmask16 ok = r < rb ? (_mm512_cmpge_epi32_mask(jv, av) & _mm512_cmple_epi32_mask(jv, bv)) : 0;
                const __m512 sv = _mm512_fmsub_ps(_mm512_loadu_ps(prow + j), vsc, lv);
                const __m512 p = _mm512_maskz_mov_ps(ok, exp512(sv));
                const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(srow + j), dvv)), vsc);
                _mm512_storeu_ps(prow + j, p);
                _mm512_storeu_ps(srow + j, ds);
              }
            }
            // dq rows += dS K (K rows of the window, ksR apart); tile columns outside [0, S) have dS = 0
            const int64_t jb = std::max<int64_t>(J0 + u0, 0), je = std::min<int64_t>(J0 + u1, S);
            for (int64_t c0 = 0; c0 < d; c0 += 32)
              pv_block(srows + (jb - J0), lds, GatheredRowsT<T>{krows.data() + koff}, jb, je - jb, c0, obuf.data(), d);
            for (int r = 0; r < rb; ++r) {
              float* dqr = DQ + x * dqX + m * dqM + (r0 + r) * dqR;
              for (int64_t c = 0; c < d; c += 16)
                _mm512_storeu_ps(dqr + c, _mm512_add_ps(_mm512_loadu_ps(dqr + c), _mm512_loadu_ps(obuf.data() + r * d + c)));
            }
          }
          // dk += dS^T Q, dv += P^T dO over the union's keys, into the run's buffers (rows koff + jb ..)
          const int64_t jb = std::max<int64_t>(J0, 0), je = std::min<int64_t>(J0 + nJ, S);
          for (int64_t c0 = 0; c0 < d; c0 += 32) {
            outer_acc(dsbuf.data() + (jb - J0), lds, qbuf.data(), d, nb * RB, je - jb, c0, dk_buf.data() + (koff + jb) * d, d);
            outer_acc(pbuf.data() + (jb - J0), lds, gbuf.data(), d, nb * RB, je - jb, c0, dv_buf.data() + (koff + jb) * d, d);
          }
        }
      }
      {
        std::lock_guard<std::mutex> guard(lock);
        for (int64_t r = 0; r < nrows; ++r)
          for (int64_t c = 0; c < d; c += 16) {
            const int64_t kr = gathered ? keys[r] : r;
            float* a = DK + x * dkX + m_first * dkM + kr * dkR + c;
            float* b = DV + x * dvX + m_first * dvM + kr * dvR + c;
            _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(dk_buf.data() + r * d + c)));
            _mm512_storeu_ps(b, _mm512_add_ps(_mm512_loadu_ps(b), _mm512_loadu_ps(dv_buf.data() + r * d + c)));
          }
      }
      item += m_last - m_first + 1;
    }
  });
}

// q, k, v, go and o in fp32, bf16 or fp16 (widened as loaded); dq, dk, dv, lse and lm fp32
void window_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lo_t, torch::Tensor hi_t,
                     double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                     torch::Tensor dq, torch::Tensor dk, torch::Tensor dv, torch::Tensor idx,
                     torch::Tensor lm_t) {
  TORCH_CHECK(dq.scalar_type() == torch::kFloat32 && dk.scalar_type() == torch::kFloat32 &&
                  dv.scalar_type() == torch::kFloat32, "window_backward: fp32 gradients");
  by_dtype("window_backward", q, {k, v, go, o}, [&](auto z) {
    window_backward_t<decltype(z)>(q, k, v, lo_t, hi_t, scale, go, o, lse, dq, dk, dv, idx, lm_t);
  });
}

// Lane t of the result: the sum of the lanes of a[t], t = 0..15 (16 dot products finished at once,
// 3 instructions a key instead of a horizontal sum each).
inline __m512 transpose_sum16(const __m512* a) {
  __m512 b[8], c[4], e[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xDD));
}

// Scores of up to 16 keys (rows ids[0..nk-1] of K, nk >= 1) against the query qv, scaled.
template <int NV, class T>
inline __m512 scores16(const __m512* qv, const T* Kg, const int32_t* ids, int nk, __m512 vsc) {
  constexpr int64_t d = 16 * NV;
  __m512 a[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    if (j < nk) {
      const T* kj = Kg + static_cast<int64_t>(ids[j]) * d;
      a[j] = _mm512_mul_ps(qv[0], load16(kj));
#pragma GCC unroll 8
      for (int u = 1; u < NV; ++u) a[j] = _mm512_fmadd_ps(qv[u], load16(kj + 16 * u), a[j]);
    } else {
      a[j] = _mm512_setzero_ps();
    }
  }
  return _mm512_mul_ps(transpose_sum16(a), vsc);
}

// One work item of table_forward_blocked: sequence g, query rows i0..i1-1, NV = d / 16.
template <int NV, class T>
void table_blocked_item(const T* Q, const T* Kg, const T* Vg, const int32_t* I, const int32_t* B,
                        int64_t n, int64_t R, int64_t nch, int64_t row0, int64_t i0, int64_t i1, float sc,
                        float* Og, int64_t osR, float* Lg, std::vector<float>& mx, std::vector<float>& sm,
                        std::vector<float>& s) {
  constexpr int64_t d = 16 * NV;
  const float NEG = -std::numeric_limits<float>::infinity();
  const __m512 vsc = _mm512_set1_ps(sc);
  mx.assign(i1 - i0, NEG);
  sm.assign(i1 - i0, 0.f);
  s.resize(R + 16);
  for (int64_t i = i0; i < i1; ++i) std::fill(Og + i * osR, Og + i * osR + d, 0.f);
  for (int64_t c = 0; c < nch; ++c) {
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t e0 = B[i * (nch + 1) + c], e1 = B[i * (nch + 1) + c + 1];
      if (e0 >= e1) continue;
      const int32_t* row = I + i * R;
      const T* qi = Q + (row0 + i) * d;
      __m512 qv[NV];
      for (int u = 0; u < NV; ++u) qv[u] = load16(qi + 16 * u);
      // scores of this chunk's keys, 16 at a time, and their max with the row's running max
      const int32_t cnt = e1 - e0;
      __m512 mxv = _mm512_set1_ps(mx[i - i0]);
      for (int32_t t = 0; t < cnt; t += 16) {
        const int nk = cnt - t >= 16 ? 16 : cnt - t;
        const __m512 sv = scores16<NV>(qv, Kg, row + e0 + t, nk, vsc);
        _mm512_storeu_ps(s.data() + t, sv);
        mxv = _mm512_mask_max_ps(mxv, nk == 16 ? 0xFFFF : static_cast<__mmask16>((1u << nk) - 1), mxv, sv);
      }
      const float m_new = _mm512_reduce_max_ps(mxv);
      // p = exp(s - max), 16 at a time
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 psum = _mm512_setzero_ps();
      for (int32_t t = 0; t < cnt; t += 16) {
        const __mmask16 live = cnt - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (cnt - t)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(s.data() + t), mv)));
        _mm512_storeu_ps(s.data() + t, e);
        psum = _mm512_add_ps(psum, e);
      }
      // out row = alpha * out row + P V, two keys at a time into two sets of accumulators (one
      // FMA chain per set would wait on its latency)
      float* oi = Og + i * osR;
      const float alpha = mx[i - i0] == NEG ? 0.f : std::exp(mx[i - i0] - m_new);
      __m512 acc[NV], acc2[NV];
      const __m512 av = _mm512_set1_ps(alpha);
      for (int u = 0; u < NV; ++u) {
        acc[u] = _mm512_mul_ps(_mm512_loadu_ps(oi + 16 * u), av);
        acc2[u] = _mm512_setzero_ps();
      }
      const int32_t* ids = row + e0;
      int32_t t = 0;
      for (; t + 1 < cnt; t += 2) {
        const T* v0 = Vg + static_cast<int64_t>(ids[t]) * d;
        const T* v1 = Vg + static_cast<int64_t>(ids[t + 1]) * d;
        const __m512 p0 = _mm512_set1_ps(s[t]), p1 = _mm512_set1_ps(s[t + 1]);
        for (int u = 0; u < NV; ++u) {
          acc[u] = _mm512_fmadd_ps(p0, load16(v0 + 16 * u), acc[u]);
          acc2[u] = _mm512_fmadd_ps(p1, load16(v1 + 16 * u), acc2[u]);
        }
      }
      if (t < cnt) {
        const T* v0 = Vg + static_cast<int64_t>(ids[t]) * d;
        const __m512 p0 = _mm512_set1_ps(s[t]);
        for (int u = 0; u < NV; ++u) acc[u] = _mm512_fmadd_ps(p0, load16(v0 + 16 * u), acc[u]);
      }
      for (int u = 0; u < NV; ++u) _mm512_storeu_ps(oi + 16 * u, _mm512_add_ps(acc[u], acc2[u]));
      sm[i - i0] = sm[i - i0] * alpha + _mm512_reduce_add_ps(psum);
      mx[i - i0] = m_new;
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    float* oi = Og + i * osR;
    const float l = sm[i - i0];
    const __m512 iv = _mm512_set1_ps(l > 0.f ? 1.f / l : 0.f);
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(oi + 16 * u, _mm512_mul_ps(_mm512_loadu_ps(oi + 16 * u), iv));
    Lg[i] = l > 0.f ? mx[i - i0] + std::log(l) : NEG;
  }
}

// As table_forward, blocked for the cache: each query's keys are sorted, and bounds (rows,
// nch + 1) gives, per query, where its keys in each chunk of consecutive key rows begin. Per
// sequence, the chunks run one after the other and every query with keys in the chunk takes them
// (online softmax: running max, sum and output row, in out itself). A chunk of K and V (~1 MiB)
// stays in L2 while all queries read it, instead of each query reading its 2R rows from wherever
// they lie (the unblocked loop is bound by those scattered reads from L3). head_dim 32, 64, 128.
template <class T>
std::vector<torch::Tensor> table_forward_blocked_t(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                   torch::Tensor idx, torch::Tensor bounds, int64_t row0,
                                                   double scale, torch::Tensor out_in) {
  const int64_t G = q.size(0), n = q.size(1), d = q.size(2);
  const int64_t rows = idx.size(0), R = idx.size(1), nch = bounds.size(1) - 1;
  TORCH_CHECK(bounds.size(0) == rows && bounds.scalar_type() == torch::kInt32 && bounds.is_contiguous() &&
                  idx.scalar_type() == torch::kInt32 && idx.is_contiguous(),
              "blocked key tables: idx (rows, R) and bounds (rows, chunks + 1), contiguous int32");
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "table_forward_blocked: head_dim must be 32, 64 or 128");
  const auto f32 = q.options().dtype(torch::kFloat32);  // fp32 output and lse whatever q's dtype
  auto out = out_in.numel() ? out_in : torch::empty({G, rows, d}, f32);
  TORCH_CHECK(out.stride(2) == 1 && out.scalar_type() == torch::kFloat32, "table_forward_blocked: out needs fp32 and a unit last stride");
  const int64_t osG = out.stride(0), osR = out.stride(1);
  auto lse = torch::empty({G, rows}, f32);
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* I = idx.data_ptr<int32_t>();
  const int32_t* B = bounds.data_ptr<int32_t>();
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // work items: (sequence, tile of query rows); enough of them for every thread
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = std::max<int64_t>(1, std::min<int64_t>(rows, (2 * threads + G - 1) / G));
  const int64_t tile_rows = (rows + tiles - 1) / tiles;
  at::parallel_for(0, G * tiles, 1, [&](int64_t b, int64_t e) {
    std::vector<float> mx, sm, s;
    for (int64_t item = b; item < e; ++item) {
      const int64_t g = item / tiles, i0 = (item % tiles) * tile_rows, i1 = std::min(rows, i0 + tile_rows);
      if (i0 >= i1) continue;
      const T* Qg = Q + g * n * d;
      const T* Kg = K + g * n * d;
      const T* Vg = V + g * n * d;
      float* Og = O + g * osG;
      float* Lg = L + g * rows;
      if (d == 32) table_blocked_item<2>(Qg, Kg, Vg, I, B, n, R, nch, row0, i0, i1, sc, Og, osR, Lg, mx, sm, s);
      else if (d == 64) table_blocked_item<4>(Qg, Kg, Vg, I, B, n, R, nch, row0, i0, i1, sc, Og, osR, Lg, mx, sm, s);
      else table_blocked_item<8>(Qg, Kg, Vg, I, B, n, R, nch, row0, i0, i1, sc, Og, osR, Lg, mx, sm, s);
    }
  });
  return {out, lse};
}

// Backward of table_forward_blocked: adds into dq, dk, dv (G, n, d) fp32. go: (G, rows, d) output
// gradient (scaled by the call's share when calls were merged), o: (G, rows, d) merged output,
// lse: (G, rows) this call's log-sum-exp. Chunk by chunk as the forward: the chunk's key and value
// rows and their gradient rows stay in L2 while every query with keys there adds to them. One
// sequence per work item (key gradients of a sequence are summed by one thread, without locks).
template <int NV, class T>
void table_blocked_backward_item(const T* Qg, const T* Kg, const T* Vg, const int32_t* I,
                                 const int32_t* B, int64_t R, int64_t nch, int64_t row0, int64_t rows, float sc,
                                 const float* GOg, const float* Og, const float* Lg, float* DQg, float* DKg,
                                 float* DVg, std::vector<float>& Dr) {
  constexpr int64_t d = 16 * NV;
  const __m512 vsc = _mm512_set1_ps(sc);
  Dr.resize(rows + 2 * (R + 16));
  float* pb = Dr.data() + rows;  // p and dS of one query's keys in one chunk
  float* db = pb + R + 16;
  for (int64_t i = 0; i < rows; ++i) {  // D_i = go_i . o_i
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(GOg + i * d), _mm512_loadu_ps(Og + i * d));
    for (int u = 1; u < NV; ++u) a = _mm512_fmadd_ps(_mm512_loadu_ps(GOg + i * d + 16 * u), _mm512_loadu_ps(Og + i * d + 16 * u), a);
    Dr[i] = _mm512_reduce_add_ps(a);
  }
  for (int64_t c = 0; c < nch; ++c) {
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t e0 = B[i * (nch + 1) + c], e1 = B[i * (nch + 1) + c + 1];
      const float li = Lg[i];
      if (e0 >= e1 || !std::isfinite(li)) continue;
      const int32_t* row = I + i * R;
      const T* qi = Qg + (row0 + i) * d;
      const float* gi = GOg + i * d;
      float* dqi = DQg + (row0 + i) * d;
      __m512 qv[NV], gv[NV], dq[NV];
      for (int u = 0; u < NV; ++u) {
        qv[u] = load16(qi + 16 * u);
        gv[u] = _mm512_loadu_ps(gi + 16 * u);
        dq[u] = _mm512_loadu_ps(dqi + 16 * u);
      }
      // p and dS of this chunk's keys, 16 at a time (scores and dP = dO . v as transposed sums)
      const int32_t cnt = e1 - e0;
      const __m512 lv = _mm512_set1_ps(li), Dv = _mm512_set1_ps(Dr[i]), one = _mm512_set1_ps(1.f);
      for (int32_t t = 0; t < cnt; t += 16) {
        const int nk = cnt - t >= 16 ? 16 : cnt - t;
        const __mmask16 live = nk == 16 ? 0xFFFF : static_cast<__mmask16>((1u << nk) - 1);
        const __m512 sv = scores16<NV>(qv, Kg, row + e0 + t, nk, vsc);
        const __m512 dp = scores16<NV>(gv, Vg, row + e0 + t, nk, one);
        const __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sv, lv)));
        _mm512_storeu_ps(pb + t, p);
        _mm512_storeu_ps(db + t, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, Dv)), vsc));
      }
      // dq += dS k (two accumulator sets, alternate keys), dk += dS q, dv += p dO
      __m512 dq2[NV];
      for (int u = 0; u < NV; ++u) dq2[u] = _mm512_setzero_ps();
      for (int32_t t = 0; t < cnt; ++t) {
        const int64_t j = row[e0 + t];
        const T* kj = Kg + j * d;
        const __m512 dsv = _mm512_set1_ps(db[t]), pv = _mm512_set1_ps(pb[t]);
        float* dkj = DKg + j * d;
        float* dvj = DVg + j * d;
        for (int u = 0; u < NV; ++u) {
          if (t & 1) dq2[u] = _mm512_fmadd_ps(dsv, load16(kj + 16 * u), dq2[u]);
          else dq[u] = _mm512_fmadd_ps(dsv, load16(kj + 16 * u), dq[u]);
          _mm512_storeu_ps(dkj + 16 * u, _mm512_fmadd_ps(dsv, qv[u], _mm512_loadu_ps(dkj + 16 * u)));
          _mm512_storeu_ps(dvj + 16 * u, _mm512_fmadd_ps(pv, gv[u], _mm512_loadu_ps(dvj + 16 * u)));
        }
      }
      for (int u = 0; u < NV; ++u) dq[u] = _mm512_add_ps(dq[u], dq2[u]);
      for (int u = 0; u < NV; ++u) _mm512_storeu_ps(dqi + 16 * u, dq[u]);
    }
  }
}

template <class T>
void table_backward_blocked_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx, torch::Tensor bounds,
                              int64_t row0, double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                              torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  const int64_t G = q.size(0), n = q.size(1), d = q.size(2);
  const int64_t rows = idx.size(0), R = idx.size(1), nch = bounds.size(1) - 1;
  TORCH_CHECK(bounds.size(0) == rows && bounds.scalar_type() == torch::kInt32 && bounds.is_contiguous() &&
                  idx.scalar_type() == torch::kInt32 && idx.is_contiguous(),
              "blocked key tables: idx (rows, R) and bounds (rows, chunks + 1), contiguous int32");
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "table_backward_blocked: head_dim must be 32, 64 or 128");
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* I = idx.data_ptr<int32_t>();
  const int32_t* B = bounds.data_ptr<int32_t>();
  const float* GO = go.data_ptr<float>();
  const float* O = o.data_ptr<float>();
  const float* L = lse.data_ptr<float>();
  float* DQ = dq.data_ptr<float>();
  float* DK = dk.data_ptr<float>();
  float* DV = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, G, 1, [&](int64_t b, int64_t e) {
    std::vector<float> Dr;
    for (int64_t g = b; g < e; ++g) {
      const int64_t off = g * n * d;
      const float* GOg = GO + g * rows * d;
      const float* Og = O + g * rows * d;
      if (d == 32)
        table_blocked_backward_item<2>(Q + off, K + off, V + off, I, B, R, nch, row0, rows, sc, GOg, Og, L + g * rows, DQ + off, DK + off, DV + off, Dr);
      else if (d == 64)
        table_blocked_backward_item<4>(Q + off, K + off, V + off, I, B, R, nch, row0, rows, sc, GOg, Og, L + g * rows, DQ + off, DK + off, DV + off, Dr);
      else
        table_blocked_backward_item<8>(Q + off, K + off, V + off, I, B, R, nch, row0, rows, sc, GOg, Og, L + g * rows, DQ + off, DK + off, DV + off, Dr);
    }
  });
}

// q, k, v in fp32, bf16 or fp16 (widened to fp32 as loaded); go, o, lse, output and gradients fp32
std::vector<torch::Tensor> table_forward_blocked(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                 torch::Tensor idx, torch::Tensor bounds, int64_t row0,
                                                 double scale, torch::Tensor out_in) {
  return by_dtype("table_forward_blocked", q, {k, v}, [&](auto z) {
    return table_forward_blocked_t<decltype(z)>(q, k, v, idx, bounds, row0, scale, out_in);
  });
}

void table_backward_blocked(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx, torch::Tensor bounds,
                            int64_t row0, double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                            torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  TORCH_CHECK(go.scalar_type() == torch::kFloat32 && o.scalar_type() == torch::kFloat32 &&
                  dq.scalar_type() == torch::kFloat32 && dk.scalar_type() == torch::kFloat32 &&
                  dv.scalar_type() == torch::kFloat32, "table_backward_blocked: fp32 go, o and gradients");
  by_dtype("table_backward_blocked", q, {k, v}, [&](auto z) {
    table_backward_blocked_t<decltype(z)>(q, k, v, idx, bounds, row0, scale, go, o, lse, dq, dk, dv);
  });
}

// ------------------------------------------------------------------------------------------
// Content-selected patterns (moba, quest, topk_keys: the keys of each query chosen from q and k
// by the call). The selection is index (B, H, n, S) int32: per query head and row, the ids of
// its selected units (unit u covers keys u * unit .. (u + 1) * unit - 1, and a query sees those
// at most its own position), -1 padding.

// Units (moba chunks, quest pages), MoBA's own way: each key unit attends the queries that chose
// it. A work item is (batch, kv head, block of qblock query rows): its (query head of the group,
// row) pairs are bucketed by unit; per unit its keys are packed once into 32-key tiles (shared by
// the group's query heads), the rows that chose it are gathered and run as 8-row register blocks
// over the unit's keys (each row up to its own position: the query's own unit is the causal
// diagonal), and merged into their output rows through the log-sum-exps, unit by unit in
// ascending order (deterministic). Returns out (B, H, n, d) and lse (B, H, n), fp32.
template <class T>
std::vector<torch::Tensor> unit_forward_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                          int64_t unit, int64_t qblock, double scale) {
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), S = index.size(3);
  TORCH_CHECK(d % 32 == 0, "unit_forward: head_dim must be a multiple of 32");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && index.is_contiguous() &&
                  index.scalar_type() == torch::kInt32 && index.size(0) == B && index.size(1) == H &&
                  index.size(2) == n && k.size(2) == n && Hkv > 0 && H % Hkv == 0,
              "unit_forward: contiguous q (B, H, n, d), k, v (B, Hkv, n, d), index (B, H, n, S) int32");
  TORCH_CHECK(unit >= 1 && qblock >= 1, "unit_forward: unit and qblock must be positive");
  const int64_t group = H / Hkv, nunits = (n + unit - 1) / unit, nblocks = (n + qblock - 1) / qblock;
  const auto f32 = q.options().dtype(torch::kFloat32);
  auto out = torch::zeros({B, H, n, d}, f32);
  auto lse = torch::full({B, H, n}, -std::numeric_limits<float>::infinity(), f32);
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* IDX = index.data_ptr<int32_t>();
  float* O = out.data_ptr<float>();
  float* LS = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t ulen_max = std::min(unit, n);
  const int64_t nblk = (ulen_max + KT - 1) / KT + 1;
  at::parallel_for(0, B * Hkv * nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> kt(nblk * d * KT), obuf, lbuf, lw;
    std::vector<T> qbuf;
    std::vector<int32_t> start, cursor, pairs, lo, hi;
    Scratch w(ulen_max, d);
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t b = item / (Hkv * nblocks), kvh = (item / nblocks) % Hkv, blk = item % nblocks;
      const int64_t R0 = blk * qblock, R1 = std::min(n, R0 + qblock), rows = R1 - R0;
      // the (query head of the group, row) pairs, as gi * rows + row - R0, bucketed by unit
      // (counted, then placed): f(unit, pair) for every selected unit that holds a key at most the row
      const auto each_pair = [&](auto&& f) {
        for (int64_t gi = 0; gi < group; ++gi) {
          const int32_t* sel = IDX + ((b * H + kvh * group + gi) * n + R0) * S;
          for (int64_t i = 0; i < rows; ++i, sel += S)
            for (int64_t s = 0; s < S; ++s) {
              const int64_t u = sel[s];
              if (u >= 0 && u < nunits && u * unit <= R0 + i) f(u, static_cast<int32_t>(gi * rows + i));
            }
        }
      };
      start.assign(nunits + 1, 0);
      each_pair([&](int64_t u, int32_t) { ++start[u + 1]; });
      for (int64_t u = 0; u < nunits; ++u) start[u + 1] += start[u];
      pairs.resize(start[nunits]);
      cursor.assign(start.begin(), start.end() - 1);
      each_pair([&](int64_t u, int32_t pair) { pairs[cursor[u]++] = pair; });
      for (int64_t u = 0; u < nunits; ++u) {
        const int64_t c = start[u + 1] - start[u];
        if (c == 0) continue;
        const int64_t ulen = std::min(unit, n - u * unit);
        const int64_t kvoff = ((b * Hkv + kvh) * n + u * unit) * d;
        for (int64_t t = 0; t < (ulen + KT - 1) / KT + 1; ++t)
          pack_tile(StridedRowsT<T>{K + kvoff + t * KT * d, d}, std::max<int64_t>(0, std::min<int64_t>(KT, ulen - t * KT)),
                    d, kt.data() + t * d * KT);
        qbuf.resize(c * d);
        obuf.resize(c * d);
        lbuf.resize(c);
        lw.resize(c);
        lo.assign(c, 0);
        hi.resize(c);
        const int32_t* pr = pairs.data() + start[u];
        for (int64_t p = 0; p < c; ++p) {
          const int64_t gi = pr[p] / rows, i = R0 + pr[p] % rows, row = (b * H + kvh * group + gi) * n + i;
          std::copy(Q + row * d, Q + row * d + d, qbuf.data() + p * d);
          std::copy(O + row * d, O + row * d + d, obuf.data() + p * d);
          lbuf[p] = LS[row];
          hi[p] = static_cast<int32_t>(std::min<int64_t>(ulen - 1, i - u * unit));
        }
        for (int64_t r0 = 0; r0 < c; r0 += RB)
          forward_block(qbuf.data(), d, r0, c, ulen, lo.data(), hi.data(), kt.data(), 0,
                        StridedRowsT<T>{V + kvoff, d}, sc, d, w, obuf.data(), d, lw.data(), lbuf.data(), 1);
        for (int64_t p = 0; p < c; ++p) {
          const int64_t gi = pr[p] / rows, i = R0 + pr[p] % rows, row = (b * H + kvh * group + gi) * n + i;
          std::copy(obuf.data() + p * d, obuf.data() + p * d + d, O + row * d);
          LS[row] = lbuf[p];
        }
      }
    }
  });
  return {out, lse};
}

std::vector<torch::Tensor> unit_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                        int64_t unit, int64_t qblock, double scale) {
  return by_dtype("unit_forward", q, {k, v}, [&](auto z) {
    return unit_forward_t<decltype(z)>(q, k, v, index, unit, qblock, scale);
  });
}

// Tokens (topk_keys): per-sequence key tables, the cache-blocked key-table kernels of the random
// pattern (table_forward_blocked) with a table of its own per query head: idx (G, n, R) int32,
// each row's keys ascending (-1 padding at the end, never read), bounds (G, n, chunks + 1) where
// each row's keys of each chunk of key rows begin; query sequence g reads kv sequence g / group
// (grouped-query attention). Returns out (G, n, d) and lse (G, n), fp32.
template <class T>
std::vector<torch::Tensor> table_forward_selected_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                                    torch::Tensor bounds, int64_t group, double scale) {
  const int64_t G = q.size(0), n = q.size(1), d = q.size(2), R = idx.size(2), nch = bounds.size(2) - 1;
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && idx.is_contiguous() &&
                  bounds.is_contiguous() && idx.scalar_type() == torch::kInt32 && bounds.scalar_type() == torch::kInt32 &&
                  idx.size(0) == G && idx.size(1) == n && bounds.size(0) == G && bounds.size(1) == n &&
                  group >= 1 && k.size(0) * group == G,
              "table_forward_selected: contiguous q (G, n, d), k, v (G / group, n, d), idx (G, n, R), bounds int32");
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "table_forward_selected: head_dim must be 32, 64 or 128");
  const auto f32 = q.options().dtype(torch::kFloat32);
  auto out = torch::empty({G, n, d}, f32);
  auto lse = torch::empty({G, n}, f32);
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* I = idx.data_ptr<int32_t>();
  const int32_t* Bd = bounds.data_ptr<int32_t>();
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = std::max<int64_t>(1, std::min<int64_t>(n, (2 * threads + G - 1) / G));
  const int64_t tile_rows = (n + tiles - 1) / tiles;
  at::parallel_for(0, G * tiles, 1, [&](int64_t b, int64_t e) {
    std::vector<float> mx, sm, s;
    for (int64_t item = b; item < e; ++item) {
      const int64_t g = item / tiles, i0 = (item % tiles) * tile_rows, i1 = std::min(n, i0 + tile_rows);
      if (i0 >= i1) continue;
      const T* Qg = Q + g * n * d;
      const T* Kg = K + (g / group) * n * d;
      const T* Vg = V + (g / group) * n * d;
      const int32_t* Ig = I + g * n * R;
      const int32_t* Bg = Bd + g * n * (nch + 1);
      if (d == 32) table_blocked_item<2>(Qg, Kg, Vg, Ig, Bg, n, R, nch, 0, i0, i1, sc, O + g * n * d, d, L + g * n, mx, sm, s);
      else if (d == 64) table_blocked_item<4>(Qg, Kg, Vg, Ig, Bg, n, R, nch, 0, i0, i1, sc, O + g * n * d, d, L + g * n, mx, sm, s);
      else table_blocked_item<8>(Qg, Kg, Vg, Ig, Bg, n, R, nch, 0, i0, i1, sc, O + g * n * d, d, L + g * n, mx, sm, s);
    }
  });
  return {out, lse};
}

// Backward of table_forward_selected: adds into dq (G, n, d) and dk, dv (G / group, n, d), fp32.
// go, o: (G, n, d) fp32, lse: (G, n). One kv sequence per work item, its group's query heads one
// after the other (their key gradients meet in the same rows: no locks).
template <class T>
void table_backward_selected_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                               torch::Tensor bounds, int64_t group, double scale, torch::Tensor go, torch::Tensor o,
                               torch::Tensor lse, torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  const int64_t G = q.size(0), n = q.size(1), d = q.size(2), R = idx.size(2), nch = bounds.size(2) - 1;
  TORCH_CHECK(go.scalar_type() == torch::kFloat32 && o.scalar_type() == torch::kFloat32 &&
                  dq.scalar_type() == torch::kFloat32 && dk.scalar_type() == torch::kFloat32 &&
                  dv.scalar_type() == torch::kFloat32 && go.is_contiguous() && o.is_contiguous() &&
                  dq.is_contiguous() && dk.is_contiguous() && dv.is_contiguous() && k.size(0) * group == G,
              "table_backward_selected: contiguous fp32 go, o and gradients");
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "table_backward_selected: head_dim must be 32, 64 or 128");
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  const int32_t* I = idx.data_ptr<int32_t>();
  const int32_t* Bd = bounds.data_ptr<int32_t>();
  const float* GO = go.data_ptr<float>();
  const float* OO = o.data_ptr<float>();
  const float* L = lse.data_ptr<float>();
  float* DQ = dq.data_ptr<float>();
  float* DK = dk.data_ptr<float>();
  float* DV = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, G / group, 1, [&](int64_t b, int64_t e) {
    std::vector<float> Dr;
    for (int64_t x = b; x < e; ++x) {
      for (int64_t g = x * group; g < (x + 1) * group; ++g) {
        const int64_t qo = g * n * d, ko = x * n * d;
        const int32_t* Ig = I + g * n * R;
        const int32_t* Bg = Bd + g * n * (nch + 1);
        if (d == 32)
          table_blocked_backward_item<2>(Q + qo, K + ko, V + ko, Ig, Bg, R, nch, 0, n, sc, GO + qo, OO + qo, L + g * n, DQ + qo, DK + ko, DV + ko, Dr);
        else if (d == 64)
          table_blocked_backward_item<4>(Q + qo, K + ko, V + ko, Ig, Bg, R, nch, 0, n, sc, GO + qo, OO + qo, L + g * n, DQ + qo, DK + ko, DV + ko, Dr);
        else
          table_blocked_backward_item<8>(Q + qo, K + ko, V + ko, Ig, Bg, R, nch, 0, n, sc, GO + qo, OO + qo, L + g * n, DQ + qo, DK + ko, DV + ko, Dr);
      }
    }
  });
}

std::vector<torch::Tensor> table_forward_selected(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                                  torch::Tensor bounds, int64_t group, double scale) {
  return by_dtype("table_forward_selected", q, {k, v}, [&](auto z) {
    return table_forward_selected_t<decltype(z)>(q, k, v, idx, bounds, group, scale);
  });
}

void table_backward_selected(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx, torch::Tensor bounds,
                             int64_t group, double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                             torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  by_dtype("table_backward_selected", q, {k, v}, [&](auto z) {
    table_backward_selected_t<decltype(z)>(q, k, v, idx, bounds, group, scale, go, o, lse, dq, dk, dv);
  });
}

// Token selection (topk_keys' indexer): per query row i, its `keys` earlier keys j < i with the
// highest score qi_i . ki_j (all of them when there are fewer; of equal scores the earlier key
// first), then i itself, ascending, -1 padding to keys + 1.
//
// Each row keeps a candidate list (scores and positions, in key order) of the scores at or above
// its threshold:
// * the threshold starts from a sample (whole tiles spread over the keys every row of the block
//   sees), a little below the row's keys-th score there; a row whose sample misled (fewer
//   candidates than it needs at the end) is scored again with no threshold (the fallback);
// * a list that grows past 2 * keys is cut to its exact best `keys` (ties to the earlier key) and
//   its threshold raised above the keys-th score: a later key must beat it, an equal one comes
//   later and loses the tie. So a list never holds more than ~2 * keys, whatever the sample.
// The keys-th score of a list is found by bisection on order-preserving uint32 keys of its scores
// (-0 taken as +0: a >= b as floats iff key(a) >= key(b) as unsigned integers), counting the keys
// at or above a value with one vector compare and a popcount: no sort.

// order-preserving uint32 keys of 16 scores
inline __m512i order_keys(__m512 x) {
  const __m512i b = _mm512_castps_si512(_mm512_add_ps(x, _mm512_setzero_ps()));  // -0 -> +0
  return _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(INT32_MIN)));
}

// the score whose key is t
inline float from_key(uint32_t t) {
  const uint32_t b = (t & 0x80000000u) ? (t ^ 0x80000000u) : ~t;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1); }

// how many of u[0 .. c - 1] are >= t (unsigned)
inline int64_t count_at_least(const uint32_t* u, int64_t c, uint32_t t) {
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(t));
  int64_t a = 0, b = 0, j = 0;
  for (; j + 32 <= c; j += 32) {
    a += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(u + j), tv));
    b += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(u + j + 16), tv));
  }
  for (; j < c; j += 16) {
    const __mmask16 m = lanes(c - j);
    a += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(m, _mm512_maskz_loadu_epi32(m, u + j), tv));
  }
  return a + b;
}

// The key t of the k-th largest of the scores v[0 .. c - 1] (1 <= k <= c): count(>= t) >= k >
// count(> t); `above` gets count(> t). The scores' keys go to `scratch` (room for 2 c + 32); a
// bisection between the least and the greatest; once few keys lie between the bounds
// (lo <= u < hi), they are copied behind the others and the bisection goes on over them alone.
inline uint32_t kth_largest(const float* v, int64_t c, int64_t k, int64_t& above, uint32_t* scratch) {
  uint32_t* u = scratch;
  __m512i lo_v = _mm512_set1_epi32(-1), hi_v = _mm512_setzero_si512();
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 m = lanes(c - j);
    const __m512i x = order_keys(_mm512_maskz_loadu_ps(m, v + j));
    _mm512_storeu_si512(u + j, x);
    lo_v = _mm512_mask_min_epu32(lo_v, m, lo_v, x);
    hi_v = _mm512_mask_max_epu32(hi_v, m, hi_v, x);
  }
  scratch += c + 16;
  uint64_t lo = _mm512_reduce_min_epu32(lo_v), hi = static_cast<uint64_t>(_mm512_reduce_max_epu32(hi_v)) + 1;
  int64_t at_lo = c, at_hi = 0;  // count(>= lo) >= k > count(>= hi)
  const uint32_t* a = u;         // keys of the current set; count(>= x) = base + count in a, lo <= x <= hi
  int64_t na = c, base = 0;
  while (hi - lo > 1) {
    if (a == u && (at_lo - at_hi) * 8 <= c && c > 64) {  // few left between the bounds: only those
      const __m512i lv = _mm512_set1_epi32(static_cast<int>(lo)), hv = _mm512_set1_epi32(static_cast<int>(hi - 1));
      int64_t w = 0;
      for (int64_t j = 0; j < c; j += 16) {
        const __mmask16 m = lanes(c - j);
        const __m512i x = _mm512_maskz_loadu_epi32(m, u + j);
        const __mmask16 in = _mm512_mask_cmple_epu32_mask(_mm512_mask_cmpge_epu32_mask(m, x, lv), x, hv);
        _mm512_storeu_si512(scratch + w, _mm512_maskz_compress_epi32(in, x));
        w += __builtin_popcount(in);
      }
      a = scratch;
      na = w;
      base = at_hi;
    }
    const uint64_t mid = lo + (hi - lo) / 2;
    const int64_t cm = base + count_at_least(a, na, static_cast<uint32_t>(mid));
    if (cm >= k) { lo = mid; at_lo = cm; }
    else { hi = mid; at_hi = cm; }
  }
  above = at_hi;
  return static_cast<uint32_t>(lo);
}

// Keeps, in order, the entries with v > t and the first `equal` with v == t: positions to po
// (and scores to vo when given), written with masked stores (po may be pos: in place); returns how
// many.
inline int64_t keep_best(const float* v, const int32_t* pos, int64_t c, float t, int64_t equal, float* vo,
                         int32_t* po) {
  const __m512 tv = _mm512_set1_ps(t);
  int64_t w = 0;
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 m = lanes(c - j);
    const __m512 x = _mm512_maskz_loadu_ps(m, v + j);
    const __m512i p = _mm512_maskz_loadu_epi32(m, pos + j);
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, x, tv, _CMP_GT_OQ);
    unsigned eq = _mm512_mask_cmp_ps_mask(m, x, tv, _CMP_EQ_OQ);
    if (eq) {
      unsigned kept = 0;
      for (; eq && equal > 0; --equal) { kept |= eq & (0u - eq); eq &= eq - 1; }  // the lowest ones
      eq = kept;
    }
    const __mmask16 keep = static_cast<__mmask16>(gt | eq);
    const int kn = __builtin_popcount(keep);
    const __mmask16 out = lanes(kn);
    _mm512_mask_storeu_epi32(po + w, out, _mm512_maskz_compress_epi32(keep, p));
    if (vo) _mm512_mask_storeu_ps(vo + w, out, _mm512_maskz_compress_ps(keep, x));
    w += kn;
  }
  return w;
}

// One query row's candidate list.
struct TopRow {
  float* v;
  int32_t* pos;
  int64_t c;
  float th;  // scores below it are never kept
};

// Cut a list to its best `keys` (ties to the earlier key); later keys must score above the cut.
inline void cut_list(TopRow& row, int64_t keys, uint32_t* scratch) {
  int64_t above = 0;
  const uint32_t t = kth_largest(row.v, row.c, keys, above, scratch);
  row.c = keep_best(row.v, row.pos, row.c, from_key(t), keys - above, row.v, row.pos);
  row.th = from_key(t + 1);  // the next score up (t < 2^32 - 1: the keys of finite floats stop below +inf's)
}

// Adds the scores s[0 .. 31] of keys j0 .. j0 + 31 that row i sees (j < i) and that reach its threshold.
inline void keep_tile(const float* s, int64_t j0, int64_t i, TopRow& row, int64_t keys, uint32_t* scratch) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 th = _mm512_set1_ps(row.th);
  for (int half = 0; half < 2; ++half) {
    const int64_t jh = j0 + 16 * half;
    if (jh >= i) break;
    const __m512 x = _mm512_loadu_ps(s + 16 * half);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes(i - jh), x, th, _CMP_GE_OQ);
    _mm512_storeu_ps(row.v + row.c, _mm512_maskz_compress_ps(keep, x));
    _mm512_storeu_si512(row.pos + row.c,
                        _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(jh)))));
    row.c += __builtin_popcount(keep);
  }
  if (row.c > 2 * keys) cut_list(row, keys, scratch);
}

// qk_tile and keep_tile in one, for RB rows that all see every key of the tile (no mask): the
// scores go from the registers straight into the lists.
inline void qk_keep_full(const float* __restrict q, const float* __restrict kt, int64_t d, int64_t j0, TopRow* rows,
                         int64_t keys, uint32_t* scratch) {
  __m512 a0[RB], a1[RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  for (int64_t c = 0; c < d; ++c) {
    const __m512 k0 = _mm512_loadu_ps(kt + c * KT);
    const __m512 k1 = _mm512_loadu_ps(kt + c * KT + 16);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * d + c]);
      a0[r] = _mm512_fmadd_ps(qb, k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(qb, k1, a1[r]);
    }
  }
  const __m512i p0 = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32(static_cast<int>(j0)));
  const __m512i p1 = _mm512_add_epi32(p0, _mm512_set1_epi32(16));
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    TopRow& row = rows[r];
    const __m512 th = _mm512_set1_ps(row.th);
    const __mmask16 m0 = _mm512_cmp_ps_mask(a0[r], th, _CMP_GE_OQ), m1 = _mm512_cmp_ps_mask(a1[r], th, _CMP_GE_OQ);
    int64_t c = row.c;
    _mm512_storeu_ps(row.v + c, _mm512_maskz_compress_ps(m0, a0[r]));
    _mm512_storeu_si512(row.pos + c, _mm512_maskz_compress_epi32(m0, p0));
    c += __builtin_popcount(m0);
    _mm512_storeu_ps(row.v + c, _mm512_maskz_compress_ps(m1, a1[r]));
    _mm512_storeu_si512(row.pos + c, _mm512_maskz_compress_epi32(m1, p1));
    row.c = c + __builtin_popcount(m1);
    if (row.c > 2 * keys) cut_list(row, keys, scratch);
  }
}

constexpr int64_t SEL_ROWS = 64;          // query rows per pass over a segment of keys (8 register blocks)
constexpr int64_t SEL_SEGMENT = 1 << 18;  // bytes of packed keys per segment (stay in L2 across the passes)
constexpr int64_t SEL_SAMPLE = 32;        // tiles of the threshold's sample (1024 keys)

// Scores rows [i0, i0 + nr) (q rows q[r * e], RB more readable rows past nr) against the packed
// keys pk (tiles of KT keys, e x KT each), segment by segment, into their lists.
inline void score_rows(const float* q, int64_t nr, int64_t i0, const float* pk, int64_t e, int64_t keys, TopRow* rows,
                       float* s, uint32_t* scratch) {
  const int64_t last = i0 + nr - 1, tiles = (last + KT - 1) / KT;  // tiles holding keys j < last
  const int64_t seg = std::max<int64_t>(1, SEL_SEGMENT / (KT * e * 4));
  for (int64_t t0 = 0; t0 < tiles; t0 += seg) {
    const int64_t t1 = std::min(tiles, t0 + seg);
    for (int64_t rb = 0; rb < nr; rb += RB) {
      const int64_t rn = std::min<int64_t>(RB, nr - rb), rlast = i0 + rb + rn - 1;
      for (int64_t t = t0; t < t1 && t * KT < rlast; ++t) {
        if (rn == RB && (t + 1) * KT <= i0 + rb) {  // every row sees the whole tile
          qk_keep_full(q + rb * e, pk + t * e * KT, e, t * KT, rows + rb, keys, scratch);
          continue;
        }
        qk_tile(q + rb * e, pk + t * e * KT, e, s, KT);
        for (int64_t r = 0; r < rn; ++r) keep_tile(s + r * KT, t * KT, i0 + rb + r, rows[rb + r], keys, scratch);
      }
    }
  }
}

// Thresholds of rows [i0, i0 + nr) from a sample of whole tiles below i0 (which every row sees;
// up to SEL_SAMPLE tiles, a quarter of them at most): a little below each row's keys-th score
// there (its share keys / i of the sample, plus three standard deviations and 8); -inf (keep
// every score) where the rows keep half of their keys or more, or where fewer than 2 tiles lie below.
inline void sample_thresholds(const float* q, int64_t nr, int64_t i0, const float* pk, int64_t e, int64_t keys,
                              TopRow* rows, float* samp, uint32_t* us) {
  const int64_t full = i0 / KT, ns_t = std::min<int64_t>(SEL_SAMPLE, full / 4), ns = ns_t * KT;
  for (int64_t r = 0; r < nr; ++r) rows[r].th = -std::numeric_limits<float>::infinity();
  if (i0 <= 2 * keys || ns_t < 2) return;
  for (int64_t rb = 0; rb < nr; rb += RB) {
    for (int64_t s = 0; s < ns_t; ++s) qk_tile(q + rb * e, pk + (s * full / ns_t) * e * KT, e, samp + s * KT, ns);
    for (int64_t r = rb; r < std::min<int64_t>(nr, rb + RB); ++r) {
      const double want = static_cast<double>(keys) / (i0 + r) * ns;
      const int64_t rank = std::min<int64_t>(ns, static_cast<int64_t>(want + 3 * std::sqrt(want) + 8));
      int64_t above = 0;
      rows[r].th = from_key(kth_largest(samp + (r - rb) * ns, ns, rank, above, us));
    }
  }
}

// topk_keys' selection from its indexer's projections: qi (B, H, n, e), ki (B, Hkv, n, e) fp32
// (query head h reads ki's head h / (H / Hkv)), e a multiple of 16; (B, H, n, keys + 1) int32.
// ki is packed once in 32-key tiles; a work item scores SEL_ROWS query rows (register blocks of
// 8) against one L2-sized segment of tiles after another, so that ki is read from memory once per
// SEL_ROWS rows, and each tile's scores go straight into the rows' lists (no score matrix).
torch::Tensor select_top_keys(torch::Tensor qi, torch::Tensor ki, int64_t keys) {
  TORCH_CHECK(qi.dim() == 4 && ki.dim() == 4 && qi.is_contiguous() && ki.is_contiguous() &&
                  qi.scalar_type() == torch::kFloat32 && ki.scalar_type() == torch::kFloat32 && keys >= 1 &&
                  qi.size(3) % 16 == 0 && ki.size(3) == qi.size(3) && ki.size(2) == qi.size(2) &&
                  ki.size(1) > 0 && qi.size(1) % ki.size(1) == 0,
              "select_top_keys: contiguous fp32 qi (B, H, n, e), ki (B, Hkv, n, e), e a multiple of 16, keys >= 1");
  const int64_t B = qi.size(0), H = qi.size(1), n = qi.size(2), e = qi.size(3), Hkv = ki.size(1);
  const int64_t group = H / Hkv, ntiles = (n + KT - 1) / KT;
  auto out = torch::empty({B, H, n, keys + 1}, qi.options().dtype(torch::kInt32));
  const float* QI = qi.data_ptr<float>();
  const float* KI = ki.data_ptr<float>();
  int32_t* O = out.data_ptr<int32_t>();
  std::vector<float> packed(B * Hkv * ntiles * e * KT);  // ki in tiles, per kv sequence
  at::parallel_for(0, B * Hkv * ntiles, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t t = b0; t < b1; ++t) {
      const int64_t x = t / ntiles, tile = t % ntiles;
      pack_tile(StridedRows{KI + (x * n + tile * KT) * e, e}, std::min<int64_t>(KT, n - tile * KT), e,
                packed.data() + t * e * KT);
    }
  });
  // work items: a block of rows and its mirror from the end (every item costs about the same)
  const int64_t blocks = (n + SEL_ROWS - 1) / SEL_ROWS, pairs = (blocks + 1) / 2;
  const int64_t cap = 2 * keys + 64;  // a list: at most 2 * keys + 32 entries, 16 writable past them
  at::parallel_for(0, B * H * pairs, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qbuf((SEL_ROWS + RB) * e, 0.f), s(RB * KT), samp(RB * SEL_SAMPLE * KT);
    std::vector<float> vbuf(SEL_ROWS * cap);
    std::vector<uint32_t> us(2 * SEL_SAMPLE * KT + 32), scratch(2 * cap + 32);
    std::vector<int32_t> pbuf(SEL_ROWS * cap);
    TopRow rows[SEL_ROWS];
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t g = item / pairs, pair = item % pairs;
      const int64_t x = (g / H) * Hkv + (g % H) / group;
      const float* pk = packed.data() + x * ntiles * e * KT;
      for (int64_t blk : {pair, blocks - 1 - pair}) {
        const int64_t i0 = blk * SEL_ROWS, nr = std::min<int64_t>(SEL_ROWS, n - i0);
        std::copy(QI + (g * n + i0) * e, QI + (g * n + i0 + nr) * e, qbuf.data());
        std::fill(qbuf.begin() + nr * e, qbuf.end(), 0.f);
        for (int64_t r = 0; r < nr; ++r) rows[r] = TopRow{vbuf.data() + r * cap, pbuf.data() + r * cap, 0, 0.f};
        sample_thresholds(qbuf.data(), nr, i0, pk, e, keys, rows, samp.data(), us.data());
        score_rows(qbuf.data(), nr, i0, pk, e, keys, rows, s.data(), scratch.data());
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r;
          TopRow& row = rows[r];
          if (row.c < std::min(keys, i)) {  // the sample misled: this row again, every score
            row.c = 0;
            row.th = -std::numeric_limits<float>::infinity();
            score_rows(qbuf.data() + r * e, 1, i, pk, e, keys, &row, s.data(), scratch.data());
          }
          int32_t* o = O + (g * n + i) * (keys + 1);
          int64_t w;
          if (row.c <= keys) {
            std::copy(row.pos, row.pos + row.c, o);
            w = row.c;
          } else {
            int64_t above = 0;
            const uint32_t t = kth_largest(row.v, row.c, keys, above, scratch.data());
            w = keep_best(row.v, row.pos, row.c, from_key(t), keys - above, nullptr, o);
          }
          o[w++] = static_cast<int32_t>(i);
          for (; w < keys + 1; ++w) o[w] = -1;
        }
        if (blocks - 1 - pair == pair) break;
      }
    }
  });
  return out;
}

bool has_window() { return true; }
#else
std::vector<torch::Tensor> window_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                          torch::Tensor lo_t, torch::Tensor hi_t, double scale, torch::Tensor out_in,
                                          torch::Tensor lse_in) {
  TORCH_CHECK(false, "window_forward needs AVX-512");
  return {};
}
std::vector<torch::Tensor> gather_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                          torch::Tensor lo_t, torch::Tensor hi_t, double scale, torch::Tensor out_in,
                                          torch::Tensor lse_in) {
  TORCH_CHECK(false, "gather_forward needs AVX-512");
  return {};
}
void window_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lo_t, torch::Tensor hi_t,
                     double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                     torch::Tensor dq, torch::Tensor dk, torch::Tensor dv, torch::Tensor idx,
                     torch::Tensor lm_t) {
  TORCH_CHECK(false, "window_backward needs AVX-512");
}
std::vector<torch::Tensor> table_forward_blocked(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                 torch::Tensor idx, torch::Tensor bounds, int64_t row0,
                                                 double scale, torch::Tensor out_in) {
  TORCH_CHECK(false, "table_forward_blocked needs AVX-512");
  return {};
}
void table_backward_blocked(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx, torch::Tensor bounds,
                            int64_t row0, double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                            torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  TORCH_CHECK(false, "table_backward_blocked needs AVX-512");
}
std::vector<torch::Tensor> unit_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor index,
                                        int64_t unit, int64_t qblock, double scale) {
  TORCH_CHECK(false, "unit_forward needs AVX-512");
  return {};
}
std::vector<torch::Tensor> table_forward_selected(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                                  torch::Tensor bounds, int64_t group, double scale) {
  TORCH_CHECK(false, "table_forward_selected needs AVX-512");
  return {};
}
void table_backward_selected(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx, torch::Tensor bounds,
                             int64_t group, double scale, torch::Tensor go, torch::Tensor o, torch::Tensor lse,
                             torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  TORCH_CHECK(false, "table_backward_selected needs AVX-512");
}
torch::Tensor select_top_keys(torch::Tensor qi, torch::Tensor ki, int64_t keys) {
  TORCH_CHECK(false, "select_top_keys needs AVX-512");
  return {};
}
bool has_window() { return false; }
#endif

// ---- moba's and quest's unit selection (select_top_units): plain loops the compiler vectorises, so
// every build has it (the work is small: a query row scores at most the few hundred earlier units).
constexpr int64_t UNIT_LANES = 16;     // units per packed tile of summaries (one vector of scores)
constexpr int64_t UNIT_RB = 8;         // query rows scored together (a register block of 8 x 16 scores)
constexpr int64_t UNIT_LIST_MAX = 8;   // up to this many kept units: a running sorted list; more: bisection

// Summaries S (X, full, d) into tiles of UNIT_LANES units, d x UNIT_LANES each (zeros past `full`).
static void pack_units(const float* S, int64_t X, int64_t full, int64_t d, int64_t tiles, float* P) {
  at::parallel_for(0, X * tiles, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t x = t / tiles, u0 = (t % tiles) * UNIT_LANES;
      float* out = P + t * d * UNIT_LANES;
      for (int64_t l = 0; l < UNIT_LANES; ++l) {
        const int64_t u = u0 + l;
        for (int64_t c = 0; c < d; ++c) out[c * UNIT_LANES + l] = u < full ? S[(x * full + u) * d + c] : 0.f;
      }
    }
  });
}

// The scores of UNIT_RB query rows against one tile of units, into out (UNIT_RB rows of `stride`):
// "dot": sum_c q_c hi_c (hi: the units' means); "bound": sum_c max(q_c lo_c, q_c hi_c), as
// sum_c (max(q_c, 0) hi_c + min(q_c, 0) lo_c) (qp, qn: the rows' positive and negative parts).
// The bound's two sums are kept apart and added at the end, as torch's two products are. With AVX-512
// the register blocks are written out (8 or 16 vectors of scores); elsewhere the loops below.
template <bool BOUND>
static inline void score_unit_tile(const float* __restrict qp, const float* __restrict qn, const float* __restrict hi,
                                   const float* __restrict lo, int64_t d, float* __restrict out, int64_t stride) {
#if defined(__AVX512F__)
  __m512 a[UNIT_RB], b[UNIT_RB];
#pragma GCC unroll 8
  for (int r = 0; r < UNIT_RB; ++r) { a[r] = _mm512_setzero_ps(); b[r] = _mm512_setzero_ps(); }
  for (int64_t c = 0; c < d; ++c) {
    const __m512 h = _mm512_loadu_ps(hi + c * UNIT_LANES);
    const __m512 w = BOUND ? _mm512_loadu_ps(lo + c * UNIT_LANES) : h;
#pragma GCC unroll 8
    for (int r = 0; r < UNIT_RB; ++r) {
      a[r] = _mm512_fmadd_ps(_mm512_set1_ps(qp[r * d + c]), h, a[r]);
      if (BOUND) b[r] = _mm512_fmadd_ps(_mm512_set1_ps(qn[r * d + c]), w, b[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < UNIT_RB; ++r) _mm512_storeu_ps(out + r * stride, BOUND ? _mm512_add_ps(a[r], b[r]) : a[r]);
#else
  float acc[UNIT_RB][UNIT_LANES], acc2[UNIT_RB][UNIT_LANES];
  for (int r = 0; r < UNIT_RB; ++r)
    for (int l = 0; l < UNIT_LANES; ++l) acc[r][l] = acc2[r][l] = 0.f;
  for (int64_t c = 0; c < d; ++c) {
    const float* h = hi + c * UNIT_LANES;
    const float* w = lo + c * UNIT_LANES;
    for (int r = 0; r < UNIT_RB; ++r) {
      const float a = qp[r * d + c];
#pragma omp simd
      for (int l = 0; l < UNIT_LANES; ++l) acc[r][l] += a * h[l];
      if (BOUND) {
        const float b = qn[r * d + c];
#pragma omp simd
        for (int l = 0; l < UNIT_LANES; ++l) acc2[r][l] += b * w[l];
      }
    }
  }
  for (int r = 0; r < UNIT_RB; ++r)
    for (int l = 0; l < UNIT_LANES; ++l) out[r * stride + l] = BOUND ? acc[r][l] + acc2[r][l] : acc[r][l];
#endif
}

// Into o (ascending): the `take` best of the scores s[0, count) (highest first, of equal scores the
// lower unit), take < count. Up to UNIT_LIST_MAX by a running list sorted by score (a unit enters only
// when it beats the list's last, and lands after the equal ones: they are lower units); more by the
// take-th score found by bisection on order-preserving keys (kth_largest, AVX-512), then one pass
// keeping the units above it and the lowest of those equal to it (keep_best: ascending already);
// elsewhere by nth_element over (score, unit). Exact either way. `keys`: room for 2 count + 32,
// `iota`: 0, 1, ... count - 1.
static void best_units(const float* s, int64_t count, int64_t take, float* lv, int32_t* li, uint32_t* keys,
                       const int32_t* iota, std::vector<std::pair<float, int32_t>>& all, int32_t* o) {
  if (take <= UNIT_LIST_MAX) {
    int64_t c = 0;
    for (int64_t u = 0; u < count; ++u) {
      const float x = s[u];
      if (c == take && !(x > lv[take - 1])) continue;
      int64_t p = c < take ? c++ : take - 1;
      for (; p > 0 && lv[p - 1] < x; --p) { lv[p] = lv[p - 1]; li[p] = li[p - 1]; }
      lv[p] = x;
      li[p] = static_cast<int32_t>(u);
    }
    std::copy(li, li + take, o);
    std::sort(o, o + take);
    return;
  }
#if defined(__AVX512F__)
  int64_t above = 0;
  const uint32_t t = kth_largest(s, count, take, above, keys);
  keep_best(s, iota, count, from_key(t), take - above, nullptr, o);
#else
  all.resize(count);
  for (int64_t u = 0; u < count; ++u) all[u] = {s[u], static_cast<int32_t>(u)};
  std::nth_element(all.begin(), all.begin() + (take - 1), all.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (int64_t r = 0; r < take; ++r) o[r] = all[r].second;
  std::sort(o, o + take);
#endif
}

// moba's and quest's selection: q (B, H, n, d) fp32; the summaries of the n / unit whole units of
// keys (B, Hkv, n / unit, d) fp32 (query head h reads kv head h / (H / Hkv)): "dot" (moba's gate)
// s0 = the units' means, s1 unused; "bound" (quest's) s0 = min, s1 = max. Per query head and row i,
// own unit u_i = i / unit: the `earlier` units u < u_i with the highest scores (all of them when
// fewer; of equal scores the lower unit), ascending, then u_i, then -1 padding: (B, H, n,
// min(earlier, ceil(n / unit) - 1) + 1) int32, as sparsebench.patterns.selection.select_units gives it.
// No score matrix: a work item scores UNIT_RB rows against the packed summaries (register blocks)
// into a row of scores per query row (at most n / unit floats each), then ranks each row.
torch::Tensor select_top_units(torch::Tensor q, torch::Tensor s0, torch::Tensor s1, int64_t unit, int64_t earlier,
                               std::string kind) {
  const bool bound = kind == "bound";
  TORCH_CHECK(bound || kind == "dot", "select_top_units: kind 'dot' or 'bound', not '", kind, "'");
  TORCH_CHECK(q.dim() == 4 && s0.dim() == 4 && q.is_contiguous() && s0.is_contiguous() &&
                  q.scalar_type() == torch::kFloat32 && s0.scalar_type() == torch::kFloat32 && unit >= 1 &&
                  earlier >= 0 && s0.size(0) == q.size(0) && s0.size(1) > 0 && q.size(1) % s0.size(1) == 0 &&
                  s0.size(2) == q.size(2) / unit && s0.size(3) == q.size(3),
              "select_top_units: contiguous fp32 q (B, H, n, d), summaries (B, Hkv, n / unit, d), unit >= 1");
  TORCH_CHECK(!bound || (s1.sizes() == s0.sizes() && s1.is_contiguous() && s1.scalar_type() == torch::kFloat32),
              "select_top_units: 'bound' needs min and max summaries of one shape");
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), Hkv = s0.size(1), full = s0.size(2);
  const int64_t group = H / Hkv, units = (n + unit - 1) / unit;
  const int64_t slots = std::min(earlier, units - 1) + 1;
  auto out = torch::empty({B, H, n, slots}, q.options().dtype(torch::kInt32));
  const float* Q = q.data_ptr<float>();
  int32_t* O = out.data_ptr<int32_t>();
  if (slots == 1) {  // the own unit only
    at::parallel_for(0, B * H * n, 4096, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) O[r] = static_cast<int32_t>((r % n) / unit);
    });
    return out;
  }
  const int64_t tiles = (full + UNIT_LANES - 1) / UNIT_LANES, tsize = d * UNIT_LANES;
  std::vector<float> phi(B * Hkv * tiles * tsize), plo(bound ? phi.size() : 0);
  pack_units(bound ? s1.data_ptr<float>() : s0.data_ptr<float>(), B * Hkv, full, d, tiles, phi.data());
  if (bound) pack_units(s0.data_ptr<float>(), B * Hkv, full, d, tiles, plo.data());
  const int64_t take_max = slots - 1, stride = tiles * UNIT_LANES;
  // work items: a block of rows and its mirror from the end (every item costs about the same)
  const int64_t blocks = (n + UNIT_RB - 1) / UNIT_RB, pairs = (blocks + 1) / 2;
  at::parallel_for(0, B * H * pairs, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qp(UNIT_RB * d), qn(bound ? UNIT_RB * d : 0), sc(UNIT_RB * stride), lv(take_max);
    std::vector<int32_t> li(take_max), iota(stride);
    std::vector<uint32_t> keys(2 * stride + 32);
    std::vector<std::pair<float, int32_t>> all;
    for (int64_t u = 0; u < stride; ++u) iota[u] = static_cast<int32_t>(u);
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t g = item / pairs, pair = item % pairs;
      const int64_t x = (g / H) * Hkv + (g % H) / group;
      const float* hi = phi.data() + x * tiles * tsize;
      const float* lo = bound ? plo.data() + x * tiles * tsize : hi;
      for (int64_t blk : {pair, blocks - 1 - pair}) {
        const int64_t i0 = blk * UNIT_RB, nr = std::min<int64_t>(UNIT_RB, n - i0);
        const int64_t m = (i0 + nr - 1) / unit;  // the units earlier than the block's last row's own
        if (m > 0) {
          const float* qg = Q + (g * n + i0) * d;
          for (int64_t t = 0; t < UNIT_RB * d; ++t) {
            const float a = t < nr * d ? qg[t] : 0.f;
            qp[t] = bound ? std::max(a, 0.f) : a;
            if (bound) qn[t] = std::min(a, 0.f);
          }
          for (int64_t t = 0; t * UNIT_LANES < m; ++t) {
            if (bound)
              score_unit_tile<true>(qp.data(), qn.data(), hi + t * tsize, lo + t * tsize, d, sc.data() + t * UNIT_LANES,
                                    stride);
            else
              score_unit_tile<false>(qp.data(), qp.data(), hi + t * tsize, hi + t * tsize, d,
                                     sc.data() + t * UNIT_LANES, stride);
          }
        }
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r, own = i / unit, take = std::min(take_max, own);
          int32_t* o = O + (g * n + i) * slots;
          if (take == own) {
            for (int64_t u = 0; u < own; ++u) o[u] = static_cast<int32_t>(u);
          } else {
            best_units(sc.data() + r * stride, own, take, lv.data(), li.data(), keys.data(), iota.data(), all, o);
          }
          o[take] = static_cast<int32_t>(own);
          for (int64_t w = take + 1; w < slots; ++w) o[w] = -1;
        }
        if (blocks - 1 - pair == pair) break;
      }
    }
  });
  return out;
}

// allocator.cpp: the caching CPU allocator, a separate translation unit of the same module
void cache_cpu_allocations(bool on);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("window_forward", torch::wrap_pybind_function(window_forward), "window_forward");
  m.def("gather_forward", torch::wrap_pybind_function(gather_forward), "gather_forward");
  m.def("window_backward", torch::wrap_pybind_function(window_backward), "window_backward");
  m.def("has_window", torch::wrap_pybind_function(has_window), "has_window");
  m.def("table_forward", torch::wrap_pybind_function(table_forward), "table_forward");
  m.def("table_backward", torch::wrap_pybind_function(table_backward), "table_backward");
  m.def("table_forward_blocked", torch::wrap_pybind_function(table_forward_blocked), "table_forward_blocked");
  m.def("table_backward_blocked", torch::wrap_pybind_function(table_backward_blocked), "table_backward_blocked");
  m.def("table_bounds", torch::wrap_pybind_function(table_bounds), "table_bounds");
  m.def("select_top_keys", torch::wrap_pybind_function(select_top_keys), "select_top_keys");
  m.def("select_top_units", torch::wrap_pybind_function(select_top_units), "select_top_units");
  m.def("unit_forward", torch::wrap_pybind_function(unit_forward), "unit_forward");
  m.def("table_forward_selected", torch::wrap_pybind_function(table_forward_selected), "table_forward_selected");
  m.def("table_backward_selected", torch::wrap_pybind_function(table_backward_selected), "table_backward_selected");
  m.def("cache_cpu_allocations", torch::wrap_pybind_function(cache_cpu_allocations), "cache_cpu_allocations");
}
