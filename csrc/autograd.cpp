// Autograd for the flowgmm_native ops, registered in C++ under the Autograd key (one kernel for CPU and CUDA).
//
// Each forward op (coupling_fwd, logit_fwd, gmm_fwd, squeeze2x2) gets a torch::autograd::Function whose forward
// re-dispatches to the op below autograd (CPU/CUDA kernels, or the fake kernels of native_ops.py while torch.compile
// traces) and whose backward calls the matching *_bwd op. Registered here rather than with Python's
// torch.library.register_autograd because of its per-call cost: a coupling forward+backward on a tiny tensor took
// ~130 us with the Python wrapper and ~60 us with this one (2-core CPU), against ~260 us of kernel time at the
// issue's (64, 12, 16, 16) target. The backward ops are not differentiable again (no double backward), except
// squeeze2x2, whose backward is itself.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace flowgmm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The ops, called through the dispatcher (below autograd inside Function::forward, see AutoDispatchBelowADInplaceOrView).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using CouplingFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                  const OptTensor&, int64_t, bool, const OptTensor&);
using CouplingBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                                  const Tensor&, const OptTensor&, const OptTensor&,
                                                                  const OptTensor&, int64_t, bool);
using SqueezeSig = Tensor(const Tensor&, bool, bool);
using LogitFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, double, bool, const OptTensor&, const OptTensor&);
using LogitBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&, double, bool,
                                               const OptTensor&, bool);
using GmmFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const OptTensor&, double);
using GmmBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const OptTensor&, const OptTensor&, const Tensor&,
                                                             const Tensor&, const Tensor&, const OptTensor&,
                                                             const OptTensor&, double, const Tensor&);

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// grad of an optional sldj input: the incoming grad of sldj_out, in sldj's dtype
Tensor sldj_grad(const Tensor& grad_sldj, const AutogradContext* ctx) {
  if (!grad_sldj.defined() || !ctx->saved_data.count("sldj_dtype")) return Tensor();
  return grad_sldj.to(ctx->saved_data.at("sldj_dtype").toScalarType());
}

// ------------------------------------------------------------------------------------------------------ coupling
struct CouplingFn : torch::autograd::Function<CouplingFn> {
  // t absent: s is the s/t net's output (B, 2C, *S) holding s then t, and its gradient comes back as one tensor
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& s, const OptTensor& t,
                               const OptTensor& scale, const OptTensor& mask, int64_t parity, bool reverse,
                               const OptTensor& sldj) {
    static const auto fwd = op<CouplingFwdSig>("flowgmm_native::coupling_fwd");
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, s, t.value_or(Tensor()), scale.value_or(Tensor()), mask.value_or(Tensor())});
    ctx->saved_data["parity"] = parity;
    ctx->saved_data["reverse"] = reverse;
    if (sldj) ctx->saved_data["sldj_dtype"] = sldj->scalar_type();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, sldj_out] = fwd.call(x, s, t, scale, mask, parity, reverse, sldj);
    // y depends on x, s, t and scale only: when just sldj requires grad, y does not (as in the reference)
    if (!x.requires_grad() && !s.requires_grad() && !requires_grad(t) && !requires_grad(scale))
      ctx->mark_non_differentiable({y});
    return {y, sldj_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<CouplingBwdSig>("flowgmm_native::coupling_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &s = saved[1], &t = saved[2], &scale = saved[3], &mask = saved[4];
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [gx, gs, gt, gscale] = bwd.call(grad_y, opt(grads[1]), x, s, opt(t), opt(scale), opt(mask),
                                         ctx->saved_data["parity"].toInt(), ctx->saved_data["reverse"].toBool());
    return {gx, gs, t.defined() ? gt : Tensor(), scale.defined() ? gscale : Tensor(), Tensor(), Tensor(), Tensor(), sldj_grad(grads[1], ctx)};
  }
};

std::tuple<Tensor, Tensor> coupling_fwd_autograd(const Tensor& x, const Tensor& s, const OptTensor& t,
                                                 const OptTensor& scale, const OptTensor& mask, int64_t parity,
                                                 bool reverse, const OptTensor& sldj) {
  auto out = CouplingFn::apply(x, s, t, scale, mask, parity, reverse, sldj);
  return {out[0], out[1]};
}

// ------------------------------------------------------------------------------------------------------- squeeze
struct SqueezeFn : torch::autograd::Function<SqueezeFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, bool reverse, bool alt_order) {
    static const auto sq = op<SqueezeSig>("flowgmm_native::squeeze2x2");
    ctx->set_materialize_grads(false);
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["alt_order"] = alt_order;
    at::AutoDispatchBelowADInplaceOrView guard;
    return sq.call(x, reverse, alt_order);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto sq = op<SqueezeSig>("flowgmm_native::squeeze2x2");
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    // the inverse permutation, through the dispatcher with autograd: differentiable again
    return {sq.call(grads[0], !ctx->saved_data["reverse"].toBool(), ctx->saved_data["alt_order"].toBool()), Tensor(),
            Tensor()};
  }
};

Tensor squeeze2x2_autograd(const Tensor& x, bool reverse, bool alt_order) {
  return SqueezeFn::apply(x, reverse, alt_order);
}

// --------------------------------------------------------------------------------------------------------- logit
struct LogitFn : torch::autograd::Function<LogitFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, double alpha, bool reverse,
                               const OptTensor& sldj, const OptTensor& noise) {
    static const auto fwd = op<LogitFwdSig>("flowgmm_native::logit_fwd");
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, noise.value_or(Tensor())});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["reverse"] = reverse;
    if (sldj) ctx->saved_data["sldj_dtype"] = sldj->scalar_type();
    // needs_input_grad counts the tensor inputs present: x, then sldj if given, then noise
    ctx->saved_data["noise_edge"] = static_cast<int64_t>(sldj ? 2 : 1);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, sldj_out] = fwd.call(x, alpha, reverse, sldj, noise);
    if (!x.requires_grad() && !requires_grad(noise)) ctx->mark_non_differentiable({y});  // see CouplingFn
    return {y, sldj_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<LogitBwdSig>("flowgmm_native::logit_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &noise = saved[1];
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    // u = (255 x + noise) / 256: dL/dnoise = dL/du / 256, formed by the kernel from dL/du in the compute dtype (as
    // dL/dx / 255 it would overflow a half wherever dL/dx does)
    const bool noise_grad = noise.defined() && ctx->needs_input_grad(ctx->saved_data["noise_edge"].toInt());
    auto [gx, g_noise] = bwd.call(grad_y, opt(grads[1]), x, ctx->saved_data["alpha"].toDouble(),
                                  ctx->saved_data["reverse"].toBool(), opt(noise), noise_grad);
    return {gx, Tensor(), Tensor(), sldj_grad(grads[1], ctx), noise_grad ? g_noise : Tensor()};
  }
};

std::tuple<Tensor, Tensor> logit_fwd_autograd(const Tensor& x, double alpha, bool reverse, const OptTensor& sldj,
                                              const OptTensor& noise) {
  auto out = LogitFn::apply(x, alpha, reverse, sldj, noise);
  return {out[0], out[1]};
}

// ----------------------------------------------------------------------------------------------------------- gmm
struct GmmFn : torch::autograd::Function<GmmFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& means, const Tensor& log_std,
                               const OptTensor& weight_logits, const OptTensor& labels, double label_weight) {
    static const auto fwd = op<GmmFwdSig>("flowgmm_native::gmm_fwd");
    ctx->set_materialize_grads(false);
    ctx->saved_data["label_weight"] = label_weight;
    Tensor nll, logits;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(nll, logits) = fwd.call(z, means, log_std, weight_logits, labels, label_weight);
    }
    // the backward needs the (B, K) logits of this pass (an output: saved as such)
    ctx->save_for_backward({z, means, log_std, weight_logits.value_or(Tensor()), labels.value_or(Tensor()), logits});
    return {nll, logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<GmmBwdSig>("flowgmm_native::gmm_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &means = saved[1], &log_std = saved[2], &wl = saved[3], &labels = saved[4];
    if (!grads[0].defined() && !grads[1].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    auto [gz, gm, gls, gw] = bwd.call(opt(grads[0]), opt(grads[1]), z, means, log_std, opt(wl), opt(labels),
                                      ctx->saved_data["label_weight"].toDouble(), saved[5]);
    return {gz, gm, gls, wl.defined() ? gw : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> gmm_fwd_autograd(const Tensor& z, const Tensor& means, const Tensor& log_std,
                                            const OptTensor& weight_logits, const OptTensor& labels,
                                            double label_weight) {
  auto out = GmmFn::apply(z, means, log_std, weight_logits, labels, label_weight);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace flowgmm

TORCH_LIBRARY_IMPL(flowgmm_native, Autograd, m) {
  m.impl("coupling_fwd", &flowgmm::coupling_fwd_autograd);
  m.impl("squeeze2x2", &flowgmm::squeeze2x2_autograd);
  m.impl("logit_fwd", &flowgmm::logit_fwd_autograd);
  m.impl("gmm_fwd", &flowgmm::gmm_fwd_autograd);
}
