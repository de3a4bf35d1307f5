// CUDA kernels of the distillation family. Torch-free: raw device buffers.
// The contract (math, shapes, stats, gradients) is the module docstring of
// python/posttrain_kernels/backends/torch_distill.py; the CPU kernels of the same signature (less the
// stream) are in cpu/distill.h, and both compute the numbers of torch_distill.
//
// Conventions for both functions below (all pointers are device pointers):
//   student, teacher   [n_rows, vocab] of the same `dtype` (a ptk::DType), unit stride along vocab,
//                      `student_row_stride` / `teacher_row_stride` elements between rows (int64, so
//                      rows x stride may pass 2^31).
//   labels             int64 [n_rows] contiguous, or nullptr (no row skipped); a row whose label is
//                      `ignore_index` is skipped: loss 0, stats 0, gradient 0 (its logits are not read).
//   divergence         0 forward_kl, 1 reverse_kl, 2 jsd, 3 skew_kl, 4 skew_reverse_kl, 5 tvd;
//                      `beta` (double): JSD's beta (0 and 1: the two KLs) or the skew alpha.
//   s = student * inv_temperature, t = teacher * inv_temperature, p = softmax(s), q = softmax(t).
//   loss               fp32 [n_rows]; stats fp32 [n_rows, 3] contiguous = (logsumexp s, logsumexp t, c),
//                      c the row constant of the gradient dL/ds_j = p_j (G_j - c) (0 for forward_kl).
//   stream             the cudaStream_t to launch on (torch.cuda.current_stream().cuda_stream).
// Nothing is synchronized with the host; launch errors are thrown as std::runtime_error, bad sizes
// and codes as std::invalid_argument (before any launch).
#pragma once
#include <cstdint>

namespace ptk {
namespace cuda {

void distill_forward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                     int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                     const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                     float inv_temperature, float* loss, float* stats, void* stream);

// grad_student[r, j] = grad_loss[r] * inv_temperature * dL_r/ds_j, written once per element
// (contiguous [n_rows, vocab] of `dtype`). It may be the student buffer itself, or the teacher's,
// when that buffer's row stride is vocab: every element is read by the thread that then writes its
// gradient, before it writes it, and no element is read twice. Any other overlap with the inputs is
// the caller's to avoid. stats as distill_forward wrote it; grad_loss fp32 [n_rows] contiguous.
void distill_backward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                      int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                      const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                      float inv_temperature, const float* stats, const float* grad_loss,
                      void* grad_student, void* stream);

}  // namespace cuda
}  // namespace ptk
