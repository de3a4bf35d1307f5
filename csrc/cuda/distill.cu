// CUDA kernels of the distillation family: per-row divergences between a student and a teacher
// distribution (forward KL, reverse KL, generalized JSD, skew KL, skew reverse KL, total
// variation), forward and backward. Torch-free: raw device buffers; the contract is in
// cuda/distill.h (and backends/torch_distill.py, the oracle). The math per element and per row is
// that of the CPU kernels (cpu/distill_impl.inc), so both native backends give the same numbers.
//
// Layout of both kernels (the same as cuda/token_logprobs.cu)
//   * One thread block per row: grid.x = n_rows (up to 2^31 - 1; never grid.y/z), blockDim.x in
//     {32, 64, 128, 256} from the vocabulary size (launch_threads()). Row offsets are int64
//     (row * row_stride, row * vocab); indices inside a row are int (vocab < 2^31 is checked).
//   * The row pair (student, teacher) is streamed with 16-byte vector loads (4 fp32 or 8 bf16/fp16
//     per load) over the 16-byte aligned body of the rows, scalar loads for the unaligned head and
//     the tail. The pairing needs both rows at the same 16-byte phase (true for two contiguous
//     tensors of the same shape and dtype); rows of different phases (slices of tensors of
//     different widths) are streamed with scalar loads only (still coalesced, more instructions).
//     Chunks of 8 elements of each row (two fp32 vectors, or one 16-bit vector) are in flight per
//     thread, 64 bytes, the same as the token kernels.
//   * s = logit * inv_t is rounded to fp32 (__fmul_rn, never contracted into an FMA with the
//     following subtraction of the lse) exactly as torch_distill and the CPU kernels compute it:
//     with |logits| ~ 1e4 a fused multiply-subtract would move s - lse by up to half an ulp of 1e4.
//   * All arithmetic is fp32 whatever the input dtype, except the few per-row scalars of the row's
//     end (lse = m + log sum, the KL losses and reverse KL's c: double, in one thread per row).
//     exp is ex2.approx of a compensated d * log2(e) (relative error ~3e-7 for every d <= 0, where
//     the plain product would add |d| * 6e-8), log(1 + e) a Cephes polynomial, reciprocals
//     rcp.approx: none of it depends on --use_fast_math (which CMakeLists.txt passes).
//
// Forward, per row:
//   pass 1  two online log-sum-exps (running max, running sum; one rescale per chunk) of a
//           "weighted" side w and an "other" side o, merged across the block (warp butterflies,
//           then shared memory). Forward KL (w = t, o = s) and reverse KL (w = s, o = t) also
//           accumulate acc = sum_j e^(w_j - mw) ((w_j - mw) - (o_j - mo)), from which
//             sum_j softmax(w)_j (log softmax(w)_j - log softmax(o)_j) = acc / sw - log sw + log so,
//           so the KLs read the row once.
//   pass 2  (jsd, skew_kl, skew_reverse_kl, tvd: their terms need both lse's first) the row again,
//           with ls = s - lse_s, lt = t - lse_t from the fp32 lse's as stored in stats (so c carries
//           the same lse rounding as the backward's G: p (G - c) is a difference of close terms),
//           summing the loss and c = sum_j p_j G_j.
// Backward, per row: one pass; each (student, teacher) pair read once, each gradient element
// written once by the thread that read its logits, grad = grad_loss * inv_t * p (G - c) (p - q for
// forward KL). Hence in place over the student (or the teacher) is safe: the backward kernel takes
// those three pointers without __restrict__ and loads them through the coherent path (no __ldg).
//
// Probability-0 elements (-inf logits) contribute exactly 0 (every p * G is masked where p == 0,
// every x log y where x == 0), never 0 * inf. Running maxima start at -FLT_MAX, never 0 or -inf.
// Skipped rows (label == ignore_index) read nothing: loss 0, stats 0, a zero gradient row. A
// non-skipped row whose student (or teacher) logits are all -inf has no distribution: lse = -inf
// and nan terms, as the reference gives.
#include "cuda/distill.h"

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

constexpr int kMaxThreads = 256;     // threads per block for large vocabularies
constexpr int kMinThreads = 32;      // one warp for tiny vocabularies
// Resident blocks per SM the kernels are compiled for (caps registers at 64 per thread), as the
// token kernels: 4 x 256 threads x 64 bytes in flight per thread per SM.
constexpr int kMinBlocksPerSm = 4;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.44269502162933349609375f;      // log2(e) rounded to fp32
constexpr float kLog2eLo = 1.925963033500011079e-8f;      // log2(e) - kLog2e
constexpr float kLn2 = 0.693147180559945309f;
// exp(d) is exactly 0 below this (2^(-150) flushes to 0 in ex2.approx.ftz); also keeps d * log2e
// finite for d = -inf or -FLT_MAX, so the compensation below never sees inf - inf.
constexpr float kExpFloor = -104.0f;

// Effective divergence kinds: the public codes, plus kZero (the skews at alpha == 1, whose loss and
// gradient vanish identically). As cpu/distill_impl.inc.
enum : int { kFwdKL = 0, kRevKL = 1, kJSD = 2, kSkewKL = 3, kSkewRevKL = 4, kTVD = 5, kZero = 6 };

// jsd and the skews are KL's against a mixture r = w_a x + w_b y, handled in log space through
// A = log(w_a x), B = log(w_b y), log r = logaddexp(A, B):
//   jsd:      A = lt + log beta,  B = ls + log(1 - beta)     (r = m)
//   skew_kl:  A = lt + log alpha, B = ls + log(1 - alpha)
//   skew_rkl: A = ls + log alpha, B = lt + log(1 - alpha)
// Passed to the kernels by value.
struct DistillConsts {
  int kind;
  float la, lb;  // log w_a, log w_b
  float inv_a;   // 1 / w_a (skews)
  float inv_b;   // 1 / w_b (jsd, skew_kl)
};

// Codes and beta exactly as the CPU kernels (and torch_distill): jsd with beta 0 / 1 is
// forward_kl / reverse_kl; a skew at alpha == 1 is 0; at alpha == 0 (outside the public range
// (0, 1]) it is its KL limit.
DistillConsts make_consts(int divergence, double beta) {
  DistillConsts k{kFwdKL, 0.0f, 0.0f, 0.0f, 0.0f};
  switch (divergence) {
    case kFwdKL:
    case kRevKL:
    case kTVD:
      k.kind = divergence;
      return k;
    case kJSD:
      if (beta == 0.0) { k.kind = kFwdKL; return k; }
      if (beta == 1.0) { k.kind = kRevKL; return k; }
      break;
    case kSkewKL:
    case kSkewRevKL:
      if (beta == 1.0) { k.kind = kZero; return k; }
      if (beta == 0.0) { k.kind = divergence == kSkewKL ? kFwdKL : kRevKL; return k; }
      break;
    default:
      throw std::invalid_argument(
          "posttrain_kernels CUDA distill: divergence: expected a code in [0, 5], got " +
          std::to_string(divergence));
  }
  if (!(beta > 0.0 && beta < 1.0)) {
    throw std::invalid_argument(
        "posttrain_kernels CUDA distill: beta: expected a value in [0, 1], got " +
        std::to_string(beta));
  }
  k.kind = divergence;
  k.la = static_cast<float>(std::log(beta));
  k.lb = static_cast<float>(std::log1p(-beta));
  k.inv_a = static_cast<float>(1.0 / beta);
  k.inv_b = static_cast<float>(1.0 / (1.0 - beta));
  return k;
}

// ------------------------------------------------------------------------------------------------
// Scalar math (flag-independent: the same results with and without --use_fast_math).
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// 2^y (PTX ex2.approx.ftz: relative error ~2^-22; -inf -> +0; subnormal results flushed to 0).
__device__ __forceinline__ float ex2_approx(float y) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// 1/y (PTX rcp.approx.ftz: <= 1 ulp).
__device__ __forceinline__ float rcp_approx(float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// exp(d) for d <= ~0 (callers pass differences to a max or an lse). y = d log2(e) is rounded, and
// that rounding (|d| * 6e-8 relative in the result) is put back: lo = the error of y (exact FMA
// residual + the fp32 error of log2 e), exp(d) = 2^y 2^lo ~ 2^y (1 + lo ln 2). d below kExpFloor
// (-inf, -FLT_MAX included) gives exactly 0; nan stays nan (the clamp compares, not fmaxf).
// exp(0) is exactly 1 whatever ex2.approx gives: the row's maximum (and every rescale by an
// unchanged maximum) must weigh exactly 1, or e.g. reverse KL's c = sum p G, dominated by p ~ 1
// times |G| ~ 1e4 in peaked rows, would be off by |G| times ex2's error (an emulation with ex2
// errors of 2^-21 put such gradients 10x over the test budget without this select).
__device__ __forceinline__ float exp_precise(float d) {
  d = d < kExpFloor ? kExpFloor : d;
  const float y = d * kLog2e;
  const float lo = fmaf(d, kLog2e, -y) + d * kLog2eLo;
  const float r = ex2_approx(y);
  return d == 0.0f ? 1.0f : fmaf(r, lo * kLn2, r);
}

// log(1 + e) for e in [0, 1] within ~1 ulp: 1 + e = 2^k (1 + m), k = 0 and m = e (exact: 1 + e is
// never rounded) up to sqrt(2), else k = 1 and m = (e - 1) / 2; log(1 + m) by the Cephes logf
// polynomial on m in [sqrt(1/2) - 1, sqrt(2) - 1], ln 2 split in two. nan stays nan.
__device__ __forceinline__ float log1p_unit(float e) {
  const bool hi = e > 0.41421356237f;
  const float m = hi ? (e - 1.0f) * 0.5f : e;
  const float kf = hi ? 1.0f : 0.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = fmaf(y, m, -1.1514610310e-1f);
  y = fmaf(y, m, 1.1676998740e-1f);
  y = fmaf(y, m, -1.2420140846e-1f);
  y = fmaf(y, m, 1.4249322787e-1f);
  y = fmaf(y, m, -1.6668057665e-1f);
  y = fmaf(y, m, 2.0000714765e-1f);
  y = fmaf(y, m, -2.4999993993e-1f);
  y = fmaf(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = fmaf(kf, -2.12194440e-4f, y);
  y = fmaf(-0.5f, z, y);
  return fmaf(kf, 0.693359375f, m + y);
}

// x - m for a finite m, with x = -inf (or x - m overflowing) mapped to -FLT_MAX: exp gives 0 and
// products with it stay finite. nan stays nan.
__device__ __forceinline__ float clamped_diff(float x, float m) {
  const float d = x - m;
  return d < -FLT_MAX ? -FLT_MAX : d;
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
// Dtypes: 16-byte vectors of kVec elements, kUnroll vectors per row per chunk, so that a chunk is
// always 8 elements of each of the two rows (64 bytes of loads in flight per thread).
// ------------------------------------------------------------------------------------------------

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int kVec = 4;
  static constexpr int kUnroll = 2;
};
template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static constexpr int kUnroll = 1;
};
template <>
struct VecTraits<__half> {
  static constexpr int kVec = 8;
  static constexpr int kUnroll = 1;
};

#include "cuda/vec_io.inc"

// Loads. kNc: through the read-only (non-coherent) path, for buffers nothing writes during the
// kernel (the forward); the backward may write over its inputs and uses coherent loads.
template <bool kNc>
__device__ __forceinline__ uint4 load_vec(const uint4* p) {
  if constexpr (kNc) {
    return __ldg(p);
  } else {
    return *p;
  }
}
template <bool kNc>
__device__ __forceinline__ unsigned short load_u16(const unsigned short* p) {
  if constexpr (kNc) {
    return __ldg(p);
  } else {
    return *p;
  }
}
template <bool kNc>
__device__ __forceinline__ float load_scalar(const float* p) {
  if constexpr (kNc) {
    return __ldg(p);
  } else {
    return *p;
  }
}
template <bool kNc>
__device__ __forceinline__ float load_scalar(const __nv_bfloat16* p) {
  const unsigned short bits = load_u16<kNc>(reinterpret_cast<const unsigned short*>(p));
  return __uint_as_float(static_cast<unsigned>(bits) << 16);
}
template <bool kNc>
__device__ __forceinline__ float load_scalar(const __half* p) {
  return __half2float(__ushort_as_half(load_u16<kNc>(reinterpret_cast<const unsigned short*>(p))));
}

// One 16-byte vector to kVec fp32 values x * inv_t (each product rounded: __fmul_rn).
template <typename T>
__device__ __forceinline__ void unpack_scaled(const uint4& raw, float inv_t,
                                              float (&x)[VecTraits<T>::kVec]) {
  if constexpr (VecTraits<T>::kVec == 4) {
    x[0] = __uint_as_float(raw.x);
    x[1] = __uint_as_float(raw.y);
    x[2] = __uint_as_float(raw.z);
    x[3] = __uint_as_float(raw.w);
  } else {
    T* tag = nullptr;
    unpack2(raw.x, x[0], x[1], tag);
    unpack2(raw.y, x[2], x[3], tag);
    unpack2(raw.z, x[4], x[5], tag);
    unpack2(raw.w, x[6], x[7], tag);
  }
#pragma unroll
  for (int n = 0; n < VecTraits<T>::kVec; ++n) x[n] = __fmul_rn(x[n], inv_t);
}

// The common head of a row pair: align_head of the student row when both rows have the same
// 16-byte phase (then the aligned bodies pair up element for element), else vocab (all scalar).
template <typename T>
__device__ __forceinline__ int pair_head(const T* s, const T* t, int vocab) {
  const uintptr_t as = reinterpret_cast<uintptr_t>(s);
  const uintptr_t at = reinterpret_cast<uintptr_t>(t);
  if ((as - at) % 16 != 0) return vocab;
  return align_head(s, vocab);
}

// Writes a zero row of length vocab (skipped rows and kZero in the backward).
template <typename T>
__device__ __forceinline__ void zero_row(T* out, int vocab) {
  constexpr int N = VecTraits<T>::kVec;
  const int head = align_head(out, vocab);
  const int n_vec = (vocab - head) / N;
  const int tail_start = head + n_vec * N;
  for (int j = threadIdx.x; j < head; j += blockDim.x) store_scalar(out + j, 0.0f);
  for (int j = tail_start + threadIdx.x; j < vocab; j += blockDim.x) store_scalar(out + j, 0.0f);
  uint4* vout = reinterpret_cast<uint4*>(out + head);
  for (int v = threadIdx.x; v < n_vec; v += blockDim.x) vout[v] = make_uint4(0u, 0u, 0u, 0u);
}

// Streams this thread's share of a row pair: fn(j0, s, t) for chunks of U vectors of N elements,
// s[u][n] = student[j0[u] + n] * inv_t and t[u][n] likewise (j0[u]: the element index of vector u;
// the U vectors of a chunk are blockDim.x vectors apart, so that the loads of a warp coalesce).
// Scalar head and tail (U = N = 1) first, then the vector body with all 2U loads issued before
// any use. Every element of [0, vocab) is visited exactly once, by one thread.
template <typename T, bool kNc, typename Fn>
__device__ __forceinline__ void for_each_pair(const T* srow, const T* trow, int vocab, float inv_t,
                                              Fn& fn) {
  constexpr int N = VecTraits<T>::kVec;
  constexpr int U = VecTraits<T>::kUnroll;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int head = pair_head(srow, trow, vocab);
  const int n_vec = (vocab - head) / N;
  const int tail_start = head + n_vec * N;
  const auto scalar_elem = [&](int j) {
    const int j0[1] = {j};
    float s[1][1] = {{__fmul_rn(load_scalar<kNc>(srow + j), inv_t)}};
    float t[1][1] = {{__fmul_rn(load_scalar<kNc>(trow + j), inv_t)}};
    fn(j0, s, t);
  };
  for (int j = tid; j < head; j += nt) scalar_elem(j);
  for (int j = tail_start + tid; j < vocab; j += nt) scalar_elem(j);

  const uint4* vs = reinterpret_cast<const uint4*>(srow + head);
  const uint4* vt = reinterpret_cast<const uint4*>(trow + head);
  int v = tid;
  for (; v + (U - 1) * nt < n_vec; v += U * nt) {
    uint4 rs[U], rt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      rs[u] = load_vec<kNc>(vs + v + u * nt);
      rt[u] = load_vec<kNc>(vt + v + u * nt);
    }
    int j0[U];
    float s[U][N], t[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      j0[u] = head + (v + u * nt) * N;
      unpack_scaled<T>(rs[u], inv_t, s[u]);
      unpack_scaled<T>(rt[u], inv_t, t[u]);
    }
    fn(j0, s, t);
  }
  if constexpr (U > 1) {
    for (; v < n_vec; v += nt) {  // remaining vectors (fewer than U per thread)
      const int j0[1] = {head + v * N};
      float s[1][N], t[1][N];
      unpack_scaled<T>(load_vec<kNc>(vs + v), inv_t, s[0]);
      unpack_scaled<T>(load_vec<kNc>(vt + v), inv_t, t[0]);
      fn(j0, s, t);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Pass 1: two online log-sum-exps (+ the KL accumulator) and their block reduction.
// ------------------------------------------------------------------------------------------------

// mw / mo: running maxima of w / o (-FLT_MAX while empty or all -inf); sw / so: sum e^(x - m);
// acc (kAcc): sum e^(w - mw) ((w - mw) - (o - mo)), +inf as soon as an element has w finite and
// o = -inf (the KL is +inf then, and stays so).
struct LseState {
  float mw, sw, mo, so, acc;
};

__device__ __forceinline__ LseState empty_state() {
  return LseState{-FLT_MAX, 0.0f, -FLT_MAX, 0.0f, 0.0f};
}

// Moves the references of a state to maxima nmw >= mw, nmo >= mo:
//   e^(w - nmw) = c e^(w - mw), c = e^(mw - nmw), (w - nmw) = (w - mw) + (mw - nmw):
//     acc' = c (acc + sw (mw - nmw)), sw' = c sw;  acc' = 0 where c underflows to 0 (those terms
//     have p = 0 at the new max: 0, as the reference's masked p log(p / q), not 0 * inf);
//   (o - nmo) = (o - mo) - (nmo - mo):  acc'' = acc' + sw' (nmo - mo), so' = so e^(mo - nmo).
template <bool kAcc>
__device__ __forceinline__ void rebase(LseState& st, float nmw, float nmo) {
  const float dw = clamped_diff(st.mw, nmw);
  const float cw = exp_precise(dw);
  if constexpr (kAcc) st.acc = cw > 0.0f ? cw * fmaf(st.sw, dw, st.acc) : 0.0f;
  st.sw *= cw;
  // sw' > 0 with mo = -FLT_MAX (o all -inf so far) means acc is already +inf: the product may be.
  if constexpr (kAcc) st.acc = st.sw > 0.0f ? fmaf(st.sw, nmo - st.mo, st.acc) : st.acc;
  st.so *= exp_precise(clamped_diff(st.mo, nmo));
  st.mw = nmw;
  st.mo = nmo;
}

// Folds one chunk of w / o values into the state: one rescale per chunk.
template <bool kAcc, int U, int N>
__device__ __forceinline__ void accumulate(LseState& st, const float (&w)[U][N],
                                           const float (&o)[U][N]) {
  float cw = w[0][0], co = o[0][0];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      cw = fmaxf(cw, w[u][n]);
      co = fmaxf(co, o[u][n]);
    }
  }
  rebase<kAcc>(st, fmaxf(st.mw, cw), fmaxf(st.mo, co));
  float ew[U * N], eo[U * N], ea[U * N];
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const float dw = w[u][n] - st.mw;  // -inf for w = -inf (exp -> 0)
      const float d_o = o[u][n] - st.mo;
      ew[u * N + n] = exp_precise(dw);
      eo[u * N + n] = exp_precise(d_o);
      // p_w = 0 contributes 0; o = -inf where p_w > 0: +inf (the KL is infinite)
      if constexpr (kAcc) ea[u * N + n] = ew[u * N + n] > 0.0f ? ew[u * N + n] * (dw - d_o) : 0.0f;
    }
  }
  st.sw += tree_sum(ew);
  st.so += tree_sum(eo);
  if constexpr (kAcc) st.acc += tree_sum(ea);
}

template <bool kAcc>
struct LseCombine {
  __device__ __forceinline__ LseState operator()(LseState a, LseState b) const {
    const float mw = fmaxf(a.mw, b.mw);
    const float mo = fmaxf(a.mo, b.mo);
    rebase<kAcc>(a, mw, mo);
    rebase<kAcc>(b, mw, mo);
    return LseState{mw, a.sw + b.sw, mo, a.so + b.so, kAcc ? a.acc + b.acc : 0.0f};
  }
};

__device__ __forceinline__ LseState shfl_xor(const LseState& v, int lane_mask) {
  return LseState{__shfl_xor_sync(kFullMask, v.mw, lane_mask),
                  __shfl_xor_sync(kFullMask, v.sw, lane_mask),
                  __shfl_xor_sync(kFullMask, v.mo, lane_mask),
                  __shfl_xor_sync(kFullMask, v.so, lane_mask),
                  __shfl_xor_sync(kFullMask, v.acc, lane_mask)};
}

// Pass-2 sums: the loss and c terms.
struct Sums {
  float l, c;
};
struct SumsCombine {
  __device__ __forceinline__ Sums operator()(const Sums& a, const Sums& b) const {
    return Sums{a.l + b.l, a.c + b.c};
  }
};
__device__ __forceinline__ Sums shfl_xor(const Sums& v, int lane_mask) {
  return Sums{__shfl_xor_sync(kFullMask, v.l, lane_mask), __shfl_xor_sync(kFullMask, v.c, lane_mask)};
}

// Block-wide all-reduce: butterfly inside each warp, per-warp results through shared memory, a
// second butterfly in warp 0, the result broadcast through shared memory. blockDim.x must be a
// multiple of 32 (<= kMaxThreads). Contains __syncthreads(); call from all threads, once per value
// type per kernel (the shared array is per type).
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
// Per-element math on ls = s - lse_s, lt = t - lse_t (as cpu/distill_impl.inc's terms8 / grad8).
// ------------------------------------------------------------------------------------------------

// log(e^A + e^B) and its parts: ea = e^A, eb = e^B, fa = e^A / (e^A + e^B), fb = 1 - fa (computed
// as e^B / (e^A + e^B): no cancellation where fa ~ 1). One exp of the difference, one of the max,
// one log1p, one reciprocal. Both -inf: lm = -inf, ea = eb = 0 (the callers mask on them).
struct Mix {
  float lm, ea, eb, fa, fb;
};
__device__ __forceinline__ Mix log_mix(float a, float b) {
  const bool a_ge = a >= b;
  const float mx = a_ge ? a : b;
  const float mn = a_ge ? b : a;
  const float e = mx == neg_inf() ? 0.0f : exp_precise(mn - mx);  // in [0, 1]
  const float big = exp_precise(mx);
  const float small = big * e;
  const float inv = rcp_approx(1.0f + e);
  Mix m;
  m.lm = mx + log1p_unit(e);
  m.ea = a_ge ? big : small;
  m.eb = a_ge ? small : big;
  m.fa = (a_ge ? 1.0f : e) * inv;
  m.fb = (a_ge ? e : 1.0f) * inv;
  return m;
}

// Loss and c terms of one element (pass 2 of jsd, skew_kl, skew_reverse_kl, tvd), in the units the
// row's end (finish_pass2) expects.
template <int K>
__device__ __forceinline__ void elem_terms(float ls, float lt, const DistillConsts& k, float& l,
                                           float& c) {
  if constexpr (K == kTVD) {
    const float p = exp_precise(ls), q = exp_precise(lt);
    const float d = p - q;
    l = fabsf(d);                                                    // |p - q|
    c = d > 0.0f ? 0.5f * p : (d < 0.0f ? -0.5f * p : 0.0f);         // p G, G = sign(p - q) / 2
  } else if constexpr (K == kJSD) {
    const Mix m = log_mix(lt + k.la, ls + k.lb);                    // ea = beta q, eb = (1-beta) p
    const float u = m.ea > 0.0f ? m.ea * (lt - m.lm) : 0.0f;
    const float w = m.eb > 0.0f ? m.eb * (ls - m.lm) : 0.0f;         // p G
    l = u + w;
    c = w;
  } else if constexpr (K == kSkewKL) {
    const Mix m = log_mix(lt + k.la, ls + k.lb);                    // ea = a q, eb = (1-a) p
    l = m.ea > 0.0f ? m.ea * (lt - m.lm) : 0.0f;                     // a q (lt - lr)
    c = m.eb * m.fa;                                                 // -a p G
  } else if constexpr (K == kSkewRevKL) {
    const Mix m = log_mix(ls + k.la, lt + k.lb);                    // ea = a p, eb = (1-a) q
    l = m.ea > 0.0f ? m.ea * (ls - m.lm) : 0.0f;                     // a p (ls - lr)
    c = m.ea * m.fb;                                                 // a p (1 - a p / r)
  } else {
    l = 0.0f;
    c = 0.0f;
  }
}

// dL/ds of one element: p (G - c) (p - q for forward KL); cb = c / w_b (jsd, skew_kl).
template <int K>
__device__ __forceinline__ float elem_grad(float ls, float lt, const DistillConsts& k, float c,
                                           float cb) {
  if constexpr (K == kFwdKL) {
    return exp_precise(ls) - exp_precise(lt);
  } else if constexpr (K == kRevKL) {
    const float p = exp_precise(ls);
    return p > 0.0f ? p * ((ls - lt) - c) : 0.0f;
  } else if constexpr (K == kJSD) {
    // p (G - c) = (1-beta) p ((ls - lm) - c / (1-beta))
    const Mix m = log_mix(lt + k.la, ls + k.lb);
    return m.eb > 0.0f ? m.eb * ((ls - m.lm) - cb) : 0.0f;
  } else if constexpr (K == kSkewKL) {
    // G = -(1-a) q / r = -((1-a)/a) fa:  p (G - c) = (1-a) p (-fa / a - c / (1-a)); 0 where q = 0
    const Mix m = log_mix(lt + k.la, ls + k.lb);
    return m.eb * (-(m.fa * k.inv_a) - cb);
  } else if constexpr (K == kSkewRevKL) {
    // G = ls - lr + 1 - a p / r = ls - lr + fb
    const Mix m = log_mix(ls + k.la, lt + k.lb);
    return m.ea > 0.0f ? (m.ea * k.inv_a) * (((ls - m.lm) + m.fb) - c) : 0.0f;
  } else if constexpr (K == kTVD) {
    const float p = exp_precise(ls), q = exp_precise(lt);
    const float d = p - q;
    const float g = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    return p * (g - c);
  } else {
    return 0.0f;
  }
}

// ------------------------------------------------------------------------------------------------
// Chunk visitors (the fn of for_each_pair).
// ------------------------------------------------------------------------------------------------

template <int K>
struct Pass1Visitor {
  static constexpr bool kAcc = K == kFwdKL || K == kRevKL;
  LseState st;
  template <int U, int N>
  __device__ __forceinline__ void operator()(const int (&)[U], const float (&s)[U][N],
                                             const float (&t)[U][N]) {
    if constexpr (K == kFwdKL) {
      accumulate<kAcc>(st, t, s);  // w = t, o = s
    } else {
      accumulate<kAcc>(st, s, t);  // w = s, o = t
    }
  }
};

template <int K>
struct Pass2Visitor {
  float lse_s, lse_t;
  DistillConsts k;
  Sums sums;
  template <int U, int N>
  __device__ __forceinline__ void operator()(const int (&)[U], const float (&s)[U][N],
                                             const float (&t)[U][N]) {
    float l[U * N], c[U * N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        elem_terms<K>(s[u][n] - lse_s, t[u][n] - lse_t, k, l[u * N + n], c[u * N + n]);
      }
    }
    sums.l += tree_sum(l);
    sums.c += tree_sum(c);
  }
};

template <typename T, int K>
struct GradVisitor {
  T* out;           // the row's gradient (may be the student's or the teacher's row itself)
  float lse_s, lse_t, c, cb;
  float scale;      // grad_loss[row] * inv_t
  DistillConsts k;
  bool vec_store;   // out has the 16-byte phase of the student row: vectors store as vectors
  template <int U, int N>
  __device__ __forceinline__ void operator()(const int (&j0)[U], const float (&s)[U][N],
                                             const float (&t)[U][N]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float g[N];
#pragma unroll
      for (int n = 0; n < N; ++n) g[n] = elem_grad<K>(s[u][n] - lse_s, t[u][n] - lse_t, k, c, cb) * scale;
      if constexpr (N == VecTraits<T>::kVec) {
        if (vec_store) {
          *reinterpret_cast<uint4*>(out + j0[u]) = pack_vec<T>(g);
          continue;
        }
      }
#pragma unroll
      for (int n = 0; n < N; ++n) store_scalar(out + j0[u] + n, g[n]);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Kernels. grid = (n_rows), block = (launch_threads(vocab)); row = blockIdx.x.
// ------------------------------------------------------------------------------------------------

// Forward, one row per block:
//   pass 1: lse_s, lse_t (and for the KLs the loss and reverse KL's c) from two online lse's;
//   pass 2 (jsd, skews, tvd): the loss and c from ls = s - lse_s, lt = t - lse_t.
//   loss[row] = L, stats[row] = (lse_s, lse_t, c); a skipped row: 0, (0, 0, 0), nothing read.
template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) distill_forward_kernel(
    const T* __restrict__ student,       // [n_rows, vocab], element (r, j) at r * s_stride + j
    const T* __restrict__ teacher,       // [n_rows, vocab], element (r, j) at r * t_stride + j
    int64_t s_stride,                    // elements between consecutive rows of student
    int64_t t_stride,                    // elements between consecutive rows of teacher
    int vocab,                           // V >= 0 (columns of both)
    const int64_t* __restrict__ labels,  // [n_rows] contiguous, or nullptr (no row skipped)
    int64_t ignore_index,                // label value marking a skipped row
    float inv_t,                         // 1 / temperature: s = student * inv_t, t = teacher * inv_t
    DistillConsts k,                     // the mixture weights of jsd / skews (kind == K)
    float* __restrict__ loss,            // out [n_rows] fp32
    float* __restrict__ stats) {         // out [n_rows, 3] fp32 contiguous: (lse_s, lse_t, c)
  constexpr bool kTwoPass = !(K == kFwdKL || K == kRevKL || K == kZero);
  __shared__ float row_lse[2];  // (lse_s, lse_t) broadcast from thread 0 to pass 2
  const int64_t row = blockIdx.x;
  float* row_stats = stats + 3 * row;
  if (labels != nullptr && labels[row] == ignore_index) {  // uniform over the block
    if (threadIdx.x == 0) {
      loss[row] = 0.0f;
      row_stats[0] = row_stats[1] = row_stats[2] = 0.0f;
    }
    return;
  }
  if (vocab == 0) {  // empty distributions: lse -inf, every sum 0 (as torch_distill)
    if (threadIdx.x == 0) {
      loss[row] = 0.0f;
      row_stats[0] = row_stats[1] = neg_inf();
      row_stats[2] = 0.0f;
    }
    return;
  }
  const T* srow = student + row * s_stride;
  const T* trow = teacher + row * t_stride;

  Pass1Visitor<K> p1{empty_state()};
  for_each_pair<T, true>(srow, trow, vocab, inv_t, p1);
  const LseState st = block_allreduce(p1.st, LseCombine<Pass1Visitor<K>::kAcc>{}, empty_state());

  if (threadIdx.x == 0) {
    // The row's end in double (one thread, a handful of operations per row).
    const double log_sw = log(static_cast<double>(st.sw));
    const double log_so = log(static_cast<double>(st.so));
    const float lse_w = static_cast<float>(static_cast<double>(st.mw) + log_sw);
    const float lse_o = static_cast<float>(static_cast<double>(st.mo) + log_so);
    const float lse_s = K == kFwdKL ? lse_o : lse_w;
    const float lse_t = K == kFwdKL ? lse_w : lse_o;
    row_stats[0] = lse_s;
    row_stats[1] = lse_t;
    if constexpr (!kTwoPass) {
      double l = 0.0, c = 0.0;
      if constexpr (K != kZero) {
        // The loss from the exact-max form: the weights normalized to 1 even where |s| ~ 1e4.
        const double acc = static_cast<double>(st.acc), sw = static_cast<double>(st.sw);
        l = acc / sw - log_sw + log_so;
        if constexpr (K == kRevKL) {
          // c = sum_j p'_j (ls'_j - lt'_j) with the fp32 lse's of the stats, as the backward sees
          // them (its G' must carry the same lse rounding as c):
          //   p'_j = e^(s_j - ms) e^(ms - lse_s), ls'_j - lt'_j = (ds - dt) + (ms - lse_s) - (mt - lse_t)
          const double a = static_cast<double>(st.mw) - lse_s;
          const double b = static_cast<double>(st.mo) - lse_t;
          c = exp(a) * (acc + sw * (a - b));
        }
      }
      loss[row] = static_cast<float>(l);
      row_stats[2] = static_cast<float>(c);
    } else {
      row_lse[0] = lse_s;
      row_lse[1] = lse_t;
    }
  }
  if constexpr (kTwoPass) {
    __syncthreads();
    // Pass 2 (the row is likely still in L2 for moderate vocabularies).
    Pass2Visitor<K> p2{row_lse[0], row_lse[1], k, Sums{0.0f, 0.0f}};
    for_each_pair<T, true>(srow, trow, vocab, inv_t, p2);
    const Sums tot = block_allreduce(p2.sums, SumsCombine{}, Sums{0.0f, 0.0f});
    if (threadIdx.x == 0) {
      float l, c;
      if constexpr (K == kTVD) {
        l = 0.5f * tot.l;
        c = tot.c;
      } else if constexpr (K == kJSD) {
        l = tot.l;
        c = tot.c;
      } else if constexpr (K == kSkewKL) {
        l = tot.l * k.inv_a;
        c = -tot.c * k.inv_a;
      } else {  // kSkewRevKL: c = sum p G = L + sum p (1 - a p / r)
        l = tot.l * k.inv_a;
        c = (tot.l + tot.c) * k.inv_a;
      }
      loss[row] = l;
      row_stats[2] = c;
    }
  }
}

// Backward, one row per block, each gradient element written once:
//   grad[row, j] = grad_loss[row] * inv_t * dL/ds_j (p_j - q_j for forward KL, p_j (G_j - c) else),
//   ls = s - stats[row, 0], lt = t - stats[row, 1], c = stats[row, 2]; a zero row for skipped rows
//   (logits not read) and for kZero.
// student / teacher / grad are not __restrict__: grad may be the student or the teacher buffer
// (contiguous); loads are coherent and each element is read, by the thread that writes its
// gradient, before that write.
template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm) distill_backward_kernel(
    const T* student,                       // [n_rows, vocab], element (r, j) at r * s_stride + j
    const T* teacher,                       // [n_rows, vocab], element (r, j) at r * t_stride + j
    int64_t s_stride,                       // elements between consecutive rows of student
    int64_t t_stride,                       // elements between consecutive rows of teacher
    int vocab,                              // V >= 1 (columns of all three)
    const int64_t* __restrict__ labels,     // [n_rows] contiguous, or nullptr (no row skipped)
    int64_t ignore_index,                   // label value marking a skipped row
    float inv_t,                            // 1 / temperature
    DistillConsts k,                        // the mixture weights of jsd / skews (kind == K)
    const float* __restrict__ stats,        // [n_rows, 3] contiguous, from the forward
    const float* __restrict__ grad_loss,    // [n_rows] contiguous: upstream gradient of loss
    T* grad) {                              // out [n_rows, vocab] contiguous (row stride vocab)
  const int64_t row = blockIdx.x;
  T* grow = grad + row * static_cast<int64_t>(vocab);
  if (K == kZero || (labels != nullptr && labels[row] == ignore_index)) {  // uniform per block
    zero_row(grow, vocab);
    return;
  }
  const T* srow = student + row * s_stride;
  const T* trow = teacher + row * t_stride;
  GradVisitor<T, K> op;
  op.out = grow;
  op.lse_s = stats[3 * row];
  op.lse_t = stats[3 * row + 1];
  op.c = stats[3 * row + 2];
  op.cb = op.c * k.inv_b;
  op.scale = grad_loss[row] * inv_t;
  op.k = k;
  op.vec_store = (reinterpret_cast<uintptr_t>(grow) - reinterpret_cast<uintptr_t>(srow)) % 16 == 0;
  for_each_pair<T, false>(srow, trow, vocab, inv_t, op);
}

// ------------------------------------------------------------------------------------------------
// Host side: checks, dtype and divergence dispatch, launches.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};
template <int K>
struct KindTag {
  static constexpr int value = K;
};

template <typename Fn>
void dispatch(int dtype, int kind, const char* fn_name, Fn&& fn) {
  const auto by_kind = [&](auto tag) {
    switch (kind) {
      case kFwdKL: fn(tag, KindTag<kFwdKL>{}); break;
      case kRevKL: fn(tag, KindTag<kRevKL>{}); break;
      case kJSD: fn(tag, KindTag<kJSD>{}); break;
      case kSkewKL: fn(tag, KindTag<kSkewKL>{}); break;
      case kSkewRevKL: fn(tag, KindTag<kSkewRevKL>{}); break;
      case kTVD: fn(tag, KindTag<kTVD>{}); break;
      default: fn(tag, KindTag<kZero>{}); break;
    }
  };
  switch (dtype) {
    case kFloat32:
      by_kind(TypeTag<float>{});
      break;
    case kBFloat16:
      by_kind(TypeTag<__nv_bfloat16>{});
      break;
    case kFloat16:
      by_kind(TypeTag<__half>{});
      break;
    default:
      throw std::invalid_argument(std::string("posttrain_kernels CUDA ") + fn_name +
                                  ": unsupported dtype code " + std::to_string(dtype) +
                                  " (expected 0 = float32, 1 = bfloat16, 2 = float16)");
  }
}

// Sizes the kernels rely on: rows on grid.x, int indices inside a row.
void check_sizes(const char* fn_name, int64_t n_rows, int64_t vocab) {
  const std::string where = std::string("posttrain_kernels CUDA ") + fn_name + ": ";
  if (n_rows < 0 || n_rows > static_cast<int64_t>(INT_MAX)) {
    throw std::invalid_argument(where + "n_rows must be in [0, 2^31 - 1], got " +
                                std::to_string(n_rows));
  }
  if (vocab < 0 || vocab > static_cast<int64_t>(INT_MAX) - 64) {
    throw std::invalid_argument(where + "vocab must be in [0, 2^31 - 65], got " +
                                std::to_string(vocab));
  }
}

}  // namespace

void distill_forward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                     int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                     const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                     float inv_temperature, float* loss, float* stats, void* stream) {
  constexpr const char* kName = "distill_forward";
  const DistillConsts k = make_consts(divergence, beta);
  check_sizes(kName, n_rows, vocab);
  if (n_rows == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch(dtype, k.kind, kName, [&](auto tag, auto kind) {
    using T = typename decltype(tag)::type;
    constexpr int K = decltype(kind)::value;
    const dim3 grid(static_cast<unsigned>(n_rows));
    const dim3 block(launch_threads<T>(vocab));
    distill_forward_kernel<T, K><<<grid, block, 0, s>>>(
        static_cast<const T*>(student), static_cast<const T*>(teacher), student_row_stride,
        teacher_row_stride, static_cast<int>(vocab), labels, ignore_index, inv_temperature, k, loss,
        stats);
  });
  check_launch(kName);
}

void distill_backward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                      int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                      const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                      float inv_temperature, const float* stats, const float* grad_loss,
                      void* grad_student, void* stream) {
  constexpr const char* kName = "distill_backward";
  const DistillConsts k = make_consts(divergence, beta);
  check_sizes(kName, n_rows, vocab);
  if (n_rows == 0 || vocab == 0) return;  // nothing to write
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch(dtype, k.kind, kName, [&](auto tag, auto kind) {
    using T = typename decltype(tag)::type;
    constexpr int K = decltype(kind)::value;
    const dim3 grid(static_cast<unsigned>(n_rows));
    const dim3 block(launch_threads<T>(vocab));
    distill_backward_kernel<T, K><<<grid, block, 0, s>>>(
        static_cast<const T*>(student), static_cast<const T*>(teacher), student_row_stride,
        teacher_row_stride, static_cast<int>(vocab), labels, ignore_index, inv_temperature, k,
        stats, grad_loss, static_cast<T*>(grad_student));
  });
  check_launch(kName);
}

}  // namespace cuda
}  // namespace ptk
