"""GPT-2 in PyTorch the way serving engines run it: a static KV cache, CUDA graphs, fp16.

The forward of ``SlotEngine`` (``slots.py``) for ``ENGINE=torch``, on the GPU
(``DEVICE=cuda``) and, with the same code, on the CPU:

- **Static KV cache.** ``TorchCaches`` allocates the slots once: 2 x layers tensors
  ``(max_sequences + 1, heads, context window, head_dim)`` on the device. A step writes
  each row's new keys and values at that row's own position (``index_put_``), attention
  reads the row's positions ``[0, length]`` through a mask; nothing is concatenated or
  re-padded, and a join or leave moves one sequence's row (``SlotEngine``). The extra
  last row is scratch: the padding rows of a captured decode step write there. Positions
  at or past a row's length hold zeros (``SlotEngine`` clears what a move or a leave
  leaves behind): a graph reads a whole window, and under the mask a stale NaN or inf
  would still poison the sum.
- **CUDA graphs for decode steps.** A one-token step for the decoding rows ``[0, B)`` runs
  as a replay of a graph captured for ``(bucket, window)``: B rounded up to a batch bucket
  (the powers of two below ``max_sequences``, and ``max_sequences``) and the longest row's
  length up to a power of two (the positions attention reads). The factory captures them
  all when the engine loads (``capture_graphs``), largest first so the smaller ones reuse
  the shared pool's blocks; one that cannot be captured runs eagerly. The step's token
  ids, positions and lengths are copied into the graph's static inputs (one host-to-device
  copy), the padding rows write into the scratch row, and the logits of the real rows are
  read back out. Prompts and their chunks run eagerly (their shapes vary too much to be
  worth capturing).
- **fp16 where it is fast, fp32 where it matters.** On CUDA the weights and the matmuls are
  fp16; the residual stream and LayerNorm stay fp32, ``scaled_dot_product_attention``'s
  kernels accumulate the softmax in fp32, and the logits leave the last matmul in fp32
  (fp16 logits are ~0.06 apart at GPT-2's magnitudes: ties that would decide greedy
  tokens and top-k cuts). On the CPU everything is fp32.
- **No cuDNN attention outside the graphs.** cuDNN's attention kernel needs an execution
  plan built for each new shape; PyTorch caches plans by shape, but eager steps bring new
  shapes all the time (every prompt width and batch, every decode span), and a build
  took tens of ms on an H200 (2026-11-28: a fresh prompt 54 ms against 6.4 ms for the
  same prompts again; eager decode steps 48 ms against 5.4 ms served, where rounds
  repeated the spans). The eager forward therefore runs FlashAttention (fresh prompts,
  causal, no mask), the memory-efficient kernel (masks) or the math fallback; a decode
  graph keeps PyTorch's choice, since its plan is built once, at capture (and so does a
  decode step whose graph could not be captured: its shape is a bucket's, its plan built
  once). The choice is a process-wide flag that ``sdpa_kernel`` sets and puts back, so
  eager steps and captures take one lock: a capture never sees an eager step's choice.
  With ``CUDA_GRAPHS=0`` eager decode steps launch a few more kernels than cuDNN's path
  (the mask's padding for the memory-efficient kernel: ~256 against ~232 a step).

``static_decode`` runs the decode steps through the same static inputs, buckets and
scratch row without capturing (the CPU's path in the tests: everything but the capture
itself), ``cuda_graphs`` captures them (CUDA only).
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager, nullcontext

import numpy as np

from gpt2_triton import heap
from gpt2_triton.device_copies import to_device_without_wait, to_host_later
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.errors import EngineError

log = logging.getLogger(__name__)

MIN_WINDOW = 64  # the shortest attention window a decode graph reads
# the attention kernels of the eager forward: none that builds a plan per shape (cuDNN's)
EAGER_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# held while the attention choice is narrowed (an eager step) and while graphs are captured
# or compiled with PyTorch's own choice: the choice is process-wide, not per thread
_ATTENTION_CHOICE = threading.Lock()

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def batch_buckets(max_sequences: int) -> tuple[int, ...]:
    """The decode batch sizes a graph is captured for: the powers of two below
    ``max_sequences``, and ``max_sequences``."""
    powers = [1 << i for i in range(max_sequences.bit_length()) if 1 << i < max_sequences]
    return (*powers, max_sequences)


def batch_bucket(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``rows``; None past the largest."""
    return next((b for b in buckets if b >= rows), None)


def window_bucket(positions: int, window: int) -> int:
    """``positions`` rounded up to a power of two (at least MIN_WINDOW), at most ``window``."""
    return min(window, max(MIN_WINDOW, 1 << max(0, math.ceil(math.log2(positions)))))


class TorchCaches:
    """The static KV cache, from which ``SlotEngine`` takes its buffers. On CUDA it is
    allocated once and kept while the engine lives (the decode graphs hold its addresses);
    on the CPU it is numpy's lazily committed zeros, freed when the engine empties, as the
    ONNX Runtime engine's (``slots.HostCaches``)."""

    def __init__(self, shape: ModelShape, device, dtype) -> None:
        import torch

        self._torch = torch
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.on_cuda = device.type == "cuda"
        self.slots: list | None = None  # (max_sequences + 1, heads, window, head_dim) each

    def allocate(self, rows: int, persistent: bool, positions: int | None = None) -> list:
        """``persistent``: the engine's slots (rows ``[0, rows)`` of the static cache, the
        same memory each time); otherwise scratch rows of ``positions`` for a stateless
        step."""
        if not persistent:
            return self._zeros(rows, positions or self.shape.max_positions)
        if self.slots is None:  # + the scratch row for padding
            self.slots = self._zeros(rows + 1, self.shape.max_positions)
        if self.slots[0].shape[0] != rows + 1:
            raise EngineError(f"the static KV cache has {self.slots[0].shape[0] - 1} slots")
        return [buffer[:rows] for buffer in self.slots]

    @property
    def frees_on_release(self) -> bool:
        """On CUDA the static cache stays: a row left behind must read as zeros."""
        return not self.on_cuda

    def release(self, buffers: list) -> None:
        """The engine is empty: on the CPU the memory goes; on CUDA graphs replay over it."""
        if not self.on_cuda:
            self.slots = None

    def copy(self, view):
        return view.clone()

    def forget(self, row) -> None:
        """A vacated row reads as zeros again (on the CPU its pages go back to the OS)."""
        if self.on_cuda:
            row.zero_()
        else:
            heap.forget_pages(row.numpy())

    def clear(self, positions) -> None:
        positions.zero_()

    def logits(self, rows: int, vocab: int):
        return self._torch.empty((rows, vocab), dtype=self._torch.float32, device=self.device)

    def _zeros(self, rows: int, positions: int) -> list:
        torch, s = self._torch, self.shape
        size = (rows, s.num_heads, positions, s.head_dim)
        if self.on_cuda:
            return [
                torch.zeros(size, dtype=self.dtype, device=self.device)
                for _ in range(2 * s.num_layers)
            ]
        # numpy's zeros are calloc'd: memory comes as positions are written (torch.zeros
        # writes every page at once)
        kind = torch.empty((), dtype=self.dtype).numpy().dtype
        return [torch.from_numpy(np.zeros(size, kind)) for _ in range(2 * s.num_layers)]


def _has_fp32_output_mm(weight) -> bool:
    import torch

    try:
        probe = torch.zeros((1, weight.shape[0]), dtype=weight.dtype, device=weight.device)
        out = torch.mm(probe, weight[:, :8], out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return out.dtype == torch.float32


class _Weights:
    """A ``GPT2LMHeadModel``'s parameters, laid out for the forward below: matmul weights in
    the compute type, LayerNorm's and the embeddings' in fp32."""

    def __init__(self, model, device, dtype) -> None:
        import torch

        config = model.config
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
            config, "reorder_and_upcast_attn", False
        ):
            raise EngineError("the torch engine runs GPT-2's default attention only")
        if not getattr(config, "scale_attn_weights", True):
            raise EngineError("the torch engine expects scale_attn_weights=True (GPT-2's)")
        activation = getattr(config, "activation_function", "gelu_new")
        if activation not in _GELU:
            raise EngineError(f"the torch engine does not run activation {activation!r}")
        self.gelu = _GELU[activation]
        self.eps = config.layer_norm_epsilon
        body = model.transformer

        def matmul(weight):  # Conv1D keeps (in, out): x @ weight
            return weight.detach().to(device, dtype).contiguous()

        def fp32(tensor):
            return tensor.detach().to(device, torch.float32).contiguous()

        self.wte = fp32(body.wte.weight)  # (vocab, embd)
        self.wpe = fp32(body.wpe.weight)
        # the logits in fp32: from the fp16 weights with an fp32 output where this PyTorch
        # has that matmul (mm's out_dtype), else from an fp32 copy of the weights
        head = model.lm_head.weight.detach().t()
        self.lm_head = head.to(device, dtype).contiguous()
        self.fp32_logits_from_fp16 = dtype != torch.float32 and _has_fp32_output_mm(self.lm_head)
        if dtype != torch.float32 and not self.fp32_logits_from_fp16:
            self.lm_head = head.to(device, torch.float32).contiguous()
        self.ln_f = (fp32(body.ln_f.weight), fp32(body.ln_f.bias))
        self.layers = [
            {
                "ln_1": (fp32(block.ln_1.weight), fp32(block.ln_1.bias)),
                "c_attn": (matmul(block.attn.c_attn.weight), matmul(block.attn.c_attn.bias)),
                "c_proj": (matmul(block.attn.c_proj.weight), matmul(block.attn.c_proj.bias)),
                "ln_2": (fp32(block.ln_2.weight), fp32(block.ln_2.bias)),
                "c_fc": (matmul(block.mlp.c_fc.weight), matmul(block.mlp.c_fc.bias)),
                "mlp_proj": (matmul(block.mlp.c_proj.weight), matmul(block.mlp.c_proj.bias)),
            }
            for block in body.h
        ]


# -- a layer's code outside attention: plain functions of tensors, so that torch.compile
# can fuse them (compile_decode) and the eager path runs the very same code ----------------
def _layer_norm(x, params, eps: float, dtype):
    """LayerNorm on the fp32 residual stream; its output in the compute type."""
    import torch

    weight, bias = params
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def _attention_input(x, layer, eps: float, dtype):
    """A block's q, k and v, packed: (rows, E) fp32 -> (rows, 3E) in the compute type."""
    import torch

    weight, bias = layer["c_attn"]
    return torch.addmm(bias, _layer_norm(x, layer["ln_1"], eps, dtype), weight)


def _first(ids, positions, wte, wpe, layer, eps: float, dtype, gelu: str):
    """The embeddings (the residual stream, fp32) and the first block's q, k, v."""
    x = wte[ids] + wpe[positions]
    return x, _attention_input(x, layer, eps, dtype)


def _block_output(x, attended, layer, eps: float, dtype, gelu: str):
    """A block after attention: the output projection and residual, LayerNorm, the MLP and
    its residual: the residual stream (rows, E) fp32."""
    import torch

    x = x + torch.addmm(layer["c_proj"][1], attended, layer["c_proj"][0])
    h = _layer_norm(x, layer["ln_2"], eps, dtype)
    h = torch.nn.functional.gelu(
        torch.addmm(layer["c_fc"][1], h, layer["c_fc"][0]), approximate=gelu
    )
    return x + torch.addmm(layer["mlp_proj"][1], h, layer["mlp_proj"][0])


def _between(x, attended, layer, following, eps: float, dtype, gelu: str):
    """One block's end and the next one's q, k, v: what lies between two attentions."""
    x = _block_output(x, attended, layer, eps, dtype, gelu)
    return x, _attention_input(x, following, eps, dtype)


_PLAIN = (_first, _between, _block_output)


# compiled versions Dynamo keeps of one function, across every engine of the process: one
# per batch bucket (7 at 64 slots, 9 at 200) and engine; PyTorch's default is 8, past which
# a fullgraph compile fails
RECOMPILE_LIMIT = 64


def _raise_recompile_limits() -> None:
    import torch._dynamo.config as dynamo

    for names, limit in (
        (("recompile_limit", "cache_size_limit"), RECOMPILE_LIMIT),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8 * RECOMPILE_LIMIT),
    ):
        name = next((n for n in names if hasattr(dynamo, n)), None)
        if name is not None:
            setattr(dynamo, name, max(getattr(dynamo, name), limit))


class TorchSlotForward:
    """``(input_ids, lengths, position_ids, caches) -> logits``, ``SlotEngine``'s forward:
    ``caches`` are views of ``self.caches``' buffers, written in place; the logits come
    back as an fp32 tensor on the device (the device sampler reads them there)."""

    name = "torch"

    def __init__(
        self,
        model,
        shape: ModelShape,
        device: str = "cpu",
        *,
        static_decode: bool | None = None,
        cuda_graphs: bool | None = None,
        compile_decode: bool = False,
        dtype=None,
    ) -> None:
        """``dtype``: the compute type (default fp16 on CUDA, fp32 on the CPU; fp16 on the
        CPU runs the GPU's precision path slowly, for the tests). ``compile_decode``: the
        decode steps' code outside attention goes through ``torch.compile`` (fused kernels,
        fewer launches), compiled for every batch bucket when the graphs are captured."""
        import torch

        self._torch = torch
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise EngineError(f"device {device} asked for, but PyTorch sees no CUDA GPU")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise EngineError("CUDA graphs need DEVICE=cuda")
        self.static_decode = self.cuda_graphs or bool(static_decode)
        if compile_decode and not self.static_decode:
            raise EngineError("compiled decode steps need CUDA graphs or static_decode")
        self._pieces = None  # the compiled layer code (compile_decode), else the plain
        self.compile_failed: str | None = None
        self.compile_seconds: float | None = None
        if compile_decode:  # fullgraph: a graph break is an error at load, not a slow path
            _raise_recompile_limits()
            self._pieces = tuple(
                torch.compile(piece, dynamic=False, fullgraph=True) for piece in _PLAIN
            )
        self.compute_dtype = dtype or (torch.float16 if on_cuda else torch.float32)
        self.dtype = self.compute_dtype  # the KV cache's type
        self.shape = shape
        self.weights = _Weights(model, self.device, self.compute_dtype)
        self.caches = TorchCaches(shape, self.device, self.compute_dtype)
        self._graphs: dict[tuple[int, int], tuple] = {}  # (bucket, window) -> graph, logits
        self._pool = None  # one memory pool shared by every captured graph
        self._static = None  # the decode graphs' inputs, sized for the largest bucket
        self.graph_replays = 0  # steps that ran as a graph (or its eager stand-in)
        from torch.nn.attention import SDPBackend

        self._eager_attention = [getattr(SDPBackend, name) for name in EAGER_ATTENTION]

    # -- the forward ----------------------------------------------------------------------
    def __call__(self, input_ids, lengths, position_ids, caches):
        rows, new = input_ids.shape
        with self._torch.inference_mode():
            if new == 1 and self.static_decode and self._on_slots(caches):
                bucket = batch_bucket(rows, batch_buckets(self._slots_held()))
                return self._decode_static(input_ids, lengths, position_ids, bucket)
            return self._eager(input_ids, lengths, position_ids, caches)

    def _slots_held(self) -> int:
        return self.caches.slots[0].shape[0] - 1  # the last row is scratch

    def _on_slots(self, caches) -> bool:
        """Whether ``caches`` are the engine's slots' leading rows (a decode step's)."""
        slots = self.caches.slots
        return slots is not None and caches[0].data_ptr() == slots[0].data_ptr()

    def _eager(self, input_ids, lengths, position_ids, caches):
        from torch.nn.attention import sdpa_kernel

        with _ATTENTION_CHOICE, sdpa_kernel(self._eager_attention):
            return self._eager_step(input_ids, lengths, position_ids, caches)

    def _eager_step(self, input_ids, lengths, position_ids, caches):
        torch = self._torch
        rows, new = input_ids.shape
        ids = self._to_device(input_ids)
        positions = self._to_device(position_ids)
        past = np.asarray(lengths, np.int64)
        if new > 1 and (past != past[0]).any():
            raise EngineError("a multi-token step needs one past length for all its rows")
        span = int(past.max()) + new  # positions attention reads
        if new == 1:  # each row writes at its own position, reads up to it
            at = self._to_device(past)
            mask = torch.arange(span, device=self.device)[None, :] <= at[:, None]
            mask = mask[:, None, None, :]  # (B, 1, 1, span)
        elif past[0] == 0:  # fresh prompts: plain causal attention (FlashAttention's)
            at, mask = 0, None
        else:  # rows share their past: causal over [past, past + new)
            at = int(past[0])
            query = torch.arange(at, span, device=self.device)[:, None]
            mask = (torch.arange(span, device=self.device)[None, :] <= query)[None, None]
        row_index = torch.arange(rows, device=self.device)
        return self._forward(ids, positions, caches, row_index, at, mask, span)

    def _forward(self, ids, positions, caches, write_rows, at, mask, span, pieces=None):
        """The network: ``ids``/``positions`` (B, S); each layer writes its keys and values
        into ``caches`` (rows ``write_rows`` at position ``at``: a (B,) tensor for one new
        token per row, an int for S tokens at once) and attends over ``[0, span)`` of rows
        ``[0, B)`` under ``mask`` (None: causal, the S tokens being the whole span).
        ``pieces``: the layers' code outside attention (``_PLAIN`` by default; compiled for
        the decode graphs with ``compile_decode``). Returns the last position's logits (B,
        vocab) fp32."""
        torch = self._torch
        functional = torch.nn.functional
        w, s = self.weights, self.shape
        first, between, block_output = pieces or _PLAIN
        rows, new = ids.shape
        embd = s.num_heads * s.head_dim
        layers, numerics = w.layers, (w.eps, self.compute_dtype, w.gelu)
        # x: the residual stream (B * S, E) fp32; qkv: the first layer's q, k, v
        x, qkv = first(ids.reshape(-1), positions.reshape(-1), w.wte, w.wpe, layers[0], *numerics)
        for layer, p in enumerate(layers):
            q, k, v = qkv.view(rows, new, 3, s.num_heads, s.head_dim).permute(2, 0, 3, 1, 4)
            keys, values = caches[2 * layer], caches[2 * layer + 1]
            if isinstance(at, int):  # (B, H, S, D) into positions [at, at + S)
                keys[:, :, at : at + new] = k
                values[:, :, at : at + new] = v
            else:  # one token a row, at each row's own position
                keys[write_rows, :, at] = k[:, :, 0]
                values[write_rows, :, at] = v[:, :, 0]
            attended = functional.scaled_dot_product_attention(
                q,
                keys[:rows, :, :span],
                values[:rows, :, :span],
                attn_mask=mask,
                is_causal=mask is None,
            )  # (B, H, S, D)
            merged = attended.transpose(1, 2).reshape(-1, embd)
            if layer + 1 < len(layers):
                x, qkv = between(x, merged, p, layers[layer + 1], *numerics)
            else:
                x = block_output(x, merged, p, *numerics)
        last = x.view(rows, new, embd)[:, -1]  # (B, E): only the last position's logits
        last = _layer_norm(last, w.ln_f, w.eps, self.compute_dtype)
        if w.fp32_logits_from_fp16:
            return torch.mm(last, w.lm_head, out_dtype=torch.float32)
        return last.to(w.lm_head.dtype) @ w.lm_head  # fp32 (the CPU; or the fp32 copy)

    def _to_device(self, array):
        tensor = self._torch.from_numpy(np.ascontiguousarray(array, np.int64))
        return tensor.to(self.device, non_blocking=True)

    # -- decode steps as graphs -------------------------------------------------------------
    def _decode_static(self, input_ids, lengths, position_ids, bucket):
        """A decode step of rows ``[0, rows)`` through the static inputs: a graph's replay
        (or, without one, the same body eagerly). ``input_ids``: host ids (rows, 1), or a
        (rows,) tensor on the device (a decode ahead's, still being computed)."""
        torch = self._torch
        rows = input_ids.shape[0]
        lengths = np.asarray(lengths, np.int64)
        window = window_bucket(int(lengths.max()) + 1, self.shape.max_positions)
        static = self._static_inputs()
        # one copy in: token ids, positions, write rows and lengths of the bucket's rows;
        # the padding rows write into the scratch row at position 0 and attend to position
        # 0 of slots [rows, bucket) (zeros or another sequence's: their logits are dropped)
        on_device = isinstance(input_ids, torch.Tensor)
        staged = np.zeros((4, bucket), np.int64)
        if not on_device:
            staged[0, :rows] = np.asarray(input_ids).reshape(-1)
        staged[1, :rows] = np.asarray(position_ids).reshape(-1)
        staged[2, :rows] = np.arange(rows)
        staged[2, rows:] = self._slots_held()
        staged[3, :rows] = lengths
        if on_device:  # no wait for the work queued before (the ids' own sampling)
            static[:, :bucket].copy_(to_device_without_wait(staged, self.device))
            static[0, :rows].copy_(input_ids)
        else:
            static[:, :bucket].copy_(torch.from_numpy(staged), non_blocking=False)
        graph, logits = self._graph(bucket, window)
        if graph is None:  # CPU (or a failed capture): the same body, eagerly
            with _ATTENTION_CHOICE:
                logits = self._decode_body(bucket, window)
        else:
            graph.replay()
        self.graph_replays += 1
        return logits[:rows]

    # -- decoding ahead ---------------------------------------------------------------------
    def ahead(self, tokens, order, lengths):
        """The next decode step of slots ``[0, rows)`` from tokens still on the device
        (``SlotEngine.step_ahead``): ``tokens`` (rows,) in the caller's row order, ``order``
        the caller's row of each slot, ``lengths`` the slots' lengths. The tokens' copy to
        the host is queued first, then the step, and only then does the host wait, for the
        copy alone: the step runs on the GPU while the caller detokenizes and sends. Returns
        (the tokens on the host, in the caller's order; the step's logits, slot order)."""
        torch = self._torch
        if not self.static_decode:
            raise EngineError("decoding ahead needs the static decode steps (CUDA graphs)")
        rows = len(lengths)
        lengths = np.asarray(lengths, np.int64)
        with torch.inference_mode():
            read = to_host_later(tokens)
            ids = tokens
            if not np.array_equal(order, np.arange(rows)):
                ids = tokens.index_select(0, to_device_without_wait(order, self.device))
            ids = ids.clamp(min=0)  # a row that could not be sampled (-1) ends: feed it 0
            bucket = batch_bucket(rows, batch_buckets(self._slots_held()))
            logits = self._decode_static(ids, lengths, lengths.reshape(rows, 1), bucket)
            return read(), logits

    def take_rows(self, logits, rows):
        """``logits[rows]``, the index copied to the device without waiting for the step
        that computes ``logits`` (a list index would wait for it)."""
        return logits.index_select(0, to_device_without_wait(rows, self.device))

    def _static_inputs(self):
        if self._static is None:  # sized for the largest bucket: every slot
            largest = self._slots_held()
            # an even width: each input's row starts 16-byte aligned (a compiled graph
            # copies a misaligned input on every call)
            self._static = self._torch.zeros(
                (4, largest + largest % 2), dtype=self._torch.int64, device=self.device
            )
            self._static[2] = largest  # every row at the scratch row
        return self._static

    def _decode_body(self, bucket: int, window: int):
        """One decode step of ``bucket`` rows over ``window`` positions, from the static
        inputs alone (what a graph captures)."""
        torch = self._torch
        static = self._static[:, :bucket]
        ids, positions = static[0].view(bucket, 1), static[1].view(bucket, 1)
        write_rows, at = static[2], static[3]
        mask = torch.arange(window, device=self.device)[None, :] <= at[:, None]
        caches = self.caches.slots
        mask = mask[:, None, None, :]
        return self._forward(ids, positions, caches, write_rows, at, mask, window, self._pieces)

    def describe(self) -> str:
        """One line on what runs: device, precision, graphs captured (and failed), logits."""
        captured = sum(graph is not None for graph, _ in self._graphs.values())
        failed = len(self._graphs) - captured
        w = self.weights
        logits = "fp16 weights, fp32 output" if w.fp32_logits_from_fp16 else "fp32 weights"
        graphs = f"{captured} captured, {failed} failed" if self.cuda_graphs else "off"
        compiled = ""
        if self.compile_failed:
            compiled = f"; compiled: failed: {self.compile_failed}"
        elif self._pieces is not None:
            took = f" ({self.compile_seconds:.0f} s)" if self.compile_seconds is not None else ""
            compiled = f"; compiled: on{took}"
        return (
            f"torch on {self.device}, {str(self.compute_dtype).removeprefix('torch.')}; "
            f"CUDA graphs: {graphs}; logits: {logits}{compiled}"
        )

    def capture_graphs(self, max_sequences: int) -> int:
        """Capture every decode graph the engine can need (each batch bucket up to
        ``max_sequences``, each window), so that no stream waits for a capture; the
        number captured. Graphs not captured here are captured on first use. With
        ``compile_decode`` the layer code is compiled first, for every bucket (on the CPU
        too); if that fails, or a graph of the compiled code cannot be captured, the plain
        code runs (its graphs captured again) and ``describe`` says why."""
        if self._pieces is not None:
            self._compile(max_sequences)
        if not self.cuda_graphs:
            return 0
        captured = self._capture_all(max_sequences)
        if self._pieces is not None and captured < len(self._graphs):
            log.error("decode graphs of the compiled code failed to capture; running uncompiled")
            self._pieces = None
            self.compile_failed = f"{len(self._graphs) - captured} graphs failed to capture"
            self._graphs.clear()  # and their memory; the plain code's graphs take their place
            self._pool = None
            captured = self._capture_all(max_sequences)
        return captured

    def _capture_all(self, max_sequences: int) -> int:
        self.caches.allocate(max_sequences, persistent=True)
        self._static_inputs()
        windows, window = [], MIN_WINDOW
        while True:
            windows.append(min(window, self.shape.max_positions))
            if window >= self.shape.max_positions:
                break
            window *= 2
        with self._torch.inference_mode():
            # largest first: the smaller graphs' intermediates fit in the blocks the larger
            # ones left in the shared pool
            for bucket in reversed(batch_buckets(max_sequences)):
                for window in reversed(windows):
                    self._graph(bucket, window)
        return sum(graph is not None for graph, _ in self._graphs.values())

    def _compile(self, max_sequences: int) -> None:
        """Run a decode step of every bucket through the compiled pieces, into the scratch
        row (torch.compile compiles for each shape on its first call); on failure go back to
        the plain pieces."""
        import sys
        import time

        import torch._inductor.config as inductor

        torch = self._torch
        buckets = batch_buckets(max_sequences)
        log.info(
            "torch.compile of the decode steps: %d buckets, compile threads %s, python %s",
            len(buckets), inductor.compile_threads, sys.executable,
        )  # fmt: skip
        self.caches.allocate(max_sequences, persistent=True)
        started = time.perf_counter()
        try:
            with self._rows_at_scratch(), _ATTENTION_CHOICE, torch.inference_mode():
                for bucket in buckets:
                    self._decode_body(bucket, min(MIN_WINDOW, self.shape.max_positions))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a kernel's failure shows here
            self.compile_seconds = time.perf_counter() - started
        except Exception as exc:  # the service goes on, uncompiled
            if self.device.type == "cuda":
                try:  # a sticky CUDA error is no compile failure: the process is done for
                    torch.cuda.synchronize(self.device)
                except Exception:
                    raise exc from None
            log.exception("torch.compile of the decode steps failed; they run uncompiled")
            self._pieces, self.compile_failed = None, f"{type(exc).__name__}: {exc}"[:200]

    @contextmanager
    def _rows_at_scratch(self):
        """Every row of the static inputs pointed at the scratch row, and the inputs put
        back after, whatever happens: warm-ups, compiles and captures run the decode body
        on whatever rows the last step left there, and must not write real rows' caches."""
        static = self._static_inputs()
        saved = static.clone()
        static[2] = self._slots_held()
        try:
            yield
        finally:
            static.copy_(saved)

    def _graph(self, bucket: int, window: int):
        """The captured graph for ``(bucket, window)`` and its output; (None, None) on the
        CPU."""
        if not self.cuda_graphs:
            return None, None
        key = (bucket, window)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(bucket, window)
            except Exception:  # that shape runs eagerly, as on the CPU; the service goes on
                log.exception("CUDA graph capture failed for %d rows x %d positions", *key)
                self._graphs[key] = (None, None)
        return self._graphs[key]

    def _capture(self, bucket: int, window: int):
        torch = self._torch
        # compiled code is compiled for every bucket by now: a guard that misses here must
        # fail the capture (a compile inside it would break it), not compile
        stance = getattr(torch.compiler, "set_stance", None)
        no_recompile = stance("fail_on_recompile") if stance and self._pieces else nullcontext()
        # warm-up runs on a side stream, as PyTorch's capture wants
        with self._rows_at_scratch(), _ATTENTION_CHOICE, no_recompile:
            with torch.cuda.device(self.device):  # cuda:N: its streams, not the current GPU's
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._decode_body(bucket, window)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=side):
                    logits = self._decode_body(bucket, window)
                self._pool = graph.pool()
        return graph, logits
