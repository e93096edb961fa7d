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
// - the merge happens in the GEMV block: a DEC block stores each fp32 correction together with a
//   ready tag in one 8-byte word of a mailbox; the GEMV block owning that output (which read the
//   word when it started the tile) writes out = (base + correction) + bias, clears the word, and
//   if the tag was not there yet, does so after its next tile (or at its end), waiting only then.
//   No fences and no atomics on either side; every output is one fixed sum of fixed-order sums,
//   so results are bitwise reproducible.
//   GEMV blocks may wait on DEC blocks, never the reverse; the DEC blocks have the lowest indices
//   and the grid is at most one resident wave, so they are running whenever anyone waits.
// Launched dependent (dependent_launch.cuh), a block requests its first weight tile before it
// waits for the kernel before it; the DEC role waits first.
#include "decdec_kernels.h"
#include "dependent_launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <string>

namespace decdec {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKSteps = kTileK / 16;
constexpr int kPartStride = 33;  // floats per partial row of 32 (padding avoids bank conflicts)

__host__ __device__ inline int div_up(int a, int b) { return (a + b - 1) / b; }

template <int DT>
struct Act;

template <>
struct Act<kHalf> {
  using T = __half;
  using T2 = __half2;
  static constexpr uint32_t kMagicBase = 0x6400u;  // fp16 1024: 1024 + q is exact for q < 1024
  // the smallest fp16 >= f, as bits
  __device__ static uint32_t round_up_bits(float f) { return __half_as_ushort(__float2half_ru(f)); }
  __device__ static float to_float(T v) { return __half2float(v); }
  __device__ static T from_bits(uint16_t b) { return __ushort_as_half(b); }
  __device__ static T from_float(float f) { return __float2half_rn(f); }
  // 2^-p in both halves
  __host__ __device__ static constexpr uint32_t pow2_neg(int p) { return uint32_t(15 - p) << 10 | uint32_t(15 - p) << 26; }
  __device__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
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
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagicBase = 0x4300u;  // bf16 128: 128 + q is exact for q < 128
  __device__ static uint32_t round_up_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_ru(f)); }
  __device__ static float to_float(T v) { return __bfloat162float(v); }
  __device__ static T from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
  __device__ static T from_float(float f) { return __float2bfloat16_rn(f); }
  __host__ __device__ static constexpr uint32_t pow2_neg(int p) { return uint32_t(127 - p) << 7 | uint32_t(127 - p) << 23; }
  __device__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
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

// Where the two codes of A-fragment register i (0..3) at k-step s live (layout: decdec_kernels.h):
// at bit `bit` of both 16-bit halves of the lane's word `word`; bit < 0 marks the 3-bit spare pair,
// whose bit b sits at bits 15 and 31 of word `word` + b. Register i holds row g + 8 (i & 1),
// channels 4 t + 2 (i >> 1) + {0, 1} of the k-step. Folded at compile time (the loops unroll).
struct Slot {
  int word, bit;
};

template <int BITS>
__device__ __forceinline__ constexpr Slot slot_of(int s, int i) {
  if (BITS == 4) return {s, 4 * i};
  const int j = 4 * (s & 3) + i;  // pair j of the three words holding k-steps 4m .. 4m + 3
  return j < 15 ? Slot{3 * (s >> 2) + j / 5, 3 * (j % 5)} : Slot{3 * (s >> 2), -1};
}

// Any three-input bitwise function in one LOP3, kLut being its truth table on a = 0xf0, b = 0xcc,
// c = 0xaa. nvcc splits (a & b) | c into two instructions when b and c are both constants.
template <uint32_t kLut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
}
constexpr uint32_t kAndOr = 0xea;  // (a & b) | c
constexpr uint32_t kOrXor = 0x56;  // (a | b) ^ c

// The 3-bit spare pair at bits 0..2 of each half, ORed into `into`.
__device__ __forceinline__ uint32_t spare_pair(const uint4* w, int word, uint32_t into = 0) {
  uint32_t v = lop3<kAndOr>(word_of(w, word) >> 15, 0x00010001u, into);
  v = lop3<kAndOr>(word_of(w, word + 1) >> 14, 0x00020002u, v);
  return lop3<kAndOr>(word_of(w, word + 2) >> 13, 0x00040004u, v);
}

// Codes of register i at k-step s as two 16-bit integers (LUT indices, dequantization).
template <int BITS>
__device__ __forceinline__ uint32_t code_pair(const uint4* w, int s, int i) {
  const Slot at = slot_of<BITS>(s, i);
  if (at.bit < 0) return spare_pair(w, at.word);
  return (word_of(w, at.word) >> at.bit) & (((1u << BITS) - 1) * 0x10001u);
}

// Uniform codes straight to (q - z) in the activation dtype, two per register: one LOP3 ORs the code,
// still at bit p of each half, into the mantissa of the magic number M (fp16 1024, bf16 128), which
// gives M + q 2^p exactly; one HFMA2 with 2^-p and -(M 2^-p + z) then gives q - z exactly (small
// integers). The code must lie inside the mantissa (p <= mantissa bits - BITS), so slots above that
// are shifted down first, one shift serving kPerShift slots (fp16 3-bit: bits 0, 3, 6, then 9, 12).
template <int BITS, int DT>
struct UniformDecoder {
  static constexpr int kMantissa = DT == kHalf ? 10 : 7, kExpBias = DT == kHalf ? 15 : 127;
  static constexpr int kPerShift = (kMantissa - BITS) / BITS + 1;
  static constexpr int kSpan = kPerShift * BITS;
  static constexpr int kM = DT == kHalf ? 1024 : 128;
  static constexpr uint32_t kMagic = Act<DT>::kMagicBase * 0x10001u;
  static constexpr uint32_t kMask = ((1u << BITS) - 1) * 0x10001u;
  uint32_t offset[2][kPerShift];  // -(M 2^-p + z) for p = 0, BITS, ...; rows g and g + 8

  // the small positive integer v (< 2^(kMantissa + 1)) in the activation dtype, as bits
  __host__ __device__ static constexpr uint32_t int_bits(int v) {
    int e = 0;
    while ((v >> (e + 1)) != 0) ++e;
    return uint32_t(e + kExpBias) << kMantissa | uint32_t(v - (1 << e)) << (kMantissa - e);
  }

  // meta: a uniform meta word (scale | zero << 16)
  __device__ __forceinline__ void set_zero(int rh, uint32_t meta) {
    // z | M is M + z exactly and the sign bit negates it; the other offsets add M - M 2^-p to it,
    // exactly (all are small integers)
    offset[rh][0] = lop3<kOrXor>(__byte_perm(meta, 0, 0x3232), kMagic, 0x80008000u);
#pragma unroll
    for (int k = 1; k < kPerShift; ++k)
      offset[rh][k] = Act<DT>::fma2(offset[rh][0], Act<DT>::pow2_neg(0), int_bits(kM - (kM >> (k * BITS))) * 0x10001u);
  }

  __device__ __forceinline__ uint32_t pair(const uint4* w, int s, int i) const {
    const Slot at = slot_of<BITS>(s, i);
    const int base = at.bit < 0 ? 0 : at.bit / kSpan * kSpan;
    const int p = at.bit < 0 ? 0 : at.bit - base;
    const uint32_t v = at.bit < 0 ? spare_pair(w, at.word, kMagic)
                                  : lop3<kAndOr>(word_of(w, at.word) >> base, kMask << p, kMagic);
    return Act<DT>::fma2(v, Act<DT>::pow2_neg(p), offset[i & 1][p / BITS]);
  }
};

template <int BITS>
__device__ __forceinline__ void load_tile(const uint4* tile, uint4* w) {
  constexpr int J = (BITS == 4 ? 16 : 12) / 4;
#pragma unroll
  for (int j = 0; j < J; ++j) w[j] = load_stream(tile + j * 32);
}

// ------------------------------------------------------------------------------------------------
// Selection (shared by the DEC role and the standalone kernel)

// Two values of the activation dtype per uint32, compared and summed with the packed intrinsics.
template <int DT>
__device__ __forceinline__ typename Act<DT>::T2 as_pair(uint32_t v) {
  typename Act<DT>::T2 pair;
  memcpy(&pair, &v, 4);
  return pair;
}

template <typename T2>
__device__ __forceinline__ uint32_t pair_bits(T2 pair) {
  uint32_t v;
  memcpy(&v, &pair, 4);
  return v;
}

// per half: 1.0 where a >= b (0 if either is NaN)
template <int DT>
__device__ __forceinline__ uint32_t ge2(uint32_t a, uint32_t b) { return pair_bits(__hge2(as_pair<DT>(a), as_pair<DT>(b))); }

// per half: a + b
template <int DT>
__device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) { return pair_bits(__hadd2(as_pair<DT>(a), as_pair<DT>(b))); }

// per half: 0xffff where a >= b
template <int DT>
__device__ __forceinline__ uint32_t ge2_mask(uint32_t a, uint32_t b) {
  return __hge2_mask(as_pair<DT>(a), as_pair<DT>(b));
}

// per half: the larger of a and b, or the one that is not NaN
template <int DT>
__device__ __forceinline__ uint32_t max2(uint32_t a, uint32_t b) { return pair_bits(__hmax2(as_pair<DT>(a), as_pair<DT>(b))); }

// The selection compares |x| in the activation dtype, two channels per instruction: for |x| in
// that dtype and an fp32 bucket edge e >= 0, |x| >= e exactly when |x| >= e rounded up to the dtype.
// NaN compares false with everything, so a NaN |x| (and a channel past the end of a partial chunk,
// loaded as NaN) is >= no edge, and a NaN edge holds for no |x|. Since a bucket is "the smallest i
// with |x| >= edges[i]", bucket <= b exactly when |x| >= min(edges[0..b]): with those running
// minima as edges, every count the selection needs is a count of |x| >= edge.
constexpr uint32_t kNaN16 = 0x7fffu;  // NaN in fp16 and in bf16; as bits, above every non-NaN |x|

// Edge `lane` of DESIGN.md's buckets (both halves) for the envelope values b_hi = envelope[0] and
// b_lo = envelope[k_total - 1], computed in fp32 exactly as selection.bucket_edges does (IEEE
// operations, immune to fast-math); a whole warp calls it and keeps edge i in lane i.
template <int DT>
__device__ uint32_t lane_edge(float bhi, float blo, int lane) {
  const float e = lane < 16 ? __fsub_rn(bhi, __fdiv_rn(__fmul_rn(__fsub_rn(bhi, blo), float(lane)), 15.0f))
                            : __fdiv_rn(__fmul_rn(blo, float(31 - lane)), 16.0f);
  // every |x| >= 0 is >= an edge e <= 0, as it is >= 0; non-negative floats order like their bits
  uint32_t bits = e != e ? kNaN16 : Act<DT>::round_up_bits(e > 0.f ? e : 0.f);
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {  // running minimum over lanes 0..lane (NaN only if all are)
    const uint32_t prev = __shfl_up_sync(0xffffffffu, bits, d);
    if (lane >= d) bits = min(bits, prev);
  }
  return bits * 0x10001u;
}

// One warp loads |x| of one chunk: lane l holds channels chunk * 1024 + 32 l + i, i = 0..31, as 16
// pairs (NaN past the end of x); four 16-byte loads per lane where x allows.
template <int DT>
__device__ __forceinline__ void load_chunk_abs(const typename Act<DT>::T* xrow, int K, int chunk, int lane,
                                               uint32_t* xa) {
  const int first = chunk * kChunk + lane * 32;
  if (K % 8 == 0 && reinterpret_cast<uintptr_t>(xrow) % 16 == 0 && first + 32 <= K) {
    const uint4* src = reinterpret_cast<const uint4*>(xrow + first);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint4 v = __ldg(src + j);
      xa[4 * j] = v.x;
      xa[4 * j + 1] = v.y;
      xa[4 * j + 2] = v.z;
      xa[4 * j + 3] = v.w;
    }
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xrow);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int ch = first + 2 * j;
      xa[j] = (ch < K ? uint32_t(src[ch]) : kNaN16) | (ch + 1 < K ? uint32_t(src[ch + 1]) : kNaN16) << 16;
    }
  }
#pragma unroll
  for (int j = 0; j < 16; ++j) xa[j] &= 0x7fff7fffu;
}

// How many of the warp's |x| are >= edge.
template <int DT>
__device__ __forceinline__ int count_ge(const uint32_t* xa, uint32_t edge) {
  using A = Act<DT>;
  uint32_t c[4] = {0u, 0u, 0u, 0u};  // per half, exact small integers; four independent chains
#pragma unroll
  for (int j = 0; j < 16; ++j) c[j & 3] = add2<DT>(c[j & 3], ge2<DT>(xa[j], edge));
  const uint32_t t = add2<DT>(add2<DT>(c[0], c[1]), add2<DT>(c[2], c[3]));
  const int lane_count = int(A::to_float(A::from_bits(uint16_t(t))) + A::to_float(A::from_bits(uint16_t(t >> 16))));
  return int(__reduce_add_sync(0xffffffffu, unsigned(lane_count)));
}

// Bit i set where the lane's |x| i is >= edge.
template <int DT>
__device__ __forceinline__ uint32_t mask_ge(const uint32_t* xa, uint32_t edge) {
  uint32_t m[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t t = ge2_mask<DT>(xa[j], edge);
    m[j & 3] |= ((t & 1u) | ((t >> 15) & 2u)) << (2 * j);
  }
  return (m[0] | m[1]) | (m[2] | m[3]);
}

// Channels chunk `chunk` of a K-channel input takes: k_chunk, or floor(k_chunk * L / 1024) for a last
// partial chunk of length L.
__device__ __forceinline__ int chunk_quota(int K, int chunk, int k_chunk) {
  const int len = min(kChunk, K - chunk * kChunk);
  return len == kChunk ? k_chunk : (k_chunk * len) / kChunk;
}

// The bucket of the warp's largest |x| (32 when all are NaN): the smallest b with count(bucket <=
// b) >= 1, found from the maximum with one comparison per lane (lane i holds edge i).
template <int DT>
__device__ __forceinline__ int top_bucket(const uint32_t* xa, uint32_t edge) {
  uint32_t m[2] = {xa[0], xa[1]};
#pragma unroll
  for (int j = 2; j < 16; ++j) m[j & 1] = max2<DT>(m[j & 1], xa[j]);
  uint32_t v = max2<DT>(m[0], m[1]);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = max2<DT>(v, __shfl_xor_sync(0xffffffffu, v, d));
  v = max2<DT>(v, __byte_perm(v, 0, 0x1032));  // both halves: the maximum
  const unsigned at_least = __ballot_sync(0xffffffffu, ge2_mask<DT>(v, edge) != 0);  // lanes b >= top bucket
  return at_least ? __ffs(int(at_least)) - 1 : 32;
}

// One warp selects the quota of one chunk of one token from |x| (load_chunk_abs): DESIGN.md's
// rule, from counts only. The threshold bucket tb is the smallest b with count(bucket <= b) >=
// quota (b = 32, which holds NaN, always qualifies); every channel of a bucket < tb is taken, then
// those of bucket tb, lowest index first. Returns the lane's taken channels as bits (bit i: channel
// chunk * 1024 + 32 lane + i); *pos is the rank of its first one among the chunk's taken channels.
// tb is at least the top bucket, and is it for a quota of 1; past it the search gallops (the top,
// +2, +6, +14, ...), since small quotas end a few buckets past the top, then bisects.
template <int DT>
__device__ uint32_t take_mask(const uint32_t* xa, int K, int chunk, int quota, uint32_t edge, int lane, int* pos) {
  auto edges = [edge](int i) { return __shfl_sync(0xffffffffu, edge, i); };  // edge i is in lane i
  const int c0 = chunk * kChunk;
  const int len = min(kChunk, K - c0);
  const int first = c0 + lane * 32;
  const int top = top_bucket<DT>(xa, edge);
  int lo = top, hi = quota > 1 ? 32 : top;
  for (int width = 1; lo < hi; width *= 2) {
    const int probe = min(lo + width - 1, hi - 1);
    if (count_ge<DT>(xa, edges(probe)) >= quota) {
      hi = probe;
      break;
    }
    lo = probe + 1;
  }
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (count_ge<DT>(xa, edges(mid)) >= quota) hi = mid;
    else lo = mid + 1;
  }
  const int tb = lo;
  const int valid = min(max(c0 + len - first, 0), 32);  // channels of this lane inside the chunk
  const uint32_t in_chunk = valid == 32 ? ~0u : (1u << valid) - 1;
  const uint32_t below = tb > top ? mask_ge<DT>(xa, edges(tb - 1)) : 0u;           // bucket < tb
  const uint32_t at = (tb < 32 ? mask_ge<DT>(xa, edges(tb)) : in_chunk) & ~below;  // bucket == tb
  // exclusive prefix over lanes (= over channel order) of both counts, packed (each <= 1024)
  const int packed = __popc(below) | (__popc(at) << 16);
  int incl = packed;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  const int excl = incl - packed;
  const int room = quota - (__shfl_sync(0xffffffffu, incl, 31) & 0xffff);  // > 0 by the choice of tb
  const int at_before = excl >> 16;
  uint32_t take = below;
  uint32_t rest = at;
  for (int n = room - at_before; n > 0 && rest != 0; --n) {  // this lane's share of bucket tb
    take |= rest & (0u - rest);
    rest &= rest - 1;
  }
  *pos = (excl & 0xffff) + min(at_before, room);
  return take;
}

// The chunk's quota of channels, ascending, at out[0 ...] (the whole warp calls it).
template <int DT>
__device__ void select_chunk(const uint32_t* xa, int K, int chunk, int k_chunk, uint32_t edge, int* out, int lane) {
  const int quota = chunk_quota(K, chunk, k_chunk);
  if (quota == 0) return;
  int pos;
  uint32_t take = take_mask<DT>(xa, K, chunk, quota, edge, lane, &pos);
  const int first = chunk * kChunk + lane * 32;
  for (; take != 0; take &= take - 1) out[pos++] = first + __ffs(int(take)) - 1;
}

// The mailbox word protocol (decdec_kernels.h): relaxed, gpu-scope 8-byte accesses, single-copy
// atomic, so a reader sees either the old word or the whole new one.
constexpr unsigned long long kReady = 1ull << 32;

__device__ __forceinline__ unsigned long long load_relaxed(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_relaxed(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The correction in a mailbox slot (word: the slot as last read), waiting for its tag if needed;
// clears the slot for the next call.
__device__ __forceinline__ float take_correction(unsigned long long* slot, unsigned long long word) {
  while (!(word & kReady)) {
    __nanosleep(100);  // leave the issue slots to DEC warps that may share this SM
    word = load_relaxed(slot);
  }
  store_relaxed(slot, 0);
  return __uint_as_float(uint32_t(word));
}

// ------------------------------------------------------------------------------------------------
// DEC role

// Chunks of x (2 KB each) a DEC block can stage ahead of its later selection rounds, in the
// partial sums' space.
constexpr int kStagedChunks = kThreads * kPartStride * 4 / (kChunk * 2);

template <int DT>
__device__ void dec_block(const GemvParams& p, int d, unsigned char* smem) {
  using A = Act<DT>;
  using T = typename A::T;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pieces = int(p.res_stride / 16);  // 16 bytes = 32 output channels of a row
  const int p0 = int(int64_t(d) * pieces / p.n_tb), p1 = int(int64_t(d + 1) * pieces / p.n_tb);
  const int np = p1 - p0;
  const int k = p.k_total;
  float* part = reinterpret_cast<float*>(smem);                       // [kThreads][kPartStride]
  __half* pass_scales = reinterpret_cast<__half*>(part + kThreads * kPartStride);  // [kThreads * 32]
  int* sel = reinterpret_cast<int*>(pass_scales + kThreads * 32);                // [k]
  const T* x = reinterpret_cast<const T*>(p.x);
  const __half* scales = reinterpret_cast<const __half*>(p.res_scales);

  const int pr_count = min(max(np, 1), kThreads);
  const int groups = kThreads / pr_count;  // thread groups splitting the selected rows
  // The scales of a pass (pr_count pieces of 32 outputs) are copied to shared memory
  // asynchronously: the first pass's while the block selects, so they are there when needed.
  // Scales in mapped host memory take plain 16-byte loads instead (read once per call, like the
  // rows): whether cp.async may read host memory is not documented.
  auto stage_scales = [&](int pb) {
    const int first = (p0 + pb) * 32, count = min(min(pr_count, np - pb) * 32, p.N - first);
    for (int i = tid; i * 8 < count; i += kThreads) {
      if (i * 8 + 8 <= count) {
        if (p.res_scales_on_host) {
          *reinterpret_cast<uint4*>(pass_scales + i * 8) = *reinterpret_cast<const uint4*>(scales + first + i * 8);
        } else {
          const unsigned dst = unsigned(__cvta_generic_to_shared(pass_scales + i * 8));
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(scales + first + i * 8));
        }
      } else {
        for (int j = i * 8; j < count; ++j) pass_scales[j] = scales[first + j];
      }
    }
  };
  if (np > 0) stage_scales(0);
  // every warp keeps the bucket edges in its lanes; the envelope loads fly with the first x loads
  const bool selecting = p.channels == nullptr;
  const float env_hi = selecting ? __ldg(p.envelope) : 0.f, env_lo = selecting ? __ldg(p.envelope + k - 1) : 0.f;
  uint32_t edge = 0;
  for (int b = 0; b < p.B; ++b) {
    __syncthreads();  // sel and part are reused per token
    const T* xrow = x + size_t(b) * p.K;
    if (!selecting) {
      for (int i = tid; i < k; i += kThreads) sel[i] = int(p.channels[size_t(b) * k + i]);
    } else {
      const int chunks = div_up(p.K, kChunk);
      // x of the chunks after the first round goes to shared memory now (the partial sums' space,
      // free until the fetch), each lane copying the 64 bytes it will read: a later round then
      // does not wait for its x under the GEMV's memory traffic
      const bool stage_x = chunks > kWarps && p.K % 8 == 0 && reinterpret_cast<uintptr_t>(xrow) % 16 == 0;
      uint4* x_staged = reinterpret_cast<uint4*>(part) + lane * 4;  // chunk c at x_staged[(c - kWarps) * 128]
      auto staged = [&](int c) {
        return stage_x && c >= kWarps && c < kWarps + kStagedChunks && (c + 1) * kChunk <= p.K;
      };
      for (int c = warp + kWarps; c < chunks; c += kWarps) {
        if (!staged(c)) continue;
        const uint4* src = reinterpret_cast<const uint4*>(xrow + c * kChunk + lane * 32);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned dst = unsigned(__cvta_generic_to_shared(x_staged + (c - kWarps) * 128 + j));
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src + j));
        }
      }
      uint32_t xa[16];
      if (warp < chunks) load_chunk_abs<DT>(xrow, p.K, warp, lane, xa);
      if (b == 0) edge = lane_edge<DT>(env_hi, env_lo, lane);
      for (int c = warp; c < chunks; c += kWarps) {
        if (staged(c)) {
          asm volatile("cp.async.wait_all;" ::: "memory");  // this lane's own copies
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint4 v = x_staged[(c - kWarps) * 128 + j];
            xa[4 * j] = v.x & 0x7fff7fffu;
            xa[4 * j + 1] = v.y & 0x7fff7fffu;
            xa[4 * j + 2] = v.z & 0x7fff7fffu;
            xa[4 * j + 3] = v.w & 0x7fff7fffu;
          }
        } else if (c != warp) {
          load_chunk_abs<DT>(xrow, p.K, c, lane, xa);
        }
        select_chunk<DT>(xa, p.K, c, p.k_chunk, edge, sel + c * p.k_chunk, lane);
      }
    }
    __syncthreads();
    for (int pb = 0; pb < np; pb += pr_count) {
      if (np > pr_count && (pb > 0 || b > 0)) stage_scales(pb);  // one pass: staged once, at the start
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
      asm volatile("cp.async.wait_all;" ::: "memory");
      __syncthreads();
      for (int it = tid; it < npr * 32; it += kThreads) {
        const int q = it >> 5, j = it & 31, o = (p0 + pb + q) * 32 + j;
        if (o >= p.N) continue;
        float v = 0.f;
        for (int r = 0; r < groups; ++r) v += part[(r * pr_count + q) * kPartStride + j];
        store_relaxed(p.mailbox + size_t(b) * p.N + o, __float_as_uint(v * __half2float(pass_scales[it])) | kReady);
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// GEMV role: a persistent block walks the 16-row tiles blk, blk + nblk, ...; its 8 warps split K
// into 256-channel tiles (warp w takes w, w + 8, ...), each warp prefetching its next tile (across
// row tiles too) while it computes the current one. The tokens' x is staged once per block in
// shared memory when it fits; a lane reads both B-fragment registers of a k-step in one 8-byte load.

// Padding of a staged row, in halves: the 8-byte B-fragment loads of the 8 token rows then fall in
// distinct banks within each half-warp.
constexpr int kXPad = 16;

// Tiles a GEMV block may hold back while their corrections are fetched (DEC).
constexpr int kDeferred = 4;

// LUT tables in shared memory, one column per lane (no bank conflicts), for rows g and g + 8 of the
// row tile. 3 bits: one entry per pair of codes, holding the A register itself, so a register costs
// one shared load (bf16: a second table holds the lo parts); 4 bits (256 pairs would not fit): one
// per code.
constexpr int kPairWords = 64 * 32;  // words of a 3-bit pair table for one row half (rows g or g + 8)
static_assert(kPairWords == 1 << 11, "the table build takes the row half as i >> 11");

__host__ __device__ constexpr int lut_table_bytes(int fmt, int bits, int dtype) {
  return fmt != kLUT ? 0 : bits == 3 ? 2 * kPairWords * 4 * (dtype == kHalf ? 1 : 2) : 2 * 16 * 32 * 4;
}

// Byte offset in a 3-bit pair table of the codes q0, q1 at bits p and p + 16 of v: entry q0 + 8 q1
// of 32 lanes' words, in the column at lane_off (lane * 4).
__device__ __forceinline__ uint32_t pair_table_offset(uint32_t v, int p, uint32_t lane_off) {
  const uint32_t q0 = p <= 7 ? v << (7 - p) : v >> (p - 7);
  const uint32_t q1 = lop3<kAndOr>(v >> (p + 6), 7u << 10, lane_off);
  return lop3<kAndOr>(q0, 7u << 7, q1);
}

// Shared-memory bytes of the staged x of B tokens (the host splits larger batches).
__host__ __device__ inline int x_stage_bytes(int B, int K) { return B * (div_up(K, kTileK) * kTileK + kXPad) * 2; }

// GS: 128 = the group size is 128 (two whole groups per 256-channel tile: no per-step group
// logic); 0 = any multiple of 16 (generic path). Unused for LUT. DEC: merge the DEC blocks'
// corrections (mailbox) into the output.
template <int FMT, int BITS, int DT, int GS, bool DEC>
__device__ void gemv_block(const GemvParams& p, int blk, int nblk, unsigned char* smem) {
  using A = Act<DT>;
  using T = typename A::T;
  constexpr int J = (BITS == 4 ? 16 : 12) / 4;
  constexpr int Q = 1 << BITS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int KT = div_up(p.K, kTileK);
  const int NT = div_up(p.N, kTileRows);
  const int Npad = NT * kTileRows;
  const int xstride = KT * kTileK + kXPad;  // halves per staged row
  float* red = reinterpret_cast<float*>(smem);                      // [kWarps][16][8]
  uint32_t* tab = reinterpret_cast<uint32_t*>(red + kWarps * 128);  // LUT tables (lut_table_bytes)
  uint16_t* xs = reinterpret_cast<uint16_t*>(reinterpret_cast<unsigned char*>(tab) +
                                             lut_table_bytes(FMT, BITS, DT));  // [B][xstride]
  const uint16_t* xg = reinterpret_cast<const uint16_t*>(p.x);
  // lanes of token columns >= B read token 0: those columns of C are never used
  const uint32_t* xsrow = reinterpret_cast<const uint32_t*>(xs + (g < p.B ? g : 0) * xstride) + 2 * t;
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
  // The first weight tile is requested first: no kernel writes the weights, so in a dependent launch
  // its loads go out while the kernel before is still running. x, which that kernel may have
  // written, comes after the wait, staged in shared memory, zero-padded to whole tiles, in 16-byte
  // copies where x allows. Plain uniform launch: by cp.async, waited for only at the block barrier
  // (8B down, 28 KB of x: 11.2-12.1 -> 10.8-11.7 us against register loads; 70B down 39.1-42.1 ->
  // 37.8-40.5; results/h200/gemv_x_first_*.txt, where x went ahead of the tile; behind it, 10.6 us:
  // dependent_launch_call1.txt, "newoff"). cp.async cost LUT gate_up 0.3-5 us and, in the DEC
  // launch, uniform gate_up 0.5 us (x_first_and_fetch_hybrid_ab.txt): those keep register loads,
  // four in flight per thread.
  constexpr bool kXAsync = !DEC && FMT == kUniform;
  int rt = blk, kt = warp;
  // ptxas alone decides that the loads stay ahead of the wait: it hoists the wait to the top unless
  // they sit in a branch it keeps (a parameter read here lost it in every LUT kernel); the GPU test
  // test_first_weight_tile_requested_before_the_wait checks the built SASS
  if (rt < NT && kt < KT) load(rt, kt, w, m);
  wait_for_previous_kernels();
  let_next_kernel_start();
  if constexpr (kXAsync) {
    // the 16-byte test is repeated below rather than hoisted: hoisted, it reordered the LUT and
    // DEC kernels' code
    const int per_row = p.K / 8;
    const bool x_vec = p.K % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
    for (int i = threadIdx.x; x_vec && i < p.B * per_row; i += kThreads) {
      const int b = i / per_row;
      const unsigned dst = unsigned(__cvta_generic_to_shared(xs + b * xstride + (i - b * per_row) * 8));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(reinterpret_cast<const uint4*>(p.x) + i));
    }
  }
  if (p.K % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {
    const int per_row = p.K / 8, total = p.B * per_row;
    const uint4* src = reinterpret_cast<const uint4*>(p.x);
    for (int i0 = threadIdx.x; !kXAsync && i0 < total; i0 += 4 * kThreads) {
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
    if constexpr (kXAsync) asm volatile("cp.async.wait_all;" ::: "memory");
  } else {
    for (int b = 0; b < p.B; ++b)
      for (int k = threadIdx.x; k < xstride; k += kThreads) xs[b * xstride + k] = k < p.K ? xg[size_t(b) * p.K + k] : 0;
  }
  __syncthreads();

  const T* bias = reinterpret_cast<const T*>(p.bias);
  T* out = reinterpret_cast<T*>(p.out);
  // epilogue ownership: thread 8 r + n (< 128) writes row r of the tile for token n
  const int r = threadIdx.x >> 3, n = threadIdx.x & 7;
  auto write_out = [&](int orow, float v) {
    if (bias != nullptr) v += A::to_float(bias[orow]);
    out[size_t(n) * p.N + orow] = A::from_float(v);
  };
  // DEC: the corrections of a tile are read when the tile starts; a tile whose corrections were
  // not ready by then is deferred, so a GEMV block does not idle while the DEC blocks still fetch.
  // Each owner thread keeps its deferred (row, sum) in its own column of a ring of kDeferred slots
  // in shared memory; the oldest one's word is read when a tile starts and the entry written at
  // that tile's end if it was ready, so the ring drains one entry per tile without waiting. A full
  // ring, and the block's end, wait for the oldest.
  unsigned long long* mailbox = DEC ? p.mailbox + size_t(n) * p.N : nullptr;
  int* deferred_row = reinterpret_cast<int*>(xs + p.B * xstride);  // [kDeferred][128]
  float* deferred_sum = reinterpret_cast<float*>(deferred_row + kDeferred * 128);
  int oldest = 0, deferred = 0;
  auto oldest_word_now = [&]() { return load_relaxed(mailbox + deferred_row[oldest * 128 + threadIdx.x]); };
  auto write_oldest = [&](unsigned long long word) {
    const int slot = oldest * 128 + threadIdx.x, orow = deferred_row[slot];
    write_out(orow, deferred_sum[slot] + take_correction(mailbox + orow, word));
    oldest = oldest + 1 == kDeferred ? 0 : oldest + 1;
    --deferred;
  };
  for (; rt < NT; rt += nblk, kt = warp) {
    const int row0 = rt * kTileRows + g;
    const int row = rt * kTileRows + r;
    const bool owner = threadIdx.x < 128 && n < p.B && row < p.N;
    unsigned long long word = 0, oldest_word = 0;
    if (DEC && owner) word = load_relaxed(mailbox + row);
    if (DEC && deferred > 0) oldest_word = oldest_word_now();
    if constexpr (FMT == kLUT) {
      const __half* lut = reinterpret_cast<const __half*>(p.meta) + size_t(rt) * kTileRows * Q;
      if constexpr (BITS == 3) {
        // entry (rh, q0 + 8 q1, l): values q0 and q1 of row (l >> 2) + 8 rh as an A register
        for (int i = threadIdx.x; i < 2 * kPairWords; i += kThreads) {
          const __half* row_lut = lut + ((i & 31) / 4 + 8 * (i >> 11)) * Q;  // i >> 11: the row half
          const uint32_t e0 = A::lut_entry(row_lut[(i >> 5) & 7]), e1 = A::lut_entry(row_lut[(i >> 8) & 7]);
          tab[i] = __byte_perm(e0, e1, 0x5410);
          if constexpr (DT == kBFloat16) tab[i + 2 * kPairWords] = __byte_perm(e0, e1, 0x7632);
        }
      } else {
        for (int i = threadIdx.x; i < 2 * Q * 32; i += kThreads) {
          const int l = i & 31, q = (i >> 5) % Q, half_sel = (i >> 5) / Q;
          tab[i] = A::lut_entry(lut[((l >> 2) + 8 * half_sel) * Q + q]);
        }
      }
      __syncthreads();
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // k-tile kt from (cw, cm), prefetching the warp's next tile into (nw, nm)
    auto tile_step = [&](int kt, const uint4* cw, const uint32_t* cm, uint4* nw, uint32_t* nm) {
      const int nrt = kt + kWarps < KT ? rt : rt + nblk;
      const int nkt = kt + kWarps < KT ? kt + kWarps : warp;
      if (nrt < NT && nkt < KT) load(nrt, nkt, nw, nm);  // prefetch the warp's next tile
      const int kbase = kt * kTileK;
      const uint32_t* xk = xsrow + (kbase >> 1);
      if constexpr (FMT == kUniform && GS == 128) {
        // padding past K has code 0 and x 0 (staged): it adds exact zeros, no checks needed
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint32_t c0 = cm[2 * half], c1 = cm[2 * half + 1];
          UniformDecoder<BITS, DT> dec;
          dec.set_zero(0, c0);
          dec.set_zero(1, c1);
          float tmp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int s = 8 * half; s < 8 * half + 8; ++s) {
            const uint2 xb = *reinterpret_cast<const uint2*>(xk + 8 * s);
            const uint32_t bf[2] = {xb.x, xb.y};
            uint32_t a[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = dec.pair(cw, s, i);
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
        uint32_t c0 = cm[0], c1 = cm[1];
        UniformDecoder<BITS, DT> dec;
        dec.set_zero(0, c0);
        dec.set_zero(1, c1);
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
              c0 = cm[2];
              c1 = cm[3];
            } else {
              c0 = __ldg(meta + size_t(grp) * Npad + row0);
              c1 = __ldg(meta + size_t(grp) * Npad + row0 + 8);
            }
            dec.set_zero(0, c0);
            dec.set_zero(1, c1);
          }
          const uint2 xb = *reinterpret_cast<const uint2*>(xk + 8 * s);
          const uint32_t bf[2] = {xb.x, xb.y};
          uint32_t a[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = dec.pair(cw, s, i);
          A::mma(tmp, a, bf);
          rem += 16;
          if (rem == p.group_size) rem = 0;
        }
        flush();
      } else {
        // LUT, 3 bits: one shared load per register from the pair tables; 4 bits: one per code
        constexpr uint32_t kRows = kPairWords * 4;  // bytes of the pair entries of rows g (the next: g + 8)
        const unsigned char* tb = reinterpret_cast<const unsigned char*>(tab);
        const uint32_t lane_off = uint32_t(lane) * 4;
#pragma unroll
        for (int s = 0; s < kKSteps; ++s) {
          const uint2 xb = *reinterpret_cast<const uint2*>(xk + 8 * s);
          const uint32_t bf[2] = {xb.x, xb.y};
          uint32_t a[4], alo[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if constexpr (BITS == 3) {
              const Slot at = slot_of<BITS>(s, i);
              const uint32_t off = (i & 1) * kRows + (at.bit < 0
                                                          ? pair_table_offset(spare_pair(cw, at.word), 0, lane_off)
                                                          : pair_table_offset(word_of(cw, at.word), at.bit, lane_off));
              a[i] = *reinterpret_cast<const uint32_t*>(tb + off);
              if constexpr (DT == kBFloat16) alo[i] = *reinterpret_cast<const uint32_t*>(tb + 2 * kRows + off);
            } else {
              const uint32_t pair = code_pair<BITS>(cw, s, i);
              const uint32_t* ti = tab + lane + (i & 1) * Q * 32;
              const uint32_t e0 = ti[(pair & 0xffffu) * 32];
              const uint32_t e1 = ti[(pair >> 16) * 32];
              a[i] = __byte_perm(e0, e1, 0x5410);
              if constexpr (DT == kBFloat16) alo[i] = __byte_perm(e0, e1, 0x7632);
            }
          }
          A::mma(acc, a, bf);
          if constexpr (DT == kBFloat16) A::mma(acc, alo, bf);
        }
      }
    };
    auto take_prefetched = [&]() {
#pragma unroll
      for (int j = 0; j < J; ++j) w[j] = wn[j];
#pragma unroll
      for (int j = 0; j < 4; ++j) m[j] = mn[j];
    };
    if constexpr (FMT == kUniform && GS == 0) {
      // the generic group path keeps one buffer: two copies of its body would spill
      for (; kt < KT; kt += kWarps) {
        tile_step(kt, w, m, wn, mn);
        take_prefetched();
      }
    } else {
      // two k-tiles per pass, the buffers swapping roles instead of being copied
      for (; kt < KT; kt += 2 * kWarps) {
        tile_step(kt, w, m, wn, mn);
        if (kt + kWarps >= KT) {  // an odd count: one copy per row tile
          take_prefetched();
          break;
        }
        tile_step(kt + kWarps, wn, mn, w, m);
      }
    }

    // fixed-order reduction over the warps; C fragment: rows g, g + 8, token columns 2t, 2t + 1
    red[(warp * 16 + g) * 8 + 2 * t] = acc[0];
    red[(warp * 16 + g) * 8 + 2 * t + 1] = acc[1];
    red[(warp * 16 + g + 8) * 8 + 2 * t] = acc[2];
    red[(warp * 16 + g + 8) * 8 + 2 * t + 1] = acc[3];
    __syncthreads();
    if (owner) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) v += red[(k * 16 + r) * 8 + n];
      if constexpr (DEC) {
        if (deferred > 0 && (oldest_word & kReady)) write_oldest(oldest_word);
        if (word & kReady) {
          write_out(row, v + take_correction(mailbox + row, word));
        } else {
          if (deferred == kDeferred) write_oldest(oldest_word_now());
          const int tail = oldest + deferred;  // the ring's first free slot, before wrapping
          const int slot = (tail < kDeferred ? tail : tail - kDeferred) * 128 + threadIdx.x;
          deferred_row[slot] = row;
          deferred_sum[slot] = v;
          ++deferred;
        }
      } else {
        write_out(row, v);
      }
    }
    __syncthreads();  // red and tab are reused by the next row tile
  }
  if constexpr (DEC)
    while (deferred > 0) write_oldest(oldest_word_now());
}

// DEC = false: the plain GEMV (n_tb == 0), compiled without the DEC role and the mailbox reads.
// Both variants run 3 blocks per SM (80 registers): the DEC role fits in them without spilling.
template <int FMT, int BITS, int DT, int GS, bool DEC>
__global__ void __launch_bounds__(kThreads, 3) gemv_kernel(const GemvParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  if constexpr (DEC) {
    if (int(blockIdx.x) < p.n_tb) {
      wait_for_previous_kernels();
      let_next_kernel_start();
      dec_block<DT>(p, blockIdx.x, smem);
      return;
    }
  }
  gemv_block<FMT, BITS, DT, GS, DEC>(p, blockIdx.x - p.n_tb, gridDim.x - p.n_tb, smem);
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
      const int kl = 16 * s + 4 * t + 2 * (i >> 1);
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
  __shared__ int sel[kChunk];
  const int lane = threadIdx.x;
  const int chunk = blockIdx.x, token = blockIdx.y;
  const float env_hi = __ldg(envelope), env_lo = __ldg(envelope + k_total - 1);
  uint32_t xa[16];
  load_chunk_abs<DT>(x + size_t(token) * K, K, chunk, lane, xa);
  const uint32_t edge = lane_edge<DT>(env_hi, env_lo, lane);
  const int quota = chunk_quota(K, chunk, k_chunk);
  select_chunk<DT>(xa, K, chunk, k_chunk, edge, sel, lane);
  __syncwarp();
  for (int i = lane; i < quota; i += 32) out[size_t(token) * k_total + chunk * k_chunk + i] = sel[i];
}

// [x | m] for decode-equivalent evaluation: m is x on the token's selected channels, 0 elsewhere
// (out [T, 2K]). One warp per chunk and token, as select_kernel; each lane writes its 32 channels.
template <int DT>
__global__ void select_masked_kernel(const typename Act<DT>::T* x, int K, const float* envelope, int k_chunk,
                                     int k_total, typename Act<DT>::T* out) {
  using T = typename Act<DT>::T;
  const int lane = threadIdx.x;
  const int chunk = blockIdx.x, token = blockIdx.y;
  const T* xrow = x + size_t(token) * K;
  T* xout = out + size_t(token) * 2 * K;
  T* mout = xout + K;
  const int quota = chunk_quota(K, chunk, k_chunk);
  uint32_t take = 0;
  if (quota > 0) {
    const float env_hi = __ldg(envelope), env_lo = __ldg(envelope + k_total - 1);
    uint32_t xa[16];
    load_chunk_abs<DT>(xrow, K, chunk, lane, xa);
    int pos;
    take = take_mask<DT>(xa, K, chunk, quota, lane_edge<DT>(env_hi, env_lo, lane), lane, &pos);
  }
  const int first = chunk * kChunk + lane * 32;
  if (K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
      first + 32 <= K) {
    const uint4* src = reinterpret_cast<const uint4*>(xrow + first);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 8 channels per 16-byte piece
      const uint4 v = __ldg(src + j);
      reinterpret_cast<uint4*>(xout + first)[j] = v;
      uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int h = 0; h < 8; ++h) {
        if (!((take >> (8 * j + h)) & 1u)) w[h / 2] &= (h & 1) ? 0x0000ffffu : 0xffff0000u;
      }
      reinterpret_cast<uint4*>(mout + first)[j] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
    const T zero = Act<DT>::from_bits(0);
    for (int i = 0; i < 32 && first + i < K; ++i) {
      const T v = xrow[first + i];
      xout[first + i] = v;
      mout[first + i] = (take >> i) & 1u ? v : zero;
    }
  }
}

// One block per SM, holding it until *release turns non-zero or timeout_ns pass: the block asks
// for all the shared memory a block may have, so no other kernel's block is placed beside it.
__global__ void hold_sm_kernel(const volatile int* release, unsigned long long timeout_ns) {
  if (threadIdx.x != 0) return;
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(2000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (*release == 0 && now - start < timeout_ns);
}

}  // namespace

cudaError_t launch_hold_sms(const int* release, int count, double timeout_s, cudaStream_t stream) {
  int dev = 0, smem = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaError_t e = cudaFuncSetAttribute(hold_sm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  hold_sm_kernel<<<count, 32, smem, stream>>>(release, static_cast<unsigned long long>(timeout_s * 1e9));
  return cudaGetLastError();
}

bool dependent_launch_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("DECDEC_DEPENDENT_LAUNCH");
    int dev = 0, major = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    return major >= 9 && !(env != nullptr && std::string(env) == "0");
  }();
  return enabled;
}

int padded_rows(int N) { return div_up(N, kTileRows) * kTileRows; }
int k_tiles(int K) { return div_up(K, kTileK); }
int tile_words(int bits) { return bits == 4 ? 16 : 12; }

size_t gemv_smem_bytes(const GemvParams& p) {
  const size_t gemv = kWarps * 128 * sizeof(float) + lut_table_bytes(p.fmt, p.bits, p.dtype) + x_stage_bytes(p.B, p.K);
  if (p.n_tb == 0) return gemv;
  const size_t gemv_dec = gemv + kDeferred * 128 * (sizeof(int) + sizeof(float));  // the deferred tiles
  // partial sums, the scales of a pass, the selection list
  const size_t dec = size_t(kThreads) * kPartStride * sizeof(float) + kThreads * 32 * sizeof(__half) +
                     size_t(p.k_total) * sizeof(int);
  return dec > gemv_dec ? dec : gemv_dec;
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
  return launch_kernel(kernel, p.n_tb + gemv_blocks, kThreads, smem, stream, p);
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

cudaError_t launch_select_masked(const void* x, int dtype, int T, int K, const float* envelope, int k_chunk,
                                 int k_total, void* out, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const dim3 grid(div_up(K, kChunk), T);
  if (dtype == kHalf) {
    select_masked_kernel<kHalf><<<grid, 32, 0, stream>>>(reinterpret_cast<const __half*>(x), K, envelope, k_chunk,
                                                          k_total, reinterpret_cast<__half*>(out));
  } else {
    select_masked_kernel<kBFloat16><<<grid, 32, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x), K, envelope,
                                                              k_chunk, k_total, reinterpret_cast<__nv_bfloat16*>(out));
  }
  return cudaGetLastError();
}

}  // namespace decdec
