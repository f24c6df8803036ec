"""Structured output: a request's `response_format` (`json_object`, `json_schema`) as a grammar
whose token mask applies to the target's logits at every decoding step (xgrammar, vLLM's default
backend: a mask costs a median 4-23 microseconds per token on a 32k vocabulary, the fastest of
the libraries that accept every valid document: benchmarks/structured_output.py). The JSON is laid
out as `json.dumps` does by default (`{"a": 1, "b": [2, 3]}`): the model picks the content, not
the whitespace, so it cannot loop on newlines (free whitespace, as vLLM allows by default, lets
a model that likes it never close the object), and the masks are the cheapest.

`Grammars` compiles a response format into a grammar over the served model's vocabulary (once per
distinct schema: xgrammar's cache). Each sequence decodes with its own `GrammarState`:

- `masks(proposals, bitmask)`, before a verify pass: the bitmask of the tokens allowed at each
  position the target scores (now, and after each proposal), and how many proposals the grammar
  accepts; the matcher advances through them and rolls back, so it is left where it was;
- `advance(tokens)`, as tokens are emitted.

The engine sets the logits of disallowed tokens to -inf (`sampling.apply_token_bitmask`) before
argmax, temperature and top-p, so the end-of-sequence token is possible only where the grammar
may end, and the output is what the model says within the grammar, with or without speculation.
"""

from __future__ import annotations

import json
import re
import threading

import torch
import xgrammar

from .protocol import FieldError, ResponseFormat

CACHE_BYTES = 256 * 2**20
"""Memory for compiled grammars, the least recently used evicted first."""
BOUNDED_STRING_CHARACTER = (r'(([^\"\\\r\n]))', r'(([^\0-\x1f\"\\\r\n]))')
"""xgrammar 0.2 compiles a string with minLength or maxLength to a repetition of this character
class, which lets in raw control characters (a tab), which JSON forbids (mlc-ai/xgrammar#800);
they are taken out of it. Such a string holds no escapes (a quote, a backslash, a newline): with
an escape alternative in the repetition, xgrammar's masks cost milliseconds per token."""


class Grammars:
    """The response formats of one served model, compiled for its tokenizer. The tokenizer's
    description (its vocabulary decoded to bytes; seconds for a 128k vocabulary) is built at the
    first compile."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        """The width of the model's logits (may exceed the tokenizer's vocabulary)."""
        self.stop_ids = sorted(stop_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _tokenizer_info(self) -> xgrammar.TokenizerInfo:
        """xgrammar's view of the vocabulary: each token's bytes, special tokens (which decoding
        leaves out of the text) empty, so the grammar never allows them; the stop tokens end it."""
        detected = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids)
        special = set(self.tokenizer.all_special_ids)
        special.update(i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special)
        vocab = [b"" if i in special else piece for i, piece in enumerate(detected.decoded_vocab)]
        return xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids)

    def compiler(self) -> xgrammar.GrammarCompiler:
        """xgrammar's compiler for this vocabulary, built at the first call."""
        with self._lock:
            if self._compiler is None:
                self._compiler = xgrammar.GrammarCompiler(self._tokenizer_info(), cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def compile(self, response_format: ResponseFormat) -> xgrammar.CompiledGrammar:
        """The grammar of a `json_object` (any JSON object) or `json_schema` format; a schema
        xgrammar cannot convert is a `FieldError` naming `response_format.json_schema.schema`."""
        schema = {"type": "object"} if response_format.type == "json_object" else response_format.json_schema.schema_
        try:
            grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except RuntimeError as err:  # xgrammar's errors read "[time] file.cc:line: message"
            reason = re.sub(r"^\[[^\]]*\] \S+:\d+: ", "", str(err)).strip()
            raise FieldError("response_format.json_schema.schema", f"response_format.json_schema.schema: {reason}") from None
        return self.compiler().compile_grammar(str(grammar).replace(*BOUNDED_STRING_CHARACTER))


class GrammarState:
    """Where one sequence's output stands in its grammar."""

    def __init__(self, grammar: xgrammar.CompiledGrammar):
        self.matcher = xgrammar.GrammarMatcher(grammar)

    def masks(self, proposals: list[int], bitmask: torch.Tensor) -> int:
        """Fill bitmask[i] ([k + 1, ceil(V / 32)] int32) with the tokens allowed after
        proposals[:i], for i up to the longest prefix of the proposals the grammar accepts (cut
        after a stop token, which ends the output); returns that prefix's length."""
        matcher = self.matcher
        kept = 0
        while True:
            matcher.fill_next_token_bitmask(bitmask, kept)
            if kept == len(proposals) or not int(bitmask[kept, proposals[kept] >> 5]) >> (proposals[kept] & 31) & 1:
                break
            matcher.accept_token(proposals[kept])
            kept += 1
            if matcher.is_terminated():
                break
        matcher.rollback(kept)
        return kept

    def advance(self, tokens: list[int]) -> None:
        for token in tokens:
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"token {token} was emitted against the grammar")
