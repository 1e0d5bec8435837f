// The CPU device of the row ops (the torch side is row_ops.h): at::parallel_for over rows, and
// the choice of the kernel's instruction set.
#include "smoothed_xent_cpu.h"

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../row_ops.h"
#include "isa.h"
#include "smoothed_xent_kernel.h"

namespace fused_ls::cpu {
namespace {

struct CpuDevice {
  static void check(const at::Tensor& logits) {
    TORCH_CHECK(logits.device().is_cpu(), "fused_ls: the CPU kernel got logits on ", logits.device());
  }

  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  // A new gradient is as large as the logits, and its first touch costs a page fault and the
  // kernel's zeroing of every 4 KB page. Transparent huge pages (madvise(MADV_HUGEPAGE)) cut
  // the faults 512-fold and made the op alone cheaper, but a training-like sequence of steps
  // (bench/test_native_cpu.py) about 2x slower: each huge-page fault zeroes 2 MB, an L2's
  // worth, so the zeroed lines are evicted before the kernel writes them, while a 4 KB page
  // is zeroed just before its first write and is still in cache. So: a plain at::empty.
  static at::Tensor empty_gradient(const at::Tensor& logits) {
    return at::empty({logits.size(0), logits.size(1)}, logits.options());
  }

  static void run(PreparedRows& prepared, const at::Tensor&) {
    const RowsProblem& p = prepared.problem;
    if (p.num_rows == 0) return;
    static const RowsFn fn = FUSED_LS_SELECT_VARIANT(smoothed_xent_rows);
    // Rows per task: enough logits (64k) to amortise a task's scratch set-up.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / p.num_classes);
    at::parallel_for(0, p.num_rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  }
};

}  // namespace

const char* selected_kernel_isa() { return selected_isa(); }

const char* compiled_kernel_isas() {
  return "DEFAULT"
#ifdef FUSED_LS_CPU_AVX2
         ",AVX2"
#endif
#ifdef FUSED_LS_CPU_AVX512
         ",AVX512"
#endif
      ;
}

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) { register_row_ops<CpuDevice>(m); }

}  // namespace fused_ls::cpu
