"""Reasoning models: the thinking between `<think>` and `</think>` becomes `reasoning_content`, the rest
`content` (vLLM's field), streamed or not.

Which templates think: `--reasoning-parser NAME` (vLLM's names), else any chat template that writes `<think>`
(Qwen3, the DeepSeek-R1 distills, SmolLM3). Where the answer starts is read from the rendered prompt: a prompt
that ends inside an open `<think>` (DeepSeek-R1's template opens it) starts the answer in reasoning; otherwise a
`<think>` at the very start of the answer opens it, and an answer without one is all content (Qwen3 with
`chat_template_kwargs: {"enable_thinking": false}`, whose template closes an empty think block itself).
"""

from __future__ import annotations

from router.stops import held_suffix

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3", "granite", "none")  # vLLM's names; "none": never split


def thinks(chat_template: str | dict | None, parser: str | None) -> bool:
    """Whether answers from this template get their thinking split off."""
    if parser is not None:
        return parser != "none"
    templates = chat_template.values() if isinstance(chat_template, dict) else [chat_template or ""]
    return any(THINK_START in t for t in templates)


def prompt_opens_thinking(prompt: str) -> bool:
    """The rendered prompt leaves a think block open: the answer starts in its reasoning."""
    text = prompt.rstrip()
    return text.endswith(THINK_START) or text.rfind(THINK_START) > text.rfind(THINK_END)


class ReasoningSplitter:
    """Feed an answer's text pieces in order; each call returns ("reasoning" | "content", text) parts, in order,
    that are safe to send. Text that could still be the start of a tag is held back until the next pieces."""

    __slots__ = ("_state", "_held")

    def __init__(self, starts_in_reasoning: bool):
        # start: nothing seen yet (a leading <think> opens reasoning); reasoning; after: content right after
        # </think> (its leading whitespace dropped); content.
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._held = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        text, self._held = self._held + piece, ""
        out: list[tuple[str, str]] = []
        while text:
            if self._state == "start":
                stripped = text.lstrip()
                if stripped.startswith(THINK_START):
                    self._state, text = "reasoning", stripped[len(THINK_START):]
                elif not stripped or THINK_START.startswith(stripped):
                    self._held = text
                    return out
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = text.find(THINK_END)
                if end < 0:
                    keep = held_suffix(text, (THINK_END,))
                    self._held = text[len(text) - keep:]
                    _add(out, "reasoning", text[:len(text) - keep])
                    return out
                _add(out, "reasoning", text[:end])
                self._state, text = "after", text[end + len(THINK_END):]
            elif self._state == "after":
                text = text.lstrip()
                if text:
                    self._state = "content"
            else:
                _add(out, "content", text)
                text = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        """The held-back text, at the end of the answer."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [("reasoning" if self._state == "reasoning" else "content", held)]


def _add(out: list[tuple[str, str]], kind: str, text: str) -> None:
    if text:
        out.append((kind, text))
