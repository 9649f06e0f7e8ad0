"""The clients people serve LLMs to, unchanged, against Loom: LangChain (langchain-openai), LiteLLM, the OpenAI
Agents SDK (its chat-completions and Responses models), instructor, and lm-eval's `local-completions`, whose
log-likelihoods on a small local multiple-choice task must agree with its `hf` backend. Where text matters (an
agent's turn after its tool ran, evaluation) they run on the real SmolLM2-135M-Instruct (see test_real_model.py);
elsewhere on the tiny test model, whose forced tool calls and structured output are valid by construction."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

from launcher.model_source import resolve_model
from tests.conftest import LoomServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import

ASK = "What's the weather in Paris?"
FORCE_HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
SMALL_LIMITS = ("--max-input-length", "384", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "512",
                "--kv-cache-mb", "256")


class Weather(BaseModel):
    """Weather in a city."""

    city: str = Field(max_length=10)


class Loose(BaseModel):
    """Any JSON object parses as this (json_object mode constrains JSON, not its keys or values)."""

    model_config = ConfigDict(extra="allow")


def get_weather(city: str) -> str:
    """Weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def url(ops_server) -> str:
    return f"{ops_server.url}/v1"


@pytest.fixture(scope="module")
def models(ops_server, ops_adapters) -> list[str]:
    return [""] + [str(a) for a in ops_adapters[:2]]


def sdk_answer(url: str, model: str, text: str, max_tokens: int = 8) -> str:
    client = OpenAI(api_key="EMPTY", base_url=url, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=max_tokens, temperature=0).choices[0].message.content


def langchain(url: str, model: str = "", **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=url, api_key="EMPTY", model=model, temperature=0, max_retries=0, **kwargs)


def test_langchain_invoke_stream_and_batch_across_adapters(url, models):
    llm = langchain(url, max_tokens=8)
    answer = llm.invoke(ASK).content
    assert answer == sdk_answer(url, "", ASK)
    assert "".join(chunk.content for chunk in llm.stream(ASK)) == answer
    llms = [langchain(url, m, max_tokens=8) for m in models]

    async def all_at_once():
        return await asyncio.gather(*(one.abatch([ASK, "Hello"]) for one in llms))

    for model, (ask, hello) in zip(models, asyncio.run(all_at_once())):
        assert ask.content == sdk_answer(url, model, ASK) and hello.content == sdk_answer(url, model, "Hello")


@pytest.mark.parametrize("tool_choice", ["Weather", "any"])
def test_langchain_forced_tools(url, tool_choice):
    message = langchain(url, max_tokens=60).bind_tools([Weather], tool_choice=tool_choice).invoke(ASK)
    assert [c["name"] for c in message.tool_calls] == ["Weather"]
    assert Weather.model_validate(message.tool_calls[0]["args"])


def test_langchain_auto_tools_streamed(url):
    llm = langchain(url, max_tokens=80, extra_body={"guided_choice": [FORCE_HERMES]}).bind_tools([get_weather])
    chunks = list(llm.stream(ASK))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content == "Let me check. "
    assert merged.tool_calls == [{"name": "get_weather", "args": {"city": "Paris"}, "id": merged.tool_calls[0]["id"],
                                  "type": "tool_call"}]
    assert sum(1 for c in chunks if c.tool_call_chunks) > 2  # arguments in fragments


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(url, method):
    out = langchain(url, max_tokens=60).with_structured_output(Weather, method=method).invoke(ASK)
    assert isinstance(out, Weather)


def test_litellm(ops_server, url, llama_dir):
    import litellm

    model = f"hosted_vllm/{llama_dir}"
    chat = litellm.completion(model=model, api_base=url, api_key="EMPTY", max_tokens=8, temperature=0,
                              messages=[{"role": "user", "content": ASK}])
    assert chat.choices[0].message.content == sdk_answer(url, "", ASK)
    streamed = litellm.completion(model=model, api_base=url, api_key="EMPTY", max_tokens=8, temperature=0,
                                  messages=[{"role": "user", "content": ASK}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    text = litellm.text_completion(model=model, api_base=url, api_key="EMPTY", prompt="Once upon", max_tokens=5)
    assert text.usage.completion_tokens <= 5 and text.choices[0].text
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": Weather.model_json_schema()}}
    called = litellm.completion(model=model, api_base=url, api_key="EMPTY", max_tokens=60, tools=[tool],
                                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                messages=[{"role": "user", "content": ASK}])
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and Weather.model_validate_json(call.function.arguments)


def instructor_answer(url: str, mode: str, schema: type[BaseModel], ask: str = ASK,
                      max_tokens: int = 60) -> BaseModel:
    import instructor

    client = instructor.from_openai(OpenAI(api_key="EMPTY", base_url=url, max_retries=0),
                                    mode=getattr(instructor.Mode, mode))
    return client.chat.completions.create(model="", response_model=schema, max_retries=0, max_tokens=max_tokens,
                                          messages=[{"role": "user", "content": ask}])


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor(url, mode):
    assert isinstance(instructor_answer(url, mode, Weather), Weather)


# -- on the real model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model(smollm2_gguf):
    return resolve_model(str(smollm2_gguf)).path


@pytest.fixture(scope="module")
def real_server(smollm2_gguf, real_model):
    srv = LoomServer(smollm2_gguf, *SMALL_LIMITS).start(timeout=300)
    yield srv
    srv.stop()


def test_json_object_modes(real_server):
    """json_object constrains JSON, not its keys or length: a model that knows how to stop, not random weights."""
    url = f"{real_server.url}/v1"
    ask = 'Reply with a JSON object like {"city": "Rome"} naming the city in: What is the weather in Paris?'
    llm = langchain(url, max_tokens=150)
    raw = llm.bind(response_format={"type": "json_object"}).invoke(ask)
    assert raw.response_metadata["finish_reason"] == "stop", raw.content
    assert isinstance(llm.with_structured_output(Loose, method="json_mode").invoke(ask), Loose)
    assert isinstance(instructor_answer(url, "JSON", Loose, ask, 300), Loose)


@pytest.mark.parametrize("kind", ["responses", "chat_completions"])
def test_agents_sdk_runs_a_function_tool_turn(real_server, kind):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def weather(city: str) -> str:
        """Weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    client = AsyncOpenAI(api_key="EMPTY", base_url=f"{real_server.url}/v1", max_retries=0, timeout=300)
    model_class = OpenAIResponsesModel if kind == "responses" else OpenAIChatCompletionsModel
    agent = Agent(name="weather", instructions="Answer in one short sentence.", tools=[weather],
                  model=model_class(model="", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0))
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert len(calls) == 1 and isinstance(result.final_output, str) and result.final_output


MC_ITEMS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("Two plus two equals", ["three", "four", "five", "six"], 1),
    ("The sun rises in the", ["west", "north", "east", "south"], 2),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Rankine", "Newton"], 0),
    ("A week has seven", ["hours", "months", "days", "years"], 2),
    ("The largest ocean on Earth is the", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("Cats are often kept as", ["pets", "tools", "fuel", "coins"], 0),
    ("The opposite of hot is", ["warm", "cold", "wet", "loud"], 1),
    ("Bees make", ["milk", "silk", "honey", "wool"], 2),
    ("The color of grass is usually", ["blue", "green", "red", "purple"], 1),
    ("A triangle has three", ["sides", "wheels", "legs", "eyes"], 0),
    ("Ice is frozen", ["sand", "air", "fire", "water"], 3),
    ("The first month of the year is", ["March", "January", "June", "May"], 1),
    ("People read books in a", ["library", "pool", "garage", "stadium"], 0),
]


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> tuple[str, str]:
    """A 14-item multiple-choice task in lm-eval's YAML format over a local JSON file (no hub)."""
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "gold": g}) + "\n" for q, c, g in MC_ITEMS))
    (root / "loom_mc.yaml").write_text(
        "task: loom_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: gold\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    return str(root), "loom_mc"


def run_lm_eval(model: str, model_args: str, task_dir: str, task: str) -> tuple[float, list]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=TaskManager(
        include_path=task_dir), log_samples=True, batch_size=1)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task]["acc,none"], [[r[0] for r in s["resps"]] for s in samples]


def test_lm_eval_local_completions_agrees_with_its_hf_backend(real_server, real_model, smollm2_gguf, mc_task):
    """Log-likelihoods and greedy flags (from echo's prompt alternatives) through Loom equal lm-eval's own
    transformers run on the same weights, and so does the accuracy."""
    task_dir, task = mc_task
    served = f"model={smollm2_gguf},base_url={real_server.url}/v1/completions,tokenizer_backend=huggingface," \
             f"tokenizer={real_model},tokenized_requests=True,max_retries=1"
    loom_acc, loom = run_lm_eval("local-completions", served, task_dir, task)
    hf_acc, hf = run_lm_eval("hf", f"pretrained={real_model},dtype=float32,device=cpu", task_dir, task)
    assert loom_acc == hf_acc
    for loom_item, hf_item in zip(loom, hf, strict=True):
        for (loom_ll, loom_greedy), (hf_ll, hf_greedy) in zip(loom_item, hf_item, strict=True):
            assert loom_ll == pytest.approx(hf_ll, abs=1e-3) and loom_greedy == hf_greedy
