// CPU implementation of torch.ops.decdec.select_channels (schema and fake in decdec/ops.py): DecDEC's
// selection of DESIGN.md for many tokens at once, for decode-equivalent evaluation on the CPU, where
// the same selection written with torch ops (two top-k passes per chunk) costs as much as the model.
// Built as its own module, decdec._cpu, with the host compiler alone, so CPU-only installs have it.
//
// The rule, from counts only (as the CUDA kernel does): with the running minima of the 32 lower
// bucket edges, bucket(|x|) <= b exactly when |x| >= min(edges[0..b]), so the threshold bucket tb of
// a chunk is the smallest b whose count of |x| >= that minimum reaches the quota (b = 32, NaN's
// bucket, always does); every channel of a bucket below tb is taken, then those of bucket tb,
// lowest index first. Comparisons are in fp32 on |x| converted from the activation dtype; NaN
// compares false with every edge, and a NaN edge holds for no |x|.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kChunk = 1024;
constexpr int kBuckets = 32;

std::string S(int64_t v) { return std::to_string(v); }

// Running minima of DESIGN.md's lower edges for b_hi = envelope[0], b_lo = envelope[k - 1], in fp32
// exactly as selection.bucket_edges computes them (no fast-math in this file). std::fmin skips NaN.
std::array<float, kBuckets> running_min_edges(float b_hi, float b_lo) {
  std::array<float, kBuckets> edge{};
  for (int i = 0; i < kBuckets; ++i) {
    const float e = i < 16 ? b_hi - ((b_hi - b_lo) * float(i)) / 15.0f : (b_lo * float(31 - i)) / 16.0f;
    edge[i] = i == 0 ? e : std::fmin(edge[i - 1], e);
  }
  return edge;
}

int64_t count_at_least(const float* a, int64_t n, float edge) {
  int32_t c = 0;  // 32-bit lanes: the compare-and-add vectorises
  for (int64_t j = 0; j < n; ++j) c += a[j] >= edge ? 1 : 0;
  return c;
}

// The bucket of the chunk's largest |x| (NaN skipped; 32 when every value is NaN): no count below it
// is positive, and its own is, so it is the threshold bucket of a quota of 1.
int top_bucket(const float* a, int64_t len, const std::array<float, kBuckets>& edge) {
  // 16 running maxima, so that the loop vectorises (MAXPS) without a reduction; NaN compares false.
  // They start below every |x|, and stay there when every value is NaN.
  float lanes[16];
  std::fill(lanes, lanes + 16, -1.0f);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16)
    for (int i = 0; i < 16; ++i) lanes[i] = a[j + i] > lanes[i] ? a[j + i] : lanes[i];
  for (; j < len; ++j) lanes[0] = a[j] > lanes[0] ? a[j] : lanes[0];
  const float top = *std::max_element(lanes, lanes + 16);
  if (top < 0.0f) return kBuckets;
  int b = 0;
  while (b < kBuckets && !(top >= edge[b])) ++b;
  return b;
}

// One chunk of |x| (a[0..len)): writes its quota of channels, ascending, at out; returns the count.
int64_t select_chunk(const float* a, int64_t len, int64_t quota, int64_t first_channel,
                     const std::array<float, kBuckets>& edge, int64_t* out) {
  // threshold bucket in [lo, hi]; hi = 32 always qualifies. A quota of 1 takes one max pass instead
  // of the ~5 count passes; for larger quotas the extra pass costs more than it saves.
  int lo = 0, hi = kBuckets;
  if (quota == 1) lo = hi = top_bucket(a, len, edge);
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (count_at_least(a, len, edge[mid]) >= quota) hi = mid;
    else lo = mid + 1;
  }
  const int tb = lo;
  const float above_edge = tb > 0 ? edge[tb - 1] : INFINITY;  // bucket < tb: |x| >= above_edge (none for tb = 0)
  int64_t room = quota - (tb > 0 ? count_at_least(a, len, above_edge) : 0);
  int64_t n = 0;
  if (tb == kBuckets) {  // NaN fills the quota: every channel is a candidate, in order
    for (int64_t j = 0; j < len && n < quota; ++j) {
      const bool above = a[j] >= above_edge;
      if (above || room > 0) {
        out[n++] = first_channel + j;
        room -= !above;
      }
    }
    return n;
  }
  // Few channels have bucket <= tb (|x| >= edge[tb]): find them 16 at a time by a bit mask.
  const float at_edge = edge[tb];  // bucket <= tb
  for (int64_t j0 = 0; j0 < len; j0 += 16) {
    const int64_t width = std::min<int64_t>(16, len - j0);
    uint32_t hits = 0;
    for (int64_t i = 0; i < width; ++i) hits |= uint32_t(a[j0 + i] >= at_edge) << i;
    for (; hits; hits &= hits - 1) {
      const int64_t j = j0 + __builtin_ctz(hits);
      const bool above = a[j] >= above_edge;
      if (above || room > 0) {
        out[n++] = first_channel + j;
        room -= !above;
        if (n == quota) return n;
      }
    }
  }
  return n;
}

template <typename T>
void select_rows(const T* x, int64_t tokens, int64_t K, const std::array<float, kBuckets>& edge, int64_t k_chunk,
                 int64_t k_total, int64_t* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> a(std::min(K, kChunk));
    for (int64_t t = begin; t < end; ++t) {
      int64_t* row_out = out + t * k_total;
      for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
        const int64_t len = std::min(kChunk, K - c0);
        const int64_t quota = len == kChunk ? k_chunk : k_chunk * len / kChunk;
        if (quota == 0) continue;
        const T* src = x + t * K + c0;
        for (int64_t j = 0; j < len; ++j) a[j] = std::fabs(static_cast<float>(src[j]));
        row_out += select_chunk(a.data(), len, quota, c0, edge, row_out);
      }
    }
  });
}

Tensor select_channels(const Tensor& x, const Tensor& envelope, int64_t k_chunk) {
  TORCH_CHECK(x.device().is_cpu() && envelope.device().is_cpu(), "decdec: the CPU selection takes CPU tensors");
  TORCH_CHECK(x.dim() == 2, "decdec: x must be [tokens, d_in], got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_contiguous(), "decdec: x must be contiguous");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "decdec: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t K = x.size(1);
  TORCH_CHECK(K >= 1, "decdec: x has no channels");
  TORCH_CHECK_TYPE(envelope.scalar_type() == at::kFloat, "decdec: envelope must be float32");
  TORCH_CHECK(envelope.dim() == 1 && envelope.size(0) == K && envelope.is_contiguous(),
              "decdec: envelope must be a contiguous [", S(K), "]");
  TORCH_CHECK(k_chunk >= 0 && k_chunk <= kChunk, "decdec: k_chunk must be in 0..", S(kChunk), ", got ", S(k_chunk));
  const int64_t k_total = (K / kChunk) * k_chunk + k_chunk * (K % kChunk) / kChunk;
  Tensor out = at::empty({x.size(0), k_total}, x.options().dtype(at::kLong));
  if (k_total == 0 || x.size(0) == 0) return out;
  const float* env = envelope.data_ptr<float>();
  const auto edge = running_min_edges(env[0], env[k_total - 1]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "decdec_select_channels_cpu", [&] {
    select_rows<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), K, edge, k_chunk, k_total, out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(decdec, CPU, m) { m.impl("select_channels", &select_channels); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DecDEC CPU kernels (ops are registered under torch.ops.decdec)";
}
