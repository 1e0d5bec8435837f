// The problem every native kernel of fused_ls solves, in plain C++ (no torch headers), so
// that the CUDA sources compile with a bare `nvcc -c` and the CPU kernel with bare at::vec.
//
// Per row of V logits x with target t (the maths in full: docs/maths.md):
//     y = softcap * tanh(logit_scale * x / softcap)    (y = logit_scale * x without softcap)
//     m = max y,  s = sum exp(y - m),  lse = m + log s,  p = exp(y - lse)
//     class c gets the target mass  k_s w_c + k_t w_t [c == t];  W = sum w,  A = k_s W + k_t w_t
//     loss = A log s + k_s sum_c w_c (m - y_c) + k_t w_t (m - y_t) + z_loss lse^2
//     dloss/dx_c = ((A + 2 z_loss lse) p_c - k_s w_c - k_t w_t [c == t])
//                  * grad_scale_row * logit_scale * (1 - (y_c / softcap)^2)
// with grad_scale_row the one scale of the call or, per row, that row's entry (see RowsProblem).
// Ignored rows (t == ignore_index): loss 0, gradient 0. A target outside [0, V) is never
// dereferenced: loss NaN, gradient 0. lse is written for every row.
//
// Masked classes (y_c = -inf): p_c = 0 and a gradient of -k_s w_c (finite); in the loss a term
// q_c (m - y_c), with q_c = k_s w_c + k_t w_t [c == t], is +inf where q_c > 0 and exactly 0
// where q_c = 0 (never 0 * inf = NaN): so with label_smoothing 0 a masked non-target class
// costs nothing, a masked target costs +inf, and a class weight 0 makes a masked class free.
#pragma once

#include <cstdint>

namespace fused_ls {

// The logits' dtype; the gradient has the same one. Accumulation is in double for Float64
// (so that gradcheck sees exact derivatives) and in float for the other three.
enum class ScalarKind : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// One call's worth of rows. Every pointer is on the kernel's device; "acc" below means
// double for Float64 logits and float otherwise.
struct RowsProblem {
  ScalarKind dtype;
  const void* logits;          // (num_rows, num_classes), unit stride along a row
  int64_t logits_row_stride;   // in elements; any value (int64: rows x V may pass 2^31)
  void* grad;                  // (num_rows, num_classes), logits' dtype; may be `logits` (in place);
                               // nullptr: the loss and lse only, no gradient pass
  int64_t grad_row_stride;
  const int64_t* target;       // (num_rows,)
  const void* weight;          // (num_classes,) acc, or nullptr for no class weights
  const void* weight_sum;      // 0-d acc, sum of `weight`; read only with `weight`
  const void* grad_scale;      // acc; row i's gradient is multiplied by grad_scale[i * grad_scale_row_stride]:
                               // one value for every row (1/normaliser of a mean; stride 0), or one
                               // per row (stride 1: e.g. the upstream gradient of each row's loss
                               // folded in, before the single rounding to the logits' dtype).
                               // Read only with `grad`: nullptr (and the stride unused) without it
  int64_t grad_scale_row_stride;  // in elements: 0 (a single scale) or 1 (num_rows scales)
  void* loss;                  // (num_rows,) acc
  void* lse;                   // (num_rows,) acc
  int64_t num_rows;
  int64_t num_classes;
  int64_t ignore_index;
  double k_s;                  // smoothing mass per unit of class weight (a convention's, from
  double k_t;                  // extra mass of the true class              fused_ls/conventions.py)
  double z_loss;
  double softcap;              // 0: no softcap
  double logit_scale;
  int64_t* predicted;          // (num_rows,) each row's argmax out: the first class of largest y (0 for a
                               // row of -inf only, any class for a row holding NaN); nullptr: not asked for
  const void* precomputed_lse;  // (num_rows,) acc: each row's lse from a previous pass, used (and written
                                // out as lse) in place of the kernel's own; nullptr: none given
};

// Vocabulary parallelism's two passes over this rank's slice of the classes (fused_ls/parallel.py
// combines the ranks' statistics between them; the maths: docs/vocab-parallel.md). With y, w and
// the masses as above, over the slice's V_r classes:
//   statistics:  m_r = max y,  log s_r = log sum exp(y - m_r),
//                L_r = sum_c q_c (lse_r - y_c),  q_c = k_s w_c + k_t w_t [c == column and owned]
//                (a slice whose y are all -inf: m_r = log s_r = -inf and L_r = 0)
//   gradient:    given the row's global m and log s (lse = m + log s) and its coefficients,
//                g_c = (p_coef exp(y_c - m - log s) - smooth_coef w_c - true_coef [c == column])
//                      * (1 - (y_c / softcap)^2)
//                (logit_scale and any scale of the row are in the coefficients; a row whose three
//                coefficients are 0 gets a zero gradient, its logits unread).
struct SliceProblem {
  ScalarKind dtype;
  const void* logits;          // (num_rows, num_classes), unit stride along a row
  int64_t logits_row_stride;
  void* grad;                  // gradient pass: (num_rows, num_classes) out, may be `logits`;
  int64_t grad_row_stride;     //   nullptr for the statistics pass
  const int64_t* column;       // (num_rows,) the target's class within the slice where owned; any
                               // index in [0, num_classes) elsewhere
  const bool* owned;           // statistics: (num_rows,) whether the row's target lies in the slice
  const void* weight;          // (num_classes,) acc, or nullptr for no class weights
  const void* weight_sum;      // 0-d acc, sum of `weight`; read only with `weight`
  void* row_max;               // (num_rows,) acc: statistics out, gradient in
  void* log_sum;               // (num_rows,) acc: statistics out, gradient in
  void* loss;                  // (num_rows,) acc: statistics out (L_r)
  const void* p_coef;          // gradient: (num_rows,) acc each
  const void* smooth_coef;
  const void* true_coef;
  int64_t num_rows;
  int64_t num_classes;
  double k_s;
  double k_t;
  double softcap;              // 0: no softcap
  double logit_scale;
};

}  // namespace fused_ls
