import random

import pytest

from router.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Char-by-char definition: stop at the first position where some stop string ends."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_no_stops_passes_through():
    matcher = StopMatcher([])
    assert matcher.feed("hello ") == ("hello ", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == ""


def test_stop_split_across_pieces():
    assert run(["</end>"], ["Hello </", "e", "nd> world"]) == ("Hello ", True)


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("RM") == ("STORM", False)
    assert matcher.feed("S") == ("", False)
    assert matcher.flush() == "S"


def test_stop_at_very_start():
    assert run(["###"], ["#", "##", "more"]) == ("", True)


def test_several_stops_first_to_end_wins():
    assert run(["world", "lo"], ["hello world"]) == ("hel", True)
    assert run(["abcd", "c"], ["abcd"]) == ("ab", True)
    # Same end: the longer one, which starts earlier, wins.
    assert run(["bc", "abc"], ["xabc"]) == ("x", True)


def test_overlapping_prefixes():
    assert run(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)
    assert run(["ab", "abc"], ["xa", "bc"]) == ("x", True)


def test_feed_after_stop_returns_nothing():
    matcher = StopMatcher(["x"])
    assert matcher.feed("axb") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_string_is_ignored():
    assert run(["", "z"], ["abc"]) == ("abc", False)


def test_multibyte_stop_strings():
    assert run(["東京", "🙂"], ["Größe ", "東", "京は"]) == ("Größe ", True)


@pytest.mark.parametrize("seed", range(300))
def test_random_splits_match_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    expected = reference(stops, text)
    for _ in range(5):
        pieces = random_split(rng, text)
        assert run(stops, pieces) == expected, (stops, pieces)
        # Nothing emitted before the end ever contains a stop string.
        assert not any(s in expected[0] for s in stops)
