// The CPU kernels of vocabulary parallelism's passes over a slice of the classes
// (fused_ls::smoothed_xent_slice_stats, smoothed_xent_slice_grad and smoothed_xent_slice_grad_;
// schemas and fakes in fused_ls/_slice_op.py, the maths in ../smoothed_xent.h): the torch side
// here, the kernels in smoothed_xent_kernel.cpp next to the row op's, whose machinery they share.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../op_common.h"
#include "isa.h"
#include "smoothed_xent_kernel.h"

namespace fused_ls::cpu {
namespace {

struct PreparedSlice {
  at::Tensor column, owned, weight, weight_sum, row_max, log_sum, loss, p_coef, smooth_coef, true_coef;
  SliceProblem problem{};
};

at::ScalarType accumulation(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row input in the accumulation dtype, contiguous (an expanded scalar becomes N values).
at::Tensor row_values(const at::Tensor& values, const char* name, int64_t num_rows, at::ScalarType acc) {
  TORCH_CHECK(values.device().is_cpu(), "fused_ls: ", name, " is on ", values.device(), ", logits on cpu");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == num_rows, "fused_ls: ", name, " must have shape (", num_rows,
              ",), got ", values.sizes());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), "fused_ls: ", name, " must be floating point, got ",
              values.scalar_type());
  return values.to(acc).contiguous();
}

PreparedSlice prepare_slice(const at::Tensor& logits, const at::Tensor& column, const std::optional<at::Tensor>& weight,
                            double softcap, double logit_scale) {
  TORCH_CHECK(logits.device().is_cpu(), "fused_ls: the CPU kernel got logits on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
  const int64_t num_rows = logits.size(0), num_classes = logits.size(1);
  TORCH_CHECK(num_classes >= 1, "fused_ls: a slice needs at least one class");
  TORCH_CHECK(logits.stride(1) == 1 || num_classes == 1,
              "fused_ls: logits must have unit stride along the classes, got strides ", logits.strides());
  TORCH_CHECK(column.device().is_cpu() && column.scalar_type() == at::kLong && column.dim() == 1 &&
                  column.size(0) == num_rows,
              "fused_ls: column must be int64 of shape (", num_rows, ",) on the cpu, got ", column.scalar_type(),
              " of shape ", column.sizes(), " on ", column.device());
  TORCH_CHECK(softcap >= 0.0, "fused_ls: softcap must be > 0 (or 0 for none), got ", softcap);
  const at::ScalarType acc = accumulation(logits);
  PreparedSlice out;
  out.column = column.contiguous();
  // The kernels index rows with it: every entry must be a class of the slice (host memory: no sync).
  const int64_t* columns = out.column.data_ptr<int64_t>();
  for (int64_t row = 0; row < num_rows; ++row) {
    TORCH_CHECK(0 <= columns[row] && columns[row] < num_classes, "fused_ls: column ", columns[row], " of row ", row,
                " is outside the slice's ", num_classes, " classes");
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->device().is_cpu() && weight->dim() == 1 && weight->size(0) == num_classes &&
                    at::isFloatingType(weight->scalar_type()),
                "fused_ls: weight must be floating point of shape (", num_classes, ",) on the cpu, got ",
                weight->scalar_type(), " of shape ", weight->sizes(), " on ", weight->device());
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

void run_rows(SliceFn fn, const SliceProblem& p) {
  if (p.num_rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / p.num_classes);
  at::parallel_for(0, p.num_rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_stats(const at::Tensor& logits, const at::Tensor& column,
                                                           const at::Tensor& owned,
                                                           const std::optional<at::Tensor>& weight, double k_s,
                                                           double k_t, double softcap, double logit_scale) {
  PreparedSlice prepared = prepare_slice(logits, column, weight, softcap, logit_scale);
  TORCH_CHECK(owned.device().is_cpu() && owned.scalar_type() == at::kBool && owned.dim() == 1 &&
                  owned.size(0) == logits.size(0),
              "fused_ls: owned must be bool of shape (", logits.size(0), ",) on the cpu, got ", owned.scalar_type(),
              " of shape ", owned.sizes());
  TORCH_CHECK(std::isfinite(k_s) && std::isfinite(k_t) && k_s >= 0.0,
              "fused_ls: the smoothing masses must be finite with k_s >= 0, got k_s=", k_s, ", k_t=", k_t);
  prepared.owned = owned.contiguous();
  const auto options = logits.options().dtype(accumulation(logits));
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
  static const SliceFn fn = FUSED_LS_SELECT_VARIANT(smoothed_xent_slice_statistics);
  run_rows(fn, p);
  return {prepared.row_max, prepared.log_sum, prepared.loss};
}

void slice_grad_into(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& column,
                     const std::optional<at::Tensor>& weight, const at::Tensor& row_max, const at::Tensor& log_sum,
                     const at::Tensor& p_coef, const at::Tensor& smooth_coef, const at::Tensor& true_coef,
                     double softcap, double logit_scale) {
  PreparedSlice prepared = prepare_slice(logits, column, weight, softcap, logit_scale);
  const int64_t n = logits.size(0);
  const at::ScalarType acc = accumulation(logits);
  prepared.row_max = row_values(row_max, "row_max", n, acc);
  prepared.log_sum = row_values(log_sum, "log_sum", n, acc);
  prepared.p_coef = row_values(p_coef, "p_coef", n, acc);
  prepared.smooth_coef = row_values(smooth_coef, "smooth_coef", n, acc);
  prepared.true_coef = row_values(true_coef, "true_coef", n, acc);
  SliceProblem& p = prepared.problem;
  p.grad = grad.data_ptr();
  p.grad_row_stride = grad.stride(0);
  p.row_max = prepared.row_max.data_ptr();
  p.log_sum = prepared.log_sum.data_ptr();
  p.p_coef = prepared.p_coef.data_ptr();
  p.smooth_coef = prepared.smooth_coef.data_ptr();
  p.true_coef = prepared.true_coef.data_ptr();
  static const SliceFn fn = FUSED_LS_SELECT_VARIANT(smoothed_xent_slice_gradient);
  run_rows(fn, p);
}

at::Tensor slice_grad(const at::Tensor& logits, const at::Tensor& column, const std::optional<at::Tensor>& weight,
                      const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& p_coef,
                      const at::Tensor& smooth_coef, const at::Tensor& true_coef, double softcap,
                      double logit_scale) {
  TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  slice_grad_into(grad, logits, column, weight, row_max, log_sum, p_coef, smooth_coef, true_coef, softcap,
                  logit_scale);
  return grad;
}

// The gradient written over `logits`.
void slice_grad_inplace(at::Tensor& logits, const at::Tensor& column, const std::optional<at::Tensor>& weight,
                        const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& p_coef,
                        const at::Tensor& smooth_coef, const at::Tensor& true_coef, double softcap,
                        double logit_scale) {
  TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
  at::assert_no_internal_overlap(logits);  // rows sharing memory would overwrite each other's logits
  slice_grad_into(logits, logits, column, weight, row_max, log_sum, p_coef, smooth_coef, true_coef, softcap,
                  logit_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) {
  m.impl("smoothed_xent_slice_stats", &slice_stats);
  m.impl("smoothed_xent_slice_grad", &slice_grad);
  m.impl("smoothed_xent_slice_grad_", &slice_grad_inplace);
}

}  // namespace fused_ls::cpu
