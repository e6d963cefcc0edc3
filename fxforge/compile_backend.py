"""torch.compile(model, backend="fxforge", options={...}): Inductor, with fxforge's ops where it recognises them.

The backend is Inductor's own `compile_fx` with one extra post-grad graph pass (compile_patterns.py):
Dynamo graph -> aot_autograd -> functional ATen graph -> the fxforge pass replaces RMSNorm, SwiGLU,
RoPE and attention by fxforge custom ops -> Inductor compiles the rest, calling the custom ops as
extern kernels. Graph breaks, guards, dynamic shapes, recompiles and `mode=` are Inductor's; a graph in
which nothing is recognised is compiled exactly as by backend="inductor". Graphs that need gradients
(training) are left to Inductor untouched: the custom ops have no backward.

Options (validated like pass configs; an unknown key is an error naming the valid ones):
  rmsnorm, swiglu, rope, attention   which patterns to replace (all true by default)
  k_format, v_format                 KV formats the replaced attention reads K / V through ("native":
                                     unquantized; bfp12, bfp14, bfp16, mxfp4, bfloat16, float16, float32)
  block                              BFP block along head_dim (16, 32, 64)
  ksort, ksort_v                     KSort (weight-norm order) of the K / V channels before quantizing
  kernels                            auto | triton | reference: the ops' kernel binding (ir/ops.py);
                                     auto = triton when triton is installed (CUDA tensors then run the
                                     Triton kernels, CPU tensors the references)

What each compiled graph got is counted on the backend object (`FxforgeBackend.counts`) and in
torch._dynamo.utils.counters["fxforge"]. Inductor's on-disk caches are bypassed for these graphs (a cache
hit would skip the pass and its counts), so each process compiles them afresh. Registration: `import fxforge`
registers "fxforge" with Dynamo, and the `torch_dynamo_backends` entry point lets Dynamo find it without the
import.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fxforge.compile_ops import NATIVE, check_format
from fxforge.compile_patterns import Replacer
from fxforge.ir.errors import PassConfigError

BACKEND_NAME = "fxforge"


class Kernels(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"


@dataclass(frozen=True)
class BackendOptions:
    """The options of backend="fxforge" (see the module docstring)."""

    VERSION: ClassVar[int] = 1

    rmsnorm: bool = True
    swiglu: bool = True
    rope: bool = True
    attention: bool = True
    k_format: str = NATIVE
    v_format: str = NATIVE
    block: int = 32
    ksort: bool = False
    ksort_v: bool = False
    kernels: Kernels = Kernels.AUTO

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} must be true or false")
        if not isinstance(self.block, int) or isinstance(self.block, bool):
            raise ValueError(f"block={self.block!r} must be an integer (16, 32 or 64)")
        try:
            object.__setattr__(self, "kernels", Kernels(self.kernels))
        except ValueError:
            raise ValueError(f"kernels={self.kernels!r} is not valid; expected one of "
                             f"{[k.value for k in Kernels]}") from None
        object.__setattr__(self, "k_format_name", check_format("k_format", self.k_format, self.block))
        object.__setattr__(self, "v_format_name", check_format("v_format", self.v_format, self.block))
        for side, enabled, fmt in (("ksort", self.ksort, self.k_format_name), ("ksort_v", self.ksort_v, self.v_format_name)):
            if enabled and (fmt == NATIVE or fmt in ("float32", "bfloat16", "float16")):
                raise ValueError(f"{side}=True needs a block format for {'k' if side == 'ksort' else 'v'}_format "
                                 f"(bfp12, bfp14, bfp16, mxfp4), got {fmt!r}: a permutation only moves blocks")
        if (self.ksort or self.ksort_v or self.k_format_name != NATIVE or self.v_format_name != NATIVE) and not self.attention:
            raise ValueError("KV formats and ksort act in the replaced attention; they need attention=True")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "BackendOptions":
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise PassConfigError(f"unknown option(s) {unknown} for torch.compile backend {BACKEND_NAME!r}; "
                                  f"valid options: {sorted(names)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise PassConfigError(f"invalid option for torch.compile backend {BACKEND_NAME!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v)
                for f in dataclasses.fields(self)}

    def impl(self) -> str:
        """The kernel binding the replaced ops carry (ir/ops.py's impl argument)."""
        if self.kernels is Kernels.AUTO:
            return "triton" if importlib.util.find_spec("triton") is not None else "reference"
        return self.kernels.value


class FxforgeBackend:
    """A torch.compile backend: `torch.compile(model, backend=FxforgeBackend({...}))`, or the registered
    name with options=. `counts` totals the replaced ops over every graph it compiled."""

    def __init__(self, options: dict[str, Any] | BackendOptions | None = None):
        self.options = options if isinstance(options, BackendOptions) else BackendOptions.from_dict(options)
        self.counts: Counter = Counter()
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options=None):
        if options is not None:  # torch.compile(backend=FxforgeBackend(...), options=...) would be ambiguous
            raise PassConfigError("give the options to FxforgeBackend(...) or use backend='fxforge' with options=, "
                                  "not both")
        from torch._inductor.compile_fx import compile_fx

        patches = _mode_options(mode)
        if not _needs_gradients(example_inputs):
            patches["post_grad_custom_pre_pass"] = FxforgeGraphPass(self, example_inputs)
        self.graphs += 1
        return compile_fx(gm, example_inputs, config_patches=patches)

    def record(self, counts: Counter) -> None:
        from torch._dynamo.utils import counters

        self.counts.update(counts)
        counters[BACKEND_NAME].update(counts)


def fxforge_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options=None):
    """The function registered as backend="fxforge": torch.compile passes its mode= and options= here."""
    return FxforgeBackend(options)(gm, example_inputs, mode=mode)


def _mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor config for torch.compile's mode= (what backend="inductor" applies for it)."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    options = list_mode_options(mode)
    if not options and mode not in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise PassConfigError(f"mode={mode!r} is not a torch.compile mode; expected default, reduce-overhead, "
                              "max-autotune or max-autotune-no-cudagraphs")
    return dict(options)


def _needs_gradients(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


class FxforgeGraphPass(CustomGraphPass):
    """Inductor's post-grad custom pass for one compiled graph: replace, then count on the backend."""

    def __init__(self, backend: FxforgeBackend, example_inputs):
        self.backend, self.inputs = backend, list(example_inputs)

    def __call__(self, graph: torch.fx.Graph) -> None:
        options = self.backend.options
        self.backend.record(Replacer(options, options.impl(), self.inputs)(graph))

    def uuid(self):
        # No cache key, so Inductor's FX graph and AOTAutograd caches are bypassed for these graphs: a cache hit
        # skips this pass, which would leave `counts` empty, and KSort orders come from the weights' values,
        # which the cache key does not see. fxforge graphs are compiled every time.
        return None
