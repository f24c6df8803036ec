"""The OpenAI request bodies the server accepts, as pydantic models, and OpenAI-style errors.

Types are strict (no coercion: `"5"` is not an integer, `true` is not a number). Fields the API
defines but kuberft does not implement are accepted only with their neutral value (so clients
that always send them work) and otherwise rejected naming the field; unknown fields are rejected
too (a typo such as `max_token` would otherwise be silently ignored). The checks that span
fields and vLLM's extensions (`best_of`, `stop_token_ids`, `ignore_eos`, `prompt_logprobs`)
follow vLLM's rules and wording."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_LOGPROBS = 20
"""The most top logprobs a request may ask per token (vLLM's default `max_logprobs`)."""
MAX_SEQUENCES = 16384
"""The most samples (`n`, `best_of`) of one prompt (vLLM's default `VLLM_MAX_N_SEQUENCES`)."""
INT64 = (-(2**63), 2**63 - 1)


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FieldError(ValueError):
    """A check across fields that names the field to blame (the error's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        return ApiError(400, str(cause), param=cause.param)
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif param:
        message = f"{param}: {message}"
    return ApiError(400, message, param=param)


STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class JsonSchema(BaseModel):
    """`response_format.json_schema`: the schema the output follows. It is always enforced
    (`strict` is accepted, as by vLLM, and changes nothing)."""

    model_config = STRICT
    name: str
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """`text` (unconstrained), `json_object` (any JSON object) or `json_schema`."""

    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise FieldError("response_format.json_schema", "response_format.json_schema is given exactly when type is json_schema")
        return self


class _Request(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=MAX_SEQUENCES)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extensions
    best_of: Optional[int] = Field(default=None, ge=1, le=MAX_SEQUENCES)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    prompt_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("penalties are not supported (they would make speculative output differ); use 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        """An explicit null means the default, as the API has it (clients send them)."""
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "Stream options can only be defined when `stream=True`.")
        if self.temperature == 0 and self.n > 1:
            raise FieldError("n", f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.best_of is not None:
            if self.temperature == 0 and self.best_of > 1:
                raise FieldError("best_of", f"best_of must be 1 when using greedy sampling, got {self.best_of}.")
            if self.best_of < self.n:
                raise FieldError("best_of", f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
            if self.stream and self.best_of > self.n:
                raise FieldError("best_of", "best_of > n cannot be streamed: the best n are known only at the end")
        if self.stream and self.prompt_logprobs:
            raise FieldError("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.")
        if self.ignore_eos and self.constrained:
            raise FieldError("ignore_eos", "ignore_eos cannot be used with a response_format: the output ends where its grammar does")
        return self

    @property
    def constrained(self) -> bool:
        """Whether the output follows a grammar (`response_format` other than text)."""
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def samples(self) -> int:
        """Sequences generated per prompt (`best_of`, else `n`); the `n` best are returned."""
        return self.best_of or self.n

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _supported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per choice: a text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; any role goes to the chat template as it is (as in vLLM), `developer` as `system`."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None

    @model_validator(mode="after")
    def _supported(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.")
        return self

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
