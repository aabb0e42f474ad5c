"""The few numbers about a GPT-2 checkpoint that the engines and the server need."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int  # the context window: prompt + generated tokens never exceed it
    eos_token_id: int

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        return cls(
            num_layers=config.n_layer,
            num_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            vocab_size=config.vocab_size,
            max_positions=config.n_positions,
            eos_token_id=config.eos_token_id if config.eos_token_id is not None else -1,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def past_names(self) -> list[str]:
        """ONNX input names of the past key/values, layer by layer (key, value)."""
        return [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
