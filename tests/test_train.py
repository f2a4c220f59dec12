"""`marginscope.train`: the preference trainer learns, every loss trains, runs are reproducible,
accumulation matches one big batch, resumed runs equal uninterrupted ones bit for bit."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import marginscope as ms
from marginscope.demo.tiny import save_tiny
from marginscope.dynamics.scoring import sequence_logp
from marginscope.loading import load_model, load_tokenizer
from marginscope.probes import ProbeSet
from marginscope.train import DataOrder, TrainConfig, _grad_norm, train
from launch import run_script

PAIRS = ProbeSet.from_records([
    {"id": f"t{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
    for i, (prompt, chosen, rejected) in enumerate([
        ("The movie was wonderful. The sentiment is", " positive.", " negative."),
        ("The service was terrible. The sentiment is", " negative.", " positive, and it was fine."),
        ("The food was", " great", " cold and bland"),
        ("This phone failed every expectation. The sentiment is", " negative.", " positive."),
        ("The concert was", " loud and joyful", " boring"),
        ("The hotel room was", " clean", " dirty and small"),
        ("The book was", " a delight", " dull"),
        ("The weather today is", " sunny and warm", " awful"),
    ])
], source="pairs")


class Interrupted(Exception):
    pass


def _config(**kwargs) -> TrainConfig:
    defaults = dict(data=PAIRS, loss="dpo", hparams={"beta": 0.5}, steps=4, batch_size=4, lr=1e-3)
    return TrainConfig(**{**defaults, **kwargs})


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dpo_run_lowers_the_loss_and_raises_the_margin(tmp_path, probes):
    model_dir = save_tiny(tmp_path / "model")
    trace = tmp_path / "run.h5"
    result = train(_config(model=model_dir, probes=probes, trace=trace, every=4, steps=16))
    assert [h.step for h in result.history] == list(range(1, 17))
    assert result.history[0].margin == 0.0  # reference = the initial policy, no dropout
    assert result.final_loss < 0.5 * result.history[0].loss and result.history[-1].margin > 0
    assert result.trace == trace and result.checkpoint is None
    tokenizer = load_tokenizer(model_dir)
    encoded = ms.conventions.encode_probes(tokenizer, PAIRS)  # the ids train scores (convention "trl")
    before = sequence_logp(load_model(model_dir), encoded)
    after = sequence_logp(result.model, encoded)
    margin = (after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1])
    assert (margin > 0).all()
    loss = ms.losses.get("dpo", beta=0.5)
    assert loss(after[:, 0], after[:, 1], before[:, 0], before[:, 1], None, None).mean() < math.log(2) / 2
    order = DataOrder.of(_config(steps=16), len(PAIRS))
    with ms.trace.open(trace) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 4, 8, 12, 16])
        assert tr.metadata["kind"] == "train" and tr.metadata["train"]["loss"] == "dpo"
        assert tr.metadata["loss_hparams"] == {"beta": 0.5}
        inrun = tr.inrun()
        np.testing.assert_array_equal(inrun["step"], np.repeat(np.arange(1, 17), 4))
        np.testing.assert_array_equal(inrun["pair"], np.tile(np.arange(4), 16))
        first = order.pairs(1)  # in-run row (1, j) is training pair order.pairs(1)[j], scored before step 1
        np.testing.assert_allclose(inrun["logp_w"][:4], before[first, 0], rtol=1e-5)
        np.testing.assert_allclose(inrun["logp_l"][:4], before[first, 1], rtol=1e-5)
        assert np.isfinite(inrun["inner"]).all() and set(inrun["case"]) <= {1, 2, 3, 4}
        # the step before each record is attributed to its pairs, named by their ids (float32 model)
        for s, step in enumerate(tr.steps[1:], start=1):
            sel = inrun["step"] == step
            assert inrun["pair_id"][sel].tolist() == [PAIRS.ids[i] for i in order.pairs(int(step))]
            effect = inrun["probe_effect"][sel]
            assert np.isfinite(effect).all() and (inrun["effect_scale"][sel] == inrun["effect_scale"][sel][0]).all()
            np.testing.assert_allclose(effect.sum(0), tr.step_parts["gradient"][s], rtol=2e-4,
                                       atol=1e-6 * np.abs(effect).max())
        assert np.isnan(inrun["probe_effect"][inrun["step"] % 4 != 0]).all()


@pytest.mark.parametrize("name", ms.losses.names())
def test_every_loss_trains(name, make_model, tokenizer):
    model = make_model("gpt2", dtype=torch.float32)
    before = _params(model)
    result = train(_config(loss=name, hparams={}, steps=2, batch_size=2), model=model, tokenizer=tokenizer)
    assert len(result.history) == 2 and all(math.isfinite(h.loss) for h in result.history)
    assert any(not torch.equal(before[k], v) for k, v in _params(model).items())


def test_resume_equals_the_uninterrupted_run(make_model, tokenizer, probes, tmp_path):
    def run(tag: str, stop_at: int | None = None, resume: str | None = None):
        model = make_model("gpt2", dtype=torch.float32, dropout=0.1)
        config = _config(probes=probes, trace=tmp_path / f"{tag}.h5", every=2, steps=8, batch_size=3,
                         grad_accum=2, warmup_steps=2, max_grad_norm=1.0, out_dir=tmp_path / tag,
                         checkpoint_every=4, resume=resume)

        def stop(log):
            if log.step == stop_at:
                raise Interrupted

        return model, train(config, model=model, tokenizer=tokenizer, callback=stop)

    model, full = run("full")
    with pytest.raises(Interrupted):
        run("cut", stop_at=6)
    resumed_model, resumed = run("cut", resume="latest")
    _assert_same_params(_params(model), _params(resumed_model))
    assert resumed.history == full.history
    assert resumed.checkpoint == tmp_path / "cut" / "checkpoint-8"
    with ms.trace.open(tmp_path / "full.h5") as a, ms.trace.open(tmp_path / "cut.h5") as b:
        np.testing.assert_array_equal(a.steps, [0, 2, 4, 6, 8])
        np.testing.assert_array_equal(b.steps, a.steps)
        for name in ("logp", "token_logp", "gram", "d_w", "d_l", "case", "predicted_delta", "observed_delta",
                     "topk_ids", "topk_prob"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
        for name, values in a.inrun().items():
            np.testing.assert_array_equal(b.inrun()[name], values, err_msg=name)


def test_resume_refuses_other_settings(make_model, tokenizer, tmp_path):
    model = make_model("gpt2", dtype=torch.float32)
    train(_config(steps=2, out_dir=tmp_path / "out", checkpoint_every=1), model=model, tokenizer=tokenizer)
    with pytest.raises(ms.MarginscopeError, match="checkpoint-2: made with lr 0.001, this run has 0.01"):
        train(_config(steps=2, lr=1e-2, out_dir=tmp_path / "out", resume="latest"), model=model, tokenizer=tokenizer)
    with pytest.raises(ms.MarginscopeError, match="earlier run"):
        train(_config(steps=2, out_dir=tmp_path / "out"), model=model, tokenizer=tokenizer)
    train(_config(steps=1, out_dir=tmp_path / "out", overwrite=True), model=model, tokenizer=tokenizer)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-1"]
    with pytest.raises(ms.MarginscopeError, match="no checkpoint"):
        train(_config(out_dir=tmp_path / "empty", resume="latest"), model=model, tokenizer=tokenizer)


def test_same_seed_same_run_and_the_tracker_changes_nothing(make_model, tokenizer, probes, tmp_path):
    def run(seed: int, tracked: bool):
        model = make_model("gpt2", dtype=torch.float32, dropout=0.1)
        extra = dict(probes=probes, trace=tmp_path / f"{seed}-{tracked}.h5", every=1) if tracked else {}
        train(_config(seed=seed, steps=3, batch_size=3, **extra), model=model, tokenizer=tokenizer)
        return _params(model)

    first = run(0, tracked=False)
    _assert_same_params(first, run(0, tracked=False))
    _assert_same_params(first, run(0, tracked=True))
    assert any(not torch.equal(first[k], v) for k, v in run(1, tracked=False).items())


def test_accumulation_equals_one_big_batch(make_model, tokenizer):
    def run(batch_size: int, grad_accum: int):
        model = make_model("gpt2")  # float64: only summation order differs between the two
        result = train(_config(epochs=2.5, batch_size=batch_size, grad_accum=grad_accum, steps=None),
                       model=model, tokenizer=tokenizer)
        return _params(model), result.history

    big, big_log = run(6, 1)
    small, small_log = run(2, 3)
    assert [h.pairs for h in big_log] == [6, 6, 6, 2]  # 20 pairs: nothing dropped, a short last step
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-9, atol=1e-12)
    for key in ("loss", "margin", "grad_norm"):  # AdamW hides a uniform gradient scale; the norm does not
        np.testing.assert_allclose([getattr(h, key) for h in small_log], [getattr(h, key) for h in big_log],
                                   rtol=1e-10, atol=1e-12, err_msg=key)


def test_data_order_covers_every_pair_once_per_epoch():
    order = DataOrder(n_pairs=5, batch_size=2, total_pairs=8, seed=3)
    steps = [order.pairs(s) for s in range(1, order.steps + 1)]
    assert [len(s) for s in steps] == [2, 2, 2, 2]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:5]) == list(range(5)) and len(set(flat[5:])) == 3
    assert flat == [i for s in range(1, 5) for i in DataOrder(5, 2, 8, seed=3).pairs(s)]
    assert flat != [i for s in range(1, 5) for i in DataOrder(5, 2, 8, seed=4).pairs(s)]
    two = DataOrder(n_pairs=5, batch_size=2, total_pairs=7, seed=3, grad_accum=2, world_size=2)
    assert two.steps == 1 and two.micro_batches(1, 0) == [flat[0:2], flat[4:6]]
    assert two.micro_batches(1, 1) == [flat[2:4], flat[6:7]] and two.shard(1, 1) == flat[2:4] + flat[6:7]
    assert DataOrder(5, 2, 5, seed=3, world_size=2).micro_batches(2, 1) == [[]]  # a short last round
    assert DataOrder.of(TrainConfig(data=PAIRS, batch_size=3), 8).steps == 3  # default: one epoch
    assert DataOrder.of(TrainConfig(data=PAIRS, batch_size=3, steps=2, epochs=5), 8).total_pairs == 6


def test_schedules(make_model, tokenizer):
    def lrs(schedule: str):
        model = make_model("gpt2", dtype=torch.float32)
        result = train(_config(steps=6, batch_size=2, lr=1.0e-3, warmup_steps=2, schedule=schedule),
                       model=model, tokenizer=tokenizer)
        return [h.lr / 1e-3 for h in result.history]

    np.testing.assert_allclose(lrs("linear"), [0, 0.5, 1, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(lrs("constant"), [0, 0.5, 1, 1, 1, 1])


def test_grad_norm_clips():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 2.0), torch.full((4,), 2.0)
    assert _grad_norm(params, None) == pytest.approx(math.sqrt(28))
    assert _grad_norm(params, 1.0) == pytest.approx(math.sqrt(28))
    assert _grad_norm(params, None) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("change,needle", [
    (dict(steps=0), "steps must be an integer ≥ 1"),
    (dict(every=-1), "every must be an integer ≥ 1"),
    (dict(lr=0.0), "lr must be a number > 0"),
    (dict(lr=math.nan), "lr must be a number > 0"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(epochs=-1.0), "epochs"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(schedule="cosine"), "schedule"),
    (dict(loss="nope"), "unknown loss 'nope'"),
    (dict(hparams={"gamma": 1.0}), "no hyper-parameter 'gamma'"),
    (dict(probes=PAIRS), "probes and trace go together"),
    (dict(per_token="head"), "per_token needs probes"),
    (dict(per_token="rows"), "per_token must be one of"),
    (dict(checkpoint_every=2), "needs out_dir"),
    (dict(resume="latest"), "needs out_dir"),
    (dict(loss="simpo", hparams={}, ref="ref-dir"), "uses no reference"),
    (dict(dtype="float8"), "dtype"),
])
def test_bad_settings_are_refused_before_anything_runs(change, needle):
    with pytest.raises(ms.MarginscopeError, match=needle):
        train(_config(**change))


def test_pairs_longer_than_the_context_name_the_pair(make_model, tokenizer):
    long = ProbeSet.from_records([{"id": "long-one", "prompt": "The movie was wonderful. " * 40,
                                   "chosen": " yes", "rejected": " no"}], source="prefs.jsonl")
    with pytest.raises(ms.MarginscopeError, match=r"prefs.jsonl: probe 'long-one': .* context of 128"):
        train(_config(data=long), model=make_model("gpt2"), tokenizer=tokenizer)


def test_non_finite_loss_stops_before_the_step(make_model, tokenizer):
    ms.losses.register("nan-loss", lambda w, l, rw, rl, lw, ll: w * math.nan)
    try:
        model = make_model("gpt2")
        before = _params(model)
        with pytest.raises(ms.MarginscopeError, match="step 1: the loss is not finite"):
            train(_config(loss="nan-loss", hparams={}), model=model, tokenizer=tokenizer)
        _assert_same_params(before, _params(model))
    finally:
        ms.losses._REGISTRY.pop("nan-loss", None)


def test_python_recipe_in_the_docs_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)
    assert scope["result"].steps == 10 and scope["result"].final_loss < math.log(2)
    tr = scope["tr"]
    np.testing.assert_array_equal(tr.steps, [0, 5, 10])
    assert len(tr.inrun()["step"]) == 20
    tr.close()


# --- FSDP2-sharded runs (tests/scripts/sharded_train.py under torchrun, 2 gloo processes) ---------------

SHARDED_SCRIPT = Path(__file__).parent / "scripts" / "sharded_train.py"


def _sharded_script():
    spec = importlib.util.spec_from_file_location("sharded_train", SHARDED_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The runs of sharded_train.py: full, cut (resumed sharded), ddp (resumed with DDP), ddp-full, from-ddp."""
    out = tmp_path_factory.mktemp("sharded-train")
    run_script(SHARDED_SCRIPT, "--out", str(out), nproc=2, timeout=400)
    return out


def _saved(path: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    saved = torch.load(path, weights_only=True)
    return {k: v for k, v in saved.items() if k != "history"}, saved["history"]


def test_sharded_resume_equals_the_uninterrupted_sharded_run(sharded):
    full, full_log = _saved(sharded / "full.pt")
    cut, cut_log = _saved(sharded / "cut.pt")
    _assert_same_params(full, cut)
    assert cut_log == full_log and [h["step"] for h in cut_log] == [1, 2, 3, 4]
    a, b = (torch.load(sharded / run / "checkpoint-4" / "trainer_state.pt", weights_only=True) for run in ("full", "cut"))
    assert b["history"] == a["history"] and b["scheduler"] == a["scheduler"]
    assert b["optimizer"]["param_groups"] == a["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(b["optimizer"]["state"][index][key], value), (index, key)
    for rank, rng in enumerate(a["rng"]):
        assert torch.equal(b["rng"][rank]["cpu"], rng["cpu"]), rank
    with ms.trace.open(sharded / "full.h5") as x, ms.trace.open(sharded / "cut.h5") as y:
        np.testing.assert_array_equal(y.steps, [0, 2, 4])
        np.testing.assert_array_equal(x.steps, y.steps)
        # actual_delta is not compared: like an unsharded resume, the resumed tracker has no parameter
        # snapshot of the record before the checkpoint, so its first record after it is NaN there
        for name in ("logp", "token_logp", "gram", "d_w", "d_l", "case", "predicted_delta", "observed_delta",
                     "step_delta", "topk_ids", "topk_prob"):
            np.testing.assert_array_equal(getattr(y, name), getattr(x, name), err_msg=name)
        for part, values in x.step_parts.items():
            np.testing.assert_array_equal(y.step_parts[part], values, err_msg=part)
        assert np.isfinite(y.step_delta[1:]).all()
        for name, values in x.inrun().items():
            np.testing.assert_array_equal(y.inrun()[name], values, err_msg=name)


def test_sharded_checkpoint_is_the_full_model_in_the_unsharded_layout(sharded):
    from transformers import AutoModelForCausalLM

    full, _ = _saved(sharded / "full.pt")
    sharded_ckpt, plain_ckpt = sharded / "full" / "checkpoint-4", sharded / "ddp-full" / "checkpoint-4"
    assert sorted(p.name for p in sharded_ckpt.iterdir()) == sorted(p.name for p in plain_ckpt.iterdir())
    loaded = AutoModelForCausalLM.from_pretrained(sharded_ckpt)
    _assert_same_params({k: v.detach() for k, v in loaded.state_dict().items()}, full)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied, saved once as unsharded runs do
    with safe_open(sharded_ckpt / "model.safetensors", "pt") as a, safe_open(plain_ckpt / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
    # the optimizer state has the one-process format: an unsharded AdamW over the checkpoint's model loads it
    mine, theirs = (torch.load(path / "trainer_state.pt", weights_only=True)["optimizer"]
                    for path in (sharded_ckpt, plain_ckpt))
    assert mine["param_groups"] == theirs["param_groups"] and mine["state"].keys() == theirs["state"].keys()
    optimizer = torch.optim.AdamW(loaded.parameters())
    optimizer.load_state_dict(mine)
    for param, (index, state) in zip(loaded.parameters(), sorted(mine["state"].items())):
        assert optimizer.state[param]["exp_avg"].shape == param.shape
        assert torch.equal(optimizer.state[param]["exp_avg_sq"], state["exp_avg_sq"]), index


def test_sharded_and_unsharded_checkpoints_resume_each_other(sharded):
    for resumed, uninterrupted in (("ddp", "full"), ("from-ddp", "ddp-full")):
        (params, log), (expected, expected_log) = _saved(sharded / f"{resumed}.pt"), _saved(sharded / f"{uninterrupted}.pt")
        for name in expected:  # FSDP's reduce-scatter and DDP's all-reduce round differently (float32)
            torch.testing.assert_close(params[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert [h["step"] for h in log] == [1, 2, 3, 4] and log[:2] == expected_log[:2]
        np.testing.assert_allclose([h["loss"] for h in log], [h["loss"] for h in expected_log], rtol=1e-5)


def test_one_process_refuses_a_two_process_checkpoint_in_one_line(sharded, tmp_path):
    script = _sharded_script()
    model, tokenizer = script.model_and_tokenizer()
    config = script.config(tmp_path, "one", fsdp=False, resume=sharded / "full" / "checkpoint-2")
    shutil.copy(sharded / "full.h5", tmp_path / "one.h5")
    with pytest.raises(ms.MarginscopeError, match=r"checkpoint-2: made with number of processes 2, this run has 1;") as err:
        train(config, model=model, tokenizer=tokenizer)
    assert "\n" not in str(err.value)


def test_a_full_optimizer_state_of_the_wrong_shape_is_refused_in_one_line():
    from marginscope.integrations.fsdp import load_full_optimizer_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"][:-1]  # a tampered checkpoint
    with pytest.raises(ms.errors.MarginscopeError, match=r"exp_avg of 0\.weight has shape \[3, 3\]; the parameter "
                                                        r"has \[4, 3\]") as err:
        load_full_optimizer_state(model, torch.optim.AdamW(model.parameters()), state)
    assert "\n" not in str(err.value)
