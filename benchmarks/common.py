"""Shared benchmark plumbing: random-init models, random probes, the naive baseline, timing and
peak memory measured in a fresh subprocess per method (so one method's allocations never count
against another's)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from marginscope.dynamics.scoring import EncodedProbe, score_rows


def gpt2_small(seed: int = 0, n_layer: int = 12) -> torch.nn.Module:
    """GPT-2-small shape (124M parameters with 12 layers: d=768, 12 heads, vocab 50257), random init."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def random_probes(n: int, responses: int, prompt_len: int, response_len: int, vocab: int,
                  seed: int = 0) -> list[EncodedProbe]:
    gen = torch.Generator().manual_seed(seed)
    ids = lambda k: tuple(torch.randint(3, vocab, (k,), generator=gen).tolist())  # noqa: E731
    return [EncodedProbe(f"p{i}", ids(prompt_len), tuple(ids(response_len) for _ in range(responses)))
            for i in range(n)]


def naive_gram(model: torch.nn.Module, probes: list[EncodedProbe]) -> list[torch.Tensor]:
    """The papers' method: one forward+backward per response, flatten every gradient, dot them."""
    params = [p for p in model.parameters() if p.requires_grad]
    grams = []
    for probe in probes:
        flat = []
        for row in probe.rows():
            model.zero_grad(set_to_none=True)
            score_rows(model, [row]).logp.sum().backward()
            flat.append(torch.cat([p.grad.reshape(-1) for p in params]))
        g = torch.stack(flat)
        grams.append((g @ g.T).double())
    model.zero_grad(set_to_none=True)
    return grams


CLOCKS = ("wall", "cpu", "user")
CLOCK_HELP = ("wall-clock seconds; 'cpu': this process's CPU seconds, user + system, all its threads (less "
              "sensitive to other jobs on a shared machine, best with one thread); 'user': its user CPU seconds "
              "only, without the kernel's time for page faults (methods alternated in one process fault in "
              "memory the previous method's allocation pattern gave back to the OS, which a run repeating one "
              "method does not pay)")


def clock(name: str) -> Callable[[], float]:
    """The timer of `--clock name` (one of CLOCKS)."""
    if name == "wall":
        return time.perf_counter
    if name == "cpu":
        return time.process_time
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_utime


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(setup: Callable[[], object], methods: dict[str, Callable[[object], object]], method: str) -> None:
    """In the worker process: build the state, then time `method` once; print one JSON line."""
    state = setup()
    base = rss_peak_mb()
    start = time.perf_counter()
    result = methods[method](state)
    seconds = time.perf_counter() - start
    print(json.dumps({"method": method, "seconds": seconds, "peak_extra_mb": rss_peak_mb() - base,
                      "result": result}))


def spawn(script: str, method: str, args: list[str]) -> dict:
    """Run `script --worker METHOD ARGS` in a fresh interpreter and parse its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    done = subprocess.run([sys.executable, script, "--worker", method, *args], capture_output=True,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    import platform
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def dpo_step(model: torch.nn.Module, pairs: list[EncodedProbe], opt: torch.optim.Optimizer, mode: str = "plain"):
    """One DPO step (forward of the 2P rows, loss, backward, optimizer step) for timing: mode "plain", "inrun"
    (inside `InRunGeometry`) or "attribution" (also every pair's gradient materialized); returns the
    in-run result (None for plain)."""
    import torch.nn.functional as F

    from marginscope.dynamics.inrun import InRunGeometry, score_pairs
    n = len(pairs)
    opt.zero_grad(set_to_none=True)
    geo = None if mode == "plain" else InRunGeometry(model, n_pairs=n, pair_gradients=mode == "attribution")
    if geo:
        geo.__enter__()
    try:
        logps, _ = score_pairs(model, pairs)
        if geo:
            geo.watch(logps)
        ref = logps.detach() - 1.0  # a fixed reference offset: any constant works for timing
        loss = -F.logsigmoid(0.1 * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))).mean()
        loss.backward()
    finally:
        if geo:
            geo.__exit__(None, None, None)
    opt.step()
    return geo.result() if geo else None
