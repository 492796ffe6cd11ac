"""Per-request generation settings, validated once where a request enters the engine."""

from __future__ import annotations

from dataclasses import dataclass

# Upper bound for `logprobs` / `top_logprobs` / prompt logprobs alternatives per token.
MAX_LOGPROBS = 20


class InvalidRequestError(ValueError):
    """A request the engine cannot serve; `param` names the offending field (answered with HTTP 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = no top-k truncation
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its logprob plus this many alternatives (None = off)
    prompt_logprobs: int | None = None  # same, for every prompt token after the first
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError("top_k", f"must be -1, 0 (off) or a positive count, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(name, f"must be between 0 and {MAX_LOGPROBS}, got {value}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequestError("seed", f"must fit in 64 bits, got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
