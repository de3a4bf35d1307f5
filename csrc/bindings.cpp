// pybind11 bindings of posttrain_kernels._C. Torch-free: every tensor arrives as an integer data
// pointer (0 for "absent") plus sizes, strides and a ptk::DType code; all validation happens once,
// in Python, before this boundary. The GIL is released around every kernel.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/dtype.h"
#include "cpu/distill.h"
#include "cpu/token_logprobs.h"
#ifdef PTK_WITH_CUDA
#include "cuda/distill.h"
#include "cuda/token_logprobs.h"
#endif

namespace py = pybind11;
using ptr_t = std::uintptr_t;

namespace {

template <typename T>
T* P(ptr_t p) {
  return reinterpret_cast<T*>(p);
}

// One binding per entry point, generated for the cpu and cuda namespaces alike; the CUDA variants
// take the stream (an integer cudaStream_t) as their last argument.
#define PTK_BIND_TOKEN_LOGPROBS(m, NS, SUFFIX, STREAM_DECL, STREAM_ARG, STREAM_PYARG)              \
  m.def(                                                                                         \
      "token_logprobs_forward_" SUFFIX,                                                          \
      [](ptr_t logits, int dtype, int64_t n, int64_t v, int64_t rs, ptr_t labels, int64_t k,     \
         float inv_t, int64_t ignore, ptr_t logp, ptr_t entropy, ptr_t lse STREAM_DECL) {        \
        py::gil_scoped_release nogil;                                                            \
        ptk::NS::token_logprobs_forward(P<const void>(logits), dtype, n, v, rs,                  \
                                        P<const int64_t>(labels), k, inv_t, ignore, P<float>(logp), \
                                        P<float>(entropy), P<float>(lse) STREAM_ARG);            \
      },                                                                                         \
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"),                  \
      py::arg("row_stride"), py::arg("labels"), py::arg("k"), py::arg("inv_temperature"),        \
      py::arg("ignore_index"), py::arg("logp"), py::arg("entropy"), py::arg("lse") STREAM_PYARG); \
  m.def(                                                                                         \
      "token_logprobs_backward_" SUFFIX,                                                         \
      [](ptr_t logits, int dtype, int64_t n, int64_t v, int64_t rs, ptr_t labels, int64_t k,     \
         float inv_t, int64_t ignore, ptr_t lse, ptr_t entropy, ptr_t g_logp, ptr_t g_entropy,   \
         ptr_t g_logits STREAM_DECL) {                                                           \
        py::gil_scoped_release nogil;                                                            \
        ptk::NS::token_logprobs_backward(P<const void>(logits), dtype, n, v, rs,                 \
                                         P<const int64_t>(labels), k, inv_t, ignore,             \
                                         P<const float>(lse), P<const float>(entropy),           \
                                         P<const float>(g_logp), P<const float>(g_entropy),      \
                                         P<void>(g_logits) STREAM_ARG);                          \
      },                                                                                         \
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"),                  \
      py::arg("row_stride"), py::arg("labels"), py::arg("k"), py::arg("inv_temperature"),        \
      py::arg("ignore_index"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),         \
      py::arg("grad_entropy"), py::arg("grad_logits") STREAM_PYARG);                             \
  m.def(                                                                                         \
      "cross_entropy_forward_" SUFFIX,                                                           \
      [](ptr_t logits, int dtype, int64_t n, int64_t v, int64_t rs, ptr_t labels, int64_t ignore, \
         float eps, float z, float softcap, ptr_t loss, ptr_t lse STREAM_DECL) {                 \
        py::gil_scoped_release nogil;                                                            \
        ptk::NS::cross_entropy_forward(P<const void>(logits), dtype, n, v, rs,                   \
                                       P<const int64_t>(labels), ignore, eps, z, softcap,        \
                                       P<float>(loss), P<float>(lse) STREAM_ARG);                \
      },                                                                                         \
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"),                  \
      py::arg("row_stride"), py::arg("labels"), py::arg("ignore_index"),                         \
      py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("loss"),        \
      py::arg("lse") STREAM_PYARG);                                                              \
  m.def(                                                                                         \
      "cross_entropy_backward_" SUFFIX,                                                          \
      [](ptr_t logits, int dtype, int64_t n, int64_t v, int64_t rs, ptr_t labels, int64_t ignore, \
         float eps, float z, float softcap, int64_t sv, ptr_t lse, ptr_t g_loss,                 \
         ptr_t g_logits STREAM_DECL) {                                                           \
        py::gil_scoped_release nogil;                                                            \
        ptk::NS::cross_entropy_backward(P<const void>(logits), dtype, n, v, rs,                  \
                                        P<const int64_t>(labels), ignore, eps, z, softcap, sv,   \
                                        P<const float>(lse), P<const float>(g_loss),             \
                                        P<void>(g_logits) STREAM_ARG);                           \
      },                                                                                         \
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"),                  \
      py::arg("row_stride"), py::arg("labels"), py::arg("ignore_index"),                         \
      py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"),                         \
      py::arg("smoothing_vocab"), py::arg("lse"),                                                \
      py::arg("grad_loss"), py::arg("grad_logits") STREAM_PYARG);

// The distillation family (contract: cpu/distill.h, cuda/distill.h): student / teacher share one
// dtype code and have their own row strides; labels 0 = no row skipped; the backward's
// grad_student may be the student (or teacher) buffer itself.
#define PTK_BIND_DISTILL(m, NS, SUFFIX, STREAM_DECL, STREAM_ARG, STREAM_PYARG)                    \
  m.def(                                                                                         \
      "distill_forward_" SUFFIX,                                                                 \
      [](ptr_t student, ptr_t teacher, int dtype, int64_t n, int64_t v, int64_t s_rs,            \
         int64_t t_rs, ptr_t labels, int64_t ignore, int divergence, double beta, float inv_t,   \
         ptr_t loss, ptr_t stats STREAM_DECL) {                                                  \
        py::gil_scoped_release nogil;                                                            \
        ptk::NS::distill_forward(P<const void>(student), P<const void>(teacher), dtype, n, v,    \
                                 s_rs, t_rs, P<const int64_t>(labels), ignore, divergence, beta, \
                                 inv_t, P<float>(loss), P<float>(stats) STREAM_ARG);             \
      },                                                                                         \
      py::arg("student"), py::arg("teacher"), py::arg("dtype"), py::arg("n_rows"),               \
      py::arg("vocab"), py::arg("student_row_stride"), py::arg("teacher_row_stride"),            \
      py::arg("labels"), py::arg("ignore_index"), py::arg("divergence"), py::arg("beta"),        \
      py::arg("inv_temperature"), py::arg("loss"), py::arg("stats") STREAM_PYARG);               \
  m.def(                                                                                         \
      "distill_backward_" SUFFIX,                                                                \
      [](ptr_t student, ptr_t teacher, int dtype, int64_t n, int64_t v, int64_t s_rs,            \
         int64_t t_rs, ptr_t labels, int64_t ignore, int divergence, double beta, float inv_t,   \
         ptr_t stats, ptr_t g_loss, ptr_t g_student STREAM_DECL) {                               \
        py::gil_scoped_release nogil;                                                            \
        ptk::NS::distill_backward(P<const void>(student), P<const void>(teacher), dtype, n, v,   \
                                  s_rs, t_rs, P<const int64_t>(labels), ignore, divergence,      \
                                  beta, inv_t, P<const float>(stats), P<const float>(g_loss),    \
                                  P<void>(g_student) STREAM_ARG);                                \
      },                                                                                         \
      py::arg("student"), py::arg("teacher"), py::arg("dtype"), py::arg("n_rows"),               \
      py::arg("vocab"), py::arg("student_row_stride"), py::arg("teacher_row_stride"),            \
      py::arg("labels"), py::arg("ignore_index"), py::arg("divergence"), py::arg("beta"),        \
      py::arg("inv_temperature"), py::arg("stats"), py::arg("grad_loss"),                        \
      py::arg("grad_student") STREAM_PYARG);

#define PTK_COMMA ,
#define PTK_NOTHING

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "posttrain_kernels native kernels (torch-free; pointers + sizes + dtype codes)";
  m.attr("dtype_codes") = py::dict(py::arg("float32") = int(ptk::kFloat32),
                                   py::arg("bfloat16") = int(ptk::kBFloat16),
                                   py::arg("float16") = int(ptk::kFloat16));
  PTK_BIND_TOKEN_LOGPROBS(m, cpu, "cpu", PTK_NOTHING, PTK_NOTHING, PTK_NOTHING)
  m.def(
      "cross_entropy_fused_cpu",
      [](ptr_t logits, int dtype, int64_t n, int64_t v, ptr_t labels, int64_t ignore, float eps,
         float z, float softcap, ptr_t g_loss, ptr_t loss, ptr_t lse) {
        py::gil_scoped_release nogil;
        ptk::cpu::cross_entropy_fused(P<void>(logits), dtype, n, v, P<const int64_t>(labels),
                                      ignore, eps, z, softcap, P<const float>(g_loss),
                                      P<float>(loss), P<float>(lse));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("labels"),
      py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"),
      py::arg("grad_loss"), py::arg("loss"), py::arg("lse"));
  PTK_BIND_DISTILL(m, cpu, "cpu", PTK_NOTHING, PTK_NOTHING, PTK_NOTHING)
  m.def(
      "distill_fused_cpu",
      [](ptr_t student, ptr_t teacher, int dtype, int64_t n, int64_t v, int64_t s_rs, int64_t t_rs,
         ptr_t labels, int64_t ignore, int divergence, double beta, float inv_t, ptr_t g_loss,
         ptr_t loss, ptr_t stats) {
        py::gil_scoped_release nogil;
        ptk::cpu::distill_fused(P<void>(student), P<void>(teacher), dtype, n, v, s_rs, t_rs,
                                P<const int64_t>(labels), ignore, divergence, beta, inv_t,
                                P<const float>(g_loss), P<float>(loss), P<float>(stats));
      },
      py::arg("student"), py::arg("teacher"), py::arg("dtype"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("student_row_stride"), py::arg("teacher_row_stride"),
      py::arg("labels"), py::arg("ignore_index"), py::arg("divergence"), py::arg("beta"),
      py::arg("inv_temperature"), py::arg("grad_loss"), py::arg("loss"), py::arg("stats"));
#ifdef PTK_WITH_CUDA
  m.attr("has_cuda") = true;
  PTK_BIND_TOKEN_LOGPROBS(m, cuda, "cuda", PTK_COMMA ptr_t stream, PTK_COMMA P<void>(stream),
                          PTK_COMMA py::arg("stream"))
  PTK_BIND_DISTILL(m, cuda, "cuda", PTK_COMMA ptr_t stream, PTK_COMMA P<void>(stream),
                   PTK_COMMA py::arg("stream"))
#else
  m.attr("has_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.attr("has_cpu") = true;
}
