"""Timing on the GPU without a profiler: CUDA events over CUDA graph replays, and the two
bandwidths DecDEC's cost depends on (device memory, host -> device over PCIe)."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()})"


def _event_times(run: Callable[[], None], repeats: int, device: torch.device,
                 refresh: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run``, timed with CUDA events (``refresh`` runs
    before each, untimed)."""
    out = []
    for _ in range(repeats):
        if refresh is not None:
            refresh()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e-3)
    return out


@contextmanager
def sms_held(count: int, device: torch.device | str) -> Iterator[None]:
    """``count`` SMs taken by a waiting kernel on a side stream while the block runs, as another
    kernel running beside the timed one would take them. Nothing in the block may synchronize the
    device (the waiting kernel ends only after it, or after a 5 s timeout)."""
    if count == 0:
        yield
        return
    from . import ops
    device = torch.device(device)
    release = torch.zeros(1, dtype=torch.int32, device=device)
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        ops.hold_sms(release, count)
    time.sleep(0.01)  # the held blocks are placed within microseconds on an idle GPU
    try:
        yield
    finally:
        release.fill_(1)
        side.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str, *, cuda_graph: bool = True,
              warmup: int = 3, repeats: int = 15, refresh: Callable[[], object] | None = None,
              hold_sms: int = 0) -> float:
    """Median seconds of one call of ``fn``. On CUDA ``fn`` is captured once as a CUDA graph (after
    warm-up calls on a side stream) and the replays are timed with events; ``cuda_graph=False``
    times eager calls with events. On CPU: wall-clock time of eager calls. ``refresh`` (say, new
    values for the inputs ``fn`` reads) runs before every timed call and is not timed.
    ``hold_sms``: that many SMs are held by another kernel during the timed replays (:func:`sms_held`)."""
    device = torch.device(device)
    if hold_sms and device.type != "cuda":
        raise ValueError("hold_sms needs a CUDA device")
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if refresh is not None:
                refresh()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    if not cuda_graph:
        for _ in range(warmup):
            fn()
        with sms_held(hold_sms, device):
            return statistics.median(_event_times(fn, repeats, device, refresh))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    with sms_held(hold_sms, device):
        times = _event_times(graph.replay, repeats, device, refresh)
    del graph
    return statistics.median(times)


def memory_bandwidth(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of device memory: the better of a copy (read + write) and a reduction (read only)
    over a buffer far larger than the L2 cache."""
    device = torch.device(device)
    x = torch.ones(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    copy = time_call(lambda: y.copy_(x), device, cuda_graph=False, repeats=10)
    read = time_call(lambda: x.sum(), device, cuda_graph=False, repeats=10)
    return max(2 * nbytes / copy, nbytes / read)


def pcie_bandwidth(device: torch.device | str, nbytes: int = 256 << 20) -> float:
    """Bytes/s of a pinned host -> device copy."""
    device = torch.device(device)
    host = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / time_call(lambda: dev.copy_(host, non_blocking=True), device, cuda_graph=False, repeats=5)


def l2_cache_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
