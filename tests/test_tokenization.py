import json
import shutil

import pytest
from transformers import AutoTokenizer

from launcher.tiny_model import CORPUS, build_tiny_model
from router.adapter_files import read_adapter_files
from router.tokenization import ChatTemplateError, ModelTokenizer, load_adapter_tokenizer

INST_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)
TOOLS_TEMPLATE = "{% for t in tools %}<tool>{{ t['name'] }}</tool>{% endfor %}{{ messages[-1]['content'] }}"

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
        {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
        {"role": "assistant", "content": "None, arr!"},
        {"role": "user", "content": "Größe, 東京 🙂 Привет"},
    ],
]


def adapter_tokenizer(path, base: ModelTokenizer) -> ModelTokenizer:
    """The tokenizer the registry builds for the adapter directory `path` (its own root)."""
    return load_adapter_tokenizer(read_adapter_files(path, path), base)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    base = build_tiny_model(root / "base", "llama")
    bare = build_tiny_model(root / "bare", "llama", chat_template=False)
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))

    # An adapter that ships its own tokenizer files and its own template (in tokenizer_config.json).
    own = root / "adapter_own"
    own.mkdir()
    shutil.copy(base / "tokenizer.json", own / "tokenizer.json")
    config = json.loads((base / "tokenizer_config.json").read_text())
    (own / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": INST_TEMPLATE}))
    (own / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base)}))

    # An adapter that ships only a chat_template.jinja, and one that ships no tokenizer material at all.
    template_only = root / "adapter_template_only"
    template_only.mkdir()
    (template_only / "chat_template.jinja").write_text(INST_TEMPLATE)
    plain = root / "adapter_plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text("{}")
    return {"base": base, "bare": bare, "own": own, "template_only": template_only, "plain": plain}


def test_encode_decode_match_transformers(dirs):
    tok = ModelTokenizer.from_dir(dirs["base"])
    hf = AutoTokenizer.from_pretrained(dirs["base"])
    for text in [*CORPUS, "", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.vocab_size == len(hf)


def test_tokenize_with_offsets(dirs):
    tok = ModelTokenizer.from_dir(dirs["base"])
    text = "Hello Größe 🙂 world"
    pieces = tok.tokenize_with_offsets(text)
    assert [i for i, *_ in pieces] == tok.encode(text)
    assert all(piece == text[a:b] and 0 <= a <= b <= len(text) for _, piece, a, b in pieces)
    assert pieces[-1][3] == len(text)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids_match_transformers(dirs, messages, add_generation_prompt):
    tok = ModelTokenizer.from_dir(dirs["base"])
    hf = AutoTokenizer.from_pretrained(dirs["base"])
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert tok.has_chat_template


def test_model_without_template_raises_clear_error(dirs):
    tok = ModelTokenizer.from_dir(dirs["bare"])
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template.*/v1/completions"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_template_error_becomes_chat_template_error(dirs):
    tok = ModelTokenizer.from_dir(dirs["base"]).with_chat_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_eos_ids_include_generation_config(dirs):
    assert ModelTokenizer.from_dir(dirs["bare"]).eos_token_ids == {0, 2}
    assert ModelTokenizer.from_dir(dirs["base"]).eos_token_ids == {2}


def test_from_dir_is_cached(dirs):
    assert ModelTokenizer.from_dir(dirs["base"]) is ModelTokenizer.from_dir(str(dirs["base"]) + "/")


def test_adapter_with_own_tokenizer_and_template(dirs):
    base = ModelTokenizer.from_dir(dirs["base"])
    tok = adapter_tokenizer(dirs["own"], base)
    assert tok is not base
    hf = AutoTokenizer.from_pretrained(dirs["own"])
    messages = CONVERSATIONS[1]
    ids = tok.apply_chat_template(messages)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids).startswith("You are a friendly")
    assert ids != base.apply_chat_template(messages)


def test_adapter_with_template_only_uses_base_tokenizer(dirs):
    base = ModelTokenizer.from_dir(dirs["base"])
    tok = adapter_tokenizer(dirs["template_only"], base)
    assert tok.hf is base.hf
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == base.encode("[INST] hi [/INST]")
    assert adapter_tokenizer(dirs["plain"], base) is base


def test_named_templates_pick_tool_use_with_tools(dirs):
    tok = ModelTokenizer.from_dir(dirs["base"]).with_chat_template(
        {"default": INST_TEMPLATE, "tool_use": TOOLS_TEMPLATE}
    )
    messages = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(messages) == "[INST] hi [/INST]"
    assert tok.render_chat(messages, tools=[{"name": "add"}]) == "<tool>add</tool>hi"


def test_adapter_with_named_templates_in_current_layout(dirs, tmp_path):
    """Current transformers saves named templates as additional_chat_templates/NAME.jinja."""
    hf = AutoTokenizer.from_pretrained(dirs["base"])
    hf.chat_template = {"default": INST_TEMPLATE, "tool_use": TOOLS_TEMPLATE}
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # an adapter that ships only its templates
    tok = adapter_tokenizer(tmp_path, ModelTokenizer.from_dir(dirs["base"]))
    assert tok.chat_template == {"default": INST_TEMPLATE, "tool_use": TOOLS_TEMPLATE}
    assert tok.render_chat([{"role": "user", "content": "hi"}], tools=[{"name": "add"}]) == "<tool>add</tool>hi"


def test_cleanup_follows_transformers_decode(dirs, tmp_path):
    """clean_up_tokenization_spaces=True, as many older checkpoints say: transformers 5 skips it for BPE."""
    shutil.copytree(dirs["base"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    tok, hf = ModelTokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode("Hello . World , isn't it ?")
    assert not tok.clean_up_tokenization_spaces
    assert tok.decode_raw(ids) == hf.decode(ids, skip_special_tokens=True) == "Hello . World , isn't it ?"


def test_eos_ids_from_config_without_generation_config(dirs, tmp_path):
    shutil.copytree(dirs["base"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 7]}))
    assert ModelTokenizer.from_dir(tmp_path).eos_token_ids == {2, 7}
