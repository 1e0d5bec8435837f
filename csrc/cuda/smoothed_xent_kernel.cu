// Fused label-smoothed cross-entropy on CUDA (the fallback of the Triton kernel): each row's
// loss, lse and gradient from one launch. The maths is in ../smoothed_xent.h.
//
// Layout of the work
// ------------------
// One thread block per row, reading and writing it in 16-byte vectors (4 fp32, 8 bf16/fp16,
// 2 fp64) whatever V, the row's start and the row stride: V = 50257, an offset view
// (logits[:, 1:]) or a stride that moves the alignment from row to row lose nothing but a few
// elements at each row's edges. Each row is taken on its own alignment.
//   Pass 1: thread i takes the groups of 16/b columns i, i + blockDim.x, ... (b bytes per
//           logit), then one of the last V mod (16/b) columns. A group is one aligned 16-byte
//           load when the row is 16-byte aligned, else the two aligned vectors that hold it
//           (the second mostly an L1 hit, its neighbour's first) shifted into place; only the
//           row's first and last groups may be read element by element. So the columns meet
//           the same thread in the same order for any alignment: the loss and lse of a row
//           have the same bits at any offset and stride. Each thread keeps an online (max, sum
//           of exp) pair, plus sum_{c != t} w_c (y_c - ref) with ref the target's y, else the
//           row's first y, if finite (else 0), so that a constant added to every logit cancels
//           before anything large is summed (the target's own term is added once, with its
//           whole mass); then a warp-shuffle and shared-memory reduction gives the row's m, s
//           and smoothing sum, and thread 0 writes the loss and lse and reads the row's
//           grad_scale (one value for every row, or one per row).
//   Pass 2: the row is read again (from L2 for all but the longest rows), cut at its own
//           16-byte boundaries: a head and a tail of fewer than 16/b elements each, element by
//           element, and a body of aligned 16-byte loads. Every gradient element is computed in
//           fp32 (fp64 for fp64), the true class's p_t - k_t included, then rounded once. The
//           body's stores are 16 bytes when the gradient row lies a multiple of 16 bytes from
//           the logits row (always in place; a new gradient of a contiguous input at any V),
//           else as wide as that distance allows (8, 4 or 2 bytes). Element by element, the
//           order of pass 2 changes no bit.
// Asked for each row's argmax (RowsProblem::predicted), pass 1 also keeps, per thread, the first
// column of its running max (its columns come in increasing order), and a block-wide minimum
// over the threads at the row's max gives the row's first argmax: kernels instantiated apart
// (kPredict), so that the others keep their registers.
// Given each row's lse (RowsProblem::precomputed_lse), thread 0 takes it in place of pass 1's
// (m = lse, log s = 0): the same reads, the results of the lse given.
// A row without a gradient (its target is ignore_index or outside [0, V)) needs only its lse:
// pass 1 keeps only the (max, sum of exp) pair (the same sums as with a target), reads neither
// x[t] nor x[0] nor any class weight, and pass 2 writes zeros in 16-byte stores cut at the
// gradient row's own boundaries, reading nothing.
// When few rows are long (rows < 2 x SMs and V >= 32k), a row is split over up to 64 blocks:
// a first kernel writes each block's partial (max, sum, smoothing sum) to a workspace, a
// second combines the row's partials and writes the gradient of its slice. Each slice is cut
// as a row is; in place, a block of the second kernel reads and writes nothing of the row
// outside its own slice (pass 1 may read a group's aligned vector across a slice boundary:
// the first kernel writes no logit).
//
// Memory traffic per element of a row (b bytes per logit: 2 bf16/fp16, 4 fp32, 8 fp64)
// -------------------------------------------------------------------------------
//   path                           DRAM read            DRAM write           bf16    fp32
//   row with a gradient            2b (pass 2 from L2   b                    4 + 2   8 + 4
//                                  for all but the longest rows)
//   ignored or out-of-range row    b (pass 1, the lse)  b (zeros, not read)  2 + 2   4 + 4
//   loss-only op (grad nullptr)    b                    nothing of size V    2 + 0   4 + 0
//   class weights                  + 4 (8 fp64) per pass of a row with a gradient, read from L2
//                                  after the first row; none for a row without one
// Accesses: 16-byte vectors, but for a few elements per row taken one at a time: in pass 1 the
// first and last groups (a row that is not 16-byte aligned) and the last V mod 16/b columns,
// in pass 2 a head and a tail of fewer than 16/b each (per slice); and x[t] (x[0] too if y_t
// is not finite), read by every thread of a row with a gradient (one broadcast). Pass 1 of a
// row that is not 16-byte aligned makes two 16-byte loads per 16 bytes of logits: the same
// DRAM and L2 traffic, twice the loads from L1.
// Per row besides: the target (8 bytes), grad_scale (4, 8 fp64) for a row with a gradient,
// the loss and lse written (4 + 4, 8 + 8 fp64). The split path of B blocks per row adds B
// partials written (12 bytes each, 24 fp64), read back by each of the row's B blocks (by block
// 0 only for a row without a gradient), and the row's inputs (8, 16 fp64): all in L2. Nothing
// of size V is allocated in place; otherwise the gradient is the only buffer of size V.
//
// Ignored rows: loss 0, gradient 0. A target outside [0, V) is never dereferenced: loss NaN,
// gradient 0, and no host synchronisation is needed to report it.
#include "smoothed_xent_cuda.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// tests/test_native.py runs these kernels on the CPU, emulating blocks with threads; that
// harness replaces the launch, the one construct a host compiler cannot parse.
#ifndef FUSED_LS_CUDA_LAUNCH
#define FUSED_LS_CUDA_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif

// Every load and store of a row's logits or gradient goes through load_*/store_* below, which
// call this with the address and width: nothing on a GPU; the host emulation
// (tests/cuda_host_emulation.cpp) counts the accesses by width and checks their alignment.
#ifndef FUSED_LS_ROW_ACCESS
#define FUSED_LS_ROW_ACCESS(is_store, ptr, bytes) ((void)0)
#endif

namespace fused_ls::cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxBlocksPerRow = 64;
constexpr int64_t kMinColumnsPerBlock = 16384;
constexpr int kVectorBytes = 16;

// The logits' dtype <-> its accumulator.
template <typename scalar_t>
struct Io;
template <>
struct Io<float> {
  using acc_t = float;
  __device__ static float to_acc(float v) { return v; }
  __device__ static float from_acc(float v) { return v; }
};
template <>
struct Io<double> {
  using acc_t = double;
  __device__ static double to_acc(double v) { return v; }
  __device__ static double from_acc(double v) { return v; }
};
template <>
struct Io<__nv_bfloat16> {
  using acc_t = float;
  __device__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Io<__half> {
  using acc_t = float;
  __device__ static float to_acc(__half v) { return __half2float(v); }
  __device__ static __half from_acc(float v) { return __float2half_rn(v); }
};

__device__ inline float exp_(float x) { return expf(x); }
__device__ inline double exp_(double x) { return exp(x); }
__device__ inline float log_(float x) { return logf(x); }
__device__ inline double log_(double x) { return log(x); }
__device__ inline float tanh_(float x) { return tanhf(x); }
__device__ inline double tanh_(double x) { return tanh(x); }
__device__ inline float max_(float a, float b) { return fmaxf(a, b); }
__device__ inline double max_(double a, double b) { return fmax(a, b); }

// kVec consecutive logits: one access of kVec * sizeof(scalar_t) bytes (16 for a whole vector).
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <int kVec, typename scalar_t>
__device__ inline Pack<scalar_t, kVec> load_pack(const scalar_t* ptr) {
  FUSED_LS_ROW_ACCESS(false, ptr, sizeof(Pack<scalar_t, kVec>));
  return *reinterpret_cast<const Pack<scalar_t, kVec>*>(ptr);
}

template <int kVec, typename scalar_t>
__device__ inline void store_pack(scalar_t* ptr, const Pack<scalar_t, kVec>& pack) {
  FUSED_LS_ROW_ACCESS(true, ptr, sizeof(Pack<scalar_t, kVec>));
  *reinterpret_cast<Pack<scalar_t, kVec>*>(ptr) = pack;
}

template <typename scalar_t>
__device__ inline scalar_t load_one(const scalar_t* ptr) {
  FUSED_LS_ROW_ACCESS(false, ptr, sizeof(scalar_t));
  return *ptr;
}

template <typename scalar_t>
__device__ inline void store_one(scalar_t* ptr, scalar_t value) {
  FUSED_LS_ROW_ACCESS(true, ptr, sizeof(scalar_t));
  *ptr = value;
}

// Columns [c0, c1) of the row at `row`, cut at `row`'s 16-byte boundaries: a head [c0, begin)
// and a tail [end, c1), each of fewer than kVec elements, taken element by element, and whole
// 16-byte aligned vectors [begin, end). A row not even aligned to its element (no tensor's)
// is all head.
struct Span {
  int64_t begin, end;
};

template <typename scalar_t, int kVec>
__device__ Span vector_span(const scalar_t* row, int64_t c0, int64_t c1) {
  if (c1 <= c0) return {c0, c0};
  const uintptr_t address = reinterpret_cast<uintptr_t>(row + c0);
  const int64_t head = address % sizeof(scalar_t) != 0
                           ? c1 - c0
                           : int64_t((kVectorBytes - address % kVectorBytes) % kVectorBytes / sizeof(scalar_t));
  const int64_t begin = head < c1 - c0 ? c0 + head : c1;
  return {begin, begin + (c1 - begin) / kVec * kVec};
}

// The i-th of a span's edge columns: the head's, then the tail's.
__device__ inline int64_t edge_column(int64_t i, int64_t c0, const Span& s) {
  const int64_t head = s.begin - c0;
  return i < head ? c0 + i : s.end + (i - head);
}

__device__ inline int64_t edge_count(int64_t c0, int64_t c1, const Span& s) {
  return c1 <= c0 ? 0 : (s.begin - c0) + (c1 - s.end);
}

// Everything a kernel needs, by value in its parameter space.
template <typename acc_t>
struct Params {
  const void* logits;
  void* grad;
  int64_t logits_row_stride, grad_row_stride;
  const int64_t* target;
  const acc_t* weight;      // nullptr without class weights
  const acc_t* weight_sum;
  const acc_t* grad_scale;      // row i's at i * grad_scale_row_stride; nullptr without a gradient
  int64_t grad_scale_row_stride;  // 0: one scale for every row; 1: one per row
  acc_t* loss;
  acc_t* lse;
  int64_t* predicted;  // each row's argmax out; nullptr: not asked for (the kernels without kPredict)
  const acc_t* precomputed_lse;  // each row's lse from the caller, used in place of pass 1's; nullptr: none
  int64_t num_classes, ignore_index;
  acc_t k_s, k_t, z_loss, softcap, logit_scale;
  acc_t dydx_scale;  // what dy/dx multiplies the gradient by: logit_scale, or 1 where the caller folded it in
  bool has_softcap;
  int blocks_per_row;
  int64_t columns_per_block;  // a multiple of the vector width
};

// A block's summary of its columns: the online max and sum of exp(y - max), and
// sum_{c != t} w_c (y_c - ref) (t: the target; 0 for a row without a gradient).
template <typename acc_t>
struct Partial {
  acc_t max, sum_exp, sum_wd;
};

// What the row needs from outside its block's slice, read before any gradient is written:
// in place, another block of the row may already be overwriting x[0] and x[t].
template <typename acc_t>
struct RowInputs {
  acc_t ref;  // the target's y if it has a gradient and is finite, else the row's first y if finite, else 0
  acc_t y_t;  // the target's y; 0 for an ignored or out-of-range target
};

// What pass 2 needs of its row.
template <typename acc_t>
struct RowConstants {
  acc_t max, log_s;                   // p_c = exp((y_c - max) - log_s)
  acc_t p_coef, k_s, true_mass;       // 0 for a row without a gradient
  acc_t grad_scale;                   // the row's; 0 for a row without a gradient
  int64_t target;
};

template <typename acc_t>
__device__ acc_t transform(acc_t x, const Params<acc_t>& p) {
  const acc_t u = x * p.logit_scale;
  return p.has_softcap ? p.softcap * tanh_(u / p.softcap) : u;
}

template <typename acc_t>
__device__ Partial<acc_t> combine(const Partial<acc_t>& a, const Partial<acc_t>& b) {
  Partial<acc_t> r;
  r.max = max_(a.max, b.max);
  // Both -inf: empty or every y -inf, no mass (exp(-inf - -inf) would be NaN).
  r.sum_exp = r.max == -INFINITY ? a.sum_exp + b.sum_exp
                                 : a.sum_exp * exp_(a.max - r.max) + b.sum_exp * exp_(b.max - r.max);
  r.sum_wd = a.sum_wd + b.sum_wd;
  return r;
}

template <typename acc_t>
__device__ Partial<acc_t> warp_reduce(Partial<acc_t> v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Partial<acc_t> other;
    other.max = __shfl_xor_sync(0xffffffffu, v.max, offset);
    other.sum_exp = __shfl_xor_sync(0xffffffffu, v.sum_exp, offset);
    other.sum_wd = __shfl_xor_sync(0xffffffffu, v.sum_wd, offset);
    v = combine(v, other);
  }
  return v;
}

// The block's partial, returned to every thread. blockDim.x is a multiple of 32.
template <typename acc_t>
__device__ Partial<acc_t> block_reduce(Partial<acc_t> v) {
  __shared__ Partial<acc_t> per_warp[32];
  v = warp_reduce(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const Partial<acc_t> none{-INFINITY, acc_t(0), acc_t(0)};
    v = warp_reduce(lane < (int)(blockDim.x >> 5) ? per_warp[lane] : none);
    if (lane == 0) per_warp[0] = v;
  }
  __syncthreads();
  v = per_warp[0];
  __syncthreads();  // per_warp may be reused by a later reduction
  return v;
}

// A thread's first column at its running max, with kPredict: kNoColumn until its max rises
// above -inf (a thread, or a row, of -inf only keeps it). 32 bits (the launcher refuses longer
// rows with kPredict): the fp32 row kernel has no register to spare for a 64-bit one on sm_80.
constexpr int32_t kNoColumn = INT32_MAX;

// The smallest of the block's values, returned to every thread. blockDim.x is a multiple of 32.
__device__ int32_t block_min(int32_t v) {
  __shared__ int32_t per_warp[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int32_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other < v ? other : v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? per_warp[lane] : kNoColumn;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const int32_t other = __shfl_xor_sync(0xffffffffu, v, offset);
      v = other < v ? other : v;
    }
    if (lane == 0) per_warp[0] = v;
  }
  __syncthreads();
  v = per_warp[0];
  __syncthreads();  // per_warp may be reused by a later reduction
  return v;
}

// Adds kCount values of y at columns [c, c + kCount) to a thread's partial; column `skip`
// (the target) is left out of sum_wd. Without kDeviations (a row without a gradient, whose
// loss is 0 or NaN whatever sum_wd is) only the (max, sum of exp) pair, and no weight is read.
// With kPredict, `first_at_max` follows the first column holding the thread's max: a thread
// meets its columns in increasing order, so only a strictly larger max moves it.
template <bool kDeviations, bool kPredict, int kCount, typename acc_t>
__device__ void accumulate(Partial<acc_t>& part, int32_t& first_at_max, const acc_t (&y)[kCount], int64_t c,
                           acc_t ref, int64_t skip, const Params<acc_t>& p) {
  // fp64: sum_wd before the exps, not interleaved with them. Each fp64 exp keeps its
  // polynomial's coefficients in register pairs, and with the weight loads and `skip` live
  // beside two of them, ptxas spilled at the 64 registers it aims for under
  // __launch_bounds__(512) (two resident blocks of 512). The same sums in the same order:
  // sum_wd and sum_exp are separate accumulators. fp32 keeps the interleaved order (reordered,
  // one fp32 kernel gained a register on sm_80).
  constexpr bool kDeviationsFirst = sizeof(acc_t) == 8;
  if constexpr (kDeviations && kDeviationsFirst) {
#pragma unroll
    for (int j = 0; j < kCount; ++j) {
      const acc_t w = p.weight != nullptr ? p.weight[c + j] : acc_t(1);
      part.sum_wd += w != acc_t(0) && c + j != skip ? w * (y[j] - ref) : acc_t(0);  // as below
    }
  }
  acc_t local_max = y[0];
#pragma unroll
  for (int j = 1; j < kCount; ++j) local_max = max_(local_max, y[j]);
  const acc_t new_max = max_(part.max, local_max);  // fmax drops a NaN, whose own exp is NaN
  if (new_max > part.max) {
    part.sum_exp *= exp_(part.max - new_max);
    part.max = new_max;
    if constexpr (kPredict) {  // new_max is one of these y (fmax returns a NaN only for two)
      int32_t at = int32_t(c) + kCount - 1;
#pragma unroll
      for (int j = kCount - 1; j >= 0; --j) at = y[j] == new_max ? int32_t(c) + j : at;
      first_at_max = at;
    }
  }
  const acc_t base = part.max == -INFINITY ? acc_t(0) : part.max;
#pragma unroll
  for (int j = 0; j < kCount; ++j) {
    part.sum_exp += exp_(y[j] - base);
    if constexpr (kDeviations && !kDeviationsFirst) {
      const acc_t w = p.weight != nullptr ? p.weight[c + j] : acc_t(1);
      // A class of weight 0 adds exactly 0, even at y = -inf (0 * -inf would be NaN).
      part.sum_wd += w != acc_t(0) && c + j != skip ? w * (y[j] - ref) : acc_t(0);
    }
  }
}

// The kVec logits at columns [c, c + kVec) of the row at x (c a multiple of kVec), whatever
// the row's alignment `offset` (x's address modulo 16, the same at every such c): one 16-byte
// load when it is 0; else the two aligned 16-byte vectors that hold them (the second mostly an
// L1 hit: the neighbouring thread loads it too), shifted into place, when both lie inside the
// row's V columns; else (at most the row's first and last groups) element by element. So every
// thread sees the same columns in the same order for any layout of the same V, and pass 1's
// sums, hence the loss and lse, have the same bits for a row at any offset or stride.
template <typename scalar_t, int kVec>
__device__ Pack<scalar_t, kVec> load_columns(const scalar_t* x, int64_t c, unsigned offset, int64_t num_columns) {
  if (offset == 0) return load_pack<kVec>(x + c);
  Pack<scalar_t, kVec> out;
  const int64_t lo = c - int64_t(offset / sizeof(scalar_t));  // the column the first aligned vector starts at
  if (offset % sizeof(scalar_t) == 0 && lo >= 0 && lo + 2 * kVec <= num_columns) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(x + lo);
    const Pack<uint32_t, 4> a = load_pack<4>(words), b = load_pack<4>(words + 4);
    // The 16 bytes at `offset` of the 32 loaded, by a barrel shift of 8, 4 and 2 bytes.
    uint32_t w[8] = {a.v[0], a.v[1], a.v[2], a.v[3], b.v[0], b.v[1], b.v[2], b.v[3]};
#pragma unroll
    for (int i = 0; i < 6; ++i) w[i] = offset & 8 ? w[i + 2] : w[i];
#pragma unroll
    for (int i = 0; i < 5; ++i) w[i] = offset & 4 ? w[i + 1] : w[i];
    uint32_t shifted[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // Little-endian: the later bytes are the high ones. 2-byte logits may start mid-word.
      shifted[i] = sizeof(scalar_t) == 2 ? uint32_t(((uint64_t(w[i + 1]) << 32) | w[i]) >> (offset & 2) * 8) : w[i];
    }
    memcpy(&out, shifted, sizeof(out));
    return out;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) out.v[j] = load_one(x + c + j);
  return out;
}

// Pass 1 over columns [c0, c1) of the row at x, c0 a multiple of kVec: thread i takes the
// groups of kVec columns i, i + blockDim.x, ... counted from c0, then column i of the last
// V mod kVec (fewer than kVec: the row's own tail, in the last slice).
// With kPredict, `first_at_max` gets the block's first column at its max (kNoColumn if every y
// is -inf), in every thread.
template <bool kDeviations, bool kPredict, typename scalar_t, int kVec, typename acc_t>
__device__ Partial<acc_t> block_partial(const scalar_t* x, int64_t c0, int64_t c1, acc_t ref, int64_t skip,
                                        const Params<acc_t>& p, int32_t* first_at_max = nullptr) {
  Partial<acc_t> part{-INFINITY, acc_t(0), acc_t(0)};
  int32_t at = kNoColumn;
  const unsigned offset = unsigned(reinterpret_cast<uintptr_t>(x) % kVectorBytes);
  const int64_t vec_end = c1 > c0 ? c0 + (c1 - c0) / kVec * kVec : c0;
  for (int64_t c = c0 + int64_t(threadIdx.x) * kVec; c < vec_end; c += int64_t(blockDim.x) * kVec) {
    const Pack<scalar_t, kVec> pack = load_columns<scalar_t, kVec>(x, c, offset, p.num_classes);
    acc_t y[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = transform(Io<scalar_t>::to_acc(pack.v[j]), p);
    accumulate<kDeviations, kPredict, kVec>(part, at, y, c, ref, skip, p);
  }
  for (int64_t c = vec_end + threadIdx.x; c < c1; c += blockDim.x) {
    const acc_t y[1] = {transform(Io<scalar_t>::to_acc(load_one(x + c)), p)};
    accumulate<kDeviations, kPredict, 1>(part, at, y, c, ref, skip, p);
  }
  const acc_t thread_max = part.max;
  const Partial<acc_t> block = block_reduce(part);
  if constexpr (kPredict) *first_at_max = block_min(thread_max == block.max ? at : kNoColumn);
  return block;
}

// A row's target, and whether the row has a gradient: neither ignored nor out of range.
struct RowTarget {
  int64_t t;
  bool has_grad;
};

template <typename acc_t>
__device__ RowTarget row_target(int64_t row, const Params<acc_t>& p) {
  const int64_t t = p.target[row];
  return {t, t != p.ignore_index && 0 <= t && t < p.num_classes};
}

// Pass 1 of the columns [c0, c1): with the smoothing sum for a row with a gradient, without it
// (the lse only) otherwise.
template <bool kPredict, typename scalar_t, int kVec, typename acc_t>
__device__ Partial<acc_t> row_partial(const scalar_t* x, int64_t c0, int64_t c1, const RowTarget& rt,
                                      const RowInputs<acc_t>& in, const Params<acc_t>& p,
                                      int32_t* first_at_max = nullptr) {
  if (rt.has_grad) return block_partial<true, kPredict, scalar_t, kVec>(x, c0, c1, in.ref, rt.t, p, first_at_max);
  return block_partial<false, kPredict, scalar_t, kVec>(x, c0, c1, acc_t(0), int64_t(-1), p, first_at_max);
}

template <typename scalar_t, typename acc_t>
__device__ RowInputs<acc_t> row_inputs(const scalar_t* x, const RowTarget& rt, const Params<acc_t>& p) {
  RowInputs<acc_t> in{acc_t(0), acc_t(0)};
  if (!rt.has_grad) return in;  // loss 0 or NaN: neither is needed
  // The only read at the target's index, and only inside the row.
  in.y_t = transform(Io<scalar_t>::to_acc(load_one(x + rt.t)), p);
  if (isfinite(in.y_t)) {
    in.ref = in.y_t;
  } else {  // any finite y of the row will do; the target's is rarely masked, the first class may be
    const acc_t y0 = transform(Io<scalar_t>::to_acc(load_one(x)), p);
    in.ref = isfinite(y0) ? y0 : acc_t(0);
  }
  return in;
}

// Thread 0's work between the passes: the loss and lse (written when `write_row_outputs`)
// and the constants of pass 2.
template <typename acc_t>
__device__ RowConstants<acc_t> finish_row(const Params<acc_t>& p, int64_t row, const Partial<acc_t>& part,
                                          const RowInputs<acc_t>& in, bool write_row_outputs) {
  const RowTarget rt = row_target(row, p);
  const int64_t t = rt.t;
  const bool ignored = t == p.ignore_index;
  const bool in_range = 0 <= t && t < p.num_classes;
  const bool has_grad = rt.has_grad;
  // With the caller's lse, m = lse and s = 1: p = exp(y - lse), and the loss's distances are
  // taken from it (the deviation below holds for any m).
  const acc_t m = p.precomputed_lse != nullptr ? p.precomputed_lse[row] : part.max;
  const acc_t log_s = p.precomputed_lse != nullptr ? acc_t(0) : log_(part.sum_exp);
  const acc_t lse = m + log_s;
  const acc_t total_weight = p.weight != nullptr ? *p.weight_sum : acc_t(p.num_classes);
  const acc_t w_t = has_grad ? (p.weight != nullptr ? p.weight[t] : acc_t(1)) : acc_t(0);
  const acc_t true_mass = p.k_t * w_t;
  const acc_t total_mass = p.k_s * total_weight + true_mass;
  // sum_{c != t} w_c (m - y_c): the partials leave the target out (w_t = 0 without a gradient).
  const acc_t deviation = (m - in.ref) * (total_weight - w_t) - part.sum_wd;
  // The target's whole mass q_t = k_s w_t + k_t w_t, in one term: +inf for a masked target of
  // q_t > 0, and 0 for q_t = 0 (the 'others' convention at eps = 1), not inf - inf.
  const acc_t target_mass = (p.k_s + p.k_t) * w_t;  // not an fma: exactly 0 when k_t = -k_s
  // A zero mass contributes nothing even against an infinite logit (a masked class).
  const acc_t loss = total_mass * log_s + (p.k_s != 0 ? p.k_s * deviation : acc_t(0)) +
                     (target_mass != 0 ? target_mass * (m - in.y_t) : acc_t(0)) + p.z_loss * lse * lse;
  if (write_row_outputs) {
    p.loss[row] = ignored ? acc_t(0) : in_range ? loss : acc_t(NAN);
    p.lse[row] = lse;
  }
  RowConstants<acc_t> k;
  k.max = m;
  k.log_s = log_s;
  k.target = t;
  k.p_coef = has_grad ? total_mass + 2 * p.z_loss * lse : acc_t(0);
  k.k_s = has_grad ? p.k_s : acc_t(0);
  k.true_mass = has_grad ? true_mass : acc_t(0);
  // One read per row, by thread 0; none for the loss-only op (no grad_scale).
  k.grad_scale = has_grad && p.grad != nullptr ? p.grad_scale[row * p.grad_scale_row_stride] : acc_t(0);
  return k;
}

// The gradient of class c of a row that has one.
template <typename acc_t>
__device__ acc_t gradient(acc_t y, int64_t c, const RowConstants<acc_t>& k, const Params<acc_t>& p) {
  const acc_t w = p.weight != nullptr ? p.weight[c] : acc_t(1);
  // y - max is exact for nearby values, unlike y - lse with lse rounded at the logits' scale
  // (a relative error of 5e-4 in p at logits around 1e4 in fp32).
  const acc_t g = k.p_coef * exp_((y - k.max) - k.log_s) - k.k_s * w - (c == k.target ? k.true_mass : acc_t(0));
  acc_t dydx = p.dydx_scale;
  if (p.has_softcap) {
    const acc_t r = y / p.softcap;
    dydx = p.dydx_scale * (1 - r * r);
  }
  return g * (k.grad_scale * dydx);
}

// Pass 2's body: 16-byte loads of x at [s.begin, s.end), the gradient stored kStore elements
// at a time (kStore * sizeof(scalar_t) bytes: the widest access g's alignment allows there).
template <int kStore, typename scalar_t, int kVec, typename acc_t>
__device__ void gradient_body(const scalar_t* x, scalar_t* g, const Span& s, const RowConstants<acc_t>& k,
                              const Params<acc_t>& p) {
  for (int64_t c = s.begin + int64_t(threadIdx.x) * kVec; c < s.end; c += int64_t(blockDim.x) * kVec) {
    const Pack<scalar_t, kVec> in = load_pack<kVec>(x + c);
    Pack<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t y = transform(Io<scalar_t>::to_acc(in.v[j]), p);
      out.v[j] = Io<scalar_t>::from_acc(gradient(y, c + j, k, p));
    }
#pragma unroll
    for (int j = 0; j < kVec; j += kStore) {
      Pack<scalar_t, kStore> part;
#pragma unroll
      for (int i = 0; i < kStore; ++i) part.v[i] = out.v[j + i];
      store_pack<kStore>(g + c + j, part);
    }
  }
}

// The body with the widest stores that g's distance to x allows (both aligned to their element).
template <int kStore, typename scalar_t, int kVec, typename acc_t>
__device__ void gradient_body_for(unsigned store_bytes, const scalar_t* x, scalar_t* g, const Span& s,
                                  const RowConstants<acc_t>& k, const Params<acc_t>& p) {
  if constexpr (kStore > 1) {
    if (store_bytes < kStore * sizeof(scalar_t)) {
      gradient_body_for<kStore / 2, scalar_t, kVec>(store_bytes, x, g, s, k, p);
      return;
    }
  }
  gradient_body<kStore, scalar_t, kVec>(x, g, s, k, p);
}

// Pass 2 over columns [c0, c1) of a row with a gradient: each thread reads, then writes, its
// own elements, so `g` may be `x` (in place). Cut at x's 16-byte boundaries, as pass 1.
template <typename scalar_t, int kVec, typename acc_t>
__device__ void block_gradient(const scalar_t* x, scalar_t* g, int64_t c0, int64_t c1, const RowConstants<acc_t>& k,
                               const Params<acc_t>& p) {
  const Span s = vector_span<scalar_t, kVec>(x, c0, c1);
  const int64_t edges = edge_count(c0, c1, s);
  for (int64_t i = threadIdx.x; i < edges; i += blockDim.x) {
    const int64_t c = edge_column(i, c0, s);
    const acc_t y = transform(Io<scalar_t>::to_acc(load_one(x + c)), p);
    store_one(g + c, Io<scalar_t>::from_acc(gradient(y, c, k, p)));
  }
  // g - x modulo 16 bytes: 0 in place and for rows of the same alignment (16-byte stores),
  // else its lowest set bit is the widest store aligned wherever a load of x is.
  const unsigned distance = unsigned(reinterpret_cast<uintptr_t>(g) - reinterpret_cast<uintptr_t>(x)) % kVectorBytes;
  const unsigned store_bytes = distance == 0 ? kVectorBytes : distance & (0u - distance);
  gradient_body_for<kVec, scalar_t, kVec>(store_bytes, x, g, s, k, p);
}

// Pass 2 of a row without a gradient: zeros over columns [c0, c1), cut at g's own 16-byte
// boundaries, and nothing read.
template <typename scalar_t, int kVec>
__device__ void block_zeros(scalar_t* g, int64_t c0, int64_t c1) {
  const scalar_t zero = Io<scalar_t>::from_acc(typename Io<scalar_t>::acc_t(0));
  const Span s = vector_span<scalar_t, kVec>(g, c0, c1);
  const int64_t edges = edge_count(c0, c1, s);
  for (int64_t i = threadIdx.x; i < edges; i += blockDim.x) store_one(g + edge_column(i, c0, s), zero);
  Pack<scalar_t, kVec> zeros;
#pragma unroll
  for (int j = 0; j < kVec; ++j) zeros.v[j] = zero;
  for (int64_t c = s.begin + int64_t(threadIdx.x) * kVec; c < s.end; c += int64_t(blockDim.x) * kVec) {
    store_pack<kVec>(g + c, zeros);
  }
}

// One block per row: both passes; with kPredict, each row's argmax from pass 1 too.
template <bool kPredict, typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_rows_kernel(const Params<acc_t> p) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  const RowTarget rt = row_target(row, p);
  const RowInputs<acc_t> in = row_inputs(x, rt, p);
  int32_t first_at_max = kNoColumn;
  const Partial<acc_t> part = row_partial<kPredict, scalar_t, kVec>(x, 0, p.num_classes, rt, in, p, &first_at_max);
  __shared__ RowConstants<acc_t> constants;
  if (threadIdx.x == 0) {
    constants = finish_row(p, row, part, in, true);
    if constexpr (kPredict) p.predicted[row] = first_at_max == kNoColumn ? 0 : first_at_max;  // 0: a row of -inf
  }
  if (p.grad == nullptr) return;  // the loss-only op: thread 0 has written the loss and lse
  __syncthreads();  // every read of the row is done: pass 2 may overwrite it
  scalar_t* g = static_cast<scalar_t*>(p.grad) + row * p.grad_row_stride;
  if (rt.has_grad) {
    block_gradient<scalar_t, kVec>(x, g, 0, p.num_classes, constants, p);
  } else {
    block_zeros<scalar_t, kVec>(g, 0, p.num_classes);
  }
}

// The columns [c0, c1) of a block of a split row (empty past the row's end).
struct Slice {
  int64_t c0, c1;
};

template <typename acc_t>
__device__ Slice split_slice(int split, const Params<acc_t>& p) {
  const int64_t c0 = split * p.columns_per_block;
  return {c0, c0 + p.columns_per_block < p.num_classes ? c0 + p.columns_per_block : p.num_classes};
}

// Split rows, first kernel: each block's partial, and the row's inputs, into the workspace;
// with kPredict, each block's first column at its max too.
template <bool kPredict, typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_partials_kernel(const Params<acc_t> p,
                                                                             Partial<acc_t>* partials,
                                                                             RowInputs<acc_t>* inputs,
                                                                             int32_t* first_at_max) {
  const int64_t row = blockIdx.x / p.blocks_per_row;
  const int split = blockIdx.x % p.blocks_per_row;
  const Slice slice = split_slice(split, p);
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  const RowTarget rt = row_target(row, p);
  const RowInputs<acc_t> in = row_inputs(x, rt, p);
  int32_t at = kNoColumn;
  const Partial<acc_t> part = row_partial<kPredict, scalar_t, kVec>(x, slice.c0, slice.c1, rt, in, p, &at);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = part;
    if constexpr (kPredict) first_at_max[blockIdx.x] = at;
    if (split == 0) inputs[row] = in;
  }
}

// Split rows, second kernel: combine the row's partials, then the gradient of this slice.
template <bool kPredict, typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_split_gradient_kernel(const Params<acc_t> p,
                                                                                   const Partial<acc_t>* partials,
                                                                                   const RowInputs<acc_t>* inputs,
                                                                                   const int32_t* first_at_max) {
  const int64_t row = blockIdx.x / p.blocks_per_row;
  const int split = blockIdx.x % p.blocks_per_row;
  // The loss-only op needs one block per row here, to write the loss and lse.
  if (p.grad == nullptr && split != 0) return;
  const Slice slice = split_slice(split, p);
  const RowTarget rt = row_target(row, p);
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  __shared__ RowConstants<acc_t> constants;
  // A row without a gradient needs its partials combined once, for the lse (block 0).
  if (threadIdx.x == 0 && (rt.has_grad || split == 0)) {
    Partial<acc_t> part = partials[row * p.blocks_per_row];
    for (int b = 1; b < p.blocks_per_row; ++b) part = combine(part, partials[row * p.blocks_per_row + b]);
    constants = finish_row(p, row, part, inputs[row], split == 0);
    if (kPredict && split == 0) {
      // The first block holding the row's max, and its first column there (0 for a row of -inf).
      int32_t at = kNoColumn;
      for (int b = 0; b < p.blocks_per_row && at == kNoColumn; ++b) {
        if (partials[row * p.blocks_per_row + b].max == part.max) at = first_at_max[row * p.blocks_per_row + b];
      }
      p.predicted[row] = at == kNoColumn ? 0 : at;
    }
  }
  if (p.grad == nullptr || slice.c1 <= slice.c0) return;
  scalar_t* g = static_cast<scalar_t*>(p.grad) + row * p.grad_row_stride;
  if (!rt.has_grad) {
    block_zeros<scalar_t, kVec>(g, slice.c0, slice.c1);
    return;
  }
  __syncthreads();
  // Only this block's slice of the row is read here: the others may be writing theirs.
  block_gradient<scalar_t, kVec>(x, g, slice.c0, slice.c1, constants, p);
}

// Vocabulary parallelism's passes over this rank's slice of the classes (SliceProblem in
// ../smoothed_xent.h), one block per row, on the row kernel's pass 1 and pass 2: the slice is a
// row problem whose targets are the columns, with no ignore_index and no z-loss. Neither
// dereferences a column outside the slice, whatever the caller passed.

// The gradient pass's per-row inputs.
template <typename acc_t>
struct SliceCoefficients {
  const acc_t *row_max, *log_sum, *p_coef, *smooth_coef, *true_coef;
};

// Statistics: m_r, log s_r and L_r = sum_c q_c (lse_r - y_c), the target's own mass only where `owned`.
template <typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_slice_stats_kernel(const Params<acc_t> p,
                                                                                const bool* owned, acc_t* row_max,
                                                                                acc_t* log_sum) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  const int64_t column = p.target[row];
  const RowTarget rt{column, owned[row] && 0 <= column && column < p.num_classes};
  RowInputs<acc_t> in = row_inputs(x, rt, p);
  if (!rt.has_grad) {  // the smoothing sum of every class still wants a finite reference of the row
    const acc_t y0 = transform(Io<scalar_t>::to_acc(load_one(x)), p);
    in.ref = isfinite(y0) ? y0 : acc_t(0);
  }
  const Partial<acc_t> part =
      block_partial<true, false, scalar_t, kVec>(x, 0, p.num_classes, in.ref, rt.has_grad ? column : int64_t(-1), p);
  if (threadIdx.x != 0) return;
  const acc_t m = part.max;
  if (m == -INFINITY) {  // every y -inf: no lse_r; the ranks' combination adds the slice's whole share
    row_max[row] = m;
    log_sum[row] = m;
    p.loss[row] = acc_t(0);
    return;
  }
  const acc_t log_s = log_(part.sum_exp);
  const acc_t total_weight = p.weight != nullptr ? *p.weight_sum : acc_t(p.num_classes);
  const acc_t w_t = rt.has_grad ? (p.weight != nullptr ? p.weight[column] : acc_t(1)) : acc_t(0);
  const acc_t deviation = (m - in.ref) * (total_weight - w_t) - part.sum_wd;  // as finish_row's
  const acc_t target_mass = (p.k_s + p.k_t) * w_t;
  row_max[row] = m;
  log_sum[row] = log_s;
  p.loss[row] = (p.k_s * total_weight + p.k_t * w_t) * log_s + (p.k_s != 0 ? p.k_s * deviation : acc_t(0)) +
                (target_mass != 0 ? target_mass * (m - in.y_t) : acc_t(0));
}

// Gradient: pass 2 with the row's global (m, log s) and the caller's coefficients; zeros, and
// nothing read, for a row whose coefficients are all 0.
template <typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_slice_grad_kernel(const Params<acc_t> p,
                                                                               const SliceCoefficients<acc_t> c) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  scalar_t* g = static_cast<scalar_t*>(p.grad) + row * p.grad_row_stride;
  RowConstants<acc_t> k;
  k.max = c.row_max[row];
  k.log_s = c.log_sum[row];
  k.p_coef = c.p_coef[row];
  k.k_s = c.smooth_coef[row];
  k.true_mass = c.true_coef[row];
  k.grad_scale = acc_t(1);
  const int64_t column = p.target[row];
  k.target = 0 <= column && column < p.num_classes ? column : int64_t(-1);
  if (k.p_coef == 0 && k.k_s == 0 && k.true_mass == 0) {
    block_zeros<scalar_t, kVec>(g, 0, p.num_classes);
  } else {
    block_gradient<scalar_t, kVec>(x, g, 0, p.num_classes, k, p);
  }
}

template <typename scalar_t, typename acc_t = typename Io<scalar_t>::acc_t>
Params<acc_t> slice_params(const SliceProblem& problem) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  Params<acc_t> p{};
  p.logits = problem.logits;
  p.grad = problem.grad;
  p.logits_row_stride = problem.logits_row_stride;
  p.grad_row_stride = problem.grad_row_stride;
  p.target = problem.column;
  p.weight = static_cast<const acc_t*>(problem.weight);
  p.weight_sum = static_cast<const acc_t*>(problem.weight_sum);
  p.grad_scale = nullptr;
  p.grad_scale_row_stride = 0;
  p.loss = static_cast<acc_t*>(problem.loss);
  p.lse = nullptr;
  p.num_classes = problem.num_classes;
  p.ignore_index = INT64_MIN;  // no column is ignored
  p.k_s = static_cast<acc_t>(problem.k_s);
  p.k_t = static_cast<acc_t>(problem.k_t);
  p.z_loss = acc_t(0);
  p.has_softcap = problem.softcap > 0;
  p.softcap = static_cast<acc_t>(p.has_softcap ? problem.softcap : 1.0);
  p.logit_scale = static_cast<acc_t>(problem.logit_scale);
  p.dydx_scale = acc_t(1);  // logit_scale is in the caller's coefficients
  p.blocks_per_row = 1;
  p.columns_per_block = (problem.num_classes + kVec - 1) / kVec * kVec;
  return p;
}

// fn(scalar_t{}) for the problem's dtype.
template <typename Fn>
cudaError_t with_dtype(ScalarKind dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarKind::Float32:
      return fn(float{});
    case ScalarKind::Float64:
      return fn(double{});
    case ScalarKind::BFloat16:
      return fn(__nv_bfloat16{});
    case ScalarKind::Float16:
      return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

int threads_for(int64_t columns, int vec) {
  const int64_t loads = (columns + vec - 1) / vec;
  return loads <= 1024 ? 128 : loads <= 4096 ? 256 : kMaxThreads;
}

template <bool kPredict, typename scalar_t, int kVec, typename acc_t>
cudaError_t launch_kernels(const Params<acc_t>& p, int64_t num_rows, void* workspace, cudaStream_t stream) {
  const int threads = threads_for(p.columns_per_block, kVec);
  if (p.blocks_per_row == 1) {
    const auto rows_kernel = &smoothed_xent_rows_kernel<kPredict, scalar_t, kVec, acc_t>;
    FUSED_LS_CUDA_LAUNCH(rows_kernel, static_cast<unsigned>(num_rows), threads, stream, p);
    return cudaGetLastError();
  }
  if constexpr (kPredict && sizeof(acc_t) == 8) {
    return cudaErrorInvalidConfiguration;  // never instantiated: launch() does not split these rows
  } else {
    // The workspace (workspace_bytes): the blocks' partials, the rows' inputs, then, when
    // predicting, the blocks' first columns at their max.
    const unsigned blocks = static_cast<unsigned>(num_rows * p.blocks_per_row);
    auto* partials = static_cast<Partial<acc_t>*>(workspace);
    auto* inputs = reinterpret_cast<RowInputs<acc_t>*>(partials + blocks);
    auto* first_at_max = kPredict ? reinterpret_cast<int32_t*>(inputs + num_rows) : nullptr;
    const auto partials_kernel = &smoothed_xent_partials_kernel<kPredict, scalar_t, kVec, acc_t>;
    FUSED_LS_CUDA_LAUNCH(partials_kernel, blocks, threads, stream, p, partials, inputs, first_at_max);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const auto gradient_kernel = &smoothed_xent_split_gradient_kernel<kPredict, scalar_t, kVec, acc_t>;
    FUSED_LS_CUDA_LAUNCH(gradient_kernel, blocks, threads, stream, p, partials, inputs,
                         static_cast<const int32_t*>(first_at_max));
    return cudaGetLastError();
  }
}

template <typename scalar_t, int kVec, typename acc_t>
cudaError_t launch(Params<acc_t> p, int64_t num_rows, void* workspace, cudaStream_t stream) {
  if (p.predicted == nullptr) return launch_kernels<false, scalar_t, kVec>(p, num_rows, workspace, stream);
  if (sizeof(acc_t) == 8 && p.blocks_per_row > 1) {
    // fp64 (for checks, not speed) rows are not split when predicting: the split kernel's
    // argmax spills registers on sm_100 (kept in shared memory, it still did). One block per
    // row needs no workspace; its sums run in another order, so such a row's loss and gradient
    // may differ in the last bits from a call that does not predict.
    p.blocks_per_row = 1;
    p.columns_per_block = (p.num_classes + kVec - 1) / kVec * kVec;
  }
  return launch_kernels<true, scalar_t, kVec>(p, num_rows, workspace, stream);
}

template <typename scalar_t>
cudaError_t launch_for_dtype(const RowsProblem& problem, int blocks_per_row, void* workspace, cudaStream_t stream) {
  using acc_t = typename Io<scalar_t>::acc_t;
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  Params<acc_t> p;
  p.logits = problem.logits;
  p.grad = problem.grad;
  p.logits_row_stride = problem.logits_row_stride;
  p.grad_row_stride = problem.grad_row_stride;
  p.target = problem.target;
  p.weight = static_cast<const acc_t*>(problem.weight);
  p.weight_sum = static_cast<const acc_t*>(problem.weight_sum);
  p.grad_scale = static_cast<const acc_t*>(problem.grad_scale);
  p.grad_scale_row_stride = problem.grad_scale_row_stride;
  p.loss = static_cast<acc_t*>(problem.loss);
  p.lse = static_cast<acc_t*>(problem.lse);
  p.predicted = problem.predicted;
  p.precomputed_lse = static_cast<const acc_t*>(problem.precomputed_lse);
  p.num_classes = problem.num_classes;
  p.ignore_index = problem.ignore_index;
  p.k_s = static_cast<acc_t>(problem.k_s);
  p.k_t = static_cast<acc_t>(problem.k_t);
  p.z_loss = static_cast<acc_t>(problem.z_loss);
  p.has_softcap = problem.softcap > 0;
  p.softcap = static_cast<acc_t>(p.has_softcap ? problem.softcap : 1.0);
  p.logit_scale = static_cast<acc_t>(problem.logit_scale);
  p.dydx_scale = p.logit_scale;
  p.blocks_per_row = blocks_per_row;
  // Slices of whole vectors: for an aligned row every slice starts at a 16-byte boundary (each
  // slice cuts its own head and tail in any case).
  const int64_t per_block = (problem.num_classes + blocks_per_row - 1) / blocks_per_row;
  p.columns_per_block = (per_block + kVec - 1) / kVec * kVec;
  return launch<scalar_t, kVec>(p, problem.num_rows, workspace, stream);
}

}  // namespace

int blocks_per_row(int64_t num_rows, int64_t num_classes, int num_sms) {
  if (num_rows <= 0 || num_rows >= 2 * int64_t(num_sms)) return 1;
  const int64_t wanted = (2 * int64_t(num_sms) + num_rows - 1) / num_rows;
  const int64_t affordable = num_classes / kMinColumnsPerBlock;  // each block keeps >= 16k columns
  int64_t blocks = wanted < affordable ? wanted : affordable;
  blocks = blocks < kMaxBlocksPerRow ? blocks : kMaxBlocksPerRow;
  return blocks > 1 ? static_cast<int>(blocks) : 1;
}

size_t workspace_bytes(const RowsProblem& problem, int blocks_per_row) {
  if (blocks_per_row <= 1) return 0;
  const size_t acc_bytes = problem.dtype == ScalarKind::Float64 ? sizeof(double) : sizeof(float);
  // Partial (3 values) per block, RowInputs (2 values) per row, then, when predicting, a first
  // column (4 bytes, aligned after values of 4 or 8) per block.
  const size_t columns = problem.predicted != nullptr ? size_t(blocks_per_row) * sizeof(int32_t) : 0;
  return static_cast<size_t>(problem.num_rows) * (columns + (blocks_per_row * 3 + 2) * acc_bytes);
}

cudaError_t launch_smoothed_xent_rows(const RowsProblem& problem, int blocks_per_row, void* workspace,
                                      cudaStream_t stream) {
  if (problem.num_rows == 0) return cudaSuccess;
  if (problem.predicted != nullptr && problem.num_classes >= kNoColumn) return cudaErrorInvalidValue;
  if (problem.num_rows * int64_t(blocks_per_row) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (problem.dtype) {
    case ScalarKind::Float32:
      return launch_for_dtype<float>(problem, blocks_per_row, workspace, stream);
    case ScalarKind::Float64:
      return launch_for_dtype<double>(problem, blocks_per_row, workspace, stream);
    case ScalarKind::BFloat16:
      return launch_for_dtype<__nv_bfloat16>(problem, blocks_per_row, workspace, stream);
    case ScalarKind::Float16:
      return launch_for_dtype<__half>(problem, blocks_per_row, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_slice_statistics(const SliceProblem& problem, cudaStream_t stream) {
  if (problem.num_rows == 0) return cudaSuccess;
  if (problem.num_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_dtype(problem.dtype, [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = typename Io<scalar_t>::acc_t;
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const Params<acc_t> p = slice_params<scalar_t>(problem);
    const auto kernel = &smoothed_xent_slice_stats_kernel<scalar_t, kVec, acc_t>;
    FUSED_LS_CUDA_LAUNCH(kernel, static_cast<unsigned>(problem.num_rows), threads_for(problem.num_classes, kVec), stream,
                         p, problem.owned, static_cast<acc_t*>(problem.row_max), static_cast<acc_t*>(problem.log_sum));
    return cudaGetLastError();
  });
}

cudaError_t launch_slice_gradient(const SliceProblem& problem, cudaStream_t stream) {
  if (problem.num_rows == 0) return cudaSuccess;
  if (problem.num_rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return with_dtype(problem.dtype, [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = typename Io<scalar_t>::acc_t;
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const Params<acc_t> p = slice_params<scalar_t>(problem);
    const SliceCoefficients<acc_t> c{static_cast<const acc_t*>(problem.row_max), static_cast<const acc_t*>(problem.log_sum),
                                     static_cast<const acc_t*>(problem.p_coef), static_cast<const acc_t*>(problem.smooth_coef),
                                     static_cast<const acc_t*>(problem.true_coef)};
    const auto kernel = &smoothed_xent_slice_grad_kernel<scalar_t, kVec, acc_t>;
    FUSED_LS_CUDA_LAUNCH(kernel, static_cast<unsigned>(problem.num_rows), threads_for(problem.num_classes, kVec), stream,
                         p, c);
    return cudaGetLastError();
  });
}

}  // namespace fused_ls::cuda
