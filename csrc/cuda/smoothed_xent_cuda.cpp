// The CUDA device of the row ops (the torch side is row_ops.h), over the raw launcher in
// smoothed_xent_kernel.cu. Compiled only into a CUDA build (setup.py,
// or the just-in-time build, with a CUDA torch and nvcc). Runs on the current stream, with no
// host synchronisation, so it can be captured in a CUDA graph.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../row_ops.h"
#include "../slice_ops.h"
#include "smoothed_xent_cuda.h"

namespace fused_ls::cuda {
namespace {

struct CudaDevice {
  static void check(const at::Tensor& logits) {
    TORCH_CHECK(logits.is_cuda(), "fused_ls: the CUDA kernel got logits on ", logits.device());
  }

  struct Guard {
    explicit Guard(const at::Tensor& logits) : guard(logits.device()) {}
    c10::cuda::CUDAGuard guard;
  };

  static at::Tensor empty_gradient(const at::Tensor& logits) {
    return at::empty({logits.size(0), logits.size(1)}, logits.options());
  }

  static void run(PreparedRows& prepared, const at::Tensor& logits) {
    const RowsProblem& p = prepared.problem;
    if (p.num_rows == 0) return;
    TORCH_CHECK(p.predicted == nullptr || p.num_classes < INT32_MAX,
                "fused_ls: the CUDA kernels take each row's argmax for rows of fewer than 2^31 - 1 classes, got ",
                p.num_classes);
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
};

struct CudaSliceDevice {
  static void check(const at::Tensor& logits) { CudaDevice::check(logits); }
  using Guard = CudaDevice::Guard;
  // Reading the columns would sync with the host: the kernels never dereference one outside the slice.
  static void check_columns(const at::Tensor&, int64_t) {}
  static void statistics(const SliceProblem& p, const at::Tensor&) {
    C10_CUDA_CHECK(launch_slice_statistics(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
  static void gradient(const SliceProblem& p, const at::Tensor&) {
    C10_CUDA_CHECK(launch_slice_gradient(p, c10::cuda::getCurrentCUDAStream().stream()));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_ls, CUDA, m) {
  register_row_ops<CudaDevice>(m);
  register_slice_ops<CudaSliceDevice>(m);
}

}  // namespace fused_ls::cuda
