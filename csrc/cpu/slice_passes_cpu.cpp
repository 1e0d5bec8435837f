// The CPU device of vocabulary parallelism's slice passes (the torch side is ../slice_ops.h; the
// kernels are in smoothed_xent_kernel.cpp next to the row op's, whose machinery they share).
#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../slice_ops.h"
#include "isa.h"
#include "smoothed_xent_kernel.h"

namespace fused_ls::cpu {
namespace {

void run_rows(SliceFn fn, const SliceProblem& p) {
  if (p.num_rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / p.num_classes);
  at::parallel_for(0, p.num_rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

struct CpuSliceDevice {
  static void check(const at::Tensor& logits) {
    TORCH_CHECK(logits.device().is_cpu(), "fused_ls: the CPU kernel got logits on ", logits.device());
  }

  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  // The kernels index rows with the columns: each must be a class of the slice (host memory: no sync).
  static void check_columns(const at::Tensor& column, int64_t num_classes) {
    const int64_t* columns = column.data_ptr<int64_t>();
    for (int64_t row = 0; row < column.numel(); ++row) {
      TORCH_CHECK(0 <= columns[row] && columns[row] < num_classes, "fused_ls: column ", columns[row], " of row ", row,
                  " is outside the slice's ", num_classes, " classes");
    }
  }

  static void statistics(const SliceProblem& p, const at::Tensor&) {
    static const SliceFn fn = FUSED_LS_SELECT_VARIANT(smoothed_xent_slice_statistics);
    run_rows(fn, p);
  }

  static void gradient(const SliceProblem& p, const at::Tensor&) {
    static const SliceFn fn = FUSED_LS_SELECT_VARIANT(smoothed_xent_slice_gradient);
    run_rows(fn, p);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) { register_slice_ops<CpuSliceDevice>(m); }

}  // namespace fused_ls::cpu
