"""One error type for every route, rendered in OpenAI's shape on /v1/* and LoRAX's elsewhere."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

# LoRAX's error_type names for the statuses we produce.
_LORAX_TYPES = {400: "validation", 401: "authentication", 404: "not_found", 409: "validation", 413: "validation",
                422: "validation", 429: "overloaded", 500: "generation", 503: "unhealthy"}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
# An absolute path in a message from the shards or a library: only its last part reaches a client. A path's
# folders may hold spaces and quotes, so everything from a `/` that starts a path to the line's last `/` goes
# (over-cutting a message beats showing part of a path).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^/\n]*/)+")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": _OPENAI_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def lorax_body(self) -> dict:
        return {"error": self.message, "error_type": _LORAX_TYPES.get(self.status, "generation")}

    def body_for(self, path: str) -> dict:
        return self.openai_body() if path.startswith("/v1/") else self.lorax_body()

    def response(self, path: str) -> JSONResponse:
        return JSONResponse(self.body_for(path), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def redact_paths(message: str) -> str:
    """`message` with every absolute path cut to its last part: clients learn which file, not where it lives."""
    return _ABSOLUTE_PATH.sub("", message)
