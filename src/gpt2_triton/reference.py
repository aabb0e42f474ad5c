"""Hugging Face ``generate()`` as the reference that engines and the server are held to."""

from __future__ import annotations


def greedy_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """Greedy continuation of one prompt, up to and including EOS if it comes."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=eos_token_id,
        )
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(eos_token_id) + 1] if eos_token_id in new else new


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The text the server should stream for a greedy request (EOS not included)."""
    eos = tokenizer.eos_token_id
    new = greedy_ids(model, tokenizer(prompt)["input_ids"], max_new_tokens, eos)
    return tokenizer.decode([t for t in new if t != eos])
