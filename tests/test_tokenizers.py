"""Tokenizers: GPT-2 BPE offline, cross-checked against HF tokenizers; sentencepiece trained by our tool."""
import itertools
import json

import pytest
import zstandard

from megaqkv.data.tokenizers import GPT2_DIR, Tokenizer, build_tokenizer
from megaqkv.data.train_tokenizer import main as train_main

from conftest import FIXTURES


def fixture_texts(limit=40):
    path = FIXTURES / "SlimPajama-627B" / "train" / "chunk1" / "example_train_0.jsonl.zst"
    lines = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 26).splitlines()
    return [json.loads(l)["text"] for l in lines[:limit]]


def hf_gpt2_tokenizer_json(tmp_path):
    """GPT-2 as a HF tokenizer.json, built with the `tokenizers` library from the same vocabulary files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_gpt2_offline():
    tok = build_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    assert tok.encode_batch(["Hello world", " <|endoftext|>"]) == [[15496, 995], [1279, 91, 437, 1659, 5239, 91, 29]]
    text = fixture_texts(1)[0]
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_gpt2_equals_hf_tokenizers_implementation(tmp_path):
    ours = build_tokenizer("gpt2")
    hf = build_tokenizer(str(hf_gpt2_tokenizer_json(tmp_path)))
    texts = fixture_texts() + ["naïve café — 日本語 🙂", "  two  spaces\n\n\ttab", "'s 're 've 'll"]
    assert hf.encode_batch(texts) == ours.encode_batch(texts)
    assert hf.eod == 50256 and hf.vocab_size == 50257


TRICKY = ["a<|endoftext|>b", "  multiple   spaces\n\n\ttabs ", "émoji 😀 中文 ﬁ", "x\r\ny", "\u00a0nbsp \u2028",
          "'s 're 'VE 'S", "1234567 3.14", " ", "Ａ全角 ǅ ٣٤", "😀" * 5, "x" * 5000]


def test_gpt2_preprocessing_ids_equal_tiktoken():
    """encode_flat (gigatoken when installed, else the base class's loop over encode_batch) gives tiktoken's
    encode_ordinary ids, special-token text and odd Unicode included."""
    tok = build_tokenizer("gpt2")
    texts = fixture_texts() + TRICKY
    expected = [tok.encoding.encode_ordinary(t) for t in texts]
    for flat, lengths in (tok.encode_flat(texts), Tokenizer.encode_flat(tok, texts)):
        assert lengths.tolist() == [len(e) for e in expected]
        assert flat.tolist() == list(itertools.chain.from_iterable(expected))


def test_gpt2_fast_path_is_renewed_to_bound_its_word_cache():
    pytest.importorskip("gigatoken")
    tok = build_tokenizer("gpt2")
    tok.FAST_RESET_CHARS = 100
    texts = fixture_texts(3)
    first, _ = tok.encode_flat(texts)
    used = tok._fast
    again, _ = tok.encode_flat(texts)
    assert tok._fast is not used and again.tolist() == first.tolist()


def test_sentencepiece_trained_by_tool(tmp_path, capsys):
    prefix = tmp_path / "data" / "sp"  # into a directory not made yet, as the ablation docs' first command does
    assert train_main(["--input", str(FIXTURES / "SlimPajama-627B" / "train"), "--model-prefix", str(prefix),
                       "--vocab-size", "1000", "--model-type", "bpe"]) == 0
    assert "wrote" in capsys.readouterr().out
    tok = build_tokenizer(str(prefix) + ".model")
    assert tok.vocab_size == 1000 and tok.eod == 2
    text = fixture_texts(2)[1]
    ids = tok.encode_batch([text])[0]
    assert len(ids) < len(text) / 2 and tok.decode(ids) == " ".join(text.split())  # sentencepiece normalises space


def test_unknown_tokenizer_spec(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        build_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown kind"):
        build_tokenizer(str(tmp_path / "vocab.txt"))
