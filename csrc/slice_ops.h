// The torch side of vocabulary parallelism's slice passes, fused_ls::smoothed_xent_slice_stats,
// smoothed_xent_slice_grad and smoothed_xent_slice_grad_ (schemas and fakes in
// fused_ls/_slice_op.py, the maths in smoothed_xent.h), written once for every device. A device
// file supplies a `Device` with
//     static void check(const at::Tensor& logits);          the logits are on this device
//     struct Guard { explicit Guard(const at::Tensor&); };   held for the whole call
//     static void check_columns(const at::Tensor& column, int64_t num_classes);
//     static void statistics(const SliceProblem&, const at::Tensor& logits);
//     static void gradient(const SliceProblem&, const at::Tensor& logits);
// and registers SliceOps<Device> for its dispatch key with register_slice_ops.
#pragma once

#include <cmath>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "op_common.h"

namespace fused_ls {

struct PreparedSlice {
  at::Tensor column, owned, weight, weight_sum, row_max, log_sum, loss, p_coef, smooth_coef, true_coef;
  SliceProblem problem{};
};

inline at::ScalarType slice_accumulation(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row input in the accumulation dtype, contiguous (an expanded scalar becomes N values).
inline at::Tensor slice_row_values(const at::Tensor& values, const char* name, const at::Tensor& logits) {
  const int64_t num_rows = logits.size(0);
  TORCH_CHECK(values.device() == logits.device(), "fused_ls: ", name, " is on ", values.device(), ", logits on ",
              logits.device());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == num_rows, "fused_ls: ", name, " must have shape (", num_rows,
              ",), got ", values.sizes());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), "fused_ls: ", name, " must be floating point, got ",
              values.scalar_type());
  return values.to(slice_accumulation(logits)).contiguous();
}

template <class Device>
struct SliceOps {
  static PreparedSlice prepare(const at::Tensor& logits, const at::Tensor& column,
                               const std::optional<at::Tensor>& weight, double softcap, double logit_scale) {
    Device::check(logits);
    TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
    const int64_t num_rows = logits.size(0), num_classes = logits.size(1);
    TORCH_CHECK(num_classes >= 1, "fused_ls: a slice needs at least one class");
    TORCH_CHECK(logits.stride(1) == 1 || num_classes == 1,
                "fused_ls: logits must have unit stride along the classes, got strides ", logits.strides());
    TORCH_CHECK(column.device() == logits.device() && column.scalar_type() == at::kLong && column.dim() == 1 &&
                    column.size(0) == num_rows,
                "fused_ls: column must be int64 of shape (", num_rows, ",) on ", logits.device(), ", got ",
                column.scalar_type(), " of shape ", column.sizes(), " on ", column.device());
    TORCH_CHECK(softcap >= 0.0, "fused_ls: softcap must be > 0 (or 0 for none), got ", softcap);
    const at::ScalarType acc = slice_accumulation(logits);
    PreparedSlice out;
    out.column = column.contiguous();
    Device::check_columns(out.column, num_classes);
    if (weight.has_value() && weight->defined()) {
      TORCH_CHECK(weight->device() == logits.device() && weight->dim() == 1 && weight->size(0) == num_classes &&
                      at::isFloatingType(weight->scalar_type()),
                  "fused_ls: weight must be floating point of shape (", num_classes, ",) on ", logits.device(),
                  ", got ", weight->scalar_type(), " of shape ", weight->sizes(), " on ", weight->device());
      out.weight = weight->to(acc).contiguous();
      out.weight_sum = out.weight.sum();
    }
    SliceProblem& p = out.problem;
    p.dtype = scalar_kind(logits.scalar_type());
    p.logits = logits.data_ptr();
    p.logits_row_stride = logits.stride(0);
    p.column = out.column.data_ptr<int64_t>();
    p.weight = out.weight.defined() ? out.weight.data_ptr() : nullptr;
    p.weight_sum = out.weight_sum.defined() ? out.weight_sum.data_ptr() : nullptr;
    p.num_rows = num_rows;
    p.num_classes = num_classes;
    p.softcap = softcap;
    p.logit_scale = logit_scale;
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> stats(const at::Tensor& logits, const at::Tensor& column,
                                                              const at::Tensor& owned,
                                                              const std::optional<at::Tensor>& weight, double k_s,
                                                              double k_t, double softcap, double logit_scale) {
    const typename Device::Guard guard(logits);
    PreparedSlice prepared = prepare(logits, column, weight, softcap, logit_scale);
    TORCH_CHECK(owned.device() == logits.device() && owned.scalar_type() == at::kBool && owned.dim() == 1 &&
                    owned.size(0) == logits.size(0),
                "fused_ls: owned must be bool of shape (", logits.size(0), ",) on ", logits.device(), ", got ",
                owned.scalar_type(), " of shape ", owned.sizes());
    TORCH_CHECK(std::isfinite(k_s) && std::isfinite(k_t) && k_s >= 0.0,
                "fused_ls: the smoothing masses must be finite with k_s >= 0, got k_s=", k_s, ", k_t=", k_t);
    prepared.owned = owned.contiguous();
    const auto options = logits.options().dtype(slice_accumulation(logits));
    prepared.row_max = at::empty({logits.size(0)}, options);
    prepared.log_sum = at::empty({logits.size(0)}, options);
    prepared.loss = at::empty({logits.size(0)}, options);
    SliceProblem& p = prepared.problem;
    p.owned = prepared.owned.data_ptr<bool>();
    p.row_max = prepared.row_max.data_ptr();
    p.log_sum = prepared.log_sum.data_ptr();
    p.loss = prepared.loss.data_ptr();
    p.k_s = k_s;
    p.k_t = k_t;
    Device::statistics(p, logits);
    return {prepared.row_max, prepared.log_sum, prepared.loss};
  }

  static void grad_into(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& column,
                        const std::optional<at::Tensor>& weight, const at::Tensor& row_max, const at::Tensor& log_sum,
                        const at::Tensor& p_coef, const at::Tensor& smooth_coef, const at::Tensor& true_coef,
                        double softcap, double logit_scale) {
    PreparedSlice prepared = prepare(logits, column, weight, softcap, logit_scale);
    prepared.row_max = slice_row_values(row_max, "row_max", logits);
    prepared.log_sum = slice_row_values(log_sum, "log_sum", logits);
    prepared.p_coef = slice_row_values(p_coef, "p_coef", logits);
    prepared.smooth_coef = slice_row_values(smooth_coef, "smooth_coef", logits);
    prepared.true_coef = slice_row_values(true_coef, "true_coef", logits);
    SliceProblem& p = prepared.problem;
    p.grad = grad.data_ptr();
    p.grad_row_stride = grad.stride(0);
    p.row_max = prepared.row_max.data_ptr();
    p.log_sum = prepared.log_sum.data_ptr();
    p.p_coef = prepared.p_coef.data_ptr();
    p.smooth_coef = prepared.smooth_coef.data_ptr();
    p.true_coef = prepared.true_coef.data_ptr();
    Device::gradient(p, logits);
  }

  static at::Tensor grad(const at::Tensor& logits, const at::Tensor& column, const std::optional<at::Tensor>& weight,
                         const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& p_coef,
                         const at::Tensor& smooth_coef, const at::Tensor& true_coef, double softcap,
                         double logit_scale) {
    TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
    const typename Device::Guard guard(logits);
    at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());
    grad_into(out, logits, column, weight, row_max, log_sum, p_coef, smooth_coef, true_coef, softcap, logit_scale);
    return out;
  }

  // The gradient written over `logits`.
  static void grad_inplace(at::Tensor& logits, const at::Tensor& column, const std::optional<at::Tensor>& weight,
                           const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& p_coef,
                           const at::Tensor& smooth_coef, const at::Tensor& true_coef, double softcap,
                           double logit_scale) {
    TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
    at::assert_no_internal_overlap(logits);  // rows sharing memory would overwrite each other's logits
    const typename Device::Guard guard(logits);
    grad_into(logits, logits, column, weight, row_max, log_sum, p_coef, smooth_coef, true_coef, softcap, logit_scale);
  }
};

template <class Device>
void register_slice_ops(torch::Library& m) {
  m.impl("smoothed_xent_slice_stats", &SliceOps<Device>::stats);
  m.impl("smoothed_xent_slice_grad", &SliceOps<Device>::grad);
  m.impl("smoothed_xent_slice_grad_", &SliceOps<Device>::grad_inplace);
}

}  // namespace fused_ls
