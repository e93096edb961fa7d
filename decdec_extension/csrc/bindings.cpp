// Torch bindings of the DecDEC kernels: CUDA implementations of the ops that decdec/ops.py defines
// (schemas and fake implementations live there), plus pinned mapped host allocation.
// Every argument is checked here, so bad input raises a Python error instead of crashing.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "decdec_kernels.h"

namespace {

using at::Tensor;

// Numbers and shapes for error messages, formatted here: streaming integers into the message from
// this library crashed (a libstdc++ mismatch between the extension and the torch build).
std::string S(int64_t v) { return std::to_string(v); }

std::string S(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

int dtype_code(const Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "decdec: activations must be float16 or bfloat16, got ", x.scalar_type());
  return x.scalar_type() == at::kHalf ? decdec::kHalf : decdec::kBFloat16;
}

// The device to run on; a CPU tensor here (the dispatcher picks CUDA when any argument is on CUDA)
// must raise before a CUDA device guard is made from it.
c10::Device cuda_device(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "decdec: ", name, " must be a CUDA tensor, got ", t.device());
  return t.device();
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "decdec: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "decdec: ", name, " is on ", t.device(), ", x on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "decdec: ", name, " must be contiguous");
}

void check_weight(const Tensor& x, const Tensor& qweight, const Tensor& meta, int64_t fmt, int64_t bits,
                  int64_t group_size, int64_t N, int64_t K) {
  TORCH_CHECK(fmt == decdec::kUniform || fmt == decdec::kLUT, "decdec: unknown weight format ", S(fmt));
  TORCH_CHECK(bits == 3 || bits == 4, "decdec: bits must be 3 or 4, got ", S(bits));
  TORCH_CHECK(N > 0 && K > 0 && N < (1 << 30) && K < (1 << 30), "decdec: bad shape [", S(N), ", ", S(K), "]");
  check_cuda(qweight, "qweight", x);
  check_cuda(meta, "meta", x);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kInt, "decdec: qweight must be int32");
  const int64_t words = int64_t(decdec::padded_rows(int(N)) / decdec::kTileRows) * decdec::k_tiles(int(K)) * 32 *
                        decdec::tile_words(int(bits));
  TORCH_CHECK(qweight.numel() == words, "decdec: qweight has ", S(qweight.numel()), " words, [", S(N), ", ", S(K),
                    "] at ", S(bits), " bits needs ", S(words));
  const int64_t npad = decdec::padded_rows(int(N));
  if (fmt == decdec::kUniform) {
    TORCH_CHECK(group_size > 0 && group_size % 16 == 0, "decdec: group size must be a positive multiple of 16, got ",
                      S(group_size));
    const int64_t groups = (K + group_size - 1) / group_size;
    TORCH_CHECK_TYPE(meta.scalar_type() == at::kInt, "decdec: uniform meta must be int32");
    TORCH_CHECK(meta.dim() == 2 && meta.size(0) == groups && meta.size(1) == npad, "decdec: uniform meta must be [",
                      S(groups), ", ", S(npad), "], got ", S(meta.sizes()));
  } else {
    TORCH_CHECK_TYPE(meta.scalar_type() == at::kHalf, "decdec: LUT meta must be float16");
    TORCH_CHECK(meta.dim() == 2 && meta.size(0) == npad && meta.size(1) == (1 << bits), "decdec: LUT meta must be [",
                      S(npad), ", ", S(1 << bits), "], got ", S(meta.sizes()));
  }
}

void check_x(const Tensor& x, int64_t K) {
  TORCH_CHECK(x.is_cuda(), "decdec: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "decdec: x must be [tokens, ", S(K), "], got ", S(x.sizes()));
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= decdec::kMaxBatch, "decdec: the GEMV takes 1..",
                    S(int64_t(decdec::kMaxBatch)), " tokens, got ", S(x.size(0)));
  TORCH_CHECK(x.is_contiguous(), "decdec: x must be contiguous");
}

decdec::GemvParams base_params(const Tensor& x, const Tensor& qweight, const Tensor& meta,
                               const std::optional<Tensor>& bias, int64_t fmt, int64_t bits, int64_t group_size,
                               int64_t N, int64_t K, Tensor& out) {
  check_x(x, K);
  const int dt = dtype_code(x);
  check_weight(x, qweight, meta, fmt, bits, group_size, N, K);
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "decdec: bias must be [", S(N), "], got ", S(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "decdec: bias dtype ", bias->scalar_type(),
                     " differs from x ", x.scalar_type());
  }
  out = at::empty({x.size(0), N}, x.options());
  decdec::GemvParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.qweight = qweight.data_ptr();
  p.meta = meta.data_ptr();
  p.fmt = int(fmt);
  p.bits = int(bits);
  p.dtype = dt;
  p.group_size = fmt == decdec::kUniform ? int(group_size) : 1;
  p.N = int(N);
  p.K = int(K);
  p.B = int(x.size(0));
  return p;
}

// Launches in slices of as many tokens as one launch stages in shared memory.
void launch(decdec::GemvParams p) {
  const int per_launch = decdec::max_stage_batch(p.K);
  TORCH_CHECK(per_launch > 0, "decdec: in_features ", S(p.K), " is too large for the GEMV kernel");
  const int tokens = p.B;
  const auto* x = static_cast<const char*>(p.x);
  auto* out = static_cast<char*>(p.out);
  const int64_t* channels = p.channels;
  for (int b0 = 0; b0 < tokens; b0 += per_launch) {
    p.B = std::min(per_launch, tokens - b0);
    p.x = x + int64_t(b0) * p.K * 2;
    p.out = out + int64_t(b0) * p.N * 2;
    p.channels = channels == nullptr ? nullptr : channels + int64_t(b0) * p.k_total;
    const cudaError_t err = decdec::launch_gemv(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "decdec: GEMV launch failed: ", cudaGetErrorString(err));
  }
}

Tensor gemv(const Tensor& x, const Tensor& qweight, const Tensor& meta, const std::optional<Tensor>& bias, int64_t fmt,
            int64_t bits, int64_t group_size, int64_t out_features, int64_t in_features) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  Tensor out;
  decdec::GemvParams p = base_params(x, qweight, meta, bias, fmt, bits, group_size, out_features, in_features, out);
  launch(p);
  return out;
}

int64_t total_selected(int64_t K, int64_t k_chunk) {
  TORCH_CHECK(k_chunk >= 0 && k_chunk <= decdec::kChunk, "decdec: k_chunk must be in 0..", S(int64_t(decdec::kChunk)),
                    ", got ", S(k_chunk));
  return (K / decdec::kChunk) * k_chunk + (k_chunk * (K % decdec::kChunk)) / decdec::kChunk;
}

void check_envelope(const Tensor& envelope, const Tensor& x, int64_t K) {
  check_cuda(envelope, "envelope", x);
  TORCH_CHECK_TYPE(envelope.scalar_type() == at::kFloat, "decdec: envelope must be float32");
  TORCH_CHECK(envelope.dim() == 1 && envelope.size(0) == K, "decdec: envelope must be [", S(K), "], got ",
                    S(envelope.sizes()));
}

Tensor gemv_dec(const Tensor& x, const Tensor& qweight, const Tensor& meta, const std::optional<Tensor>& bias,
                int64_t fmt, int64_t bits, int64_t group_size, int64_t out_features, int64_t in_features,
                const Tensor& envelope,
                const std::optional<Tensor>& channels, int64_t k_chunk, int64_t residual_ptr, int64_t residual_stride,
                const Tensor& residual_scales, int64_t n_tb, const Tensor& mailbox) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  Tensor out;
  decdec::GemvParams p = base_params(x, qweight, meta, bias, fmt, bits, group_size, out_features, in_features, out);
  const int64_t N = out_features, K = in_features;
  TORCH_CHECK(residual_ptr != 0, "decdec: residual_ptr is null");
  TORCH_CHECK(residual_stride % 16 == 0 && residual_stride * 2 >= N,
                    "decdec: residual_stride must be a multiple of 16 bytes holding ", S(N), " nibbles, got ",
                    S(residual_stride));
  // The scales are read where they are: on x's device, or in pinned host memory (the setting
  // SelectionGroup.scales_on_host), which the kernel reads at the same address, as it does the rows
  // (unified addressing).
  const bool scales_on_host = !residual_scales.is_cuda();
  if (scales_on_host) {
    TORCH_CHECK(residual_scales.is_cpu() && residual_scales.is_pinned(), "decdec: residual_scales must be on ",
                x.device(), " (x's device) or in pinned host memory; got a tensor on ", residual_scales.device(),
                residual_scales.is_cpu() ? " that is not pinned" : "");
    TORCH_CHECK(residual_scales.is_contiguous(), "decdec: residual_scales must be contiguous");
  } else {
    check_cuda(residual_scales, "residual_scales", x);
  }
  TORCH_CHECK_TYPE(residual_scales.scalar_type() == at::kHalf, "decdec: residual_scales must be float16");
  TORCH_CHECK(residual_scales.dim() == 1 && residual_scales.size(0) == N, "decdec: residual_scales must be [", S(N),
                    "]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(residual_scales.data_ptr()) % 16 == 0,
              "decdec: residual_scales must be 16-byte aligned (the kernel copies them 16 bytes at a time)");
  check_cuda(mailbox, "mailbox", x);
  TORCH_CHECK_TYPE(mailbox.scalar_type() == at::kLong, "decdec: mailbox must be int64");
  TORCH_CHECK(mailbox.is_contiguous() && mailbox.numel() >= x.size(0) * N,
                    "decdec: mailbox must be contiguous with at least tokens x out_features = ", S(x.size(0) * N),
                    " elements, got ", S(mailbox.numel()));
  TORCH_CHECK(n_tb >= 1, "decdec: n_tb must be at least 1, got ", S(n_tb));
  int64_t k_total;
  if (channels.has_value()) {
    check_cuda(*channels, "channels", x);
    TORCH_CHECK_TYPE(channels->scalar_type() == at::kLong, "decdec: channels must be int64");
    TORCH_CHECK(channels->dim() == 2 && channels->size(0) == x.size(0) && channels->size(1) <= K,
                      "decdec: channels must be [", S(x.size(0)), ", k <= ", S(K), "], got ", S(channels->sizes()));
    k_total = channels->size(1);
  } else {
    check_envelope(envelope, x, K);
    k_total = total_selected(K, k_chunk);
  }
  if (k_total == 0) {  // nothing to compensate: the plain GEMV, exactly the same output
    launch(p);
    return out;
  }
  const int64_t pieces = residual_stride / 16;
  p.n_tb = int(std::min<int64_t>(n_tb, pieces));
  p.envelope = envelope.data_ptr<float>();
  p.k_chunk = int(k_chunk);
  p.k_total = int(k_total);
  p.channels = channels.has_value() ? channels->data_ptr<int64_t>() : nullptr;
  p.residual = reinterpret_cast<const uint8_t*>(residual_ptr);
  p.res_stride = residual_stride;
  p.res_scales = residual_scales.data_ptr();
  p.res_scales_on_host = scales_on_host;
  p.mailbox = reinterpret_cast<unsigned long long*>(mailbox.data_ptr<int64_t>());
  TORCH_CHECK(decdec::gemv_smem_bytes(p) <= 227 * 1024, "decdec: ", S(k_total),
                    " selected channels need more shared memory than a block has; lower k_chunk");
  launch(p);
  return out;
}

// The checks of both selection ops; returns the number of channels each token selects.
int64_t check_selection_args(const Tensor& x, const Tensor& envelope, int64_t k_chunk) {
  TORCH_CHECK(x.dim() == 2, "decdec: x must be [tokens, d_in], got ", S(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), "decdec: x must be contiguous");
  dtype_code(x);
  check_envelope(envelope, x, x.size(1));
  return total_selected(x.size(1), k_chunk);
}

Tensor select_channels(const Tensor& x, const Tensor& envelope, int64_t k_chunk) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const int64_t k_total = check_selection_args(x, envelope, k_chunk);
  Tensor out = at::empty({x.size(0), k_total}, x.options().dtype(at::kLong));
  const cudaError_t err = decdec::launch_select(x.data_ptr(), dtype_code(x), int(x.size(0)), int(x.size(1)),
                                                envelope.data_ptr<float>(), int(k_chunk), int(k_total),
                                                out.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decdec: selection launch failed: ", cudaGetErrorString(err));
  return out;
}

Tensor select_masked(const Tensor& x, const Tensor& envelope, int64_t k_chunk) {
  const c10::cuda::CUDAGuard guard(cuda_device(x, "x"));
  const int64_t k_total = check_selection_args(x, envelope, k_chunk);
  Tensor out = at::empty({x.size(0), 2 * x.size(1)}, x.options());
  const cudaError_t err = decdec::launch_select_masked(x.data_ptr(), dtype_code(x), int(x.size(0)), int(x.size(1)),
                                                       envelope.data_ptr<float>(), int(k_chunk), int(k_total),
                                                       out.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decdec: masked selection launch failed: ", cudaGetErrorString(err));
  return out;
}

Tensor dequantize(const Tensor& qweight, const Tensor& meta, int64_t fmt, int64_t bits, int64_t group_size,
                  int64_t out_features, int64_t in_features, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(cuda_device(qweight, "qweight"));
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16, "decdec: dtype must be float16 or bfloat16");
  check_weight(qweight, qweight, meta, fmt, bits, group_size, out_features, in_features);
  Tensor out = at::empty({out_features, in_features}, qweight.options().dtype(dtype));
  const cudaError_t err = decdec::launch_dequantize(
      qweight.data_ptr(), meta.data_ptr(), int(fmt), int(bits), dtype == at::kHalf ? decdec::kHalf : decdec::kBFloat16,
      fmt == decdec::kUniform ? int(group_size) : 1, int(out_features), int(in_features), out.data_ptr(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decdec: dequantize launch failed: ", cudaGetErrorString(err));
  return out;
}

void check_attention_operand(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "decdec: ", name, " must be on ", q.device(), ", got ",
              t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "decdec: ", name, " dtype ", t.scalar_type(), " differs from q ",
                   q.scalar_type());
  TORCH_CHECK(t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0,
              "decdec: ", name, " must have a contiguous last dimension, 4-byte aligned");
  for (int d = 0; d + 1 < t.dim(); ++d)
    TORCH_CHECK(t.stride(d) % 2 == 0, "decdec: ", name, " needs even strides, got ", S(t.strides()));
}

Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                        double scale, const Tensor& counters) {
  const c10::cuda::CUDAGuard guard(cuda_device(q, "q"));
  const int dt = dtype_code(q);
  TORCH_CHECK(q.dim() == 3, "decdec: q must be [batch, heads, head_dim], got ", S(q.sizes()));
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(),
              "decdec: k and v must be [batch, kv_heads, positions, head_dim] alike, got ", S(k.sizes()), " and ",
              S(v.sizes()));
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "decdec: k ", S(k.sizes()), " does not match q ", S(q.sizes()));
  TORCH_CHECK(D % 2 == 0 && D <= decdec::kMaxAttentionHeadDim, "decdec: head_dim must be even and at most ",
              S(int64_t(decdec::kMaxAttentionHeadDim)), ", got ", S(D));
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0 && Hq / Hkv <= decdec::kMaxAttentionGroup, "decdec: ", S(Hq),
              " query heads over ", S(Hkv), " kv heads: need a whole group of at most ",
              S(int64_t(decdec::kMaxAttentionGroup)));
  TORCH_CHECK(B >= 1 && L >= 1 && L < (int64_t(1) << 30), "decdec: empty or too long attention: ", S(k.sizes()));
  check_attention_operand(q, "q", q);
  check_attention_operand(k, "k", q);
  check_attention_operand(v, "v", q);
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_cuda() && mask->device() == q.device(), "decdec: mask must be on ", q.device());
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "decdec: mask must be bool (true: attend)");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L && mask->stride(1) == 1,
                "decdec: mask must be [", S(B), ", ", S(L), "] with contiguous positions, got ", S(mask->sizes()));
  }
  check_cuda(counters, "counters", q);
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kInt, "decdec: counters must be int32");
  TORCH_CHECK(counters.numel() >= B * Hkv, "decdec: counters needs at least batch x kv_heads = ", S(B * Hkv),
              " elements, got ", S(counters.numel()));

  decdec::DecodeAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.mask_stride_b = mask.has_value() ? mask->stride(0) : 0;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_s = v.stride(2);
  p.scale = float(scale);
  p.dtype = dt;
  p.B = int(B);
  p.q_heads = int(Hq);
  p.kv_heads = int(Hkv);
  p.group = int(Hq / Hkv);
  p.head_dim = int(D);
  p.S = int(L);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device());
  decdec::plan_decode_attention(p, sms);
  Tensor out = at::empty({B, Hq, D}, q.options());
  Tensor partial;
  if (p.splits > 1) {
    partial = at::empty({B * Hkv * p.splits * p.group * (D + 2)}, q.options().dtype(at::kFloat));
    p.partial_out = partial.data_ptr<float>();
    p.partial_ml = p.partial_out + B * Hkv * p.splits * p.group * D;
  }
  p.counters = counters.data_ptr<int>();
  p.out = out.data_ptr();
  const cudaError_t err = decdec::launch_decode_attention(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decdec: decode attention launch failed: ", cudaGetErrorString(err));
  return out;
}

// Pinned, mapped, portable host memory as a CPU uint8 tensor; the GPU reads it through the same
// address (unified addressing), checked here once.
Tensor alloc_pinned(int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "decdec: cannot pin ", S(nbytes), " bytes");
  void* ptr = nullptr;
  const cudaError_t err = cudaHostAlloc(&ptr, size_t(nbytes), cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    TORCH_CHECK(false, "decdec: could not pin ", S(nbytes), " bytes of host memory for the residual (", cudaGetErrorString(err),
                "). Pinned memory counts against the locked-memory limit: raise it (`ulimit -l unlimited`, "
                "memlock in /etc/security/limits.conf, or `docker run --ulimit memlock=-1`), free host memory, or "
                "run with fewer compensated layers on the GPU.");
  }
  void* dev = nullptr;
  const cudaError_t err2 = cudaHostGetDevicePointer(&dev, ptr, 0);
  if (err2 != cudaSuccess || dev != ptr) {
    cudaFreeHost(ptr);
    TORCH_CHECK(false, "decdec: pinned memory is not mapped at the same address on the GPU (", cudaGetErrorString(err2),
                "): zero-copy needs unified addressing");
  }
  return torch::from_blob(ptr, {nbytes}, [](void* p) { cudaFreeHost(p); },
                          torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCPU));
}

// Benchmarks: `count` SMs held by a waiting kernel on the current stream until release[0] != 0.
void hold_sms(const Tensor& release, int64_t count, double timeout_s) {
  const c10::cuda::CUDAGuard guard(cuda_device(release, "release"));
  TORCH_CHECK_TYPE(release.scalar_type() == at::kInt && release.numel() >= 1, "decdec: release must be an int32 tensor");
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, release.get_device());
  TORCH_CHECK(count >= 1 && count < sms, "decdec: can hold 1 to ", S(sms - 1), " SMs, asked for ", S(count));
  TORCH_CHECK(timeout_s > 0, "decdec: timeout must be positive");
  const cudaError_t err = decdec::launch_hold_sms(release.data_ptr<int>(), int(count), timeout_s,
                                                  at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decdec: hold_sms launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(decdec, CUDA, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_dec", &gemv_dec);
  m.impl("select_channels", &select_channels);
  m.impl("select_masked", &select_masked);
  m.impl("dequantize", &dequantize);
  m.impl("decode_attention", &decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DecDEC CUDA kernels (ops are registered under torch.ops.decdec)";
  m.def("alloc_pinned", &alloc_pinned, "pinned, mapped host memory as a uint8 CPU tensor", pybind11::arg("nbytes"));
  m.def("hold_sms", &hold_sms, "hold SMs with a waiting kernel on the current stream until release[0] != 0",
        pybind11::arg("release"), pybind11::arg("count"), pybind11::arg("timeout_s"));
  m.def("dependent_launch", &decdec::dependent_launch_enabled,
        "whether the GEMV and attention kernels are launched dependent (sm_90+, DECDEC_DEPENDENT_LAUNCH != 0)");
}
