"""Probe builders: sentiment and arithmetic sets, sampling from preference datasets, the top output y*."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch

import marginscope as ms
from marginscope.demo.tiny import build_tokenizer
from marginscope.errors import InputError, MarginscopeError
from marginscope.probes import builders
from marginscope.probes.top_output import _Decoder, _prompt_seed

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def jsonl_bytes(probes: ms.probes.ProbeSet, path: Path) -> bytes:
    probes.to_jsonl(path)
    assert ms.probes.validate(path) is not None and ms.probes.problems(path) == []
    return path.read_bytes()


def word_diff(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


# ------------------------------------------------------------------------------------ sentiment

@pytest.mark.parametrize("style", ms.probes.SENTIMENT_STYLES)
def test_sentiment_is_valid_deterministic_and_seeded(tmp_path, style):
    first = jsonl_bytes(ms.probes.sentiment(32, style=style, seed=0), tmp_path / "a.jsonl")
    assert jsonl_bytes(ms.probes.sentiment(32, style=style, seed=0), tmp_path / "b.jsonl") == first
    assert jsonl_bytes(ms.probes.sentiment(32, style=style, seed=1), tmp_path / "c.jsonl") != first
    probes = ms.probes.load(tmp_path / "a.jsonl")
    assert probes.ids == [f"sentiment-{style}-{i}" for i in range(32)]


@pytest.mark.parametrize("style", ms.probes.SENTIMENT_STYLES)
def test_sentiment_pairs_differ_in_exactly_the_label_word(style):
    for probe in ms.probes.sentiment(40, style=style, seed=3):
        adjective = probe.prompt.split(".")[0].split()[-1]
        assert adjective in builders.POSITIVE + builders.NEGATIVE
        right, wrong = ("positive", "negative") if adjective in builders.POSITIVE else ("negative", "positive")
        assert word_diff(probe.chosen, probe.rejected) == [(right, wrong)]
        assert probe.chosen.startswith(" ") and probe.prompt.endswith(builders.SENTIMENT_CUE)


def test_sentiment_styles_share_statements_and_grow():
    sets = {style: ms.probes.sentiment(24, style=style, seed=5) for style in ms.probes.SENTIMENT_STYLES}
    prompts = {style: [p.prompt for p in s] for style, s in sets.items()}
    assert prompts["single"] == prompts["short"] == prompts["long"]
    for single, short, long in zip(*sets.values()):
        assert len(single.chosen.split()) == 1 and single.chosen.strip() in ("positive", "negative")
        assert single.chosen.strip() in short.chosen.split()
        assert long.chosen.startswith(short.chosen.rstrip(".")) and len(long.chosen) > len(short.chosen) + 20


def test_sentiment_statements_feed_the_probes():
    statements = ms.probes.sentiment_statements(30, seed=2)
    assert statements == ms.probes.sentiment_statements(30, seed=2)
    assert len({s.text for s in statements}) == 30
    assert sorted(s.label for s in statements) == ["negative"] * 15 + ["positive"] * 15
    probes = ms.probes.sentiment(30, style="short", seed=2)
    for statement, probe in zip(statements, probes):
        assert probe.prompt == f"{statement.text} {builders.SENTIMENT_CUE}"
        assert probe.chosen == ms.probes.sentiment_response(statement.label, "short")
        assert re.fullmatch(r"[A-Z][a-z ,]+\.", statement.text), statement.text


def test_builders_leave_the_global_rng_alone():
    random.seed(7)
    state = random.getstate()
    ms.probes.sentiment(8, seed=1)
    ms.probes.arithmetic(4, seed=1)
    assert random.getstate() == state


@pytest.mark.parametrize("call,needle", [
    (lambda: ms.probes.sentiment(8, style="medium"), "single, short, long"),
    (lambda: ms.probes.sentiment(0), "n must be between 1"),
    (lambda: ms.probes.sentiment(10**6), "n must be between 1"),
    (lambda: ms.probes.arithmetic(-1), "n_questions must be between 1"),
    (lambda: ms.probes.arithmetic(4, pairs_per_question=6), "pairs_per_question must be between 1 and 5"),
])
def test_builder_argument_errors(call, needle):
    with pytest.raises(MarginscopeError, match=needle):
        call()


# ----------------------------------------------------------------------------------- arithmetic

def test_arithmetic_is_valid_deterministic_and_seeded(tmp_path):
    first = jsonl_bytes(ms.probes.arithmetic(12, seed=0, pairs_per_question=3), tmp_path / "a.jsonl")
    assert jsonl_bytes(ms.probes.arithmetic(12, seed=0, pairs_per_question=3), tmp_path / "b.jsonl") == first
    assert jsonl_bytes(ms.probes.arithmetic(12, seed=1, pairs_per_question=3), tmp_path / "c.jsonl") != first
    assert ms.probes.load(tmp_path / "a.jsonl").ids == [f"arith-{q}-{k}" for q in range(12) for k in range(3)]


def test_arithmetic_chosen_correct_rejected_wrong():
    probes = ms.probes.arithmetic(60, seed=4, pairs_per_question=5)
    by_question: dict[str, list] = {}
    for probe in probes:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? Answer:", probe.prompt).groups()
        answer = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        chosen, rejected = (int(re.findall(r"\d+", text)[-1]) for text in (probe.chosen, probe.rejected))
        assert chosen == answer and rejected != answer and rejected >= 0, probe
        assert len(word_diff(probe.chosen, probe.rejected)) == 1
        by_question.setdefault(probe.id.rsplit("-", 1)[0], []).append((probe.prompt, rejected))
    assert len(by_question) == 60 and len({v[0][0] for v in by_question.values()}) == 60
    for pairs in by_question.values():
        assert len({prompt for prompt, _ in pairs}) == 1 and len({wrong for _, wrong in pairs}) == 5


# ---------------------------------------------------------------------------- from_preferences

ROWS = [{"prompt": f"Question {i}?", "chosen": " yes" + " indeed" * i, "rejected": f" no {i}", "other": i}
        for i in range(12)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows in the format of `path`'s suffix, or a datasets.save_to_disk folder without one."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        from datasets import Dataset
        Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = ["data.jsonl", "data.csv", "data.parquet", "data_dir"]


def rows_as_strings(rows: list[dict]) -> list[dict]:
    return [{k: str(v) for k, v in r.items()} for r in rows]


@pytest.mark.parametrize("name", FORMATS)
def test_from_preferences_every_format_gives_the_same_sample(tmp_path, name):
    path = write_rows(tmp_path / name, rows_as_strings(ROWS))
    probes = ms.probes.from_preferences(path, n=5, seed=0)
    reference = ms.probes.from_preferences(write_rows(tmp_path / "ref.jsonl", ROWS), n=5, seed=0)
    assert probes.fingerprint() == reference.fingerprint()
    assert probes.ids == sorted(probes.ids, key=lambda i: int(i.split("-")[1])) and len(set(probes.ids)) == 5
    for probe in probes:
        row = ROWS[int(probe.id.removeprefix("pref-"))]
        assert (probe.prompt, probe.chosen, probe.rejected) == (row["prompt"], row["chosen"], row["rejected"])
    out = tmp_path / "out.jsonl"
    assert jsonl_bytes(probes, out) == jsonl_bytes(ms.probes.from_preferences(path, n=5, seed=0), out)
    assert ms.probes.from_preferences(path, n=5, seed=1).ids != probes.ids


@pytest.mark.parametrize("name", FORMATS)
def test_from_preferences_missing_column_lists_the_columns(tmp_path, name):
    path = write_rows(tmp_path / name, rows_as_strings(ROWS))
    with pytest.raises(InputError) as info:
        ms.probes.from_preferences(path, n=2, prompt_col="question")
    message = str(info.value)
    assert info.value.field == "question" and message.startswith(str(path)) and "\n" not in message
    assert all(f"'{column}'" in message for column in ("prompt", "chosen", "rejected", "other")), message


def test_from_preferences_custom_columns(tmp_path):
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    path = write_rows(tmp_path / "data.jsonl", rows)
    probes = ms.probes.from_preferences(path, n=12, prompt_col="q", chosen_col="good", rejected_col="bad")
    assert [p.prompt for p in probes] == [r["prompt"] for r in ROWS]


def test_from_preferences_length_filters(tmp_path, tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    lengths = {f"pref-{i}": len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) for i, r in enumerate(ROWS)}
    kept = ms.probes.from_preferences(path, n=4, seed=0, min_len=30, max_len=60)
    assert all(30 <= lengths[i] <= 60 for i in kept.ids)
    eligible = sum(30 <= v <= 60 for v in lengths.values())
    shortage = rf"only {eligible} of 12 pairs pass the length filters \(min_len=30, max_len=60, in characters\)"
    with pytest.raises(InputError, match=shortage):
        ms.probes.from_preferences(path, n=eligible + 1, min_len=30, max_len=60)

    everything = ms.probes.from_preferences(path, n=12)
    counts = {e.probe_id: len(e.prompt_ids) + max(map(len, e.response_ids))  # as scored (convention "trl")
              for e in ms.conventions.encode_probes(tokenizer, everything)}
    low, high = sorted(counts.values())[3], sorted(counts.values())[8]
    kept = ms.probes.from_preferences(path, n=1, tokenizer=tokenizer, min_len=low, max_len=high)
    assert low <= counts[kept.ids[0]] <= high
    eligible = sum(low <= v <= high for v in counts.values())
    assert len(ms.probes.from_preferences(path, n=eligible, tokenizer=tokenizer, min_len=low, max_len=high)) == eligible
    with pytest.raises(InputError, match="tokens"):
        ms.probes.from_preferences(path, n=eligible + 1, tokenizer=tokenizer, min_len=low, max_len=high)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}?"}],
     "chosen": [{"role": "assistant", "content": f"Hello {i}."}],
     "rejected": [{"role": "assistant", "content": "Go away."}]} for i in range(3)
]


@pytest.mark.parametrize("name", ["chat.jsonl", "chat.parquet", "chat_dir"])
def test_from_preferences_chat_messages(tmp_path, chat_tokenizer, name):
    path = write_rows(tmp_path / name, CHAT_ROWS)
    probes = ms.probes.from_preferences(path, n=3, tokenizer=chat_tokenizer)
    for i, probe in enumerate(probes):
        assert probe.prompt == f"<system>Be brief.\n<user>Hi {i}?\n<assistant>"  # BOS left to the tokenizer
        assert (probe.chosen, probe.rejected) == (f"Hello {i}.", "Go away.")


def test_from_preferences_conversation_in_responses(tmp_path, chat_tokenizer):
    """UltraFeedback-style rows: a prompt string and whole conversations as chosen/rejected."""
    user = {"role": "user", "content": "Name a colour."}
    rows = [{"prompt": "Name a colour.", "chosen": [user, {"role": "assistant", "content": "Blue."}],
             "rejected": [user, {"role": "assistant", "content": "Seven."}]},
            {"prompt": "Count.", "chosen": [{"role": "assistant", "content": "One two."}],
             "rejected": [{"role": "assistant", "content": "Blue."}]}]
    probes = ms.probes.from_preferences(write_rows(tmp_path / "uf.jsonl", rows), n=2, tokenizer=chat_tokenizer)
    assert [p.prompt for p in probes] == ["<user>Name a colour.\n<assistant>", "<user>Count.\n<assistant>"]
    assert [p.chosen for p in probes] == ["Blue.", "One two."]


def test_from_preferences_chat_needs_a_template(tmp_path, tokenizer):
    path = write_rows(tmp_path / "chat.jsonl", CHAT_ROWS)
    with pytest.raises(InputError, match="need a tokenizer with a chat template") as info:
        ms.probes.from_preferences(path, n=1)
    assert (info.value.line, info.value.field) == (1, "prompt")
    with pytest.raises(InputError, match="the tokenizer has none"):
        ms.probes.from_preferences(path, n=1, tokenizer=tokenizer)


BAD_ROWS = {
    "not-json": (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": '], 2, None, "not valid JSON"),
    "not-object": (['["a", "b"]'], 1, None, "expected a JSON object"),
    "missing-key": ([{"prompt": "a", "chosen": "b"}], 1, "rejected", "keys on this line: 'prompt', 'chosen'"),
    "number": ([{"prompt": "a", "chosen": 3, "rejected": "c"}], 1, "chosen", "found number"),
    "null": ([{"prompt": None, "chosen": "b", "rejected": "c"}], 1, "prompt", "found null"),
    "blank": ([{"prompt": "a", "chosen": "  ", "rejected": "c"}], 1, "chosen", "empty"),
    "identical": ([{"prompt": "a", "chosen": "b", "rejected": "b"}], 1, "rejected", "identical"),
    "bad-message": ([{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}], 1, "prompt", "message 0"),
    "not-assistant": ([{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}], 1,
                      "chosen", "end with an assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_from_preferences_bad_rows_are_located(tmp_path, case):
    lines, line, field, needle = BAD_ROWS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(InputError) as info:
        ms.probes.from_preferences(path, n=1)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field) and needle in str(err), str(err)


def test_from_preferences_bad_csv_and_parquet_rows_are_located(tmp_path):
    rows = rows_as_strings(ROWS[:3])
    rows[2]["chosen"] = rows[2]["rejected"]
    with pytest.raises(InputError, match="identical") as info:
        ms.probes.from_preferences(write_rows(tmp_path / "d.csv", rows), n=1)
    assert (info.value.line, info.value.field) == (4, "rejected")  # header is line 1
    with pytest.raises(InputError, match="identical") as info:
        ms.probes.from_preferences(write_rows(tmp_path / "d.parquet", rows), n=1)
    assert (info.value.line, info.value.field) == (3, "rejected")  # 1-based row


def test_from_preferences_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ms.probes.from_preferences(tmp_path / "none.jsonl", n=1)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported file type '.txt'"):
        ms.probes.from_preferences(tmp_path / "data.txt", n=1)
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not a datasets.save_to_disk folder"):
        ms.probes.from_preferences(tmp_path / "folder", n=1)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        ms.probes.from_preferences(tmp_path / "broken.parquet", n=1)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="contains no rows"):
        ms.probes.from_preferences(tmp_path / "empty.jsonl", n=1)
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(MarginscopeError, match="n must be at least 1"):
        ms.probes.from_preferences(path, n=0)
    with pytest.raises(MarginscopeError, match="greater than max_len"):
        ms.probes.from_preferences(path, n=1, min_len=10, max_len=5)


def test_from_preferences_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict
    train = Dataset.from_list(rows_as_strings(ROWS))
    DatasetDict({"train": train, "test": train.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert len(ms.probes.from_preferences(tmp_path / "dd", n=12)) == 12
    DatasetDict({"a": train, "b": train}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(InputError, match="holds splits 'a', 'b'"):
        ms.probes.from_preferences(tmp_path / "ab", n=1)


# ------------------------------------------------------------------------------------------ top

def manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding without a KV cache: the full sequence through the model at every step;
    special tokens other than EOS never chosen, EOS not as the first token."""
    ids = tokenizer(prompt)["input_ids"]
    banned = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    new: list[int] = []
    with torch.no_grad():
        for t in range(max_new_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1].clone()
            logits[banned] = -torch.inf
            if t == 0:
                logits[tokenizer.eos_token_id] = -torch.inf
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


def test_top_greedy_equals_a_manual_greedy_decode(make_model, tokenizer):
    model = make_model("gpt2")
    probes = ms.probes.sentiment(6, style="short", seed=0)
    with_top = ms.probes.top(probes, model, tokenizer, max_new_tokens=10)
    assert with_top.response_names == ["chosen", "rejected", "top"]
    for probe in with_top:
        expected = manual_greedy(model, tokenizer, probe.prompt, 10)
        assert probe.extra["top"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert tokenizer(probe.extra["top"], add_special_tokens=False)["input_ids"] == expected  # re-tokenizes


def test_top_stops_at_eos(make_model, tokenizer):
    model = make_model("gpt2")
    with torch.no_grad():  # make EOS the most likely token everywhere: decoding stops after one token
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        bias = torch.zeros(len(tokenizer), dtype=torch.float64)
        bias[tokenizer.eos_token_id] = 1e3
        model.lm_head.register_parameter("bias", torch.nn.Parameter(bias))
    probes = ms.probes.sentiment(2, seed=0)
    for probe in ms.probes.top(probes, model, tokenizer, max_new_tokens=10):
        assert len(tokenizer(probe.extra["top"], add_special_tokens=False)["input_ids"]) == 1


def test_top_sample_is_seeded_and_picks_the_most_probable_sample(make_model, tokenizer):
    model = make_model("gpt2")
    probes = ms.probes.arithmetic(3, seed=0, pairs_per_question=2)
    torch.manual_seed(1)
    first = ms.probes.top(probes, model, tokenizer, method="sample", k=4, max_new_tokens=6, seed=0)
    torch.manual_seed(2)
    again = ms.probes.top(probes, model, tokenizer, method="sample", k=4, max_new_tokens=6, seed=0)
    other = ms.probes.top(probes, model, tokenizer, method="sample", k=4, max_new_tokens=6, seed=1)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    assert first[0].extra["top"] == first[1].extra["top"]  # probes sharing a prompt share y*
    decoder = _Decoder(model, tokenizer, 6)
    prompt = probes[0].prompt
    ids = tokenizer(prompt)["input_ids"]
    generator = torch.Generator().manual_seed(_prompt_seed(0, prompt))
    samples, logps = decoder._decode(ids, 4, generator)
    with torch.no_grad():
        for sample, logp in zip(samples, logps):
            log_probs = torch.log_softmax(model(torch.tensor([ids + sample])).logits[0], -1)
            exact = sum(float(log_probs[len(ids) - 1 + t, tok]) for t, tok in enumerate(sample))
            assert logp == pytest.approx(exact, rel=1e-9)
    best = max(range(4), key=lambda i: logps[i])
    assert first[0].extra["top"] == decoder._text(ids, samples[best])


def test_top_restores_modes_and_leaves_the_global_rng_alone(make_model, tokenizer):
    model = make_model("gpt2", dropout=0.1)
    model.train()
    model.transformer.h[0].eval()
    modes = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(11)
    state = torch.get_rng_state()
    ms.probes.top(ms.probes.sentiment(2, seed=0), model, tokenizer, method="sample", k=3, max_new_tokens=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_top_argument_errors(make_model, tokenizer):
    model = make_model("gpt2")
    probes = ms.probes.sentiment(2, seed=0)
    with pytest.raises(MarginscopeError, match="method must be one of greedy, sample"):
        ms.probes.top(probes, model, tokenizer, method="beam")
    with pytest.raises(MarginscopeError, match="k must be at least 1"):
        ms.probes.top(probes, model, tokenizer, method="sample", k=0)
    with pytest.raises(MarginscopeError, match="exceed the model's 128 positions"):
        ms.probes.top(probes, model, tokenizer, max_new_tokens=200)
    taken = ms.probes.top(probes, model, tokenizer, max_new_tokens=2)
    with pytest.raises(InputError, match="'top' already exists"):
        ms.probes.top(taken, model, tokenizer, max_new_tokens=2)
    assert ms.probes.top(taken, model, tokenizer, max_new_tokens=2, name="top2").extra_names == ["top", "top2"]


# ----------------------------------------------------------------------------------------- docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "probes.md"


def test_docs_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    exec(snippet, {})
    assert ms.probes.load(tmp_path / "arith_top.jsonl").ids[:2] == ["arith-0-0", "arith-0-1"]


@pytest.mark.parametrize("builder", ["sentiment", "arithmetic", "from_preferences", "top"])
def test_docs_name_every_parameter(builder):
    import inspect
    heading = next(line for line in DOC.read_text().splitlines() if line.startswith(f"## `{builder}("))
    for name in inspect.signature(getattr(ms.probes, builder)).parameters:
        assert re.search(rf"\b{name}\b", heading), (builder, name)
