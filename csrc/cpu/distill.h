// Fused CPU kernels of the distillation family (C++17, OpenMP). Torch-free: raw buffers.
// The contract (math, shapes, stats, gradients) is the module docstring of
// python/posttrain_kernels/backends/torch_distill.py; its functions are the oracle.
//
// Conventions for both functions below:
//   student, teacher   [n_rows, vocab] of the same `dtype` (a ptk::DType), unit stride along vocab,
//                      `student_row_stride` / `teacher_row_stride` elements between rows (int64).
//   labels             int64 [n_rows] contiguous, or nullptr (no row skipped); a row whose label is
//                      `ignore_index` is skipped: loss 0, stats 0, gradient 0.
//   divergence         0 forward_kl, 1 reverse_kl, 2 jsd, 3 skew_kl, 4 skew_reverse_kl, 5 tvd;
//                      `beta` (double): JSD's beta (0 and 1: the two KLs) or the skew alpha.
//   s = student * inv_temperature, t = teacher * inv_temperature, p = softmax(s), q = softmax(t).
//   loss               fp32 [n_rows]; stats fp32 [n_rows, 3] = (logsumexp s, logsumexp t, c), c the
//                      row constant of the gradient dL/ds_j = p_j (G_j - c) (0 for forward_kl).
#pragma once
#include <cstdint>

namespace ptk {
namespace cpu {

void distill_forward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                     int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                     const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                     float inv_temperature, float* loss, float* stats);

// grad_student[r, j] = grad_loss[r] * inv_temperature * dL_r/ds_j, written once per element
// (contiguous [n_rows, vocab] of `dtype`; may be the student buffer itself when its row stride is
// vocab: every element is read before its gradient is written). stats as distill_forward wrote it.
void distill_backward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                      int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                      const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                      float inv_temperature, const float* stats, const float* grad_loss,
                      void* grad_student);

// Forward and backward at once, for a caller whose loss weights are known before the forward (the
// fused-linear loss): loss and stats as distill_forward, and the gradient of
// sum_r grad_loss[r] * loss[r] written over `student` (row stride student_row_stride). `teacher`
// is scratch: its rows are overwritten (fp32: with a gradient factor staged between passes). Both
// buffers must be the caller's own. Skipped rows: loss 0, stats 0, gradient 0.
void distill_fused(void* student, void* teacher, int dtype, int64_t n_rows, int64_t vocab,
                   int64_t student_row_stride, int64_t teacher_row_stride, const int64_t* labels,
                   int64_t ignore_index, int divergence, double beta, float inv_temperature,
                   const float* grad_loss, float* loss, float* stats);

}  // namespace cpu
}  // namespace ptk
