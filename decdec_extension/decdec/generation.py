"""Token generation with a static KV cache, shared by chat, the generation benchmark and the main job.

Prefill runs the model eagerly on the whole prompt (multi-token inputs take the prefill path of
every linear). Each further token is one *decode step* on a one-token input; on CUDA that step is
captured once as a CUDA graph and replayed, so a token costs one graph launch instead of
hundreds of kernel launches from Python. The static cache keeps all its state on the device
(key/value tensors and the write position, which the captured step itself advances), so the same
graph serves every position of an *attention window*: the decode step attends over the first W
positions of the cache only (W: a power-of-two multiple of ``window_base`` that covers the
position, or the whole cache), since the positions not written yet are masked anyway. Attention
then reads what the context holds rather than the whole cache, and each window has its graph.
On CUDA, decode steps run their attention through DecDEC's decode kernel (``decdec.attention``)
rather than SDPA, which also skips the positions not written yet.

The graph is captured for the DecDEC settings in force (mode, k_chunk, n_tb, scales_on_host of
every selection group); changing them re-captures it on the next step. A model whose decode step
cannot be captured (say, the reference DecDEC path on CUDA, which reads host memory
synchronously) falls back to eager steps with a warning. On CPU every step is eager.
"""
from __future__ import annotations

import copy
import functools
import inspect
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import ops
from .attention import implementation_for
from .prepared import selection_groups


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (ending with EOS when generation stopped there)
    prompt_tokens: int
    prefill_s: float  # prompt -> first new token
    decode_s: float  # the decode steps
    decode_steps: int  # steps run (a few more than len(tokens) - 1 when EOS was seen late)
    cuda_graph: bool  # whether the decode steps ran as a CUDA graph

    @property
    def ms_per_token(self) -> float:
        """Decode time per token (prefill excluded)."""
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decode rate (prefill excluded)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    def to_json(self) -> dict:
        return {"new_tokens": len(self.tokens), "prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "ms_per_token": self.ms_per_token, "tokens_per_s": self.tokens_per_s,
                "cuda_graph": self.cuda_graph}


def decdec_settings(groups: list) -> tuple:
    """What a captured decode step depends on besides its inputs: every group's selection settings."""
    return tuple((g.mode, g.k_chunk, g.n_tb, g.scales_on_host) for g in groups)


def cache_kwarg(model: nn.Module) -> str:
    """The name of the model's forward argument for the KV cache: newer transformers releases call
    past_key_values "cache" and warn on the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_config(config, max_len: int):
    """The config the static cache is built from. A sliding window at least ``max_len`` long never
    slides, so its layers can be plain static layers (attention is the same): those keep no
    Python-side position, which a captured graph would freeze."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    if window is None or window < max_len:
        return config
    config = copy.deepcopy(config)
    text = config.get_text_config(decoder=True)
    text.sliding_window = None
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention" if t == "sliding_attention" else t for t in text.layer_types]
    return config


@functools.cache
def _windowed_layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class WindowedStaticLayer(StaticLayer):
        """A static cache layer whose keys, values and mask stop after its first ``window``
        positions (None: all of them)."""

        window: int | None = None

        def update(self, *args, **kwargs):
            keys, values = super().update(*args, **kwargs)
            if self.window is None:
                return keys, values
            return keys[:, :, :self.window], values[:, :, :self.window]

        def get_mask_sizes(self, *args, **kwargs):
            kv_length, kv_offset = super().get_mask_sizes(*args, **kwargs)
            return (kv_length if self.window is None else min(kv_length, self.window)), kv_offset

    return WindowedStaticLayer


def sync_device(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inductor_options(device: torch.device) -> dict:
    """Inductor's kernels launched dependent, as ours are (ops.dependent_launch), so that each starts
    during the tail of the one before. Only both together pay (csrc/dependent_launch.cuh): 3-bit
    Llama-3-8B on the H200, compiled step 2.365 ms/token, with both 2.169."""
    from torch._inductor import config
    if device.type == "cuda" and ops.dependent_launch() and hasattr(config.triton, "enable_pdl"):
        return {"triton.enable_pdl": True}
    return {}


class DecodeSession:
    """A model, a static KV cache of ``max_len`` positions and (on CUDA) its captured decode step.

    Batch 1. One session serves any number of :meth:`generate` calls whose prompt plus new tokens
    fit in ``max_len``; keep it alive to reuse the graph.

    ``compile``: the decode step goes through ``torch.compile`` (no CUDA graphs of its own) before
    it is captured, which fuses the many small element-wise kernels of norms, rotary embeddings and
    activations. Each DecDEC setting and attention window compiles again (tens of seconds for an 8B
    model); a failure falls back to the plain step.

    ``window_base``: the smallest attention window (module docstring); None attends over the whole
    cache at every position.

    ``decode_attention``: run attention through ``decdec.attention`` (default: on CUDA when the
    extension is built) rather than SDPA; a model on another implementation keeps it.
    """

    def __init__(self, model: nn.Module, max_len: int, cuda_graph: bool | None = None, compile: bool = False,
                 window_base: int | None = 512, decode_attention: bool | None = None):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
        if window_base is not None and window_base < 1:
            raise ValueError(f"window_base must be positive or None, got {window_base}")
        self.model = model
        self.device = next(model.parameters()).device
        self.groups = selection_groups(model)  # looked up once: a module walk per token would cost
        self.max_len = max_len
        self.window_base = window_base
        self.attention = implementation_for(model, decode_attention)  # set on the model before each forward
        self.cache = StaticCache(config=_cache_config(model.config, max_len), max_cache_len=max_len)
        self._cache_kwarg = cache_kwarg(model)
        # sliding-window layers keep their own attention span; the others get windows
        self._windowed = [layer for layer in self.cache.layers if type(layer) is StaticLayer] if window_base else []
        for layer in self._windowed:
            layer.__class__ = _windowed_layer_class()
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graph_error: str | None = None
        # captured steps by attention window, for the DecDEC settings _graph_settings, in one memory
        # pool (they never run at the same time)
        self._graphs: dict[int | None, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._graph_settings: tuple | None = None
        self._graph_pool = None
        self._length = 0  # positions of the cache written so far
        self._input = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.compiled = compile
        self._decode = (torch.compile(self._forward, dynamic=False, options=_inductor_options(self.device))
                        if compile else self._forward)

    # ------------------------------------------------------------ model calls

    def _use_attention(self) -> None:
        # the implementation is a model-wide setting; sessions that share a model may differ
        if self.model.config._attn_implementation != self.attention:
            self.model.config._attn_implementation = self.attention

    def _forward(self, input_ids: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, **{self._cache_kwarg: self.cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _positions(self) -> list[Tensor]:
        return [layer.cumulative_length for layer in self.cache.layers if isinstance(layer.cumulative_length, Tensor)]

    @property
    def graphs_captured(self) -> int:
        """Decode steps captured for the current DecDEC settings (one per attention window used)."""
        return len(self._graphs)

    def window_for(self, length: int) -> int | None:
        """The attention window of a forward pass over the cache's first ``length`` positions."""
        if self.window_base is None:
            return None
        window = self.window_base
        while window < length:
            window *= 2
        return window if window < self.max_len else None

    def _set_window(self, length: int) -> int | None:
        window = self.window_for(length)
        for layer in self._windowed:
            layer.window = window
        return window

    def _graph_ok(self) -> bool:
        from transformers.cache_utils import StaticLayer
        # sliding-window layers track their position in a Python int, which a graph would freeze
        if any(type(layer) not in (StaticLayer, _windowed_layer_class()) for layer in self.cache.layers):
            self.graph_error = "cache layers other than StaticLayer (sliding window?) keep Python-side state"
            return False
        return True

    def _capture(self, window: int | None) -> None:
        """Captures one decode step reading ``self._input``. The eager warm-up steps write the cache
        slot of the current position and advance the write position; it is put back after each, so
        the replayed step writes that slot again, and positions stay right."""
        saved = [p.clone() for p in self._positions()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy allocations, compilation and autotuning happen outside the capture
                self._decode(self._input)
                for p, v in zip(self._positions(), saved):
                    p.copy_(v)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._graph_pool):
                logits = self._decode(self._input)
        finally:
            for p, v in zip(self._positions(), saved):
                p.copy_(v)
        self._graphs[window] = (graph, logits)

    def _ensure_graph(self, window: int | None) -> bool:
        if not self.use_graph:
            return False
        settings = decdec_settings(self.groups)
        if settings != self._graph_settings:  # free the old graphs' pool before capturing again
            self._graphs, self._graph_pool, self._graph_settings = {}, None, settings
        if window in self._graphs:
            return True
        if not self._graph_ok():
            self.use_graph = False
        else:
            try:
                self._capture(window)
                return True
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                self.graph_error = f"{type(e).__name__}: {e}".splitlines()[0]
                torch.cuda.synchronize(self.device)
                if self.compiled:  # try once more without torch.compile
                    warnings.warn(f"compiled decode step failed, using the plain one: {self.graph_error}")
                    self.compiled, self._decode = False, self._forward
                    self._graphs, self._graph_pool = {}, None
                    return self._ensure_graph(window)
                self.use_graph = False
        warnings.warn(f"decode step not captured as a CUDA graph, running eagerly: {self.graph_error}")
        return False

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Resets the cache and runs the prompt [1, T]; returns the next-token logits [1, V]."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"expected prompt ids of shape [1, T], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens does not fit a cache of {self.max_len}")
        self.cache.reset()
        self._use_attention()
        self._set_window(input_ids.shape[1])
        logits = self._forward(input_ids.to(self.device))
        self._length = input_ids.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feeds one token [1, 1] (on the device) and returns the next-token logits [1, V]. The
        returned tensor of a graph replay is overwritten by the next step."""
        if self._length >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} positions is full")
        self._input.copy_(token)
        self._use_attention()
        window = self._set_window(self._length + 1)
        self._length += 1
        if self._ensure_graph(window):
            graph, logits = self._graphs[window]
            graph.replay()
            return logits
        return self._decode(self._input)

    # ------------------------------------------------------------ the loop

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 eos_token_id: int | list[int] | None = None, on_tokens: Callable[[list[int]], None] | None = None,
                 check_every: int = 16, generator: torch.Generator | None = None) -> GenerationResult:
        """Greedy (``temperature`` 0) or sampled generation of up to ``max_new_tokens`` after the
        prompt [1, T]. ``on_tokens`` receives the new tokens as they are read back: every token when
        it is given (streaming), otherwise tokens are read back every ``check_every`` steps (to
        stop at EOS) or only at the end when there is no EOS: no host round trip per token."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        prompt_len = input_ids.shape[-1]
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(f"{prompt_len} prompt + {max_new_tokens} new tokens exceed the cache of {self.max_len}")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        every = 1 if on_tokens is not None else (check_every if eos else max_new_tokens)
        out = torch.empty(1, max_new_tokens, dtype=torch.long, device=self.device)

        sync_device(self.device)
        t0 = time.perf_counter()
        out[:, 0:1] = _pick(self.prefill(input_ids), temperature, top_k, generator)
        sync_device(self.device)
        t1 = time.perf_counter()
        tokens: list[int] = []
        done, steps = False, 0
        for i in range(1, max_new_tokens + 1):
            if i == max_new_tokens or i % every == 0 or i == 1:
                new = out[0, len(tokens):i].tolist()
                for j, tok in enumerate(new):
                    if tok in eos:
                        new, done = new[:j + 1], True
                        break
                tokens += new
                if on_tokens is not None and new:
                    on_tokens(new)
                if done or i == max_new_tokens:
                    break
            out[:, i:i + 1] = _pick(self.step(out[:, i - 1:i]), temperature, top_k, generator)
            steps += 1
        sync_device(self.device)
        t2 = time.perf_counter()
        return GenerationResult(tokens, prompt_len, t1 - t0, t2 - t1, steps, bool(self._graphs) and self.use_graph)


def seconds_per_token(model: nn.Module, new_tokens: int = 128, prompt_tokens: int = 16, repeats: int = 3,
                      compile: bool = False) -> float:
    """Median seconds per decoded token of greedy generation from a fixed random prompt, with the
    model's DecDEC settings as they are (a first run captures the decode step and is not counted)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    session = DecodeSession(model, prompt_tokens + new_tokens, compile=compile)
    runs = [session.generate(ids.to(device), new_tokens) for _ in range(repeats + 1)][1:]
    return statistics.median(r.ms_per_token for r in runs) / 1e3


def _pick(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """[1, V] logits -> [1, 1] next token."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float() / temperature
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)


def parse_k_chunk(text: str, kinds: list[str] | None = None) -> int | dict[str, int]:
    """A k_chunk setting as typed by a user: '8' (every kind) or 'o_proj=4,down_proj=16' (per kind,
    checked against ``kinds`` when given). ValueError with a readable message otherwise."""
    try:
        if "=" not in text:
            return int(text)
        value = {kind.strip(): int(k) for kind, k in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"k_chunk {text!r}: expected an integer or kind=int,kind=int") from None
    unknown = sorted(set(value) - set(kinds or value))
    if unknown:
        raise ValueError(f"k_chunk {text!r}: unknown kinds {unknown}; the model's kinds are {sorted(set(kinds))}")
    return value


def load_for_generation(model_dir: str | Path, device: str, dtype: str | None = None, no_decdec: bool = False,
                        k_chunk: str | None = None):
    """(model, tokenizer or None) for chat and generation: the tuned config unless ``no_decdec``;
    ``k_chunk`` as the user typed it (see :func:`parse_k_chunk`). Bad settings exit with a message."""
    from transformers import AutoTokenizer
    from .prepared import configure, load_prepared
    model = load_prepared(model_dir, device, dtype=getattr(torch, dtype) if dtype else None,
                          mode="none" if no_decdec else None)
    if k_chunk is not None:
        try:
            configure(model, k_chunk=parse_k_chunk(k_chunk, [g.kind for g in selection_groups(model)]))
        except ValueError as e:
            raise SystemExit(f"--k-chunk: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None  # synthetic models have none
    return model, tokenizer
