"""Prompt tokenization and chat templates for the base model and for adapters that ship their own.

Everything here is synchronous and CPU-bound; callers that serve requests decide which thread runs it. Chat
templates render in router/template_sandbox.py's limited sandbox: on a server, in a worker process
(router/templates.py, through `Backend.render_chat`); `render_chat` here renders in this process.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.limits import MAX_TEMPLATE_SECONDS
from router.adapter_files import MAX_TEMPLATE_BYTES, AdapterFileError, AdapterFiles
from router.template_sandbox import TemplateFailure, TemplateLimitError, render_template

# Files whose presence means a directory carries its own tokenizer (not just a chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model", "tekken.json")
# What an adapter's private tokenizer copy holds: never adapter_config.json, whose base_model_name_or_path
# transformers would follow.
_TOKENIZER_COPY = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json",
                   "generation_config.json", "merges.txt", *TOKENIZER_FILES)
# tokenizer_config.json keys that name files: transformers would open them wherever they point.
_FILE_KEYS = ("vocab", "merges")
# What one rendered chat prompt may hold at most, whatever --max-input-length allows.
MAX_PROMPT_CHARS = 16 << 20


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: no template, or the template rejected the messages."""


class ModelTokenizer:
    """A transformers fast tokenizer plus what serving needs from the model dir: eos ids and a chat template.

    `chat_template` is a template string, a {name: template} dict (as transformers stores multiple
    templates), or None. It is kept apart from `hf` so that an adapter that ships only a template can
    share the base model's tokenizer object.
    """

    __slots__ = ("hf", "eos_token_ids", "chat_template", "special_ids", "max_token_chars", "special_tokens")

    def __init__(self, hf: Any, eos_token_ids: frozenset[int], chat_template: str | dict[str, str] | None,
                 max_token_chars: int | None = None):
        self.hf = hf
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        # Ids that decode(skip_special_tokens=True) drops: the Rust tokenizer's notion of "special".
        self.special_ids = frozenset(i for i, tok in hf.added_tokens_decoder.items() if tok.special)
        # The most text characters one token can stand for: a token's stored form has at least as many
        # characters as the text it decodes to (byte-level BPE: one per byte; SentencePiece: one per character).
        self.max_token_chars = max_token_chars or max(map(len, hf.get_vocab()), default=1)
        # What transformers passes every chat template besides the conversation (bos_token, eos_token, ...).
        self.special_tokens = {k: v if isinstance(v, (str, list)) else str(v)
                               for k, v in hf.special_tokens_map.items()}

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelTokenizer:
        """Loads (once per directory; later calls are free) the tokenizer stored in `path`."""
        return _load(str(Path(path).resolve()))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        """Whether `hf.decode` applies clean_up_tokenization. Older checkpoints often ask for it, and
        transformers 5 ignores that for BPE models (it would delete real spaces before punctuation)."""
        if not self.hf.clean_up_tokenization_spaces:
            return False
        if type(self.hf.backend_tokenizer.model).__name__ != "BPE":
            return True
        return bool(getattr(self.hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids exactly as `tokenizer(text)["input_ids"]`, including the tokenizer's own special tokens (e.g. BOS)
        unless `add_special_tokens` is false (a rendered chat prompt already holds them)."""
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]

    def tokenize_with_offsets(self, text: str) -> list[tuple[int, str, int, int]]:
        """(id, token text, start, stop) for each id of `encode(text)`; offsets index characters of `text`."""
        encoding = self.hf(text, return_offsets_mapping=True)
        return [(i, text[a:b], a, b) for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])]

    def decode(self, ids: list[int]) -> str:
        """Text exactly as `tokenizer.decode(ids, skip_special_tokens=True)`."""
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_token(self, token_id: int) -> str:
        """One token's own text, special tokens included: what logprobs and token details show."""
        return self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def decode_raw(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """`decode` without transformers' clean_up_tokenization pass (the detokenizer applies it itself)."""
        return self.hf.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def clean_up(self, text: str) -> str:
        return self.hf.clean_up_tokenization(text)

    def chat_inputs(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, chat_template: str | None = None,
                    template_kwargs: dict | None = None,
                    continue_final_message: bool = False) -> tuple[str, dict[str, Any]]:
        """(template, variables) for a conversation, as transformers' apply_chat_template builds them: messages
        without their None fields, reasoning under every name templates read, the special tokens, and
        `template_kwargs` (a request's own). `chat_template` (a request's own) replaces the model's.
        `continue_final_message`: the last message's text carries CONTINUE_TAG, where `continued` cuts the
        rendered prompt."""
        if chat_template is None:
            if not self.has_chat_template:
                raise ChatTemplateError(
                    "the model has no chat template; use /v1/completions with a plain prompt instead, "
                    "or serve a model or adapter whose tokenizer_config.json or chat_template.jinja defines one"
                )
            chat_template = _pick_template(self.chat_template, tools)
        conversation = [_with_reasoning_aliases({k: v for k, v in m.items() if v is not None}) for m in messages]
        if continue_final_message:
            conversation[-1] = _tagged(conversation[-1])
        variables = {**self.special_tokens, **(template_kwargs or {}), "messages": conversation, "tools": tools,
                     "documents": None, "add_generation_prompt": add_generation_prompt}
        return chat_template, variables

    def max_prompt_chars(self, max_input_length: int) -> int:
        """The most characters a rendered prompt may have: what `max_input_length` tokens can hold."""
        return min(max_input_length * self.max_token_chars, MAX_PROMPT_CHARS)

    def render_chat(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template: str | None = None, template_kwargs: dict | None = None,
    ) -> str:
        """The prompt text of a conversation, rendered in this process; raises ChatTemplateError for a missing
        or failing template (the server renders through router/templates.py instead, `Backend.render_chat`)."""
        source, variables = self.chat_inputs(messages, tools, add_generation_prompt, chat_template, template_kwargs,
                                             continue_final_message)
        try:
            text = render_template(source, variables, MAX_PROMPT_CHARS, MAX_TEMPLATE_SECONDS)
        except (TemplateFailure, TemplateLimitError) as e:
            raise ChatTemplateError(str(e)) from None
        return continued(text) if continue_final_message else text

    def apply_chat_template(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt ids for a conversation, equal to transformers' `apply_chat_template(..., tokenize=True)`.

        The rendered text already holds every special token the template wants, so it is encoded
        without adding BOS/EOS again.
        """
        return self.encode(self.render_chat(messages, tools, add_generation_prompt), add_special_tokens=False)

    def with_chat_template(self, chat_template: str | dict[str, str]) -> ModelTokenizer:
        """This tokenizer with another template (an adapter that ships only a template); shares `hf`."""
        return ModelTokenizer(self.hf, self.eos_token_ids, chat_template, self.max_token_chars)


def load_adapter_tokenizer(files: AdapterFiles, base: ModelTokenizer) -> ModelTokenizer:
    """The tokenizer for requests to an adapter, from its files as read once (router/adapter_files.py): its own
    tokenizer when it ships one, else the base tokenizer with the adapter's own chat template when it has one,
    else `base` itself. Raises AdapterFileError for files that are refused."""
    template = read_chat_template(files)
    if any(files.has(name) for name in TOKENIZER_FILES):
        return _tokenizer_from_copy(files, template)
    return base.with_chat_template(template) if template else base


def read_chat_template(files: AdapterFiles) -> str | dict[str, str] | None:
    """The chat template among an adapter's files, in either era's layout: chat_template.jinja plus named ones
    in additional_chat_templates/NAME.jinja (current transformers), else tokenizer_config.json's (older)."""
    default, named = files.text("chat_template.jinja"), files.templates()
    if default is not None:
        return {"default": default, **named} if named else default
    if named:
        return named
    config = files.json("tokenizer_config.json").get("chat_template")
    if isinstance(config, list):  # the on-disk form of several named templates
        try:
            config = {t["name"]: t["template"] for t in config}
        except (TypeError, KeyError):
            raise AdapterFileError("its file 'tokenizer_config.json' holds a malformed chat_template list") from None
    templates = config.values() if isinstance(config, dict) else [config]
    if not all(t is None or isinstance(t, str) and len(t) <= MAX_TEMPLATE_BYTES for t in templates):
        raise AdapterFileError("its file 'tokenizer_config.json' holds a chat_template that is not text or is "
                               f"larger than {MAX_TEMPLATE_BYTES} characters")
    return config or None


def _tokenizer_from_copy(files: AdapterFiles, template: str | dict[str, str] | None) -> ModelTokenizer:
    """An adapter's own tokenizer, built by transformers from a private copy of its tokenizer files (so nothing
    in them can make it open a file elsewhere), deleted once loaded."""
    with tempfile.TemporaryDirectory(prefix="loom-tokenizer-") as copy:
        for name in _TOKENIZER_COPY:
            if files.has(name):
                data = files.files[name]
                if name == "tokenizer_config.json":
                    config = files.json(name)
                    data = json.dumps({k: v for k, v in config.items()
                                       if not (k.endswith(("_file", "_files")) or k in _FILE_KEYS)}).encode()
                (Path(copy) / name).write_bytes(data)
        tokenizer = _from_pretrained(copy)
    return ModelTokenizer(tokenizer.hf, tokenizer.eos_token_ids, template)


def _pick_template(template: str | dict[str, str], tools: list[dict] | None) -> str:
    if isinstance(template, str):
        return template
    if tools and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise ChatTemplateError(f"the model has several chat templates {sorted(template)[:8]} and none is named "
                            "'default'")


def _with_reasoning_aliases(message: dict) -> dict:
    """transformers' aliasing of a message's reasoning: `reasoning_content` (what templates read) filled from
    older names, and `thinking` (what gpt-oss templates read)."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning")
                      if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=256)
def _load(path: str) -> ModelTokenizer:
    return _from_pretrained(path)


def _from_pretrained(path: str) -> ModelTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not hf.is_fast:
        raise ValueError(f"{path}: only fast (tokenizer.json) tokenizers are supported")
    eos = {hf.eos_token_id} if hf.eos_token_id is not None else set()
    return ModelTokenizer(hf, frozenset(eos | _generation_eos_ids(Path(path))), hf.chat_template)


def _generation_eos_ids(path: Path) -> set[int]:
    """The eos ids transformers' generate stops at: generation_config.json's (an id or a list), else, as
    GenerationConfig.from_model_config does without that file, config.json's."""
    generation = path / "generation_config.json"
    eos = _read_json(generation if generation.is_file() else path / "config.json").get("eos_token_id")
    if eos is None:
        return set()
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{generation.name if generation.is_file() else 'config.json'}: eos_token_id must be a "
                         "token id or a list of them")
    return set(ids)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# transformers' marker for continue_final_message: appended to the final message's text, and the rendered prompt
# is cut where it lands, so that the answer continues that text instead of following a closed turn.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tagged(message: dict) -> dict:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": content + CONTINUE_TAG}
    parts = list(content or [])
    for i in reversed(range(len(parts))):
        if isinstance(parts[i], dict) and "text" in parts[i]:
            parts[i] = {**parts[i], "text": parts[i]["text"] + CONTINUE_TAG}
            return {**message, "content": parts}
    raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")


def continued(rendered: str) -> str:
    """A prompt rendered with a tagged final message, cut where its text ends (as transformers cuts it)."""
    at = rendered.rfind(CONTINUE_TAG.strip())
    if at < 0:
        raise ChatTemplateError("continue_final_message is set but the chat template does not show the final "
                                "message's text")
    return rendered[:at] if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()

