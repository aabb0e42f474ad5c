"""OpenAI's wire format: requests, responses, stream chunks and the one error body.

The models mirror OpenAI's API reference (completions, chat completions, models). Ranges
are the gpt2 model's (docs/API.md), so a value Triton would refuse is refused here first,
naming the OpenAI field. Fields that would change results and that GPT-2 cannot honour
(tools, logprobs, penalties, structured output) are refused rather than ignored; an
unknown field is refused as OpenAI does ("Unrecognized request argument").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from gpt2_triton import names
from gpt2_triton.request import MAX_STOP_WORD_CHARS, MAX_STOP_WORDS
from gpt2_triton.sampling import MAX_SEED

INT32_MAX = names.INTEGER_RANGES["INT32"][1]  # the gpt2 model's integer inputs are INT32
# seed s becomes the model's s + 1 (its 0 means "a fresh random seed"): serving_engine
MAX_OPENAI_SEED = MAX_SEED - 1

MAX_CHOICES = 16  # n: choices run as separate requests; the batch holds 16 by default


def _encodable(value: str) -> str:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text holds."""
    at = names.lone_surrogate_at(value)
    if at is not None:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate (U+{ord(value[at]):04X}) at character {at}"
        )
    return value


Text = Annotated[str, AfterValidator(_encodable)]  # what reaches the model as text


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's schema makes the optional fields nullable, and its SDK sends null for
        an argument passed as None: a null optional field is its default (n, stream, echo,
        min_tokens, ... as vLLM takes them); a required one stays an error."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }


# --- errors ------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- requests ----------------------------------------------------------------------------
class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingRequest(RequestModel):
    """What completions and chat completions share. None leaves the gpt2 default."""

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES, strict=True)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, strict=True)
    seed: int | None = Field(None, ge=0, le=MAX_OPENAI_SEED, strict=True)
    stop: Text | list[Text] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    # extensions (vLLM's names), gpt2 inputs of the same meaning
    top_k: int | None = Field(None, ge=0, le=INT32_MAX, strict=True)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False, strict=True)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX, strict=True)
    # accepted and ignored: they do not change the text
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # refused unless neutral: GPT-2's sampler has no such knob
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_words(cls, value):
        words = [value] if isinstance(value, str) else list(value or [])
        if len(words) > MAX_STOP_WORDS:
            raise ValueError(f"at most {MAX_STOP_WORDS} stop sequences, got {len(words)}")
        if any(len(w) > MAX_STOP_WORD_CHARS for w in words):
            raise ValueError(f"each stop sequence must be at most {MAX_STOP_WORD_CHARS} characters")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value:
            raise ValueError("is not supported (use repetition_penalty, in (0, 10])")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value):
        if value:
            raise ValueError("is not supported")
        return value

    @property
    def stop_words(self) -> tuple[str, ...]:
        words = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(w for w in words if w)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = Field(False, strict=True)
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _text_prompt(cls, value):
        if isinstance(value, list) and not all(isinstance(p, str) for p in value):
            raise ValueError("token ids are not supported: send the prompt as text")
        if isinstance(value, list) and not value:
            raise ValueError("at least one prompt is required")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    # What an assistant message read back from the SDK carries (a reply sent back as
    # history): accepted while empty, as nothing here produces them.
    refusal: None = None
    tool_calls: list[Any] | None = Field(None, max_length=0)
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = Field(None, max_length=0)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        if isinstance(value, list):
            kinds = {p.get("type") for p in value if isinstance(p, dict)} - {"text"}
            if None in kinds:
                raise ValueError("each content part needs its type ('text')")
            if kinds:  # named, rather than "Input should be a valid string"
                raise ValueError(f"only text parts are supported, not {sorted(map(str, kinds))}")
        return value

    @model_validator(mode="after")
    def _content_for_its_role(self):
        # an assistant's may be missing (tool calls); OpenAI refuses an empty list of parts
        if self.role != "assistant" and (self.content is None or self.content == []):
            raise ValueError(f"a {self.role} message needs its content")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX, strict=True)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value):
        if value:
            raise ValueError("tools are not supported: GPT-2 cannot call functions")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value):
        if value not in (None, "none"):
            raise ValueError("tools are not supported: only 'none' is accepted")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value and value.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field that set the length, to name it in an error."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


# --- responses ---------------------------------------------------------------------------
FinishReason = Literal["stop", "length"]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:
        # OpenAI's deltas carry only what changed: {"content": "..."}, {} on the last
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2-triton"
    max_model_len: int | None = None  # the context window (vLLM's field)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
