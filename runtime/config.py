"""One engine configuration: every runtime setting once, validated when it is made.

The scheduler, the page pool and the model runner all read their settings from the same frozen
`EngineConfig`; none keeps a copy, so they cannot disagree. Defaults that depend on the model
(max_model_len, num_pages from free GPU memory, CUDA graphs, the EOS id) are resolved by the engine
when it builds the config (`fxforge.runtime.engine.config_for_model`). A leaf module: no torch, no
other runtime module.
"""

from __future__ import annotations

from dataclasses import dataclass

LOOP_POLICIES = ("lockstep", "depthwise")
V_LAYOUTS = ("rows", "channels")  # as kernels/kv_cache.py's allocate_kv_pair takes them
ENGINE_V_LAYOUTS = ("auto",) + V_LAYOUTS  # "auto": resolved per model and device (Model.resolve_v_layout)
SKIP_POLICIES = ("bucket", "mask", "full")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    """Every runtime setting, read by the scheduler, the page pool, the model runner and the engine."""

    max_num_seqs: int = 256  # running sequences at once
    max_num_batched_tokens: int = 8192  # token budget of one model step
    max_model_len: int = 8192  # prompt + generated tokens of one sequence
    page_size: int = 16  # positions per KV page
    num_pages: int = 4096  # KV pages sequences may hold (the runner reserves one more as scratch)
    enable_chunked_prefill: bool = True
    num_decode_steps: int = 8  # K: decode steps per engine step when only decodes can run (1 = off)
    use_cuda_graphs: bool = False  # replay captured CUDA graphs for pure-decode steps
    direct_dispatch: bool = True  # eager steps call the bound kernels directly, not through torch.library
    eos_token_id: int | None = None  # the token that ends generation (unless SamplingParams.ignore_eos)
    chat: bool = True  # text prompts go through the model's chat template
    loop_policy: str = "lockstep"  # layer-tied models: "lockstep" (unrolled forward) or "depthwise" (see scheduler)
    skip_policy: str = "bucket"  # skip-decode models: "bucket", "mask" (runtime/skip_runner.py) or "full" (every layer)
    skip_kv_fraction: float = 1.0  # skip-decode models: pages of each skippable layer group, as a share of num_pages
    overlap_windows: bool = False  # launch the next decode window before reading this one's tokens (Scheduler.chain);
    # Engine's settings leave it to the model: on for CUDA and the plain runner (engine.default_overlap_windows)
    v_layout: str = "auto"  # "channels": packed V stored channels by tokens, read by the "i8t" decode kernel;
    # "auto": channels where this device's tuned decode configs time i8t for every layer's shape, else rows

    def __post_init__(self):
        for name, minimum in (("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("max_model_len", 2),
                              ("page_size", 1), ("num_pages", 1), ("num_decode_steps", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"EngineConfig.{name} must be an int >= {minimum}, got {value!r}")
        for name in ("enable_chunked_prefill", "use_cuda_graphs", "direct_dispatch", "chat", "overlap_windows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.loop_policy not in LOOP_POLICIES:
            raise ValueError(f"EngineConfig.loop_policy must be one of {LOOP_POLICIES}, got {self.loop_policy!r}")
        if self.v_layout not in ENGINE_V_LAYOUTS:
            raise ValueError(f"EngineConfig.v_layout must be one of {ENGINE_V_LAYOUTS}, got {self.v_layout!r}")
        if self.skip_policy not in SKIP_POLICIES:
            raise ValueError(f"EngineConfig.skip_policy must be one of {SKIP_POLICIES}, got {self.skip_policy!r}")
        fraction = self.skip_kv_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"EngineConfig.skip_kv_fraction must be a number in (0, 1], got {fraction!r}")
        if self.eos_token_id is not None and (not _is_int(self.eos_token_id) or self.eos_token_id < 0):
            raise ValueError(f"EngineConfig.eos_token_id must be None or an int >= 0, got {self.eos_token_id!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len - 1:
            raise ValueError(
                f"without chunked prefill a whole prefill of up to max_model_len - 1 = {self.max_model_len - 1} tokens "
                f"must fit in one step, but max_num_batched_tokens is {self.max_num_batched_tokens}; raise it or "
                "enable_chunked_prefill"
            )
