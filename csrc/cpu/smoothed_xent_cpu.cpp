// CPU implementation of fused_ls::smoothed_xent_rows and smoothed_xent_rows_: checks,
// allocation, at::parallel_for over rows, and the choice of the kernel's instruction set.
#include "smoothed_xent_cpu.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../op_common.h"
#include "smoothed_xent_kernel.h"

namespace fused_ls::cpu {
namespace {

struct KernelChoice {
  RowsFn fn;
  const char* isa;
};

KernelChoice choose_kernel() {
  // torch's own choice for this CPU, which honours ATEN_CPU_CAPABILITY.
  const std::string capability = at::get_cpu_capability();
#ifdef FUSED_LS_CPU_AVX512
  if (capability == "AVX512") return {&AVX512::smoothed_xent_rows, "AVX512"};
#endif
#ifdef FUSED_LS_CPU_AVX2
  if (capability == "AVX512" || capability == "AVX2") return {&AVX2::smoothed_xent_rows, "AVX2"};
#endif
  return {&DEFAULT::smoothed_xent_rows, "DEFAULT"};
}

const KernelChoice& kernel() {
  static const KernelChoice choice = choose_kernel();
  return choice;
}

// A new gradient is as large as the logits, and its first touch costs a page fault per
// 4 KB page, a large share of the whole op. Transparent huge pages cut that 512-fold;
// ask for them on the buffer's 2 MB-aligned interior before anything touches it (where
// THP is "madvise", the common default, nothing else would). Advisory: errors are ignored.
at::Tensor empty_gradient(const at::Tensor& logits) {
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t end = begin + grad.nbytes();
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (grad.nbytes() >= 4 * kHugePage && last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return grad;
}

void run(PreparedRows& prepared, at::Tensor& grad) {
  RowsProblem& p = prepared.problem;
  p.grad = grad.data_ptr();
  p.grad_row_stride = grad.stride(0);
  if (p.num_rows == 0) return;
  const RowsFn fn = kernel().fn;
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

}  // namespace

const char* selected_kernel_isa() { return kernel().isa; }

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
}

}  // namespace fused_ls::cpu
