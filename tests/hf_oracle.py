"""The torch executor's oracle: a tiny LLaMA made by Hugging Face ``transformers`` (random init,
saved as a checkpoint directory) and its own greedy ``generate``.  Imported by tests that have
already skipped when torch or transformers is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers


def make_checkpoint(path: Path, seed: int, **shape: int) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (vocab_size, hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads) saved into
    ``path``; returns the model (eval mode)."""
    cfg = transformers.LlamaConfig(max_position_embeddings=512, **shape)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (end-of-sequence ignored, as the runtime does)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt):]]
