"""Tiny causal LMs and tokenizers built locally (no hub download) for tests, benchmarks and the demo.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the bundled corpus; it
adds a BOS token to prompts (like Llama's) and none to responses. Models are random-init configs of
real Hugging Face architectures, so every code path is the one a user's checkpoint takes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ARCHITECTURES = ("gpt2", "llama", "qwen2", "gpt_neox")


def corpus_lines() -> list[str]:
    """The bundled synthetic sentiment corpus, one statement per line."""
    text = resources.files("marginscope.demo").joinpath("corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default: the bundled corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=128
    )


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_chat_tokenizer(texts: list[str] | None = None, vocab_size: int = 360, *,
                         add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`, the
    template of SmolLM2/Qwen instruct models) and `<|im_end|>` as EOS; `add_bos` makes it also add BOS
    to every text it tokenizes (like Llama's), for the double-BOS trap."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, "<|im_end|>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else corpus_lines(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token="<|im_end|>", pad_token=PAD,
                                  model_max_length=128)
    out.chat_template = CHATML_TEMPLATE
    return out


def tiny_config(arch: str, vocab_size: int, *, tie: bool | None = None, width: int = 32,
                layers: int = 2, max_positions: int = 128, dropout: float = 0.0) -> PretrainedConfig:
    """A small config of a real architecture: gpt2 (tied, Conv1D, biases, LayerNorm), llama (untied,
    RMSNorm, GQA), qwen2 (q/k/v biases, RMSNorm, GQA), gpt_neox (parallel residual, rotary).
    `dropout` sets every dropout probability the architecture has (0 by default)."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_positions=max_positions,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **common)
        cfg.tie_word_embeddings = True if tie is None else tie
    elif arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        cfg = cls(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  attention_dropout=dropout, tie_word_embeddings=bool(tie), **common)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=max_positions,
                            use_parallel_residual=True, hidden_dropout=dropout, attention_dropout=dropout,
                            tie_word_embeddings=bool(tie), **common)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    return cfg


def build_model(arch: str, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, **config_kwargs) -> PreTrainedModel:
    """A random-init model of `arch` sized for `tokenizer`, deterministic for a given seed."""
    cfg = tiny_config(arch, len(tokenizer), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def save_tiny(directory: str | Path, arch: str = "gpt2", seed: int = 0) -> Path:
    """Build a tiny model and its tokenizer and save both with `save_pretrained` into `directory`."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_model(arch, tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


if __name__ == "__main__":
    import sys

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target = save_tiny(sys.argv[1] if len(sys.argv) > 1 else "tiny-model")
    print(f"saved a tiny random-init gpt2 and its tokenizer to {target}")
