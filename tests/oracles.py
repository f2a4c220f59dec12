"""Independent slow oracles (torch.func gradients of one unpadded sequence at a time) and test models."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad
from transformers.modeling_outputs import CausalLMOutput


def _logp_fn(model, prompt_ids, response_ids, token: int | None = None):
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    start = len(prompt_ids) - 1

    def f(params):
        logits = functional_call(model, params, (ids,), kwargs={"use_cache": False}, strict=False).logits[0]
        logp = logits.double().log_softmax(-1)
        picked = [logp[start + t, response_ids[t]] for t in range(len(response_ids))]
        return picked[token] if token is not None else torch.stack(picked).sum()

    return f


def flat_grad(model, names, prompt_ids, response_ids, token: int | None = None) -> torch.Tensor:
    """∇ log π(y|x) (or of one token's log-prob) over the named parameters, flattened, float64."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    g = grad(_logp_fn(model, prompt_ids, response_ids, token))(params)
    return torch.cat([g[n].reshape(-1).double() for n in names])


def oracle_logp(model, prompt_ids, response_ids) -> float:
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        return float(_logp_fn(model, prompt_ids, response_ids)(params))


def oracle_gram(model, names, prompt_ids, responses) -> torch.Tensor:
    g = torch.stack([flat_grad(model, names, prompt_ids, r) for r in responses])
    return (g @ g.T).detach()


def oracle_token_gram(model, names, prompt_ids, chosen_ids, rejected_ids
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T_w, T_l] per-token Gram and both per-token squared norms, one torch.func gradient per token."""
    gw = torch.stack([flat_grad(model, names, prompt_ids, chosen_ids, t) for t in range(len(chosen_ids))])
    gl = torch.stack([flat_grad(model, names, prompt_ids, rejected_ids, s) for s in range(len(rejected_ids))])
    return (gw @ gl.T).detach(), (gw * gw).sum(1).detach(), (gl * gl).sum(1).detach()


class ScaledLM(nn.Module):
    """A wrapper whose own forward uses its own parameter: not attributable by module hooks."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, **kwargs):
        return CausalLMOutput(logits=self.lm(**kwargs).logits * self.scale)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()
