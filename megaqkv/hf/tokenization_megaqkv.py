"""A sentencepiece model as a transformers tokenizer that encodes exactly as sentencepiece does.

Standalone (sentencepiece and transformers only): exported beside models trained on sentencepiece
data. transformers' own sentencepiece tokenizers convert the model to a `tokenizers` pipeline or add
BOS and dummy-prefix rules of particular model families; this one calls sentencepiece itself, so its
ids are the ids the training data was made of.
"""
from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class MegaQKVSentencePieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        piece = lambda i: self.sp.id_to_piece(i) if i >= 0 else None
        kwargs.setdefault("eos_token", piece(self.sp.eos_id()))
        kwargs.setdefault("bos_token", piece(self.sp.bos_id()))
        kwargs.setdefault("unk_token", piece(self.sp.unk_id()))
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in set(self.all_special_ids)]
        return self.sp.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
