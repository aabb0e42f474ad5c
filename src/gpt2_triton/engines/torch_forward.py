"""PyTorch forward with the ONNX contract: the export wrapper and the ``torch`` engine."""

from __future__ import annotations

import numpy as np

from gpt2_triton.engines.shape import ModelShape


def kv_cache_module(model):
    """Wrap a ``GPT2LMHeadModel`` so its inputs and outputs are flat tensors.

    ``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` where
    ``past``/``present`` are ``(key, value)`` per layer, each ``(B, heads, P, head_dim)``, and
    ``logits`` are the last position's only ``(B, vocab)``: serving never needs the others,
    and skipping them saves the lm_head matmul over the whole prompt.
    """
    import torch
    from transformers import DynamicCache

    num_layers = model.config.n_layer

    class KVCacheModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)]
            )
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            present = []
            for layer in out.cache.layers:
                present += [layer.keys, layer.values]
            return (out.logits[:, -1, :], *present)

    return KVCacheModule().eval()


class TorchForward:
    """PyTorch eager: the baseline engine (CPU fp32; CUDA fp16 when asked for)."""

    name = "torch"

    def __init__(self, model, shape: ModelShape, device: str = "cpu", dtype=None) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.module = kv_cache_module(model.to(self.device, self.dtype))
        self.shape = shape

    def __call__(self, input_ids, attention_mask, position_ids, past):
        torch = self._torch

        def to_dev(a, dtype=None):
            t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
            return t.to(dtype) if dtype is not None else t

        with torch.inference_mode():
            out = self.module(
                to_dev(input_ids),
                to_dev(attention_mask),
                to_dev(position_ids),
                *[to_dev(p, self.dtype) for p in past],
            )
        logits = out[0].float().cpu().numpy()
        present = [
            t.float().cpu().numpy() if self.dtype != torch.float32 else t.cpu().numpy()
            for t in out[1:]
        ]
        return logits, present
