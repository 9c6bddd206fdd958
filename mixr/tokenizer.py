"""Tokenizer and chat templates for HF checkpoints, matching transformers 5's `TokenizersBackend`.

Only `tokenizer.json` checkpoints are supported (every DeepSeek/Qwen/Llama-3 release ships one).
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens transformers knows; any other `*_token` key in tokenizer_config.json is a
# model-specific named token (e.g. `image_token`) and is treated the same way.
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning can come under; transformers fills `reasoning_content` and `thinking` from them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ValueError):
    """A tokenizer file is malformed, or the tokenizer lacks what was asked of it (e.g. a chat template)."""


class Tokenizer:
    """A `tokenizers` backend plus what transformers reads around it: special tokens, chat templates and the
    stop tokens of generation_config.json. Build it with `Tokenizer.from_dir`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str],
        extra_special_tokens: list[str] | None = None,
        chat_templates: dict[str, str] | None = None,
        generation_eos_ids: list[int] | None = None,
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        name: str = "",
    ):
        self._backend = backend
        self.special_tokens_map = dict(special_tokens)
        self.extra_special_tokens = list(extra_special_tokens or [])
        self.chat_templates = dict(chat_templates or {})
        self.model_max_length = model_max_length
        self.name = name
        # transformers skips the clean-up for BPE models: it would eat real spaces before punctuation.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

        # Like transformers, make sure every named special token exists and is marked special in the backend,
        # so that it is never split and decode(skip_special_tokens=True) drops it.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        named = [*self.special_tokens_map.values(), *self.extra_special_tokens]
        missing = dict.fromkeys(t for t in named if t not in present)
        backend.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])

        eos_id = self.eos_token_id
        self.stop_token_ids: set[int] = {i for i in [eos_id, *(generation_eos_ids or [])] if i is not None}

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json`, `tokenizer_config.json` and the optional `chat_template.jinja`,
        `special_tokens_map.json` and `generation_config.json` from a checkpoint directory."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: mixr needs a `tokenizers` tokenizer.json "
                "(slow sentencepiece/tiktoken-only checkpoints are not supported)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{tokenizer_file}: cannot be parsed: {e}") from e
        # transformers resets these per call (no padding, no truncation unless asked); encode() never pads.
        backend.no_padding()
        backend.no_truncation()

        config = _read_json(path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # Legacy checkpoints keep their special tokens here; transformers lets it override the config.
            config |= _read_json(path / "special_tokens_map.json")
        cfg_file = path / "tokenizer_config.json"

        # Added tokens that only tokenizer_config.json knows about are added to the backend, as transformers does.
        decoder = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
        added = [_added_token(t, cfg_file, "added_tokens_decoder") for _, t in decoder]
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_tokens([t for t in added if t.content not in present])

        special_tokens = {}
        for key, value in config.items():
            model_specific = isinstance(value, str) or (isinstance(value, dict) and "content" in value)
            if (key in _SPECIAL_ATTRS and value is not None) or (key.endswith("_token") and model_specific):
                special_tokens[key] = _added_token(value, cfg_file, key).content
        # Order like transformers (standard names first), which all_special_ids follows.
        special_tokens = {k: special_tokens[k] for k in sorted(special_tokens, key=_special_order)}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # named model-specific tokens
            special_tokens |= {k: _added_token(v, cfg_file, k).content for k, v in extra.items()}
            extra = []
        extra = [_added_token(t, cfg_file, "extra_special_tokens").content for t in extra]

        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        generation_config = _read_json(path / "generation_config.json")
        eos = generation_config.get("eos_token_id")
        generation_eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not all(isinstance(i, int) for i in generation_eos_ids):
            raise TokenizerError(f"{path / 'generation_config.json'}: eos_token_id must be an int or a list of ints")

        max_len = config.get("model_max_length")
        return cls(
            backend,
            special_tokens,
            extra_special_tokens=extra,
            chat_templates=_read_chat_templates(path, config),
            generation_eos_ids=generation_eos_ids,
            # Checkpoints without a limit store a 1e30 sentinel.
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e18 else None,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name=str(path),
        )

    # special tokens

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("pad_token"))

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens])
        return [self._backend.token_to_id(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, tokenizer.json's post-processor adds bos/eos:
        transformers 5 ignores `add_bos_token` in tokenizer_config.json when a tokenizer.json exists."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as transformers' `decode`."""
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def decode_stream(self, skip_special_tokens: bool = True) -> "DecodeStream":
        return DecodeStream(self, skip_special_tokens)

    # chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template exactly as transformers'
        `apply_chat_template` does; with `tokenize`, return the ids (the template writes bos itself, so no
        special tokens are added)."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TypeError("tools must be JSON schemas (dicts)")
        template = self._chat_template(tools)
        text = _compile_template(template).render(
            messages=[_prepare_message(m) for m in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _chat_template(self, tools: list | None) -> str:
        templates = self.chat_templates
        if not templates:
            raise TokenizerError(
                f"tokenizer {self.name!r} has no chat template (none in tokenizer_config.json, "
                "no chat_template.jinja)"
            )
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise TokenizerError(f"tokenizer {self.name!r} has several chat templates and none is named 'default': "
                             f"{sorted(templates)}")


class DecodeStream:
    """Incremental detokenizer: `step(token_id)` returns the text that token adds (possibly ""), so that
    the deltas join to `tokenizer.decode(ids)`.

    Decodes a short window (tokens since the previous emission) twice, without and with the new tokens,
    and emits the difference; decoding in context keeps leading spaces and multi-token characters right.
    Text ending in an incomplete UTF-8 character is held back until the character completes, so a stream
    cut mid-character lacks the trailing U+FFFD that `decode` would show.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: tokens from the prefix offset on
        self._read = 0  # window[:read] was emitted already

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        # Hold back while a multi-byte character is incomplete (it decodes to U+FFFD), or when the token adds
        # no text (a skipped special token).
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _added_token(value: Any, file: Path, key: str) -> tokenizers.AddedToken:
    """A token given as a string or as an AddedToken dict ({"content": ..., "special": ..., ...})."""
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
        return tokenizers.AddedToken(value["content"], **fields)
    raise TokenizerError(f"{file}: {key} must be a string or a dict with a 'content' string, got {value!r}")


def _special_order(key: str) -> int:
    return _SPECIAL_ATTRS.index(key) if key in _SPECIAL_ATTRS else len(_SPECIAL_ATTRS)


def _read_chat_templates(path: Path, config: dict[str, Any]) -> dict[str, str]:
    # transformers 5 saves templates as .jinja files; when present they replace tokenizer_config's entirely.
    templates = {}
    if (file := path / "chat_template.jinja").is_file():
        templates["default"] = file.read_text(encoding="utf-8")
    if (extra_dir := path / "additional_chat_templates").is_dir():
        templates |= {f.stem: f.read_text(encoding="utf-8") for f in sorted(extra_dir.glob("*.jinja"))}
    if templates:
        return templates
    template = config.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in template):
        return {t["name"]: t["template"] for t in template}
    raise TokenizerError(
        f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list of {{name, template}} dicts"
    )


def _prepare_message(message: dict[str, Any]) -> dict[str, Any]:
    # As transformers: keys set to None are dropped (OpenAI-style `content=None` would render "None"), and
    # reasoning given under any of its names is visible as both `reasoning_content` and `thinking`.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class _GenerationTag(jinja2.ext.Extension):
    # Some HF templates mark assistant text with {% generation %} for training masks; it renders as its body.
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, ') which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    # The same environment as transformers' `_cached_compile_jinja_template`: templates come from the Hub
    # and are untrusted, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _clean_up_tokenization(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text
