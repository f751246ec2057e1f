"""What a Hugging Face export ships beside its weights: the tokenizer the data was made with, a
generation config, and a model card (README.md) that states what the variant saves."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..data.tokenizers import GPT2_DIR, HFTokenizer, SentencePieceTokenizer, Tokenizer, build_tokenizer
from ..variants import kv_cache_bytes_per_token, paper_name, total_parameters
from .consolidated import CheckpointError, Consolidated


def tokenizer_for(ck: Consolidated, spec: str | None, out: Path) -> Tokenizer | None:
    """The megaqkv tokenizer to ship: `spec` ('none': no tokenizer), else the one the checkpoint records, else
    GPT-2 BPE when the vocabulary can hold it."""
    spec = spec or (ck.trainer or {}).get("tokenizer")
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
    except ValueError as exc:
        raise CheckpointError(f"--tokenizer: {exc}") from None
    if tok.vocab_size > ck.config.vocab_size:
        raise CheckpointError(f"--tokenizer {spec}: {tok.vocab_size} tokens do not fit the model's vocabulary "
                              f"({ck.config.vocab_size}); it is not the tokenizer this model was trained with")
    return tok


def hf_tokenizer(tok: Tokenizer, max_length: int):
    """The transformers tokenizer that encodes as `tok` does, as the training data was tokenized: special-token
    strings inside a text stay text for GPT-2 and sentencepiece (`split_special_tokens`), and are the special
    token for a tokenizer.json, whose own encoder matches them."""
    from transformers import PreTrainedTokenizerFast

    # Padding with the end-of-document token on the left: batched prompts ready for generate().
    common = {"model_max_length": max_length, "split_special_tokens": True, "padding_side": "left"}
    if isinstance(tok, SentencePieceTokenizer):
        from ..hf.tokenization_megaqkv import MegaQKVSentencePieceTokenizer

        return MegaQKVSentencePieceTokenizer(tok.spec, pad_token=tok.sp.id_to_piece(tok.eod), **common)
    if isinstance(tok, HFTokenizer):
        eod = tok.tok.id_to_token(tok.eod)
        return PreTrainedTokenizerFast(tokenizer_file=tok.spec, eos_token=eod, bos_token=eod, pad_token=eod,
                                       model_max_length=max_length, padding_side="left")
    from tokenizers import Tokenizer as Pipeline, decoders, models, pre_tokenizers

    bpe = Pipeline(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eod = "<|endoftext|>"
    bpe.add_special_tokens([eod])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eod, bos_token=eod, unk_token=eod, pad_token=eod,
                                   **common)


def write(ck: Consolidated, out: Path, tok: Tokenizer | None, kind: str) -> None:
    from transformers import GenerationConfig

    if tok is not None:
        hf = hf_tokenizer(tok, ck.config.max_position_embeddings)
        if isinstance(tok, SentencePieceTokenizer):  # remote code: tokenizer_config.json's auto_map and the file
            hf.register_for_auto_class("AutoTokenizer")
        hf.save_pretrained(str(out))
        if tok.spec == "gpt2":  # the classic files too, for tools that read vocab.json/merges.txt
            shutil.copyfile(GPT2_DIR / "encoder.json", out / "vocab.json")
            shutil.copyfile(GPT2_DIR / "vocab.bpe", out / "merges.txt")
        # Rows past the tokenizer's vocabulary (padding to a multiple of 128) are never generated, as in megaqkv.
        padding = list(range(tok.vocab_size, ck.config.vocab_size)) or None
        GenerationConfig(bos_token_id=tok.eod, eos_token_id=tok.eod, pad_token_id=tok.eod,
                         suppress_tokens=padding).save_pretrained(str(out))
    (out / "README.md").write_text(model_card(ck, tok, kind))


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
