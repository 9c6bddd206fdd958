"""mixr.tokenizer against transformers' AutoTokenizer, on tokenizers built by mixr.tiny_tokenizer."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from mixr.tiny_tokenizer import BOS, DEEPSEEK_R1_TEMPLATE, build_tokenizer
from mixr.tokenizer import DecodeStream, Tokenizer, TokenizerError

transformers.logging.set_verbosity_error()

# Qwen/ChatML style, saved transformers-5 style as chat_template.jinja: exercises trim_blocks and
# lstrip_blocks (the tools section), loop.last, namespace,
# raise_exception, tojson (non-ASCII and HTML characters must not be escaped), {% generation %}, a template
# kwarg, and reasoning given as `reasoning` but read as `reasoning_content`.
CHATML_TEMPLATE = """\
{%- set ns = namespace(system='') %}
{%- if messages[0].role == 'system' %}{% set ns.system = messages[0].content %}{% endif %}
{%- if tools %}
<|im_start|>system
{{ ns.system }}

# Tools
<tools>
    {% for tool in tools %}
{{ tool | tojson }}
    {% endfor %}
</tools><|im_end|>
{% elif ns.system %}
{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant'] %}
{{- raise_exception('Invalid role: ' + message.role) }}
{%- elif message.role != 'system' %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.role == 'assistant' %}
{%- generation %}
{%- if message.reasoning_content is defined and enable_thinking | default(true) %}
{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{%- if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}
{{- message.content + '<|im_end|>' }}
{%- endgeneration %}
{%- else %}
{{- message.content + '<|im_end|>' }}
{%- endif %}
{%- if not loop.last %}{{ '\\n' }}{% endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '\\n<|im_start|>assistant\\n' }}
{%- if not enable_thinking | default(true) %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}
{%- endif %}
"""

TEXTS = [
    "Hello world",
    "12+35=47 and 100*3=300",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\n\n",
    "unicode: naïve café, 你好，世界 🙂👍🏽 ∑x²",
    f"special {BOS} inside <｜User｜>hi<｜Assistant｜>ok<｜end▁of▁sentence｜>",
    "<think>\nsome reasoning</think>the answer",
    "",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3? 你好 🙂"},
        {"role": "assistant", "content": "<think>easy</think>6", "reasoning": "easy", "tool_calls": None},
        {"role": "user", "content": "Thanks."},
    ],
    [
        {"role": "system", "content": "First system."},
        {"role": "system", "content": "Second system."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "compare",
            "description": "Is a < b & 'c' \"d\"? 比较",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        },
    }
]


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("r1")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def r1(r1_dir):
    return Tokenizer.from_dir(r1_dir), AutoTokenizer.from_pretrained(r1_dir)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatml")
    # tokenizer_config.json keeps the R1 template: chat_template.jinja must take priority over it.
    build_tokenizer(d)
    (d / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)


def _hf_chat(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=False, **kwargs)


def _hf_chat_ids(hf, messages, **kwargs):
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


# encode / decode


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_transformers(r1, text, add_special_tokens):
    tok, hf = r1
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf(text, add_special_tokens=add_special_tokens)["input_ids"]
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_bos_from_post_processor(r1):
    tok, _ = r1
    assert tok.encode("hi")[0] == tok.bos_token_id == 0
    assert tok.bos_token_id not in tok.encode("hi", add_special_tokens=False)
    text = "any text ✓ 🙂 \x00 \u200b"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: everything round-trips


def test_add_bos_token_flag_is_ignored_like_transformers(tmp_path):
    # transformers 5 drops add_bos_token when a tokenizer.json exists: only its post-processor adds bos.
    build_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))["add_bos_token"] is True
    assert tok.encode("hi") == hf("hi")["input_ids"] == tok.encode("hi", add_special_tokens=False)


def test_special_token_attributes_match_transformers(r1):
    tok, hf = r1
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token)
    assert tok.bos_token_id == hf.bos_token_id and tok.eos_token_id == hf.eos_token_id
    assert tok.pad_token_id == hf.pad_token_id
    assert tok.vocab_size == len(tok) == len(hf) <= 512
    assert tok.all_special_ids == hf.all_special_ids
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.stop_token_ids == {tok.eos_token_id}
    for t in ("<think>", "</think>", "<｜User｜>", "<｜Assistant｜>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1


def test_special_tokens_added_like_transformers(tmp_path):
    # A pad token missing from the vocab, a model-specific *_token and a legacy special_tokens_map.json with an
    # eos that is an ordinary vocab token: transformers adds/marks them all as special tokens.
    build_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config |= {"pad_token": "<pad>", "image_token": "<img>"}
    del config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    special_map = {"eos_token": {"content": ".", "normalized": False}, "additional_special_tokens": ["<extra>"]}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    tok, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(hf)
    assert tok.all_special_ids == hf.all_special_ids
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == (".", hf.eos_token_id, hf.pad_token_id)
    text = "a <pad> b <img> c <extra> d. e"
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_stop_token_ids_from_generation_config(r1_dir, tmp_path):
    shutil.copytree(r1_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == {1, 5}
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 7}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == {1, 7}


# chat templates


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_r1_chat_template_matches_transformers(r1, conversation, add_generation_prompt):
    tok, hf = r1
    text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == _hf_chat(hf, conversation, add_generation_prompt=add_generation_prompt)
    ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == _hf_chat_ids(hf, conversation, add_generation_prompt=add_generation_prompt)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # the template's bos, and only it


def test_r1_template_output(r1):
    tok, _ = r1
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text == (
        f"{BOS}<｜User｜>What is 2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜><｜User｜>And 3+3? 你好 🙂"
        "<｜Assistant｜>6<｜end▁of▁sentence｜><｜User｜>Thanks.<｜Assistant｜><think>\n"
    )
    assert tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False).startswith(
        f"{BOS}First system.\n\nSecond system.<｜User｜>hi"
    )
    assert tok.chat_templates == {"default": DEEPSEEK_R1_TEMPLATE}


@pytest.mark.parametrize("conversation", CONVERSATIONS[:2])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"tools": TOOLS}, {"enable_thinking": False}])
def test_jinja_file_template_matches_transformers(chatml, conversation, add_generation_prompt, kwargs):
    tok, hf = chatml
    text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
    assert text == _hf_chat(hf, conversation, add_generation_prompt=add_generation_prompt, **kwargs)
    assert text.startswith("<|im_start|>")  # chat_template.jinja, not tokenizer_config.json's R1 template
    ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    assert ids == _hf_chat_ids(hf, conversation, add_generation_prompt=add_generation_prompt, **kwargs)


def test_jinja_file_template_features(chatml):
    tok, _ = chatml
    with_tools = tok.apply_chat_template(CONVERSATIONS[0], tools=TOOLS)
    assert "Is a < b & 'c' \\\"d\\\"? 比较" in with_tools  # tojson: no HTML escaping, no \u escapes
    text = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False)
    assert "<think>\neasy\n</think>\n\n<think>easy</think>6" in text  # `reasoning` read as reasoning_content
    assert "None" not in text and text.endswith("<|im_end|>")  # None keys dropped; loop.last


def test_raise_exception_in_template(chatml):
    tok, hf = chatml
    bad = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]
    with pytest.raises(jinja2.TemplateError, match="Invalid role: wizard"):
        tok.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="Invalid role: wizard"):
        _hf_chat(hf, bad, add_generation_prompt=True)


def test_named_chat_templates_in_config(r1_dir, tmp_path):
    shutil.copytree(r1_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for kwargs in ({}, {"tools": TOOLS}):
        assert tok.apply_chat_template(CONVERSATIONS[0], **kwargs) == _hf_chat(hf, CONVERSATIONS[0], **kwargs)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "[system]You are terse.[user]What is 2+2?"


def test_no_chat_template(r1_dir, tmp_path):
    shutil.copytree(r1_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="chat_template is not set"):
        _hf_chat(hf, CONVERSATIONS[0])


# streaming detokenization


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    stream = tok.decode_stream(skip_special_tokens=skip_special_tokens)
    deltas = []
    for i in ids:
        deltas.append(stream.step(i))
        assert len(stream._ids) <= 12  # a bounded window, not the whole sequence
    return deltas


@pytest.mark.parametrize("text", TEXTS + ["中文测试，混合 English 与 emoji 🙂🚀👍🏽 and more 漢字"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_concatenates_to_decode(r1, text, skip_special_tokens):
    tok, _ = r1
    ids = tok.encode(text)
    deltas = _stream(tok, ids, skip_special_tokens)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in d for d in deltas)


def test_decode_stream_holds_incomplete_characters(r1):
    tok, _ = r1
    ids = tok.encode("你好🙂", add_special_tokens=False)
    # The tiny vocab splits these characters into bytes, so single tokens decode to partial UTF-8.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = _stream(tok, ids)
    assert deltas.count("") > 0 and "".join(deltas) == "你好🙂"
    assert [d for d in deltas if d] == ["你", "好", "🙂"]


def test_decode_stream_keeps_metaspace_spaces(tmp_path):
    # A SentencePiece-style tokenizer: its decoder drops the leading space of the first token, so decoding
    # token by token would lose every space; decoding in a window must not.
    backend = BackendTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    backend.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 20, trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json at all
    ids = tok.encode("the cat sat on a mat")
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "the cat sat on a mat"
    assert isinstance(tok.decode_stream(), DecodeStream)


# errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("file", "content"),
    [("tokenizer_config.json", "{not json"), ("tokenizer_config.json", "[1, 2]"), ("tokenizer.json", '{"model": 3}'),
     ("generation_config.json", '{"eos_token_id": "x"}')],
)
def test_malformed_files(r1_dir, tmp_path, file, content):
    shutil.copytree(r1_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / file).write_text(content)
    with pytest.raises(TokenizerError, match=file):
        Tokenizer.from_dir(tmp_path)


def test_malformed_special_token(r1_dir, tmp_path):
    shutil.copytree(r1_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["eos_token"] = 7
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: eos_token"):
        Tokenizer.from_dir(tmp_path)


# tiny tokenizer


def test_build_tokenizer_is_fast_and_light(tmp_path):
    start = time.perf_counter()
    build_tokenizer(tmp_path, vocab_size=300, corpus=["one two three", "4+5=9"] * 10)
    assert time.perf_counter() - start < 2.0
    assert len(Tokenizer.from_dir(tmp_path)) <= 300
    # mixr builds its demo checkpoint with it at run time, where transformers must not be needed.
    code = "import sys, mixr.tiny_tokenizer; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_build_tokenizer_is_deterministic(r1_dir, tmp_path):
    build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (r1_dir / name).read_bytes()
