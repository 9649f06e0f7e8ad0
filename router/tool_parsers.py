"""Tool calls in generated text, found as the text streams: content streams as content until the model starts a
tool call; then each call's id and name in one delta and its arguments in fragments, as OpenAI streams them.

Families (vLLM's `--tool-call-parser` names), chosen from the chat template unless the flag names one:
- `hermes` (Hermes, Qwen 2.5 / 3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number;
- `llama3_json` (Llama 3.x): `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` or alone), `;` between;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}` (v11+).
Every family also takes an answer that is nothing but such JSON (an object, or a list of them), which is what a
forced tool call (`tool_choice` required or named) generates under its grammar.

Arguments are passed on as the model wrote them (the raw JSON text of the value), so the fragments of a stream
join to exactly the `arguments` of the same answer unstreamed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from router.stops import held_suffix

TOOL_CALL_PARSERS = {"hermes": ("<tool_call>", "</tool_call>"), "llama3_json": ("<|python_tag|>",),
                     "mistral": ("[TOOL_CALLS]",)}
TOOL_CALL_FAMILIES = tuple(TOOL_CALL_PARSERS)  # `--tool-call-parser` choices
MISTRAL_ARGS = "[ARGS]"
_WHITESPACE = " \t\r\n"
_SEPARATORS = _WHITESPACE + ",;[]"


def parser_for(chat_template: str | dict | None, flag: str | None) -> str:
    """The family: `--tool-call-parser` when given, else the first whose marker the template writes (hermes
    when none does)."""
    if flag is not None:
        return flag
    templates = " ".join(chat_template.values()) if isinstance(chat_template, dict) else chat_template or ""
    for name in ("mistral", "llama3_json"):
        if TOOL_CALL_PARSERS[name][0] in templates:
            return name
    return "hermes"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class CallScan:
    """One call as far as the text goes: its name once complete, where its arguments value starts in the
    region, and where it ends (None while incomplete)."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None


def _skip_string(text: str, i: int) -> int | None:
    """`text[i]` is '"': the index after the closing quote, None if the string is not complete."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def _skip_value(text: str, i: int) -> int | None:
    """The index after the JSON value starting at `text[i]`, None if it is not complete yet."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _skip_string(text, i)
    if text[i] in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _skip_string(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None  # a number or literal is complete once something follows it


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def scan_object(text: str, i: int) -> CallScan:
    """The call object starting at `text[i]` ('{'): its `name`, and its `arguments` (or `parameters`) value."""
    call = CallScan()
    i = _skip_ws(text, i + 1)
    while i < len(text):
        if text[i] == "}":
            call.end = i + 1
            return call
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if text[i] != '"':
            return call  # not JSON: the caller sees an incomplete, nameless call
        key_end = _skip_string(text, i)
        if key_end is None:
            return call
        key = text[i + 1:key_end - 1]
        i = _skip_ws(text, key_end)
        if i >= len(text) or text[i] != ":":
            return call
        i = _skip_ws(text, i + 1)
        end = _skip_value(text, i)
        if key in ("arguments", "parameters"):
            call.args_start, call.args_end = i, end
        elif key == "name" and end is not None and text[i] == '"':
            call.name = text[i + 1:end - 1]
        if end is None:
            return call
        i = _skip_ws(text, end)
    return call


def scan_calls(region: str) -> tuple[list[CallScan], bool]:
    """The call objects of a region, in order, skipping separators (whitespace , ; [ ]); and whether the region
    is call-shaped so far (False once something else than a call object or a separator comes)."""
    calls, i = [], 0
    while i < len(region):
        c = region[i]
        if c in _SEPARATORS:
            i += 1
        elif c == "{":
            call = scan_object(region, i)
            calls.append(call)
            if call.end is None:
                return calls, True
            i = call.end
        else:
            return calls, False
    return calls, True


def scan_mistral_named(region: str) -> tuple[list[CallScan], bool]:
    """Mistral v11+: `name[ARGS]{...}` items, `[TOOL_CALLS]` between them."""
    calls, i = [], 0
    while True:
        i = _skip_ws(region, i)
        if region.startswith(TOOL_CALL_PARSERS["mistral"][0], i):
            i += len(TOOL_CALL_PARSERS["mistral"][0])
            continue
        if i >= len(region):
            return calls, True
        marker = region.find(MISTRAL_ARGS, i)
        if marker < 0:
            return calls, True
        args_start = _skip_ws(region, marker + len(MISTRAL_ARGS))
        end = _skip_value(region, args_start)
        calls.append(CallScan(region[i:marker].strip(), args_start, end, end))
        if end is None:
            return calls, True
        i = end


@dataclass(slots=True)
class StreamedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ToolCallStream:
    """One answer's text → content and tool-call deltas. `feed` each piece, `finish` at the end; each returns
    deltas in order: ("content", text) or ("tool", index, id | None, name | None, arguments fragment)."""

    family: str
    tool_names: frozenset[str]
    parallel: bool = True
    calls: list[StreamedCall] = field(default_factory=list)
    _mode: str = "start"  # start (nothing but whitespace yet) | content | region | done
    _held: str = ""  # content that could still be the start of a marker, or the undecided start
    _opening: str = ""  # what came before the region (a marker): content again if the region is no call
    _region: str = ""  # the text from the first call on
    _region_kind: str = "json"  # json: an answer that starts as JSON | marked: after the family's marker

    def feed(self, piece: str) -> list[tuple]:
        if self._mode == "region":
            self._region += piece
            return self._region_deltas(final=False)
        if self._mode == "done":
            return []
        text, self._held = self._held + piece, ""
        marker = TOOL_CALL_PARSERS[self.family][:1]
        if self._mode == "start":
            stripped = text.lstrip()
            if not stripped or (marker and marker[0].startswith(stripped)):
                self._held = text
                return []
            if stripped[0] in "[{" and not (marker and stripped.startswith(marker[0])):
                return self._enter(text[:len(text) - len(stripped)], stripped, "json")
            self._mode = "content"
        at = text.find(marker[0]) if marker else -1
        if at >= 0:
            out = [("content", text[:at])] if at else []
            after = text[at + len(marker[0]):]
            return out + self._enter(marker[0], after, "marked")
        keep = held_suffix(text, marker)
        self._held = text[len(text) - keep:]
        return [("content", text[:len(text) - keep])] if len(text) > keep else []

    def finish(self) -> list[tuple]:
        if self._mode == "region":
            return self._region_deltas(final=True)
        held, self._held = self._held, ""
        return [("content", held)] if held and self._mode != "done" else []

    def _enter(self, opening: str, region: str, kind: str) -> list[tuple]:
        self._mode, self._opening, self._region, self._region_kind = "region", opening, region, kind
        return self._region_deltas(final=False)

    def _scan(self) -> tuple[list[CallScan], bool]:
        stripped = self._region.lstrip()
        if self._region_kind == "marked" and self.family == "mistral" and stripped and stripped[0] not in "[{":
            return scan_mistral_named(self._region)
        # Hermes' tags are separators between call objects: blanked out, every offset stays.
        region = self._region
        for tag in TOOL_CALL_PARSERS[self.family]:
            region = region.replace(tag, " " * len(tag))
        return scan_calls(region)

    def _region_deltas(self, final: bool) -> list[tuple]:
        scans, shaped = self._scan()
        if not self.parallel:
            scans = scans[:1]
        if not self.calls:
            first = scans[0] if scans else None
            nameless = first is not None and first.name is None and (final or first.end is not None)
            if (not shaped and not scans) or (final and first is None) or nameless or \
                    (first is not None and first.name is not None and first.name not in self.tool_names):
                return self._not_calls()
        out = []
        for index, scan in enumerate(scans):
            if scan.name is None or scan.name not in self.tool_names:
                break  # a later call that is not one of the tools ends the calls
            if index == len(self.calls):
                self.calls.append(StreamedCall(new_call_id(), scan.name))
                out.append(("tool", index, self.calls[index].id, scan.name, ""))
            call = self.calls[index]
            if scan.args_start is None:
                if not (final or scan.end is not None):
                    continue
                args = "{}"  # a call without arguments
            else:
                args = self._region[scan.args_start:scan.args_end]
                if scan.args_end is None and not final:
                    args = args.rstrip()  # trailing whitespace may yet turn out to be outside the value
            if len(args) > len(call.arguments) and args.startswith(call.arguments):
                out.append(("tool", index, None, None, args[len(call.arguments):]))
                call.arguments = args
        if final or (not self.parallel and self.calls and scans and scans[0].end is not None):
            self._mode = "done"
        return out

    def _not_calls(self) -> list[tuple]:
        """What looked like the start of a call is not one: it is content, and no call is looked for after it."""
        text = self._opening + self._region
        self._mode, self._opening, self._region, self.family = "content", "", "", "none"
        return [("content", text)] if text else []


TOOL_CALL_PARSERS["none"] = ()  # after a false start: content only
