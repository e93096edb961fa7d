// Decode attention: one query token per sequence against a KV cache, in one launch.
//
// At batch 1 a decode step's attention reads the cache once and does almost no arithmetic, so it
// needs many blocks streaming the cache at once: block (split, kv head, sequence) takes one
// contiguous range of positions for all the query heads that share the kv head (grouped-query
// attention reads K and V once), keeps an online softmax over it and writes an unnormalized
// partial output; the last block of a (kv head, sequence) to finish (a counter that it leaves at
// zero again) merges the partials in split order, so the result does not depend on timing.
// Past a block's first tile, positions the mask excludes are never read: a tile with none to
// attend costs its mask and a barrier. (The split is planned on the cache's length, which is all the host knows, so a short
// context in a long cache lands on few blocks: attention windows keep the cache short.) Scores and
// sums in fp32; softmax in base 2 (the query is scaled by scale * log2 e).
// Launched dependent (dependent_launch.cuh): a block waits for the kernel before, which wrote the
// cache, then lets the next kernel start.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "decdec_kernels.h"
#include "dependent_launch.cuh"

namespace decdec {
namespace {

constexpr int kTile = 64;  // positions scored and weighed at a time
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ void store2(__half2* p, float2 v) { *p = __float22half2_rn(v); }
__device__ __forceinline__ void store2(__nv_bfloat162* p, float2 v) { *p = __float22bfloat162_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Pair i of a block's output: the sum of the slices' partial outputs (red: [slices][pairs] float2).
__device__ __forceinline__ float2 sum_slices(const float* red, int slices, int pairs, int i) {
  float2 o = make_float2(0.f, 0.f);
  for (int s = 0; s < slices; ++s) {
    const float2 v = reinterpret_cast<const float2*>(red)[s * pairs + i];
    o.x += v.x;
    o.y += v.y;
  }
  return o;
}

// Threads of a block. A tile's work is a chain of dependent shuffles and multiply-adds per warp,
// and a short context gives each block one tile: 16 warps split it into short chains (4 rows of
// scores, 4-13 rows of V per thread) that the four schedulers of the SM interleave.
constexpr int kThreads = 512;

// Two blocks per SM (64 registers) where that spills nothing: head_dim <= 128, groups <= 8.
constexpr int blocks_per_sm(int nw, int gmax) { return nw <= 2 && gmax <= 8 ? 2 : 1; }

// NW: pairs of a row per lane when scoring (head_dim <= 64 NW); GMAX: query heads per kv head, at
// most; T2: __half2 or __nv_bfloat162. The tile's code has no data-dependent branch: masked rows
// hold zeros and weigh 0, so every shuffle runs converged.
template <typename T2, int NW, int GMAX>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(NW, GMAX)) decode_attention_kernel(const DecodeAttentionParams p) {
  constexpr int kWarps = kThreads / 32, kRowsPerWarp = kTile / kWarps;
  // V rows a thread takes per tile, at most (the slices are fewest at head_dim 64 NW)
  constexpr int kVRows = (kTile + kThreads / (32 * NW) - 1) / (kThreads / (32 * NW));
  extern __shared__ float smem[];
  const int G = p.group, D = p.head_dim, D2 = D / 2, C = p.chunk;
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int slices = kThreads / D2;  // position slices of the weighted sum of V
  float* q_s = smem;                 // [G][D] query * scale * log2 e
  float* w_s = q_s + G * D;          // [G][kTile] scores, then softmax weights
  float* m_s = w_s + G * kTile;      // [G] running maximum
  float* l_s = m_s + G;              // [G] running sum of weights
  float* a_s = l_s + G;              // [G] rescale of the running output by this tile
  float* red = a_s + G + (G % 2);    // [slices][G][D] per-slice outputs (8-byte aligned)
  __shared__ bool valid_s[kTile];
  __shared__ bool last_s;

  const T2* q = static_cast<const T2*>(p.q) + (int64_t(b) * p.q_stride_b + int64_t(kvh) * G * p.q_stride_h) / 2;
  const T2* kbase = static_cast<const T2*>(p.k) + (int64_t(b) * p.k_stride_b + int64_t(kvh) * p.k_stride_h) / 2;
  const T2* vbase = static_cast<const T2*>(p.v) + (int64_t(b) * p.v_stride_b + int64_t(kvh) * p.v_stride_h) / 2;
  const int64_t ks = p.k_stride_s / 2, vs = p.v_stride_s / 2;
  const float qscale = p.scale * kLog2e;
  const int vw = tid % D2, slice = tid / D2;  // this thread's pair of V columns and its slice
  const bool weighs = slice < slices;
  T2 zero;
  *reinterpret_cast<uint32_t*>(&zero) = 0u;
  const int begin = split * C, end = min(p.S, begin + C);

  // The tile in registers: V rows of this thread's slice; K rows of this warp (warp w scores rows
  // w, w + kWarps, ...; lane l holds pairs l, l + 32, ... of each row).
  T2 vrow[kVRows];
  T2 krow[kRowsPerWarp][NW];
  auto load_rows = [&](int t0, bool masked_only) {
#pragma unroll
    for (int j = 0; j < kVRows; ++j) {
      const int r = min(slice + j * slices, kTile - 1);
      const bool read = weighs && slice + j * slices < kTile && t0 + r < end && (!masked_only || valid_s[r]);
      vrow[j] = read ? vbase[int64_t(t0 + r) * vs + vw] : zero;
    }
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int r = warp + j * kWarps;
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        const int c = lane + 32 * i;
        krow[j][i] = c < D2 && t0 + r < end && (!masked_only || valid_s[r]) ? kbase[int64_t(t0 + r) * ks + c] : zero;
      }
    }
  };
  auto mask_at = [&](int t0) {  // whether this thread's position of the tile is attended
    const int pos = t0 + tid;
    return tid < kTile && pos < end && (p.mask == nullptr || p.mask[int64_t(b) * p.mask_stride_b + pos]);
  };

  wait_for_previous_kernels();  // the cache and the query were just written
  let_next_kernel_start();
  // The first tile's rows are read before its mask is known, so that they fly together with the
  // query and the mask (one memory round trip where there were three); the rows it excludes are
  // set to zero below (they may hold anything). Later tiles read only the rows their mask keeps: a
  // long cache with a short context is mostly masked.
  bool valid = mask_at(begin);
  load_rows(begin, false);
  for (int i = tid; i < G * D2; i += kThreads) {
    const float2 f = to_float2(q[(i / D2) * (p.q_stride_h / 2) + i % D2]);
    q_s[2 * i] = f.x * qscale;
    q_s[2 * i + 1] = f.y * qscale;
  }
  if (tid < G) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float2 acc[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) acc[g] = make_float2(0.f, 0.f);

  for (int t0 = begin; t0 < end; t0 += kTile) {
    if (t0 != begin) {
      __syncthreads();  // the previous tile's weights and flags are consumed
      valid = mask_at(t0);
    }
    if (tid < kTile) valid_s[tid] = valid;
    if (!__syncthreads_or(valid)) continue;
    if (t0 != begin) {
      load_rows(t0, true);
    } else {
#pragma unroll
      for (int j = 0; j < kVRows; ++j) {  // masked rows weigh 0, and 0 * NaN would not be 0
        if (!valid_s[min(slice + j * slices, kTile - 1)]) vrow[j] = zero;
      }
    }

    // scores of the warp's rows for each query head (masked rows get -inf whatever K holds)
    for (int g = 0; g < G; ++g) {
      float2 qv[NW];
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        const int c = min(lane + 32 * i, D2 - 1);  // pairs past the row meet zeros
        qv[i] = make_float2(q_s[g * D + 2 * c], q_s[g * D + 2 * c + 1]);
      }
      float sc[kRowsPerWarp];
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < NW; ++i) {
          const float2 kf = to_float2(krow[j][i]);
          s = fmaf(kf.x, qv[i].x, fmaf(kf.y, qv[i].y, s));
        }
        sc[j] = s;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int j = 0; j < kRowsPerWarp; ++j) sc[j] += __shfl_xor_sync(0xffffffffu, sc[j], o);
      }
      if (lane < kRowsPerWarp) {
        float mine = sc[0];
#pragma unroll
        for (int j = 1; j < kRowsPerWarp; ++j) mine = lane == j ? sc[j] : mine;
        const int r = warp + lane * kWarps;
        w_s[g * kTile + r] = valid_s[r] ? mine : -INFINITY;
      }
    }
    __syncthreads();

    // online softmax: warp w updates heads w, w + 4, ...
    for (int g = warp; g < G; g += kWarps) {
      const float s0 = w_s[g * kTile + lane], s1 = w_s[g * kTile + lane + 32];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
      const float w0 = exp2f(s0 - m_new), w1 = exp2f(s1 - m_new);
      w_s[g * kTile + lane] = w0;
      w_s[g * kTile + lane + 32] = w1;
      const float sum = warp_sum(w0 + w1);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_new);  // 0 while nothing was seen (m_old = -inf)
        a_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    // weighted sum of V: masked rows and rows past the tile hold zeros (their weights are finite)
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < G) {
        acc[g].x *= a_s[g];
        acc[g].y *= a_s[g];
      }
    }
#pragma unroll
    for (int j = 0; j < kVRows; ++j) {
      const int r = min(slice + j * slices, kTile - 1);
      const float2 vf = to_float2(vrow[j]);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
          const float w = w_s[g * kTile + r];
          acc[g].x = fmaf(w, vf.x, acc[g].x);
          acc[g].y = fmaf(w, vf.y, acc[g].y);
        }
      }
    }
  }

  // this block's output: the sum over slices, unnormalized
  __syncthreads();
  if (weighs) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
      if (g < G) reinterpret_cast<float2*>(red)[(slice * G + g) * D2 + vw] = acc[g];
  }
  __syncthreads();
  const int head0 = kvh * G;
  T2* out = static_cast<T2*>(p.out) + (int64_t(b) * p.q_heads + head0) * D2;
  if (p.splits == 1) {
    for (int i = tid; i < G * D2; i += kThreads) {
      const float2 o = sum_slices(red, slices, G * D2, i);
      const float l = l_s[i / D2];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      store2(out + i, make_float2(o.x * inv, o.y * inv));
    }
    return;
  }
  const int64_t head_item = int64_t(b) * p.kv_heads + kvh;  // (sequence, kv head)
  float2* part_o = reinterpret_cast<float2*>(p.partial_out) + (head_item * p.splits + split) * G * D2;
  float2* part_ml = reinterpret_cast<float2*>(p.partial_ml) + (head_item * p.splits + split) * G;
  for (int i = tid; i < G * D2; i += kThreads) {
    part_o[i] = sum_slices(red, slices, G * D2, i);
  }
  if (tid < G) part_ml[tid] = make_float2(m_s[tid], l_s[tid]);
  __threadfence();  // the partials are visible before the counter says so
  __syncthreads();
  if (tid == 0) {
    const int done = atomicAdd(p.counters + head_item, 1) + 1;
    last_s = done == p.splits;
    if (last_s) p.counters[head_item] = 0;  // every launch leaves the counters at zero
  }
  __syncthreads();
  if (!last_s) return;
  __threadfence();

  // merge, in split order, as an online softmax over the splits' (max, sum, output): each thread
  // reads every split's partial of its pairs at once, 8 splits in flight
  const float2* all_o = reinterpret_cast<const float2*>(p.partial_out) + head_item * p.splits * G * D2;
  const float2* all_ml = reinterpret_cast<const float2*>(p.partial_ml) + head_item * p.splits * G;
  for (int i = tid; i < G * D2; i += kThreads) {
    const int g = i / D2;
    float m = -INFINITY, l = 0.f;
    float2 o = make_float2(0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < p.splits; ++s) {
      const float2 ml = __ldcg(&all_ml[s * G + g]);
      const float2 v = __ldcg(&all_o[s * G * D2 + i]);
      // a split with nothing to attend has m = -inf, l = 0, o = 0; so has the running merge before
      // its first split with something (and -inf - -inf would be NaN)
      const float m_new = fmaxf(m, ml.x);
      const float alpha = m == -INFINITY ? 0.f : exp2f(m - m_new);
      const float f = ml.x == -INFINITY ? 0.f : exp2f(ml.x - m_new);
      l = fmaf(f, ml.y, l * alpha);
      o = make_float2(fmaf(f, v.x, o.x * alpha), fmaf(f, v.y, o.y * alpha));
      m = m_new;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    store2(out + i, make_float2(o.x * inv, o.y * inv));
  }
}

template <typename T2, int NW, int GMAX>
cudaError_t launch_typed(const DecodeAttentionParams& p, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {  // a large group: opt in (per device, so every time)
    const cudaError_t e = cudaFuncSetAttribute(decode_attention_kernel<T2, NW, GMAX>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(p.splits, p.kv_heads, p.B);
  return launch_kernel(decode_attention_kernel<T2, NW, GMAX>, grid, kThreads, smem, stream, p);
}

template <typename T2, int NW>
cudaError_t launch_group(const DecodeAttentionParams& p, size_t smem, cudaStream_t stream) {
  if (p.group <= 4) return launch_typed<T2, NW, 4>(p, smem, stream);
  if (p.group <= 8) return launch_typed<T2, NW, 8>(p, smem, stream);
  return launch_typed<T2, NW, kMaxAttentionGroup>(p, smem, stream);
}

int pairs_per_lane(int head_dim) { return (head_dim / 2 + 31) / 32; }

template <typename T2>
cudaError_t launch_dtype(const DecodeAttentionParams& p, size_t smem, cudaStream_t stream) {
  switch (pairs_per_lane(p.head_dim)) {
    case 1: return launch_group<T2, 1>(p, smem, stream);
    case 2: return launch_group<T2, 2>(p, smem, stream);
    case 3: return launch_group<T2, 3>(p, smem, stream);
    default: return launch_group<T2, 4>(p, smem, stream);
  }
}

}  // namespace

void plan_decode_attention(DecodeAttentionParams& p, int sms) {
  // about two blocks per SM over all (sequence, kv head) pairs, at least a tile of positions each
  const int per_head = std::max(1, std::min(kMaxAttentionSplits, (2 * sms + p.B * p.kv_heads - 1) / (p.B * p.kv_heads)));
  int chunk = (p.S + per_head - 1) / per_head;
  chunk = std::max(kTile, (chunk + kTile - 1) / kTile * kTile);
  p.chunk = chunk;
  p.splits = (p.S + chunk - 1) / chunk;
}

size_t decode_attention_smem_bytes(const DecodeAttentionParams& p) {
  const size_t red = size_t(kThreads / (p.head_dim / 2)) * p.group * p.head_dim;  // [slices][G][D]
  return sizeof(float) * (size_t(p.group) * p.head_dim + size_t(p.group) * kTile + 4 * size_t(p.group) + red);
}

cudaError_t launch_decode_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  const size_t smem = decode_attention_smem_bytes(p);
  return p.dtype == kHalf ? launch_dtype<__half2>(p, smem, stream) : launch_dtype<__nv_bfloat162>(p, smem, stream);
}

}  // namespace decdec
