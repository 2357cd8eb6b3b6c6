"""The torch executor's oracle: tiny models made by Hugging Face ``transformers`` (random init,
saved as checkpoint directories) and their own greedy ``generate``.  Imported by tests that have
already skipped when torch or transformers is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

#: the families the executor computes, by the transformers classes that define them
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def make_checkpoint(path: Path, seed: int, family: str = "llama", bias_std: float = 0.0, **config: Any) -> Any:
    """A randomly initialised model of ``family`` with ``config`` (the transformers config's
    fields: vocab_size, hidden_size, ..., rope_scaling, attention_bias, tie_word_embeddings) saved
    into ``path``; returns the model (eval mode, float32).

    bias_std: transformers initialises every bias to zero, which would hide a bias the math left
    out; with ``bias_std > 0`` each bias is redrawn from a normal of that deviation (seeded)."""
    cfg_cls, model_cls = FAMILIES[family]
    cfg = cfg_cls(**{"max_position_embeddings": 512, **config})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if bias_std > 0:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * bias_std)
    model.save_pretrained(path)
    return model


def hf_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``, end-of-sequence ignored as the runtime does: the
    end-of-sequence id is not stopped at, and is chosen like any other token where it is the
    arg-max. (``min_new_tokens`` would instead forbid it, changing the tokens.)"""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
        )
    got = [int(t) for t in out[0, len(prompt):]]
    assert len(got) == n, f"generate stopped after {len(got)} of {n} tokens"
    return got


def hf_last_logits(model: Any, prompt: list[int]) -> torch.Tensor:
    """The logits (vocab,) of the prompt's last position, float32, in one forward pass."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float()
