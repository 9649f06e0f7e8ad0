"""Stop strings on streamed text: output ends right before the first stop string, which is never emitted."""

from __future__ import annotations


class StopMatcher:
    """Feed the detokenizer's pieces in order; emit what `feed` returns; call `flush` when generation ends.

    Text that could still be the start of a stop string is held back until the next pieces show
    whether it is one. Once a stop string is hit, the matcher is done: later calls return "".
    Empty stop strings are ignored.
    """

    __slots__ = ("_stops", "_prefixes", "_longest_prefix", "_held", "stopped")

    def __init__(self, stop_strings: list[str]):
        self._stops = tuple(dict.fromkeys(s for s in stop_strings if s))
        # Every proper prefix of a stop string: the tails of the text worth holding back.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._longest_prefix = max(map(len, self._prefixes), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit); after a hit the text ends before it."""
        if not self._stops:
            return piece, False
        if self.stopped:
            return "", True
        text = self._held + piece
        # The stop string that ends first wins (the longest one on a tie), as if fed one char at a
        # time, so the result does not depend on how the text was split into pieces.
        hit = min(((i + len(s), i) for s in self._stops if (i := text.find(s)) >= 0), default=None)
        if hit is not None:
            self._held, self.stopped = "", True
            return text[: hit[1]], True
        keep = self._open_prefix_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text: at the end of generation it can no longer become a stop string."""
        held, self._held = self._held, ""
        return held

    def _open_prefix_len(self, text: str) -> int:
        # Longest tail of `text` that a stop string starts with. Earlier text cannot start a stop string:
        # that string would have to begin with a longer tail, or occur in full and have been found.
        for n in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0

