"""Request bodies of the server's endpoints (pydantic v2, strict: ``"1"`` is not an int and ``1`` is
not a bool), with field names and defaults as the reference system's ``/generate`` and the OpenAI
API have them.

Unknown fields are errors (a typo such as ``max_token`` must not be silently ignored), except that an
unknown field sent as ``null`` is dropped: some clients send every optional field they know of.
Range checks (temperature >= 0, top_p in (0, 1], ...) are the engine's ``SamplingParams`` checks,
so the server and the library accept exactly the same values.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            return {k: v for k, v in data.items() if k in known or v is not None}
        return data


Stop = Optional[Union[str, list[str]]]


# -- /generate (the reference system's native API) ----------------------------------------------
class GenerateSamplingParams(_Strict):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: Stop = None
    stop_token_ids: Optional[list[int]] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    sampling_seed: Optional[int] = Field(None, description="seed of the sampler; 42 when absent")


class GenerateRequest(_Strict):
    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Optional[Union[GenerateSamplingParams, list[GenerateSamplingParams]]] = None
    rid: Optional[Union[str, list[str]]] = None
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, description="-1: output logprobs only; k >= 0: also the prompt's from k")
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False


# -- OpenAI-compatible ---------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAICommon(_Strict):
    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    # extras (the names vLLM and SGLang use)
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True


class CompletionRequest(_OpenAICommon):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_OpenAICommon):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
