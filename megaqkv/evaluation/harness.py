"""megaqkv models as an lm-evaluation-harness model (`--model megaqkv --model_args checkpoint=PATH`).

lm-eval finds a model by name only in its own registry, which nothing outside lm-eval can extend before its
command line looks the name up (no plugin entry points as of 0.4.13), so the model is registered when this
module is imported: by `megaqkv-lm-eval` (lm-eval's command line with this module imported first,
megaqkv/evaluation/lm_eval_cli.py), by tools/evaluate.py, or by a Python program.

loglikelihood and loglikelihood_rolling score continuations with one batched forward per group of
requests (right-padded, longest first); generate_until runs the KV-cached generator and cuts the
text at the first stop string. Nothing here downloads anything: tasks come from lm-eval as usual
(or from a local task directory), the model and tokenizer from local files.
"""
from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  lm-eval's own names: its lookup skips them once the registry holds any name
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..data.tokenizers import Tokenizer, build_tokenizer, checkpoint_tokenizer
from ..model import GPT
from ..model.generation import Sampling, generate
from ..parallel.layers import gather_vocab

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@register_model("megaqkv")
class MegaqkvLM(TemplateLM):
    backend = "causal"

    def __init__(self, checkpoint: str | None = None, model: GPT | None = None, tokenizer: str | Tokenizer | None = None,
                 batch_size: int | str = 8, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, max_batch_size: int | None = None, trust_remote_code: bool = False,
                 **unknown):
        """max_batch_size and trust_remote_code are lm-eval's own arguments (ignored: no auto batch size, no
        remote code); anything else unknown is a typo and refused."""
        super().__init__()
        if unknown:
            raise ValueError(f"megaqkv: unknown model_args {', '.join(sorted(unknown))}; it takes checkpoint, "
                             "tokenizer, dtype (float32|bfloat16), max_length, batch_size and device")
        if dtype not in DTYPES:
            raise ValueError(f"megaqkv: model_args dtype={dtype}: use one of {', '.join(DTYPES)}")
        if model is None:
            if checkpoint is None:
                raise ValueError("megaqkv: pass model_args checkpoint=PATH (any format tools/convert_ckpt.py reads)")
            from ..checkpoint.loading import load_model

            model, ck = load_model(checkpoint, device=_device(device), dtype=DTYPES[dtype], log=lambda *a: None)
            tokenizer = tokenizer or checkpoint_tokenizer(None, (ck.trainer or {}).get("tokenizer"),
                                                          "model_args tokenizer=PATH")
        self.model = model.eval()
        self.tok = build_tokenizer(tokenizer or "gpt2") if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = max_length or model.cfg.max_position_embeddings
        self._device = model.wte.weight.device

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode_batch([string])[0]

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (context cut from the left to fit)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            group = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in group]
            # a continuation longer than the window is scored on the part that fits (as lm-eval's HF model does)
            conts = [pairs[i][1][-len(x):] for i, x in zip(group, inputs)]
            width = max(len(x) for x in inputs)
            tokens = torch.zeros(len(group), width, dtype=torch.long, device=self._device)
            for row, x in enumerate(inputs):
                tokens[row, :len(x)] = torch.tensor(x, device=self._device)
            logp = F.log_softmax(gather_vocab(self.model(tokens).logits, self.model.head).float(), dim=-1)
            for row, i in enumerate(group):
                cont = conts[row]
                end = len(inputs[row])
                scores = logp[row, end - len(cont):end]
                target = torch.tensor(cont, device=self._device)
                results[i] = (scores.gather(-1, target[:, None]).sum().item(), bool((scores.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)]
            out.append(sum(score for score, _ in self._score(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.get("max_gen_toks", 256)), self.max_length - 1)  # leave room for a prompt
            sampling = (max_new, float(kwargs.get("temperature", 0.0))
                        if kwargs.get("do_sample") else 0.0, tuple(until))
            groups.setdefault(sampling, []).append(i)
        for (max_new, temperature, until), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                budget = self.max_length - max_new
                prompts = [self.tok_encode(requests[i].args[0])[-budget:] or [self.eot_token_id] for i in batch]
                result = generate(self.model, prompts, Sampling(max_new_tokens=max_new, temperature=temperature,
                                                                stop_tokens=(self.eot_token_id,)),
                                  vocab_size=self.tok.vocab_size)
                for i, tokens in zip(batch, result.tokens):
                    text = self.tok_decode(tokens)
                    cuts = [text.find(s) for s in until if s and s in text]
                    out[i] = text[:min(cuts)] if cuts else text
        return out


def _device(requested: str | None) -> str:
    """lm-eval's command line asks for cuda:0 unless told otherwise; without CUDA that means the CPU (as for
    lm-eval's own `hf` model), with a warning rather than torch's 'not compiled with CUDA' assertion."""
    cuda = torch.cuda.is_available()
    if requested is None:
        return "cuda" if cuda else "cpu"
    if torch.device(requested).type == "cuda" and not cuda:
        logging.getLogger(__name__).warning("megaqkv: device %s requested but CUDA is not available; using the CPU",
                                            requested)
        return "cpu"
    return requested
