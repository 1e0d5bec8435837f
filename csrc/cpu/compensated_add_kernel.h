// The CPU kernel of fused_ls::compensated_add_ (the linear head's dL/dW sum), compiled once
// per instruction set like the row kernel (smoothed_xent_kernel.h).
#pragma once

#include <cstdint>

#include "../smoothed_xent.h"

namespace fused_ls::cpu {

struct CompensatedAddProblem {
  void* hi;              // running sum, bfloat16 or float16
  ScalarKind hi_dtype;
  void* lo;              // bfloat16 residual of hi
  const void* product;   // float32, bfloat16 or float16
  ScalarKind product_dtype;
  bool first;            // overwrite (hi, lo) with the product instead of adding
};

// Elements [begin, end) of `problem`, on the calling thread.
using CompensatedAddFn = void (*)(const CompensatedAddProblem& problem, int64_t begin, int64_t end);

namespace DEFAULT {
void compensated_add(const CompensatedAddProblem& problem, int64_t begin, int64_t end);
}
namespace AVX2 {
void compensated_add(const CompensatedAddProblem& problem, int64_t begin, int64_t end);
}
namespace AVX512 {
void compensated_add(const CompensatedAddProblem& problem, int64_t begin, int64_t end);
}

}  // namespace fused_ls::cpu
