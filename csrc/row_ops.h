// The torch side of the row ops fused_ls::smoothed_xent_rows, smoothed_xent_rows_ and
// smoothed_xent_rows_loss, written once for every device. The schemas and their fakes are
// defined in Python (fused_ls/_row_op.py); a device file supplies a `Device` with
//     static void check(const at::Tensor& logits);          the logits are on this device
//     struct Guard { explicit Guard(const at::Tensor&); };   held for the whole call
//     static at::Tensor empty_gradient(const at::Tensor& logits);
//     static void run(PreparedRows& prepared, const at::Tensor& logits);   problem.grad set or null,
//                                                                         problem.predicted too
// and registers RowOps<Device> for its dispatch key with register_row_ops.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "op_common.h"

namespace fused_ls {

template <class Device>
struct RowOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> rows(const at::Tensor& logits, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& grad_scale, double k_s, double k_t,
                                                             int64_t ignore_index, double z_loss, double softcap,
                                                             double logit_scale,
                                                             const std::optional<at::Tensor>& predicted,
                                                             const std::optional<at::Tensor>& precomputed_lse) {
    Device::check(logits);
    const typename Device::Guard guard(logits);
    PreparedRows prepared =
        prepare_rows(logits, target, weight, grad_scale, k_s, k_t, ignore_index, z_loss, softcap, logit_scale,
                     predicted, precomputed_lse);
    at::Tensor grad = Device::empty_gradient(logits);
    prepared.set_gradient(grad);
    Device::run(prepared, logits);
    return {prepared.loss, prepared.lse, grad};
  }

  // The gradient is written over `logits`.
  static std::tuple<at::Tensor, at::Tensor> rows_inplace(at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         const at::Tensor& grad_scale, double k_s, double k_t,
                                                         int64_t ignore_index, double z_loss, double softcap,
                                                         double logit_scale,
                                                         const std::optional<at::Tensor>& predicted,
                                                         const std::optional<at::Tensor>& precomputed_lse) {
    Device::check(logits);
    at::assert_no_internal_overlap(logits);  // rows sharing memory would race
    const typename Device::Guard guard(logits);
    PreparedRows prepared =
        prepare_rows(logits, target, weight, grad_scale, k_s, k_t, ignore_index, z_loss, softcap, logit_scale,
                     predicted, precomputed_lse);
    prepared.set_gradient(logits);
    Device::run(prepared, logits);
    return {prepared.loss, prepared.lse};
  }

  // The loss and lse alone: the same first pass, and not a byte of gradient written or allocated.
  static std::tuple<at::Tensor, at::Tensor> rows_loss(const at::Tensor& logits, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight, double k_s,
                                                      double k_t, int64_t ignore_index, double z_loss,
                                                      double softcap, double logit_scale,
                                                      const std::optional<at::Tensor>& predicted,
                                                      const std::optional<at::Tensor>& precomputed_lse) {
    Device::check(logits);
    const typename Device::Guard guard(logits);
    PreparedRows prepared =
        prepare_rows(logits, target, weight, std::nullopt, k_s, k_t, ignore_index, z_loss, softcap, logit_scale,
                     predicted, precomputed_lse);
    Device::run(prepared, logits);
    return {prepared.loss, prepared.lse};
  }
};

template <class Device>
void register_row_ops(torch::Library& m) {
  m.impl("smoothed_xent_rows", &RowOps<Device>::rows);
  m.impl("smoothed_xent_rows_", &RowOps<Device>::rows_inplace);
  m.impl("smoothed_xent_rows_loss", &RowOps<Device>::rows_loss);
}

}  // namespace fused_ls
