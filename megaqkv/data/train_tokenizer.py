"""Train a sentencepiece tokenizer from the same inputs preprocessing reads (tools/train_tokenizer.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from .preprocess import parse_record
from .sources import InputError, discover, read_records


def lines(inputs: list[str], key: str, max_documents: int) -> Iterator[str]:
    """Non-empty lines of the documents' text; sentencepiece drops sentences longer than a few KB."""
    seen = 0
    for f in discover(inputs):
        for _, payload, _ in read_records(f, [key]):
            texts, _, error = parse_record(payload, [key])
            if error:
                continue
            for line in texts[0].splitlines():
                if line.strip():
                    yield line.strip()
            seen += 1
            if seen >= max_documents:
                return


def train(inputs: list[str], model_prefix: str, vocab_size: int = 32000, model_type: str = "unigram",
          key: str = "text", max_documents: int = 1_000_000, character_coverage: float = 0.9995) -> str:
    import sentencepiece as spm

    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)  # sentencepiece does not make it
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(inputs, key, max_documents), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, input_sentence_size=10_000_000, shuffle_input_sentence=True, minloglevel=2)
    return model_prefix + ".model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="train_tokenizer.py", description=__doc__)
    parser.add_argument("--input", nargs="+", required=True, help="same inputs as preprocess_data.py")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--max-documents", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    try:
        path = train(args.input, args.model_prefix, args.vocab_size, args.model_type, args.json_key,
                     args.max_documents)
    except (InputError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (use it with preprocess_data.py --tokenizer {path})")
    return 0
