"""ONNX Runtime forward with the KV cache written in place: the CPU serving engine.

The export (``export.py``) computes each layer's attention over ``present = Concat(past,
new)``: every step copies the whole cache into a fresh ``present``. Here the same file is
loaded with each layer's ``Concat`` + ``Attention`` rewritten, in memory, as ONNX Runtime's
``com.microsoft.GroupQueryAttention`` with as many key/value heads as query heads (plain
multi-head attention). Given the same buffer as ``past_key`` and ``present_key`` (IO
binding), that kernel writes only the new tokens' keys and values, at each row's own
position (``seqlens_k``), and attends over each row's own length: no concatenation, no
padding, no mask. The file on disk is untouched (verify.py, TensorRT and the padded
engine read it as exported).

ONNX Runtime's CPU kernel takes several new tokens on a non-empty cache for one row at a
time, and wants head sizes that are multiples of 8 (GPT-2's is 64); ``SlotEngine``
(``slots.py``) schedules steps within those rules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2_triton.engines.onnx_forward import session_options
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import EngineError

SEQLENS = "seqlens_k"  # (batch,) int32: each row's length after this step, minus one
TOTAL = "total_sequence_length"  # scalar int32: the longest row's length after this step


def shared_kv_graph(proto, shape: ModelShape):
    """Rewrite ``proto`` (an ``export.py`` graph, opset 23) in place for an in-place cache:
    ``attention_mask`` goes, ``seqlens_k`` and ``total_sequence_length`` come in."""
    from onnx import TensorProto, helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    heads, head_dim = shape.num_heads, shape.head_dim
    if head_dim % 8:
        raise EngineError(f"in-place KV cache: head size {head_dim} is not a multiple of 8")
    to_3d = helper.make_tensor("kv_to_3d", TensorProto.INT64, [3], [0, 0, -1])
    to_4d = helper.make_tensor("kv_to_4d", TensorProto.INT64, [4], [0, 0, heads, head_dim])
    graph.initializer.extend([to_3d, to_4d])
    dropped, added = set(), []

    def before_transpose(name):  # (B, S, N, H) behind the exporter's (0, 2, 1, 3) transpose
        node = producer[name]
        if node.op_type != "Transpose":
            raise EngineError(f"in-place KV cache: unexpected graph around {name}")
        return node.input[0]

    for layer in range(shape.num_layers):
        key, value = (f"present.{layer}.{kind}" for kind in ("key", "value"))
        concats = [producer.get(key), producer.get(value)]
        attention = next((n for n in consumers.get(key, []) if n.op_type == "Attention"), None)
        if attention is None or any(c is None or c.op_type != "Concat" for c in concats):
            raise EngineError(
                f"in-place KV cache: layer {layer} is not Concat + Attention (export at opset 23)"
            )
        (out_transpose,) = consumers[attention.output[0]]
        scale = [a.f for a in attention.attribute if a.name == "scale"]
        flat = []
        for source in (attention.input[0], concats[0].input[1], concats[1].input[1]):
            flat.append(f"{source}_3d")
            added.append(
                helper.make_node("Reshape", [before_transpose(source), "kv_to_3d"], [flat[-1]])
            )
        added.append(
            helper.make_node(
                "GroupQueryAttention",
                [*flat, concats[0].input[0], concats[1].input[0], SEQLENS, TOTAL],
                [f"attention_{layer}_3d", key, value],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=heads,
                **({"scale": scale[0]} if scale else {}),
            )
        )
        added.append(
            helper.make_node(
                "Reshape", [f"attention_{layer}_3d", "kv_to_4d"], [out_transpose.output[0]]
            )
        )
        dropped.update(id(n) for n in (*concats, attention, out_transpose))
    nodes = [n for n in graph.node if id(n) not in dropped] + added
    # drop what only fed the old attention (the mask's arithmetic, the transposes)
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for n in nodes for name in n.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name in used]
    inputs.append(helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]))
    inputs.append(helper.make_tensor_value_info(TOTAL, TensorProto.INT32, []))
    del graph.input[:]
    graph.input.extend(inputs)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    from gpt2_triton.export import sort_topologically

    sort_topologically(graph)
    return proto


class OnnxSlotForward:
    """``(input_ids, seqlens, position_ids, caches) -> logits``: ``caches`` are the 2 x
    layers arrays ``(B, heads, capacity, head_dim)`` (views of the engine's buffers), read
    and written in place; ``seqlens`` (B,) each row's length before the step."""

    name = "onnx"

    def __init__(self, model_path: Path, shape: ModelShape, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        model_path = Path(model_path)
        if not model_path.is_file():
            raise EngineError(f"ONNX model not found: {model_path} (run 'make export')")
        proto = shared_kv_graph(onnx.load(str(model_path), load_external_data=False), shape)
        options = session_options(threads)
        # the weights stay in their file beside the export, mapped as before
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(model_path.parent)
        )
        try:
            self.session = ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise EngineError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self._ort = ort
        self.shape = shape
        self._past = shape.past_names()
        self._present = shape.present_names()
        kinds = {i.type for i in self.session.get_inputs() if i.name in self._past}
        self.dtype = np.float16 if kinds == {"tensor(float16)"} else np.float32

    def __call__(self, input_ids, seqlens, position_ids, caches):
        rows, new = input_ids.shape
        lengths = np.asarray(seqlens, np.int64) + new  # after the step
        binding = self.session.io_binding()
        binding.bind_output("logits")  # first: get_outputs()[0]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        binding.bind_cpu_input(SEQLENS, (lengths - 1).astype(np.int32))
        binding.bind_cpu_input(TOTAL, np.array(lengths.max(), np.int32))
        for past, present, cache in zip(self._past, self._present, caches, strict=True):
            value = self._ort.OrtValue.ortvalue_from_numpy(cache)  # no copy: the same memory
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # the logits alone: the caches stay put
