// The linear head's compensated dL/dW update on the CPU: (hi, lo) += product in one pass.
//
// fused_ls/linear.py sums dL/dW over token chunks in the weight's dtype (bf16/fp16) without
// an fp32 accumulator: hi is the running sum rounded once, lo (bf16) what that rounding left
// out. Per element, in fp32:
//
//     total = (product + hi) + lo        lo is at most half an ulp of hi, so this loses < 2^-24
//     hi    = round_to_nearest_even(total)
//     lo    = round_bf16(total - hi)     total - hi is exact (hi is total's nearest neighbour)
//
// in this order of additions, so that the result is bit for bit that of the eager definition
// (_eager_compensated_add in fused_ls/linear.py) and of the Triton kernel on CUDA. With
// `first` the pair is overwritten: hi = round(product), lo = round_bf16(product - hi).
//
// Memory traffic per element: read product (2 or 4 B), hi and lo (2 + 2 B), write hi and lo
// (2 + 2 B): 10-12 B, once. The eager definition takes five passes and an fp32 temporary.
#include "compensated_add_kernel.h"
#include "vec_io.h"

namespace fused_ls::cpu::CPU_CAPABILITY {
namespace {

template <typename hi_t, typename product_t>
void add_range(const CompensatedAddProblem& p, int64_t begin, int64_t end) {
  using Vec = Vectorized<float>;
  using HiIo = RowIo<hi_t>;
  using LoIo = RowIo<c10::BFloat16>;
  using ProductIo = RowIo<product_t>;
  constexpr int64_t kStep = LoIo::kStep;
  static_assert(HiIo::kStep == kStep && ProductIo::kStep == kStep, "one step must be the same elements");
  auto* hi = static_cast<hi_t*>(p.hi);
  auto* lo = static_cast<c10::BFloat16*>(p.lo);
  const auto* product = static_cast<const product_t*>(p.product);

  const auto update = [&](int64_t i, int64_t n) {  // n == kStep: full vectors
    const bool full = n == kStep;
    Vec t0, t1;
    full ? ProductIo::load(product + i, t0, t1) : ProductIo::load_partial(product + i, n, t0, t1);
    if (!p.first) {
      Vec h0, h1, l0, l1;
      full ? HiIo::load(hi + i, h0, h1) : HiIo::load_partial(hi + i, n, h0, h1);
      full ? LoIo::load(lo + i, l0, l1) : LoIo::load_partial(lo + i, n, l0, l1);
      t0 = (t0 + h0) + l0;
      t1 = (t1 + h1) + l1;
    }
    // Round hi by storing it, then read the rounded value back (from L1) for the residual.
    Vec r0, r1;
    if (full) {
      HiIo::store(hi + i, t0, t1);
      HiIo::load(hi + i, r0, r1);
      LoIo::store(lo + i, t0 - r0, t1 - r1);
    } else {
      HiIo::store_partial(hi + i, n, t0, t1);
      HiIo::load_partial(hi + i, n, r0, r1);
      LoIo::store_partial(lo + i, n, t0 - r0, t1 - r1);
    }
  };
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) update(i, kStep);
  if (i < end) update(i, end - i);
}

template <typename hi_t>
void add_range_for_product(const CompensatedAddProblem& p, int64_t begin, int64_t end) {
  switch (p.product_dtype) {
    case ScalarKind::BFloat16:
      return add_range<hi_t, c10::BFloat16>(p, begin, end);
    case ScalarKind::Float16:
      return add_range<hi_t, c10::Half>(p, begin, end);
    default:  // Float32; the torch wrapper sends nothing else
      return add_range<hi_t, float>(p, begin, end);
  }
}

}  // namespace

void compensated_add(const CompensatedAddProblem& problem, int64_t begin, int64_t end) {
  if (problem.hi_dtype == ScalarKind::Float16) return add_range_for_product<c10::Half>(problem, begin, end);
  return add_range_for_product<c10::BFloat16>(problem, begin, end);
}

}  // namespace fused_ls::cpu::CPU_CAPABILITY
