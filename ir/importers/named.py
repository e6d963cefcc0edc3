"""Named model shapes: the architectures fxforge knows by name (random init, or real weights for SmolLM2).

Only SmolLM2-135M has real weights (fetched as a GGUF); the other shapes are for speed, placement and
kernel work with random weights, never for quality claims.
"""

from __future__ import annotations

from fxforge.ir.spec import ModelSpec

NAMED_SHAPES: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
        name="smollm2-135m"),
    # Llama 3.0: no llama3 RoPE scaling (that came with 3.1)
    "llama-3-8b": ModelSpec(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama-3-8b"),
    "mixtral-8x7b": ModelSpec(
        family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
        bos_token_id=1, eos_token_ids=(2,), name="mixtral-8x7b"),
    # Qwen3-30B-A3B's config.json: 48 layers of 128 fine-grained experts (top-8, renormalised), no shared expert
    "qwen3-30b-a3b": ModelSpec(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, qk_norm=True, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, bos_token_id=151643, eos_token_ids=(151645, 151643),
        name="qwen3-30b-a3b"),
    "qwen2.5-0.5b": ModelSpec(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=(151643, 151645), name="qwen2.5-0.5b"),
}
