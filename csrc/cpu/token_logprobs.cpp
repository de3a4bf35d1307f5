// CPU token log-prob kernels: the portable and the AVX2 builds of token_logprobs_impl.inc, and the
// run-time choice between them (one wheel serves every x86-64 machine).
#include "cpu/token_logprobs.h"

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace ptk {
namespace cpu {

namespace isa_portable {
#include "cpu/token_logprobs_impl.inc"
}  // namespace isa_portable

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#include "cpu/token_logprobs_impl.inc"
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

void token_logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                            int64_t row_stride, const int64_t* labels, int64_t k,
                            float inv_temperature, int64_t ignore_index, float* logp, float* entropy,
                            float* lse) {
  PTK_ISA_CALL(token_logprobs_forward_isa, logits, dtype, n_rows, vocab, row_stride, labels, k,
               inv_temperature, ignore_index, logp, entropy, lse);
}

void token_logprobs_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                             int64_t row_stride, const int64_t* labels, int64_t k,
                             float inv_temperature, int64_t ignore_index, const float* lse,
                             const float* entropy, const float* grad_logp,
                             const float* grad_entropy, void* grad_logits) {
  PTK_ISA_CALL(token_logprobs_backward_isa, logits, dtype, n_rows, vocab, row_stride, labels, k,
               inv_temperature, ignore_index, lse, entropy, grad_logp, grad_entropy, grad_logits);
}

void cross_entropy_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                           int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                           float label_smoothing, float z_loss, float softcap, float* loss,
                           float* lse) {
  PTK_ISA_CALL(cross_entropy_forward_isa, logits, dtype, n_rows, vocab, row_stride, labels,
               ignore_index, label_smoothing, z_loss, softcap, loss, lse);
}

void cross_entropy_backward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                            int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                            float label_smoothing, float z_loss, float softcap,
                            int64_t smoothing_vocab, const float* lse, const float* grad_loss,
                            void* grad_logits) {
  PTK_ISA_CALL(cross_entropy_backward_isa, logits, dtype, n_rows, vocab, row_stride, labels,
               ignore_index, label_smoothing, z_loss, softcap,
               smoothing_vocab > 0 ? smoothing_vocab : vocab, lse, grad_loss, grad_logits);
}

void cross_entropy_fused(void* logits, int dtype, int64_t n_rows, int64_t vocab,
                         const int64_t* labels, int64_t ignore_index, float label_smoothing,
                         float z_loss, float softcap, const float* grad_loss, float* loss,
                         float* lse) {
  PTK_ISA_CALL(cross_entropy_fused_isa, logits, dtype, n_rows, vocab, labels, ignore_index,
               label_smoothing, z_loss, softcap, grad_loss, loss, lse);
}

}  // namespace cpu
}  // namespace ptk
