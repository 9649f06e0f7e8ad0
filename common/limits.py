"""The documented maximum of every request field that has one, written once (README: "Operating Loom").

Each bound keeps a field inside its proto type and the work a single request can ask for small; a request past
one is a 400 that names the field. Limits an operator sets (prompt tokens, body bytes, connections) are flags.
"""

from __future__ import annotations

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)

MAX_CHOICES = 128  # n, best_of: generations one prompt may ask for
MAX_TOP_LOGPROBS = 20  # chat top_logprobs, native return_k_alternatives
MAX_COMPLETION_LOGPROBS = 5  # legacy completions' logprobs (OpenAI's own bound)
MAX_TOP_K = 1 << 20  # above any vocabulary: a larger top_k means the same as none
MAX_NATIVE_TEMPERATURE = 100.0  # OpenAI routes: 2, as OpenAI
MAX_REPETITION_PENALTY = 100.0
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512  # per stop string
MAX_MODEL_ID_CHARS = 512  # `model` / `adapter_id`: a name, a hub id or an absolute path
MAX_JSON_DEPTH = 64  # nesting of objects and lists in a request body
MAX_TEMPLATE_SECONDS = 1.0  # one chat template render (the character budget: what --max-input-length can hold)
# A compiled grammar (a JSON schema, tools' parameters): llguidance compiles about a megabyte a second, on a
# shard thread of its own, so this keeps one request's compile to a fraction of a second.
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_NAME_CHARS = 256  # names and ids inside messages (a tool call's id, a function's name)
MAX_ANNOTATIONS = 128  # an assistant message's url citations, sent back as the SDK returned them
MAX_STOP_TOKEN_IDS = 64  # vLLM's stop_token_ids
PRIORITY_BOUND = 2**31 - 1  # vLLM's `priority`: |priority| at most this (a 32-bit int)
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024  # a request's own `chat_template`
MAX_TEMPLATE_KWARGS = 32  # `chat_template_kwargs` entries
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_GUIDED_GRAMMAR_CHARS = 64 * 1024  # guided_regex, guided_grammar as sent (what they compile to: MAX_GRAMMAR_CHARS)
MAX_GUIDED_CHOICES = 256  # guided_choice entries
MAX_GUIDED_CHOICE_CHARS = 1024  # each guided_choice string
MAX_PARALLEL_TOOL_CALLS = 8  # calls one forced (`tool_choice: required`) answer may make
MAX_RESPONSE_ID_CHARS = 128  # the Responses API's previous_response_id
