"""Token selection and the speculative acceptance rule.

Every random draw is keyed by (request seed, output position, stream) instead of coming from a
generator that advances per call. So the token at output position j depends only on the seed,
j and the target's distribution there: speculative decoding with a deterministic speculator
(ngram, heads, greedy draft) emits token-for-token what plain seeded sampling emits, and a
request with a seed is reproducible whatever else shares its batch.

`token_logprobs` reports what a request asks with `logprobs`: the target's raw distribution (its
log-softmax before temperature and top-p, vLLM's default `raw_logprobs`) at each emitted
position, the same whether the token was verified from a proposal or decoded alone.

`apply_token_bitmask` is structured output's part: a grammar's mask on the logits, before any
choice of token (so after it the rest of this module samples within the grammar).

`accept_proposals` is the verification rule, one row at a time:
- temperature 0: accept while the proposal equals the target's argmax (exact greedy output);
- sampling with a stochastic draft distribution q: Leviathan et al. 2023, Algorithm 1 / Chen et
  al. 2023: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)), on rejection emit a sample
  of norm(max(0, p_i - q_i)), and after a full acceptance a bonus sample of p_{k+1};
- sampling with a deterministic proposal (q one-hot): the same rule reduces to "sample y_i from
  p_i, accept while y_i == x_i, emit y_i at the first mismatch" (acceptance probability p_i(x_i),
  residual p_i without x_i), which is what we run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kuberft_core import sampling

# Streams of keyed uniforms, so the draws of one position never reuse each other's randomness.
STREAM_TARGET = 0
STREAM_DRAFT = 1
STREAM_ACCEPT = 2

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    """How one request picks its tokens (the OpenAI request fields)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    """Every request has a seed; the server draws one when the request gives none."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end the output, kept in it (vLLM's `stop_token_ids`)."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Per generated token, record its log-probability and those of the `logprobs` most likely
    tokens (0: its own only); None records nothing (and costs nothing)."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (computed at prefill)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniform(seed: int, position: int, stream: int = STREAM_TARGET) -> float:
    """A uniform number in [0, 1) that depends only on (seed, position, stream)."""
    key = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ position) ^ stream)
    return (key >> 11) * (1.0 / (1 << 53))


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering (the trainer's, from the
    core); logits [..., V] -> probs [..., V] in float64 (so sums and ratios are not the weak point)."""
    return sampling.warp(logits.double(), temperature, top_p)


def sample(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample from a 1-D probability vector with the uniform `u`; tokens of
    probability zero are never chosen."""
    cdf = probs.double().cumsum(dim=0)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    return min(index, probs.shape[0] - 1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Structured output: set to -inf, in place, the logits [..., V] of the tokens a grammar
    disallows. bitmask [..., ceil(V / 32)] int32 holds token t as bit t % 32 of word t // 32
    (1: allowed), as xgrammar fills it. xgrammar's own kernel: on the CPU 2.5x faster than the
    same masking in torch ops (benchmarks/structured_output.py), and a mask is applied to every
    constrained row of every step."""
    import xgrammar

    with torch.inference_mode():  # the logits are inference tensors
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


def select_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Plain decoding: the token at output `position` from the target's logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    return sample(warp(logits, params.temperature, params.top_p), keyed_uniform(params.seed, position))


@dataclass
class TokenLogprob:
    """One position's log-probabilities under the target's raw distribution."""

    token: int
    logprob: float
    rank: int
    """1 for the most likely token."""
    top: list[tuple[int, float]]
    """The most likely tokens and their log-probabilities, best first."""


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The log-probabilities of `tokens` under logits [n, V] (row i gives tokens[i]), each with
    its rank and the `top` most likely tokens."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])  # [n, 1]
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        best = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        best = [[] for _ in tokens]
    return [TokenLogprob(t, lp, r, b) for t, lp, r, b in zip(tokens, chosen[:, 0].tolist(), ranks, best)]


def accept_greedy(best: list[int], proposals: list[int]) -> tuple[int, int]:
    """`accept_proposals` at temperature 0, given the target's argmax at each position (`best`,
    at least len(proposals) + 1 of them): the engine takes the argmax of a whole batch at once."""
    for i, token in enumerate(proposals):
        if token != best[i]:
            return i, best[i]
    return len(proposals), best[len(proposals)]


def accept_proposals(
    target_logits: torch.Tensor,
    proposals: list[int],
    params: SamplingParams,
    position: int,
    draft_probs: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Verify one row's proposals against the target.

    target_logits: [k+1, V], row i is the target's prediction for the token at output position
    `position + i` given everything before it (proposals included); proposals: k tokens;
    draft_probs: [k, V] the distributions the proposals were sampled from, or None when the
    proposals are deterministic. Returns (number of proposals accepted, the next token): the
    correction at the first rejection, or the bonus token when all k are accepted.
    """
    k = len(proposals)
    if params.greedy:
        return accept_greedy(target_logits.argmax(dim=-1).tolist(), proposals)

    probs = warp(target_logits, params.temperature, params.top_p)  # [k+1, V]
    for i in range(k):
        x = proposals[i]
        if draft_probs is None:
            y = sample(probs[i], keyed_uniform(params.seed, position + i))
            if y != x:
                return i, y
            continue
        p, q = probs[i], draft_probs[i].double()
        if keyed_uniform(params.seed, position + i, STREAM_ACCEPT) * float(q[x]) < float(p[x]):
            continue  # accepted with probability min(1, p(x)/q(x))
        residual = (p - q).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is p itself
            residual = p
        return i, sample(residual, keyed_uniform(params.seed, position + i))
    return k, sample(probs[k], keyed_uniform(params.seed, position + k))
