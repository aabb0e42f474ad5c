"""Reading a Triton model's parsed ``config.pbtxt`` (the JSON the backend receives).

Plain dict handling, so the adapters' parsing is tested without a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpt2_triton.errors import Gpt2TritonError


class ModelConfigError(Gpt2TritonError):
    pass


def parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    raw = model_config.get("parameters") or {}
    return {key: value.get("string_value", "") for key, value in raw.items()}


def require(params: Mapping[str, str], key: str, model: str) -> str:
    value = params.get(key, "")
    if not value:
        raise ModelConfigError(
            f"model '{model}': parameter '{key}' is missing in config.pbtxt (a repository "
            "rendered by an older version: render it again with 'make repo')"
        )
    return value


def int_param(
    params: Mapping[str, str], key: str, model: str, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = require(params, key, model)
    try:
        value = int(raw)
    except ValueError:
        raise ModelConfigError(
            f"model '{model}': parameter '{key}' must be an integer, got {raw!r}"
        ) from None
    if value < minimum:
        raise ModelConfigError(f"model '{model}': parameter '{key}' must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ModelConfigError(f"model '{model}': parameter '{key}' must be <= {maximum}")
    return value


def is_decoupled(model_config: Mapping[str, Any]) -> bool:
    return bool((model_config.get("model_transaction_policy") or {}).get("decoupled"))
