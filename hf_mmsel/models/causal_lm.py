"""Tiny causal LMs from config (no weights needed) for MoLA multi-task instruction-style tuning.

``build_causal_lm("llama" | "gpt2", vocab_size=..., ...)`` returns a random-init ``LlamaForCausalLM`` or
``GPT2LMHeadModel``; :data:`CAUSAL_LM_TARGET_MODULES` names their attention/MLP projections for ``target_modules``
(GPT-2's are transformers ``Conv1D`` layers, which MoLA adapts like ``nn.Linear``).
"""

from __future__ import annotations

import torch

__all__ = ["CAUSAL_LM_KINDS", "CAUSAL_LM_TARGET_MODULES", "build_causal_lm"]

CAUSAL_LM_KINDS = ("llama", "gpt2")
CAUSAL_LM_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build_causal_lm(
    kind: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 128,
    pad_token_id: int = 1,
    bos_token_id: int = 0,
    eos_token_id: int | None = None,
    seed: int | None = 0,
):
    """A random-init tiny ``LlamaForCausalLM`` (``kind="llama"``) or ``GPT2LMHeadModel`` (``kind="gpt2"``, dropout
    off so that train and eval forwards agree)."""
    if kind not in CAUSAL_LM_KINDS:
        raise ValueError(f"kind={kind!r} is not valid; choose one of {list(CAUSAL_LM_KINDS)}")
    eos_token_id = vocab_size - 1 if eos_token_id is None else eos_token_id
    if seed is not None:
        torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_hidden_layers, n_head=num_attention_heads,
        n_inner=intermediate_size, n_positions=max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    return GPT2LMHeadModel(config)
