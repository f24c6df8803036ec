"""Speculators: cheap proposers of the next tokens, verified by the target in one forward pass.

Each speculator keeps per-batch state (`new_state`) that follows the target's batch: rows are
added after the target's prefill (`add_rows`), proposals are made for every row (`propose`),
the verification result is reported back (`commit`: how many proposals each row accepted, so a
draft model rolls back its KV cache) and finished rows leave (`select`).

- `NgramSpeculator`: prompt lookup; finds an earlier occurrence of the last n tokens in the
  prompt and output (the latest one that k tokens follow), and proposes what followed it. No model.
- `DraftSpeculator`: a small causal LM with the same tokenizer, decoding k tokens ahead with its
  own KV cache; samples from its own (warped) distribution when the request samples, so the
  full rejection rule applies.
- `HeadsSpeculator`: Medusa-style heads on the target's final hidden state (`heads.py`), the
  heads of each row's adapter.

A state may hold rows of several adapters (the lean target mixes them in one batch); what is
per adapter (the heads) is looked up per row from `seq.adapter`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .heads import MedusaHeads
from .kv_batch import ForwardResult, ModelRunner, SequenceBatch
from .sampling import STREAM_DRAFT, keyed_uniform, sample, warp


@dataclass
class Proposal:
    tokens: list[list[int]]
    """Per row, the proposed tokens (rows may propose fewer than k, or none)."""
    draft_probs: list[torch.Tensor | None] | None = None
    """Per row, the [len, V] distributions the proposals were sampled from; None (or a None
    row) when the proposals are deterministic."""


class Speculator:
    name = "none"
    needs_target_hidden = False

    def max_tokens(self, requested: int) -> int:
        return requested

    def new_state(self, adapter: str | None):
        return None

    def add_rows(self, state, seqs, prefill: ForwardResult) -> None:
        pass

    def propose(self, state, seqs, k: int) -> Proposal:
        return Proposal([[] for _ in seqs])

    def commit(self, state, seqs, accepted: list[int], proposal: Proposal, verify: ForwardResult) -> None:
        pass

    def select(self, state, rows: list[int]) -> None:
        pass


class NgramSpeculator(Speculator):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def new_state(self, adapter):
        return []  # per row, its NgramIndex

    def add_rows(self, state, seqs, prefill):
        state.extend(NgramIndex(self.min_ngram, self.max_ngram) for _ in seqs)

    def propose(self, state, seqs, k: int) -> Proposal:
        return Proposal([index.lookup(seq.prompt_ids, seq.output_ids, k) for index, seq in zip(state, seqs)])

    def select(self, state, rows):
        state[:] = [state[row] for row in rows]

    def lookup(self, context: list[int], k: int) -> list[int]:
        """The k tokens that followed an earlier occurrence of the longest suffix (max_ngram down
        to min_ngram tokens) of `context`: the latest occurrence that k tokens follow, else (every
        occurrence is too close to the end) the earliest, which the most tokens follow. The
        latest one alone is often the end of a repetition, followed by too few tokens to be worth
        a verify pass: on repetitive text that halves the tokens per step. `NgramIndex` finds the
        same step by step; this is its reference."""
        if len(context) < 2:
            return []
        tokens = torch.tensor(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            windows = tokens[:-1].unfold(0, n, 1)  # [L-n, n], windows that end before the last token
            hits = (windows == tokens[-n:]).all(dim=1).nonzero()[:, 0].tolist()
            if hits:
                return context[_pick_start(hits, len(context) - n - k) + n :][:k]
        return []


def _pick_start(starts: list[int], limit: int) -> int:
    """Of an n-gram's starts (ascending), the latest one at most `limit` (k tokens follow it),
    else the earliest."""
    if starts[-1] <= limit:
        return starts[-1]
    index = bisect.bisect_right(starts, limit) - 1
    return starts[index] if index >= 0 else starts[0]


class NgramIndex:
    """`NgramSpeculator.lookup` for one growing context (prompt + output), incrementally: for each
    n, the starts of every n-gram that ends before the context's last token, updated with the
    tokens added since the last call. A step costs a few dictionary look-ups instead of a scan
    of the whole context."""

    __slots__ = ("min_ngram", "max_ngram", "tokens", "starts")

    def __init__(self, min_ngram: int, max_ngram: int):
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its starts, ascending (of the indexed windows)

    def _sync(self, prompt: list[int], output: list[int]) -> None:
        tokens = self.tokens
        known = len(tokens)
        if known < len(prompt) or known > len(prompt) + len(output) or (known > len(prompt) and tokens[-1] != output[known - len(prompt) - 1]):
            tokens.clear()  # a context this index has not followed (never so in the engine): start over
            self.starts.clear()
            known = 0
        if known == 0:
            tokens.extend(prompt)
            tokens.extend(output)
        else:
            tokens.extend(output[known - len(prompt):])
        # windows that end before the last token: start i, length n, with i + n <= len - 1
        old_end, end = max(known - 1, 0), len(tokens) - 1
        starts = self.starts
        for n in range(self.min_ngram, self.max_ngram + 1):
            for start in range(max(old_end - n + 1, 0), end - n + 1):
                key = tuple(tokens[start : start + n])
                found = starts.get(key)
                if found is None:
                    starts[key] = [start]
                else:
                    found.append(start)

    def lookup(self, prompt: list[int], output: list[int], k: int) -> list[int]:
        self._sync(prompt, output)
        tokens = self.tokens
        if len(tokens) < 2:
            return []
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            starts = self.starts.get(tuple(tokens[-n:]))
            if starts is not None:
                start = _pick_start(starts, len(tokens) - n - k) + n
                return tokens[start : start + k]
        return []


class DraftSpeculator(Speculator):
    name = "draft"

    def __init__(self, runner: ModelRunner, pad_id: int, confidence_threshold: float = 0.4):
        self.runner = runner
        self.pad_id = pad_id
        self.confidence_threshold = confidence_threshold
        """Stop drafting early once no row's draft gives its next token this probability."""

    @dataclass
    class State:
        batch: SequenceBatch
        pending: list[list[int]] = field(default_factory=list)
        """Per row, emitted tokens the draft has not been fed yet (1 or 2)."""
        fed: int = 0
        """Proposals fed to the draft during the last `propose` (one fewer than proposed)."""

    def new_state(self, adapter):
        return self.State(SequenceBatch(self.runner))

    def add_rows(self, state, seqs, prefill):
        fresh = SequenceBatch(self.runner)
        fresh.prefill([seq.prompt_ids for seq in seqs], self.pad_id)
        state.batch.merge(fresh)
        state.pending.extend([seq.output_ids[-1]] for seq in seqs)

    def propose(self, state, seqs, k):
        device = self.runner.device
        width = max(len(p) for p in state.pending)
        feed = torch.tensor([p + [self.pad_id] * (width - len(p)) for p in state.pending], device=device)
        result = state.batch.extend(feed)
        state.batch.commit([len(p) for p in state.pending])
        if width == 1:
            logits = result.logits[:, -1]
        else:
            last = torch.tensor([len(p) - 1 for p in state.pending], device=device)
            logits = result.logits[torch.arange(len(seqs), device=device), last]  # [B, V]
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        all_greedy = all(seq.params.greedy for seq in seqs)
        for i in range(k):
            if i:
                logits = state.batch.extend(torch.tensor([[row[-1]] for row in tokens], device=device)).logits[:, -1]
            if all_greedy:
                top_p, top = torch.softmax(logits, dim=-1).max(dim=-1)
                for row, token in zip(tokens, top.tolist()):
                    row.append(token)
                confident = bool((top_p >= self.confidence_threshold).any())
            else:
                confident = False
                for b, seq in enumerate(seqs):
                    params = seq.params
                    if params.greedy:
                        q = torch.softmax(logits[b].double(), dim=-1)
                        tokens[b].append(int(q.argmax()))
                        confident |= float(q.max()) >= self.confidence_threshold
                        probs[b].append(None)
                    else:
                        q = warp(logits[b], params.temperature, params.top_p)
                        u = keyed_uniform(params.seed, len(seq.output_ids) + i, STREAM_DRAFT)
                        tokens[b].append(sample(q, u))
                        confident |= float(q.max()) >= self.confidence_threshold
                        probs[b].append(q)
            if not confident:
                break
        k = len(tokens[0]) if tokens else 0
        state.fed = k - 1 if k else 0
        draft_probs = [torch.stack(p) if p and p[0] is not None else None for p in probs]
        return Proposal(tokens, draft_probs if any(p is not None for p in draft_probs) else None)

    def commit(self, state, seqs, accepted, proposal, verify):
        keep = [min(a, state.fed) for a in accepted]
        if state.fed:
            state.batch.commit(keep)
        for b, seq in enumerate(seqs):
            proposed = proposal.tokens[b]
            # the draft was fed proposals 1..k-1; after a full acceptance it still needs the k-th
            missing = proposed[state.fed : accepted[b]]
            state.pending[b] = missing + [seq.output_ids[-1]]

    def select(self, state, rows):
        state.batch.select(rows)
        state.pending = [state.pending[r] for r in rows]


class HeadsSpeculator(Speculator):
    name = "heads"
    needs_target_hidden = True

    def __init__(self, heads_by_adapter: dict, lm_head):
        self.heads_by_adapter = heads_by_adapter
        self.lm_head = lm_head

    def max_tokens(self, requested: int) -> int:
        return min([requested] + [h.num_heads for h in self.heads_by_adapter.values()])

    @dataclass
    class State:
        hidden: torch.Tensor | None = None
        """[B, H] final hidden state at the position that produced each row's last token."""

    def new_state(self, adapter):
        return self.State()

    def add_rows(self, state, seqs, prefill):
        new = prefill.hidden[:, -1]
        state.hidden = new if state.hidden is None else torch.cat([state.hidden, new], dim=0)

    @torch.inference_mode()
    def propose(self, state, seqs, k):
        """Each adapter's heads on its rows; rows of a model without heads propose nothing."""
        tokens: list[list[int]] = [[] for _ in seqs]
        rows_of: dict = {}
        for row, seq in enumerate(seqs):
            rows_of.setdefault(seq.adapter, []).append(row)
        for adapter, rows in rows_of.items():
            heads: MedusaHeads | None = self.heads_by_adapter.get(adapter)
            if heads is None:
                continue
            index = torch.tensor(rows, device=state.hidden.device)
            emitted = torch.tensor([seqs[row].output_ids[-1] for row in rows], device=state.hidden.device)
            logits = self.lm_head(heads(state.hidden[index], count=k, emitted=emitted))  # [rows, k, V]
            for row, proposal in zip(rows, logits.argmax(dim=-1).tolist()):
                tokens[row] = proposal
        return Proposal(tokens)

    def commit(self, state, seqs, accepted, proposal, verify):
        index = torch.tensor(accepted, device=verify.hidden.device)
        state.hidden = verify.hidden[torch.arange(len(accepted), device=index.device), index]

    def select(self, state, rows):
        state.hidden = state.hidden[torch.tensor(rows, dtype=torch.long, device=state.hidden.device)]
