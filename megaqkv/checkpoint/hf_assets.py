"""What a Hugging Face export ships beside its weights: the tokenizer the data was made with, a
generation config, and a model card (README.md) that states what the variant saves."""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data.tokenizers import GPT2_DIR, HFTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer
from ..variants import kv_cache_bytes_per_token, paper_name, total_parameters
from .consolidated import CheckpointError, Consolidated


def tokenizer_for(ck: Consolidated, spec: str | None, out: Path) -> Tokenizer | None:
    """The megaqkv tokenizer to ship: `spec` ('none': no tokenizer), else the one the checkpoint records, else
    GPT-2 BPE when the vocabulary can hold it."""
    recorded = (ck.trainer or {}).get("tokenizer")
    where = "--tokenizer" if spec else "the tokenizer the checkpoint records (pass --tokenizer to choose another)"
    spec = spec or recorded
    if spec == "none":
        return None
    if spec is None:
        if ck.config.vocab_size < 50257:
            raise CheckpointError(f"{out}: the checkpoint does not record its tokenizer and its vocabulary "
                                  f"({ck.config.vocab_size}) is smaller than GPT-2's; pass --tokenizer (the "
                                  "sentencepiece .model or tokenizer.json the data was made with), or --tokenizer none")
        spec = "gpt2"
    try:
        tok = build_tokenizer(spec)
    except Exception as exc:  # the libraries' own errors for a damaged file: RuntimeError, Exception
        raise CheckpointError(f"{where}, {spec}: {exc}") from None
    if tok.vocab_size > ck.config.vocab_size:
        raise CheckpointError(f"{where}, {spec}: {tok.vocab_size} tokens do not fit the model's vocabulary "
                              f"({ck.config.vocab_size}); it is not the tokenizer this model was trained with")
    return tok


def shipped_tokenizer(path: Path) -> str | None:
    """The megaqkv tokenizer spec of the tokenizer files in an HF model directory (what an export shipped)."""
    if (path / "tokenizer.model").is_file():
        return str(path / "tokenizer.model")
    gpt2 = [(path / "vocab.json", GPT2_DIR / "encoder.json"), (path / "merges.txt", GPT2_DIR / "vocab.bpe")]
    if all(ours.is_file() and ours.read_bytes() == theirs.read_bytes() for ours, theirs in gpt2):
        return "gpt2"
    return str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None


def hf_tokenizer(tok: Tokenizer, max_length: int):
    """The transformers tokenizer that encodes as `tok` does, as the training data was tokenized: no special
    tokens added around a text, and special-token strings inside it are text where megaqkv's tokenizer reads
    them as text (`split_special_tokens`: GPT-2, sentencepiece, an EOD that a tokenizer.json does not mark
    special)."""
    from tokenizers import Tokenizer as Pipeline, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Padding with the end-of-document token on the left: batched prompts ready for generate().
    common = {"model_max_length": max_length, "padding_side": "left"}
    if isinstance(tok, SentencePieceTokenizer):
        from ..hf.tokenization_megaqkv import MegaQKVSentencePieceTokenizer

        return MegaQKVSentencePieceTokenizer(tok.spec, pad_token=tok.sp.id_to_piece(tok.eod), split_special_tokens=True,
                                             **common)
    if isinstance(tok, HFTokenizer):
        pipeline = Pipeline.from_file(tok.spec)
        pipeline.post_processor = None  # megaqkv encodes without special tokens (no BOS templates)
        eod = pipeline.id_to_token(tok.eod)
        special = any(t.content == eod and t.special for t in pipeline.get_added_tokens_decoder().values())
        return PreTrainedTokenizerFast(tokenizer_object=pipeline, eos_token=eod, bos_token=eod, pad_token=eod,
                                       split_special_tokens=not special, **common)
    bpe = Pipeline(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eod = "<|endoftext|>"
    bpe.add_special_tokens([eod])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eod, bos_token=eod, unk_token=eod, pad_token=eod,
                                   split_special_tokens=True, **common)


@dataclass
class Assets:
    """Everything but the weights, built before anything is written (a failure here is not a write error)."""

    tokenizer: object | None
    generation: object | None
    card: str
    gpt2_files: bool

    def save(self, out: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
            self.generation.save_pretrained(str(out))
        if self.gpt2_files:  # the classic files too, for tools that read vocab.json/merges.txt
            shutil.copyfile(GPT2_DIR / "encoder.json", out / "vocab.json")
            shutil.copyfile(GPT2_DIR / "vocab.bpe", out / "merges.txt")
        (out / "README.md").write_text(self.card)


def prepare(ck: Consolidated, tok: Tokenizer | None, kind: str) -> Assets:
    from transformers import GenerationConfig

    hf, generation = None, None
    if tok is not None:
        hf = hf_tokenizer(tok, ck.config.max_position_embeddings)
        if isinstance(tok, SentencePieceTokenizer):  # remote code: tokenizer_config.json's auto_map and the file
            hf.register_for_auto_class("AutoTokenizer")
        # Rows past the tokenizer's vocabulary (padding to a multiple of 128) are never generated, as in megaqkv.
        padding = list(range(tok.vocab_size, ck.config.vocab_size)) or None
        generation = GenerationConfig(bos_token_id=tok.eod, eos_token_id=tok.eod, pad_token_id=tok.eod,
                                      suppress_tokens=padding)
    return Assets(hf, generation, model_card(ck, tok, kind), tok is not None and tok.spec == "gpt2")


def model_card(ck: Consolidated, tok: Tokenizer | None, kind: str) -> str:
    cfg, trainer = ck.config, ck.trainer or {}
    name = paper_name(cfg.sharing, cfg.num_heads, cfg.kv_heads)
    per_token = kv_cache_bytes_per_token(cfg, 2)
    qkv = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * 2
    rows = [("variant", name), ("sharing", cfg.sharing),
            ("KV heads", f"{cfg.kv_heads} of {cfg.num_heads} query heads"),
            ("layers / hidden / heads", f"{cfg.num_layers} / {cfg.hidden_size} / {cfg.num_heads}"),
            ("parameters", f"{total_parameters(cfg):,}"),
            ("KV cache per token (bf16)", f"{per_token:,} bytes ({per_token / qkv:.1%} of QKV's {qkv:,})"
             + ("" if kind == "native" else "; this GPT-2 export caches as QKV does")),
            ("tokenizer", tok.spec if tok else "none shipped")]
    if trainer.get("step") is not None:
        rows.append(("training steps", f"{trainer['step']:,}"))
    if trainer.get("consumed_samples") and trainer.get("seq_length"):
        rows.append(("training tokens", f"{trainer['consumed_samples'] * trainer['seq_length']:,}"))
    valid = trainer.get("valid")
    if valid and valid.get("loss") is not None:
        rows.append(("final validation loss", f"{valid['loss']:.4f} (perplexity {math.exp(valid['loss']):.2f}, "
                                              f"step {valid.get('step')}, {valid.get('tokens', 0):,} tokens)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    load = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or import megaqkv first"
            if kind == "native" else "AutoModelForCausalLM.from_pretrained(path)")
    about = ("A native transformers model (`modeling_megaqkv.py`): each shared projection is computed once and "
             "the cache keeps one tensor per layer when key and value are shared, and only the KV heads that "
             "exist." if kind == "native" else
             "A GPT2LMHeadModel with the shared roles copied and grouped KV heads repeated: the same logits, for "
             "tools that know only GPT-2, without the variant's cache savings (export with `--to hf` to keep them).")
    usage = ["from transformers import AutoModelForCausalLM, AutoTokenizer", f"model = {load}"]
    if tok is not None:
        remote = ", trust_remote_code=True" if isinstance(tok, SentencePieceTokenizer) else ""
        usage.append(f"tokenizer = AutoTokenizer.from_pretrained(path{remote})")
    source = f"\nConverted from `{ck.source}`.\n" if ck.source else ""
    return f"""---
library_name: transformers
tags: [megaqkv]
---
# megaqkv {name} model

Trained with megaqkv: GPT-2 architecture with shared-projection attention. {about}

| | |
|---|---|
{table}

```python
{chr(10).join(usage)}
```
{source}"""
