"""Scoring conventions: probes scored exactly as TRL 1.x's DPOTrainer scores its pairs (DESIGN §6).

Parity: the tracker's step-0 log-probs of every probe equal TRL's own per-pair log-probs (its
precomputed reference computation) to ≤ 1e-5 in float32 (plus one part per million: TRL sums a
sequence's per-token log-probs in float32, ~1e-5 nats of rounding on a 100-nat random-init
sequence), for plain-text and conversational
(ChatML template) pairs, and with a PEFT model started from a non-zero adapter (TRL's reference is
then a frozen copy of that adapter, or the model with its adapters disabled where it cannot copy).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.conventions import encode_probes, trl_example
from marginscope.demo.tiny import build_chat_tokenizer, build_model
from marginscope.errors import MarginscopeError
from marginscope.probes import ProbeSet

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [
    ("Is the movie good?", "Yes, it was wonderful.", "No, it was a bad one."),
    ("The phone failed. The sentiment is", " negative.", " positive, and great."),
    ("Rate it: ", "9 out of 10", "!!"),
    ("Bad", " no", " yes it is fine"),
]


def _probes(chat: bool) -> ProbeSet:
    records = []
    for k, (prompt, chosen, rejected) in enumerate(PAIRS):
        record = {"id": f"q{k}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        if chat:
            record["prompt_messages"] = [{"role": "user", "content": prompt}]
        records.append(record)
    return ProbeSet.from_records(records)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_chat_tokenizer()


def _trainer(model, tokenizer, probes, tmp_path, **config):
    rows = [trl_example(p, p.chosen, p.rejected) for p in probes]
    config = {"precompute_ref_log_probs": True, **config}
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=1e-6, report_to="none", use_cpu=True, bf16=False, seed=0,
                         disable_tqdm=True, save_strategy="no", **config)
    return trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer)


def _trl_reference(trainer) -> np.ndarray:
    """TRL's own precomputed per-pair reference log-probs [N, 2] (chosen, rejected)."""
    data = trainer.train_dataset
    return np.stack([np.asarray(data["ref_chosen_logps"]), np.asarray(data["ref_rejected_logps"])], axis=1)


def _trl_policy(trainer) -> np.ndarray:
    """The policy's per-pair log-probs [N, 2] by TRL's own collator and fused-head forward."""
    batch = _trl_batch(trainer)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            use_cache=False, fused_lm_head=True)
    logps = out.log_probs.sum(1).double().numpy()
    return np.stack(np.split(logps, 2), axis=1)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "conversational"])
def test_tracker_step0_equals_trl_reference(chat, chat_tokenizer, tmp_path):
    model = build_model("llama", chat_tokenizer, seed=1)
    probes = _probes(chat)
    trainer = _trainer(model, chat_tokenizer, probes, tmp_path)
    path = tmp_path / "run.h5"
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=path, every=1, top_k=1))
    trainer.train()
    with ms.trace.open(path) as tr:
        assert tr.metadata["convention"] == "trl" and tr.metadata["max_length"] == trainer.args.max_length
        step0 = tr.logp[0]
        ids = [tr.input_ids(n, 0) for n in range(len(probes))]
    expected = _trl_reference(trainer)
    np.testing.assert_allclose(step0, expected, rtol=1e-6, atol=1e-5)
    end_of_turn = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for n, (prompt_ids, response_ids) in enumerate(ids):
        row = trainer.train_dataset[n]
        assert list(prompt_ids) == row["prompt_ids"] and list(response_ids) == row["chosen_ids"]
        assert response_ids[-1 - chat] == end_of_turn  # "<|im_end|>" (+ "\n" in a chat) ends every response


def _trl_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


@pytest.mark.parametrize("ref_adapter", [True, False], ids=["ref-adapter-copy", "adapters-disabled"])
def test_peft_from_a_trained_adapter_gets_trl_s_reference(ref_adapter, chat_tokenizer, tmp_path):
    """TRL 1.16 with a PEFT model that already has an adapter and no ref_model copies the adapter into a
    frozen "ref" adapter (the reference = the initial adapter); where it cannot (peft < 0.20 with
    target_parameters) the reference is the model with adapters disabled (the base model). The
    tracker takes the same reference either way (TRL's `use_adapter` choice), not the policy itself."""
    peft = pytest.importorskip("peft")
    base = build_model("llama", chat_tokenizer, seed=2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    with torch.no_grad():  # a trained (non-zero) adapter: the policy differs from the base model at step 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    probes = _probes(True)
    trainer = _trainer(model, chat_tokenizer, probes, tmp_path, precompute_ref_log_probs=False)
    assert "ref" in model.peft_config
    if not ref_adapter:
        model.delete_adapter("ref")  # TRL's branch without a "ref" copy
    batch = _trl_batch(trainer)
    with torch.no_grad():
        expected_ref = torch.stack(trainer.compute_ref_log_probs(trainer.model, batch), 1).double().numpy()
    policy = _trl_policy(trainer)
    path = tmp_path / "run.h5"
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=path, every=1, top_k=1))
    trainer.train()
    with ms.trace.open(path) as tr:
        ref, step0 = tr.ref_logp, tr.logp[0]
    np.testing.assert_allclose(ref, expected_ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(step0, policy, rtol=1e-6, atol=1e-5)
    if ref_adapter:
        np.testing.assert_allclose(ref, step0, rtol=1e-6, atol=1e-5)
    else:
        assert np.abs(step0 - ref).min() > 1e-3  # the base model, not the policy at step 0


def test_boundary_token_moves_into_both_responses_as_trl_does(tmp_path):
    # the trailing space of the prompt merges with a digit ("Ġ7") and with a symbol ("Ġ!")
    texts = ["Rate it: 7 points", "Rate it: ! no", "it 7 ! 7 ! 77"] * 20
    tok = build_chat_tokenizer(texts, vocab_size=300)
    assert tok.convert_tokens_to_ids("Ġ7") != tok.unk_token_id and len(tok("Rate it: ")["input_ids"]) > 1
    probes = ProbeSet.from_records([{"id": "b", "prompt": "Rate it: ", "chosen": "7 points", "rejected": "! no"}])
    (enc,) = encode_probes(tok, probes)
    prompt_alone = tok("Rate it: ")["input_ids"]
    assert list(enc.prompt_ids) == prompt_alone[:-1]  # the trailing " " left the prompt, for both responses
    assert tok.decode(enc.response_ids[0]).startswith(" 7") and tok.decode(enc.response_ids[1]).startswith(" !")
    assert [tok.decode(r) for r in enc.response_ids] == [" 7 points<|im_end|>", " ! no<|im_end|>"]
    (sep,) = encode_probes(tok, probes, convention="separate")
    assert list(sep.prompt_ids) == prompt_alone and tok.decode(sep.response_ids[0]) == "7 points"


def test_bos_added_by_the_tokenizer_and_written_by_the_template_appears_once():
    tok = build_chat_tokenizer(add_bos=True)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    probes = ProbeSet.from_records([{"id": "c", "prompt": "hi", "chosen": "yes", "rejected": "no",
                                     "prompt_messages": [{"role": "user", "content": "hi"}]}])
    (enc,) = encode_probes(tok, probes)
    ids = list(enc.prompt_ids) + list(enc.response_ids[0])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    plain = ProbeSet.from_records([{"id": "p", "prompt": "hi", "chosen": " yes", "rejected": " no"}])
    (enc,) = encode_probes(tok, plain)
    assert (list(enc.prompt_ids) + list(enc.response_ids[0])).count(tok.bos_token_id) == 1


def test_response_truncated_to_zero_tokens_is_an_error_naming_the_probe(chat_tokenizer):
    probes = _probes(False)
    prompt_len = len(encode_probes(chat_tokenizer, probes)[0].prompt_ids)
    with pytest.raises(MarginscopeError, match=r"probe 'q0'.*max_length=\d+ \(keep_start\) leaves response "
                                               r"'chosen' with no token"):
        encode_probes(chat_tokenizer, probes, max_length=prompt_len)
    cut = encode_probes(chat_tokenizer, probes, max_length=prompt_len + 1)
    assert all(len(r) == 1 for r in cut[0].response_ids)  # one token kept, as TRL's collator keeps it
    with pytest.raises(MarginscopeError, match="keep_end.*cuts into the prompt differently"):
        encode_probes(chat_tokenizer, probes, max_length=prompt_len + 1, truncation_mode="keep_end")


def test_conversational_probes_keep_their_messages_through_the_file(chat_tokenizer, tmp_path):
    probes = _probes(True)
    probes.to_jsonl(tmp_path / "p.jsonl")
    again = ms.probes.load(tmp_path / "p.jsonl")
    assert again[0].prompt_messages == [{"role": "user", "content": PAIRS[0][0]}]
    assert [e.response_ids for e in encode_probes(chat_tokenizer, again)] == \
        [e.response_ids for e in encode_probes(chat_tokenizer, probes)]
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "prompt": "a", "chosen": "b", "rejected": "c", '
                                        '"prompt_messages": [{"role": "user"}]}\n')
    with pytest.raises(ms.errors.InputError, match=r"bad.jsonl:1: field 'prompt_messages\[0\]'"):
        ms.probes.load(tmp_path / "bad.jsonl")


def test_from_preferences_keeps_the_messages_and_counts_lengths_as_scored(chat_tokenizer, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probes = ms.probes.from_preferences(data, n=len(rows), tokenizer=chat_tokenizer)
    assert probes[0].prompt_messages == [{"role": "user", "content": PAIRS[0][0]}]
    encoded = encode_probes(chat_tokenizer, probes)
    end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(r[-2] == end for e in encoded for r in e.response_ids)
    lengths = [len(e.prompt_ids) + max(map(len, e.response_ids)) for e in encoded]
    kept = ms.probes.from_preferences(data, n=1, tokenizer=chat_tokenizer, max_len=min(lengths))
    assert [p.id for p in kept] == [probes[lengths.index(min(lengths))].id]
