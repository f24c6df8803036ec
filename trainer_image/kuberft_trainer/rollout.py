"""Sampling completions and scoring their tokens with the policy.

`generate` samples `num_generations` completions per prompt with the KV cache: the prompts are
prefilled once (not once per completion), the cache is repeated G times, then one decode loop
runs the whole batch, sampling with temperature and top-p. Each prompt draws from its own
`torch.Generator` (the trainer seeds it from the job's seed, the step and the prompt's place in
the step), so a prompt's completions do not depend on which other prompts share its batch: a
resumed run, and a run split over any number of processes, draw the same samples. Rows that
ended stay in the batch with pad tokens; the loop stops when every row has ended or at the
length limit.

`sequence_logprobs` computes per-token log-probabilities of the completions under the model
(for the loss, the stored old policy and the reference), one row chunk of logits at a time.

`VllmGenerator` is the GPU path: vLLM in the same process, the current LoRA adapter handed
over each step as a saved adapter (no weight merge, no full-weight transfer).
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from kuberft_core.sampling import warp


@dataclass
class Rollout:
    """A batch of prompts and sampled completions, the prompts left-padded and the completions
    right-padded. N = prompts x generations, each prompt's completions contiguous."""

    prompt_ids: torch.Tensor  # (N, P)
    prompt_mask: torch.Tensor  # (N, P) 1 on prompt tokens
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) 1 on generated tokens, the eos included
    truncated: torch.Tensor  # (N,) bool: hit the length limit without an eos
    sampling_logprobs: Optional[torch.Tensor] = None
    """(N, T) log-probabilities of the completion tokens under the engine that sampled them, when
    that engine is not the trainer's model (vLLM); None when the trainer sampled."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def select(self, rows) -> "Rollout":
        return Rollout(*(None if t is None else t[rows] for t in (
            self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask, self.truncated, self.sampling_logprobs)))

    def padded_to(self, width: int, pad_token_id: int) -> "Rollout":
        """The same rollout with its completions right-padded to `width` tokens."""
        extra = width - self.completion_ids.shape[1]
        if extra <= 0:
            return self
        return Rollout(
            self.prompt_ids,
            self.prompt_mask,
            torch.nn.functional.pad(self.completion_ids, (0, extra), value=pad_token_id),
            torch.nn.functional.pad(self.completion_mask, (0, extra), value=0),
            self.truncated,
            None if self.sampling_logprobs is None else torch.nn.functional.pad(self.sampling_logprobs, (0, extra), value=0.0),
        )


def left_pad(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that ignore left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """One token per row from (N, V) logits; temperature 0 is greedy. With `generators`, the
    rows are len(generators) contiguous groups and each group draws from its own generator."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probabilities = warp(logits.float(), temperature, top_p)
    if not generators:
        return torch.multinomial(probabilities, 1).squeeze(-1)
    groups = probabilities.view(len(generators), -1, probabilities.shape[-1])
    return torch.cat([torch.multinomial(group, 1, generator=generator).squeeze(-1) for group, generator in zip(groups, generators)])


def _cache_argument(model, cache) -> dict:
    """The KV-cache keyword of this model's forward (`cache` in transformers 5, else `past_key_values`);
    the cache object is updated in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    return {name: cache}


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generators: Optional[Sequence[torch.Generator]] = None,
) -> Rollout:
    """Sample `num_generations` completions for each tokenized prompt (see the module docstring);
    `generators`: one per prompt (default: torch's global generator)."""
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts: give one per prompt")
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    cache = DynamicCache(config=getattr(model, "config", None))
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
        **_cache_argument(model, cache),
    )
    logits = out.logits[:, -1, :]
    if num_generations > 1:
        cache.batch_repeat_interleave(num_generations)
        logits = logits.repeat_interleave(num_generations, dim=0)
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)

    rows = prompt_ids.shape[0]
    attention = prompt_mask
    next_position = prompt_mask.sum(dim=1, keepdim=True)  # (N, 1)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        was_finished = finished
        token = sample_next(logits, temperature, top_p, generators)
        token = torch.where(was_finished, torch.full_like(token, pad_token_id), token)
        tokens[:, t] = token
        steps = t + 1
        finished = was_finished | (token == eos_token_id)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attention = torch.cat([attention, (~was_finished).long().unsqueeze(1)], dim=1)
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=attention,
            position_ids=next_position,
            use_cache=True,
            **_cache_argument(model, cache),
        )
        next_position = next_position + 1
        logits = out.logits[:, -1, :]

    tokens = tokens[:, :steps]
    is_eos = tokens == eos_token_id
    # 1 up to and including the first eos
    ended_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = (~ended_before).long()
    truncated = ~is_eos.any(dim=1)
    tokens = tokens.masked_fill(completion_mask == 0, pad_token_id)
    return Rollout(prompt_ids, prompt_mask, tokens, completion_mask, truncated)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, row_chunk: int) -> torch.Tensor:
    """log softmax(logits / temperature) at `targets`, a few rows at a time (never the whole
    (N, T, V) tensor in float32 at once); in float32, or float64 for a float64 model."""
    chunks = []
    precision = torch.promote_types(logits.dtype, torch.float32)
    for start in range(0, logits.shape[0], row_chunk):
        part = logits[start:start + row_chunk].to(precision)
        if temperature != 1.0:
            part = part / temperature
        chunk_targets = targets[start:start + row_chunk]
        chunks.append(part.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(part, dim=-1))
    return torch.cat(chunks, dim=0)


def _shares_prompts(rollout: Rollout, group_size: int) -> bool:
    rows = rollout.prompt_ids.shape[0]
    if group_size < 2 or rows % group_size or rollout.completion_ids.shape[1] < 2:
        return False
    grouped = rollout.prompt_ids.view(rows // group_size, group_size, -1)
    return bool((grouped == grouped[:, :1]).all())


def sequence_logprobs(model, rollout: Rollout, *, temperature: float = 1.0, group_size: int = 1, row_chunk: int = 8) -> torch.Tensor:
    """(N, T) log-probabilities of the completion tokens under `model` (at the sampling
    temperature, as the tokens were drawn). Grad flows when called outside no_grad.

    With `group_size` G > 1 and the rows in groups of G completions of one prompt, the prompt
    is run once per group and its KV cache (with its gradient path) is shared by the G
    completions: P + G*T tokens per group instead of G*(P+T)."""
    completion_length = rollout.completion_ids.shape[1]
    if not _shares_prompts(rollout, group_size):
        input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
        attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions(attention),
            use_cache=False,
            logits_to_keep=completion_length + 1,
        )
        return _token_logprobs(out.logits[:, :-1, :], rollout.completion_ids, temperature, row_chunk)

    from transformers import DynamicCache

    prompt_ids, prompt_mask = rollout.prompt_ids[::group_size], rollout.prompt_mask[::group_size]
    cache = DynamicCache(config=getattr(model, "config", None))
    head = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
        **_cache_argument(model, cache),
    )
    cache.batch_repeat_interleave(group_size)
    first = head.logits[:, -1:, :].repeat_interleave(group_size, dim=0)  # predicts completion token 0
    # completion tokens 0..T-2 are the inputs predicting tokens 1..T-1
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask[:, :-1]], dim=1)
    tail = model(
        input_ids=rollout.completion_ids[:, :-1],
        attention_mask=attention,
        position_ids=positions(attention)[:, -(completion_length - 1):],
        use_cache=True,
        **_cache_argument(model, cache),
    )
    logits = torch.cat([first, tail.logits], dim=1)
    return _token_logprobs(logits, rollout.completion_ids, temperature, row_chunk)


def rollout_from_completions(prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]], *,
                             num_generations: int, eos_token_id: int, pad_token_id: int, device) -> Rollout:
    """A `Rollout` of completions sampled by another engine: `completions[i]` and its per-token
    `logprobs[i]` for prompt i // num_generations. A completion that does not end with the stop
    token hit the length limit (truncated)."""
    width = max(1, max((len(c) for c in completions), default=1))
    ids = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    truncated = torch.zeros(len(completions), dtype=torch.bool)
    sampled = torch.zeros(ids.shape, dtype=torch.float32)
    for row, (tokens, values) in enumerate(zip(completions, logprobs)):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
        sampled[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
        truncated[row] = not tokens or tokens[-1] != eos_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    return Rollout(prompt_ids, prompt_mask, ids.to(device), mask.to(device), truncated.to(device), sampled.to(device))


class VllmEngine:
    """vLLM with LoRA support, sampling completions of token-id prompts with a given adapter:
    what the colocated `VllmGenerator` and the rollout server (`rollout_server.py`) run."""

    def __init__(self, model_path: str, *, lora_rank: int, dtype: str, max_model_len: int,
                 gpu_memory_utilization: Optional[float] = None, seed: int = 0, tensor_parallel_size: int = 1):
        from transformers import AutoConfig
        from vllm import LLM  # noqa: PLC0415 - optional

        # vLLM refuses a length past the model's positions; prompt + completion rarely need them all.
        positions_limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
        if positions_limit and max_model_len > positions_limit:
            max_model_len = int(positions_limit)
        if not torch.cuda.is_available():
            # On vLLM's CPU build the fraction is of the host's memory, which others share.
            gpu_memory_utilization = min(gpu_memory_utilization or 0.1, 0.1)
        elif gpu_memory_utilization is None:
            gpu_memory_utilization = 0.3  # beside the trainer on its GPU

        self.llm = LLM(
            model=model_path,
            enable_lora=True,
            max_lora_rank=max(8, 1 << (lora_rank - 1).bit_length()),  # vLLM takes powers of two
            dtype="auto" if dtype == "auto" else dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            enable_prefix_caching=True,
            # log-probabilities after temperature (what the trainer computes), before top-p/top-k
            logprobs_mode="processed_logprobs",
        )

    def complete(self, prompts: list[list[int]], adapter: tuple[str, int, str], *, num_generations: int, max_new_tokens: int,
                 eos_token_id: int, temperature: float, top_p: float,
                 seeds: Optional[list[int]] = None) -> tuple[list[list[int]], list[list[float]]]:
        """`num_generations` completions per prompt (contiguous) and each token's log-probability,
        with the adapter (name, id, folder) loaded; `seeds`: one per prompt (None: vLLM's own)."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        # vLLM samples a greedy completion once (it refuses n > 1): the copies are made here.
        copies = num_generations if temperature == 0.0 else 1
        params = [
            SamplingParams(n=num_generations // copies, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                           seed=seed, stop_token_ids=[eos_token_id], logprobs=0)
            for seed in (seeds or [None] * len(prompts))
        ]
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(requests, params, lora_request=LoRARequest(*adapter), use_tqdm=False)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        for output in outputs:
            for completion in output.outputs:
                for _ in range(copies):
                    completions.append(list(completion.token_ids))
                    # logprobs=0: each position holds the sampled token's log-probability
                    logprobs.append([position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs or [])])
        return completions, logprobs


class VllmGenerator:
    """Generation with vLLM on a GPU, in the trainer's process: the base model is loaded once
    with LoRA support; each step the trainer's current adapter is saved to a scratch folder and
    used as a new LoRA request (adapter-only sync: a few MB instead of the full weights)."""

    def __init__(self, model_path: str, *, lora_rank: int, dtype: str, max_model_len: int,
                 gpu_memory_utilization: Optional[float] = None, seed: int = 0):
        self.engine = VllmEngine(model_path, lora_rank=lora_rank, dtype=dtype, max_model_len=max_model_len,
                                 gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self._scratch = tempfile.TemporaryDirectory(prefix="kuberft-vllm-lora-")
        self._version = 0

    def generate(self, peft_model, prompts: list[list[int]], *, num_generations: int, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, temperature: float, top_p: float,
                 seeds: Optional[list[int]] = None, adapter_state: Optional[dict] = None) -> Rollout:
        """Like `generate`; `seeds`: one per prompt (None: greedy, or vLLM's own seed);
        `adapter_state`: the adapter's full weights when the model is sharded."""
        self._version += 1
        adapter_dir = Path(self._scratch.name) / f"v{self._version}"
        peft_model.save_pretrained(adapter_dir, state_dict=adapter_state)
        completions, logprobs = self.engine.complete(
            prompts, (f"policy-{self._version}", self._version, str(adapter_dir)), num_generations=num_generations,
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, temperature=temperature, top_p=top_p, seeds=seeds)
        shutil.rmtree(Path(self._scratch.name) / f"v{self._version - 1}", ignore_errors=True)
        return rollout_from_completions(prompts, completions, logprobs, num_generations=num_generations, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, device=next(peft_model.parameters()).device)
