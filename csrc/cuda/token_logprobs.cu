// CUDA kernels of the token log-prob family: token log-probs (+ entropy) and SFT cross-entropy,
// forward and backward. Torch-free: raw device buffers, see cuda/token_logprobs.h for the contract.
//
// Layout of every kernel
//   * One thread block per row: grid.x = n_rows (up to 2^31 - 1 rows; rows never go on grid.y/z),
//     blockDim.x in {32, 64, 128, 256} picked from the vocabulary size (launch_threads()).
//   * Row offsets are int64 (row * row_stride, row * vocab, row * k); indices inside one row are
//     int (vocab < 2^31 is checked on the host).
//   * A row is streamed once (forward: read; backward: read logits + write the gradient once).
//     16-byte vector loads (4 x fp32 or 8 x bf16/fp16) cover the 16-byte aligned body of the row;
//     the unaligned head (< 8 elements, present when row_stride or the base pointer is not a
//     multiple of 16 bytes) and the tail (< 8 elements) use scalar loads. So every row is
//     vectorized whatever its alignment; a fully aligned row simply has no head. In the backward
//     the gradient is stored with vector stores when its row has the same 16-byte phase as the
//     logits row, with scalar stores from the same registers otherwise.
//   * Each thread keeps an online log-sum-exp state (m = running max, s = sum exp(x - m), and a
//     third accumulator t, see Stats) over its elements, updated once per chunk of 16 values (one
//     rescale exp per chunk, tree sums inside the chunk). The per-thread states are merged by a
//     warp-shuffle butterfly and then across warps through shared memory (block_allreduce).
//   * All arithmetic is fp32 whatever the input dtype. exp is computed as ex2.approx.ftz(d*log2e)
//     of a non-positive difference d = x - max (relative error ~2^-22, independent of
//     --use_fast_math), and tanh by an explicit branch-free formula, so -use_fast_math (used by
//     CMakeLists.txt) cannot swap in tanh.approx (2^-11 relative error).
//   * -inf logits: running maxima start at -FLT_MAX (never 0), so they are always finite, and
//     differences x - m are clamped to >= -FLT_MAX: exp gives exactly 0 and every p * d product is
//     0 * finite; no nan appears for rows with -inf entries. nan logits still propagate (the clamp
//     keeps nan; fmaxf-based maxima ignore it, the differences do not). A non-ignored row of only
//     -inf logits has no distribution: lse = -inf and nan log-probs / entropy / loss / gradient,
//     as in the reference.
//   * Ignored rows (token_logprobs: all k labels == ignore_index; cross_entropy: label ==
//     ignore_index) skip the vocabulary pass: forward writes 0 outputs, backward writes a 0 row.
//   * Labels that are neither ignore_index nor in [0, vocab) are a caller error (validated in
//     Python); the kernels never read out of bounds for them: forward writes nan for that label's
//     log-prob / loss, backward gives them no one-hot term (their grad still counts in G).
#include "cuda/token_logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace ptk {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;        // threads per block for large vocabularies
constexpr int kMinThreads = 32;         // one warp for tiny vocabularies
// Resident blocks per SM the kernels are compiled for: caps registers at 64 per thread. Without
// it ptxas (CUDA 13) picks an occupancy-driven budget of 32-48 registers and spills in some
// kernels. 4 x 256 threads with 2-4 16-byte loads in flight each (32-64 KiB per SM) should cover
// the HBM latency-bandwidth product (not measured yet: no GPU where this was written).
constexpr int kMinBlocksPerSm = 4;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kLabelSmemCap = 1024;     // token backward: labels per row staged + sorted in smem
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// Scalar math helpers (flag-independent: same results with and without --use_fast_math).
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// 2^y (PTX ex2.approx.ftz: relative error ~2^-22; -inf -> +0; subnormal results flushed to 0).
__device__ __forceinline__ float ex2_approx(float y) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// 1/y (PTX rcp.approx.ftz: <= 1 ulp; inf -> 0).
__device__ __forceinline__ float rcp_approx(float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// exp(d) for d <= 0 (d = -FLT_MAX gives exactly 0). Callers pass d = x - max, clamped.
__device__ __forceinline__ float exp_nonpos(float d) { return ex2_approx(d * kLog2e); }

// x - m for a finite m, with x = -inf mapped to -FLT_MAX so that exp_nonpos(.) == 0 and
// 0 * (.) == 0 instead of nan. A nan x (or m) stays nan (unlike fmaxf, which would drop it).
__device__ __forceinline__ float clamped_diff(float x, float m) {
  const float d = x - m;
  return d < -FLT_MAX ? -FLT_MAX : d;
}

// tanh(u) within ~2 ulp, branch-free; +-inf -> +-1, nan -> nan. Same scheme as CUDA's precise
// tanhf (which --use_fast_math would replace by tanh.approx): |u| < 0.6: u + u^3 P(u^2), P a
// degree-4 least-squares fit (0.78 ulp on [0, 0.6]); otherwise 1 - 2 / (exp(2|u|) + 1) (1.7 ulp
// with exact exp / division, checked on the host; ex2/rcp.approx add about 1 ulp).
__device__ __forceinline__ float tanh_accurate(float u) {
  const float a = fabsf(u);
  const float e = ex2_approx((2.0f * kLog2e) * a);          // inf for |u| > ~44 -> result 1
  const float big = copysignf(fmaf(-2.0f, rcp_approx(e + 1.0f), 1.0f), u);
  const float w = u * u;
  float p = -5.883233156055212e-3f;
  p = fmaf(p, w, 2.0785147324204445e-2f);
  p = fmaf(p, w, -5.378039926290512e-2f);
  p = fmaf(p, w, 1.3331879675388336e-1f);
  p = fmaf(p, w, -3.3333295583724976e-1f);
  const float small = fmaf(u * w, p, u);
  return a < 0.6f ? small : big;
}

// ------------------------------------------------------------------------------------------------
// Dtype traits: 16-byte vectors (kVec elements) and kUnroll vectors in flight per thread, so that
// one chunk is always kVec * kUnroll = 16 values.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int kVec = 4;
  static constexpr int kUnroll = 4;
};
template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static constexpr int kUnroll = 2;
};
template <>
struct VecTraits<__half> {
  static constexpr int kVec = 8;
  static constexpr int kUnroll = 2;
};

#include "cuda/vec_io.inc"

// Scalar load (read-only path) upcast to fp32.
__device__ __forceinline__ float load_scalar(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_scalar(const __nv_bfloat16* p) {
  const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
  return __uint_as_float(static_cast<unsigned>(bits) << 16);
}
__device__ __forceinline__ float load_scalar(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// One 16-byte vector to kVec fp32 values.
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[4]) {
  x[0] = __uint_as_float(raw.x);
  x[1] = __uint_as_float(raw.y);
  x[2] = __uint_as_float(raw.z);
  x[3] = __uint_as_float(raw.w);
}
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[8]) {
  unpack2(raw.x, x[0], x[1], static_cast<T*>(nullptr));
  unpack2(raw.y, x[2], x[3], static_cast<T*>(nullptr));
  unpack2(raw.z, x[4], x[5], static_cast<T*>(nullptr));
  unpack2(raw.w, x[6], x[7], static_cast<T*>(nullptr));
}
template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float (&x)[VecTraits<T>::kVec]) {
  if constexpr (VecTraits<T>::kVec == 4) {
    unpack(raw, x);
  } else {
    unpack<T>(raw, x);
  }
}

template <int M>
__device__ __forceinline__ float tree_sum(float (&v)[M]) {
#pragma unroll
  for (int w = 1; w < M; w *= 2) {
#pragma unroll
    for (int i = 0; i + w < M; i += 2 * w) v[i] += v[i + w];
  }
  return v[0];
}

// ------------------------------------------------------------------------------------------------
// Online log-sum-exp state and its reductions.
// ------------------------------------------------------------------------------------------------

// What the third accumulator t of Stats holds.
enum class Extra {
  kNone,     // t unused
  kShifted,  // t = sum_j exp(x_j - m) * (x_j - m)   (entropy: H = log s - t / s)
  kPlain,    // t = sum_j (x_j - ref)                (label smoothing: mean x = ref + t / V)
};

// m = running max of x (-FLT_MAX while empty or all -inf: like -inf for the algebra, but no
// x - m difference can be (-inf) - (-inf)), s = sum exp(x_j - m), t as above. For kShifted,
// moving the reference from m to m' >= m is t' = a * (t + (m - m') * s), s' = a * s,
// a = exp(m - m'). Keeping t relative to the max (instead of sum exp(x_j - m) x_j, then
// H = m + log s - t/s) avoids the cancellation of two ~|x| sized terms when |logits| ~ 1e4.
struct Stats {
  float m, s, t;
};

__device__ __forceinline__ Stats empty_stats() { return Stats{-FLT_MAX, 0.0f, 0.0f}; }

// Folds one chunk of U x N transformed values into the thread's state: one rescale per chunk.
template <Extra E, int U, int N>
__device__ __forceinline__ void accumulate(Stats& st, const float (&x)[U][N], float ref) {
  float cm = x[0][0];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int n = 0; n < N; ++n) cm = fmaxf(cm, x[u][n]);
  const float nm = fmaxf(st.m, cm);
  const float d_old = clamped_diff(st.m, nm);
  const float a = exp_nonpos(d_old);
  float e[U * N];
  float et[U * N];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float d = clamped_diff(x[u][n], nm);
      e[u * N + n] = exp_nonpos(d);
      if constexpr (E == Extra::kShifted) et[u * N + n] = e[u * N + n] * d;
      if constexpr (E == Extra::kPlain) et[u * N + n] = x[u][n] - ref;
    }
  }
  const float cs = tree_sum(e);
  if constexpr (E == Extra::kShifted) {
    // a * d_old is 0 whenever a is (also for d_old = -FLT_MAX), so no 0 * inf.
    st.t = fmaf(a * d_old, st.s, a * st.t) + tree_sum(et);
  } else if constexpr (E == Extra::kPlain) {
    st.t += tree_sum(et);
  }
  st.s = fmaf(st.s, a, cs);
  st.m = nm;
}

// Merge of two states (both maxima >= -FLT_MAX).
template <Extra E>
__device__ __forceinline__ Stats combine(const Stats& a, const Stats& b) {
  Stats r;
  r.m = fmaxf(a.m, b.m);
  const float da = clamped_diff(a.m, r.m);
  const float db = clamped_diff(b.m, r.m);
  const float ea = exp_nonpos(da);
  const float eb = exp_nonpos(db);
  r.s = fmaf(a.s, ea, b.s * eb);
  if constexpr (E == Extra::kShifted) {
    r.t = fmaf(ea * da, a.s, ea * a.t) + fmaf(eb * db, b.s, eb * b.t);
  } else if constexpr (E == Extra::kPlain) {
    r.t = a.t + b.t;
  } else {
    r.t = 0.0f;
  }
  return r;
}

template <Extra E>
struct StatsCombine {
  __device__ __forceinline__ Stats operator()(const Stats& a, const Stats& b) const {
    return combine<E>(a, b);
  }
};

__device__ __forceinline__ Stats shfl_xor(const Stats& v, int lane_mask) {
  return Stats{__shfl_xor_sync(kFullMask, v.m, lane_mask),
               __shfl_xor_sync(kFullMask, v.s, lane_mask),
               __shfl_xor_sync(kFullMask, v.t, lane_mask)};
}

// Per-row aggregate of the labels in the token backward.
struct LabelAgg {
  float g_sum;  // G = sum of grad_logp over non-ignored labels
  int kmin;     // smallest in-range label (INT_MAX if none)
  int kmax;     // largest in-range label (-1 if none)
};

struct LabelAggCombine {
  __device__ __forceinline__ LabelAgg operator()(const LabelAgg& a, const LabelAgg& b) const {
    return LabelAgg{a.g_sum + b.g_sum, min(a.kmin, b.kmin), max(a.kmax, b.kmax)};
  }
};

__device__ __forceinline__ LabelAgg shfl_xor(const LabelAgg& v, int lane_mask) {
  return LabelAgg{__shfl_xor_sync(kFullMask, v.g_sum, lane_mask),
                  __shfl_xor_sync(kFullMask, v.kmin, lane_mask),
                  __shfl_xor_sync(kFullMask, v.kmax, lane_mask)};
}

// Block-wide all-reduce: butterfly inside each warp, per-warp results through shared memory, a
// second butterfly in warp 0, result broadcast through shared memory. blockDim.x must be a
// multiple of 32 (<= kMaxThreads). Contains __syncthreads(); call from all threads, once per
// value type per kernel.
template <typename V, typename Combine>
__device__ __forceinline__ V block_allreduce(V v, const Combine& combine_fn, const V& identity) {
  __shared__ V warp_vals[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = combine_fn(v, shfl_xor(v, off));
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < n_warps ? warp_vals[lane] : identity;
#pragma unroll
    for (int off = kMaxWarps / 2; off > 0; off /= 2) v = combine_fn(v, shfl_xor(v, off));
    if (lane == 0) warp_vals[0] = v;
  }
  __syncthreads();
  return warp_vals[0];
}

// ------------------------------------------------------------------------------------------------
// Row streaming.
// ------------------------------------------------------------------------------------------------

// Logit transforms x = f(logit).
struct ScaleXform {  // token_logprobs: x = logit * inv_temperature
  float inv_t;
  __device__ __forceinline__ float operator()(float l) const { return l * inv_t; }
};
template <bool kSoftcap>
struct SoftcapXform {  // cross_entropy: x = cap * tanh(logit / cap), or x = logit
  float cap, inv_cap;
  __device__ __forceinline__ float operator()(float l) const {
    if constexpr (kSoftcap) {
      return cap * tanh_accurate(l * inv_cap);
    } else {
      return l;
    }
  }
};

// Per-thread online statistics of x = xf(row[j]) over j in [0, vocab), for this thread's share of
// the row (merge them with block_allreduce). ref: reference value for Extra::kPlain.
template <Extra E, typename T, typename Xform>
__device__ __forceinline__ Stats stream_stats(const T* __restrict__ row, int vocab, const Xform& xf,
                                              float ref) {
  constexpr int N = VecTraits<T>::kVec;
  constexpr int U = VecTraits<T>::kUnroll;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  Stats st = empty_stats();
  const int head = align_head(row, vocab);
  const int n_vec = (vocab - head) / N;
  const int tail_start = head + n_vec * N;
  // Scalar head (< N elements, or the whole row if it is not element aligned) and tail (< N).
  for (int j = tid; j < head; j += nt) {
    const float x[1][1] = {{xf(load_scalar(row + j))}};
    accumulate<E>(st, x, ref);
  }
  for (int j = tail_start + tid; j < vocab; j += nt) {
    const float x[1][1] = {{xf(load_scalar(row + j))}};
    accumulate<E>(st, x, ref);
  }
  const uint4* __restrict__ vrow = reinterpret_cast<const uint4*>(row + head);
  int v = tid;
  for (; v + (U - 1) * nt < n_vec; v += U * nt) {
    uint4 raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) raw[u] = __ldg(vrow + v + u * nt);  // all loads in flight first
    float x[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      unpack_vec<T>(raw[u], x[u]);
#pragma unroll
      for (int n = 0; n < N; ++n) x[u][n] = xf(x[u][n]);
    }
    accumulate<E>(st, x, ref);
  }
  for (; v < n_vec; v += nt) {
    float x[1][N];
    unpack_vec<T>(__ldg(vrow + v), x[0]);
#pragma unroll
    for (int n = 0; n < N; ++n) x[0][n] = xf(x[0][n]);
    accumulate<E>(st, x, ref);
  }
  return st;
}

// Writes a zero row of length vocab (ignored rows in the backward).
template <typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ out, int vocab) {
  constexpr int N = VecTraits<T>::kVec;
  const int head = align_head(out, vocab);
  const int n_vec = (vocab - head) / N;
  const int tail_start = head + n_vec * N;
  for (int j = threadIdx.x; j < head; j += blockDim.x) store_scalar(out + j, 0.0f);
  for (int j = tail_start + threadIdx.x; j < vocab; j += blockDim.x) store_scalar(out + j, 0.0f);
  uint4* vout = reinterpret_cast<uint4*>(out + head);
  for (int v = threadIdx.x; v < n_vec; v += blockDim.x) vout[v] = make_uint4(0u, 0u, 0u, 0u);
}

// Gradient of one row, written once: out[j] = op(row[j]) + onehot_j, where op gives the dense
// part of the gradient and onehot(j0, v) adds the label terms of positions j0 .. j0 + M - 1 to
// v[0 .. M-1]. Each thread calls onehot with increasing j0 (head, body, remaining vectors,
// tail), which LabelCursor relies on.
template <typename T, typename Op, typename OneHot>
__device__ __forceinline__ void stream_grad(const T* __restrict__ row, T* __restrict__ out,
                                            int vocab, const Op& op, OneHot& onehot) {
  constexpr int N = VecTraits<T>::kVec;
  constexpr int U = VecTraits<T>::kUnroll;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int head = align_head(row, vocab);
  const int n_vec = (vocab - head) / N;
  const int tail_start = head + n_vec * N;
  // Same 16-byte phase for input and output row: the aligned body of one is that of the other.
  const bool vec_store =
      (reinterpret_cast<uintptr_t>(out) - reinterpret_cast<uintptr_t>(row)) % 16 == 0;

  const auto scalar_elem = [&](int j) {
    float v[1] = {op(load_scalar(row + j))};
    onehot(j, v);
    store_scalar(out + j, v[0]);
  };
  // Scalar head (< N elements, or the whole row if it is not element aligned).
  for (int j = tid; j < head; j += nt) scalar_elem(j);

  const uint4* __restrict__ vrow = reinterpret_cast<const uint4*>(row + head);
  uint4* __restrict__ vout = reinterpret_cast<uint4*>(out + head);
  int v = tid;
  // Unrolled body: U vector loads in flight, then U vectors of results.
  for (; v + (U - 1) * nt < n_vec; v += U * nt) {
    uint4 raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) raw[u] = __ldg(vrow + v + u * nt);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int vi = v + u * nt;
      float x[N];
      unpack_vec<T>(raw[u], x);
#pragma unroll
      for (int n = 0; n < N; ++n) x[n] = op(x[n]);
      onehot(head + vi * N, x);
      if (vec_store) {
        vout[vi] = pack_vec<T>(x);
      } else {
#pragma unroll
        for (int n = 0; n < N; ++n) store_scalar(out + head + vi * N + n, x[n]);
      }
    }
  }
  // Remaining vectors, one at a time.
  for (; v < n_vec; v += nt) {
    float x[N];
    unpack_vec<T>(__ldg(vrow + v), x);
#pragma unroll
    for (int n = 0; n < N; ++n) x[n] = op(x[n]);
    onehot(head + v * N, x);
    if (vec_store) {
      vout[v] = pack_vec<T>(x);
    } else {
#pragma unroll
      for (int n = 0; n < N; ++n) store_scalar(out + head + v * N + n, x[n]);
    }
  }
  // Scalar tail (< N elements).
  for (int j = tail_start + tid; j < vocab; j += nt) scalar_elem(j);
}

// Dense part of the token_logprobs gradient (the one-hot terms come from LabelCursor):
//   x = l * inv_t, d = x - lse, p = exp(d);  v = inv_t * (-G p - gH p (d + H)).
template <bool kEntropyGrad>
struct TokenGradOp {
  float inv_t, lse, entropy;
  float neg_g;   // -inv_t * G
  float neg_gh;  // -inv_t * gH
  __device__ __forceinline__ float operator()(float l) const {
    const float d = clamped_diff(l * inv_t, lse);
    const float p = exp_nonpos(d);
    float v = neg_g * p;
    if constexpr (kEntropyGrad) v = fmaf(neg_gh * p, d + entropy, v);  // p == 0 -> 0, not nan
    return v;
  }
};

// Dense part of the cross_entropy gradient (the one-hot term comes from SingleLabel):
//   th = tanh(l / cap), x = cap th (or x = l);  p = exp(x - lse);
//   v = (g (1 + 2 z lse) p - g eps / V) (1 - th^2)   (or without the last factor).
template <bool kSoftcap>
struct CrossEntropyGradOp {
  float cap, inv_cap, lse, coef, smooth;
  __device__ __forceinline__ float operator()(float l) const {
    if constexpr (kSoftcap) {
      const float th = tanh_accurate(l * inv_cap);
      const float v = fmaf(coef, exp_nonpos(clamped_diff(cap * th, lse)), -smooth);
      return v * fmaf(-th, th, 1.0f);
    } else {
      return fmaf(coef, exp_nonpos(clamped_diff(l, lse)), -smooth);
    }
  }
};

// One-hot term of cross_entropy: v[j - j0] -= hot at j == y (y = -1 when absent); hot already
// includes the softcap factor of position y.
struct SingleLabel {
  int y;
  float hot;
  template <int M>
  __device__ __forceinline__ void operator()(int j0, float (&v)[M]) const {
    const unsigned off = static_cast<unsigned>(y - j0);
    if (off < static_cast<unsigned>(M)) {
#pragma unroll
      for (int e = 0; e < M; ++e) {
        if (off == static_cast<unsigned>(e)) v[e] -= hot;
      }
    }
  }
};

// One-hot terms of token_logprobs: v[j - j0] += inv_t sum_i g_i [y_i == j], j in [j0, j0 + M).
// With the row's labels sorted by position in shared memory (stable, so duplicates are summed in
// label order), a per-thread cursor finds them, since each thread visits its chunks in
// increasing j0: one compare per chunk in the common case, O(k) cursor moves per thread and row.
// Rows with more than kLabelSmemCap labels scan them in global memory instead, skipping chunks
// outside [kmin, kmax].
struct LabelCursor {
  const int* keys;         // smem [k]: sorted in-range labels, then INT_MAX (ignored/out of range)
  const float* g_keys;     // smem [k]: inv_t * grad_logp of keys
  const int64_t* labels;   // global [k]: the row's labels (path without smem)
  const float* grad;       // global [k]: the row's grad_logp (path without smem)
  float scale;             // inv_t, applied to grad (path without smem)
  int64_t ignore_index;
  int k;
  int q;                   // cursor: first sorted label not consumed yet
  int next;                // keys[q] (INT_MAX past the end, or without one-hot terms)
  int kmin, kmax;          // range of the in-range labels (global path; kmax = -1: none)
  bool in_smem;

  __device__ __forceinline__ void advance() {
    ++q;
    next = q < k ? keys[q] : INT_MAX;
  }

  template <int M>
  __device__ __forceinline__ void operator()(int j0, float (&v)[M]) {
    if (in_smem) {
      if (next >= j0 + M) return;
      while (next < j0) advance();  // labels in chunks of other threads
      while (next < j0 + M) {
        const int off = next - j0;
        const float g = g_keys[q];
#pragma unroll
        for (int e = 0; e < M; ++e) {
          if (off == e) v[e] += g;
        }
        advance();
      }
    } else {
      if (j0 > kmax || j0 + M <= kmin) return;
      for (int i = 0; i < k; ++i) {
        const int64_t y = labels[i];
        if (y != ignore_index && y >= j0 && y < j0 + M) {
          const int off = static_cast<int>(y - j0);
          const float g = scale * grad[i];
#pragma unroll
          for (int e = 0; e < M; ++e) {
            if (off == e) v[e] += g;
          }
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Kernels. grid = (n_rows), block = (launch_threads(vocab)); row = blockIdx.x.
// ------------------------------------------------------------------------------------------------

// token_logprobs forward, one row per block:
//   x_j = logits[row, j] * inv_t;  m, s, t online over j;  lse = m + log s
//   logp[row, i] = (x[y_i] - m) - log s   (0 if y_i == ignore_index, nan if y_i out of range)
//   entropy[row] = log s - t / s,  t = sum_j exp(x_j - m) (x_j - m)   (kEntropy only)
//   ignored row (all labels ignored): logp = 0, entropy = 0, lse = 0.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) token_logprobs_forward_kernel(
    const T* __restrict__ logits,        // [n_rows, vocab], element (r, j) at r * row_stride + j
    int64_t row_stride,                  // elements between consecutive rows of logits
    int vocab,                           // V >= 1
    const int64_t* __restrict__ labels,  // [n_rows, k] contiguous
    int k,                               // labels per row (>= 0)
    float inv_t,                         // 1 / temperature
    int64_t ignore_index,                // label value marking an ignored label
    float* __restrict__ logp,            // out [n_rows, k] fp32 contiguous
    float* __restrict__ entropy,         // out [n_rows] fp32 (kEntropy only, else unused)
    float* __restrict__ lse) {           // out [n_rows] fp32
  constexpr Extra E = kEntropy ? Extra::kShifted : Extra::kNone;
  const int64_t row = blockIdx.x;
  const int64_t* __restrict__ row_labels = labels + row * k;
  float* __restrict__ row_logp = logp + row * k;

  bool any_valid = false;
  for (int i = threadIdx.x; i < k; i += blockDim.x) any_valid |= row_labels[i] != ignore_index;
  if (!__syncthreads_or(any_valid)) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) row_logp[i] = 0.0f;
    if (threadIdx.x == 0) {
      if constexpr (kEntropy) entropy[row] = 0.0f;
      lse[row] = 0.0f;
    }
    return;
  }

  const T* __restrict__ row_x = logits + row * row_stride;
  const ScaleXform xf{inv_t};
  Stats st = stream_stats<E>(row_x, vocab, xf, 0.0f);
  st = block_allreduce(st, StatsCombine<E>{}, empty_stats());
  const float log_s = logf(st.s);  // s >= 1 unless the row is all -inf (s = 0, log_s = -inf)

  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t y = row_labels[i];
    float out = 0.0f;
    if (y != ignore_index) {
      out = (y >= 0 && y < vocab) ? (xf(load_scalar(row_x + y)) - st.m) - log_s : quiet_nan();
    }
    row_logp[i] = out;
  }
  if (threadIdx.x == 0) {
    lse[row] = st.m + log_s;
    if constexpr (kEntropy) {
      // H >= 0 mathematically (clamp the rounding of peaked rows); all -inf row: nan, like logp.
      const float h = log_s - st.t / st.s;
      entropy[row] = h < 0.0f ? 0.0f : h;
    }
  }
}

// token_logprobs backward, one row per block, gradient written once:
//   x_j = logits[row, j] * inv_t,  p_j = exp(x_j - lse[row]),  G = sum_{i not ignored} g_i
//   grad[row, j] = inv_t * ( sum_i g_i [j == y_i] - G p_j - gH p_j (x_j - lse + H) )
//   (g = grad_logp[row, :] or 0, gH = grad_entropy[row], H = entropy[row]: kEntropyGrad only)
//   ignored row: grad[row, :] = 0.
// Dynamic shared memory: 16 * k bytes when labels_in_smem (k <= kLabelSmemCap), else 0.
template <typename T, bool kEntropyGrad>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) token_logprobs_backward_kernel(
    const T* __restrict__ logits,             // [n_rows, vocab], (r, j) at r * row_stride + j
    int64_t row_stride,                       // elements between consecutive rows of logits
    int vocab,                                // V >= 1
    const int64_t* __restrict__ labels,       // [n_rows, k] contiguous
    int k,                                    // labels per row (>= 0)
    float inv_t,                              // 1 / temperature
    int64_t ignore_index,                     // label value marking an ignored label
    const float* __restrict__ lse,            // [n_rows] from the forward
    const float* __restrict__ entropy,        // [n_rows] from the forward (kEntropyGrad only)
    const float* __restrict__ grad_logp,      // [n_rows, k] contiguous, or nullptr (zeros)
    const float* __restrict__ grad_entropy,   // [n_rows] (kEntropyGrad only)
    T* __restrict__ grad_logits,              // out [n_rows, vocab] contiguous
    bool labels_in_smem) {                    // stage the row's labels in shared memory
  extern __shared__ int smem_labels[];
  int* keys_in = smem_labels;                           // [k] label or INT_MAX, label order
  float* g_in = reinterpret_cast<float*>(keys_in + k);  // [k] inv_t * grad_logp, label order
  int* keys_sorted = reinterpret_cast<int*>(g_in + k);  // [k] keys_in sorted (stable)
  float* g_sorted = reinterpret_cast<float*>(keys_sorted + k);

  const int64_t row = blockIdx.x;
  const int64_t* __restrict__ row_labels = labels + row * k;
  const float* __restrict__ row_g = grad_logp != nullptr ? grad_logp + row * k : nullptr;
  T* __restrict__ row_out = grad_logits + row * vocab;

  LabelAgg agg{0.0f, INT_MAX, -1};
  bool any_valid = false;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t y = row_labels[i];
    const bool valid = y != ignore_index;
    const bool in_range = valid && y >= 0 && y < vocab;
    const float g = (valid && row_g != nullptr) ? row_g[i] : 0.0f;
    any_valid |= valid;
    agg.g_sum += g;
    if (in_range) {
      agg.kmin = min(agg.kmin, static_cast<int>(y));
      agg.kmax = max(agg.kmax, static_cast<int>(y));
    }
    if (labels_in_smem) {
      keys_in[i] = in_range ? static_cast<int>(y) : INT_MAX;
      g_in[i] = inv_t * g;
    }
  }
  if (!__syncthreads_or(any_valid)) {  // also publishes keys_in / g_in to the block
    zero_row(row_out, vocab);
    return;
  }
  agg = block_allreduce(agg, LabelAggCombine{}, LabelAgg{0.0f, INT_MAX, -1});

  const int* keys = keys_in;
  const float* gk = g_in;
  if (labels_in_smem && k > 1 && row_g != nullptr) {
    // Stable rank sort by position (k <= kLabelSmemCap): rank = #{keys before this one}.
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const int key = keys_in[i];
      int rank = 0;
      for (int j = 0; j < k; ++j) {
        const int kj = keys_in[j];
        rank += (kj < key) || (kj == key && j < i);
      }
      keys_sorted[rank] = key;
      g_sorted[rank] = g_in[i];
    }
    __syncthreads();
    keys = keys_sorted;
    gk = g_sorted;
  }

  const bool has_onehot = row_g != nullptr && agg.kmax >= 0;  // no grad_logp: no one-hot terms
  LabelCursor onehot;
  onehot.keys = keys;
  onehot.g_keys = gk;
  onehot.labels = row_labels;
  onehot.grad = row_g;
  onehot.scale = inv_t;
  onehot.ignore_index = ignore_index;
  onehot.k = k;
  onehot.q = 0;
  onehot.next = (has_onehot && labels_in_smem) ? keys[0] : INT_MAX;
  onehot.kmin = has_onehot ? agg.kmin : INT_MAX;
  onehot.kmax = has_onehot ? agg.kmax : -1;
  onehot.in_smem = labels_in_smem;

  TokenGradOp<kEntropyGrad> op;
  op.inv_t = inv_t;
  op.lse = lse[row];
  op.entropy = kEntropyGrad ? entropy[row] : 0.0f;
  // A row of only -inf logits (lse = -inf) has no distribution: nan gradient, like the reference.
  op.neg_g = op.lse > neg_inf() ? -inv_t * agg.g_sum : quiet_nan();
  op.neg_gh = kEntropyGrad ? -inv_t * grad_entropy[row] : 0.0f;
  stream_grad(logits + row * row_stride, row_out, vocab, op, onehot);
}

// cross_entropy forward, one row per block:
//   x_j = cap tanh(logits[row, j] / cap)  (kSoftcap)  or  logits[row, j];  m, s online;
//   lse = m + log s;  ref = x_0 (0 if not finite);  t = sum_j (x_j - ref)
//   loss[row] = (1 - eps) ((m - x_y) + log s) + eps ((m - ref) + log s - t / V) + z lse^2
//   ignored row (y == ignore_index): loss = 0, lse = 0; y out of range: loss = nan.
template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) cross_entropy_forward_kernel(
    const T* __restrict__ logits,        // [n_rows, vocab], (r, j) at r * row_stride + j
    int64_t row_stride,                  // elements between consecutive rows of logits
    int vocab,                           // V >= 1
    const int64_t* __restrict__ labels,  // [n_rows]
    int64_t ignore_index,                // label value marking an ignored row
    float eps,                           // label smoothing in [0, 1]
    float z_loss,                        // z-loss coefficient
    float cap,                           // softcap (kSoftcap only)
    float inv_cap,                       // 1 / softcap (kSoftcap only)
    float* __restrict__ loss,            // out [n_rows] fp32
    float* __restrict__ lse) {           // out [n_rows] fp32
  const int64_t row = blockIdx.x;
  const int64_t y = labels[row];
  if (y == ignore_index) {  // uniform over the block
    if (threadIdx.x == 0) {
      loss[row] = 0.0f;
      lse[row] = 0.0f;
    }
    return;
  }
  const T* __restrict__ row_x = logits + row * row_stride;
  const SoftcapXform<kSoftcap> xf{cap, inv_cap};
  float ref = xf(load_scalar(row_x));  // shift for the sum of x: no cancellation in lse - mean x
  if (!(fabsf(ref) <= FLT_MAX)) ref = 0.0f;  // -inf or nan
  Stats st = stream_stats<Extra::kPlain>(row_x, vocab, xf, ref);
  st = block_allreduce(st, StatsCombine<Extra::kPlain>{}, empty_stats());
  if (threadIdx.x == 0) {
    const float log_s = logf(st.s);
    const float row_lse = st.m + log_s;
    float out = quiet_nan();
    if (y >= 0 && y < vocab) {
      const float nll = (st.m - xf(load_scalar(row_x + y))) + log_s;  // lse - x_y
      out = 0.0f;
      if (eps != 1.0f) out = (1.0f - eps) * nll;
      if (eps != 0.0f) {  // lse - mean_j x_j
        out = fmaf(eps, ((st.m - ref) + log_s) - st.t / static_cast<float>(vocab), out);
      }
      if (z_loss != 0.0f) out = fmaf(z_loss * row_lse, row_lse, out);
    }
    loss[row] = out;
    lse[row] = row_lse;
  }
}

// cross_entropy backward, one row per block, gradient written once:
//   th_j = tanh(l_j / cap), x_j = cap th_j  (kSoftcap)  or  x_j = l_j;  p_j = exp(x_j - lse)
//   grad[row, j] = g (p_j (1 + 2 z lse) - (1 - eps) [j == y] - eps / V_s) (kSoftcap ? 1 - th_j^2 : 1)
//   ignored row: grad[row, :] = 0. V_s (passed as eps / V_s) is vocab, or the full row width when
//   the logits are a block of columns of wider rows (labels outside the block: no one-hot term).
template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) cross_entropy_backward_kernel(
    const T* __restrict__ logits,           // [n_rows, vocab], (r, j) at r * row_stride + j
    int64_t row_stride,                     // elements between consecutive rows of logits
    int vocab,                              // V >= 1
    const int64_t* __restrict__ labels,     // [n_rows]
    int64_t ignore_index,                   // label value marking an ignored row
    float eps,                              // label smoothing in [0, 1]
    float eps_per_class,                    // eps / V_s: the smoothing mass of one class
    float z_loss,                           // z-loss coefficient
    float cap,                              // softcap (kSoftcap only)
    float inv_cap,                          // 1 / softcap (kSoftcap only)
    const float* __restrict__ lse,          // [n_rows] from the forward
    const float* __restrict__ grad_loss,    // [n_rows]
    T* __restrict__ grad_logits) {          // out [n_rows, vocab] contiguous
  const int64_t row = blockIdx.x;
  T* __restrict__ row_out = grad_logits + row * vocab;
  const int64_t y = labels[row];
  if (y == ignore_index) {  // uniform over the block
    zero_row(row_out, vocab);
    return;
  }
  const float g = grad_loss[row];
  CrossEntropyGradOp<kSoftcap> op;
  op.cap = cap;
  op.inv_cap = inv_cap;
  op.lse = lse[row];
  op.coef = g * fmaf(2.0f * z_loss, op.lse, 1.0f);
  if (!(op.lse > neg_inf())) op.coef = quiet_nan();  // all -inf row: nan gradient (reference)
  op.smooth = g * eps_per_class;
  const bool y_in_range = y >= 0 && y < vocab;
  float hot = g * (1.0f - eps);
  if (kSoftcap && y_in_range) {  // softcap factor 1 - tanh^2 at the label
    const float th_y = tanh_accurate(load_scalar(logits + row * row_stride + y) * inv_cap);
    hot *= fmaf(-th_y, th_y, 1.0f);
  }
  SingleLabel onehot{y_in_range ? static_cast<int>(y) : -1, hot};
  stream_grad(logits + row * row_stride, row_out, vocab, op, onehot);
}

// ------------------------------------------------------------------------------------------------
// Host side: checks, dtype dispatch, launches.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Fn>
void dispatch_dtype(int dtype, const char* fn_name, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(TypeTag<float>{});
      break;
    case kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    case kFloat16:
      fn(TypeTag<__half>{});
      break;
    default:
      throw std::invalid_argument(std::string("posttrain_kernels CUDA ") + fn_name +
                                  ": unsupported dtype code " + std::to_string(dtype) +
                                  " (expected 0 = float32, 1 = bfloat16, 2 = float16)");
  }
}

// Sizes the kernels rely on: rows on grid.x, int indices inside a row.
void check_sizes(const char* fn_name, int64_t n_rows, int64_t vocab, int64_t k) {
  const std::string where = std::string("posttrain_kernels CUDA ") + fn_name + ": ";
  if (n_rows < 0 || n_rows > static_cast<int64_t>(INT_MAX)) {
    throw std::invalid_argument(where + "n_rows must be in [0, 2^31 - 1], got " +
                                std::to_string(n_rows));
  }
  if (vocab < 1 || vocab > static_cast<int64_t>(INT_MAX) - 64) {
    throw std::invalid_argument(where + "vocab must be in [1, 2^31 - 65], got " +
                                std::to_string(vocab));
  }
  if (k < 0 || k > static_cast<int64_t>(INT_MAX)) {
    throw std::invalid_argument(where + "k must be in [0, 2^31 - 1], got " + std::to_string(k));
  }
}

}  // namespace

void token_logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                            int64_t row_stride, const int64_t* labels, int64_t k,
                            float inv_temperature, int64_t ignore_index, float* logp,
                            float* entropy, float* lse, void* stream) {
  constexpr const char* kName = "token_logprobs_forward";
  check_sizes(kName, n_rows, vocab, k);
  if (n_rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(n_rows));
    const dim3 block(launch_threads<T>(vocab));
    const T* x = static_cast<const T*>(logits);
    if (entropy != nullptr) {
      token_logprobs_forward_kernel<T, true><<<grid, block, 0, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, static_cast<int>(k), inv_temperature,
          ignore_index, logp, entropy, lse);
    } else {
      token_logprobs_forward_kernel<T, false><<<grid, block, 0, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, static_cast<int>(k), inv_temperature,
          ignore_index, logp, entropy, lse);
    }
  });
  check_launch(kName);
}

void token_logprobs_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                             int64_t row_stride, const int64_t* labels, int64_t k,
                             float inv_temperature, int64_t ignore_index, const float* lse,
                             const float* entropy, const float* grad_logp,
                             const float* grad_entropy, void* grad_logits, void* stream) {
  constexpr const char* kName = "token_logprobs_backward";
  check_sizes(kName, n_rows, vocab, k);
  if (grad_entropy != nullptr && entropy == nullptr) {
    throw std::invalid_argument(std::string("posttrain_kernels CUDA ") + kName +
                                ": grad_entropy needs the forward's entropy (got nullptr)");
  }
  if (n_rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool in_smem = k <= kLabelSmemCap;
  const size_t smem = in_smem ? static_cast<size_t>(k) * (2 * sizeof(int) + 2 * sizeof(float)) : 0;
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(n_rows));
    const dim3 block(launch_threads<T>(vocab));
    const T* x = static_cast<const T*>(logits);
    T* gx = static_cast<T*>(grad_logits);
    if (grad_entropy != nullptr) {
      token_logprobs_backward_kernel<T, true><<<grid, block, smem, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, static_cast<int>(k), inv_temperature,
          ignore_index, lse, entropy, grad_logp, grad_entropy, gx, in_smem);
    } else {
      token_logprobs_backward_kernel<T, false><<<grid, block, smem, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, static_cast<int>(k), inv_temperature,
          ignore_index, lse, entropy, grad_logp, grad_entropy, gx, in_smem);
    }
  });
  check_launch(kName);
}

void cross_entropy_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                           int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                           float label_smoothing, float z_loss, float softcap, float* loss,
                           float* lse, void* stream) {
  constexpr const char* kName = "cross_entropy_forward";
  check_sizes(kName, n_rows, vocab, 1);
  if (n_rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool use_cap = softcap > 0.0f;
  const float inv_cap = use_cap ? 1.0f / softcap : 0.0f;
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(n_rows));
    const dim3 block(launch_threads<T>(vocab));
    const T* x = static_cast<const T*>(logits);
    if (use_cap) {
      cross_entropy_forward_kernel<T, true><<<grid, block, 0, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, ignore_index, label_smoothing, z_loss,
          softcap, inv_cap, loss, lse);
    } else {
      cross_entropy_forward_kernel<T, false><<<grid, block, 0, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, ignore_index, label_smoothing, z_loss,
          softcap, inv_cap, loss, lse);
    }
  });
  check_launch(kName);
}

void cross_entropy_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                            int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                            float label_smoothing, float z_loss, float softcap,
                            int64_t smoothing_vocab, const float* lse, const float* grad_loss,
                            void* grad_logits, void* stream) {
  constexpr const char* kName = "cross_entropy_backward";
  const float eps_per_class =
      label_smoothing / static_cast<float>(smoothing_vocab > 0 ? smoothing_vocab : vocab);
  check_sizes(kName, n_rows, vocab, 1);
  if (n_rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool use_cap = softcap > 0.0f;
  const float inv_cap = use_cap ? 1.0f / softcap : 0.0f;
  dispatch_dtype(dtype, kName, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(n_rows));
    const dim3 block(launch_threads<T>(vocab));
    const T* x = static_cast<const T*>(logits);
    T* gx = static_cast<T*>(grad_logits);
    if (use_cap) {
      cross_entropy_backward_kernel<T, true><<<grid, block, 0, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, ignore_index, label_smoothing,
          eps_per_class, z_loss, softcap, inv_cap, lse, grad_loss, gx);
    } else {
      cross_entropy_backward_kernel<T, false><<<grid, block, 0, s>>>(
          x, row_stride, static_cast<int>(vocab), labels, ignore_index, label_smoothing,
          eps_per_class, z_loss, softcap, inv_cap, lse, grad_loss, gx);
    }
  });
  check_launch(kName);
}

}  // namespace cuda
}  // namespace ptk
