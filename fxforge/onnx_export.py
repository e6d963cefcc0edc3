"""ONNX export of an fxforge model: the runtime-shaped forward with fxforge's ops kept as ONNX nodes.

    export_onnx(model, "out/dir")  ->  out/dir/model.onnx   (CLI: fxforge export ARTIFACT --onnx -o DIR)

Inputs: input_ids [T], positions [T], slot_mapping [T], page_table [S, P], query_start [S+1],
seq_lens [S], logits_indices [R], then the paged KV cache, four tensors per layer (kv.{i}.k_data,
k_scale, v_data, v_scale; ir/modules.py). Outputs: logits [R, V], then the updated cache tensors
(kv.{i}.*.out), which the caller feeds back as the next step's cache.

The in-place fxforge::kv_write cannot be exported; the graph is first rewritten (on a copy) to a
functional write that returns the updated cache, which later reads of the cache use instead. The fused
pairs of passes/fuse_elementwise.py (add_rmsnorm, rope_kv_write) are split back into their ops first
(the same results), so they export as the ops below. Then
torch.onnx.export(dynamo=True) maps each fxforge op to a node of the custom domain `fxforge` (opset
version DOMAIN_VERSION, schemas registered with onnx): RoPE, RMSNorm, SiluMul, KVWrite, PagedAttention. A node
keeps the op's arguments as attributes (formats, eps, scale, ...), so a runtime that knows the domain
can run its own kernel; for every other runtime each node's overload names a model-local ONNX function
whose body is the op in standard ONNX ops (fxforge/onnx_forms.py builds one per overload: attributes,
dtypes and static dims), so ONNX Runtime (1.30 and later) runs the model with no extension.

Passes with an ONNX form: ksort, bfp-kv (dense and BFP formats, keys cached after RoPE) and lower
(binding is a runtime matter; the fused ops export as RMSNorm / SiluMul). A model that ran any other
pass, uses MXFP4, caches keys before RoPE or has MoE layers is refused before anything is written,
naming what has no ONNX form.
"""

from __future__ import annotations

import copy
import operator
import os
import tempfile
from pathlib import Path

import torch
import torch.fx as fx

from fxforge.errors import FxforgeError
from fxforge.ir import ops
from fxforge.ir.modules import TENSORS_PER_LAYER
from fxforge.kernels.bfp import parse_kv_format
from fxforge.kernels.kv_cache import kv_write_pair_ref
from fxforge.passes.fuse_elementwise import unfuse_elementwise

DOMAIN, DOMAIN_VERSION = "fxforge", 1
ONNX_FILE = "model.onnx"
ONNX_PASSES = ("ksort", "bfp-kv", "lower")  # passes whose result has an ONNX form
CACHE_NAMES = ("k_data", "k_scale", "v_data", "v_scale")
RUNTIME_INPUTS = ("input_ids", "positions", "slot_mapping", "page_table", "query_start", "seq_lens", "logits_indices")
OPSET = 18
IR_VERSION = 10  # the first with function overloads


@torch.library.custom_op("fxforge::kv_write_functional", mutates_args=())
def kv_write_functional(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
                        v_data: torch.Tensor, v_scale: torch.Tensor, slot_mapping: torch.Tensor, k_format: str,
                        v_format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fxforge::kv_write without mutation: the updated copies of the four cache tensors."""
    new = [t.clone() for t in (k_data, k_scale, v_data, v_scale)]
    kv_write_pair_ref(k, v, *new, slot_mapping, k_format, v_format)
    return tuple(new)


@kv_write_functional.register_fake
def _kv_write_functional_fake(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format, v_format):
    return tuple(torch.empty_like(t) for t in (k_data, k_scale, v_data, v_scale))


KV_WRITE_FUNCTIONAL = torch.ops.fxforge.kv_write_functional.default


# -- what can be exported ----------------------------------------------------------------------------

def check_exportable(model) -> None:
    """FxforgeError naming every pass, format or layer of `model` that has no ONNX form."""
    problems = sorted({r["name"] for r in getattr(model, "passes", []) if r["name"] not in ONNX_PASSES})
    reasons = [f"pass(es) {problems} (passes with an ONNX form: {list(ONNX_PASSES)})"] if problems else []
    formats = sorted({f for pair in model.kv_formats() for f in pair if parse_kv_format(f).kind == "mxfp4"})
    if formats:
        reasons.append(f"KV format(s) {formats} (ONNX forms exist for bfp12/14/16 and dense formats)")
    if model.spec.is_moe:
        reasons.append(f"the MoE layers of {model.spec.family} (data-dependent expert routing)")
    if any(r["name"] == "bfp-kv" and r.get("config", {}).get("pre_rope") for r in getattr(model, "passes", [])):
        reasons.append("bfp-kv with pre_rope=True (PagedAttention's body reads rotated keys)")
    if reasons:
        raise FxforgeError(f"cannot export {model.spec.name or model.spec.family} to ONNX: no ONNX form for "
                           + "; ".join(reasons))


# -- the functional forward ----------------------------------------------------------------------------

def functional_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm (sharing its weights) whose KV writes return the updated cache: later reads of the cache
    read the written copy, and the forward returns (logits, updated cache list)."""
    graph = copy.deepcopy(gm.graph)
    unfuse_elementwise(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    cache_nodes = {node.args[1]: node for node in graph.nodes
                   if node.op == "call_function" and node.target is operator.getitem
                   and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"}
    latest = dict(cache_nodes)  # cache index -> the node holding its current value
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is ops.KV_WRITE]:
        with graph.inserting_after(node):
            written = graph.call_function(KV_WRITE_FUNCTIONAL, tuple(node.args[:9]))
        getters = []
        with graph.inserting_after(written):
            for i in range(TENSORS_PER_LAYER):
                getters.append(graph.call_function(operator.getitem, (written, i)))
        for old, new in zip(node.args[2:6], getters):
            index = next(i for i, n in latest.items() if n is old)
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in (written, *getters)
                                      and order.get(user, len(order)) > order[node])
            latest[index] = new
        graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], [latest[i] for i in sorted(latest)]),)
    result = fx.GraphModule(gm, graph, class_name="FxforgeFunctionalDecoder")
    result.meta.update(gm.meta)
    return result


# -- the fxforge domain: schemas, translations, function bodies ------------------------------------------

_INPUTS = {"RoPE": ["x", "positions", "inv_freq", "channel_perm"], "RMSNorm": ["x", "weight"],
           "SiluMul": ["gate", "up"],
           "KVWrite": ["k", "v", "k_data", "k_scale", "v_data", "v_scale", "slot_mapping"],
           "PagedAttention": ["q", "k_data", "k_scale", "v_data", "v_scale", "page_table", "query_start", "seq_lens"]}
_OUTPUTS = {"RoPE": ["y"], "RMSNorm": ["y"], "SiluMul": ["y"], "PagedAttention": ["y"],
            "KVWrite": ["k_data_out", "k_scale_out", "v_data_out", "v_scale_out"]}
_ATTRIBUTES = {"RoPE": {"interleaved": "INT"}, "RMSNorm": {"eps": "FLOAT"}, "SiluMul": {},
               "KVWrite": {"k_format": "STRING", "v_format": "STRING"},
               "PagedAttention": {"k_format": "STRING", "v_format": "STRING", "scale": "FLOAT", "sliding_window": "INT"}}


def register_domain() -> None:
    """Declare the fxforge domain's ops (version DOMAIN_VERSION) to onnx, once per process."""
    import onnxscript  # noqa: F401  (onnx.reference, which onnxscript loads, indexes the schemas it finds first)
    from onnx import defs

    all_types = sorted(defs.OpSchema.all_tensor_types_ir4() if hasattr(defs.OpSchema, "all_tensor_types_ir4")
                       else ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int64)",
                             "tensor(int32)", "tensor(uint8)"])
    for op_type, inputs in _INPUTS.items():
        if defs.has(op_type, DOMAIN):
            continue
        option = defs.OpSchema.FormalParameterOption
        formal_in = [defs.OpSchema.FormalParameter(name, f"T{i}", param_option=option.Optional
                                                   if name == "channel_perm" else option.Single)
                     for i, name in enumerate(inputs)]
        formal_out = [defs.OpSchema.FormalParameter(name, f"O{i}") for i, name in enumerate(_OUTPUTS[op_type])]
        constraints = [(f"T{i}", all_types, "") for i in range(len(inputs))]
        constraints += [(f"O{i}", all_types, "") for i in range(len(_OUTPUTS[op_type]))]
        attributes = [defs.OpSchema.Attribute(name, getattr(defs.OpSchema.AttrType, kind), "", required=False)
                      for name, kind in _ATTRIBUTES[op_type].items()]
        for name, doc in (("impl", "kernel binding (ir/ops.py)"), ("variant", "the overload of the body")):
            attributes.append(defs.OpSchema.Attribute(name, defs.OpSchema.AttrType.STRING, doc, required=False))
        defs.register_schema(defs.OpSchema(op_type, DOMAIN, DOMAIN_VERSION, inputs=formal_in, outputs=formal_out,
                                           type_constraints=constraints, attributes=attributes))


# dims that differ between calls of one exported model (tokens, sequences, pages): a body does not fix them
_DYNAMIC_DIMS = {"x": (0,), "positions": (0,), "gate": (0,), "up": (0,), "k": (0,), "v": (0,), "q": (0,),
                 "slot_mapping": (0,), "k_data": (0,), "k_scale": (0,), "v_data": (0,), "v_scale": (0,),
                 "page_table": (0, 1), "query_start": (0,), "seq_lens": (0,)}


def variant(op_type: str, attributes: dict, inputs: list) -> str:
    """The overload naming one body of an op: its attributes, its inputs' dtypes and static dims decide the
    body (fxforge/onnx_forms.py builds it with them fixed). `inputs` are tensors, or the exporter's values."""
    import hashlib

    from fxforge.onnx_forms import onnx_dtype

    static = tuple((onnx_dtype(x.dtype) if isinstance(x.dtype, torch.dtype) else int(x.dtype),
                    tuple(None if d in _DYNAMIC_DIMS.get(name, ()) else int(size) for d, size in enumerate(x.shape)))
                   for name, x in zip(_INPUTS[op_type], inputs))
    text = repr((op_type, sorted(attributes.items()), static))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


_ATTRIBUTE_ARGS = {  # op -> (op_type, positions of tensor inputs, {attribute: argument position})
    ops.ROPE.default: ("RoPE", (0, 1, 2, 4), {"interleaved": 3}),
    ops.RMSNORM.default: ("RMSNorm", (0, 1), {"eps": 2}),
    ops.SWIGLU.default: ("SiluMul", (0, 1), {}),
    KV_WRITE_FUNCTIONAL: ("KVWrite", (0, 1, 2, 3, 4, 5, 6), {"k_format": 7, "v_format": 8}),
    ops.ATTENTION.default: ("PagedAttention", (0, 1, 2, 3, 4, 5, 6, 7),
                            {"k_format": 8, "v_format": 9, "scale": 10, "sliding_window": 11}),
}
_ATTRIBUTE_TYPES = {"interleaved": int, "eps": float, "scale": float, "sliding_window": int, "k_format": str,
                    "v_format": str}


def _overload_of(target):
    """The OpOverload of a call target (the canonical graph calls packets such as torch.ops.fxforge.rope)."""
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def _call(target, args) -> tuple[str, list, dict, str]:
    """(op_type, tensor inputs (None for an absent optional), attributes, impl) of one op call."""
    op_type, tensor_positions, attribute_positions = _ATTRIBUTE_ARGS[_overload_of(target)]
    inputs = [args[i] for i in tensor_positions]
    while inputs and inputs[-1] is None:
        inputs.pop()
    attributes = {name: _ATTRIBUTE_TYPES[name](args[i]) for name, i in attribute_positions.items()}
    impl = args[-1] if _overload_of(target) is not KV_WRITE_FUNCTIONAL else "reference"
    return op_type, inputs, attributes, impl


def _translations() -> dict:
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def translation(target):
        def translate(*args):
            op_type, inputs, attributes, impl = _call(target, args)
            overload = variant(op_type, attributes, inputs)
            return getattr(opset, op_type)(*inputs, **attributes, impl=impl, variant=overload)

        return translate

    return {target: translation(target) for target in _ATTRIBUTE_ARGS}


class _Recorder(fx.Interpreter):
    """Runs the functional graph once and keeps the real arguments of the first call of each variant."""

    def __init__(self, gm):
        super().__init__(gm)
        self.examples: dict[str, tuple] = {}

    def call_function(self, target, args, kwargs):
        if _overload_of(target) in _ATTRIBUTE_ARGS:
            op_type, inputs, attributes, _ = _call(target, args)
            key = variant(op_type, attributes, inputs)
            self.examples.setdefault(key, (op_type, inputs, attributes))
        return super().call_function(target, args, kwargs)


# -- the model ----------------------------------------------------------------------------------------------

def example_batch(model):
    """A small batch whose dynamic sizes all differ (tokens 7, sequences 2, pages per sequence 4, pages 11,
    logit rows 5), so the export keeps each size symbolic instead of tying equal ones together."""
    from fxforge.ir.model import build_batch

    page_size = 16
    batch = build_batch([[1, 2, 3], [4, 5, 6, 7]], [0, 0], [[0, 1, 2, 3], [4, 5, 6, 7]], page_size, model.device)
    batch.logits_indices = torch.tensor([0, 2, 3, 5, 6], device=model.device)
    return batch, model.new_kv_cache(11, page_size)


def input_names(num_layers: int) -> list[str]:
    return list(RUNTIME_INPUTS) + [f"kv.{i}.{n}" for i in range(num_layers) for n in CACHE_NAMES]


def to_onnx(model):
    """The ModelProto of `model`'s runtime-shaped forward (see the module docstring)."""
    import onnx

    from fxforge import onnx_forms

    check_exportable(model)
    register_domain()
    functional = functional_graph(_captured(model)).eval()
    batch, cache = example_batch(model)
    recorder = _Recorder(functional)
    with torch.no_grad():
        recorder.run(*batch.args(), [t.clone() for t in cache])
    dims = [{0: torch.export.Dim.AUTO}] * 3 + [{0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}]
    dims += [{0: torch.export.Dim.AUTO}] * 3
    dynamic = (*dims, [{0: torch.export.Dim.AUTO}] * len(cache))
    names = input_names(model.spec.num_layers)
    outputs = ["logits"] + [f"{n}.out" for n in names[len(RUNTIME_INPUTS):]]
    with torch.no_grad():
        program = torch.onnx.export(functional, (*batch.args(), cache), dynamo=True, dynamic_shapes=dynamic,
                                    custom_translation_table=_translations(), input_names=names,
                                    output_names=outputs, opset_version=OPSET, verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:
        if node.domain == DOMAIN:
            overload = next(a.s.decode() for a in node.attribute if a.name == "variant")
            node.overload = overload
            keep = [a for a in node.attribute if a.name != "variant"]
            del node.attribute[:]
            node.attribute.extend(keep)
    for key, (op_type, inputs, attributes) in recorder.examples.items():
        formal = _INPUTS[op_type][:len(inputs)]
        proto.functions.append(onnx_forms.function(DOMAIN, op_type, formal, inputs, attributes,
                                                   [*_ATTRIBUTES[op_type], "impl"], key, OPSET))
    # the exporter leaves custom-op outputs untyped (it cannot infer them); ORT infers them from the bodies
    inputs = {v.name: v for v in proto.graph.input}
    for out in proto.graph.output:  # an updated cache tensor has its input's type and shape
        if not out.type.HasField("tensor_type") and out.name.removesuffix(".out") in inputs:
            out.type.CopyFrom(inputs[out.name.removesuffix(".out")].type)
    typed = [v for v in proto.graph.value_info if v.type.HasField("tensor_type")]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(typed)
    proto.ir_version = max(proto.ir_version, IR_VERSION)
    onnx.checker.check_model(proto)
    return proto


def _captured(model) -> fx.GraphModule:
    from fxforge.ir.capture import capture

    return model.module if isinstance(model.module, fx.GraphModule) else capture(model.module)


def export_onnx(model, directory) -> Path:
    """Write `model`'s ONNX form to directory/model.onnx atomically (a failure leaves no file); returns its path."""
    from fxforge.artifact import check_output_dir

    import onnx

    check_exportable(model)
    target = check_output_dir(directory)
    proto = to_onnx(model)
    target.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{ONNX_FILE}.", dir=target)
    os.close(handle)
    try:
        onnx.save(proto, staging)
        os.replace(staging, target / ONNX_FILE)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return target / ONNX_FILE
