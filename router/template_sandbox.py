"""Chat templates rendered in Jinja's immutable sandbox, within limits: `render_template` is the one render.

The environment is the one transformers' `apply_chat_template` builds (trim_blocks, lstrip_blocks, loop
controls, `{% generation %}`, its `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`), so a
prompt renders to the same text. On top of the sandbox, every template runs against a deadline and a character
budget: output is counted as it is produced, `*`, `**` and `+` are sized before they are computed, calls and
filters may not ask for sizes past the budget, and results past it are refused. Work that none of these see (a
loop that produces nothing) is bounded by the process this runs in (router/templates.py: a child process that
is killed past the deadline, under a memory limit).

`python -m router.template_sandbox` is that child: length-prefixed JSON requests on stdin, replies on stdout.
It imports nothing but jinja2 and the standard library.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

FRAME = struct.Struct("!I")  # the byte length of each JSON frame
MAX_LOOP_ITERATIONS = 1_000_000  # loop bodies run in one render, all loops together
WORKER_NICENESS = 10
_NUMBER = re.compile(r"\d+")


class TemplateLimitError(Exception):
    """The template went past a limit; the message names it."""


class TemplateFailure(Exception):
    """The template could not be rendered (syntax, undefined names, its own raise_exception, a type error)."""


class _Budget:
    """The limits of one render: characters out (and in any one value), loop iterations, and a deadline in CPU
    time of this thread (a busy machine slows a render down without making it fail)."""

    __slots__ = ("max_chars", "deadline", "seconds", "iterations")

    def __init__(self, max_chars: int, seconds: float):
        self.max_chars = max_chars
        self.seconds = seconds
        self.deadline = time.thread_time() + seconds
        self.iterations = 0

    def iteration(self) -> None:
        self.iterations += 1
        if self.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateLimitError(f"the chat template ran more than {MAX_LOOP_ITERATIONS} loop iterations")
        self.tick()

    def tick(self) -> None:
        if time.thread_time() > self.deadline:
            raise TemplateLimitError(f"the chat template took longer than {self.seconds:g} s (of CPU time) to "
                                     "render")

    def size(self, n: int, what: str = "a value") -> None:
        if n > self.max_chars:
            raise TemplateLimitError(f"the chat template built {what} of more than {self.max_chars} characters")

    def format_string(self, text) -> None:
        """A %- or {}-format string may not ask for a width or precision past the budget."""
        if isinstance(text, str) and any(len(n) > 18 or int(n) > self.max_chars for n in _NUMBER.findall(text)):
            raise TemplateLimitError(f"the chat template asked for a size past {self.max_chars}")


class _LimitedCodeGenerator(CodeGenerator):
    """Jinja's code generator with every loop body counted (`environment.loop_iteration()` first thing in it)
    and every `~` concatenation sized (`environment.joined`)."""

    def visit_For(self, node: nodes.For, frame) -> None:
        tick = nodes.ExprStmt(nodes.Call(nodes.EnvironmentAttribute("loop_iteration"), [], [], None, None))
        node.body = [tick, *node.body]
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.joined((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for training masks):
    here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without the type itself (no attribute access to its internals)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore-prefixed attributes, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name[:40]!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _sized(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with one render's `_Budget` (set by `render_template`) checked at every output
    chunk, call, filter and sized operator."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _LimitedCodeGenerator

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self._renders = threading.local()  # each thread's render has its own budget
        self.filters["tojson"] = _tojson
        self.filters = {name: self._limited(f, name) for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace)

    @property
    def budget(self) -> _Budget:
        return self._renders.budget

    @budget.setter
    def budget(self, budget: _Budget) -> None:
        self._renders.budget = budget

    def concat(self, chunks) -> str:  # type: ignore[override]
        """Joins output chunks (the whole render, macro and block bodies), counting them against the budget."""
        out, total = [], 0
        for chunk in chunks:
            self.budget.tick()
            total += len(chunk)
            self.budget.size(total, "an output")
            out.append(chunk)
        return "".join(out)

    def loop_iteration(self) -> None:
        self.budget.iteration()

    def joined(self, values) -> str:
        parts = [v if isinstance(v, str) else str(v) for v in values]
        self.budget.size(sum(map(len, parts)), "a concatenation")
        return "".join(parts)

    def call_binop(self, context, operator_name, left, right):
        b = self.budget
        b.tick()
        if operator_name == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    b.size(len(seq) * max(count, 0), "a repetition")
        elif operator_name == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and (abs(left).bit_length() * right > 64 * b.max_chars or right > b.max_chars):
                raise TemplateLimitError("the chat template computed a power too large")
        elif operator_name == "+":
            b.size(_sized(left) + _sized(right), "a concatenation")
        elif operator_name == "%":
            b.format_string(left)
            self._check_arguments(right if isinstance(right, tuple) else (right,), {})
        result = super().call_binop(context, operator_name, left, right)
        b.size(_sized(result))
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        __self._check_arguments(args, kwargs)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in its own function
        if getattr(method, "__name__", "") in ("format", "format_map"):  # the widths it asks for
            __self.budget.format_string(getattr(method, "__self__", None))
        result = super().call(__context, __obj, *args, **kwargs)
        __self.budget.size(_sized(result), "a value")
        return result

    def _check_arguments(self, args, kwargs) -> None:
        self.budget.tick()
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and abs(value) > self.budget.max_chars:
                raise TemplateLimitError(f"the chat template asked for a size past {self.budget.max_chars}")

    def _limited(self, f, name: str):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
        def limited(*args, **kwargs):
            self._check_arguments(args, kwargs)
            if name == "format":
                self.budget.format_string(next((a for a in args if isinstance(a, str)), None))
            result = f(*args, **kwargs)
            self.budget.size(_sized(result), "a value")
            return result
        return limited


class _Compiled:
    """Compiled templates of one process, most recently used last (a few per adapter at most)."""

    MAX = 64

    def __init__(self):
        self.env = LimitedSandbox()
        self._cache: OrderedDict[str, jinja2.Template] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str) -> jinja2.Template:
        with self._lock:
            template = self._cache.get(source)
            if template is None:
                template = self.env.from_string(source)
                self._cache[source] = template
                while len(self._cache) > self.MAX:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(source)
            return template


@functools.lru_cache(maxsize=1)
def _compiled() -> _Compiled:
    return _Compiled()


def render_template(source: str, context: dict[str, Any], max_chars: int, seconds: float) -> str:
    """`source` rendered with `context` in the limited sandbox. Raises TemplateLimitError past a limit and
    TemplateFailure for anything the template itself gets wrong; the messages never quote the template."""
    compiled = _compiled()
    compiled.env.budget = _Budget(max_chars, seconds)
    try:
        template = compiled.get(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateFailure(f"the chat template has a syntax error at line {e.lineno}") from None
    try:
        return template.render(**context)
    except TemplateLimitError:
        raise
    except OverflowError:  # the sandbox's own range() bound
        raise TemplateLimitError("the chat template asked for a range past the sandbox's bound") from None
    except MemoryError:
        raise TemplateLimitError("the chat template used more memory than it may") from None
    except RecursionError:
        raise TemplateLimitError("the chat template recursed too deeply") from None
    except jinja2.exceptions.SecurityError:
        raise TemplateFailure("the chat template did something the sandbox does not allow") from None
    except jinja2.TemplateError as e:
        raise TemplateFailure(_failure_message(e)) from None
    except Exception as e:
        raise TemplateFailure(f"the chat template failed: {type(e).__name__} "
                              f"at line {_template_line(e.__traceback__)}") from None


def _failure_message(e: jinja2.TemplateError) -> str:
    """The template's own raise_exception(...) text (meant for the caller, bounded), else the error's kind."""
    if type(e) is jinja2.TemplateError:  # raise_exception
        return f"chat template error: {str(e.message or '')[:300]}"
    line = getattr(e, "lineno", None) or _template_line(e.__traceback__)
    return f"the chat template failed: {type(e).__name__} at line {line}"


def _template_line(tb) -> int | str:
    """The template line a traceback went through last (jinja maps its frames to template lines)."""
    line: int | str = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# -- the child process ---------------------------------------------------------------------------------------


def _send(stdout, reply: dict) -> None:
    data = json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass")
    stdout.write(FRAME.pack(len(data)) + data)
    stdout.flush()


def serve(stdin=None, stdout=None) -> None:
    """Says {"ready": true}, then answers render requests until stdin closes: {"template", "context",
    "max_chars", "seconds"} → {"text"} or {"error": "limit" | "failure", "message"}."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    _send(stdout, {"ready": True})
    while header := stdin.read(FRAME.size):
        request = json.loads(stdin.read(FRAME.unpack(header)[0]))
        try:
            reply = {"text": render_template(request["template"], request["context"], request["max_chars"],
                                             request["seconds"])}
        except TemplateLimitError as e:
            reply = {"error": "limit", "message": str(e)}
        except TemplateFailure as e:
            reply = {"error": "failure", "message": str(e)}
        _send(stdout, reply)


def _limit_memory(extra_bytes: int) -> None:
    """This process may grow by `extra_bytes` of address space; past that an allocation fails (MemoryError)."""
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * resource.getpagesize() + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


if __name__ == "__main__":
    try:
        _limit_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30)
    except (OSError, ValueError, ImportError):
        pass  # not Linux: the deadline still bounds the render
    try:
        os.nice(WORKER_NICENESS)  # a template's work yields the CPU to the shards' and the router's
    except (OSError, AttributeError):
        pass
    serve()
