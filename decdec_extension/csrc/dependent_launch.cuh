// Programmatic dependent launch (sm_90 and later). A kernel launched this way may start while the
// kernel before it in the stream is still running: its blocks take SMs as that kernel's blocks
// leave and can load what no kernel writes (quantized weights) before the earlier kernel is done.
// Everything that reads what an earlier kernel wrote, or writes what it may still read, comes
// after wait_for_previous_kernels(). Our kernels let the next kernel start right after their wait,
// as Inductor's do (torch.compile with triton.enable_pdl; decdec.generation turns it on): since
// every kernel waits before it lets the next one start, no kernel runs ahead of one it does not
// wait on. Both instructions are no-ops in an ordinary launch.
//
// It pays only when the kernels around ours take part too. Compiled decode step of a 3-bit
// Llama-3-8B on the H200, DecDEC off (results/h200/dependent_launch_call*.txt): neither 2.365
// ms/token, Inductor's alone 2.386, ours alone 2.368 (measured with ours letting the next kernel
// start only at their end), both 2.169.
#pragma once
#include <utility>

#include <cuda_runtime.h>

#include "decdec_kernels.h"

namespace decdec {

__device__ __forceinline__ void wait_for_previous_kernels() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The next kernel in the stream may start (if it was launched dependent); it waits for this one
// before it reads its results.
__device__ __forceinline__ void let_next_kernel_start() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchAttribute dependent;
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  if (dependent_launch_enabled()) {
    config.attrs = &dependent;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace decdec
