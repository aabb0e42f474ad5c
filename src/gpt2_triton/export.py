"""Export a GPT-2 checkpoint to one ONNX file that serves both the prompt and decode steps.

Inputs: ``input_ids`` / ``position_ids`` ``(batch, sequence)``, ``attention_mask``
``(batch, past_sequence + sequence)`` and ``past_key_values.{i}.key|value``
``(batch, heads, past_sequence, head_dim)``; outputs ``logits`` ``(batch, vocab)`` for the
last position and ``present.{i}.key|value``. A prompt step passes an empty past
(``past_sequence`` = 0).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.torch_forward import kv_cache_module

log = logging.getLogger(__name__)

OPSET = 18

# Readable names for the symbolic dims torch.export invents ("s10"...), by input position.
_AXES = {
    "input_ids": ("batch", "sequence"),
    "attention_mask": ("batch", "total_sequence"),
    "position_ids": ("batch", "sequence"),
    "logits": ("batch", None),
}


def _example_inputs(shape: ModelShape):
    import torch

    # Past length > 1 and sequence > 1, all distinct, so the exporter specialises no axis.
    batch, seq, past = 2, 3, 5
    return (
        torch.ones(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        *[
            torch.zeros(batch, shape.num_heads, past, shape.head_dim)
            for _ in range(2 * shape.num_layers)
        ],
    )


def export_onnx(model, shape: ModelShape, path: Path, untie_lm_head: bool = False) -> None:
    """Write ``path`` (and nothing else) from a loaded ``GPT2LMHeadModel``.

    ``untie_lm_head`` gives the lm_head its own copy of the embedding matrix, so that int8
    quantization can quantize it (a weight shared with a Gather stays fp32).
    """
    import onnx
    import torch

    if untie_lm_head:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    module = kv_cache_module(model)
    dyn = torch.export.Dim.DYNAMIC
    tokens = {0: dyn, 1: dyn}
    dynamic_shapes = (
        tokens,
        tokens,
        tokens,
        tuple({0: dyn, 2: dyn} for _ in range(2 * shape.num_layers)),
    )
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            _example_inputs(shape),
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", "position_ids", *shape.past_names()],
            output_names=["logits", *shape.present_names()],
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    proto = onnx.load(str(path))
    _rename_axes(proto, shape)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _rename_axes(proto, shape: ModelShape) -> None:
    axes = dict(_AXES)
    for name in shape.past_names():
        axes[name] = ("batch", None, "past_sequence", None)
    for name in shape.present_names():
        axes[name] = ("batch", None, "total_sequence", None)
    for value in list(proto.graph.input) + list(proto.graph.output):
        names = axes.get(value.name)
        if not names:
            continue
        for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=False):
            if name and dim.HasField("dim_param"):
                dim.dim_param = name


def quantize_int8(fp32_untied: Path, out: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32_untied),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
    )
