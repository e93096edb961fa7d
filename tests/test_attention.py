"""decdec.attention: the decode kernel's definition against torch's SDPA, and the "decdec"
implementation's fallback (CPU, several query tokens) giving SDPA's results in a model."""
import pytest
import torch
import torch.nn.functional as F

import decdec
from decdec.attention import NAME, decode_attention_reference, implementation_for
from decdec.generation import DecodeSession
from helpers import tiny_model


def sdpa(q, k, v, mask, scale):
    """torch's SDPA of one query token per sequence, kv heads repeated for their query groups."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=attn_mask, scale=scale)[:, :, 0]


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 64), (32, 8, 128), (9, 3, 64), (16, 1, 80)])
def test_reference_is_sdpa(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads + head_dim)
    q = torch.randn(2, heads, head_dim, generator=gen)
    k, v = (torch.randn(2, kv_heads, 37, head_dim, generator=gen) for _ in range(2))
    mask = torch.rand(2, 37, generator=gen) < 0.6
    mask[:, 0] = True
    for m in (mask, None):
        torch.testing.assert_close(decode_attention_reference(q, k, v, m, 0.1), sdpa(q, k, v, m, 0.1))


def test_reference_gives_zeros_where_everything_is_masked():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = decode_attention_reference(q, k, v, mask, 1.0)
    assert out[1].abs().max() == 0 and not out.isnan().any()


def test_implementation_choice():
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    assert implementation_for(model) == "sdpa"  # CPU: no kernel
    assert implementation_for(model, use_kernel=True) == NAME
    model.config._attn_implementation = "eager"
    assert implementation_for(model, use_kernel=True) == "eager"  # another implementation is kept


def test_decdec_implementation_falls_back_to_sdpa_on_cpu():
    """The registered implementation runs the model (prefill and decode steps) with SDPA's results."""
    model = tiny_model("llama")
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    results = []
    for use_kernel in (False, True):
        session = DecodeSession(model, 48, decode_attention=use_kernel)
        assert session.attention == (NAME if use_kernel else "sdpa")
        logits = [session.prefill(prompt)]
        tokens = session.generate(prompt, 12).tokens
        session.prefill(prompt)
        logits += [session.step(torch.tensor([[t]])) for t in tokens]
        assert model.config._attn_implementation == session.attention
        results.append((tokens, torch.stack(logits)))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
