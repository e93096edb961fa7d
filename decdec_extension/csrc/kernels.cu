// DecDEC CUDA kernels: the quantized GEMV (uniform and LUT formats, 3/4 bits, fp16/bf16, batch 1..8)
// with the DEC work fused into the same launch, the standalone selection, and dequantization.
//
// One launch, two roles (blockIdx < n_tb: DEC, the rest: GEMV), so DecDEC needs no second stream,
// no cooperative grid sync and no extra launch:
// - a GEMV block computes 16 output rows for all tokens with mma.m16n8k16 (weights = A operand,
//   decoded exactly to (q - z) or LUT values in fp16/bf16; tokens = the 8 columns of B; fp32
//   accumulators), its 8 warps splitting K and reducing in shared memory in a fixed order;
// - a DEC block selects the channels of each token (DESIGN.md: bucket edges from the envelope,
//   lowest index first in the overflowing bucket, NaN last), reads its slice of the selected
//   residual rows straight from mapped pinned host memory, and forms the correction in fp32;
// - the merge: both sides write their fp32 part to a workspace and bump a per-16-row counter; the
//   second to arrive writes out = (base + correction) + bias and resets the counter to zero. Every
//   output is one fixed sum of fixed-order sums: results are bitwise reproducible, and no block ever
//   waits for another (no deadlock whatever the scheduling).
#include "decdec_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace decdec {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKSteps = kTileK / 16;
constexpr int kPartStride = 33;  // floats per partial row of 32 (padding avoids bank conflicts)
constexpr int kBucketNone = 33;  // channels past the end of a partial chunk: never selected

__host__ __device__ inline int div_up(int a, int b) { return (a + b - 1) / b; }

template <int DT>
struct Act;

template <>
struct Act<kHalf> {
  using T = __half;
  static constexpr uint32_t kMagicBase = 0x6400u;  // fp16 1024: 1024 + q is exact for q < 1024
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_bits(uint16_t b) { return __ushort_as_half(b); }
  __device__ static T from_float(float f) { return __float2half_rn(f); }
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  __device__ static void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  // LUT table entry: the fp16 value in the low half
  __device__ static uint32_t lut_entry(__half v) { return __half_as_ushort(v); }
};

template <>
struct Act<kBFloat16> {
  using T = __nv_bfloat16;
  static constexpr uint32_t kMagicBase = 0x4300u;  // bf16 128: 128 + q is exact for q < 128
  __device__ static float to_float(T v) { return __bfloat162float(v); }
  __device__ static T from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
  __device__ static T from_float(float f) { return __float2bfloat16_rn(f); }
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  __device__ static void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  // An fp16 LUT value is not exact in bf16: split it into hi + lo, both bf16 and exact together
  // (fp16 has 11 significant bits, bf16 8; the remainder fits, and bf16 has fp32's range).
  __device__ static uint32_t lut_entry(__half v) {
    const float f = __half2float(v);
    const __nv_bfloat16 hi = __float2bfloat16_rn(f);
    const __nv_bfloat16 lo = __float2bfloat16_rn(f - __bfloat162float(hi));
    return uint32_t(__bfloat16_as_ushort(hi)) | (uint32_t(__bfloat16_as_ushort(lo)) << 16);
  }
};

// volatile: keeps the prefetch where it is written (ahead of the current tile's math) instead of
// letting the compiler sink it next to its use
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4* w, int i) {
  const uint4& v = w[i >> 2];
  switch (i & 3) {
    case 0: return v.x;
    case 1: return v.y;
    case 2: return v.z;
    default: return v.w;
  }
}

// Codes of A-fragment register i (0..3) at k-step s, as two 16-bit integers (layout: decdec_kernels.h).
// Register i holds row g + 8 (i & 1), channels 8 (i >> 1) + 2 t + {0, 1} of the k-step.
template <int BITS>
__device__ __forceinline__ uint32_t code_pair(const uint4* w, int s, int i) {
  if (BITS == 4) return (word_of(w, s) >> (4 * i)) & 0x000F000Fu;
  const uint32_t lo = word_of(w, s >> 1) >> (8 * (s & 1) + 2 * i);
  const uint32_t hi = word_of(w, 8 + (s >> 2)) >> (4 * (s & 3) + i);
  return (lo & 0x00030003u) | ((hi & 0x00010001u) << 2);
}

template <int BITS>
__device__ __forceinline__ void load_tile(const uint4* tile, uint4* w) {
  constexpr int J = (BITS == 4 ? 16 : 12) / 4;
#pragma unroll
  for (int j = 0; j < J; ++j) w[j] = load_stream(tile + j * 32);
}

// ------------------------------------------------------------------------------------------------
// Selection (shared by the DEC role and the standalone kernel)

// Lower bucket edges in fp32 exactly as selection.bucket_edges computes them (IEEE operations,
// immune to fast-math), computed by one whole warp; returns whether the edges are non-increasing
// and NaN-free, which allows finding a bucket by interpolation.
__device__ bool compute_edges(const float* envelope, int k_total, float* edges, int lane) {
  const float bhi = envelope[0];
  const float blo = envelope[k_total - 1];
  const float v = lane < 16 ? __fsub_rn(bhi, __fdiv_rn(__fmul_rn(__fsub_rn(bhi, blo), float(lane)), 15.0f))
                            : __fdiv_rn(__fmul_rn(blo, float(31 - lane)), 16.0f);
  edges[lane] = v;
  const float next = __shfl_down_sync(0xffffffffu, v, 1);
  const bool ok = (v == v) && (lane == 31 || v >= next);
  return __all_sync(0xffffffffu, ok);
}

// The smallest i with a >= edges[i]; 32 when there is none (NaN): the definition, for edges that
// are not non-increasing.
__device__ __forceinline__ int bucket_of(float a, const float* edges) {
  for (int i = 0; i < 32; ++i)
    if (a >= edges[i]) return i;
  return 32;
}

// One warp loads the activations of one chunk: lane l holds channels chunk * 1024 + 32 l + i,
// i = 0..31, as 16 pairs (zero past the end); four 16-byte loads per lane where x allows.
template <int DT>
__device__ __forceinline__ void load_chunk_x(const typename Act<DT>::T* xrow, int K, int chunk, int lane,
                                             uint32_t* xv) {
  const int first = chunk * kChunk + lane * 32;
  if (K % 8 == 0 && reinterpret_cast<uintptr_t>(xrow) % 16 == 0 && first + 32 <= K) {
    const uint4* src = reinterpret_cast<const uint4*>(xrow + first);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint4 v = __ldg(src + j);
      xv[4 * j] = v.x;
      xv[4 * j + 1] = v.y;
      xv[4 * j + 2] = v.z;
      xv[4 * j + 3] = v.w;
    }
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xrow);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int ch = first + 2 * j;
      xv[j] = (ch < K ? uint32_t(src[ch]) : 0u) | (ch + 1 < K ? uint32_t(src[ch + 1]) << 16 : 0u);
    }
  }
}

template <int DT>
__device__ __forceinline__ float chunk_abs(const uint32_t* xv, int i) {
  return fabsf(Act<DT>::to_float(Act<DT>::from_bits(uint16_t(xv[i >> 1] >> (16 * (i & 1))))));
}

// One warp selects the quota of one chunk of one token from its activations xv (load_chunk_x)
// and writes the chosen channels ascending at out[0 ...].
template <int DT>
__device__ void select_chunk(const uint32_t* xv, int K, int chunk, int k_chunk, const float* edges, bool monotone,
                             int* out, int lane) {
  const int c0 = chunk * kChunk;
  const int len = min(kChunk, K - c0);
  const int quota = len == kChunk ? k_chunk : (k_chunk * len) / kChunk;
  if (quota == 0) return;
  const int first = c0 + lane * 32;
  // With non-increasing edges (the normal case) a bucket is found by interpolation, then corrected
  // against the exact fp32 edges (the smallest i with a >= edges[i] within its half); buckets 0..15
  // hold a >= edges[15], 16..31 the rest (edges[31] = 0), NaN goes to 32. Other edges: linear scan.
  const float e0 = edges[0], e15 = edges[15], e16 = edges[16];
  const float inv_hi = e0 > e15 ? 15.f / (e0 - e15) : 0.f;
  const float inv_lo = e16 > 0.f ? 15.f / e16 : 0.f;
  uint8_t bk[32];
  int upper = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const float a = chunk_abs<DT>(xv, i);
    int b;
    if (first + i >= c0 + len) {
      b = kBucketNone;
    } else if (!monotone) {
      b = bucket_of(a, edges);
    } else if (!(a == a)) {
      b = 32;
    } else {
      // guess, one branch-free correction step, then a check; the exact walk only when the guess
      // was off by more than one (fp32 interpolation error is far smaller than a bucket)
      const bool up = a >= e15;
      const int first_b = up ? 0 : 16, last_b = up ? 15 : 31;
      b = up ? min(max(int((e0 - a) * inv_hi), 0), 15) : 31 - min(max(int(a * inv_lo), 0), 15);
      b += (b < last_b && a < edges[b]);
      b -= (b > first_b && a >= edges[b - 1]);
      if (!(a >= edges[b] && (b == first_b || a < edges[b - 1]))) {
        while (b < last_b && a < edges[b]) ++b;
        while (b > first_b && a >= edges[b - 1]) --b;
      }
    }
    bk[i] = uint8_t(b);
    upper += b <= 15;
  }
  // threshold bucket: the smallest b with count(bucket <= b) >= quota (b = 32 always qualifies);
  // the count of buckets 0..15 tells which half it is in
  int lo = 0, hi = 32;
  if (int(__reduce_add_sync(0xffffffffu, unsigned(upper))) >= quota) hi = 15;
  else lo = 16;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    int c = 0;
#pragma unroll
    for (int i = 0; i < 32; ++i) c += bk[i] <= mid;
    if (int(__reduce_add_sync(0xffffffffu, unsigned(c))) >= quota) hi = mid;
    else lo = mid + 1;
  }
  const int tb = lo;
  int less = 0, eq = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    less += bk[i] < tb;
    eq += bk[i] == tb;
  }
  // exclusive prefix over lanes (= over channel order) of both counts, packed (each <= 1024)
  const int packed = less | (eq << 16);
  int incl = packed;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  const int total = __shfl_sync(0xffffffffu, incl, 31);
  const int excl = incl - packed;
  const int room = quota - (total & 0xffff);  // taken from the threshold bucket, lowest index first
  int eq_seen = excl >> 16;
  int pos = (excl & 0xffff) + min(eq_seen, room);
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    if (bk[i] < tb) {
      out[pos++] = first + i;
    } else if (bk[i] == tb) {
      if (eq_seen < room) out[pos++] = first + i;
      ++eq_seen;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// DEC role

template <int DT>
__device__ void dec_block(const GemvParams& p, int d, unsigned char* smem) {
  using A = Act<DT>;
  using T = typename A::T;
  __shared__ float edges[32];
  __shared__ int monotone_flag;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pieces = int(p.res_stride / 16);  // 16 bytes = 32 output channels of a row
  const int p0 = int(int64_t(d) * pieces / p.n_tb), p1 = int(int64_t(d + 1) * pieces / p.n_tb);
  const int np = p1 - p0;
  const int W = int(p.res_stride * 2);
  const int k = p.k_total;
  float* part = reinterpret_cast<float*>(smem);           // [kThreads][kPartStride]
  int* sel = reinterpret_cast<int*>(part + kThreads * kPartStride);  // [k]
  float* base = p.work;
  float* corr = p.work + size_t(p.B) * W;
  const T* x = reinterpret_cast<const T*>(p.x);
  const __half* scales = reinterpret_cast<const __half*>(p.res_scales);

  const int pr_count = min(max(np, 1), kThreads);
  const int groups = kThreads / pr_count;  // thread groups splitting the selected rows
  for (int b = 0; b < p.B; ++b) {
    __syncthreads();  // sel and part are reused per token
    const T* xrow = x + size_t(b) * p.K;
    if (p.channels != nullptr) {
      for (int i = tid; i < k; i += kThreads) sel[i] = int(p.channels[size_t(b) * k + i]);
    } else {
      // the first chunk's activations load while warp 0 computes the edges (one round trip)
      const int chunks = div_up(p.K, kChunk);
      uint32_t xv[16];
      if (warp < chunks) load_chunk_x<DT>(xrow, p.K, warp, lane, xv);
      if (b == 0 && warp == 0) {
        const bool mono = compute_edges(p.envelope, k, edges, lane);
        if (lane == 0) monotone_flag = mono;
      }
      __syncthreads();
      for (int c = warp; c < chunks; c += kWarps) {
        if (c != warp) load_chunk_x<DT>(xrow, p.K, c, lane, xv);
        select_chunk<DT>(xv, p.K, c, p.k_chunk, edges, monotone_flag, sel + c * p.k_chunk, lane);
      }
    }
    __syncthreads();
    for (int pb = 0; pb < np; pb += pr_count) {
      const int npr = min(pr_count, np - pb);
      const int pr = tid % pr_count, grp = tid / pr_count;
      if (pr < npr && grp < groups) {
        float acc[32];
#pragma unroll
        for (int j = 0; j < 32; ++j) acc[j] = 0.f;
        const uint8_t* col = p.residual + size_t(p0 + pb + pr) * 16;
        constexpr int kInFlight = 4;
        for (int i = grp; i < k; i += groups * kInFlight) {
          uint4 v[kInFlight];
          float xs[kInFlight];
#pragma unroll
          for (int u = 0; u < kInFlight; ++u) {
            const int idx = i + u * groups;
            const int c = idx < k ? sel[idx] : -1;
            if (c >= 0 && c < p.K) {
              v[u] = *reinterpret_cast<const uint4*>(col + size_t(c) * p.res_stride);
              xs[u] = A::to_float(xrow[c]);
            } else {
              v[u] = make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);  // nibble 8 = 0
              xs[u] = 0.f;
            }
          }
#pragma unroll
          for (int u = 0; u < kInFlight; ++u) {
#pragma unroll
            for (int j = 0; j < 32; ++j) {
              const uint32_t nib = (word_of(&v[u], j >> 3) >> (4 * (j & 7))) & 0xfu;
              // 2^23 + nib exactly, minus 2^23 + 8: the integer nib - 8 as a float, exactly
              const float r = __int_as_float(0x4B000000 | nib) - 8388616.0f;
              acc[j] = fmaf(xs[u], r, acc[j]);
            }
          }
        }
        float* dst = part + (grp * pr_count + pr) * kPartStride;
#pragma unroll
        for (int j = 0; j < 32; ++j) dst[j] = acc[j];
      }
      __syncthreads();
      for (int it0 = tid; it0 < npr * 32; it0 += 4 * kThreads) {
        float sc[4];  // four scale loads in flight per thread
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int it = it0 + u * kThreads, o = (p0 + pb + (it >> 5)) * 32 + (it & 31);
          sc[u] = it < npr * 32 && o < p.N ? __half2float(scales[o]) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int it = it0 + u * kThreads;
          const int q = it >> 5, j = it & 31, o = (p0 + pb + q) * 32 + j;
          if (it >= npr * 32 || o >= p.N) continue;
          float v = 0.f;
          for (int r = 0; r < groups; ++r) v += part[(r * pr_count + q) * kPartStride + j];
          corr[size_t(b) * W + o] = v * sc[u];
        }
      }
      __syncthreads();
    }
  }
  // merge: the second of (GEMV block, DEC block) to finish a 16-row tile writes it out; the
  // tiles this block must merge are listed first, then all threads merge them together
  __shared__ int n_merge;
  int* merge = sel;  // the selection list is no longer needed
  if (tid == 0) n_merge = 0;
  __threadfence();
  __syncthreads();
  const int tiles = div_up(p.N, kTileRows);
  const int t1 = min(2 * p1, tiles);
  for (int tile = 2 * p0 + tid; tile < t1; tile += kThreads)
    if (atomicAdd(&p.counters[tile], 1) == 1) merge[atomicAdd(&n_merge, 1)] = tile;
  __threadfence();
  __syncthreads();
  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* out = reinterpret_cast<T*>(p.out);
  const int items = n_merge * kTileRows * p.B;
  for (int it0 = tid; it0 < items; it0 += 4 * kThreads) {
    float v[4];
    int dst[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {  // all loads first: four merges in flight per thread
      const int it = it0 + u * kThreads;
      dst[u] = -1;
      if (it >= items) continue;
      const int tile = merge[it / (kTileRows * p.B)];
      const int rest = it % (kTileRows * p.B);
      const int b = rest / kTileRows, row = tile * kTileRows + rest % kTileRows;
      if (row >= p.N) continue;
      v[u] = __ldcg(base + size_t(b) * W + row) + __ldcg(corr + size_t(b) * W + row);
      if (bias != nullptr) v[u] += A::to_float(bias[row]);
      dst[u] = b * p.N + row;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (dst[u] >= 0) out[dst[u]] = A::from_float(v[u]);
  }
  for (int i = tid; i < n_merge; i += kThreads) p.counters[merge[i]] = 0;
}

// ------------------------------------------------------------------------------------------------
// GEMV role: a persistent block walks the 16-row tiles blk, blk + nblk, ...; its 8 warps split K
// into 256-channel tiles (warp w takes w, w + 8, ...), each warp prefetching its next tile (across
// row tiles too) while it computes the current one. The tokens' x is staged once per block in
// shared memory when it fits (row stride padded by 8 halves: conflict-free B-fragment loads).

// Shared-memory bytes of the staged x of B tokens (the host splits larger batches).
__host__ __device__ inline int x_stage_bytes(int B, int K) { return B * (div_up(K, kTileK) * kTileK + 8) * 2; }

// GS: 128 = the group size is 128 (two whole groups per 256-channel tile: no per-step group
// logic); 0 = any multiple of 16 (generic path). Unused for LUT.
template <int FMT, int BITS, int DT, int GS>
__device__ void gemv_block(const GemvParams& p, int blk, int nblk, unsigned char* smem) {
  using A = Act<DT>;
  using T = typename A::T;
  constexpr int J = (BITS == 4 ? 16 : 12) / 4;
  constexpr int Q = 1 << BITS;
  constexpr uint32_t kMagic = A::kMagicBase * 0x10001u;
  __shared__ int s_old;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int KT = div_up(p.K, kTileK);
  const int NT = div_up(p.N, kTileRows);
  const int Npad = NT * kTileRows;
  const int xstride = KT * kTileK + 8;  // halves per staged row
  float* red = reinterpret_cast<float*>(smem);                      // [kWarps][16][8]
  uint32_t* tab = reinterpret_cast<uint32_t*>(red + kWarps * 128);  // LUT: [2][Q][32]
  uint16_t* xs = reinterpret_cast<uint16_t*>(tab + 2 * 16 * 32);    // [B][xstride]
  const uint16_t* xg = reinterpret_cast<const uint16_t*>(p.x);
  // lanes of token columns >= B read token 0: those columns of C are never used
  const uint32_t* xsrow = reinterpret_cast<const uint32_t*>(xs + (g < p.B ? g : 0) * xstride) + t;
  const uint32_t* meta = reinterpret_cast<const uint32_t*>(p.meta);
  const int groups = div_up(p.K, p.group_size);
  const uint4* wall = reinterpret_cast<const uint4*>(p.qweight) + lane;

  uint4 w[J], wn[J];
  uint32_t m[4], mn[4];  // uniform: meta of the tile's first two groups, rows g and g + 8
  auto load = [&](int rt, int kt, uint4* ww, uint32_t* mm) {
    load_tile<BITS>(wall + (size_t(rt) * KT + kt) * J * 32, ww);
    if constexpr (FMT == kUniform) {
      const int row0 = rt * kTileRows + g;
      const int g0 = GS == 128 ? 2 * kt : kt * kTileK / p.group_size;
      const int g1 = min(g0 + 1, groups - 1);
      mm[0] = __ldg(meta + size_t(g0) * Npad + row0);
      mm[1] = __ldg(meta + size_t(g0) * Npad + row0 + 8);
      mm[2] = __ldg(meta + size_t(g1) * Npad + row0);
      mm[3] = __ldg(meta + size_t(g1) * Npad + row0 + 8);
    }
  };
  int rt = blk, kt = warp;
  if (rt < NT && kt < KT) load(rt, kt, w, m);
  // stage x (zero-padded to whole tiles) while the first weight loads are in flight; 16-byte
  // copies with four loads in flight per thread where x allows
  if (p.K % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {
    const int per_row = p.K / 8, total = p.B * per_row;
    const uint4* src = reinterpret_cast<const uint4*>(p.x);
    for (int i0 = threadIdx.x; i0 < total; i0 += 4 * kThreads) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kThreads;
        if (i < total) v[u] = __ldg(src + i);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kThreads;
        if (i < total) {
          const int b = i / per_row;
          *reinterpret_cast<uint4*>(xs + b * xstride + (i - b * per_row) * 8) = v[u];
        }
      }
    }
    for (int b = 0; b < p.B; ++b)
      for (int k = p.K + threadIdx.x; k < xstride; k += kThreads) xs[b * xstride + k] = 0;
  } else {
    for (int b = 0; b < p.B; ++b)
      for (int k = threadIdx.x; k < xstride; k += kThreads) xs[b * xstride + k] = k < p.K ? xg[size_t(b) * p.K + k] : 0;
  }
  __syncthreads();

  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* out = reinterpret_cast<T*>(p.out);
  const int W = int(p.res_stride * 2);
  for (; rt < NT; rt += nblk, kt = warp) {
    const int row0 = rt * kTileRows + g;
    if constexpr (FMT == kLUT) {
      const __half* lut = reinterpret_cast<const __half*>(p.meta) + size_t(rt) * kTileRows * Q;
      for (int i = threadIdx.x; i < 2 * Q * 32; i += kThreads) {
        const int l = i & 31, q = (i >> 5) % Q, half_sel = (i >> 5) / Q;
        tab[i] = A::lut_entry(lut[((l >> 2) + 8 * half_sel) * Q + q]);
      }
      __syncthreads();
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (; kt < KT; kt += kWarps) {
      const int nrt = kt + kWarps < KT ? rt : rt + nblk;
      const int nkt = kt + kWarps < KT ? kt + kWarps : warp;
      if (nrt < NT && nkt < KT) load(nrt, nkt, wn, mn);  // prefetch the warp's next tile
      const int kbase = kt * kTileK;
      const uint32_t* xk = xsrow + (kbase >> 1);
      if constexpr (FMT == kUniform && GS == 128) {
        // padding past K has code 0 and x 0 (staged): it adds exact zeros, no checks needed
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint32_t c0 = m[2 * half], c1 = m[2 * half + 1];
          const uint32_t zz0 = (A::kMagicBase + (c0 >> 16)) * 0x10001u;
          const uint32_t zz1 = (A::kMagicBase + (c1 >> 16)) * 0x10001u;
          float tmp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int s = 8 * half; s < 8 * half + 8; ++s) {
            const uint32_t bf[2] = {xk[8 * s], xk[8 * s + 4]};
            uint32_t a[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = A::sub2(code_pair<BITS>(w, s, i) | kMagic, (i & 1) ? zz1 : zz0);
            A::mma(tmp, a, bf);
          }
          const float s0 = __half2float(__ushort_as_half(uint16_t(c0 & 0xffffu)));
          const float s1 = __half2float(__ushort_as_half(uint16_t(c1 & 0xffffu)));
          acc[0] = fmaf(s0, tmp[0], acc[0]);
          acc[1] = fmaf(s0, tmp[1], acc[1]);
          acc[2] = fmaf(s1, tmp[2], acc[2]);
          acc[3] = fmaf(s1, tmp[3], acc[3]);
        }
      } else if constexpr (FMT == kUniform) {
        const int g0 = kbase / p.group_size;
        int grp = g0;
        int rem = kbase - g0 * p.group_size;
        uint32_t c0 = m[0], c1 = m[1];
        uint32_t zz0 = (A::kMagicBase + (c0 >> 16)) * 0x10001u, zz1 = (A::kMagicBase + (c1 >> 16)) * 0x10001u;
        float tmp[4] = {0.f, 0.f, 0.f, 0.f};
        auto flush = [&]() {
          const float s0 = __half2float(__ushort_as_half(uint16_t(c0 & 0xffffu)));
          const float s1 = __half2float(__ushort_as_half(uint16_t(c1 & 0xffffu)));
          acc[0] = fmaf(s0, tmp[0], acc[0]);
          acc[1] = fmaf(s0, tmp[1], acc[1]);
          acc[2] = fmaf(s1, tmp[2], acc[2]);
          acc[3] = fmaf(s1, tmp[3], acc[3]);
          tmp[0] = tmp[1] = tmp[2] = tmp[3] = 0.f;
        };
#pragma unroll
        for (int s = 0; s < kKSteps; ++s) {
          if (kbase + 16 * s >= p.K) break;  // padding: no codes, and no meta for groups past K
          if (s > 0 && rem == 0) {           // a new group starts at this k-step
            flush();
            ++grp;
            if (grp == g0 + 1) {
              c0 = m[2];
              c1 = m[3];
            } else {
              c0 = __ldg(meta + size_t(grp) * Npad + row0);
              c1 = __ldg(meta + size_t(grp) * Npad + row0 + 8);
            }
            zz0 = (A::kMagicBase + (c0 >> 16)) * 0x10001u;
            zz1 = (A::kMagicBase + (c1 >> 16)) * 0x10001u;
          }
          const uint32_t bf[2] = {xk[8 * s], xk[8 * s + 4]};
          uint32_t a[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = A::sub2(code_pair<BITS>(w, s, i) | kMagic, (i & 1) ? zz1 : zz0);
          A::mma(tmp, a, bf);
          rem += 16;
          if (rem == p.group_size) rem = 0;
        }
        flush();
      } else {
        const uint32_t* tl = tab + lane;
#pragma unroll
        for (int s = 0; s < kKSteps; ++s) {
          const uint32_t bf[2] = {xk[8 * s], xk[8 * s + 4]};
          uint32_t a[4], alo[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t pair = code_pair<BITS>(w, s, i);
            const uint32_t* ti = tl + (i & 1) * Q * 32;
            const uint32_t e0 = ti[(pair & 0xffffu) * 32];
            const uint32_t e1 = ti[(pair >> 16) * 32];
            a[i] = __byte_perm(e0, e1, 0x5410);
            if constexpr (DT == kBFloat16) alo[i] = __byte_perm(e0, e1, 0x7632);
          }
          A::mma(acc, a, bf);
          if constexpr (DT == kBFloat16) A::mma(acc, alo, bf);
        }
      }
#pragma unroll
      for (int j = 0; j < J; ++j) w[j] = wn[j];
#pragma unroll
      for (int j = 0; j < 4; ++j) m[j] = mn[j];
    }

    // fixed-order reduction over the warps; C fragment: rows g, g + 8, token columns 2t, 2t + 1
    red[(warp * 16 + g) * 8 + 2 * t] = acc[0];
    red[(warp * 16 + g) * 8 + 2 * t + 1] = acc[1];
    red[(warp * 16 + g + 8) * 8 + 2 * t] = acc[2];
    red[(warp * 16 + g + 8) * 8 + 2 * t + 1] = acc[3];
    __syncthreads();
    const int r = threadIdx.x >> 3, n = threadIdx.x & 7;
    const int row = rt * kTileRows + r;
    const bool owner = threadIdx.x < 128 && n < p.B && row < p.N;
    float v = 0.f;
    if (threadIdx.x < 128) {
#pragma unroll
      for (int k = 0; k < kWarps; ++k) v += red[(k * 16 + r) * 8 + n];
    }
    if (p.n_tb == 0) {
      if (owner) out[size_t(n) * p.N + row] = A::from_float(bias != nullptr ? v + A::to_float(bias[row]) : v);
    } else {
      if (owner) p.work[size_t(n) * W + row] = v;
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) s_old = atomicAdd(&p.counters[rt], 1);
      __syncthreads();
      if (s_old == 1) {  // the DEC block finished this tile first: merge here
        __threadfence();
        if (owner) {
          float y = v + __ldcg(p.work + size_t(p.B) * W + size_t(n) * W + row);
          if (bias != nullptr) y += A::to_float(bias[row]);
          out[size_t(n) * p.N + row] = A::from_float(y);
        }
        if (threadIdx.x == 0) p.counters[rt] = 0;
      }
    }
    __syncthreads();  // red, tab and s_old are reused by the next row tile
  }
}

// DEC = false: the plain GEMV (n_tb == 0), compiled without the DEC role, whose registers would
// otherwise cap the occupancy of every GEMV block.
template <int FMT, int BITS, int DT, int GS, bool DEC>
__global__ void __launch_bounds__(kThreads, DEC ? 2 : 3) gemv_kernel(const GemvParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  if constexpr (DEC) {
    if (int(blockIdx.x) < p.n_tb) {
      dec_block<DT>(p, blockIdx.x, smem);
      return;
    }
  }
  gemv_block<FMT, BITS, DT, GS>(p, blockIdx.x - p.n_tb, gridDim.x - p.n_tb, smem);
}

// ------------------------------------------------------------------------------------------------
// Dequantization (prefill) and standalone selection

constexpr int kDequantWarps = 4;

// One warp per 16 x 256 tile: decoded into shared memory, then written out row by row with
// coalesced 16-byte stores.
template <int FMT, int BITS, int DT>
__global__ void __launch_bounds__(kDequantWarps * 32) dequantize_kernel(const uint4* qweight, const void* meta_ptr,
                                                                         int group_size, int N, int K,
                                                                         typename Act<DT>::T* out) {
  using A = Act<DT>;
  using T = typename A::T;
  constexpr int J = (BITS == 4 ? 16 : 12) / 4;
  constexpr int Q = 1 << BITS;
  constexpr int kRow = kTileK + 8;  // padded shared row (halves)
  __shared__ __align__(16) T tile[kDequantWarps][kTileRows][kRow];
  const int KT = div_up(K, kTileK);
  const int Npad = div_up(N, kTileRows) * kTileRows;
  const int warp = threadIdx.x >> 5;
  const int kt = blockIdx.x * kDequantWarps + warp;
  const int rt = blockIdx.y;
  if (kt >= KT) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint4 w[J];
  load_tile<BITS>(qweight + (size_t(rt) * KT + kt) * J * 32 + lane, w);
  T(*sm)[kRow] = tile[warp];
#pragma unroll
  for (int s = 0; s < kKSteps; ++s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t pair = code_pair<BITS>(w, s, i);
      const int r = g + 8 * (i & 1);
      const int row = min(rt * kTileRows + r, N - 1);  // padding rows: any valid meta, never written
      const int kl = 16 * s + 8 * (i >> 1) + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int q = int(h ? pair >> 16 : pair & 0xffffu);
        const int k = min(kt * kTileK + kl + h, K - 1);
        float v;
        if constexpr (FMT == kUniform) {
          const uint32_t mm = reinterpret_cast<const uint32_t*>(meta_ptr)[size_t(k / group_size) * Npad + row];
          v = float(q - int(mm >> 16)) * __half2float(__ushort_as_half(uint16_t(mm & 0xffffu)));
        } else {
          v = __half2float(reinterpret_cast<const __half*>(meta_ptr)[size_t(row) * Q + q]);
        }
        sm[r][kl + h] = A::from_float(v);
      }
    }
  }
  __syncwarp();
  const int k0 = kt * kTileK;
  const bool full = k0 + kTileK <= K && K % 8 == 0;
  for (int r = 0; r < kTileRows; ++r) {
    const int row = rt * kTileRows + r;
    if (row >= N) break;
    T* dst = out + size_t(row) * K + k0;
    if (full) {
      reinterpret_cast<uint4*>(dst)[lane] = reinterpret_cast<const uint4*>(sm[r])[lane];
    } else {
      for (int k = lane; k < kTileK && k0 + k < K; k += 32) dst[k] = sm[r][k];
    }
  }
}

template <int DT>
__global__ void select_kernel(const typename Act<DT>::T* x, int K, const float* envelope, int k_chunk, int k_total,
                              int64_t* out) {
  __shared__ float edges[32];
  __shared__ int sel[kChunk];
  const int lane = threadIdx.x;
  const int chunk = blockIdx.x, token = blockIdx.y;
  uint32_t xv[16];
  load_chunk_x<DT>(x + size_t(token) * K, K, chunk, lane, xv);
  const bool mono = compute_edges(envelope, k_total, edges, lane);
  __syncwarp();
  const int c0 = chunk * kChunk;
  const int len = min(kChunk, K - c0);
  const int quota = len == kChunk ? k_chunk : (k_chunk * len) / kChunk;
  select_chunk<DT>(xv, K, chunk, k_chunk, edges, mono, sel, lane);
  __syncwarp();
  for (int i = lane; i < quota; i += 32) out[size_t(token) * k_total + chunk * k_chunk + i] = sel[i];
}

}  // namespace

int padded_rows(int N) { return div_up(N, kTileRows) * kTileRows; }
int k_tiles(int K) { return div_up(K, kTileK); }
int tile_words(int bits) { return bits == 4 ? 16 : 12; }

size_t gemv_smem_bytes(const GemvParams& p) {
  const size_t gemv = kWarps * 128 * sizeof(float) + 2 * 16 * 32 * sizeof(uint32_t) + x_stage_bytes(p.B, p.K);
  if (p.n_tb == 0) return gemv;
  // the selection list, reused afterwards as the list of tiles the block merges
  const int list = max(p.k_total, 2 * div_up(int(p.res_stride / 16), max(p.n_tb, 1)));
  const size_t dec = size_t(kThreads) * kPartStride * sizeof(float) + size_t(list) * sizeof(int);
  return dec > gemv ? dec : gemv;
}

// Blocks of this kernel that fit on the GPU at once with `smem` bytes each (cached per size).
template <typename Kernel>
static int resident_blocks(Kernel kernel, size_t smem) {
  static int sms = 0;
  static size_t cached_smem = ~size_t(0);
  static int cached = 0;
  if (sms == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  }
  if (smem != cached_smem) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess) per_sm = 1;
    cached = max(per_sm, 1) * sms;
    cached_smem = smem;
  }
  return cached;
}

template <int FMT, int BITS, int DT, int GS, bool DEC>
static cudaError_t launch_gemv_t(const GemvParams& p, cudaStream_t stream) {
  auto kernel = gemv_kernel<FMT, BITS, DT, GS, DEC>;
  const size_t smem = gemv_smem_bytes(p);
  static size_t opted_in = 48 * 1024;
  if (smem > opted_in) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    opted_in = smem;
  }
  // persistent GEMV blocks beside the DEC blocks, all resident together
  const int gemv_blocks = max(1, min(div_up(p.N, kTileRows), resident_blocks(kernel, smem) - p.n_tb));
  kernel<<<p.n_tb + gemv_blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int FMT, int BITS, int DT>
static cudaError_t launch_gemv_gs(const GemvParams& p, cudaStream_t stream) {
  constexpr int GS = FMT == kUniform ? 128 : 0;
  if (GS == 128 && p.group_size == 128) {
    return p.n_tb > 0 ? launch_gemv_t<FMT, BITS, DT, GS, true>(p, stream)
                      : launch_gemv_t<FMT, BITS, DT, GS, false>(p, stream);
  }
  return p.n_tb > 0 ? launch_gemv_t<FMT, BITS, DT, 0, true>(p, stream) : launch_gemv_t<FMT, BITS, DT, 0, false>(p, stream);
}

int max_stage_batch(int K) {
  const int per_token = x_stage_bytes(1, K);
  return per_token > kMaxStageBytes ? 0 : min(kMaxBatch, kMaxStageBytes / per_token);
}

cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.B < 1 || p.B > max_stage_batch(p.K)) return cudaErrorInvalidValue;  // the caller splits batches
  const int key = p.fmt * 100 + p.bits * 10 + p.dtype;
  switch (key) {
    case 30: return launch_gemv_gs<kUniform, 3, kHalf>(p, stream);
    case 31: return launch_gemv_gs<kUniform, 3, kBFloat16>(p, stream);
    case 40: return launch_gemv_gs<kUniform, 4, kHalf>(p, stream);
    case 41: return launch_gemv_gs<kUniform, 4, kBFloat16>(p, stream);
    case 130: return launch_gemv_gs<kLUT, 3, kHalf>(p, stream);
    case 131: return launch_gemv_gs<kLUT, 3, kBFloat16>(p, stream);
    case 140: return launch_gemv_gs<kLUT, 4, kHalf>(p, stream);
    case 141: return launch_gemv_gs<kLUT, 4, kBFloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int FMT, int BITS, int DT>
static cudaError_t launch_dequantize_t(const void* qweight, const void* meta, int group_size, int N, int K, void* out,
                                       cudaStream_t stream) {
  const dim3 grid(div_up(div_up(K, kTileK), kDequantWarps), div_up(N, kTileRows));
  dequantize_kernel<FMT, BITS, DT><<<grid, kDequantWarps * 32, 0, stream>>>(
      reinterpret_cast<const uint4*>(qweight), meta, group_size, N, K, reinterpret_cast<typename Act<DT>::T*>(out));
  return cudaGetLastError();
}

cudaError_t launch_dequantize(const void* qweight, const void* meta, int fmt, int bits, int dtype, int group_size,
                              int N, int K, void* out, cudaStream_t stream) {
  const int key = fmt * 100 + bits * 10 + dtype;
  switch (key) {
    case 30: return launch_dequantize_t<kUniform, 3, kHalf>(qweight, meta, group_size, N, K, out, stream);
    case 31: return launch_dequantize_t<kUniform, 3, kBFloat16>(qweight, meta, group_size, N, K, out, stream);
    case 40: return launch_dequantize_t<kUniform, 4, kHalf>(qweight, meta, group_size, N, K, out, stream);
    case 41: return launch_dequantize_t<kUniform, 4, kBFloat16>(qweight, meta, group_size, N, K, out, stream);
    case 130: return launch_dequantize_t<kLUT, 3, kHalf>(qweight, meta, group_size, N, K, out, stream);
    case 131: return launch_dequantize_t<kLUT, 3, kBFloat16>(qweight, meta, group_size, N, K, out, stream);
    case 140: return launch_dequantize_t<kLUT, 4, kHalf>(qweight, meta, group_size, N, K, out, stream);
    case 141: return launch_dequantize_t<kLUT, 4, kBFloat16>(qweight, meta, group_size, N, K, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_select(const void* x, int dtype, int T, int K, const float* envelope, int k_chunk, int k_total,
                          int64_t* out, cudaStream_t stream) {
  if (T == 0 || k_total == 0) return cudaSuccess;
  const dim3 grid(div_up(K, kChunk), T);
  if (dtype == kHalf) {
    select_kernel<kHalf><<<grid, 32, 0, stream>>>(reinterpret_cast<const __half*>(x), K, envelope, k_chunk, k_total, out);
  } else {
    select_kernel<kBFloat16><<<grid, 32, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x), K, envelope, k_chunk,
                                                       k_total, out);
  }
  return cudaGetLastError();
}

}  // namespace decdec
