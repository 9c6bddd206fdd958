"""OpenAI request bodies, validated strictly (a string is not a number), and OpenAI's error object.

Fields OpenAI accepts and mixr ignores (user, metadata, store, service_tier, ...) are dropped; fields whose meaning
mixr cannot honour (tools, logit_bias, echo, suffix, json_schema) are rejected rather than silently ignored.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64 = 2**63


class APIError(Exception):
    """An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = False


class ResponseFormat(_Body):
    # json_object is accepted but not enforced (no constrained decoding yet); json_schema is refused
    type: Literal["text", "json_object"]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string, or a list of {"type": "text", "text": ...} parts
    name: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            parts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                parts.append(part["text"])
            return "".join(parts)
        raise ValueError("must be a string or a list of text parts")

    def for_template(self) -> dict:
        msg = {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        return msg


class _Sampling(_Body):
    """The fields both endpoints share. top_k, min_p, repetition_penalty and ignore_eos are vLLM's extensions."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    max_tokens: int | None = Field(None, ge=1)
    stop: Any = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    ignore_eos: bool | None = False
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > 16 or not all(stops):
            raise ValueError("takes at most 16 strings, none of them empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> None:
        if v:
            raise ValueError("not supported")
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list | None = None
    tool_choice: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> None:
        if v:
            raise ValueError("not supported (mixr does not parse tool calls yet)")
        return None


class CompletionRequest(_Sampling):
    prompt: Any  # a string or a list of token ids (or a list holding one of those)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if isinstance(v, list) and v and all(isinstance(t, (str, list)) for t in v):
            raise ValueError("batched prompts are not supported: send one prompt per request")
        raise ValueError("must be a string or a non-empty list of token ids")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool:
        if v:
            raise ValueError("not supported")
        return False

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("not supported")
        return None
