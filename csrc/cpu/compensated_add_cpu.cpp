// CPU implementation of fused_ls::compensated_add_, the linear head's dL/dW update. The op's
// schema and its eager definition are Python's (fused_ls/linear.py, torch.library.custom_op);
// this registers a CPU kernel for it, which the dispatcher prefers to the eager definition
// (registered for CompositeExplicitAutograd) once the extension is loaded. Same numbers, bit
// for bit (tests/test_native.py).
#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../op_common.h"
#include "compensated_add_kernel.h"
#include "isa.h"

namespace fused_ls::cpu {
namespace {

bool kernel_takes(const at::Tensor& hi, const at::Tensor& lo, const at::Tensor& product) {
  const auto reduced = [](at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; };
  return reduced(hi.scalar_type()) && lo.scalar_type() == at::kBFloat16 &&
         (reduced(product.scalar_type()) || product.scalar_type() == at::kFloat) && hi.is_contiguous() &&
         lo.is_contiguous() && product.is_contiguous();
}

void compensated_add_cpu(at::Tensor& hi, at::Tensor& lo, const at::Tensor& product, bool first) {
  TORCH_CHECK(hi.device().is_cpu() && lo.device().is_cpu() && product.device().is_cpu(),
              "fused_ls::compensated_add_: the CPU kernel got tensors on ", hi.device(), ", ", lo.device(), " and ",
              product.device());
  TORCH_CHECK(hi.sizes() == lo.sizes() && hi.sizes() == product.sizes(),
              "fused_ls::compensated_add_: hi, lo and product must have one shape, got ", hi.sizes(), ", ",
              lo.sizes(), " and ", product.sizes());
  at::assert_no_overlap(hi, lo);
  at::assert_no_partial_overlap(hi, product);  // the eager definition reads all of product first
  at::assert_no_partial_overlap(lo, product);
  at::assert_no_internal_overlap(hi);
  at::assert_no_internal_overlap(lo);
  if (!kernel_takes(hi, lo, product)) {
    // Any other dtypes or layouts: the eager definition, op for op.
    at::Tensor total = product.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    if (!first) {
      total.add_(hi);
      total.add_(lo);
    }
    hi.copy_(total);
    total.sub_(hi);
    lo.copy_(total);
    return;
  }
  const CompensatedAddProblem problem{hi.data_ptr(), scalar_kind(hi.scalar_type()), lo.data_ptr(),
                                      product.data_ptr(), scalar_kind(product.scalar_type()), first};
  static const CompensatedAddFn fn = FUSED_LS_SELECT_VARIANT(compensated_add);
  // 64k elements per task: ~700 KB moved, enough to amortise a task, small enough to balance.
  at::parallel_for(0, hi.numel(), int64_t{1} << 16,
                   [&](int64_t begin, int64_t end) { fn(problem, begin, end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) { m.impl("compensated_add_", &compensated_add_cpu); }

}  // namespace fused_ls::cpu
