// The torch side shared by the CPU and CUDA implementations of the row ops (row_ops.h):
// argument checks at the C++ boundary, and the tensors a kernel needs, in the dtypes and
// layouts it reads. Nothing here synchronises with a device.
#pragma once

#include <cmath>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "smoothed_xent.h"

namespace fused_ls {

inline ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ScalarKind::Float32;
    case at::kDouble:
      return ScalarKind::Float64;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    case at::kHalf:
      return ScalarKind::Float16;
    default:
      TORCH_CHECK(false, "fused_ls: logits must be float32, bfloat16, float16 or float64, got ", dtype);
  }
}

// Inputs converted for a kernel, the row outputs allocated, and the problem description
// pointing at them (all but the gradient, which the caller owns).
struct PreparedRows {
  at::Tensor target;      // int64, contiguous
  at::Tensor weight;      // acc dtype, contiguous; undefined without class weights
  at::Tensor weight_sum;  // 0-d acc
  at::Tensor grad_scale;  // acc, 0-d or (N,) contiguous; undefined for the loss-only op
  at::Tensor loss;        // (N,) acc
  at::Tensor lse;         // (N,) acc
  at::Tensor predicted;   // (N,) int64, the caller's; undefined when no argmax is asked for
  at::Tensor precomputed_lse;  // (N,) acc, contiguous; undefined when none is given
  RowsProblem problem;

  // Where the gradient goes: a new buffer, or the logits themselves (in place).
  void set_gradient(const at::Tensor& grad) {
    problem.grad = grad.data_ptr();
    problem.grad_row_stride = grad.stride(0);
  }
};

// `grad_scale` is absent for the loss-only op, which writes no gradient.
inline PreparedRows prepare_rows(const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& grad_scale,
                                 double k_s, double k_t, int64_t ignore_index, double z_loss, double softcap,
                                 double logit_scale, const std::optional<at::Tensor>& predicted,
                                 const std::optional<at::Tensor>& precomputed_lse) {
  TORCH_CHECK(logits.dim() == 2, "fused_ls: logits must be 2-D (rows, classes), got shape ", logits.sizes());
  const int64_t num_rows = logits.size(0), num_classes = logits.size(1);
  TORCH_CHECK(num_classes >= 1, "fused_ls: logits need at least one class");
  TORCH_CHECK(logits.stride(1) == 1 || num_classes == 1,
              "fused_ls: logits must have unit stride along the classes, got strides ", logits.strides());
  const ScalarKind kind = scalar_kind(logits.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == num_rows, "fused_ls: target must have shape (", num_rows,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "fused_ls: target must be int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "fused_ls: target is on ", target.device(), ", logits on ",
              logits.device());
  // grad_scale: one scale for the whole gradient (0-d or (1,)), or one per row ((N,), any stride).
  bool per_row_scale = false;
  if (grad_scale.has_value()) {
    TORCH_CHECK(at::isFloatingType(grad_scale->scalar_type()), "fused_ls: grad_scale must be floating point, got ",
                grad_scale->scalar_type());
    const bool single = grad_scale->numel() == 1 && grad_scale->dim() <= 1;
    per_row_scale = !single && grad_scale->dim() == 1 && grad_scale->size(0) == num_rows;
    TORCH_CHECK(single || per_row_scale,
                "fused_ls: grad_scale must have one element (shape () or (1,)) or one per row of logits (shape (",
                num_rows, ",)), got shape ", grad_scale->sizes());
    TORCH_CHECK(grad_scale->device() == logits.device(), "fused_ls: grad_scale is on ", grad_scale->device(),
                ", logits on ", logits.device());
  }
  // The masses come from a convention (fused_ls/conventions.py): k_s >= 0, and both finite.
  TORCH_CHECK(std::isfinite(k_s) && std::isfinite(k_t) && k_s >= 0.0,
              "fused_ls: the smoothing masses must be finite with k_s >= 0, got k_s=", k_s, ", k_t=", k_t);
  TORCH_CHECK(softcap >= 0.0, "fused_ls: softcap must be > 0 (or 0 for none), got ", softcap);
  if (predicted.has_value()) {
    TORCH_CHECK(predicted->scalar_type() == at::kLong && predicted->dim() == 1 && predicted->size(0) == num_rows &&
                    predicted->is_contiguous(),
                "fused_ls: predicted must be a contiguous int64 buffer of shape (", num_rows, ",), got ",
                predicted->scalar_type(), " of shape ", predicted->sizes());
    TORCH_CHECK(predicted->device() == logits.device(), "fused_ls: predicted is on ", predicted->device(),
                ", logits on ", logits.device());
  }

  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  PreparedRows out;
  out.target = target.to(at::kLong).contiguous();
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == num_classes, "fused_ls: weight must have shape (",
                num_classes, ",), got ", weight->sizes());
    TORCH_CHECK(at::isFloatingType(weight->scalar_type()), "fused_ls: weight must be floating point, got ",
                weight->scalar_type());
    TORCH_CHECK(weight->device() == logits.device(), "fused_ls: weight is on ", weight->device(), ", logits on ",
                logits.device());
    out.weight = weight->to(acc).contiguous();
    // In double when the logits or the weights are double, else float: the rule of every
    // backend (class_weight_sum in fused_ls/_row_op.py).
    const bool wide = weight->scalar_type() == at::kDouble || logits.scalar_type() == at::kDouble;
    const at::ScalarType sum_dtype = wide ? at::kDouble : at::kFloat;
    out.weight_sum = weight->sum(sum_dtype).to(acc);
  }
  if (grad_scale.has_value()) {
    // Per row: contiguous, so an expanded (stride 0) or strided view is copied to N values.
    out.grad_scale = per_row_scale ? grad_scale->to(acc).contiguous() : grad_scale->to(acc).reshape({}).contiguous();
  }
  out.loss = at::empty({num_rows}, logits.options().dtype(acc));
  out.lse = at::empty({num_rows}, logits.options().dtype(acc));
  if (predicted.has_value()) out.predicted = *predicted;
  if (precomputed_lse.has_value()) {
    TORCH_CHECK(precomputed_lse->dim() == 1 && precomputed_lse->size(0) == num_rows &&
                    at::isFloatingType(precomputed_lse->scalar_type()),
                "fused_ls: precomputed_lse must be floating point of shape (", num_rows, ",), got ",
                precomputed_lse->scalar_type(), " of shape ", precomputed_lse->sizes());
    TORCH_CHECK(precomputed_lse->device() == logits.device(), "fused_ls: precomputed_lse is on ",
                precomputed_lse->device(), ", logits on ", logits.device());
    out.precomputed_lse = precomputed_lse->to(acc).contiguous();
  }

  RowsProblem& p = out.problem;
  p.dtype = kind;
  p.logits = logits.data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.grad = nullptr;
  p.grad_row_stride = 0;
  p.target = out.target.data_ptr<int64_t>();
  p.weight = out.weight.defined() ? out.weight.data_ptr() : nullptr;
  p.weight_sum = out.weight_sum.defined() ? out.weight_sum.data_ptr() : nullptr;
  p.grad_scale = out.grad_scale.defined() ? out.grad_scale.data_ptr() : nullptr;
  p.grad_scale_row_stride = per_row_scale ? 1 : 0;
  p.loss = out.loss.data_ptr();
  p.lse = out.lse.data_ptr();
  p.num_rows = num_rows;
  p.num_classes = num_classes;
  p.ignore_index = ignore_index;
  p.k_s = k_s;
  p.k_t = k_t;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.logit_scale = logit_scale;
  p.predicted = out.predicted.defined() ? out.predicted.data_ptr<int64_t>() : nullptr;
  p.precomputed_lse = out.precomputed_lse.defined() ? out.precomputed_lse.data_ptr() : nullptr;
  return out;
}

}  // namespace fused_ls
