"""fxforge.optimize (this module: fxforge.optimizer): capture a model, run a pass pipeline over it, return an OptimizedModel.

Weights are not copied: the optimised graph shares every tensor with the model it came from, and
each pass gets private copies only of the tensors it declares it rewrites (copy-on-write, see
ir/sharing.py). `optimize_` is the in-place variant (torchao's `quantize_`): no tensor is cloned,
and the given model itself becomes the optimised one.

An optimised model carries its whole pass history (`passes`, the records plan.json stores);
optimising it again appends to that history.
"""

from __future__ import annotations

from fxforge.ir.capture import capture
from fxforge.ir.model import Model
from fxforge.ir.sharing import share
from fxforge.passes.manager import PassContext, build_pipeline, record_configs, run_pipeline

# The main job's pipeline: BFP16 K and V caches cost +0.05% perplexity on SmolLM2 / GSM8K (BENCHMARKS.md)
# for 8.25 bits per value instead of 32.
DEFAULT_PASSES: list = [{"name": "bfp-kv", "k_format": "bfp16", "v_format": "bfp16", "block": 32}]


class OptimizedModel(Model):
    """A Model whose module is the rewritten GraphModule, plus the record of every pass it ran."""

    def __init__(self, module, spec, tokenizer=None, source=None, passes=None):
        super().__init__(module, spec, tokenizer, source)
        self.passes: list[dict] = passes or []

    @property
    def graph_module(self):
        return self.module

    def save(self, directory, onnx: bool = False) -> None:
        """Write the artifact directory (plan.json, weights.safetensors, graph.py, report.md; with onnx=True
        also model.onnx, exported before anything is written, so a model without ONNX form writes nothing)."""
        from fxforge.artifact import check_output_dir, save_artifact

        write_onnx = None
        if onnx:
            from fxforge.onnx_export import ONNX_FILE, to_onnx

            check_output_dir(directory)
            proto = to_onnx(self)

            def write_onnx(staging):
                import onnx as onnx_lib

                onnx_lib.save(proto, str(staging / ONNX_FILE))

        save_artifact(self, directory, write_extra=write_onnx)


def optimize(model: Model, passes: list | None = None, calib: list[str] | None = None, debug: bool = True,
             progress=None) -> OptimizedModel:
    """Run `passes` (configs, names or dicts) over `model`; the original is left untouched and shares
    every tensor that no pass rewrote with the result."""
    return _run(model, passes, calib, debug, progress, inplace=False)


def optimize_(model: Model, passes: list | None = None, calib: list[str] | None = None, debug: bool = True,
              progress=None) -> OptimizedModel:
    """In place: rewrite `model`'s own graph and tensors (no weight is cloned, peak memory stays one
    copy of the weights). `model` becomes the optimised model and is returned as an OptimizedModel
    over the same graph; keep using either, they are one model."""
    optimized = _run(model, passes, calib, debug, progress, inplace=True)
    model.module = optimized.module
    if isinstance(model, OptimizedModel):
        model.passes = optimized.passes
    return optimized


def _run(model: Model, passes, calib, debug: bool, progress, inplace: bool) -> OptimizedModel:
    history = list(getattr(model, "passes", []))
    configs = build_pipeline(list(passes or []), record_configs(history))
    gm = capture(model.module)
    if not inplace:
        gm = share(gm)
    ctx = PassContext(model=model, calib=calib, debug=debug, inplace=inplace)
    gm, records = run_pipeline(gm, configs, ctx, progress)
    return OptimizedModel(gm, model.spec, model.tokenizer, dict(model.source), history + records)
