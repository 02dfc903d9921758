// flowgmm_native: op schemas, input checks, CPU/CUDA dispatch registration and the Python module flowgmm_fast._C.
//
// Each op checks its arguments once here (clear errors naming the argument), then calls the CPU loops
// (csrc/cpu/*.cpp) or the CUDA launchers (csrc/cuda/*.cu). Autograd is registered in C++ (csrc/autograd.cpp), the
// fake (meta) kernels from Python (flowgmm_fast/ops/native_ops.py): the ops are differentiable and opaque to
// torch.compile.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

#ifndef FLOWGMM_TORCH_VERSION
#define FLOWGMM_TORCH_VERSION "unknown"
#endif
#ifndef FLOWGMM_CUDA_VERSION
#define FLOWGMM_CUDA_VERSION ""
#endif
#ifndef FLOWGMM_CUDA_ARCHS
#define FLOWGMM_CUDA_ARCHS ""
#endif
#ifndef FLOWGMM_CUDA_SKIPPED
#define FLOWGMM_CUDA_SKIPPED ""
#endif
#ifndef FLOWGMM_BUILD_DEBUG
#define FLOWGMM_BUILD_DEBUG 0
#endif

namespace flowgmm {
namespace {

bool is_float(const Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16;
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(is_float(t), name, " must be a floating tensor (float16, bfloat16, float32 or float64), got ",
              t.scalar_type());
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name, bool dtype) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(), "), got ",
              t.device());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(!dtype || t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

void check_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(), "), got ",
              t.device());
}

void check_sldj(const OptTensor& sldj, const Tensor& x, const char* name) {
  if (!sldj) return;
  TORCH_CHECK(sldj->dim() == 1 && sldj->size(0) == x.size(0), name, " must have shape (", x.size(0),
              ",) (one log-det per sample), got ", sldj->sizes());
  TORCH_CHECK(sldj->scalar_type() == at::kFloat || sldj->scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", sldj->scalar_type());
  check_device(*sldj, name, x, "x");
}

// s and t as given, or (t absent) the two halves of s = the s/t net's output (B, 2C, *S): views, read in place
std::pair<Tensor, Tensor> check_coupling(const Tensor& x, const Tensor& s, const OptTensor& t, const OptTensor& scale,
                                         const OptTensor& mask, int64_t parity) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have at least 2 dims (B, C, ...), got shape ", x.sizes());
  Tensor s_half = s, t_half;
  if (t) {
    check_like(s, "s", x, "x", true);
    check_like(*t, "t", x, "x", true);
    t_half = *t;
  } else {
    auto joint = x.sizes().vec();
    joint[1] *= 2;
    TORCH_CHECK(s.sizes() == at::IntArrayRef(joint), "without t, s must hold s and t on dim 1: shape ", joint,
                ", got ", s.sizes());
    TORCH_CHECK(s.device() == x.device(), "s must be on the device of x (", x.device(), "), got ", s.device());
    TORCH_CHECK(s.scalar_type() == x.scalar_type(), "s must have the dtype of x (", x.scalar_type(), "), got ",
                s.scalar_type());
    s_half = s.narrow(1, 0, x.size(1));
    t_half = s.narrow(1, x.size(1), x.size(1));
  }
  if (scale) {
    check_float(*scale, "scale");
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == x.size(1), "scale must have shape (", x.size(1),
                ",) (per channel), got ", scale->sizes());
    check_device(*scale, "scale", x, "x");
  }
  TORCH_CHECK(parity >= -1 && parity <= 1, "checker_parity must be -1 (none), 0 or 1, got ", parity);
  if (parity >= 0) {
    TORCH_CHECK(x.dim() == 4, "a checkerboard mask (checker_parity ", parity, ") needs 4-D x (B, C, H, W), got shape ",
                x.sizes());
    TORCH_CHECK(!mask, "give either mask or checker_parity >= 0, not both");
  }
  if (mask) {
    TORCH_CHECK(mask->sizes() == x.sizes().slice(1), "mask must have shape x.shape[1:] = ", x.sizes().slice(1),
                ", got ", mask->sizes());
    check_device(*mask, "mask", x, "x");
  }
  return {s_half, t_half};
}

std::tuple<Tensor, Tensor> coupling_fwd_checked(const Tensor& x, const Tensor& s_, const OptTensor& t_,
                                                const OptTensor& scale, const OptTensor& mask, int64_t parity,
                                                bool reverse, const OptTensor& sldj, bool cuda) {
  const auto [s, t] = check_coupling(x, s_, t_, scale, mask, parity);
  check_sldj(sldj, x, "sldj");
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda) return cuda::coupling_fwd(x, s, t, scale, mask, parity, reverse, sldj);
#endif
  return cpu::coupling_fwd(x, s, t, scale, mask, parity, reverse, sldj);
}

// without t: the gradient of s (B, 2C, *S) as one tensor, and an empty (0,) for t
std::tuple<Tensor, Tensor, Tensor, Tensor> coupling_bwd_checked(const Tensor& grad_y, const OptTensor& grad_sldj,
                                                                const Tensor& x, const Tensor& s_, const OptTensor& t_,
                                                                const OptTensor& scale, const OptTensor& mask,
                                                                int64_t parity, bool reverse, bool cuda) {
  const auto [s, t] = check_coupling(x, s_, t_, scale, mask, parity);
  const bool joint = !t_.has_value();
  check_like(grad_y, "grad_y", x, "x", false);
  check_float(grad_y, "grad_y");
  check_sldj(grad_sldj, x, "grad_sldj");
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda) return cuda::coupling_bwd(grad_y, grad_sldj, x, s, t, scale, mask, parity, reverse, joint);
#endif
  return cpu::coupling_bwd(grad_y, grad_sldj, x, s, t, scale, mask, parity, reverse, joint);
}

Tensor squeeze_checked(const Tensor& x, bool reverse, bool alt_order, bool cuda) {
  TORCH_CHECK(x.dim() == 4, "x must have 4 dims (B, C, H, W), got shape ", x.sizes());
  if (reverse) {
    TORCH_CHECK(x.size(1) % 4 == 0, "squeeze2x2(reverse=True) needs channels divisible by 4, got x of shape ",
                x.sizes());
  } else {
    TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, "squeeze2x2 needs even height and width, got x of shape ",
                x.sizes());
  }
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda) return cuda::squeeze2x2(x, reverse, alt_order);
#endif
  return cpu::squeeze2x2(x, reverse, alt_order);
}

void check_logit(const Tensor& x, double alpha, bool reverse, const OptTensor& noise) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have a batch dim, got a 0-d tensor");
  TORCH_CHECK(alpha >= 0 && alpha < 0.5, "alpha must be in [0, 0.5), got ", alpha);
  if (noise) {
    TORCH_CHECK(!reverse, "noise is only used by the forward transform (reverse=False)");
    check_like(*noise, "noise", x, "x", true);
  }
}

std::tuple<Tensor, Tensor> logit_fwd_checked(const Tensor& x, double alpha, bool reverse, const OptTensor& sldj,
                                             const OptTensor& noise, bool cuda) {
  check_logit(x, alpha, reverse, noise);
  check_sldj(sldj, x, "sldj");
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda) return cuda::logit_fwd(x, alpha, reverse, sldj, noise);
#endif
  return cpu::logit_fwd(x, alpha, reverse, sldj, noise);
}

std::tuple<Tensor, Tensor> logit_bwd_checked(const Tensor& grad_y, const OptTensor& grad_sldj, const Tensor& x,
                                             double alpha, bool reverse, const OptTensor& noise, bool noise_grad,
                                             bool cuda) {
  check_logit(x, alpha, reverse, noise);
  check_like(grad_y, "grad_y", x, "x", false);
  check_float(grad_y, "grad_y");
  check_sldj(grad_sldj, x, "grad_sldj");
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda) return cuda::logit_bwd(grad_y, grad_sldj, x, alpha, reverse, noise, noise_grad);
#endif
  return cpu::logit_bwd(grad_y, grad_sldj, x, alpha, reverse, noise, noise_grad);
}

void check_gmm(const Tensor& z, const Tensor& means, const Tensor& log_std, const OptTensor& weight_logits,
               const OptTensor& labels) {
  check_float(z, "z");
  check_float(means, "means");
  check_float(log_std, "log_std");
  TORCH_CHECK(z.dim() == 2, "z must have shape (B, D), got ", z.sizes());
  TORCH_CHECK(means.dim() == 2 && means.size(1) == z.size(1) && means.size(0) >= 1, "means must have shape (K, ",
              z.size(1), ") with K >= 1, got ", means.sizes());
  const int64_t K = means.size(0), D = means.size(1);
  TORCH_CHECK((log_std.dim() == 1 && log_std.size(0) == K) || (log_std.dim() == 2 && log_std.sizes() == means.sizes()),
              "log_std must have shape (", K, ",) (isotropic) or (", K, ", ", D, ") (diagonal), got ", log_std.sizes());
  check_device(means, "means", z, "z");
  check_device(log_std, "log_std", z, "z");
  if (weight_logits) {
    check_float(*weight_logits, "weight_logits");
    TORCH_CHECK(weight_logits->dim() == 1 && weight_logits->size(0) == K, "weight_logits must have shape (", K,
                ",), got ", weight_logits->sizes());
    check_device(*weight_logits, "weight_logits", z, "z");
  }
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong, "labels must be int64, got ", labels->scalar_type());
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == z.size(0), "labels must have shape (", z.size(0), ",), got ",
                labels->sizes());
    check_device(*labels, "labels", z, "z");
  }
}

std::tuple<Tensor, Tensor> gmm_fwd_checked(const Tensor& z, const Tensor& means, const Tensor& log_std,
                                           const OptTensor& weight_logits, const OptTensor& labels,
                                           double label_weight, bool cuda) {
  check_gmm(z, means, log_std, weight_logits, labels);
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda) return cuda::gmm_fwd(z, means, log_std, weight_logits, labels, label_weight);
#endif
  return cpu::gmm_fwd(z, means, log_std, weight_logits, labels, label_weight);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gmm_bwd_checked(const OptTensor& grad_nll, const OptTensor& grad_logits,
                                                           const Tensor& z, const Tensor& means, const Tensor& log_std,
                                                           const OptTensor& weight_logits, const OptTensor& labels,
                                                           double label_weight, const Tensor& logits, bool cuda) {
  check_gmm(z, means, log_std, weight_logits, labels);
  const int64_t B = z.size(0), K = means.size(0);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == K, "logits must have shape (", B, ", ",
              K, "), got ", logits.sizes());
  check_device(logits, "logits", z, "z");
  if (grad_nll) {
    TORCH_CHECK(grad_nll->dim() == 1 && grad_nll->size(0) == B, "grad_nll must have shape (", B, ",), got ",
                grad_nll->sizes());
    check_device(*grad_nll, "grad_nll", z, "z");
  }
  if (grad_logits) {
    TORCH_CHECK(grad_logits->sizes() == logits.sizes(), "grad_logits must have shape (", B, ", ", K, "), got ",
                grad_logits->sizes());
    check_device(*grad_logits, "grad_logits", z, "z");
  }
#if defined(FLOWGMM_WITH_CUDA)
  if (cuda)
    return cuda::gmm_bwd(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, label_weight, logits);
#endif
  return cpu::gmm_bwd(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, label_weight, logits);
}

template <bool kCuda>
struct Impl {
  static std::tuple<Tensor, Tensor> coupling_fwd(const Tensor& x, const Tensor& s, const OptTensor& t,
                                                 const OptTensor& scale, const OptTensor& mask, int64_t parity,
                                                 bool reverse, const OptTensor& sldj) {
    return coupling_fwd_checked(x, s, t, scale, mask, parity, reverse, sldj, kCuda);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> coupling_bwd(const Tensor& grad_y, const OptTensor& grad_sldj,
                                                                 const Tensor& x, const Tensor& s, const OptTensor& t,
                                                                 const OptTensor& scale, const OptTensor& mask,
                                                                 int64_t parity, bool reverse) {
    return coupling_bwd_checked(grad_y, grad_sldj, x, s, t, scale, mask, parity, reverse, kCuda);
  }
  static Tensor squeeze2x2(const Tensor& x, bool reverse, bool alt_order) {
    return squeeze_checked(x, reverse, alt_order, kCuda);
  }
  static std::tuple<Tensor, Tensor> logit_fwd(const Tensor& x, double alpha, bool reverse, const OptTensor& sldj,
                                              const OptTensor& noise) {
    return logit_fwd_checked(x, alpha, reverse, sldj, noise, kCuda);
  }
  static std::tuple<Tensor, Tensor> logit_bwd(const Tensor& grad_y, const OptTensor& grad_sldj, const Tensor& x,
                                              double alpha, bool reverse, const OptTensor& noise, bool noise_grad) {
    return logit_bwd_checked(grad_y, grad_sldj, x, alpha, reverse, noise, noise_grad, kCuda);
  }
  static std::tuple<Tensor, Tensor> gmm_fwd(const Tensor& z, const Tensor& means, const Tensor& log_std,
                                            const OptTensor& weight_logits, const OptTensor& labels,
                                            double label_weight) {
    return gmm_fwd_checked(z, means, log_std, weight_logits, labels, label_weight, kCuda);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> gmm_bwd(const OptTensor& grad_nll, const OptTensor& grad_logits,
                                                            const Tensor& z, const Tensor& means,
                                                            const Tensor& log_std, const OptTensor& weight_logits,
                                                            const OptTensor& labels, double label_weight,
                                                            const Tensor& logits) {
    return gmm_bwd_checked(grad_nll, grad_logits, z, means, log_std, weight_logits, labels, label_weight, logits,
                           kCuda);
  }
};

template <bool kCuda>
void register_impls(torch::Library& m) {
  m.impl("coupling_fwd", &Impl<kCuda>::coupling_fwd);
  m.impl("coupling_bwd", &Impl<kCuda>::coupling_bwd);
  m.impl("squeeze2x2", &Impl<kCuda>::squeeze2x2);
  m.impl("logit_fwd", &Impl<kCuda>::logit_fwd);
  m.impl("logit_bwd", &Impl<kCuda>::logit_bwd);
  m.impl("gmm_fwd", &Impl<kCuda>::gmm_fwd);
  m.impl("gmm_bwd", &Impl<kCuda>::gmm_bwd);
}

}  // namespace
}  // namespace flowgmm

TORCH_LIBRARY(flowgmm_native, m) {
  m.def("coupling_fwd(Tensor x, Tensor s, Tensor? t, Tensor? scale, Tensor? mask, int checker_parity, bool reverse, "
        "Tensor? sldj) -> (Tensor, Tensor)");
  m.def("coupling_bwd(Tensor grad_y, Tensor? grad_sldj, Tensor x, Tensor s, Tensor? t, Tensor? scale, Tensor? mask, "
        "int checker_parity, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("squeeze2x2(Tensor x, bool reverse, bool alt_order) -> Tensor");
  m.def("logit_fwd(Tensor x, float alpha, bool reverse, Tensor? sldj, Tensor? noise) -> (Tensor, Tensor)");
  m.def("logit_bwd(Tensor grad_y, Tensor? grad_sldj, Tensor x, float alpha, bool reverse, Tensor? noise, "
        "bool noise_grad) -> (Tensor, Tensor)");
  m.def("gmm_fwd(Tensor z, Tensor means, Tensor log_std, Tensor? weight_logits, Tensor? labels, float label_weight) "
        "-> (Tensor, Tensor)");
  m.def("gmm_bwd(Tensor? grad_nll, Tensor? grad_logits, Tensor z, Tensor means, Tensor log_std, "
        "Tensor? weight_logits, Tensor? labels, float label_weight, Tensor logits) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flowgmm_native, CPU, m) { flowgmm::register_impls<false>(m); }

#if defined(FLOWGMM_WITH_CUDA)
TORCH_LIBRARY_IMPL(flowgmm_native, CUDA, m) { flowgmm::register_impls<true>(m); }
#endif

// ---- the Python module flowgmm_fast._C: importing it registers the ops above; build_info() says how it was built
// (setup.py defines the macros; native_ops.py checks the torch and CUDA versions at import).
namespace {

PyObject* build_info(PyObject*, PyObject*) {
#if defined(FLOWGMM_WITH_CUDA)
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  PyObject* debug = FLOWGMM_BUILD_DEBUG ? Py_True : Py_False;
  return Py_BuildValue("{s:s,s:s,s:O,s:s,s:s,s:O}", "torch", FLOWGMM_TORCH_VERSION, "cuda", FLOWGMM_CUDA_VERSION,
                       "with_cuda", with_cuda, "cuda_archs", FLOWGMM_CUDA_ARCHS, "cuda_skipped", FLOWGMM_CUDA_SKIPPED,
                       "debug", debug);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict(torch=str, cuda=str, with_cuda=bool, cuda_archs=str, cuda_skipped=str, debug=bool): the "
     "torch and CUDA versions this was built against, the CUDA architectures, why the CUDA kernels were not built "
     "(when the build fell back to the CPU kernels) and whether it carries debug information"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "flowgmm_native ops (torch.ops.flowgmm_native)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
