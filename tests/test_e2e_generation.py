"""decdec.generation: the static-cache decode loop against Hugging Face generate(), EOS, streaming,
sampling; on CUDA the captured decode step against eager steps."""
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import decdec
from decdec.generation import DecodeSession, parse_k_chunk
from decdec.synthetic import write_synthetic_model
from helpers import prepare_by_hand, tiny_model

NEW = 24
aten = torch.ops.aten


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama3bit")
    prepare_by_hand(tiny_model("llama"), out, bits=3, group_size=32)
    return out


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(1))


def hf_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def test_decdec_off_equals_the_plain_quantized_model(prepared, prompt):
    model = decdec.load_prepared(prepared, mode="none")
    ours = DecodeSession(model, 64).generate(prompt, NEW)
    assert ours.tokens == hf_greedy(model, prompt, NEW)
    assert len(ours.tokens) == NEW and ours.decode_steps == NEW - 1 and not ours.cuda_graph


def test_decdec_on_equals_hf_generate_with_decdec(prepared, prompt):
    model = decdec.load_prepared(prepared, mode="exact", k_chunk=512)
    ours = DecodeSession(model, 64).generate(prompt, NEW)
    assert ours.tokens == hf_greedy(model, prompt, NEW)
    # and the compensation changes the logits of a decode step (else the test above proves nothing)
    session = DecodeSession(model, 64)
    on = session.step(session.prefill(prompt).argmax(-1, keepdim=True)).clone()
    decdec.configure(model, mode="none")
    off = session.step(session.prefill(prompt).argmax(-1, keepdim=True))
    assert not torch.allclose(on, off)


def test_the_cache_goes_by_the_name_forward_takes(prepared, prompt):
    """Newer transformers call forward's past_key_values "cache" and warn on the old name."""
    model = decdec.load_prepared(prepared, mode="none")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        assert len(DecodeSession(model, 64).generate(prompt, 4).tokens) == 4


def test_session_is_reusable_and_eos_stops(prepared, prompt):
    model = decdec.load_prepared(prepared, mode="none")
    session = DecodeSession(model, 64)
    full = session.generate(prompt, NEW).tokens
    j = 9
    eos = full[j]
    first = full.index(eos)
    streamed = []
    stopped = session.generate(prompt, NEW, eos_token_id=eos, on_tokens=streamed.extend)
    assert stopped.tokens == full[:first + 1] == streamed
    batched = session.generate(prompt, NEW, eos_token_id=[eos], check_every=4)
    assert batched.tokens == full[:first + 1]
    assert session.generate(prompt, NEW).tokens == full  # the cache was reset


def test_attention_windows_give_the_whole_cache_result(prepared, prompt):
    """Windows of 8, 16, 32 positions (and the whole cache of 64 past them) against attention over
    the whole cache at every step: the same tokens, logits equal up to summation order."""
    model = decdec.load_prepared(prepared, mode="none")
    windowed, whole = DecodeSession(model, 64, window_base=8), DecodeSession(model, 64, window_base=None)
    assert [windowed.window_for(n) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, None, None]
    assert windowed.generate(prompt, 50).tokens == whole.generate(prompt, 50).tokens
    for session in (windowed, whole):
        session.prefill(prompt)
    for t in range(40):  # teacher-forced, across every window
        token = torch.tensor([[t + 3]])
        torch.testing.assert_close(windowed.step(token), whole.step(token), rtol=1e-5, atol=1e-5)
    assert windowed.cache.layers[0].window is None  # position 47: past the last window, the whole cache
    with pytest.raises(ValueError, match="full"):
        for _ in range(20):
            windowed.step(torch.tensor([[5]]))


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_architectures(arch, tmp_path):
    prepare_by_hand(tiny_model(arch), tmp_path, bits=4, group_size=32)
    model = decdec.load_prepared(tmp_path, mode="none")
    prompt = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    session = DecodeSession(model, 40)
    assert session.generate(prompt, 12).tokens == hf_greedy(model, prompt, 12)
    # mistral's 4096-token window never slides in 40 positions: plain static layers, capturable
    assert {type(layer).__name__ for layer in session.cache.layers} == {"WindowedStaticLayer"}


@pytest.mark.slow
def test_compiled_decode_step(prepared, prompt):
    model = decdec.load_prepared(prepared, mode="exact", k_chunk=512)
    plain = DecodeSession(model, 40).generate(prompt, 8).tokens
    assert DecodeSession(model, 40, compile=True).generate(prompt, 8).tokens == plain


def test_inductor_kernels_launched_dependent_only_beside_ours(monkeypatch):
    """--compile asks Inductor for dependent launches exactly when our kernels are launched that way
    (on CUDA, sm_90+, DECDEC_DEPENDENT_LAUNCH not 0), with a config key this torch knows."""
    from torch._inductor import config
    from decdec import generation, ops
    assert generation._inductor_options(torch.device("cpu")) == {}
    monkeypatch.setattr(ops, "dependent_launch", lambda: False)
    assert generation._inductor_options(torch.device("cuda")) == {}
    monkeypatch.setattr(ops, "dependent_launch", lambda: True)
    options = generation._inductor_options(torch.device("cuda"))
    assert options == ({"triton.enable_pdl": True} if hasattr(config.triton, "enable_pdl") else {})
    for key, value in options.items():
        with config.patch({key: value}):  # raises on a key this torch does not have
            pass


def test_sampling_is_seeded(prepared, prompt):
    model = decdec.load_prepared(prepared, mode="none")
    session = DecodeSession(model, 64)
    runs = [session.generate(prompt, NEW, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(s)).tokens
            for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


def test_cache_limits(prepared, prompt):
    session = DecodeSession(decdec.load_prepared(prepared, mode="none"), 10)
    with pytest.raises(ValueError, match="exceed"):
        session.generate(prompt, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.generate(prompt, 0)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        session.prefill(prompt.expand(2, -1))


class HostSyncs(TorchDispatchMode):
    """Records the ops that make a CUDA device wait for the host (or the host for the device): none
    of them may run inside a CUDA graph capture."""

    SYNCING = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.equal, aten.masked_select}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if func.overloadpacket in self.SYNCING or bool_index:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_step_is_capturable(prepared, prompt, monkeypatch):
    """A CPU stand-in for CUDA graph capture: with transformers' capture-time branches forced on,
    one decode step makes no host synchronisation and gives the eager step's logits."""
    import transformers.masking_utils
    model = decdec.load_prepared(prepared, mode="none")
    logits = []
    for capturing in (False, True):
        session = DecodeSession(model, 32)
        session.prefill(prompt)
        session._input.fill_(5)
        if capturing:
            monkeypatch.setattr(transformers.masking_utils, "is_tracing", lambda *a, **k: True)
        with torch.no_grad(), HostSyncs() as syncs:
            logits.append(session._forward(session._input))
        assert syncs.found == []
    torch.testing.assert_close(logits[0], logits[1])
    with HostSyncs() as syncs:  # the detector itself works
        bool(torch.ones(2).sum() > 0)
    assert syncs.found


def test_parse_k_chunk():
    kinds = ["o_proj", "down_proj"]
    assert parse_k_chunk("8", kinds) == 8
    assert parse_k_chunk("o_proj=4, down_proj=16", kinds) == {"o_proj": 4, "down_proj": 16}
    for bad in ("x", "o_proj=", "gate=3"):
        with pytest.raises(ValueError):
            parse_k_chunk(bad, kinds)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, k_chunk", [("none", 0), ("decdec", 32)])
def test_cuda_graph_decode_equals_eager(tmp_path, mode, k_chunk):
    write_synthetic_model(tmp_path, "tiny", bits=3)
    model = decdec.load_prepared(tmp_path, "cuda", mode=mode, k_chunk=k_chunk)
    prompt = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    # the graphed session with attention windows of 16 and 32 positions (one graph each, then the
    # whole cache), the eager one over the whole cache
    graph = DecodeSession(model, 64, cuda_graph=True, window_base=16)
    eager = DecodeSession(model, 64, cuda_graph=False, window_base=None)
    tokens = eager.generate(prompt, NEW + 20).tokens
    result = graph.generate(prompt, NEW + 20)
    assert result.cuda_graph, graph.graph_error
    assert graph.graphs_captured == 3
    # teacher-forced steps: the replayed graph gives the eager logits (the DEC merge may add in
    # another order, so allclose rather than equal tokens)
    logits = []
    for session in (graph, eager):
        session.prefill(prompt)
        logits.append(torch.stack([session.step(torch.tensor([[t]], device="cuda")).float().clone()
                                   for t in tokens[:40]]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-2, atol=1e-2)
    decdec.configure(model, scales_on_host=True)  # re-captured; the same scales, read from the host
    assert graph.generate(prompt, NEW + 20).tokens == result.tokens and graph.graph_error is None
    decdec.configure(model, k_chunk=0)  # a settings change re-captures
    assert graph.generate(prompt, 4).cuda_graph and graph.graph_error is None
