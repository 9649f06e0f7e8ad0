"""Chat templates run in Jinja's sandbox with limits (output size, loop iterations, time) in worker processes: a
slow or expanding template costs only its own request, which gets a 400 naming the limit (or, for a template
that fails, naming the adapter); prompts render exactly as transformers renders them."""

from __future__ import annotations

import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from router.template_sandbox import MAX_LOOP_ITERATIONS, TemplateFailure, TemplateLimitError, render_template
from router.templates import MAX_WORKERS
from router.tokenization import ModelTokenizer
from tests.conftest import LoomServer
from tests.operating import (
    CHAT,
    COMP,
    FAST_S,
    USER,
    capacity_idle,
    children,
    completion,
    error_text,
    health_s,
    metric,
    post,
    router_rss_mb,
    stream_outcome,
    timed_stream,
    wait_until,
)

NESTED = "{% set x = range(500) | list %}{% for a in x %}{% for b in x %}{% for c in x %}{% endfor %}{% endfor %}" \
    "{% endfor %}"
# Work in one C call (JSON of a list that doubles 40 times): only the worker's kill stops it. Too big to try in
# this process.
UNSTOPPABLE = ("json-bomb", "{% set l = [1] %}" + "{% set l = [l, l] %}" * 40 + "{{ l | tojson | length }}",
               "took longer than")
# (name, template, what the 400 must say)
HOSTILE = [
    ("expands", "{{ 'x' * 300000000 }}", "characters"),
    ("huge-range", "{% for i in range(10**9) %}{% endfor %}", "size past"),
    ("nested-loops", NESTED, "loop iterations|took longer than"),
    ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "characters"),
    ("doubling-sets", "{% set s = 'x' %}" + "{% set s = s ~ s %}" * 64 + "{{ s }}", "characters"),
    ("wide-format", "{{ '%0999999999d' % 1 }}{{ '{:>999999999}'.format(1) }}", "size past"),
    ("center", "{{ 'x' | center(1000000000) }}", "size past"),
    ("divides-by-zero", "{{ 1 / 0 }}", "ZeroDivisionError at line 1"),
    ("undefined", "{{ messages[0].nothing.deeper }}", "UndefinedError at line 1"),
    ("syntax", "line one\n{% for %}", "syntax error at line 2"),
    ("raises", "{{ raise_exception('roles must alternate') }}", "roles must alternate"),
]


# ---- in process: the sandbox renders what transformers renders, within its limits ---------------------------

EXACT = [
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }}"
    "{% endfor %}{{ eos_token }}{{ dict(a=1) | tojson }}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content | upper }}{% endif %}{{ m.reasoning_content | default('-') }}{{ m.thinking | default('') }}"
    "{% endfor %}{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}",
    "{%- for m in messages -%}\n  {{- m.content | trim }}{% if loop.last %}!{% endif %}\n{%- endfor %}"
    "{{ 'x' * 3 ~ 'y' }}{{ '%05d' % 7 }}{{ '{:>4}'.format(1) }}{% for i in range(3) %}{{ i }}{% endfor %}",
]
MESSAGES = [{"role": "system", "content": "Be brief.", "name": None},
            {"role": "user", "content": "Größe 🙂 \"quoted\""},
            {"role": "assistant", "content": "ok", "reasoning": "because"},
            {"role": "user", "content": "  more  "}]


@pytest.mark.parametrize("template", EXACT)
@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": {"name": "add"}}]])
def test_prompts_render_as_transformers_renders_them(llama_dir, template, tools):
    hf = AutoTokenizer.from_pretrained(llama_dir)
    tok = ModelTokenizer.from_dir(llama_dir).with_chat_template(template)
    hf.chat_template = template
    expected = hf.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False)
    assert tok.render_chat(MESSAGES, tools) == expected


@pytest.mark.parametrize("name,template,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_templates_stop_at_a_named_limit(name, template, words):
    start = time.perf_counter()
    with pytest.raises((TemplateLimitError, TemplateFailure), match=words):
        render_template(template, {"messages": USER}, max_chars=100_000, seconds=1.0)
    assert time.perf_counter() - start < 3.0


def test_loop_iterations_are_counted_across_loops():
    loops = "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimitError, match=f"more than {MAX_LOOP_ITERATIONS} loop iterations"):
        render_template(loops + "{% for c in range(10) %}{% endfor %}", {}, max_chars=100_000, seconds=30.0)


# ---- a real server: each hostile template costs only its own request ------------------------------------------


@pytest.fixture(scope="module")
def templated(tmp_path_factory, ops_adapters):
    root = tmp_path_factory.mktemp("templated")
    for name, template, _ in HOSTILE + [UNSTOPPABLE, ("slow", NESTED, "")]:
        shutil.copytree(ops_adapters[0], root / name)
        (root / name / "chat_template.jinja").write_text(template)
    return root


@pytest.fixture(scope="module")
def template_server(llama_dir, templated):
    srv = LoomServer(llama_dir, "--max-input-length", "64", "--max-total-tokens", "512", "--max-batch-total-tokens",
                     "16384", "--local-adapter-root", str(templated)).start()
    yield srv
    assert srv.stop() == 0


def template_workers(server: LoomServer) -> int:
    return len([p for p in children(server, "router")[0].children() if "router.template_sandbox" in p.cmdline()])


def test_hostile_templates_are_400s_naming_the_limit_and_bystanders_are_untouched(template_server, templated):
    url = template_server.url
    rss = router_rss_mb(template_server)
    with ThreadPoolExecutor(3) as pool:
        bystanders = [pool.submit(timed_stream, url, 300) for _ in range(3)]
        assert wait_until(lambda: metric(url, "loom_running_requests") == 3, 30)
        for name, _, words in HOSTILE + [UNSTOPPABLE]:
            start = time.perf_counter()
            r = post(url, CHAT, {"model": str(templated / name), "messages": USER, "max_tokens": 2})
            assert r.status_code == 400 and re.search(words, error_text(r)), (name, r.text)
            assert error_text(r).startswith(f"adapter '{templated / name}': ") and r.json()["error"]["param"] == \
                "messages", (name, r.text)
            assert time.perf_counter() - start < FAST_S, name
            assert health_s(url) < FAST_S
        for future in bystanders:
            events, gap = future.result(timeout=120)
            assert stream_outcome(events) == ("length", 300) and gap < FAST_S
    assert wait_until(lambda: capacity_idle(url), 10)
    assert router_rss_mb(template_server) < rss + 100  # the expanding templates grew a worker, not the router


def test_abandoned_slow_renders_stop_and_block_nobody(template_server, templated):
    url = template_server.url
    slow = {"model": str(templated / "slow"), "messages": USER, "max_tokens": 2}

    def abandon(_) -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + CHAT, json=slow, timeout=0.3)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(abandon, range(8)))
    start = time.perf_counter()  # the same moment: an unrelated completion and a base-model chat
    assert post(url, COMP, completion(4)).status_code == 200
    r = post(url, CHAT, {"model": "", "messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert time.perf_counter() - start < FAST_S
    # Each abandoned render's worker was killed when its client left; the pool's workers (and one being started
    # to replace them) remain.
    assert wait_until(lambda: template_workers(template_server) <= MAX_WORKERS + 1, 10)
    assert wait_until(lambda: capacity_idle(url), 10)


def test_a_template_worker_holds_no_secret_of_the_router(template_server):
    workers = [p for p in children(template_server, "router")[0].children()
               if "router.template_sandbox" in p.cmdline()]
    assert workers, "the server warms a template worker at start"
    router_env = children(template_server, "router")[0].environ()
    for worker in workers:
        assert set(worker.environ()) <= {"PATH", "LANG", "LC_ALL"} and set(router_env) - set(worker.environ())
