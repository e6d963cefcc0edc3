"""torch.compile(backend="fxforge"): HF Llama-family models compile, match eager, and the patterns were
replaced (counted); BFP KV options equal the bfp-kv / ksort passes; nothing recognised = Inductor."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

import fxforge
from fxforge.compile_backend import BackendOptions, FxforgeBackend, fxforge_backend
from fxforge.errors import PassConfigError
from fxforge.passes import BFPKVCache, KSort

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=32)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5)),
}


def hf_model(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Every test starts from Dynamo's empty state (no compiled frames, no recompile counts)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def ids(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def compiled_logits(model, tokens, backend):
    return torch.compile(model, backend=backend)(tokens).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_family_compiles_matches_eager_and_replaces_patterns(family):
    model = hf_model(family)
    backend = FxforgeBackend()
    tokens = ids(9)
    out = compiled_logits(model, tokens, backend)
    with torch.no_grad():
        ref = model(tokens).logits
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4, f"{family}: compiled vs eager max |diff| {diff:.3g}"
    layers = SMALL["num_hidden_layers"]
    norms = 2 * layers + 1 + (2 * layers if family == "qwen3" else 0)  # layer norms, final norm, QK-norms
    assert dict(backend.counts) == {"rmsnorm": norms, "swiglu": layers, "rope": 2 * layers, "attention": layers}


def test_dynamic_shapes_recompile_through_the_pass():
    """A second length makes Dynamo recompile with symbolic shapes; the patterns are found there too."""
    model = hf_model("llama")
    backend = FxforgeBackend({"k_format": "bfp16", "v_format": "bfp16", "block": 16})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for length in (9, 13):
            tokens = ids(length)
            eager_bfp16 = fxforge.optimize(fxforge.load(model), passes=[BFPKVCache("bfp16", "bfp16", block=16)]).logits(tokens)
            assert (compiled(tokens).logits - eager_bfp16).abs().max() < 1e-4
    assert backend.graphs == 2 and backend.counts["attention"] == 2 * SMALL["num_hidden_layers"]


def test_bfp_kv_with_ksort_equals_the_passes():
    """BFP12 K in the replaced attention, in KSort order, computes what ksort + bfp-kv compute; the
    quantization is real (far from eager) and the order matters (far from natural order). Qwen3: head_dim
    32 holds two blocks of 16, so the order can move channels between blocks."""
    model = hf_model("qwen3")
    tokens = ids(40)
    out = compiled_logits(model, tokens, FxforgeBackend({"k_format": "bfp12", "block": 16, "ksort": True}))
    base = fxforge.load(model)
    sorted_bfp = fxforge.optimize(base, passes=[KSort(block=16), BFPKVCache("bfp12", "native", block=16)]).logits(tokens)
    natural_bfp = fxforge.optimize(base, passes=[BFPKVCache("bfp12", "native", block=16)]).logits(tokens)
    assert (out - sorted_bfp).abs().max() < 1e-4
    assert (sorted_bfp - natural_bfp).abs().max() > 1e-2
    assert (out - base.logits(tokens)).abs().max() > 1e-2


def norm_and_mlp(x, norm_weight, gate_weight, up_weight):
    """An HF-style RMSNorm then SwiGLU MLP."""
    xf = x.float()
    normed = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    return torch.nn.functional.silu(normed @ gate_weight) * (normed @ up_weight)


def test_warm_inductor_caches_still_run_the_pass():
    """The second compile of the same graph would be a cache hit of Inductor's FX graph / AOTAutograd caches,
    which returns the compiled code without running the pass (replaced ops uncounted): the backend bypasses them."""
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 16, generator=gen), torch.rand(16, generator=gen) + 0.5, torch.randn(16, 24, generator=gen),
            torch.randn(16, 24, generator=gen))
    with torch._inductor.config.patch(fx_graph_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            backend = FxforgeBackend()
            out = torch.compile(norm_and_mlp, backend=backend)(*args)
            assert dict(backend.counts) == {"rmsnorm": 1, "swiglu": 1}
            torch.testing.assert_close(out, norm_and_mlp(*args))


def test_block_that_does_not_divide_head_dim_fails_the_compile_naming_it():
    q = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                             backend=FxforgeBackend({"k_format": "bfp16"}))
    with pytest.raises(Exception, match=r"k_format='bfp16_32' cannot quantize .*head_dim=16 is not a multiple of block=32"):
        compiled(q, q, q)


def test_graph_with_nothing_recognised_compiles_as_inductor():
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))

    def fn(x):
        return torch.relu(x @ weight).sin() + x.cos()

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    backend = FxforgeBackend()
    ours = torch.compile(fn, backend=backend)(x)
    torch._dynamo.reset()
    theirs = torch.compile(fn, backend="inductor")(x)
    assert backend.graphs == 1 and not backend.counts
    assert torch.equal(ours, theirs)


def test_options_are_validated_like_pass_configs():
    with pytest.raises(PassConfigError, match=r"unknown option\(s\) \['k_fmt'\].*valid options: \[.*'k_format'"):
        BackendOptions.from_dict({"k_fmt": "bfp12"})
    with pytest.raises(PassConfigError, match="bfp13"):
        BackendOptions.from_dict({"k_format": "bfp13"})
    with pytest.raises(PassConfigError, match="ksort=True needs a block format"):
        BackendOptions.from_dict({"ksort": True})
    with pytest.raises(PassConfigError, match="kernels='cuda' is not valid"):
        BackendOptions.from_dict({"kernels": "cuda"})
    with pytest.raises(PassConfigError, match="rope='yes' must be true or false"):
        BackendOptions.from_dict({"rope": "yes"})
    assert BackendOptions.from_dict({"k_format": "bfp12", "block": 16}).k_format_name == "bfp12_16"


def test_unknown_option_fails_the_compile_naming_it():
    compiled = torch.compile(lambda x: x + 1, backend="fxforge", options={"speed": "max"})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['speed'\]"):
        compiled(torch.ones(2))


def test_entry_point_names_the_backend_function():
    (point,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "fxforge"]
    assert point.load() is fxforge_backend


def test_import_fxforge_registers_without_importing_torch():
    code = ("import sys, fxforge; assert 'torch' not in sys.modules; "
            "from torch._dynamo.backends.registry import lookup_backend; "
            "fn = lookup_backend('fxforge'); print(fn.__module__, fn.__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["fxforge", "_compile_backend"]  # the import hook's, not the entry point's
