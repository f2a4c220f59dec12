"""The model's top output y* for each prompt (bilevel SPO §2.3, Theorem 2: where the probability
mass that DPO takes from chosen and rejected goes), added to a probe set as an extra response.

    probes = top(probes, model, tokenizer)                          # greedy y*
    probes = top(probes, model, tokenizer, method="sample", k=8)    # most probable of 8 samples
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MarginscopeError
from ..progress import progress_bar
from .probeset import ProbeSet, _text_problem

METHODS = ("greedy", "sample")


def top(probes: ProbeSet, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, method: str = "greedy",
        k: int = 8, max_new_tokens: int = 32, seed: int = 0, name: str = "top",
        progress: bool = False) -> ProbeSet:
    """A copy of `probes` with each prompt's top output y* as the extra response `name`: the greedy
    decode, or the most probable (by log π(y|x) over its tokens) of `k` samples at temperature 1.

    The prompt is tokenized with special tokens (as `measure` scores it); decoding stops at EOS or
    after `max_new_tokens`; EOS cannot come first and other special tokens never, so y* is non-empty
    plain text (normally re-tokenizing to the generated ids). Probes sharing a prompt share y*; each prompt's
    samples come from its own generator seeded by (seed, prompt). The global RNG is untouched and
    the model's train/eval mode restored."""
    if method not in METHODS:
        raise MarginscopeError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    for label, value in (("k", k), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise MarginscopeError(f"{label} must be at least 1; got {value}")
    probes.with_extra(name, [p.chosen for p in probes])  # a taken or invalid name fails before decoding
    prompts = list(dict.fromkeys(p.prompt for p in probes))
    outputs: dict[str, str] = {}
    with _eval_mode(model), torch.no_grad(), progress_bar(progress, "top outputs", len(prompts)) as advance:
        decoder = _Decoder(model, tokenizer, max_new_tokens)
        for prompt in prompts:
            outputs[prompt] = decoder.top(prompt, k if method == "sample" else 0, _prompt_seed(seed, prompt))
            advance()
    return probes.with_extra(name, {p.id: outputs[p.prompt] for p in probes})


class _Decoder:
    """Token-by-token decoding of one prompt (no padding), with a KV cache when the model has one."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.device = next(model.parameters()).device
        self.stop = _stop_ids(model, tokenizer)
        self.stop_ids = torch.tensor(self.stop, device=self.device)
        self.banned = sorted(set(tokenizer.all_special_ids) - set(self.stop))
        self.vocab = len(tokenizer)
        self.positions = getattr(model.config, "max_position_embeddings", None)

    def top(self, prompt: str, samples: int, seed: int) -> str:
        """Greedy y* (samples=0), or the most probable of `samples` samples drawn with `seed`."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if self.positions and len(prompt_ids) + self.max_new_tokens > self.positions:
            raise MarginscopeError(f"prompt {prompt[:40]!r}…: {len(prompt_ids)} tokens + max_new_tokens "
                                   f"{self.max_new_tokens} exceed the model's {self.positions} positions")
        generator = torch.Generator(self.device).manual_seed(seed) if samples else None
        sequences, logps = self._decode(prompt_ids, max(samples, 1), generator)
        texts = [self._text(prompt_ids, ids) for ids in sequences]
        usable = [i for i, text in enumerate(texts) if _text_problem(text) is None]
        if not usable:
            raise MarginscopeError(f"prompt {prompt[:40]!r}…: the model's top output {texts[0]!r} is blank "
                                   "and cannot be a probe response")
        return texts[max(usable, key=lambda i: (logps[i], -i))]  # ties: the first sample

    def _decode(self, prompt_ids: list[int], rows: int,
                generator: torch.Generator | None) -> tuple[list[list[int]], list[float]]:
        """`rows` continuations of the prompt (argmax when no generator) and their log π(y|x)."""
        sequence = torch.tensor([prompt_ids] * rows, device=self.device)
        step_input, cache = sequence, None
        logps = torch.zeros(rows, dtype=torch.float64, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        for t in range(self.max_new_tokens):
            out = self.model(input_ids=step_input, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            token = self._choose(log_probs, first=t == 0, generator=generator)
            stopped = torch.isin(token, self.stop_ids)
            logps += torch.where(done | stopped, 0.0, log_probs.gather(1, token[:, None])[:, 0].double())
            sequence = torch.cat([sequence, torch.where(done, self.stop[0], token)[:, None]], dim=1)
            done |= stopped
            if done.all():
                break
            cache = out.past_key_values
            step_input = sequence if cache is None else sequence[:, -1:]
        continuations = [self._until_stop(row[len(prompt_ids):]) for row in sequence.tolist()]
        return continuations, logps.tolist()

    def _choose(self, log_probs: torch.Tensor, *, first: bool, generator: torch.Generator | None) -> torch.Tensor:
        """The next token of each row among the allowed ones: argmax, or a sample."""
        allowed = log_probs.clone()
        allowed[:, self.vocab:] = -torch.inf  # embedding rows the tokenizer has no token for
        allowed[:, self.banned] = -torch.inf
        if first:
            allowed[:, self.stop] = -torch.inf
        if generator is None:
            return allowed.argmax(dim=-1)
        return torch.multinomial(allowed.softmax(dim=-1), 1, generator=generator)[:, 0]

    def _until_stop(self, ids: list[int]) -> list[int]:
        return next((ids[:i] for i, token in enumerate(ids) if token in self.stop), ids)

    def _text(self, prompt_ids: list[int], ids: list[int]) -> str:
        """The continuation's text: decode prompt + continuation and strip the decoded prompt (so
        tokenizers that drop a leading space when decoding a fragment keep it); trailing tokens that
        end inside a multi-byte character (cut by max_new_tokens) are dropped."""
        def decode(tokens: list[int]) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        head = decode(prompt_ids)
        while True:
            full = decode(prompt_ids + ids)
            text = full[len(head):] if full.startswith(head) else decode(ids)
            if not (ids and text.endswith("\ufffd")):
                return text
            ids = ids[:-1]


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (some models have several)."""
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra])]
    stop = list(dict.fromkeys(i for i in ids if i is not None))
    if not stop:
        raise MarginscopeError("the tokenizer has no EOS token, so generation cannot stop; set tokenizer.eos_token")
    return stop


def _prompt_seed(seed: int, prompt: str) -> int:
    """A 63-bit seed from (seed, prompt): a prompt's samples do not depend on the other probes."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode inside; every module's own train/eval flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
