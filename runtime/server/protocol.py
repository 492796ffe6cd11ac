"""Request bodies of the OpenAI API (the fields we serve), and their translation into SamplingParams.

Types (and the choice count) are checked by pydantic; generation settings by SamplingParams and the engine, so each
rule lives in one place.
Unknown fields are ignored, as OpenAI clients send extras (user, metadata, ...) that do not affect generation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.engine.sampling_params import MAX_LOGPROBS, InvalidRequestError, SamplingParams

MAX_CHOICES = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM/SGLang)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension, used by load generators to force output length
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        choice: int) -> SamplingParams:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise InvalidRequestError(name, "is not supported by this server (only 0)")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            # Choices of one request must differ, so each gets its own seed derived from the request's.
            seed=None if self.seed is None else self.seed + choice,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # tool calls, names ... pass through to the chat template
    role: str
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # content parts: only text is served
            texts = []
            for i, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"messages.content.{i}", "only text content parts are supported")
                texts.append(part["text"])
            message["content"] = "".join(texts)
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError("top_logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    return_tokens_as_token_ids: bool = False  # extension (vLLM): logprobs name tokens "token_id:N"
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token-id lists."""
        if self.suffix is not None:
            raise InvalidRequestError("suffix", "is not supported by this server")
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)
