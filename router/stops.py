"""Stop strings on streamed text: output ends right before the first stop string, which is never emitted."""

from __future__ import annotations


def _failure_table(s: str) -> list[int]:
    """KMP: table[i] is the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    table = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


def held_suffix(text: str, tags: tuple[str, ...] | list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`: text to hold back until
    the next pieces show whether a tag starts there."""
    for n in range(min(max(map(len, tags), default=1) - 1, len(text)), 0, -1):
        if any(tag.startswith(text[-n:]) for tag in tags):
            return n
    return 0


class StopMatcher:
    """Feed the detokenizer's pieces in order; emit what `feed` returns; call `flush` when generation ends.

    Text that could still be the start of a stop string is held back until the next pieces show
    whether it is one. Once a stop string is hit, the matcher is done: later calls return "".
    Empty stop strings are ignored.

    Each stop string runs a KMP automaton over the text, one character at a time: the work per character is
    amortised constant per stop string and the memory is linear in the stop strings' lengths (a table of
    every prefix would grow with the square of a long stop string's length).
    """

    __slots__ = ("_stops", "_tables", "_states", "_held", "stopped", "_include")

    def __init__(self, stop_strings: list[str], include: bool = False):
        """`include`: the text ends with the stop string instead of right before it (vLLM's
        include_stop_str_in_output)."""
        self._include = include
        self._stops = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._tables = [_failure_table(s) for s in self._stops]
        self._states = [0] * len(self._stops)  # per stop string: how much of it the text now ends with
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit); after a hit the text ends before it (or with
        it, when included)."""
        if not self._stops:
            return piece, False
        if self.stopped:
            return "", True
        text = self._held + piece
        start = len(self._held)  # the held text has already been run through the automata
        for pos in range(start, len(text)):
            hit = self._advance(text[pos])
            if hit:
                # The stop string that ends first wins (the longest one on a tie), as if fed one char at a time.
                self._held, self.stopped = "", True
                return text[: pos + 1 - (0 if self._include else hit)], True
        keep = max(self._states)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def flush(self) -> str:
        """The held-back text: at the end of generation it can no longer become a stop string."""
        held, self._held = self._held, ""
        return held

    def _advance(self, ch: str) -> int:
        """Feeds one character to every automaton; returns the length of the longest stop string that the
        text now ends with (0: none)."""
        hit = 0
        states = self._states
        for j, (stop, table) in enumerate(zip(self._stops, self._tables)):
            k = states[j]
            if k == len(stop):
                k = table[k - 1]
            while k and stop[k] != ch:
                k = table[k - 1]
            if stop[k] == ch:
                k += 1
            states[j] = k
            if k == len(stop):
                hit = max(hit, k)
        return hit
