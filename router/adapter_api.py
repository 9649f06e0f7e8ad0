"""vLLM's runtime adapter API: `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`.

Off unless `--enable-adapter-api`; behind `--api-key` like every route. A loaded adapter is served under its
`lora_name` and listed in `/v1/models`; `lora_path` is an absolute path inside a `--local-adapter-root`, an
`s3://` URL or a hub repo id. `load_inplace: true` loads a name again with new weights (router/adapters.py).
Success answers are vLLM's plain-text lines, errors the OpenAI error shape.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from router.backend import Backend, StrictModel, parse_body
from router.errors import APIError, bad_request


class LoadLoRAAdapterRequest(StrictModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace the weights of an adapter already loaded under lora_name


class UnloadLoRAAdapterRequest(StrictModel):
    lora_name: str


def _backend(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    if not backend.config.enable_adapter_api:
        raise APIError(404, "the runtime adapter API is off: start loom with --enable-adapter-api",
                       code="adapter_api_disabled")
    return backend


def _check_name(name: str) -> None:
    if not name or any(c == "," or c.isspace() for c in name):
        # The inference extension's endpoint picker reads the running adapters as one comma-separated label.
        raise bad_request("`lora_name` must be non-empty, without commas or whitespace", param="lora_name")


async def load_lora_adapter(request: Request):
    backend = _backend(request)
    body = await parse_body(request, LoadLoRAAdapterRequest)
    _check_name(body.lora_name)
    if not body.lora_path:
        raise bad_request("`lora_path` must be a directory inside a --local-adapter-root or a hub repo id",
                          param="lora_path")
    await backend.adapters.register(body.lora_name, body.lora_path, inplace=body.load_inplace,
                                    users=backend.scheduler.adapter_users)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request):
    backend = _backend(request)
    body = await parse_body(request, UnloadLoRAAdapterRequest)
    await backend.adapters.unregister(body.lora_name, backend.scheduler.adapter_users)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


ROUTES = [
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
