"""Constrained decoding: llguidance matchers that turn a grammar into a per-step mask of allowed tokens.

The tokenizer is loaded (once, lazily) from the model directory; compiled grammars are cached, and each
sequence gets its own copy of the matcher, advanced by every token it samples. Compiling a large schema takes
a large fraction of a second, so the router has each grammar compiled (`prepare`, the PrepareGrammar call) on a
thread of the shard's own before it queues the request, and `matcher` on the engine thread then only copies
(it compiles only a grammar evicted since); the cache is shared by both threads under a lock.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

CACHE_SIZE = 256  # compiled grammars kept (a grammar that failed to compile: its error)


class GrammarError(ValueError):
    pass


class Grammars:
    def __init__(self, model_dir: str, vocab_size: int):
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self._tokenizer = None
        # grammar -> (LLMatcher template, or the error text of one that failed to compile; whether it is a JSON schema's)
        self._compiled: OrderedDict[str, tuple[object, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._quote_tokens: QuoteTokens | None = None

    def prepare(self, grammar: str) -> str:
        """Compiles `grammar` into the cache unless it is there (any thread); why it is unusable, or ""."""
        template, _ = self._template(grammar)
        return template if isinstance(template, str) else ""

    def matcher(self, grammar: str):
        """A fresh matcher for `grammar` (an llguidance grammar, e.g. from grammar_from_json_schema)."""
        template, _ = self._template(grammar)
        if isinstance(template, str):
            raise GrammarError(template)
        return template.deep_copy()

    def key_guard(self, grammar: str) -> "JsonKeys | None":
        """A fresh duplicate-key guard when `grammar` is a JSON schema's, else None (engine thread)."""
        if not self._template(grammar)[1]:
            return None
        if self._quote_tokens is None:
            self._quote_tokens = QuoteTokens(self._llg_tokenizer())
        return JsonKeys(self._quote_tokens)

    def _template(self, grammar: str) -> tuple[object, bool]:
        with self._lock:
            entry = self._compiled.get(grammar)
            if entry is not None:
                self._compiled.move_to_end(grammar)
                return entry
        return self._compile(grammar)

    def _compile(self, grammar: str) -> tuple[object, bool]:
        import llguidance

        template = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
        if template.is_error():
            template = f"bad grammar: {template.get_error()}"
        entry = (template, _is_json_schema(grammar))
        with self._lock:
            self._compiled[grammar] = entry
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return entry

    def _llg_tokenizer(self):
        with self._lock:  # loaded once, by whichever thread needs it first
            if self._tokenizer is None:
                import llguidance.hf
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(self.model_dir)
                self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size)
            return self._tokenizer


def mask_constrained(logits: torch.Tensor, matchers: list, rows: list[int]) -> None:
    """Sets the logits of tokens the grammar forbids to -inf, in place, for `rows` (one matcher each).

    llguidance fills a packed bitmask on the host (bit t % 32 of word t // 32 set = token t allowed); it is
    unpacked here in plain torch ops. llguidance's own apply_token_bitmask_inplace is torch.compile'd: it
    needs a C compiler at the first constrained request (the slim image has none) and stalls the step
    while it compiles."""
    import llguidance.torch as llt

    bitmask = torch.empty(len(rows), (logits.shape[1] + 31) // 32, dtype=torch.int32, pin_memory=logits.is_cuda)
    for i, matcher in enumerate(matchers):
        llt.fill_next_token_bitmask(matcher, bitmask, i)
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
    index = torch.tensor(rows, device=logits.device)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, float("-inf")))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V / 32)] int32 words -> [R, V] bool, True = allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def _is_json_schema(grammar: str) -> bool:
    """Whether the grammar is one JSON schema's (what grammar_from_json_schema serializes)."""
    try:
        grammars = json.loads(grammar).get("grammars") or [{}]
    except (ValueError, AttributeError):
        return False
    return len(grammars) == 1 and grammars[0].get("json_schema") is not None


class QuoteTokens:
    """Every token's bytes, and the tokens holding a '"': the only ones that can close a JSON key."""

    def __init__(self, llg_tokenizer):
        self.bytes = [llg_tokenizer.decode_bytes([t]) for t in range(llg_tokenizer.vocab_size)]
        ids = [t for t, b in enumerate(self.bytes) if b'"' in b]
        self.ids = torch.tensor(ids, dtype=torch.long)


_QUOTE, _BACKSLASH, _WHITESPACE = 0x22, 0x5C, b" \t\r\n"
_OTHER, _EXPECT_KEY, _IN_KEY, _IN_STRING = 0, 1, 2, 3


class JsonKeys:
    """Keeps a JSON answer from repeating a key in one object. A schema that allows properties it does not declare
    lets a grammar write any key there, the same one again included (no context-free grammar can rule that
    out), so this follows the generated JSON's objects and their keys, byte by byte, and forbids the tokens that
    would close a key the current object already has."""

    __slots__ = ("_tokens", "_stack", "_mode", "_escape", "_key")

    def __init__(self, tokens: QuoteTokens):
        self._tokens = tokens
        self._stack: list[set[bytes] | None] = []  # per open container: an object's keys, None for an array
        self._mode = _OTHER
        self._escape = False
        self._key = bytearray()

    def consume(self, token_id: int) -> None:
        for c in self._tokens.bytes[token_id] if token_id < len(self._tokens.bytes) else b"":
            self._step(c)

    def _step(self, c: int) -> None:
        mode = self._mode
        if mode in (_IN_KEY, _IN_STRING):
            if self._escape:
                self._escape = False
            elif c == _BACKSLASH:
                self._escape = True
            elif c == _QUOTE:
                if mode == _IN_KEY and self._stack and self._stack[-1] is not None:
                    self._stack[-1].add(bytes(self._key))
                self._mode = _OTHER
                return
            if mode == _IN_KEY:
                self._key.append(c)
        elif c == _QUOTE:
            self._mode = _IN_KEY if mode == _EXPECT_KEY else _IN_STRING
            self._key.clear()
        elif c == 0x7B:  # {
            self._stack.append(set())
            self._mode = _EXPECT_KEY
        elif c == 0x5B:  # [
            self._stack.append(None)
            self._mode = _OTHER
        elif c in (0x7D, 0x5D):  # } ]
            if self._stack:
                self._stack.pop()
            self._mode = _OTHER
        elif c == 0x2C:  # ,
            self._mode = _EXPECT_KEY if self._stack and self._stack[-1] is not None else _OTHER
        elif c == 0x3A:  # :
            self._mode = _OTHER

    def mask(self, logits: torch.Tensor) -> None:
        """Forbids (-inf, in place, on one row's logits) the tokens that would repeat a key, unless they are all
        the grammar left (then its choice stands)."""
        ids = self._tokens.ids.to(logits.device)
        forbidden = self.forbidden(torch.isfinite(logits[ids]).cpu())
        if forbidden:
            kept = logits[forbidden].clone()
            logits[forbidden] = float("-inf")
            if not torch.isfinite(logits).any():
                logits[forbidden] = kept

    def forbidden(self, allowed: torch.Tensor) -> list[int]:
        """Of the quote tokens (`allowed`: a bool per QuoteTokens.ids entry), those that would close a key the
        current object already has."""
        keys = self._stack[-1] if self._stack else None
        if not keys or self._mode not in (_EXPECT_KEY, _IN_KEY):
            return []
        out = []
        for token_id in self._tokens.ids[allowed].tolist():
            if self._closes_known_key(self._tokens.bytes[token_id], keys):
                out.append(token_id)
        return out

    def _closes_known_key(self, data: bytes, keys: set[bytes]) -> bool:
        mode, escape, key = self._mode, self._escape, bytearray(self._key)
        for c in data:
            if mode == _EXPECT_KEY:
                if c == _QUOTE:
                    mode, key = _IN_KEY, bytearray()
                elif c not in _WHITESPACE:
                    return False
            elif escape:
                escape = False
                key.append(c)
            elif c == _BACKSLASH:
                escape = True
                key.append(c)
            elif c == _QUOTE:
                return bytes(key) in keys
            else:
                key.append(c)
        return False
