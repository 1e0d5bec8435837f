// Fused label-smoothed cross-entropy on CUDA (the fallback of the Triton kernel): each row's
// loss, lse and gradient from one launch. The maths is in ../smoothed_xent.h.
//
// Layout of the work
// ------------------
// One thread block per row, reading the row with 16-byte vector loads (4 fp32, 8 bf16/fp16,
// 2 fp64) when the rows are 16-byte aligned, else element by element.
//   Pass 1: each thread keeps an online (max, sum of exp) pair over its elements, plus
//           sum_{c != t} w_c (y_c - ref) with ref the target's y, else the row's first y, if
//           finite (else 0), so that a constant added to every logit cancels before anything
//           large is summed (the target's own term is added once, with its whole mass); then a
//           warp-shuffle and shared-memory reduction gives the row's m, s and smoothing sum,
//           and thread 0 writes the loss and lse and reads the row's grad_scale (one value
//           for every row, or one per row).
//   Pass 2: the row is read again (from L2 for all but the longest rows), and every
//           gradient element is computed in fp32 (fp64 for fp64), the true class's
//           p_t - k_t included, then rounded once and stored with 16-byte stores.
// When few rows are long (rows < 2 x SMs and V >= 32k), a row is split over up to 64 blocks:
// a first kernel writes each block's partial (max, sum, smoothing sum) to a workspace, a
// second combines the row's partials and writes the gradient of its slice. In place, a block
// of the second kernel reads nothing of the row outside its own slice.
//
// Memory traffic per row (b = bytes per logit): read 2*V*b, write V*b (+ 4V for weights,
// cached across rows); the split path adds 12 bytes per block to the workspace. The loss-only
// op (grad == nullptr) stops after pass 1: read V*b, write 8 bytes.
//
// Ignored rows: loss 0, gradient 0. A target outside [0, V) is never dereferenced: loss NaN,
// gradient 0, and no host synchronisation is needed to report it.
#include "smoothed_xent_cuda.h"

#include <math.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// tests/test_native.py runs these kernels on the CPU, emulating blocks with threads; that
// harness replaces the launch, the one construct a host compiler cannot parse.
#ifndef FUSED_LS_CUDA_LAUNCH
#define FUSED_LS_CUDA_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif

namespace fused_ls::cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxBlocksPerRow = 64;
constexpr int64_t kMinColumnsPerBlock = 16384;

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

// kVec consecutive logits: one 16-byte load or store when kVec * sizeof(scalar_t) == 16.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

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
  int64_t num_classes, ignore_index;
  acc_t k_s, k_t, z_loss, softcap, logit_scale;
  bool has_softcap;
  int blocks_per_row;
  int64_t columns_per_block;  // a multiple of the vector width
};

// A block's summary of its columns: the online max and sum of exp(y - max), and
// sum_{c != t} w_c (y_c - ref) (t: the target if it has a gradient, else none).
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
  bool has_grad;
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

// Adds kCount values of y at columns [c, c + kCount) to a thread's partial; column `skip`
// (the target, or -1) is left out of sum_wd.
template <int kCount, typename acc_t>
__device__ void accumulate(Partial<acc_t>& part, const acc_t (&y)[kCount], int64_t c, acc_t ref, int64_t skip,
                           const Params<acc_t>& p) {
  // fp64: sum_wd before the exps, not interleaved with them. Each fp64 exp keeps its
  // polynomial's coefficients in register pairs, and with the weight loads and `skip` live
  // beside two of them, ptxas spilled at the 64 registers it aims for under
  // __launch_bounds__(512) (two resident blocks of 512). The same sums in the same order:
  // sum_wd and sum_exp are separate accumulators. fp32 keeps the interleaved order (reordered,
  // one fp32 kernel gained a register on sm_80).
  constexpr bool kDeviationsFirst = sizeof(acc_t) == 8;
  if constexpr (kDeviationsFirst) {
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
  }
  const acc_t base = part.max == -INFINITY ? acc_t(0) : part.max;
#pragma unroll
  for (int j = 0; j < kCount; ++j) {
    part.sum_exp += exp_(y[j] - base);
    if constexpr (!kDeviationsFirst) {
      const acc_t w = p.weight != nullptr ? p.weight[c + j] : acc_t(1);
      // A class of weight 0 adds exactly 0, even at y = -inf (0 * -inf would be NaN).
      part.sum_wd += w != acc_t(0) && c + j != skip ? w * (y[j] - ref) : acc_t(0);
    }
  }
}

// Pass 1 over columns [c0, c1) of the row at x; c0 is a multiple of kVec.
template <typename scalar_t, int kVec, typename acc_t>
__device__ Partial<acc_t> block_partial(const scalar_t* x, int64_t c0, int64_t c1, acc_t ref, int64_t skip,
                                        const Params<acc_t>& p) {
  Partial<acc_t> part{-INFINITY, acc_t(0), acc_t(0)};
  const int64_t vec_end = c0 + (c1 - c0) / kVec * kVec;
  for (int64_t c = c0 + int64_t(threadIdx.x) * kVec; c < vec_end; c += int64_t(blockDim.x) * kVec) {
    const Pack<scalar_t, kVec> pack = *reinterpret_cast<const Pack<scalar_t, kVec>*>(x + c);
    acc_t y[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = transform(Io<scalar_t>::to_acc(pack.v[j]), p);
    accumulate<kVec>(part, y, c, ref, skip, p);
  }
  for (int64_t c = vec_end + threadIdx.x; c < c1; c += blockDim.x) {
    const acc_t y[1] = {transform(Io<scalar_t>::to_acc(x[c]), p)};
    accumulate<1>(part, y, c, ref, skip, p);
  }
  return block_reduce(part);
}

template <typename acc_t>
__device__ bool target_has_grad(int64_t t, const Params<acc_t>& p) {
  return t != p.ignore_index && 0 <= t && t < p.num_classes;
}

// The column pass 1 leaves out of sum_wd: the row's target, or -1 when it has no gradient.
template <typename acc_t>
__device__ int64_t skipped_column(int64_t row, const Params<acc_t>& p) {
  const int64_t t = p.target[row];
  return target_has_grad(t, p) ? t : int64_t(-1);
}

template <typename scalar_t, typename acc_t>
__device__ RowInputs<acc_t> row_inputs(const scalar_t* x, int64_t row, const Params<acc_t>& p) {
  RowInputs<acc_t> in;
  const int64_t t = p.target[row];
  const bool has_grad = target_has_grad(t, p);
  // The only read at the target's index, and only inside the row.
  in.y_t = has_grad ? transform(Io<scalar_t>::to_acc(x[t]), p) : acc_t(0);
  // Any finite y of the row will do; the target's is rarely masked, the first class may be.
  const acc_t y0 = transform(Io<scalar_t>::to_acc(x[0]), p);
  in.ref = has_grad && isfinite(in.y_t) ? in.y_t : isfinite(y0) ? y0 : acc_t(0);
  return in;
}

// Thread 0's work between the passes: the loss and lse (written when `write_row_outputs`)
// and the constants of pass 2.
template <typename acc_t>
__device__ RowConstants<acc_t> finish_row(const Params<acc_t>& p, int64_t row, const Partial<acc_t>& part,
                                          const RowInputs<acc_t>& in, bool write_row_outputs) {
  const int64_t t = p.target[row];
  const bool ignored = t == p.ignore_index;
  const bool in_range = 0 <= t && t < p.num_classes;
  const bool has_grad = target_has_grad(t, p);
  const acc_t m = part.max;
  const acc_t log_s = log_(part.sum_exp);
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
  k.has_grad = has_grad;
  k.target = t;
  k.p_coef = has_grad ? total_mass + 2 * p.z_loss * lse : acc_t(0);
  k.k_s = has_grad ? p.k_s : acc_t(0);
  k.true_mass = has_grad ? true_mass : acc_t(0);
  // One read per row, by thread 0; none for the loss-only op (no grad_scale).
  k.grad_scale = has_grad && p.grad != nullptr ? p.grad_scale[row * p.grad_scale_row_stride] : acc_t(0);
  return k;
}

template <typename acc_t>
__device__ acc_t gradient(acc_t y, int64_t c, const RowConstants<acc_t>& k, const Params<acc_t>& p) {
  if (!k.has_grad) return acc_t(0);
  const acc_t w = p.weight != nullptr ? p.weight[c] : acc_t(1);
  // y - max is exact for nearby values, unlike y - lse with lse rounded at the logits' scale
  // (a relative error of 5e-4 in p at logits around 1e4 in fp32).
  const acc_t g = k.p_coef * exp_((y - k.max) - k.log_s) - k.k_s * w - (c == k.target ? k.true_mass : acc_t(0));
  acc_t dydx = p.logit_scale;
  if (p.has_softcap) {
    const acc_t r = y / p.softcap;
    dydx = p.logit_scale * (1 - r * r);
  }
  return g * (k.grad_scale * dydx);
}

// Pass 2 over columns [c0, c1): each thread reads, then writes, its own elements, so `g`
// may be `x` (in place).
template <typename scalar_t, int kVec, typename acc_t>
__device__ void block_gradient(const scalar_t* x, scalar_t* g, int64_t c0, int64_t c1, const RowConstants<acc_t>& k,
                               const Params<acc_t>& p) {
  const int64_t vec_end = c0 + (c1 - c0) / kVec * kVec;
  for (int64_t c = c0 + int64_t(threadIdx.x) * kVec; c < vec_end; c += int64_t(blockDim.x) * kVec) {
    const Pack<scalar_t, kVec> in = *reinterpret_cast<const Pack<scalar_t, kVec>*>(x + c);
    Pack<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t y = transform(Io<scalar_t>::to_acc(in.v[j]), p);
      out.v[j] = Io<scalar_t>::from_acc(gradient(y, c + j, k, p));
    }
    *reinterpret_cast<Pack<scalar_t, kVec>*>(g + c) = out;
  }
  for (int64_t c = vec_end + threadIdx.x; c < c1; c += blockDim.x) {
    const acc_t y = transform(Io<scalar_t>::to_acc(x[c]), p);
    g[c] = Io<scalar_t>::from_acc(gradient(y, c, k, p));
  }
}

// One block per row: both passes.
template <typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_rows_kernel(const Params<acc_t> p) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  const RowInputs<acc_t> in = row_inputs(x, row, p);
  const Partial<acc_t> part = block_partial<scalar_t, kVec>(x, 0, p.num_classes, in.ref, skipped_column(row, p), p);
  __shared__ RowConstants<acc_t> constants;
  if (threadIdx.x == 0) constants = finish_row(p, row, part, in, true);
  if (p.grad == nullptr) return;  // the loss-only op: thread 0 has written the loss and lse
  __syncthreads();  // every read of the row is done: pass 2 may overwrite it
  scalar_t* g = static_cast<scalar_t*>(p.grad) + row * p.grad_row_stride;
  block_gradient<scalar_t, kVec>(x, g, 0, p.num_classes, constants, p);
}

// Split rows, first kernel: each block's partial, and the row's inputs, into the workspace.
template <typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_partials_kernel(const Params<acc_t> p,
                                                                             Partial<acc_t>* partials,
                                                                             RowInputs<acc_t>* inputs) {
  const int64_t row = blockIdx.x / p.blocks_per_row;
  const int split = blockIdx.x % p.blocks_per_row;
  const int64_t c0 = split * p.columns_per_block;
  const int64_t c1 = c0 + p.columns_per_block < p.num_classes ? c0 + p.columns_per_block : p.num_classes;
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  const RowInputs<acc_t> in = row_inputs(x, row, p);
  const Partial<acc_t> part = block_partial<scalar_t, kVec>(x, c0, c1, in.ref, skipped_column(row, p), p);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = part;
    if (split == 0) inputs[row] = in;
  }
}

// Split rows, second kernel: combine the row's partials, then the gradient of this slice.
template <typename scalar_t, int kVec, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) smoothed_xent_split_gradient_kernel(const Params<acc_t> p,
                                                                                   const Partial<acc_t>* partials,
                                                                                   const RowInputs<acc_t>* inputs) {
  const int64_t row = blockIdx.x / p.blocks_per_row;
  const int split = blockIdx.x % p.blocks_per_row;
  // The loss-only op needs one block per row here, to write the loss and lse.
  if (p.grad == nullptr && split != 0) return;
  const int64_t c0 = split * p.columns_per_block;
  const int64_t c1 = c0 + p.columns_per_block < p.num_classes ? c0 + p.columns_per_block : p.num_classes;
  const scalar_t* x = static_cast<const scalar_t*>(p.logits) + row * p.logits_row_stride;
  __shared__ RowConstants<acc_t> constants;
  if (threadIdx.x == 0) {
    Partial<acc_t> part = partials[row * p.blocks_per_row];
    for (int b = 1; b < p.blocks_per_row; ++b) part = combine(part, partials[row * p.blocks_per_row + b]);
    constants = finish_row(p, row, part, inputs[row], split == 0);
  }
  if (p.grad == nullptr) return;
  __syncthreads();
  scalar_t* g = static_cast<scalar_t*>(p.grad) + row * p.grad_row_stride;
  // Only this block's slice of the row is read here: the others may be writing theirs.
  if (c0 < c1) block_gradient<scalar_t, kVec>(x, g, c0, c1, constants, p);
}

int threads_for(int64_t columns, int vec) {
  const int64_t loads = (columns + vec - 1) / vec;
  return loads <= 1024 ? 128 : loads <= 4096 ? 256 : kMaxThreads;
}

template <typename scalar_t, int kVec, typename acc_t>
cudaError_t launch(const Params<acc_t>& p, int64_t num_rows, void* workspace, cudaStream_t stream) {
  const int threads = threads_for(p.columns_per_block, kVec);
  if (p.blocks_per_row == 1) {
    const auto rows_kernel = &smoothed_xent_rows_kernel<scalar_t, kVec, acc_t>;
    FUSED_LS_CUDA_LAUNCH(rows_kernel, static_cast<unsigned>(num_rows), threads, stream, p);
    return cudaGetLastError();
  }
  const unsigned blocks = static_cast<unsigned>(num_rows * p.blocks_per_row);
  auto* partials = static_cast<Partial<acc_t>*>(workspace);
  auto* inputs = reinterpret_cast<RowInputs<acc_t>*>(partials + blocks);
  const auto partials_kernel = &smoothed_xent_partials_kernel<scalar_t, kVec, acc_t>;
  FUSED_LS_CUDA_LAUNCH(partials_kernel, blocks, threads, stream, p, partials, inputs);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const auto gradient_kernel = &smoothed_xent_split_gradient_kernel<scalar_t, kVec, acc_t>;
  FUSED_LS_CUDA_LAUNCH(gradient_kernel, blocks, threads, stream, p, partials, inputs);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename scalar_t>
cudaError_t launch_for_dtype(const RowsProblem& problem, int blocks_per_row, void* workspace, cudaStream_t stream) {
  using acc_t = typename Io<scalar_t>::acc_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
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
  p.num_classes = problem.num_classes;
  p.ignore_index = problem.ignore_index;
  p.k_s = static_cast<acc_t>(problem.k_s);
  p.k_t = static_cast<acc_t>(problem.k_t);
  p.z_loss = static_cast<acc_t>(problem.z_loss);
  p.has_softcap = problem.softcap > 0;
  p.softcap = static_cast<acc_t>(p.has_softcap ? problem.softcap : 1.0);
  p.logit_scale = static_cast<acc_t>(problem.logit_scale);
  p.blocks_per_row = blocks_per_row;
  // Slices of whole vectors, so that every block's vector loads stay aligned.
  const int64_t per_block = (problem.num_classes + blocks_per_row - 1) / blocks_per_row;
  p.columns_per_block = (per_block + kVec - 1) / kVec * kVec;

  const bool vectorized = aligned16(problem.logits) && aligned16(problem.grad) &&
                          (problem.logits_row_stride * sizeof(scalar_t)) % 16 == 0 &&
                          (problem.grad_row_stride * sizeof(scalar_t)) % 16 == 0;
  if (vectorized) return launch<scalar_t, kVec>(p, problem.num_rows, workspace, stream);
  p.columns_per_block = per_block;
  return launch<scalar_t, 1>(p, problem.num_rows, workspace, stream);
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
  // Partial (3 values) per block, then RowInputs (2 values) per row.
  return static_cast<size_t>(problem.num_rows) * (blocks_per_row * 3 + 2) * acc_bytes;
}

cudaError_t launch_smoothed_xent_rows(const RowsProblem& problem, int blocks_per_row, void* workspace,
                                      cudaStream_t stream) {
  if (problem.num_rows == 0) return cudaSuccess;
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

}  // namespace fused_ls::cuda
