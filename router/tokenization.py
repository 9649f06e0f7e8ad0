"""Prompt tokenization and chat templates for the base model and for adapters that ship their own.

Everything here is synchronous and CPU-bound; callers that serve requests decide which thread runs it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

# Files whose presence means a directory carries its own tokenizer (not just a chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: no template, or the template rejected the messages."""


class ModelTokenizer:
    """A transformers fast tokenizer plus what serving needs from the model dir: eos ids and a chat template.

    `chat_template` is a template string, a {name: template} dict (as transformers stores multiple
    templates), or None. It is kept apart from `hf` so that an adapter that ships only a template can
    share the base model's tokenizer object.
    """

    __slots__ = ("hf", "eos_token_ids", "chat_template", "special_ids", "max_token_chars")

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

    def render_chat(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template: str | None = None, template_kwargs: dict | None = None,
    ) -> str:
        """The prompt text of a conversation; raises ChatTemplateError for a missing or failing template.

        `chat_template` (a request's own, untrusted like an adapter's) replaces the model's for this call and is
        rendered the same way; `template_kwargs` are extra variables the template sees (`enable_thinking`)."""
        if chat_template is None and not self.has_chat_template:
            raise ChatTemplateError(
                "the model has no chat template; use /v1/completions with a plain prompt instead, "
                "or serve a model or adapter whose tokenizer_config.json or chat_template.jinja defines one"
            )
        try:
            return self.hf.apply_chat_template(
                messages,
                tools=tools,
                chat_template=chat_template if chat_template is not None else _pick_template(self.chat_template, tools),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except jinja2.TemplateError as e:  # includes the template's own raise_exception(...)
            raise ChatTemplateError(f"chat template error: {e}") from e

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


def load_adapter_tokenizer(adapter_dir: str | Path, base: ModelTokenizer) -> ModelTokenizer:
    """The tokenizer for requests to an adapter: its own tokenizer files when it has them, else the base
    tokenizer with the adapter's own chat template when it has one, else `base` itself."""
    adapter_dir = Path(adapter_dir)
    if any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        return ModelTokenizer.from_dir(adapter_dir)
    template = read_chat_template(adapter_dir)
    return base.with_chat_template(template) if template else base


def read_chat_template(path: str | Path) -> str | dict[str, str] | None:
    """The chat template stored in a directory, in either era's layout: chat_template.jinja plus named ones
    in additional_chat_templates/NAME.jinja (current transformers), else tokenizer_config.json's (older)."""
    path = Path(path)
    jinja_file = path / "chat_template.jinja"
    named = {f.stem: f.read_text(encoding="utf-8") for f in sorted(path.glob("additional_chat_templates/*.jinja"))}
    if jinja_file.is_file():
        default = jinja_file.read_text(encoding="utf-8")
        return {"default": default, **named} if named else default
    if named:
        return named
    config = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(config, list):  # the on-disk form of several named templates
        return {t["name"]: t["template"] for t in config}
    return config or None


def _pick_template(template: str | dict[str, str], tools: list[dict] | None) -> str:
    if isinstance(template, str):
        return template
    if tools and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise ChatTemplateError(f"the model has several chat templates {sorted(template)} and none is named 'default'")


@lru_cache(maxsize=256)
def _load(path: str) -> ModelTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
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
    return {eos} if isinstance(eos, int) else set(eos)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
