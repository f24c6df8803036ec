"""The logprobs pieces of OpenAI response bodies, built from what the engine recorded
(`sampling.TokenLogprob`): a completion's `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), a chat message's `logprobs.content[]` (`token`, `logprob`, `bytes`,
`top_logprobs[]`) and vLLM's `prompt_logprobs`.

The values are the model's raw log-probabilities; -inf is written -9999.0, as OpenAI and vLLM do
(JSON has no infinity). A token's text is its own decoding, as vLLM reports it. A completion's
`top_logprobs` holds the sampled token and the k most likely ones (so up to k + 1 entries, as the
API says); a chat entry's `top_logprobs` holds the k most likely, best first."""

from __future__ import annotations

from typing import Any, Optional

from .sampling import TokenLogprob

FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def token_texts(tokenizer, entries: list[Optional[TokenLogprob]], token_ids: list[int]) -> dict[int, str]:
    """The text of every token the entries name, each decoded once: `decode([id])`, with the
    leading space a SentencePiece piece (`▁x`) loses when decoded alone put back."""
    ids = set(token_ids)
    for entry in entries:
        if entry is not None:
            ids.update(token for token, _ in entry.top)
    ordered = sorted(ids)
    texts = {}
    for token, piece in zip(ordered, tokenizer.convert_ids_to_tokens(ordered)):
        text = tokenizer.decode([token])
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        texts[token] = text
    return texts


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[Optional[TokenLogprob]], offset: int = 0) -> dict[str, Any]:
    """The completions shape for these tokens (an entry of None, the first prompt token's, has
    no logprob); text offsets count from `offset`, token text by token text."""
    texts = token_texts(tokenizer, entries, token_ids)
    tokens, values, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = texts[token]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(entry.logprob))
        top = {text: _value(entry.logprob)}
        for other, logprob in entry.top:
            top.setdefault(texts[other], _value(logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat shape, `{"content": [...]}`, for these tokens."""
    texts = token_texts(tokenizer, entries, token_ids)

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = texts[token]
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content}


def prompt_logprobs(tokenizer, prompt_ids: list[int], entries: list[TokenLogprob]) -> list[Optional[dict]]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a map from token
    id to {logprob, rank, decoded_token} holding the prompt's token and the k most likely."""
    texts = token_texts(tokenizer, entries, prompt_ids)
    out: list[Optional[dict]] = [None]
    for entry in entries:
        ranked = {entry.token: (entry.logprob, entry.rank)}
        for rank, (token, logprob) in enumerate(entry.top, 1):
            ranked.setdefault(token, (logprob, rank))
        out.append({
            token: {"logprob": _value(logprob), "rank": rank, "decoded_token": texts[token]}
            for token, (logprob, rank) in ranked.items()
        })
    return out
