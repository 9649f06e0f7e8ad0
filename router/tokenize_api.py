"""`POST /tokenize` in LoRAX's body and vLLM's two (a prompt, or a conversation), and vLLM's `POST /detokenize`.

Bounded like a prompt: the character bound before tokenizing, --max-input-length after.
"""

from __future__ import annotations

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from router.backend import Backend, ModelId, StrictModel, decode_json, validate
from router.chat_prompt import ChatTemplateFields, render_prompt, template_messages
from router.errors import bad_request
from router.openai_schema import Tool


class LoraxTokenizeRequest(StrictModel):
    inputs: str


class PromptTokenizeRequest(StrictModel):
    model: ModelId | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class ChatTokenizeRequest(ChatTemplateFields):
    model: ModelId | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(StrictModel):
    model: ModelId | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def _backend(request: Request) -> Backend:
    return request.app.state.backend


async def tokenize(request: Request):
    backend = _backend(request)
    data = decode_json(await request.body())
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    if "inputs" in data:  # LoRAX: a list of {id, text, start, stop}
        body = validate(data, LoraxTokenizeRequest)
        backend.check_chars(body.inputs, backend.tokenizer, "inputs")
        pieces = await backend.off_loop(backend.tokenizer.tokenize_with_offsets, body.inputs)
        backend.check_input_length(len(pieces), "inputs")
        return JSONResponse([{"id": i, "text": text, "start": start, "stop": stop} for i, text, start, stop in pieces])
    body = validate(data, ChatTokenizeRequest if "messages" in data else PromptTokenizeRequest)
    adapter, tokenizer = await backend.resolve_model(body.model)
    if isinstance(body, ChatTokenizeRequest):
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        prompt = await render_prompt(backend, adapter, tokenizer, template_messages(body), tools, body)
        ids = prompt.input_ids if not body.add_special_tokens else \
            await backend.encode(tokenizer, prompt.text, "messages", adapter=adapter)
        param = "messages"
    else:
        ids = await backend.encode(tokenizer, body.prompt, "prompt", add_special_tokens=body.add_special_tokens,
                                   adapter=adapter)
        param = "prompt"
    backend.check_input_length(len(ids), param)
    out = {"count": len(ids), "max_model_len": backend.config.max_total_tokens, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [tokenizer.decode_token(i) for i in ids]
    return JSONResponse(out)


async def detokenize(request: Request):
    backend = _backend(request)
    body = validate(decode_json(await request.body()), DetokenizeRequest)
    adapter, tokenizer = await backend.resolve_model(body.model)
    backend.check_input_length(len(body.tokens), "tokens")
    backend.check_token_ids(body.tokens, "tokens", adapter)
    return JSONResponse({"prompt": await backend.off_loop(tokenizer.decode, body.tokens)})
