"""decdec.calibration: token windows from data sets, files and the model itself."""
import pytest
import torch

from decdec.calibration import calibration_data, windows_from_text
from helpers import tiny_model


class CharTokenizer:
    """One token per character: enough to check windowing without a real tokenizer."""
    eos_token_id = 0
    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + ord(c) % 200 for c in t] for t in texts]}


def test_windows_are_deterministic_and_shaped():
    rows = [f"document number {i} " * 5 for i in range(50)]
    a = windows_from_text(rows, CharTokenizer(), 4, 32, seed=1)
    b = windows_from_text(rows, CharTokenizer(), 4, 32, seed=1)
    c = windows_from_text(rows, CharTokenizer(), 4, 32, seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_few_tokens_is_a_clear_error(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("a few words\n\nand another paragraph\n")
    with pytest.raises(ValueError, match="fewer than the 4 x 64"):
        calibration_data(str(text), CharTokenizer(), 4, 64)


def test_text_file_source(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"paragraph {i} with some text in it" for i in range(40)))
    calib = calibration_data(str(text), CharTokenizer(), 3, 50)
    assert calib.ids.shape == (3, 50)
    assert calib.describe() == {"source": str(text), "nsamples": 3, "seqlen": 50, "tokens": 150}


def test_unknown_source_fails_fast():
    with pytest.raises(ValueError, match="calibration source"):
        calibration_data("no-such-set", CharTokenizer(), 2, 8)


def test_self_samples_from_the_model():
    model = tiny_model("llama")
    calib = calibration_data("self", CharTokenizer(), 3, 12, model=model)
    assert calib.ids.shape == (3, 12)
    assert (calib.ids[:, 0] == CharTokenizer.bos_token_id).all()
    assert calib.ids.max() < model.config.vocab_size


def test_c4_windows(data_dir):
    from decdec.resolve import load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model("stories260k"))
    calib = calibration_data("c4", tok, 2, 64, data_dir=data_dir)
    assert calib.ids.shape == (2, 64) and calib.ids.max() < 512
