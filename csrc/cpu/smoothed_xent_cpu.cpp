// CPU implementation of fused_ls::smoothed_xent_rows, smoothed_xent_rows_ and smoothed_xent_rows_loss: checks,
// allocation, at::parallel_for over rows, and the choice of the kernel's instruction set.
#include "smoothed_xent_cpu.h"

#include <algorithm>
#include <cstdint>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../op_common.h"
#include "isa.h"
#include "smoothed_xent_kernel.h"

namespace fused_ls::cpu {
namespace {

// A new gradient is as large as the logits, and its first touch costs a page fault and the
// kernel's zeroing of every 4 KB page, a large share of the whole op. Transparent huge pages
// (madvise(MADV_HUGEPAGE) on the buffer) cut the fault count 512-fold and made one op alone
// about 2x cheaper in kernel time here, but in a training-like sequence (eager and compiled
// steps between ours, as in bench/test_native_cpu.py) the median step at 4096x32000 fp32 was
// 2.3x slower (1679 ms against 727 ms, both timed in turns). Our reading: each huge-page fault
// zeroes 2 MB, the size of this machine's L2, so the zeroed lines are evicted before the
// kernel writes them, while a 4 KB page is zeroed just before its first write and still in
// cache. So the gradient is a plain at::empty.
at::Tensor empty_gradient(const at::Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options());
}

// `grad` undefined: the loss and lse only.
void run(PreparedRows& prepared, const at::Tensor& grad) {
  RowsProblem& p = prepared.problem;
  if (grad.defined()) {
    p.grad = grad.data_ptr();
    p.grad_row_stride = grad.stride(0);
  }
  if (p.num_rows == 0) return;
  static const RowsFn fn = FUSED_LS_SELECT_VARIANT(smoothed_xent_rows);
  // Rows per task: enough logits (64k) to amortise a task's scratch set-up.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / p.num_classes);
  at::parallel_for(0, p.num_rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

void check_cpu(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "fused_ls: the CPU kernel got logits on ", logits.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> smoothed_xent_rows_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_scale, double label_smoothing, bool smooth_others, int64_t ignore_index, double z_loss,
    double softcap, double logit_scale) {
  check_cpu(logits);
  PreparedRows prepared = prepare_rows(logits, target, weight, grad_scale, label_smoothing, smooth_others,
                                       ignore_index, z_loss, softcap, logit_scale);
  at::Tensor grad = empty_gradient(logits);
  run(prepared, grad);
  return {prepared.loss, prepared.lse, grad};
}

std::tuple<at::Tensor, at::Tensor> smoothed_xent_rows_inplace_cpu(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_scale, double label_smoothing, bool smooth_others, int64_t ignore_index, double z_loss,
    double softcap, double logit_scale) {
  check_cpu(logits);
  at::assert_no_internal_overlap(logits);  // rows sharing memory would race
  PreparedRows prepared = prepare_rows(logits, target, weight, grad_scale, label_smoothing, smooth_others,
                                       ignore_index, z_loss, softcap, logit_scale);
  run(prepared, logits);
  return {prepared.loss, prepared.lse};
}

std::tuple<at::Tensor, at::Tensor> smoothed_xent_rows_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, bool smooth_others, int64_t ignore_index, double z_loss, double softcap,
    double logit_scale) {
  check_cpu(logits);
  PreparedRows prepared = prepare_rows(logits, target, weight, std::nullopt, label_smoothing, smooth_others,
                                       ignore_index, z_loss, softcap, logit_scale);
  run(prepared, at::Tensor());
  return {prepared.loss, prepared.lse};
}

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

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) {
  m.impl("smoothed_xent_rows", &smoothed_xent_rows_cpu);
  m.impl("smoothed_xent_rows_", &smoothed_xent_rows_inplace_cpu);
  m.impl("smoothed_xent_rows_loss", &smoothed_xent_rows_loss_cpu);
}

}  // namespace fused_ls::cpu
