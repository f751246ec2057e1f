"""Tokenizers that work offline: GPT-2 BPE from the shipped vocabulary, sentencepiece, HF tokenizer.json.

A tokenizer is named by a spec string so that worker processes can build their own copy:
`gpt2`, a `*.model` sentencepiece file, or a `*.json` Hugging Face tokenizer file.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

GPT2_DIR = Path(__file__).resolve().parent / "gpt2"
GPT2_EOD = 50256


class Tokenizer(abc.ABC):
    spec: str
    vocab_size: int
    eod: int

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (EOD is appended by the caller)."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of the token ids."""

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back (integers) and each text's token count: what preprocessing writes."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())), lengths

    def fingerprint(self) -> str:
        """Identifies the vocabulary, so a resumed run cannot mix two tokenizers in one output."""
        path = GPT2_DIR / "vocab.bpe" if self.spec == "gpt2" else Path(self.spec)
        return f"{self.spec}:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


class GPT2Tokenizer(Tokenizer):
    """OpenAI GPT-2 BPE (50257 tokens, EOD <|endoftext|> = 50256) through tiktoken, from the shipped files.

    Preprocessing (encode_flat) goes through gigatoken when it is installed: the same ids (tests and
    bench/preprocess.py compare them) at several times tiktoken's speed per core, the speed Megatron-LM's
    preprocess_data_fast.py gets from it. gigatoken remembers every distinct word it has encoded, so a fresh
    copy replaces it after FAST_RESET_CHARS characters of text, which bounds that memory."""

    FAST_RESET_CHARS = 1 << 27

    def __init__(self):
        self.spec, self.vocab_size, self.eod = "gpt2", 50257, GPT2_EOD
        self._fast, self._fast_chars = None, 0

    @functools.cached_property
    def encoding(self):
        """tiktoken's encoding, built on first use (0.5-1 s: preprocessing with gigatoken never needs it)."""
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2_DIR / "vocab.bpe"), str(GPT2_DIR / "encoder.json"))
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": GPT2_EOD}, explicit_n_vocab=50257)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Special-token strings inside documents are ordinary text, as in GPT-2's own encoder.
        return [self.encoding.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        fast = self._fast_tokenizer()
        if fast is None:
            return super().encode_flat(texts)
        ids = [fast.encode(t) for t in texts]  # one core (--workers says how many); numpy arrays, no list of ints
        self._fast_chars += sum(map(len, texts))
        flat = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
        return flat, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))

    def _fast_tokenizer(self):
        """gigatoken's GPT-2 (no special tokens, as encode_ordinary), made anew after FAST_RESET_CHARS; None
        without gigatoken. Its tokenizer.json is assembled from the shipped files as text (0.1 s; going through
        the `tokenizers` library takes 0.5 s)."""
        if self._fast is False:
            return None
        if self._fast is None or self._fast_chars >= self.FAST_RESET_CHARS:
            try:
                import gigatoken
            except ImportError:
                self._fast = False
                return None
            merges = [m for m in (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if m]
            model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": "VOCAB", "merges": merges}
            config = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                        "use_regex": True},
                      "post_processor": None, "decoder": None, "model": model}
            text = json.dumps(config).replace('"VOCAB"', (GPT2_DIR / "encoder.json").read_text(encoding="utf-8"), 1)
            self._fast, self._fast_chars = gigatoken.Tokenizer.from_json(text), 0
        return self._fast


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.spec, self.vocab_size, self.eod = path, self.sp.get_piece_size(), self.sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"{path}: the sentencepiece model has no end-of-sentence piece to use as EOD; "
                             "train it with one (tools/train_tokenizer.py does)")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode(list(map(int, ids)))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; EOD is the first of its known end-of-text tokens it defines."""

    EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HF

        self.tok = HF.from_file(path)
        # ids may leave gaps (get_vocab_size counts tokens): the vocabulary spans up to the largest id
        self.spec, self.vocab_size = path, max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        ids = [self.tok.token_to_id(t) for t in self.EOD_NAMES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"{path}: none of {', '.join(self.EOD_NAMES)} is in the vocabulary; add an end-of-text "
                             "token to the tokenizer")
        self.eod = found[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)


def checkpoint_tokenizer(given: str | None, recorded: str | None, option: str = "--tokenizer") -> str:
    """The tokenizer to evaluate a checkpoint with: the one given, else the one its training run recorded
    (data.tokenizer), else GPT-2 BPE; a recorded file that is not here is an error, not a silent GPT-2."""
    if given is None and recorded and recorded != "gpt2" and not Path(recorded).is_file():
        raise ValueError(f"the checkpoint was trained on data made with tokenizer {recorded}, which is not here; "
                         f"pass {option} with its path")
    return given or recorded or "gpt2"


def build_tokenizer(spec: str) -> Tokenizer:
    if spec == "gpt2":
        return GPT2Tokenizer()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"tokenizer '{spec}': no such file; use 'gpt2', a sentencepiece .model or a HF "
                         "tokenizer.json")
    if path.suffix == ".model":
        return SentencePieceTokenizer(spec)
    if path.suffix == ".json":
        return HFTokenizer(spec)
    raise ValueError(f"tokenizer '{spec}': unknown kind; use 'gpt2', a sentencepiece .model or a HF tokenizer.json")
