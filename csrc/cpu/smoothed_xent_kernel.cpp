// Fused label-smoothed cross-entropy on the CPU: loss, lse and gradient of a row in one call.
// The maths is in ../smoothed_xent.h. This file is compiled once per instruction set (see
// smoothed_xent_kernel.h); at::vec gives 16 fp32 lanes with AVX512, 8 with AVX2.
//
// One exp per logit, the row kept in cache
// -----------------------------------------
// A row is processed in chunks of kChunk logits. Pass 1, per chunk: the chunk's max m_k
// (reading the chunk from memory), then e = exp(y - m_k) for the chunk (re-reading it from
// L1), stored to a per-thread fp32 buffer `e` of one row. When the row is done,
//     m = max_k m_k,   s = sum_k s_k exp(m_k - m),   p_c = e_c exp(m_k - m) / s,
// so pass 2 turns each stored e into a gradient with a single multiply-add and no second
// exp (exp_nonpositive below, inline, as the exp is most of the arithmetic). While a chunk's
// exps are computed, the next chunk is prefetched, so that memory and arithmetic overlap.
// The `e` buffer is rewritten for every row and stays in L2 (a 128k-class row is 512 KB
// of fp32; server x86 cores have 1-2 MB of L2 each), so DRAM sees each logit read once and each
// gradient element written once. The smoothing sum is accumulated per chunk as
// sum_c w_c (y_c - m_k), small numbers, and combined as sum_k [(m - m_k) W_k - d_k]: adding a
// constant to every logit changes nothing, and nothing large is subtracted.
//
// Memory traffic per row (b = bytes per logit): read V*b, write V*b (in place: into lines
// pass 1 just read; nothing for the loss-only op, which stops after pass 1). Asked for the row's
// argmax, the one chunk holding its max is scanned again, from cache (first_argmax); given the
// row's lse, pass 1's chunk sums are taken against it (against_lse), no read more. Scratch:
// 4V bytes (8V with softcap, which keeps y to avoid a second tanh) per thread, reused across
// rows; the class weights (4V) are shared by all rows.
//
// The gradient of each element is computed in fp32 (fp64 for fp64 logits) and rounded once;
// the true class's element is recomputed in fp32 from its own e and written last, so its
// p_t - k_t never passes through the low-precision dtype. A target outside [0, V) is never
// used as an index: its row's loss is NaN and its gradient 0.
#include "smoothed_xent_kernel.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>

#include "vec_io.h"  // at::vec, c10's BFloat16 and Half, and the CPU_CAPABILITY check

namespace fused_ls::cpu::CPU_CAPABILITY {
namespace {

// Logits per chunk of pass 1: a chunk (8 KB of fp32) and its exps stay in L1 between the
// max and the exp. A multiple of every RowIo<>::kStep (vec_io.h).
constexpr int64_t kChunk = 2048;

// exp(d) for d <= 0, the only arguments pass 1 has (d = y - max), in fp32: Cody and Waite's
// range reduction d = n ln2 + r, |r| <= ln2 / 2, then a degree-6 polynomial for e^r fitted
// for relative error (1.9e-9 in exact arithmetic; measured at most 1.05 ulp in fp32 with
// FMA, 1.34 ulp without, over [-87.3, 0]), times 2^n built in the exponent bits. Inline, unlike at::vec's exp (a SLEEF call that also spills every live
// vector register around it). d < -88.03 (-inf included) gives exactly 0 (torch would give
// a denormal below 1.2e-38 down to -103.3); NaN gives NaN; 0 gives exactly 1.
inline Vectorized<float> exp_nonpositive(Vectorized<float> d) {
  using Vec = Vectorized<float>;
  using IVec = Vectorized<int32_t>;
  d = at::vec::clamp_min(d, Vec(-88.02969193f));  // -127 ln2; keeps a NaN
  // Adding 1.5 * 2^23 rounds d / ln2 to the integer n held in the low mantissa bits of t.
  const Vec round_shift(12582912.0f);
  const Vec t = at::vec::fmadd(d, Vec(1.44269504f), round_shift);
  const Vec n = t - round_shift;
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), d);  // ln2 in two parts: the first is exact
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p = at::vec::fmadd(Vec(1.384362229e-3f), r, Vec(8.374155499e-3f));
  p = at::vec::fmadd(p, r, Vec(4.166800156e-2f));
  p = at::vec::fmadd(p, r, Vec(1.666643173e-1f));
  p = at::vec::fmadd(p, r, Vec(4.999999404e-1f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  // 2^n: the bits of t are those of 1.5 * 2^23 plus n; (bits + 127) << 23 leaves just the
  // exponent field n + 127 (0, i.e. +0.0, for n = -127).
  const IVec two_to_n = (at::vec::cast<int32_t>(t) + IVec(127)) << IVec(23);
  return p * at::vec::cast<float>(two_to_n);
}

inline Vectorized<double> exp_nonpositive(const Vectorized<double>& d) {
  return d.exp();  // float64 is for gradcheck, not for speed
}

template <typename T>
struct AlignedFree {
  void operator()(T* p) const { std::free(p); }
};
template <typename T>
using AlignedBuffer = std::unique_ptr<T[], AlignedFree<T>>;

template <typename T>
AlignedBuffer<T> aligned_buffer(int64_t count) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();
  return AlignedBuffer<T>(p);
}

template <typename T>
T nan_max(T a, T b) {  // NaN-propagating, like at::vec::maximum
  return (a > b || std::isnan(a)) ? a : b;
}

template <typename Vec, typename T = typename Vec::value_type>
T horizontal_max(const Vec& v) {
  alignas(64) T lanes[Vec::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) m = nan_max(m, lanes[i]);
  return m;
}

template <typename Vec, typename T = typename Vec::value_type>
T horizontal_sum(const Vec& v) {
  alignas(64) T lanes[Vec::size()];
  v.store(lanes);
  T s = 0;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// The rows of one problem on one thread, for one dtype and feature set.
template <typename scalar_t, bool kHasWeight, bool kHasSoftcap>
class RowKernel {
  using Io = RowIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  static constexpr int64_t kLanes = Io::kLanes;
  static constexpr int64_t kStep = Io::kStep;

 public:
  explicit RowKernel(const RowsProblem& p)
      : logits_(static_cast<const scalar_t*>(p.logits)),
        grad_(static_cast<scalar_t*>(p.grad)),
        target_(p.target),
        weight_(static_cast<const acc_t*>(p.weight)),
        loss_(static_cast<acc_t*>(p.loss)),
        lse_(static_cast<acc_t*>(p.lse)),
        predicted_(p.predicted),
        precomputed_lse_(static_cast<const acc_t*>(p.precomputed_lse)),
        logits_row_stride_(p.logits_row_stride),
        grad_row_stride_(p.grad_row_stride),
        V_(p.num_classes),
        num_chunks_((p.num_classes + kChunk - 1) / kChunk),
        ignore_index_(p.ignore_index),
        k_s_(static_cast<acc_t>(p.k_s)),
        k_t_(static_cast<acc_t>(p.k_t)),
        z_loss_(static_cast<acc_t>(p.z_loss)),
        softcap_(static_cast<acc_t>(kHasSoftcap ? p.softcap : 1.0)),
        logit_scale_(static_cast<acc_t>(p.logit_scale)),
        grad_scale_(static_cast<const acc_t*>(p.grad_scale)),
        grad_scale_row_stride_(p.grad_scale_row_stride),
        weight_sum_(kHasWeight ? *static_cast<const acc_t*>(p.weight_sum) : static_cast<acc_t>(p.num_classes)),
        padded_V_((p.num_classes + kStep - 1) / kStep * kStep),
        e_(aligned_buffer<acc_t>(padded_V_)),
        y_(aligned_buffer<acc_t>(kHasSoftcap ? padded_V_ : 0)),
        chunk_(aligned_buffer<ChunkStats>(num_chunks_)) {
    // The class weight of each chunk, W_k, is the same for every row.
    for (int64_t k = 0; k < num_chunks_; ++k) {
      const int64_t c0 = k * kChunk, c1 = std::min(c0 + kChunk, V_);
      acc_t w = static_cast<acc_t>(c1 - c0);
      if constexpr (kHasWeight) {
        w = 0;
        for (int64_t c = c0; c < c1; ++c) w += weight_[c];
      }
      chunk_[k].weight = w;
    }
  }

  // `prefetch_next_row`: whether row + 1 is this thread's next row, to be fetched meanwhile.
  void run(int64_t row, bool prefetch_next_row) {
    const scalar_t* x = logits_ + row * logits_row_stride_;
    scalar_t* g = grad_ != nullptr ? grad_ + row * grad_row_stride_ : nullptr;
    const int64_t t = target_[row];
    const bool ignored = t == ignore_index_;
    const bool in_range = 0 <= t && t < V_;
    const bool valid = in_range && !ignored;

    RowSums sums = first_pass(x, prefetch_next_row);
    const acc_t row_max = sums.m;
    if (precomputed_lse_ != nullptr) sums = against_lse(precomputed_lse_[row]);
    const acc_t m = sums.m, s = sums.s;
    const acc_t log_s = std::log(s);
    const acc_t lse = m + log_s;

    acc_t w_t = 0, y_t = 0;
    if (valid) {
      w_t = kHasWeight ? weight_[t] : acc_t(1);
      y_t = target_y(x, t);
    }
    const acc_t true_mass = k_t_ * w_t;
    const acc_t total_mass = k_s_ * weight_sum_ + true_mass;
    const acc_t loss = total_mass * log_s + distance_term(x, t, w_t, y_t, m, sums.deviation) + z_loss_ * lse * lse;
    loss_[row] = ignored ? acc_t(0) : in_range ? loss : std::numeric_limits<acc_t>::quiet_NaN();
    lse_[row] = lse;
    if (predicted_ != nullptr) predicted_[row] = first_argmax(x, row_max);

    if (g == nullptr) return;  // the loss-only op
    if (!valid) {
      zero_row(g);
      return;
    }
    // The call's one scale, or this row's.
    const acc_t grad_scale = grad_scale_ != nullptr ? grad_scale_[row * grad_scale_row_stride_] : acc_t(1);
    const acc_t p_coef = total_mass + 2 * z_loss_ * lse;
    const acc_t scale = grad_scale * logit_scale_;
    for (int64_t k = 0; k < num_chunks_; ++k) {
      const acc_t e_to_p_coef = p_coef / s * chunk_[k].to_row;
      // Without softcap dy/dx is the constant logit_scale: fold it in and use one fma.
      if constexpr (kHasSoftcap) {
        gradient_pass(g, k, e_to_p_coef, k_s_, scale);
      } else {
        gradient_pass(g, k, e_to_p_coef * scale, k_s_ * scale, scale);
      }
    }
    // The true class, from its own e, in acc precision, rounded once.
    const acc_t p_t = e_[t] * chunk_[t / kChunk].to_row / s;
    acc_t dydx_t = logit_scale_;
    if constexpr (kHasSoftcap) {
      const acc_t c = y_t / softcap_;
      dydx_t = logit_scale_ * (1 - c * c);
    }
    g[t] = static_cast<scalar_t>((p_coef * p_t - k_s_ * w_t - true_mass) * grad_scale * dydx_t);
  }

  // Vocabulary parallelism's statistics pass over this slice (SliceProblem): m_r, log s_r and
  // L_r of row `row`, whose target (target_[row]) is in the slice if `owned`.
  void slice_statistics(int64_t row, bool prefetch_next_row, bool owned, acc_t& row_max, acc_t& log_sum) {
    const scalar_t* x = logits_ + row * logits_row_stride_;
    const RowSums sums = first_pass(x, prefetch_next_row);
    if (sums.m == -std::numeric_limits<acc_t>::infinity()) {
      // No finite lse_r: the ranks' combination adds the slice's whole share, Q_r (lse - lse_r).
      row_max = log_sum = sums.m;
      loss_[row] = 0;
      return;
    }
    const int64_t t = target_[row];
    const acc_t w_t = owned ? (kHasWeight ? weight_[t] : acc_t(1)) : acc_t(0);
    const acc_t y_t = owned ? target_y(x, t) : acc_t(0);
    const acc_t log_s = std::log(sums.s);
    row_max = sums.m;
    log_sum = log_s;
    loss_[row] = (k_s_ * weight_sum_ + k_t_ * w_t) * log_s + distance_term(x, t, w_t, y_t, sums.m, sums.deviation);
  }

  // Vocabulary parallelism's gradient pass over this slice: one read of the row and one write,
  // p = exp((y - m) - log s) from the row's global statistics (y - m <= 0 and log s >= 0, so
  // exp_nonpositive's domain), no second exp and no scratch.
  void slice_gradient(int64_t row, acc_t m, acc_t log_s, acc_t p_coef, acc_t smooth_coef, acc_t true_coef) {
    const scalar_t* x = logits_ + row * logits_row_stride_;
    scalar_t* g = grad_ + row * grad_row_stride_;
    if (p_coef == 0 && smooth_coef == 0 && true_coef == 0) {  // a row without a gradient
      zero_row(g);
      return;
    }
    const int64_t t = target_[row];
    // Read before the row is overwritten (in place).
    const acc_t y_t = true_coef != 0 ? scalar_y(static_cast<acc_t>(x[t])) : acc_t(0);
    const Vec max(m), log_s_vec(log_s), p_vec(p_coef), smooth(smooth_coef), one(acc_t(1));
    for (int64_t c = 0; c < V_; c += kStep) {
      const int64_t n = V_ - c;
      Vec a, b;
      load_y(x, c, n, a, b);
      Vec ga = (a - max) - log_s_vec, gb = (b - max) - log_s_vec;
      ga = exp_nonpositive(ga);
      gb = exp_nonpositive(gb);
      if constexpr (kHasWeight) {
        Vec wa, wb;
        load_weights(c, n, wa, wb);
        ga = at::vec::fmsub(p_vec, ga, smooth * wa);
        gb = at::vec::fmsub(p_vec, gb, smooth * wb);
      } else {
        ga = at::vec::fmsub(p_vec, ga, smooth);
        gb = at::vec::fmsub(p_vec, gb, smooth);
      }
      if constexpr (kHasSoftcap) {  // dy/du = 1 - (y / softcap)^2
        const Vec ya = a / Vec(softcap_), yb = b / Vec(softcap_);
        ga = ga * (one - ya * ya);
        gb = gb * (one - yb * yb);
      }
      if (n >= kStep) {
        Io::store(g + c, ga, gb);
      } else {
        Io::store_partial(g + c, n, ga, gb);
      }
    }
    if (true_coef != 0) {  // the true class, in acc precision, rounded once
      const acc_t w_t = kHasWeight ? weight_[t] : acc_t(1);
      acc_t dydu = 1;
      if constexpr (kHasSoftcap) {
        const acc_t c = y_t / softcap_;
        dydu = 1 - c * c;
      }
      const acc_t p_t = std::exp((y_t - m) - log_s);
      g[t] = static_cast<scalar_t>((p_coef * p_t - smooth_coef * w_t - true_coef) * dydu);
    }
  }

 private:
  struct ChunkStats {
    acc_t max;      // max of y over the chunk (-inf if every y is -inf)
    acc_t shift;    // what e was taken relative to: `max`, or 0 when that is -inf
    acc_t sum_exp;  // sum exp(y - shift)
    acc_t sum_wd;   // sum w (y - shift)
    acc_t weight;   // sum w, the same for every row
    acc_t to_row;   // exp(shift - m): from the chunk's e to the row's
  };

  struct RowSums {
    acc_t m;          // max y (-inf if every y is -inf)
    acc_t s;          // sum exp(y - m)
    acc_t deviation;  // sum_c w_c (m - y_c)
  };

  // Pass 1 over the row: every chunk's statistics and exps, combined into the row's.
  RowSums first_pass(const scalar_t* x, bool prefetch_next_row) {
    for (int64_t k = 0; k < num_chunks_; ++k) {
      const scalar_t* next = k + 1 < num_chunks_ ? x + (k + 1) * kChunk
                             : prefetch_next_row   ? x + logits_row_stride_
                                                   : nullptr;
      chunk_pass(x, k, next);
    }
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t k = 0; k < num_chunks_; ++k) m = nan_max(m, chunk_[k].max);
    acc_t s = 0, deviation = 0;
    for (int64_t k = 0; k < num_chunks_; ++k) {
      ChunkStats& c = chunk_[k];
      c.to_row = std::exp(c.shift - m);
      s += c.sum_exp * c.to_row;
      deviation += (m - c.shift) * c.weight - c.sum_wd;
    }
    return {m, s, deviation};
  }

  // The row's sums taken against the caller's lse instead of its max: m = lse and s = 1, so that
  // p = e exp(shift - lse) and the loss's distances are lse - y (pass 1's chunks, no new read).
  RowSums against_lse(acc_t lse) {
    acc_t deviation = 0;
    for (int64_t k = 0; k < num_chunks_; ++k) {
      ChunkStats& c = chunk_[k];
      c.to_row = std::exp(c.shift - lse);
      deviation += (lse - c.shift) * c.weight - c.sum_wd;
    }
    return {lse, acc_t(1), deviation};
  }

  // The first class whose y is the row's max m: in the first chunk whose max is m, which pass 1
  // has just read (at most kChunk logits again, from cache), compared a vector at a time. y is
  // taken as pass 1 took it (y_ with softcap, load_y otherwise), so the compare is exact. A row
  // of -inf only gives 0; a row holding NaN, whose max pass 1 may have dropped, any class.
  int64_t first_argmax(const scalar_t* x, acc_t m) const {
    const Vec max(m);
    constexpr int kAllLanes = int((uint64_t{1} << kLanes) - 1);
    for (int64_t k = 0; k < num_chunks_; ++k) {
      if (chunk_[k].max != m) continue;
      const int64_t c0 = k * kChunk, c1 = std::min(c0 + kChunk, V_);
      for (int64_t c = c0; c < c1; c += kStep) {
        Vec a, b;
        if constexpr (kHasSoftcap) {
          a = Vec::loadu(y_.get() + c);
          b = Vec::loadu(y_.get() + c + kLanes);
        } else {
          load_y(x, c, c1 - c, a, b);  // lanes past the row's end hold -inf
        }
        // zero_mask() has a bit set for each lane that compared unequal (all bits clear).
        const int equal_a = ~(a == max).zero_mask() & kAllLanes;
        const int equal_b = ~(b == max).zero_mask() & kAllLanes;
        if (equal_a != 0) return std::min(c + __builtin_ctz(equal_a), c1 - 1);
        if (equal_b != 0) return std::min(c + kLanes + __builtin_ctz(equal_b), c1 - 1);
      }
    }
    return 0;
  }

  // sum_c q_c (m - y_c) with q_c = k_s w_c + k_t w_t [c == t], from pass 1's deviation; w_t = 0
  // for a row with no true class here. A zero mass contributes nothing even against an
  // infinite logit (a masked class).
  acc_t distance_term(const scalar_t* x, int64_t t, acc_t w_t, acc_t y_t, acc_t m, acc_t deviation) const {
    const acc_t true_mass = k_t_ * w_t;
    acc_t smooth_term = k_s_ != 0 ? k_s_ * deviation : acc_t(0);
    acc_t true_term = true_mass != 0 ? true_mass * (m - y_t) : acc_t(0);
    if (w_t != 0 && y_t == -std::numeric_limits<acc_t>::infinity() && k_s_ != 0) {
      // A masked target (rare): `deviation` holds its smoothing share k_s w_t (m - y_t) as +inf,
      // but its whole mass q_t = k_s w_t + k_t w_t decides its term: +inf, or 0 when q_t = 0
      // (the 'others' convention at eps = 1), not inf - inf. So it is left out and added once.
      smooth_term = k_s_ * deviation_without_target(x, t, w_t, m);
      const acc_t q_t = (k_s_ + k_t_) * w_t;  // not an fma: exactly 0 when k_t = -k_s
      true_term = q_t != 0 ? q_t * (m - y_t) : acc_t(0);
    }
    return smooth_term + true_term;
  }

  // y of class t after pass 1 (which kept y with softcap).
  acc_t target_y(const scalar_t* x, int64_t t) const {
    return kHasSoftcap ? y_[t] : static_cast<acc_t>(x[t]) * logit_scale_;
  }

  acc_t scalar_y(acc_t x) const {
    const acc_t u = x * logit_scale_;
    return kHasSoftcap ? softcap_ * std::tanh(u / softcap_) : u;
  }

  void load_weights(int64_t c, int64_t n, Vec& wa, Vec& wb) const {
    if (n >= kStep) {
      wa = Vec::loadu(weight_ + c);
      wb = Vec::loadu(weight_ + c + kLanes);
    } else {
      wa = Vec::loadu(weight_ + c, std::min(n, kLanes));
      wb = n > kLanes ? Vec::loadu(weight_ + c + kLanes, n - kLanes) : Vec(acc_t(0));
    }
  }

  // sum over c != t of w_c (m - y_c), from the chunk statistics but for t's chunk, whose
  // sum_wd is recomputed without t (a scalar pass over at most kChunk logits).
  acc_t deviation_without_target(const scalar_t* x, int64_t t, acc_t w_t, acc_t m) const {
    const int64_t kt = t / kChunk;
    acc_t deviation = 0;
    for (int64_t k = 0; k < num_chunks_; ++k) {
      const ChunkStats& stats = chunk_[k];
      if (k != kt) {
        deviation += (m - stats.shift) * stats.weight - stats.sum_wd;
        continue;
      }
      const int64_t c0 = k * kChunk, c1 = std::min(c0 + kChunk, V_);
      acc_t sum_wd = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t w = kHasWeight ? weight_[c] : acc_t(1);
        if (c == t || w == 0) continue;
        const acc_t y = kHasSoftcap ? y_[c] : static_cast<acc_t>(x[c]) * logit_scale_;
        sum_wd += w * (y - stats.shift);
      }
      deviation += (m - stats.shift) * (stats.weight - w_t) - sum_wd;
    }
    return deviation;
  }

  Vec transform(Vec x) const {
    Vec u = x * Vec(logit_scale_);
    if constexpr (kHasSoftcap) u = Vec(softcap_) * (u / Vec(softcap_)).tanh();
    return u;
  }

  // y at [c, c + kStep) into (a, b); lanes at or past `valid_count` become -inf.
  void load_y(const scalar_t* x, int64_t c, int64_t valid_count, Vec& a, Vec& b) const {
    if (valid_count >= kStep) {
      Io::load(x + c, a, b);
      a = transform(a);
      b = transform(b);
    } else {
      Io::load_partial(x + c, valid_count, a, b);
      const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
      a = Vec::set(neg_inf, transform(a), std::min(valid_count, kLanes));
      b = Vec::set(neg_inf, transform(b), std::max<int64_t>(valid_count - kLanes, 0));
    }
  }

  // Pass 1 over chunk k; `next` (or nullptr) is the chunk to prefetch meanwhile. Without that
  // prefetch the memory sits idle during the exps and the exps wait for the memory: the
  // hardware prefetcher runs only a few lines ahead of the last load.
  void chunk_pass(const scalar_t* x, int64_t k, const scalar_t* next) {
    const int64_t c0 = k * kChunk, c1 = std::min(c0 + kChunk, V_);
    Vec max_a(-std::numeric_limits<acc_t>::infinity()), max_b = max_a;
    for (int64_t c = c0; c < c1; c += kStep) {
      Vec a, b;
      load_y(x, c, c1 - c, a, b);
      if constexpr (kHasSoftcap) {  // keep y: pass 2 needs it, and tanh is dear
        a.store(y_.get() + c);
        b.store(y_.get() + c + kLanes);
      }
      // A plain max, one instruction: a NaN it drops still makes its own e, and so s, NaN.
      max_a = at::vec::clamp_min(a, max_a);
      max_b = at::vec::clamp_min(b, max_b);
    }
    ChunkStats& stats = chunk_[k];
    stats.max = horizontal_max(at::vec::clamp_min(max_a, max_b));
    // A chunk whose every y is -inf contributes e = 0, not exp(-inf - -inf) = NaN.
    stats.shift = stats.max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : stats.max;

    const Vec shift(stats.shift);
    Vec sum_a(acc_t(0)), sum_b(acc_t(0)), wd_a(acc_t(0)), wd_b(acc_t(0));
    for (int64_t c = c0; c < c1; c += kStep) {
      const int64_t n = c1 - c;
      if (next != nullptr) {  // prefetch instructions never fault, even past the row's end
        const char* line = reinterpret_cast<const char*>(next + (c - c0));
        for (int64_t byte = 0; byte < kStep * int64_t(sizeof(scalar_t)); byte += 64) __builtin_prefetch(line + byte);
      }
      Vec a, b;  // y - shift
      if constexpr (kHasSoftcap) {
        a = Vec::loadu(y_.get() + c) - shift;
        b = Vec::loadu(y_.get() + c + kLanes) - shift;
      } else {  // logit_scale * x - shift in one rounding
        const Vec neg_shift(-stats.shift), scale(logit_scale_);
        if (n >= kStep) {
          Io::load(x + c, a, b);
          a = at::vec::fmadd(a, scale, neg_shift);
          b = at::vec::fmadd(b, scale, neg_shift);
        } else {
          Io::load_partial(x + c, n, a, b);
          const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
          a = Vec::set(neg_inf, at::vec::fmadd(a, scale, neg_shift), std::min(n, kLanes));
          b = Vec::set(neg_inf, at::vec::fmadd(b, scale, neg_shift), std::max<int64_t>(n - kLanes, 0));
        }
      }
      const Vec ea = exp_nonpositive(a), eb = exp_nonpositive(b);
      ea.store(e_.get() + c);
      eb.store(e_.get() + c + kLanes);
      sum_a = sum_a + ea;
      sum_b = sum_b + eb;
      if (n < kStep) {  // the row's last, partial step: masked lanes hold -inf
        a = Vec::set(Vec(acc_t(0)), a, std::min(n, kLanes));
        b = Vec::set(Vec(acc_t(0)), b, std::max<int64_t>(n - kLanes, 0));
      }
      if constexpr (kHasWeight) {
        Vec wa, wb;
        if (n >= kStep) {
          wa = Vec::loadu(weight_ + c);
          wb = Vec::loadu(weight_ + c + kLanes);
        } else {
          wa = Vec::loadu(weight_ + c, std::min(n, kLanes));
          wb = n > kLanes ? Vec::loadu(weight_ + c + kLanes, n - kLanes) : Vec(acc_t(0));
        }
        // A class of weight 0 adds exactly 0, even at y = -inf (0 * -inf would be NaN).
        const Vec zero(acc_t(0));
        wd_a = wd_a + Vec::blendv(wa * a, zero, wa == zero);
        wd_b = wd_b + Vec::blendv(wb * b, zero, wb == zero);
      } else {
        wd_a = wd_a + a;
        wd_b = wd_b + b;
      }
    }
    stats.sum_exp = horizontal_sum(sum_a + sum_b);
    stats.sum_wd = horizontal_sum(wd_a + wd_b);
  }

  // g = (a e - smooth w) * dy/du over chunk k (dy/du = 1 - (y / softcap)^2 with softcap, times
  // softcap_scale; without, the caller folds every constant into a and smooth: one fma).
  void gradient_pass(scalar_t* g, int64_t k, acc_t a, acc_t smooth, acc_t softcap_scale) {
    const int64_t c0 = k * kChunk, c1 = std::min(c0 + kChunk, V_);
    const Vec a_coef(a), smooth_coef(smooth);
    for (int64_t c = c0; c < c1; c += kStep) {
      const int64_t n = c1 - c;
      Vec ga, gb;
      const Vec ea = Vec::loadu(e_.get() + c), eb = Vec::loadu(e_.get() + c + kLanes);
      if constexpr (kHasWeight) {
        Vec wa, wb;
        load_weights(c, n, wa, wb);
        ga = at::vec::fmsub(a_coef, ea, smooth_coef * wa);
        gb = at::vec::fmsub(a_coef, eb, smooth_coef * wb);
      } else {
        ga = at::vec::fmsub(a_coef, ea, smooth_coef);
        gb = at::vec::fmsub(a_coef, eb, smooth_coef);
      }
      if constexpr (kHasSoftcap) {  // dy/dx = logit_scale (1 - (y / softcap)^2)
        const Vec scale(softcap_scale);
        const Vec ya = Vec::loadu(y_.get() + c) / Vec(softcap_), yb = Vec::loadu(y_.get() + c + kLanes) / Vec(softcap_);
        ga = ga * (scale - scale * ya * ya);
        gb = gb * (scale - scale * yb * yb);
      }
      if (n >= kStep) {
        Io::store(g + c, ga, gb);
      } else {
        Io::store_partial(g + c, n, ga, gb);
      }
    }
  }

  void zero_row(scalar_t* g) const {
    const Vec zero(acc_t(0));
    int64_t c = 0;
    for (; c + kStep <= V_; c += kStep) Io::store(g + c, zero, zero);
    if (c < V_) Io::store_partial(g + c, V_ - c, zero, zero);
  }

  const scalar_t* logits_;
  scalar_t* grad_;
  const int64_t* target_;
  const acc_t* weight_;
  acc_t* loss_;
  acc_t* lse_;
  int64_t* predicted_;
  const acc_t* precomputed_lse_;
  int64_t logits_row_stride_, grad_row_stride_, V_, num_chunks_, ignore_index_;
  acc_t k_s_, k_t_, z_loss_, softcap_, logit_scale_;
  const acc_t* grad_scale_;  // nullptr for the loss-only op; row i's at i * grad_scale_row_stride_
  int64_t grad_scale_row_stride_;
  acc_t weight_sum_;
  int64_t padded_V_;
  AlignedBuffer<acc_t> e_;  // exp(y - shift) of the current row, padded to whole steps
  AlignedBuffer<acc_t> y_;  // y of the current row (softcap only)
  AlignedBuffer<ChunkStats> chunk_;
};

template <bool kValue>
using Flag = std::integral_constant<bool, kValue>;

// fn(scalar_t{}, Flag<weighted>{}, Flag<capped>{}) for the problem's dtype and features.
template <typename Fn>
void dispatch(ScalarKind dtype, bool weighted, bool capped, Fn&& fn) {
  const auto with_features = [&](auto scalar) {
    if (weighted && capped) return fn(scalar, Flag<true>{}, Flag<true>{});
    if (weighted) return fn(scalar, Flag<true>{}, Flag<false>{});
    if (capped) return fn(scalar, Flag<false>{}, Flag<true>{});
    return fn(scalar, Flag<false>{}, Flag<false>{});
  };
  switch (dtype) {
    case ScalarKind::Float32:
      return with_features(float{});
    case ScalarKind::Float64:
      return with_features(double{});
    case ScalarKind::BFloat16:
      return with_features(c10::BFloat16{});
    case ScalarKind::Float16:
      return with_features(c10::Half{});
  }
}

// The slice passes run on RowKernel's machinery: the slice is a row problem whose targets are
// the columns, with no ignore_index, no z-loss and no gradient scale.
RowsProblem rows_of_slice(const SliceProblem& p) {
  RowsProblem rows{};
  rows.dtype = p.dtype;
  rows.logits = p.logits;
  rows.logits_row_stride = p.logits_row_stride;
  rows.grad = p.grad;
  rows.grad_row_stride = p.grad_row_stride;
  rows.target = p.column;
  rows.weight = p.weight;
  rows.weight_sum = p.weight_sum;
  rows.grad_scale = nullptr;
  rows.grad_scale_row_stride = 0;
  rows.loss = p.loss;
  rows.lse = nullptr;
  rows.num_rows = p.num_rows;
  rows.num_classes = p.num_classes;
  rows.ignore_index = std::numeric_limits<int64_t>::min();
  rows.k_s = p.k_s;
  rows.k_t = p.k_t;
  rows.z_loss = 0;
  rows.softcap = p.softcap;
  rows.logit_scale = p.logit_scale;
  return rows;
}

}  // namespace

void smoothed_xent_rows(const RowsProblem& problem, int64_t row_begin, int64_t row_end) {
  dispatch(problem.dtype, problem.weight != nullptr, problem.softcap > 0, [&](auto scalar, auto weighted, auto capped) {
    RowKernel<decltype(scalar), decltype(weighted)::value, decltype(capped)::value> kernel(problem);
    for (int64_t row = row_begin; row < row_end; ++row) kernel.run(row, row + 1 < row_end);
  });
}

void smoothed_xent_slice_statistics(const SliceProblem& problem, int64_t row_begin, int64_t row_end) {
  dispatch(problem.dtype, problem.weight != nullptr, problem.softcap > 0, [&](auto scalar, auto weighted, auto capped) {
    using Kernel = RowKernel<decltype(scalar), decltype(weighted)::value, decltype(capped)::value>;
    using acc_t = typename RowIo<decltype(scalar)>::acc_t;
    Kernel kernel(rows_of_slice(problem));
    auto* row_max = static_cast<acc_t*>(problem.row_max);
    auto* log_sum = static_cast<acc_t*>(problem.log_sum);
    for (int64_t row = row_begin; row < row_end; ++row) {
      kernel.slice_statistics(row, row + 1 < row_end, problem.owned[row], row_max[row], log_sum[row]);
    }
  });
}

void smoothed_xent_slice_gradient(const SliceProblem& problem, int64_t row_begin, int64_t row_end) {
  dispatch(problem.dtype, problem.weight != nullptr, problem.softcap > 0, [&](auto scalar, auto weighted, auto capped) {
    using Kernel = RowKernel<decltype(scalar), decltype(weighted)::value, decltype(capped)::value>;
    using acc_t = typename RowIo<decltype(scalar)>::acc_t;
    Kernel kernel(rows_of_slice(problem));
    const auto* row_max = static_cast<const acc_t*>(problem.row_max);
    const auto* log_sum = static_cast<const acc_t*>(problem.log_sum);
    const auto* p_coef = static_cast<const acc_t*>(problem.p_coef);
    const auto* smooth_coef = static_cast<const acc_t*>(problem.smooth_coef);
    const auto* true_coef = static_cast<const acc_t*>(problem.true_coef);
    for (int64_t row = row_begin; row < row_end; ++row) {
      kernel.slice_gradient(row, row_max[row], log_sum[row], p_coef[row], smooth_coef[row], true_coef[row]);
    }
  });
}

}  // namespace fused_ls::cpu::CPU_CAPABILITY
