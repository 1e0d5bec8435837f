// CUDA implementation of fused_ls::smoothed_xent_rows, smoothed_xent_rows_ and smoothed_xent_rows_loss: the torch side
// of the raw launcher in smoothed_xent_kernel.cu. Compiled only into a CUDA build (setup.py,
// or the just-in-time build, with a CUDA torch and nvcc). Runs on the current stream, with no
// host synchronisation, so it can be captured in a CUDA graph.
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../op_common.h"
#include "smoothed_xent_cuda.h"

namespace fused_ls::cuda {
namespace {

// `grad` undefined: the loss and lse only.
void run(PreparedRows& prepared, const at::Tensor& grad, const at::Tensor& logits) {
  RowsProblem& p = prepared.problem;
  if (grad.defined()) {
    p.grad = grad.data_ptr();
    p.grad_row_stride = grad.stride(0);
  }
  if (p.num_rows == 0) return;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, logits.get_device()));
  const int splits = blocks_per_row(p.num_rows, p.num_classes, num_sms);
  at::Tensor workspace;  // stream-ordered: the caching allocator reuses it only after these kernels
  if (const size_t bytes = workspace_bytes(p, splits); bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte));
  }
  C10_CUDA_CHECK(launch_smoothed_xent_rows(p, splits, workspace.defined() ? workspace.data_ptr() : nullptr,
                                           c10::cuda::getCurrentCUDAStream().stream()));
}

void check_cuda(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "fused_ls: the CUDA kernel got logits on ", logits.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> smoothed_xent_rows_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_scale, double label_smoothing, bool smooth_others, int64_t ignore_index, double z_loss,
    double softcap, double logit_scale) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  PreparedRows prepared = prepare_rows(logits, target, weight, grad_scale, label_smoothing, smooth_others,
                                       ignore_index, z_loss, softcap, logit_scale);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  run(prepared, grad, logits);
  return {prepared.loss, prepared.lse, grad};
}

std::tuple<at::Tensor, at::Tensor> smoothed_xent_rows_inplace_cuda(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_scale, double label_smoothing, bool smooth_others, int64_t ignore_index, double z_loss,
    double softcap, double logit_scale) {
  check_cuda(logits);
  at::assert_no_internal_overlap(logits);  // rows sharing memory would race
  const c10::cuda::CUDAGuard device_guard(logits.device());
  PreparedRows prepared = prepare_rows(logits, target, weight, grad_scale, label_smoothing, smooth_others,
                                       ignore_index, z_loss, softcap, logit_scale);
  run(prepared, logits, logits);
  return {prepared.loss, prepared.lse};
}

std::tuple<at::Tensor, at::Tensor> smoothed_xent_rows_loss_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, bool smooth_others, int64_t ignore_index, double z_loss, double softcap,
    double logit_scale) {
  check_cuda(logits);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  PreparedRows prepared = prepare_rows(logits, target, weight, std::nullopt, label_smoothing, smooth_others,
                                       ignore_index, z_loss, softcap, logit_scale);
  run(prepared, at::Tensor(), logits);
  return {prepared.loss, prepared.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ls, CUDA, m) {
  m.impl("smoothed_xent_rows", &smoothed_xent_rows_cuda);
  m.impl("smoothed_xent_rows_", &smoothed_xent_rows_inplace_cuda);
  m.impl("smoothed_xent_rows_loss", &smoothed_xent_rows_loss_cuda);
}

}  // namespace fused_ls::cuda
