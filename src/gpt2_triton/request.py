"""A text-generation request, parsed and validated from named input arrays.

The input names and defaults are the TensorRT-LLM ensemble's (see ``names``). Each input
may arrive with any shape that holds the expected number of values (``[1]``, ``[1, 1]``),
since HTTP ``/generate``, gRPC clients and perf tools shape them differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gpt2_triton import names
from gpt2_triton.errors import RequestValidationError
from gpt2_triton.sampling import SamplingParams

MAX_STOP_WORDS = 16
MAX_STOP_WORD_CHARS = 256


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, cut to the room left
    stream: bool = False
    sampling: SamplingParams = SamplingParams()
    stop_words: tuple[str, ...] = ()
    exclude_input_in_output: bool = False
    min_length: int = 0  # EOS is not sampled before this many new tokens
    # outputs asked for on every streamed piece besides text_output (the return_* flags);
    # the final response carries every output whatever this holds
    outputs_on_every_piece: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestValidationError(f"{names.MAX_TOKENS} must be >= 1, got {self.max_tokens}")
        if self.min_length < 0 or (
            self.max_tokens is not None and self.min_length > self.max_tokens
        ):
            raise RequestValidationError(
                f"{names.MIN_LENGTH} must be in [0, {names.MAX_TOKENS}], got {self.min_length}"
            )
        if len(self.stop_words) > MAX_STOP_WORDS:
            raise RequestValidationError(
                f"{names.STOP_WORDS}: at most {MAX_STOP_WORDS} words, got {len(self.stop_words)}"
            )
        for word in self.stop_words:
            if len(word) > MAX_STOP_WORD_CHARS:
                raise RequestValidationError(
                    f"{names.STOP_WORDS}: each word at most {MAX_STOP_WORD_CHARS} characters"
                )

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray]) -> GenerationRequest:
        """Parse Triton-style inputs: name -> numpy array (BYTES as object arrays)."""
        if names.TEXT_INPUT not in inputs:
            raise RequestValidationError(f"{names.TEXT_INPUT} is required")
        return cls(
            prompt=text_value(inputs[names.TEXT_INPUT], names.TEXT_INPUT),
            max_tokens=scalar_value(inputs, names.MAX_TOKENS, int, None),
            stream=scalar_value(inputs, names.STREAM, bool, False),
            sampling=sampling_from_inputs(inputs),
            stop_words=stop_words_value(inputs.get(names.STOP_WORDS)),
            exclude_input_in_output=scalar_value(
                inputs, names.EXCLUDE_INPUT_IN_OUTPUT, bool, False
            ),
            min_length=scalar_value(inputs, names.MIN_LENGTH, int, 0),
            outputs_on_every_piece=frozenset(
                output
                for flag, output in names.OUTPUT_OF_RETURN_FLAG.items()
                if scalar_value(inputs, flag, bool, False)
            ),
        )


INPUTS = names.GPT2_INPUTS
# Request parameters Triton itself defines; anything else arrived as a misspelt input.
_TRITON_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}


def check_forward_rows(
    tokens: Sequence[Sequence[int]], max_rows: int, window: int, vocab_size: int = 0
) -> None:
    """A stateless forward's rows (the ``engine`` model's steps run by ``gpt2``): 1 to
    ``max_rows`` rows of 1 to ``window`` token ids in ``[0, vocab_size)`` (``vocab_size``
    0: not checked here)."""
    if not 1 <= len(tokens) <= max_rows:
        raise RequestValidationError(
            f"a forward takes 1 to {max_rows} rows (max_sequences), got {len(tokens)}"
        )
    for row, toks in enumerate(tokens):
        if not 1 <= len(toks) <= window:
            raise RequestValidationError(
                f"row {row} has {len(toks)} tokens: 1 to {window} (the context window)"
            )
        bad = [t for t in toks if t < 0 or (vocab_size and t >= vocab_size)]
        if bad:
            raise RequestValidationError(
                f"row {row}: token id {bad[0]} is outside the vocabulary"
                + (f" [0, {vocab_size})" if vocab_size else "")
            )


def check_parameters(parameters: Mapping[str, object]) -> None:
    """Refuse request parameters that are not Triton's own.

    Triton's HTTP ``/generate`` turns every JSON field that is not an input into a request
    parameter, so a misspelt ``max_token`` would otherwise be ignored without a word (gRPC
    refuses unknown inputs itself).
    """
    unknown = sorted(
        key for key in parameters if not key.startswith("triton_") and key not in _TRITON_PARAMETERS
    )
    if unknown:
        raise RequestValidationError(
            f"unknown input {', '.join(repr(k) for k in unknown)}; the inputs are "
            f"{', '.join(INPUTS)}"
        )


def sampling_from_inputs(inputs: Mapping[str, np.ndarray]) -> SamplingParams:
    """The sampling inputs shared by ``gpt2`` and the ``sampler`` model."""
    return SamplingParams(
        temperature=scalar_value(inputs, names.TEMPERATURE, float, names.DEFAULT_TEMPERATURE),
        top_k=scalar_value(inputs, names.TOP_K, int, names.DEFAULT_TOP_K),
        top_p=scalar_value(inputs, names.TOP_P, float, names.DEFAULT_TOP_P),
        repetition_penalty=scalar_value(
            inputs, names.REPETITION_PENALTY, float, names.DEFAULT_REPETITION_PENALTY
        ),
        seed=scalar_value(inputs, names.SEED, int, names.DEFAULT_SEED),
    )


def _one(array: np.ndarray, name: str):
    values = np.asarray(array).reshape(-1)
    if values.size != 1:
        raise RequestValidationError(f"{name} must hold exactly one value, got {values.size}")
    return values[0]


def text_value(array: np.ndarray, name: str) -> str:
    return _decode(_one(array, name), name)


def text_values(array: np.ndarray, name: str) -> list[str]:
    """Every element of a BYTES array, decoded."""
    return [_decode(value, name) for value in np.asarray(array).reshape(-1)]


def _decode(value, name: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestValidationError(f"{name} is not valid UTF-8: {exc.reason}") from None
    if isinstance(value, str):
        return value
    raise RequestValidationError(f"{name} must be a string (BYTES), got {type(value).__name__}")


def scalar_value(inputs: Mapping[str, np.ndarray], name: str, kind: type, default):
    if name not in inputs:
        return default
    value = _one(inputs[name], name)
    if isinstance(value, bytes | np.bytes_ | str):
        raise RequestValidationError(f"{name} must be a {kind.__name__}, got a string")
    if kind is bool:
        return bool(value)
    if kind is int:
        if isinstance(value, float | np.floating) and not float(value).is_integer():
            raise RequestValidationError(f"{name} must be an integer, got {value}")
        return int(value)
    return float(value)


def stop_words_value(array: np.ndarray | None) -> tuple[str, ...]:
    if array is None:
        return ()
    # "" means "none": clients of the TensorRT-LLM ensemble send it
    words = [w for w in text_values(array, names.STOP_WORDS) if w]
    return tuple(dict.fromkeys(words))
