// Torch-free launch API of the DecDEC CUDA kernels (implemented in kernels.cu).
//
// GPU weight layout (made once by decdec/kernels.py from the canonical packed layout):
// the weight [N, K] is cut into tiles of 16 output rows x 256 input channels, padded with code 0.
// Tile (rt, kt) is stored at qweight + (rt * KT + kt) * 32 * WORDS, as WORDS / 4 loads of 16 bytes
// per lane ("load j of lane l" at word ((j * 32) + l) * 4), so that one warp reads a tile with
// WORDS / 4 fully coalesced 512-byte loads. Lane l = 4 g + t holds, for each of the 16 k-steps s of
// the tile, the 8 codes of its mma.m16n8k16 A fragment: element e = e0 + 2 rh + 4 kh is
// (row 16 rt + g + 8 rh, channel 256 kt + 16 s + 4 t + 2 kh + e0): a lane's B fragment of a k-step
// (channels 4 t .. 4 t + 3) is contiguous.
// - 4 bits (WORDS = 16): word s; e = 2i + h sits at bits [4 i + 16 h, +4).
// - 3 bits (WORDS = 12): words 3m..3m+2 hold k-steps 4m..4m+3, whose pairs (e = 2i, 2i + 1) are
//   numbered j = 4 (s - 4m) + i. Pair j < 15 sits at bits [3 (j % 5), +3) of both 16-bit halves of
//   word 3m + j / 5 (e = 2i in the low half); pair 15 fills the spare bits: its bit b at bit 15 of
//   word 3m + b (e = 2i) and at bit 31 (e = 2i + 1). Codes low in each half let the kernel OR them
//   into an fp16/bf16 mantissa without shifting (kernels.cu, UniformDecoder).
// Uniform meta: uint32 [n_groups, Npad], fp16 scale bits | zero << 16.
// LUT meta: fp16 [Npad, 2^bits].
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace decdec {

constexpr int kTileRows = 16;
constexpr int kTileK = 256;
constexpr int kMaxBatch = 8;
constexpr int kChunk = 1024;
constexpr int kMaxStageBytes = 160 * 1024;  // x of the tokens of one launch, staged in shared memory

enum Format : int { kUniform = 0, kLUT = 1 };
enum DType : int { kHalf = 0, kBFloat16 = 1 };

struct GemvParams {
  // base GEMV
  const void* x;        // [B, K] activations (dtype)
  void* out;            // [B, N] (dtype)
  const void* bias;     // [N] (dtype) or nullptr
  const void* qweight;  // GPU layout (16-byte aligned)
  const void* meta;     // uniform: uint32 [groups, Npad]; LUT: fp16 [Npad, 2^bits]
  int fmt, bits, dtype, group_size;
  int N, K, B;
  // DEC (n_tb == 0: none)
  int n_tb;
  const float* envelope;     // [K] fp32, used when channels == nullptr
  int k_chunk;               // selection setting, used when channels == nullptr
  int k_total;               // selected channels per token
  const int64_t* channels;   // [B, k_total] given selection, or nullptr (select on the GPU)
  const uint8_t* residual;   // mapped pinned host memory [K, res_stride] (device-visible pointer)
  int64_t res_stride;        // bytes per residual row, a multiple of 16
  const void* res_scales;    // fp16 [N] on the device, or in mapped pinned host memory:
  bool res_scales_on_host;   // the latter (staged with plain loads, see dec_block)
  // [B, N] tagged corrections, zero between calls (each call leaves it zero): a DEC block stores
  // (fp32 bits | 1 << 32) in one 8-byte store, the GEMV block owning the output waits for the tag,
  // adds the value and stores 0 back
  unsigned long long* mailbox;
};

int padded_rows(int N);
int k_tiles(int K);
int tile_words(int bits);
// Dynamic shared memory the launch needs (for the sizes in p).
size_t gemv_smem_bytes(const GemvParams& p);

// Tokens one launch takes for in_features K (x is staged in shared memory); 0 when K is too large.
int max_stage_batch(int K);
// Requires 1 <= B <= max_stage_batch(K).
cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream);

// Whether the GEMV and attention kernels are launched dependent (programmatic dependent launch,
// dependent_launch.cuh): the GPU is sm_90 or later and DECDEC_DEPENDENT_LAUNCH is not "0".
bool dependent_launch_enabled();
cudaError_t launch_dequantize(const void* qweight, const void* meta, int fmt, int bits, int dtype, int group_size,
                              int N, int K, void* out, cudaStream_t stream);
// out int64 [T, k_total]: DecDEC selection of every token (DESIGN.md), ascending per token.
cudaError_t launch_select(const void* x, int dtype, int T, int K, const float* envelope, int k_chunk, int k_total,
                          int64_t* out, cudaStream_t stream);
// Holds `count` SMs (one block each, all of its shared memory) until *release != 0 or timeout_s
// pass: a stand-in for another kernel running beside the one being timed (benchmarks).
cudaError_t launch_hold_sms(const int* release, int count, double timeout_s, cudaStream_t stream);
// out [T, 2K] (x's dtype): [x | m], m = x on each token's DecDEC selection and 0 elsewhere.
cudaError_t launch_select_masked(const void* x, int dtype, int T, int K, const float* envelope, int k_chunk,
                                 int k_total, void* out, cudaStream_t stream);

constexpr int kMaxAttentionGroup = 16;    // query heads per kv head
constexpr int kMaxAttentionHeadDim = 256;
constexpr int kMaxAttentionSplits = 128;  // blocks per (sequence, kv head)

// Decode attention (attention.cu): out[b, h] = softmax(scale q[b, h] . K[b, h / G, s]) V[b, h / G, s]
// over the positions s < S where mask[b, s] (all of them without a mask). Strides in elements;
// the last dimension of every tensor is contiguous.
struct DecodeAttentionParams {
  const void* q;  // [B, Hq, D]
  const void* k;  // [B, Hkv, S, D]
  const void* v;  // [B, Hkv, S, D]
  const bool* mask;  // [B, S] or nullptr
  void* out;         // [B, Hq, D], contiguous
  float* partial_out;  // [B, Hkv, splits, G, D] fp32 workspace (splits > 1)
  float* partial_ml;   // [B, Hkv, splits, G, 2] fp32 workspace (splits > 1)
  int* counters;       // [B * Hkv], zero between launches (each launch leaves it zero)
  int64_t q_stride_b, q_stride_h, k_stride_b, k_stride_h, k_stride_s, v_stride_b, v_stride_h, v_stride_s, mask_stride_b;
  float scale;
  int dtype, B, q_heads, kv_heads, group, head_dim, S;
  int chunk, splits;  // positions per block and blocks per (sequence, kv head): plan_decode_attention
};

// Sets p.chunk and p.splits for a GPU of `sms` SMs.
void plan_decode_attention(DecodeAttentionParams& p, int sms);
size_t decode_attention_smem_bytes(const DecodeAttentionParams& p);
cudaError_t launch_decode_attention(const DecodeAttentionParams& p, cudaStream_t stream);

}  // namespace decdec
