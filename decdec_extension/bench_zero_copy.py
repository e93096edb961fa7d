"""How fast can GPU threads read pinned host memory (zero-copy), next to the copy engine? The
ceiling behind the DEC kernel's fetch (issue 5: fetch >= 90 % of pinned cudaMemcpy).

A minimal gather kernel (compiled here with torch's inline loader; needs nvcc) reads whole residual
rows of `--row-bytes` at random, distinct row indices, fresh rows on every call (no L2 reuse; then,
for contrast, the same rows every call, which the L2 may serve), with U 16-byte loads in flight
per thread, over a range of block counts; nothing else runs. Each
setting is timed with CUDA events over many back-to-back calls; the reference is a 256 MiB pinned
host -> device cudaMemcpy (the copy engine's peak, as bench_dec.py measures it) timed in the same
run. Prints a table, writes JSON.

    python decdec_extension/bench_zero_copy.py --out results/h100/bench_zero_copy.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from decdec import ops
from decdec.timing import device_name, pcie_bandwidth, time_call

CUDA_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

// Block b reads rows rows[b], rows[b + gridDim.x], ...; its threads take the row's 16-byte pieces,
// U rows at a time per thread, so U loads are in flight before the first one is used.
template <int U>
__global__ void gather_rows(const uint4* __restrict__ host, const int* __restrict__ rows, int n_rows,
                            int pieces, unsigned* __restrict__ sink) {
  unsigned acc = 0;
  for (int r0 = blockIdx.x; r0 < n_rows; r0 += gridDim.x * U) {
    for (int p = threadIdx.x; p < pieces; p += blockDim.x) {
      uint4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int r = r0 + u * gridDim.x;
        v[u] = r < n_rows ? host[size_t(rows[r]) * pieces + p] : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads; practically never true
}

void gather(int64_t host_ptr, torch::Tensor rows, int64_t row_bytes, int64_t blocks, int64_t in_flight,
            torch::Tensor sink) {
  TORCH_CHECK(row_bytes % 16 == 0, "row_bytes must be a multiple of 16");
  const int pieces = int(row_bytes / 16), n = int(rows.numel());
  const int threads = std::min(256, ((pieces + 31) / 32) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* src = reinterpret_cast<const uint4*>(host_ptr);
  const int* r = rows.data_ptr<int>();
  unsigned* s = reinterpret_cast<unsigned*>(sink.data_ptr<int>());
  switch (in_flight) {
    case 1: gather_rows<1><<<blocks, threads, 0, stream>>>(src, r, n, pieces, s); break;
    case 4: gather_rows<4><<<blocks, threads, 0, stream>>>(src, r, n, pieces, s); break;
    case 8: gather_rows<8><<<blocks, threads, 0, stream>>>(src, r, n, pieces, s); break;
    default: TORCH_CHECK(false, "in_flight must be 1, 4 or 8");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""
CPP_SRC = "void gather(int64_t host_ptr, torch::Tensor rows, int64_t row_bytes, int64_t blocks, int64_t in_flight, torch::Tensor sink);"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row-bytes", type=int, nargs="+", default=[2048, 7168, 14336],
                   help="bytes per residual row (out_features / 2: 4096, 14336, 28672 outputs)")
    p.add_argument("--rows-per-call", type=int, default=1024, help="rows gathered by one call")
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32, 64, 132, 264])
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 8], choices=[1, 4, 8])
    p.add_argument("--host-mib", type=int, default=512, help="pinned buffer the rows are drawn from")
    p.add_argument("--calls", type=int, default=200, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per setting (median kept)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p


def timed(fn, calls: int, repeats: int, device: torch.device) -> float:
    """Median seconds per call of ``fn(i)`` over ``repeats`` timings of ``calls`` back-to-back calls."""
    return time_call(lambda: [fn(i) for i in range(calls)], device, cuda_graph=False, repeats=repeats) / calls


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if not ops.available():
        sys.exit("error: needs a CUDA device and the decdec._C extension (for pinned mapped memory)")
    dev = torch.device("cuda")
    ext = load_inline("decdec_bench_zero_copy", CPP_SRC, cuda_sources=CUDA_SRC, functions=["gather"],
                      extra_cuda_cflags=["-O3"], verbose=False)
    host = ops.alloc_pinned(args.host_mib << 20)
    host.view(torch.int32).random_()
    sink = torch.zeros(1, dtype=torch.int32, device=dev)
    memcpy = pcie_bandwidth(dev)
    records = []
    for row_bytes in args.row_bytes:
        n_host_rows = host.numel() // row_bytes
        if n_host_rows < 2 * args.rows_per_call:
            sys.exit(f"error: --host-mib holds only {n_host_rows} rows of {row_bytes} bytes")
        # fresh rows on every call: a rotating set of disjoint random draws
        draws = torch.randperm(n_host_rows)[: (n_host_rows // args.rows_per_call) * args.rows_per_call]
        sets = draws.view(-1, args.rows_per_call).to(torch.int32).to(dev)
        nbytes = args.rows_per_call * row_bytes
        settings = [(f, b, True) for f in args.in_flight for b in args.blocks]
        settings += [(max(args.in_flight), b, False) for b in args.blocks]  # the same rows every call
        for in_flight, blocks, fresh in settings:
            t = timed(lambda i: ext.gather(host.data_ptr(), sets[i % sets.shape[0] if fresh else 0], row_bytes,
                                           blocks, in_flight, sink), args.calls, args.repeats, dev)
            records.append({"row_bytes": row_bytes, "rows_per_call": args.rows_per_call, "blocks": blocks,
                            "in_flight": in_flight, "fresh_rows": fresh, "us_per_call": t * 1e6,
                            "GBps": nbytes / t / 1e9, "memcpy_GBps": memcpy / 1e9, "share_of_memcpy": nbytes / t / memcpy})
    result = {"device": device_name(dev), "torch": torch.__version__, "records": records}
    print(f"{result['device']}: zero-copy gather, {args.rows_per_call} rows per call; "
          f"pinned cudaMemcpy {memcpy / 1e9:.1f} GB/s")
    print("| row bytes | rows | loads in flight | blocks | us per call | GB/s | share of memcpy |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        rows = "fresh" if r["fresh_rows"] else "same"
        print(f"| {r['row_bytes']} | {rows} | {r['in_flight']} | {r['blocks']} | {r['us_per_call']:.1f} "
              f"| {r['GBps']:.1f} | {100 * r['share_of_memcpy']:.0f} % |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
