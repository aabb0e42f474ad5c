"""PyTorch forward with the ONNX contract: the export wrapper and the ``torch`` engine."""

from __future__ import annotations

import inspect

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
    # transformers renamed past_key_values -> cache (in and out) during 5.x; accept both.
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

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
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
            returned = out.cache if hasattr(out, "cache") else out.past_key_values
            present = []
            for layer in returned.layers:
                present += [layer.keys, layer.values]
            return (out.logits[:, -1, :], *present)

    return KVCacheModule().eval()


class TorchForward:
    """PyTorch eager: the baseline engine (CPU fp32; CUDA fp16 when asked for).

    The KV cache stays a torch tensor on the model's device between steps (``kv_ops``);
    only token ids, the mask and positions go in, and last-position logits come out.
    """

    name = "torch"

    def __init__(self, model, shape: ModelShape, device: str = "cpu", dtype=None) -> None:
        import torch

        from gpt2_triton.engines.kv_ops import TorchKV

        self._torch = torch
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.module = kv_cache_module(model.to(self.device, self.dtype))
        self.shape = shape
        self.kv_ops = TorchKV(self.device, self.dtype)

    def __call__(self, input_ids, attention_mask, position_ids, past):
        torch = self._torch

        def to_device(array):
            return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

        with torch.inference_mode():
            logits, *present = self.module(
                to_device(input_ids), to_device(attention_mask), to_device(position_ids), *past
            )
        return logits.float().cpu().numpy(), present
