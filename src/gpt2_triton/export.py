"""Export a GPT-2 checkpoint to one ONNX file that serves both the prompt and decode steps.

Inputs: ``input_ids`` / ``position_ids`` ``(batch, sequence)``, ``attention_mask``
``(batch, past_sequence + sequence)`` and ``past_key_values.{i}.key|value``
``(batch, heads, past_sequence, head_dim)``; outputs ``logits`` ``(batch, vocab)`` for the
last position and ``present.{i}.key|value``. A prompt step passes an empty past
(``past_sequence`` = 0).

Opset 23 by default: the exporter then writes each attention as one ``Attention`` node
(ONNX Runtime runs it as one kernel) instead of ~15 small ops, which is what makes a
decode step cheap on CPU. TensorRT parses ``Attention`` from 10.14 on; for older
TensorRT export with ``opset=18``.
"""

from __future__ import annotations

import heapq
import logging
from pathlib import Path

from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.torch_forward import kv_cache_module
from gpt2_triton.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 23  # the default: fused Attention nodes
MIN_OPSET = 18  # the exporter's floor for this model (LayerNormalization, Split with sizes)
FUSED_ATTENTION_OPSET = 23

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


def export_onnx(
    model, shape: ModelShape, path: Path, untie_lm_head: bool = False, opset: int = OPSET
) -> None:
    """Write ``path`` (and nothing else) from a loaded ``GPT2LMHeadModel``.

    ``untie_lm_head`` gives the lm_head its own copy of the embedding matrix, so that int8
    quantization can quantize it (a weight shared with a Gather stays fp32).
    """
    import onnx
    import torch

    if not MIN_OPSET <= opset <= OPSET:
        raise ExportError(f"opset {opset} not supported: choose {MIN_OPSET} to {OPSET}")
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
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    proto = onnx.load(str(path))
    _rename_axes(proto, shape)
    onnx.checker.check_model(proto, full_check=True)
    save_model(proto, path)


# The fp16 export: what stays fp32 and why. LayerNorm squares activations for their
# variance (GPT-2's residual stream has outliers in the hundreds and beyond; 256 squared
# already exceeds fp16's 65504) and softmax exponentiates attention scores; both run in
# fp32 between explicit Cast nodes, so a
# strongly typed TensorRT (11 and later: precision comes from the graph's own types)
# builds them in fp32. The KV cache stays fp16 in and out (half the memory and traffic of
# every step); the logits leave in fp32, as the sampler reads them.
FP32_OPS = ("LayerNormalization", "Softmax")
FP32_OUTPUTS = ("logits",)


def export_fp16(fp32_path: Path, out: Path) -> None:
    """Write ``out``, an fp16 copy of the fp32 export ``fp32_path`` (see ``FP32_OPS``).

    A fused ``Attention`` node (opset 23) holds its softmax inside, where no Cast can
    reach: its ``softmax_precision`` attribute asks for fp32 instead (ONNX's own way).
    """
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # From the path: ONNX's shape inference then runs on the file, which also works for
    # checkpoints whose weights exceed protobuf's 2 GB.
    model = convert_float_to_float16(
        str(fp32_path), keep_io_types=list(FP32_OUTPUTS), op_block_list=list(FP32_OPS)
    )
    for node in model.graph.node:
        if node.op_type == "Attention":
            kept = [a for a in node.attribute if a.name != "softmax_precision"]
            del node.attribute[:]
            node.attribute.extend(
                [*kept, helper.make_attribute("softmax_precision", TensorProto.FLOAT)]
            )
    _drop_initializer_casts(model.graph)
    sort_topologically(model.graph)  # the converter appends its Casts at the end
    onnx.checker.check_model(model, full_check=True)
    save_model(model, out)


def _drop_initializer_casts(graph) -> None:
    """Undo two slips of the converter around the weights it keeps fp32 (LayerNorm's scale
    and bias): it records them in value_info as fp16, and so casts them to fp32 again.
    Initializers carry their own types: drop their value_info and those no-op casts."""
    from onnx import helper

    types = {t.name: t.data_type for t in graph.initializer}
    renamed = {}
    for node in list(graph.node):
        if node.op_type == "Cast" and node.input[0] in types:
            to = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
            if to == types[node.input[0]]:
                renamed[node.output[0]] = node.input[0]
                graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    value_info = [v for v in graph.value_info if v.name not in types and v.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def sort_topologically(graph) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (ONNX
    requires it; TensorRT's parser reads nodes in order). Keeps the given order where it
    is already valid."""
    nodes = list(graph.node)
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    waiting_on = [
        {producer[name] for name in node.input if name not in known and name in producer}
        for node in nodes
    ]
    consumers: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting_on):
        for dep in deps:
            consumers.setdefault(dep, []).append(i)
    ready = [i for i, deps in enumerate(waiting_on) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in consumers.get(i, ()):
            waiting_on[j].discard(i)
            if not waiting_on[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ExportError("the fp16 graph has a cycle or an input nothing produces")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def weights_file(path: Path) -> Path:
    """Where ``save_model`` puts the weights of ``path``: ``model.onnx`` -> ``model.onnx.data``."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def save_model(proto, path: Path) -> None:
    """Write the graph to ``path`` and every weight to one file beside it.

    ONNX Runtime then maps the weights from that file instead of parsing them out of the
    protobuf: the engine process holds one copy of them, not two (measured on the GPT-2
    small architecture: +485 MB after loading instead of +764 MB).
    """
    import onnx

    path = Path(path)
    weights_file(path).unlink(missing_ok=True)  # save appends to an existing data file
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=weights_file(path).name,
        size_threshold=1024,
    )


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


# MatMulNBits: ONNX Runtime's weight-only quantized MatMul. 8-bit weights in blocks of
# 256 along K (the largest block it supports: fewest scales to apply), symmetric, and
# accuracy level 4: activations are quantized to int8 per block at run time, so the
# inner products run as int8 dot products (AVX512-VNNI / AVX-VNNI where present).
INT8_BLOCK = 256
INT8_ACCURACY_LEVEL = 4
# What an int8 file holds, for exports made before a change to be rebuilt (export_onnx's
# stale check): 2 = the token embedding 8-bit too (GatherBlockQuantized).
INT8_FORMAT = 2


def quantize_int8(fp32_untied: Path, out: Path, vocab_size: int) -> bool:
    """int8 weights for every MatMul/Gemm with a constant weight, the lm_head included,
    and for the token embedding (``quantize_token_embedding``: its result is returned).

    Measured on the GPT-2 small architecture, 2 cores (decode step, batch 1 / 16):
    ``quantize_dynamic`` (MatMulInteger, per-channel) 8.0 ms / 43 ms; this 6.2 ms / 29 ms
    (both on the opset-18 graph; with fused attention, opset 23: 5.8 ms / 20 ms).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_untied))
    gemms_to_matmuls(model.graph)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=8,
        block_size=INT8_BLOCK,
        is_symmetric=True,
        accuracy_level=INT8_ACCURACY_LEVEL,
    )
    quantizer.process()
    quantized = quantizer.model.model
    constants = {init.name for init in quantized.graph.initializer}
    left = [
        n.name
        for n in quantized.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants
    ]
    if left:
        raise ExportError(f"int8 quantization left {len(left)} weight MatMuls in fp32: {left[:3]}")
    embedding = quantize_token_embedding(quantized, vocab_size)
    save_model(quantized, out)
    return embedding


def quantize_token_embedding(model, vocab_size: int) -> bool:
    """Rewrite the token-embedding lookup ``Gather(wte, ids)`` as ONNX Runtime's
    ``GatherBlockQuantized`` over 8-bit weights in blocks along the hidden size, symmetric
    (uint8 with the default zero point 128), in the int8 matmuls' blocks (llama.cpp's q8_0
    table is 8-bit too, in blocks of 32).

    The fp32 table is 154 MB for GPT-2; ONNX Runtime maps it from the weights file, so its
    pages become resident as prompts touch their rows: a server that has seen varied text
    holds all of it. 8-bit: 39 MB. The lm_head keeps its own 8-bit copy (MatMulNBits, which
    repacks its weights at load). False, the graph unchanged, when the table is not found,
    is shared with another node (still tied to the lm_head) or its hidden size takes no
    block of 16 or more."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    tables = {
        init.name: init
        for init in graph.initializer
        if len(init.dims) == 2 and init.dims[0] == vocab_size and init.data_type == 1  # fp32
    }
    node = next(
        (
            n
            for n in graph.node
            if n.op_type == "Gather"
            and n.input[0] in tables
            and all(a.i == 0 for a in n.attribute if a.name == "axis")
        ),
        None,
    )
    if node is None:
        return False
    users = [n for n in graph.node if node.input[0] in n.input]
    if len(users) > 1:  # still tied to the lm_head (an export without untie_lm_head)
        return False
    table = numpy_helper.to_array(tables[node.input[0]])
    hidden = table.shape[1]
    block = next((b for b in (INT8_BLOCK, 128, 64, 32, 16) if hidden % b == 0), None)
    if block is None:
        return False
    blocks = table.reshape(vocab_size, hidden // block, block)
    largest = np.abs(blocks).max(axis=-1)
    scales = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
    name = node.input[0]
    data = numpy_helper.from_array(codes.astype(np.uint8).reshape(vocab_size, hidden), name)
    graph.initializer.remove(tables[name])
    # the exporter may have typed the table as fp32 in value_info (or as a graph input)
    for listing in (graph.value_info, graph.input):
        for info in [i for i in listing if i.name == name]:
            listing.remove(info)
    graph.initializer.extend([data, numpy_helper.from_array(scales, f"{name}_scales")])
    quantized = helper.make_node(
        "GatherBlockQuantized",
        [name, node.input[1], f"{name}_scales"],
        list(node.output),
        name=f"{node.name}_int8",
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=8,
    )
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, quantized)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def gemms_to_matmuls(graph) -> int:
    """Rewrite ``Gemm(A, W[, C])`` with a constant ``W`` and default attributes as
    ``MatMul(A, W)`` (+ ``Add(C)``): the weight-only quantizer takes MatMuls only.
    GPT-2's Conv1D layers export as such Gemms. Returns how many were rewritten."""
    from onnx import helper

    constants = {init.name for init in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transA", 0) == 0
            and attrs.get("transB", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or node.input[1] not in constants or not plain:
            nodes.append(node)
            continue
        rewritten += 1
        if len(node.input) > 2 and node.input[2]:
            product = f"{node.output[0]}_matmul"
            nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=node.name))
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
        else:
            nodes.append(helper.make_node("MatMul", node.input[:2], node.output, name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten
