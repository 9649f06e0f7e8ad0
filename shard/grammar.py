"""Constrained decoding: llguidance matchers that turn a grammar into a per-step mask of allowed tokens.

The tokenizer is loaded (once, lazily) from the model directory; compiled grammars are cached, and each
sequence gets its own copy of the matcher, advanced by every token it samples. Compiling a large schema takes
a large fraction of a second, so the router has each grammar compiled (`prepare`, the PrepareGrammar call) on a
thread of the shard's own before it queues the request, and `matcher` on the engine thread then only copies
(it compiles only a grammar evicted since); the cache is shared by both threads under a lock.
"""

from __future__ import annotations

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
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar -> LLMatcher template or error text
        self._lock = threading.Lock()

    def prepare(self, grammar: str) -> str:
        """Compiles `grammar` into the cache unless it is there (any thread); why it is unusable, or ""."""
        template = self._template(grammar)
        return template if isinstance(template, str) else ""

    def matcher(self, grammar: str):
        """A fresh matcher for `grammar` (an llguidance grammar, e.g. from grammar_from_json_schema)."""
        template = self._template(grammar)
        if isinstance(template, str):
            raise GrammarError(template)
        return template.deep_copy()

    def _template(self, grammar: str):
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                return template
        return self._compile(grammar)

    def _compile(self, grammar: str):
        import llguidance

        template = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
        if template.is_error():
            template = f"bad grammar: {template.get_error()}"
        with self._lock:
            self._compiled[grammar] = template
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template

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
