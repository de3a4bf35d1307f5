// Fused CPU kernels of the token log-prob family (C++17, OpenMP). Torch-free: raw buffers.
//
// Conventions for every function below:
//   logits      [n_rows, vocab] of `dtype` (a ptk::DType), unit stride along vocab, `row_stride`
//               elements between rows (int64, so rows x vocab may pass 2^31).
//   labels      int64 [n_rows, k] contiguous; `ignore_index` marks an ignored label.
//   outputs     fp32, contiguous; grad_logits is [n_rows, vocab] contiguous of `dtype`, and may be
//               the logits buffer itself (in place; then row_stride must be vocab).
//   x_j         the scaled logit: logits_j * inv_temperature (token_logprobs) or
//               softcap * tanh(logits_j / softcap) (cross_entropy, softcap > 0).
#pragma once
#include <cstdint>

namespace ptk {
namespace cpu {

// logp[r, i] = x[r, labels[r, i]] - lse[r]  (0 if ignored);  lse[r] = logsumexp_j x[r, j];
// entropy[r] = -sum_j p_j log p_j (written only when entropy != nullptr; 0 for fully ignored rows).
void token_logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                            int64_t row_stride, const int64_t* labels, int64_t k,
                            float inv_temperature, int64_t ignore_index, float* logp, float* entropy,
                            float* lse);

// grad_logits[r, j] = inv_T * ( sum_i g[r,i] * [j == y_i]  -  G_r * p_j
//                               - gH[r] * p_j * (x_j - lse_r + H_r) ),   G_r = sum_i g[r,i]
// over non-ignored labels; 0 for fully ignored rows. grad_logp / grad_entropy may be nullptr
// (treated as zeros); entropy is read only when grad_entropy != nullptr.
void token_logprobs_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                             int64_t row_stride, const int64_t* labels, int64_t k,
                             float inv_temperature, int64_t ignore_index, const float* lse,
                             const float* entropy, const float* grad_logp,
                             const float* grad_entropy, void* grad_logits);

// loss[r] = (1-eps) * (lse - x[y]) + eps * (lse - mean_j x_j) + z_loss * lse^2  (0 if ignored).
// softcap <= 0 disables soft-capping.
void cross_entropy_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                           int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                           float label_smoothing, float z_loss, float softcap, float* loss,
                           float* lse);

// grad_logits[r, j] = g_r * ( p_j * (1 + 2 z_loss lse) - (1-eps) [j == y] - eps / V_s )
//                     * (softcap > 0 ? 1 - (x_j / softcap)^2 : 1);   0 for ignored rows.
// V_s = smoothing_vocab, or vocab when smoothing_vocab <= 0: the logits may be a block of columns
// of wider rows (lse then being the full row's), labels outside [0, vocab) then add no one-hot term.
void cross_entropy_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                            int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                            float label_smoothing, float z_loss, float softcap,
                            int64_t smoothing_vocab, const float* lse, const float* grad_loss,
                            void* grad_logits);

// cross_entropy_forward and cross_entropy_backward of each row back to back (grad_loss [n_rows]
// fp32 the upstream gradient of each row's loss), the gradient written over `logits` (contiguous
// [n_rows, vocab], overwritten); loss and lse as cross_entropy_forward.
void cross_entropy_fused(void* logits, int dtype, int64_t n_rows, int64_t vocab,
                         const int64_t* labels, int64_t ignore_index, float label_smoothing,
                         float z_loss, float softcap, const float* grad_loss, float* loss,
                         float* lse);

}  // namespace cpu
}  // namespace ptk
