// CPU distillation kernels: the portable and the AVX2 builds of distill_impl.inc, and the run-time
// choice between them (one wheel serves every x86-64 machine).
#include "cpu/distill.h"

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"

namespace ptk {
namespace cpu {

namespace isa_portable {
#include "cpu/distill_impl.inc"
}  // namespace isa_portable

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#include "cpu/distill_impl.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

static bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#define PTK_ISA_CALL(fn, ...) \
  (use_avx2() ? isa_avx2::fn(__VA_ARGS__) : isa_portable::fn(__VA_ARGS__))
#else
#define PTK_ISA_CALL(fn, ...) isa_portable::fn(__VA_ARGS__)
#endif

void distill_forward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                     int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                     const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                     float inv_temperature, float* loss, float* stats) {
  PTK_ISA_CALL(distill_forward_isa, student, teacher, dtype, n_rows, vocab, student_row_stride,
               teacher_row_stride, labels, ignore_index, divergence, beta, inv_temperature, loss,
               stats);
}

void distill_backward(const void* student, const void* teacher, int dtype, int64_t n_rows,
                      int64_t vocab, int64_t student_row_stride, int64_t teacher_row_stride,
                      const int64_t* labels, int64_t ignore_index, int divergence, double beta,
                      float inv_temperature, const float* stats, const float* grad_loss,
                      void* grad_student) {
  PTK_ISA_CALL(distill_backward_isa, student, teacher, dtype, n_rows, vocab, student_row_stride,
               teacher_row_stride, labels, ignore_index, divergence, beta, inv_temperature, stats,
               grad_loss, grad_student);
}

void distill_fused(void* student, void* teacher, int dtype, int64_t n_rows, int64_t vocab,
                   int64_t student_row_stride, int64_t teacher_row_stride, const int64_t* labels,
                   int64_t ignore_index, int divergence, double beta, float inv_temperature,
                   const float* grad_loss, float* loss, float* stats) {
  PTK_ISA_CALL(distill_fused_isa, student, teacher, dtype, n_rows, vocab, student_row_stride,
               teacher_row_stride, labels, ignore_index, divergence, beta, inv_temperature,
               grad_loss, loss, stats);
}

}  // namespace cpu
}  // namespace ptk
