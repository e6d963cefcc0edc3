"""The fxforge command line: compile, eval, analyze, generate.

Any FxforgeError prints one line `error: ...` naming the bad input and exits with code 2.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fxforge.errors import FxforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fxforge: compile LLMs with passes from systems papers, evaluate and analyze them.")
console = Console(stderr=True)
out = Console()

DEFAULT_MODEL = "smollm2-135m"


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FxforgeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

    return wrapper


def _dtype(name: str):
    import torch

    aliases = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
    if name not in aliases:
        raise FxforgeError(f"--dtype {name!r} is not valid; expected one of {sorted(set(aliases))}")
    return getattr(torch, aliases[name])


def _load(model: str, dtype: str, random_init: bool = False, device: str = "cpu"):
    import fxforge

    with console.status(f"loading {model}"):
        return fxforge.load(model, dtype=_dtype(dtype), random_init=random_init, device=device)


def pass_list(passes: str | None, options: dict) -> list[dict]:
    """`--passes a,b` (None: the default pipeline) plus the pass-specific CLI options that were given ->
    pass dicts; an option given on the command line overrides the default pipeline's value."""
    from fxforge.optimizer import DEFAULT_PASSES
    from fxforge.passes.manager import registered_passes

    if passes is None:
        entries = [dict(p) for p in DEFAULT_PASSES]
    else:
        entries = [{"name": p.strip()} for p in passes.split(",") if p.strip()]
    registry = registered_passes()
    for entry in entries:
        if entry["name"] in registry:
            fields = registry[entry["name"]].config_type.__dataclass_fields__
            entry.update({k: v for k, v in options.items() if v is not None and k in fields})
    return entries


PassesOpt = typer.Option(None, "--passes", help="comma-separated pass names, in order ('' = identity; "
                         "compile's default: the default pipeline, fxforge.optimizer.DEFAULT_PASSES)")
KvFormatOpt = typer.Option(None, "--kv-format", help="bfp-kv: K cache format (bfp12, bfp14, bfp16, mxfp4, bfloat16, float32)")
VFormatOpt = typer.Option(None, "--v-format", help="bfp-kv: V cache format (defaults to the pass default)")
BlockOpt = typer.Option(None, "--block", help="bfp-kv / ksort: BFP block size along head_dim (16, 32, 64)")
MetricOpt = typer.Option(None, "--ksort-metric", help="ksort: weight_norm or calibrated")
# options shared by the study commands (tying-study, skip-study)
StudyMaxStepsOpt = typer.Option(None, help="also stop every run after this many steps")
StudyLrOpt = typer.Option(1e-4, help="AdamW learning rate")
StudySamplesOpt = typer.Option(128, help="sequences the original samples on calibration prompts")
StudyEvalTokensOpt = typer.Option(16384, help="held-out tokens scored per run")
StudyMaxMinutesOpt = typer.Option(None, help="start no run after this many minutes (the rest are listed as skipped)")
KvPresetOpt = typer.Option(None, "--kv-preset", help="KV-cache preset (fxforge.passes.kv_preset): k4 = BFP12 K at 4.25 "
                           "bits/value, V unquantized; kv4 = BFP12 K and V at 4.5 bits/value; both pre-RoPE keys with "
                           "calibrated scales and order. Replaces the KV passes of the "
                           "pipeline and calibrates on the calibration split of --data")


def _with_kv_preset(plist: list[dict], preset: str | None, passes: str | None, *kv_options) -> list[dict]:
    """The preset's passes first, then the --passes given (compile's default pipeline is replaced)."""
    if preset is None:
        return plist
    from fxforge.passes import kv_preset
    from fxforge.passes.manager import pass_name

    configs = kv_preset(preset)
    if any(option is not None for option in kv_options):
        raise FxforgeError(f"--kv-preset {preset} sets the KV formats and channel methods itself; drop --kv-format, "
                           "--v-format, --block and --ksort-metric")
    names = {pass_name(type(c)) for c in configs}
    others = plist if passes is not None else []
    clash = sorted({p["name"] for p in others} & names)
    if clash:
        raise FxforgeError(f"--kv-preset {preset} already runs {sorted(names)}; remove {clash} from --passes")
    return [{"name": pass_name(type(c)), **c.to_dict()} for c in configs] + others


PassOptionOpt = typer.Option(None, "--option", help="KEY=VALUE for the passes that have option KEY (repeat it), "
                             "e.g. --passes layer-tying --option unique_layers=10 --option rank=32")


def _options(kv_format, v_format, block, ksort_metric, pass_options: list[str] | None = None) -> dict:
    return {"k_format": kv_format, "v_format": v_format, "block": block, "metric": ksort_metric,
            **_parse_pass_options(pass_options or [])}


def _parse_pass_options(items: list[str]) -> dict:
    """--option KEY=VALUE items -> {KEY: value}, the value read as JSON (3, 0.5, true) or else kept as text."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise FxforgeError(f"--option {item!r} is not KEY=VALUE")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return values


def _check_pass_options(plist: list[dict], items: list[str] | None) -> None:
    """Every --option must name an option of some pass in the list."""
    from fxforge.passes.manager import registered_passes

    registry = registered_passes()
    fields = {f for p in plist if p["name"] in registry for f in registry[p["name"]].config_type.__dataclass_fields__}
    unknown = sorted(set(_parse_pass_options(items or [])) - fields)
    if unknown:
        raise FxforgeError(f"--option {unknown}: no pass in {[p['name'] for p in plist]} has such an option")


def _calib_texts(passes: list[dict], data: str) -> list[str] | None:
    if not any(p.get("metric") == "calibrated" or p["name"] == "kv-mix" or p.get("experts") == "measured"
               for p in passes):
        return None
    from fxforge.data import load_texts

    return load_texts(data, split="calib")


def _optimize(model, passes: list[dict], data: str):
    import fxforge

    with console.status("running passes") as status:
        return fxforge.optimize(model, passes=passes, calib=_calib_texts(passes, data),
                                progress=lambda name: status.update(f"pass {name} done"))


@app.command("compile")
@_guard
def compile_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model name, .gguf path, HF directory or artifact"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write"),
    passes: Optional[str] = PassesOpt,
    kv_format: Optional[str] = KvFormatOpt,
    v_format: Optional[str] = VFormatOpt,
    block: Optional[int] = BlockOpt,
    ksort_metric: Optional[str] = MetricOpt,
    kv_preset: Optional[str] = KvPresetOpt,
    option: Optional[list[str]] = PassOptionOpt,
    dtype: str = typer.Option("float32", help="weight dtype: float32, bfloat16, float16"),
    random_init: bool = typer.Option(False, help="random weights for a named shape (speed work only)"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="measure perplexity after compiling"),
    data: str = typer.Option("gsm8k", help="evaluation text: gsm8k or a .txt/.jsonl path"),
    max_tokens: int = typer.Option(8192, help="tokens to score when evaluating"),
    context: int = typer.Option(512, help="evaluation window length"),
):
    """Compile MODEL with PASSES into an artifact directory; by default also evaluate it."""
    from fxforge.artifact import check_output_dir, save_artifact
    from fxforge.passes.manager import build_pipeline

    plist = pass_list(passes, _options(kv_format, v_format, block, ksort_metric, option))
    plist = _with_kv_preset(plist, kv_preset, passes, kv_format, v_format, block, ksort_metric)
    _check_pass_options(plist, option)
    build_pipeline(plist)  # reject bad pass lists before loading anything
    check_output_dir(output)  # before loading anything
    start = time.perf_counter()
    base = _load(model, dtype, random_init)
    opt = _optimize(base, plist, data)
    extra = ""
    summary = {"artifact": str(output), "passes": [p["name"] for p in opt.passes],
               "kv_bytes_per_token": opt.kv_bytes_per_token(),
               "baseline_kv_bytes_per_token": _dense_kv_bytes_per_token(base)}
    if evaluate:
        original = _original(base, dtype)
        result = _perplexities(opt, original, data, max_tokens, context, opt is not original)
        summary.update(result)
        extra = _eval_markdown(result)
    extra_placement, write_plot = _placement_extras(opt)
    save_artifact(opt, output, extra + extra_placement, write_plot)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    _print_summary(summary)


def _dense_kv_bytes_per_token(model) -> int:
    """KV bytes per token of the uncompiled model: its cache in its own weight dtype."""
    from fxforge.ir.model import kv_bytes_per_token

    dtype = str(model.dtype).removeprefix("torch.")
    return kv_bytes_per_token(model.spec, [(dtype, dtype)] * model.spec.num_layers)


def _original(model, dtype: str, device: str = "cpu"):
    """The model an artifact was compiled from (its recorded source), or the model itself."""
    import fxforge

    if isinstance(model, fxforge.OptimizedModel) and model.passes and "source" in model.source:
        return _load(model.source["source"], dtype, model.source.get("random_init", False), device)
    return model


def _perplexities(model, baseline, data: str, max_tokens: int, context: int, compare: bool) -> dict:
    from fxforge.data import load_texts
    from fxforge.evaluate import perplexity
    from fxforge.ir.tokenizer import token_windows

    if model.tokenizer is None:
        raise FxforgeError("this model has no tokenizer, so it cannot be evaluated on text")
    windows = token_windows(model.tokenizer, load_texts(data, "eval"), context, max_tokens)
    result = perplexity(model, windows, label="perplexity").to_dict()
    if compare:
        result["baseline_perplexity"] = perplexity(baseline, windows, label="baseline perplexity").perplexity
    else:
        result["baseline_perplexity"] = result["perplexity"]
    result["delta_pct"] = 100.0 * (result["perplexity"] / result["baseline_perplexity"] - 1.0)
    result["data"] = data
    return result


def _eval_markdown(result: dict) -> str:
    return ("\n## Quality\n\n"
            f"- perplexity on {result['data']} ({result['tokens']} tokens, context {result['context']}): "
            f"{result['perplexity']:.4f}\n- baseline perplexity (same tokens): {result['baseline_perplexity']:.4f}\n"
            f"- delta: {result['delta_pct']:+.2f}%\n")


def _print_summary(summary: dict, as_json: bool = False) -> None:
    if as_json:
        out.print_json(json.dumps(summary))
        return
    from rich.table import Table

    table = Table(show_header=False, title="fxforge")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command("eval")
@_guard
def eval_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model name, .gguf path, HF directory or artifact"),
    passes: str = PassesOpt,
    kv_format: Optional[str] = KvFormatOpt,
    v_format: Optional[str] = VFormatOpt,
    block: Optional[int] = BlockOpt,
    ksort_metric: Optional[str] = MetricOpt,
    kv_preset: Optional[str] = KvPresetOpt,
    option: Optional[list[str]] = PassOptionOpt,
    data: str = typer.Option("gsm8k", help="gsm8k or a .txt/.jsonl path"),
    max_tokens: int = typer.Option(8192, help="tokens to score"),
    context: int = typer.Option(512, help="window length"),
    dtype: str = typer.Option("float32", help="weight dtype"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Perplexity of MODEL (optionally after PASSES) on real text, with the original's on the same tokens."""
    plist = pass_list(passes or "", _options(kv_format, v_format, block, ksort_metric, option))
    plist = _with_kv_preset(plist, kv_preset, passes, kv_format, v_format, block, ksort_metric)
    from fxforge.passes.manager import build_pipeline

    _check_pass_options(plist, option)
    build_pipeline(plist)
    base = _load(model, dtype, device=device)
    opt = _optimize(base, plist, data) if plist else base
    baseline = _original(base, dtype, device)
    result = _perplexities(opt, baseline, data, max_tokens, context, opt is not baseline)
    result["kv_bytes_per_token"] = opt.kv_bytes_per_token()
    _print_summary(result, as_json)


@app.command("generate")
@_guard
def generate_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model name, .gguf path, HF directory or artifact"),
    prompt: list[str] = typer.Option(..., "--prompt", help="a prompt (repeat for a batch)"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate per prompt"),
    chat: bool = typer.Option(True, "--chat/--raw", help="apply the model's chat template"),
    dtype: str = typer.Option("float32", help="weight dtype"),
):
    """Greedy generation through the paged-KV forward."""
    m = _load(model, dtype)
    start = time.perf_counter()
    texts = m.generate(list(prompt), max_new_tokens=max_new_tokens, chat=chat)
    for p, t in zip(prompt, texts):
        out.print(f"[bold]> {p}[/bold]\n{t}\n")
    console.print(f"{len(prompt)} prompt(s) in {time.perf_counter() - start:.1f}s")


@app.command("run")
@_guard
def run_cmd(
    model: str = typer.Argument(..., help="artifact directory (or any model source)"),
    prompts: Path = typer.Option(..., "--prompts", help=".jsonl with one {\"prompt\": ...} per line (or .txt, one per line)"),
    output: Path = typer.Option(Path("results.jsonl"), "--out", help="results .jsonl"),
    max_new_tokens: int = typer.Option(128, help="tokens to generate per prompt"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, help="0 = off"),
    top_p: float = typer.Option(1.0, help="1 = off"),
    seed: Optional[int] = typer.Option(None, help="seed for sampling"),
    max_num_seqs: int = typer.Option(256, help="largest decode batch"),
    decode_steps: int = typer.Option(8, help="decode steps per host sync when only decodes run (1 = off)"),
    loop_policy: str = typer.Option("lockstep", help="layer-tied models: lockstep or depthwise (depth-wise batching)"),
    skip_policy: str = typer.Option("bucket", help="skip-decode models: bucket, mask or full (ignore the schedule)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="weight dtype when loading a non-artifact model"),
):
    """Batched generation through the continuous-batching engine; writes one JSON line per prompt."""
    from rich.progress import Progress

    from fxforge.runtime.engine import Engine
    from fxforge.runtime.sequence import SamplingParams

    from fxforge.artifact import check_output_file

    texts = _read_prompts(prompts)
    if decode_steps < 1:
        raise FxforgeError(f"--decode-steps must be >= 1 (1 = one host sync per model step), got {decode_steps}")
    if loop_policy not in ("lockstep", "depthwise"):
        raise FxforgeError(f"--loop-policy must be lockstep or depthwise, got {loop_policy!r}")
    if skip_policy not in ("bucket", "mask", "full"):
        raise FxforgeError(f"--skip-policy must be bucket, mask or full, got {skip_policy!r}")
    check_output_file(output, "--out")
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens)
    except ValueError as exc:
        raise FxforgeError(str(exc)) from None
    m = _load(model, dtype, device=device)
    try:
        engine = Engine(m, max_num_seqs=max_num_seqs, num_decode_steps=decode_steps, loop_policy=loop_policy,
                        skip_policy=skip_policy)
    except ValueError as exc:  # depthwise on a model that is not tied with strategy cycle (or that skips layers)
        raise FxforgeError(f"--loop-policy {loop_policy}: {exc}") from None
    with Progress(console=console) as progress:
        task = progress.add_task("generating", total=len(texts))
        results = engine.generate(texts, params, progress=lambda seq: progress.advance(task))
    with output.open("w") as f:
        for text, r in zip(texts, results):
            f.write(json.dumps({"prompt": text, "output": r.text, "tokens": len(r.token_ids),
                                "finish_reason": r.finish_reason}) + "\n")
    stats = engine.stats
    console.print(f"{len(texts)} prompts, {stats.generated_tokens} tokens in {stats.seconds:.1f}s: "
                  f"{stats.tokens_per_second:.1f} tokens/s ({stats.forward_passes} model steps in {stats.steps} engine steps, "
                  f"{stats.preemptions} preemptions)")


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FxforgeError(f"prompts file {str(path)!r} does not exist; expected a .jsonl or .txt file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise FxforgeError(f"{path}:{i + 1} is not valid JSON") from None
            value = row.get("prompt") if isinstance(row, dict) else row
            if not isinstance(value, str) or not value:
                raise FxforgeError(f"{path}:{i + 1} needs a non-empty string 'prompt'")
            prompts.append(value)
        lines = prompts
    if not lines:
        raise FxforgeError(f"prompts file {str(path)!r} has no prompts")
    return lines


@app.command("analyze")
@_guard
def analyze_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model name (named shapes use their config), .gguf, HF dir or artifact"),
    phase: str = typer.Option("decode", help="prefill, decode or mixed"),
    batch: int = typer.Option(64, help="sequences in the batch"),
    context: int = typer.Option(4096, help="context length"),
    dtype: str = typer.Option("bfloat16", help="dtype of weights and activations"),
    prefill_tokens: int = typer.Option(0, help="mixed phase: prefill tokens in the step"),
    device: str = typer.Option("h100", help="device spec: h100, logic-pim or a JSON file"),
    plot: Path = typer.Option(Path("roofline.png"), help="roofline plot to write (PNG)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Per-layer FLOPs, bytes and Op/B for a batch description, with a roofline plot."""
    from fxforge.analyze import analyze
    from fxforge.artifact import check_output_file
    from fxforge.ir.cost import BatchDesc
    from fxforge.ir.devices import load_device_spec

    check_output_file(plot, "--plot")
    desc = BatchDesc(phase=phase, batch=batch, context=context, dtype=_dtype(dtype).__repr__().removeprefix("torch."),
                     prefill_tokens=prefill_tokens)
    spec_device = load_device_spec(device)
    m = _analysis_model(model)
    summary = analyze(m, desc, spec_device, plot, out if not as_json else None)
    if as_json:
        out.print_json(json.dumps(summary, default=str))


@app.command("quality-table")
@_guard
def quality_table_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model with real weights"),
    max_tokens: int = typer.Option(100_000, help="evaluated tokens per row"),
    context: int = typer.Option(512, help="window length"),
    calib_tokens: int = typer.Option(8192, help="calibration tokens for ksort calibrated"),
    blocks: str = typer.Option("16,32,64", help="BFP block sizes"),
    methods: str = typer.Option("natural,weight_norm,calibrated", "--methods", "--orders",
                                help="channel methods: natural, weight_norm, calibrated (order), scale, "
                                     "calibrated+scale, pre_rope, pre_rope+scale, pre_rope+calibrated+scale"),
    presets: str = typer.Option("", help="also score these KV presets (comma-separated: k4, kv4)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    search_steps: int = typer.Option(64, help="ksort calibrated: greedy swap steps per KV head"),
    settings: str = typer.Option("", help="only these KV settings (comma-separated labels, e.g. 'BFP12 K')"),
    batch_size: int = typer.Option(16, help="evaluation windows per forward pass"),
    out_json: Path = typer.Option(Path("quality.json"), "--json-out", help="JSON results file"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown-out", help="write the markdown table here"),
):
    """KV-format quality table (perplexity and KL per format, block and channel method; presets) on GSM8K."""
    from fxforge.quality import markdown, run_quality_table, table_rows

    block_list = tuple(_int_list(blocks, "--blocks"))
    method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
    setting_list = tuple(s.strip() for s in settings.split(",")) if settings else None
    preset_list = tuple(p.strip() for p in presets.split(",") if p.strip())
    if batch_size < 1:
        raise FxforgeError(f"--batch-size {batch_size} must be >= 1")
    table_rows(block_list, method_list, setting_list, preset_list)  # bad names fail before loading anything
    m = _load(model, "float32", device=device)
    results = run_quality_table(m, max_tokens, context, calib_tokens, block_list, method_list, out_json, console,
                                search_steps, setting_list, preset_list, batch_size)
    table = markdown(results)
    if markdown_out:
        markdown_out.write_text(table)
    out.print(table)
    out.print_json(json.dumps(results["targets"]))


bench_app = typer.Typer(no_args_is_help=True, help="Speed benchmarks against peers measured in the same run (GPU).")
app.add_typer(bench_app, name="bench")


@bench_app.command("attention")
@_guard
def bench_attention_cmd(
    batch: int = typer.Option(64, help="sequences"),
    q_heads: int = typer.Option(32, help="query heads"),
    kv_heads: int = typer.Option(8, help="KV heads"),
    head_dim: int = typer.Option(128, help="head dim"),
    contexts: str = typer.Option("1024,4096,16384", help="context lengths"),
    formats: str = typer.Option("bfp12_32,bfp16_32,bfloat16", help="KV formats (K/V pairs as bfp12_32/bfp16_32)"),
    kernels: str = typer.Option("tiles,blocks,diag,i8k", help="our decode kernels to time, each in the same run: "
                                "tiles (per-value scales, the pre-issue-14 kernel), blocks and diag (per-block "
                                "scales), i8k (BFP16/BFP12 keys in int8 dots); each only where it runs the formats"),
    table_tokens: Optional[int] = typer.Option(None, "--table-tokens", help="each page table this many tokens "
                                               "wide (>= every context), as an engine's decode graphs are as wide "
                                               "as the longest sequence they serve: tuned configs and split counts "
                                               "follow the width"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """Paged decode attention (our Triton kernels per KV format) vs SDPA over bf16 KV."""
    import torch

    from fxforge.kernels.attention_bench import bench_decode
    from fxforge.kernels.paged_attention import DECODE_KERNELS

    kernel_list = [k.strip() for k in kernels.split(",") if k.strip()]
    if not kernel_list or set(kernel_list) - set(DECODE_KERNELS):
        raise FxforgeError(f"--kernels {kernels!r} is not valid; expected a comma-separated subset of "
                           f"{','.join(DECODE_KERNELS)}")
    context_list = tuple(int(c) for c in contexts.split(","))
    if table_tokens is not None and table_tokens < max(context_list):
        raise FxforgeError(f"--table-tokens {table_tokens} is shorter than the longest of --contexts {contexts}; "
                           f"give at least {max(context_list)}")
    if not torch.cuda.is_available():
        raise FxforgeError("fxforge bench attention needs a CUDA device")
    rows = bench_decode(batch, q_heads, kv_heads, head_dim, context_list, tuple(formats.split(",")),
                        kernels=tuple(kernel_list), table_tokens=table_tokens)
    _print_rows([{k: v for k, v in row.items() if k != "sdpa_all_us"} for row in rows])
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


def _print_rows(rows: list[dict]) -> None:
    from rich.table import Table

    if not rows:
        return
    table = Table()
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()])
    out.print(table)


LONG_CONTEXT = dict(model="llama-3-8b", prompt_len=8192, max_new_tokens=256)  # issue 14 item 3


@bench_app.command("e2e")
@_guard
def bench_e2e_cmd(
    model: Optional[str] = typer.Argument(None, help="model (real weights) or named shape with --random-init "
                                          f"(default {DEFAULT_MODEL}; llama-3-8b for --workload long-context)"),
    num_prompts: Optional[int] = typer.Option(None, "--prompts", help="requests (default 512; long-context: as many "
                                              "as the most compact format's KV memory holds)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="tokens generated per request, exactly (default 256)"),
    prompt_len: Optional[int] = typer.Option(None, help="random prompts of this length (default 0: GSM8K chat "
                                             "prompts; long-context: 8192)"),
    workload: str = typer.Option("default", help="default, or long-context: Llama-3-8B shape (random weights), "
                                 "8k-token prompts, 256 new tokens, every format in the same KV memory, no HF peer"),
    kv_memory_gb: Optional[float] = typer.Option(None, "--kv-memory-gb", help="fixed-KV-memory mode: every format "
                                                 "gets this many GiB of KV pages and runs as many sequences as fit "
                                                 "at full length (replaces --max-num-seqs; long-context default 60)"),
    kv: str = typer.Option("bfloat16,bfp16", help="fxforge KV formats to run, comma-separated: one format for K "
                           "and V, or K/V (e.g. bfp12/bfp16)"),
    max_num_seqs: str = typer.Option("256", help="fxforge decode batch limits to run (comma-separated)"),
    decode_steps: str = typer.Option("8", help="fxforge decode-window lengths to run (comma-separated; 1 = off)"),
    max_batched_tokens: int = typer.Option(32768, help="fxforge token budget of one step (prefill chunk size)"),
    v_layout: str = typer.Option("auto", "--v-layout", help="fxforge V cache layouts to run (comma-separated): auto "
                                 "(the engine's default: channels where this GPU's tuned configs time i8t for the "
                                 "shape, else rows), rows, or channels (a packed V stored channels by tokens, decoded "
                                 "by the i8t kernel; rows FORMAT+vt; formats with a dense V run rows only)"),
    overlap_windows: str = typer.Option("auto", "--overlap-windows", help="fxforge: read each decode window's "
                                        "tokens before launching the next (off), launch the next first (on; rows "
                                        "FORMAT+ow), auto (the engine's default: on for CUDA), or both as peers "
                                        "(off,on)"),
    repeats: int = typer.Option(3, help="timed generations per run (the median is reported)"),
    hf_batch: str = typer.Option("64,256", help="HF generate batch sizes (empty: skip HF)"),
    random_init: bool = typer.Option(False, help="random weights (named shapes)"),
    check: bool = typer.Option(True, help="GPU correctness checks (greedy agreement, Triton vs reference ppl)"),
    fused_step: bool = typer.Option(False, "--fused-step", help="each format with and without lower's step "
                                    "fusions (fused q/k/v and gate/up GEMMs, residual add + RMSNorm, RoPE + KV "
                                    "write; on by default): rows FORMAT (unfused) and FORMAT+fused, peers in one run"),
    smoke: bool = typer.Option(False, "--smoke", help="allow CPU (float32, no HF peer, no checks): proves the "
                               "code path, measures nothing"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """Offline generation throughput: fxforge engine vs HF transformers generate, one run. MoE shapes run
    too (e.g. mixtral-8x7b --random-init --prompt-len 1024): their roofline counts the experts routed to.
    Every row carries its FLOPs, weight and KV bytes and the roofline: the sum over passes of
    max(FLOPs / matmul peak, bytes / copy bandwidth), both measured in this run."""
    import gc
    import itertools

    import torch

    from fxforge.artifact import check_output_file
    from fxforge.bench import (chat_prompts, copy_bandwidth, greedy_agreement, matmul_peak, random_prompts,
                               run_fxforge, run_hf_best, seats_in_kv_memory)
    from fxforge.kernels.formats import parse_kv_format
    from fxforge.runtime.config import ENGINE_V_LAYOUTS
    from fxforge.runtime.engine import default_overlap_windows

    long_context = _e2e_workload(workload)
    model = model or (LONG_CONTEXT["model"] if long_context else DEFAULT_MODEL)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else 256
    prompt_len = prompt_len if prompt_len is not None else (LONG_CONTEXT["prompt_len"] if long_context else 0)
    if long_context:
        random_init, hf_batch, check = True, "", False
        kv_memory_gb = 60.0 if kv_memory_gb is None else kv_memory_gb
    seat_limits, windows = _int_list(max_num_seqs, "--max-num-seqs"), _int_list(decode_steps, "--decode-steps")
    formats = _kv_pairs(kv)
    layouts = [x for x in v_layout.split(",") if x]
    if not layouts or set(layouts) - set(ENGINE_V_LAYOUTS):
        raise FxforgeError(f"--v-layout {v_layout!r}: expected {', '.join(ENGINE_V_LAYOUTS)}, comma-separated")
    overlaps = [x for x in overlap_windows.split(",") if x]
    if not overlaps or set(overlaps) - {"auto", "off", "on"}:
        raise FxforgeError(f"--overlap-windows {overlap_windows!r}: expected auto, off, on or off,on")
    for flag, value, least in (("--repeats", repeats, 1), ("--max-new-tokens", max_new_tokens, 1),
                               ("--prompts", num_prompts, 1), ("--prompt-len", prompt_len, 0)):
        if value is not None and value < least:
            raise FxforgeError(f"{flag} must be >= {least}, got {value}")
    if kv_memory_gb is not None and not kv_memory_gb > 0:
        raise FxforgeError(f"--kv-memory-gb must be > 0, got {kv_memory_gb}")
    if kv_memory_gb is not None and not prompt_len:
        raise FxforgeError("--kv-memory-gb needs --prompt-len (random prompts of one length: every sequence's "
                           "full length must be known to count the sequences that fit)")
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise FxforgeError("fxforge bench e2e needs a CUDA device (use --smoke to exercise it on CPU)")
    if not cuda:
        hf_batch, check = "", False
    device = "cuda" if cuda else "cpu"
    base = _load(model, "bfloat16" if cuda else "float32", random_init=random_init, device=device)
    bandwidth, peak = copy_bandwidth(device), matmul_peak(device)
    import fxforge

    from fxforge.passes.lower import STEP_FUSIONS

    fused = {"name": "lower", "backend": "triton"}  # lower's default: the step fusions on
    # with --fused-step the plain rows run without the fusions, the +fused rows are their peers in this run
    lower = dict(fused, **dict.fromkeys(STEP_FUSIONS, False)) if fused_step else fused
    optimized = {name: fxforge.optimize(base, passes=passes + [lower]) for name, passes in formats}
    if fused_step:
        optimized.update({f"{name}+fused": fxforge.optimize(base, passes=passes + [fused]) for name, passes in formats})
    kv_bytes = int(kv_memory_gb * (1 << 30)) if kv_memory_gb is not None else None
    full_len = prompt_len + max_new_tokens + 16  # run_fxforge's max_model_len
    fits = ({name: seats_in_kv_memory(opt, kv_bytes, full_len) for name, opt in optimized.items()}
            if kv_bytes is not None else {})
    for name, (pages, seats) in fits.items():
        if seats < 1:
            raise FxforgeError(f"--kv-memory-gb {kv_memory_gb}: not one sequence of {prompt_len + max_new_tokens} "
                               f"tokens fits in format {name} ({pages} pages); give more memory or shorter prompts")
    if num_prompts is None:
        num_prompts = max(s for _, s in fits.values()) if long_context else 512
    prompts = (random_prompts(num_prompts, prompt_len, base.spec.vocab_size) if prompt_len
               else chat_prompts(base, num_prompts))
    results = {"model": model, "workload": workload, "prompts": num_prompts, "prompt_len": prompt_len,
               "max_new_tokens": max_new_tokens, "device": torch.cuda.get_device_name() if cuda else "cpu",
               "copy_bandwidth_GBps": bandwidth / 1e9, "matmul_peak_tflops": peak / 1e12,
               "kv_memory_gb": kv_memory_gb, "runs": [], "checks": {}}
    if check and not random_init:
        results["checks"]["triton_vs_reference_ppl"] = _ppl_check(base)
    for fmt in list(optimized):
        opt = optimized.pop(fmt)
        pages, seats = fits.get(fmt, (None, None))
        packed_v = all(not parse_kv_format(v).is_dense for _, v in opt.kv_formats())  # every layer's V
        # layouts and overlaps: "auto" resolved as the engine resolves it; a setting asked for twice (auto and
        # what it resolves to) runs once
        resolved = list(dict.fromkeys(opt.resolve_v_layout(x, device) for x in layouts
                                      if x != "channels" or packed_v))  # only a packed V has that layout
        chained = list(dict.fromkeys(x == "on" or (x == "auto" and default_overlap_windows(opt)) for x in overlaps))
        for limit in [seats] if seats else seat_limits:
            for k, layout, overlap in itertools.product(windows, resolved, chained):
                suffix = ("+vt" if layout == "channels" else "") + ("+ow" if overlap else "")
                run = run_fxforge(opt, prompts, max_new_tokens, limit, bandwidth,
                                  f"fxforge-{fmt}{suffix}-s{limit}-k{k}", num_decode_steps=k,
                                  max_num_batched_tokens=max_batched_tokens, repeats=repeats, peak_flops=peak,
                                  num_pages=pages, v_layout=layout, overlap_windows=overlap)
                row = run.to_dict()
                row.update(kv_format=fmt, seats_that_fit=seats, v_layout=layout, overlap_windows=overlap)
                results["runs"].append(row)
                console.print(row)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
        del opt
    if kv_bytes is not None:
        results["fixed_kv_memory"] = _fixed_kv_summary(results["runs"])
    if check and not random_init:
        results["checks"]["greedy_vs_reference_forward"] = greedy_agreement(base, prompts[:16])
    if hf_batch:
        peer_spec, peer_path, pad_id = base.spec, base.source.get("path", ""), (base.spec.eos_token_ids or [0])[0]
        del base  # free our weights and KV pool before the peer loads (8B shapes need the room)
        gc.collect()
        torch.cuda.empty_cache()
        hf = _hf_peer(peer_spec, peer_path, random_init)
        for b in [int(x) for x in hf_batch.split(",") if x]:
            run = run_hf_best(hf, prompts, max_new_tokens, b, pad_id=pad_id, repeats=repeats)
            results["runs"].append(run.to_dict())
            console.print(run.to_dict())
    best_hf = max((r["tokens_per_second"] for r in results["runs"] if r["name"].startswith("hf")), default=None)
    for r in results["runs"]:
        if best_hf and r["name"].startswith("fxforge"):
            r["speedup_vs_best_hf"] = r["tokens_per_second"] / best_hf
    _print_rows([{k: v for k, v in r.items() if k in E2E_COLUMNS} for r in results["runs"]])
    out.print_json(json.dumps({**results["checks"], **({"fixed_kv_memory": results["fixed_kv_memory"]}
                                                       if kv_bytes is not None else {})}))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


E2E_COLUMNS = ("name", "tokens", "seconds", "tokens_per_second", "roofline_pct", "roofline_bytes_only_pct",
               "gpu_busy_pct", "forward_passes", "prefill_steps", "prefill_step_seconds", "max_scheduled_seqs",
               "preemptions", "speedup_vs_best_hf")


def _e2e_workload(workload: str) -> bool:
    """True for the long-context workload; an unknown name is an error."""
    if workload not in ("default", "long-context"):
        raise FxforgeError(f"--workload {workload!r} is not valid; expected default or long-context")
    return workload == "long-context"


def _kv_pairs(text: str) -> list[tuple[str, list[dict]]]:
    """--kv "bfloat16,bfp16,bfp12/bfp16" -> [(name, bfp-kv pass list)]; formats checked by name."""
    from fxforge.kernels.formats import parse_kv_format

    pairs = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        k_format, _, v_format = item.partition("/")
        v_format = v_format or k_format
        try:
            k_fmt, v_fmt = parse_kv_format(k_format), parse_kv_format(v_format)
        except ValueError as exc:
            raise FxforgeError(f"--kv {text!r}: {exc}") from None
        if k_fmt.name == v_fmt.name == "bfloat16":
            pairs.append((item, []))
        else:
            pairs.append((item, [{"name": "bfp-kv", "k_format": k_format, "v_format": v_format}]))
    if not pairs:
        raise FxforgeError(f"--kv {text!r} names no format; e.g. bfloat16,bfp16,bfp12/bfp16")
    return pairs


def _fixed_kv_summary(runs: list[dict]) -> dict:
    """Per KV format in the fixed-KV-memory mode: sequences that fit, most scheduled at once,
    tokens/s, and both against the bfloat16 row (if one ran)."""
    rows = {r["kv_format"] + ("+vt" if r.get("v_layout") == "channels" else "")
            + ("+ow" if r.get("overlap_windows") else ""): r for r in runs if r.get("seats_that_fit")}
    base = rows.get("bfloat16") or rows.get("bfloat16+ow")
    summary = {}
    for fmt, r in rows.items():
        entry = {"seats_that_fit": r["seats_that_fit"], "max_scheduled_seqs": r["max_scheduled_seqs"],
                 "tokens_per_second": r["tokens_per_second"], "kv_pool_bytes": r["kv_pool_bytes"]}
        if base is not None:
            entry["seats_vs_bfloat16"] = r["seats_that_fit"] / base["seats_that_fit"]
            entry["tokens_per_second_vs_bfloat16"] = r["tokens_per_second"] / base["tokens_per_second"]
        summary[fmt] = entry
    return summary


@bench_app.command("moe")
@_guard
def bench_moe_cmd(
    shapes: str = typer.Option("mixtral-8x7b,qwen3-30b-a3b", help="MoE layer shapes (comma-separated)"),
    tokens: str = typer.Option("1,8,64,256,2048", help="tokens per step (comma-separated)"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """One MoE layer: the fused Triton kernels (CUDA-graph replay) vs the eager per-expert loop, bf16, per
    shape and tokens per step; bandwidth over the experts routed to, TFLOP/s against a matmul measured
    in the same run (GPU)."""
    import torch

    from fxforge.artifact import check_output_file
    from fxforge.kernels.moe_bench import SHAPES, bench_moe, results_document

    names = [name.strip() for name in shapes.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown or not names:
        raise FxforgeError(f"--shapes {shapes!r}: unknown {unknown}; known MoE shapes: {sorted(SHAPES)}")
    counts = _int_list(tokens, "--tokens")
    if json_out:
        check_output_file(json_out, "--json-out")
    if not torch.cuda.is_available():
        raise FxforgeError("fxforge bench moe needs a CUDA device")
    rows = bench_moe([SHAPES[name] for name in names], tuple(counts))
    _print_rows([{k: v for k, v in row.items() if k != "config"} for row in rows])
    if json_out:
        json_out.write_text(json.dumps(results_document(rows), indent=1))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise FxforgeError(f"{option} must be comma-separated integers >= 1, got {text!r}")
    return values


PPL_CHECK_FORMATS = (("bfp16", "bfp16"), ("bfp12", "bfp16"))  # the default pipeline's K+V; the coarsest K


def _ppl_check(base, max_tokens: int = 16384) -> dict:
    """BFP perplexity through the Triton kernels vs the torch reference path (same tokens), per format."""
    import fxforge
    from fxforge.data import load_texts
    from fxforge.evaluate import perplexity
    from fxforge.ir.tokenizer import token_windows

    windows = token_windows(base.tokenizer, load_texts("gsm8k", "eval"), 512, max_tokens)
    results = {"tokens": int(windows[:, 1:].numel()), "dtype": str(base.dtype).removeprefix("torch.")}
    for k_format, v_format in PPL_CHECK_FORMATS:
        reference = fxforge.optimize(base, passes=[{"name": "bfp-kv", "k_format": k_format, "v_format": v_format}])
        ref = perplexity(reference, windows, show_progress=False).perplexity
        lowered = fxforge.optimize(reference, passes=[{"name": "lower", "backend": "triton"}])
        tri = perplexity(lowered, windows, show_progress=False).perplexity
        results[f"K {k_format} V {v_format}"] = {"reference": ref, "triton": tri, "rel_diff_pct": 100 * abs(tri / ref - 1)}
        del reference, lowered
    return results


def _hf_peer(spec, path: str, random_init: bool):
    import torch

    from fxforge.bench import hf_from_spec

    if random_init:
        return hf_from_spec(spec)
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                torch_dtype=torch.bfloat16).cuda().eval()


@bench_app.command("compile")
@_guard
def bench_compile_cmd(
    models: str = typer.Option("smollm2-135m,llama-3-8b", help="named shapes (random weights), comma-separated"),
    backends: str = typer.Option(",".join(["eager", "inductor", "inductor-max-autotune", "fxforge"]),
                                 help="eager, inductor, inductor-max-autotune, fxforge (comma-separated)"),
    options: str = typer.Option("{}", help="backend='fxforge' options as JSON, e.g. '{\"k_format\": \"bfp16\"}'"),
    prefill: str = typer.Option("8x512", help="prefill workload: BATCHxTOKENS"),
    decode_batches: str = typer.Option("1,64", help="decode-step batch sizes (static cache)"),
    context: int = typer.Option(512, help="tokens in the static cache before the timed decode step"),
    repeats: int = typer.Option(10, help="timed calls per row (the median is reported)"),
    dtype: str = typer.Option("bfloat16", help="weight dtype"),
    smoke: bool = typer.Option(False, "--smoke", help="a 1-layer model, tiny shapes, CPU allowed: proves the code path"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """HF models (prefill, static-cache decode steps) under eager, Inductor and backend='fxforge', one run."""
    import dataclasses

    import torch

    from fxforge.artifact import check_output_file
    from fxforge.bench_compile import BACKENDS, bench_model
    from fxforge.compile_backend import BackendOptions
    from fxforge.ir.importers.named import NAMED_SHAPES

    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        raise FxforgeError(f"--backends {backends!r}: unknown {unknown}; expected some of {list(BACKENDS)}")
    try:
        option_values = json.loads(options)
    except json.JSONDecodeError as exc:
        raise FxforgeError(f"--options is not valid JSON ({exc.msg}): {options!r}") from None
    BackendOptions.from_dict(option_values if isinstance(option_values, dict) else {"": option_values})
    names = [m.strip() for m in models.split(",") if m.strip()]
    missing = [m for m in names if m not in NAMED_SHAPES]
    if missing:
        raise FxforgeError(f"--models: unknown {missing}; named shapes: {', '.join(NAMED_SHAPES)}")
    try:
        batch, length = (int(x) for x in prefill.lower().split("x"))
    except ValueError:
        raise FxforgeError(f"--prefill must be BATCHxTOKENS such as 8x512, got {prefill!r}") from None
    batches = _int_list(decode_batches, "--decode-batches")
    if repeats < 1 or context < 1:
        raise FxforgeError(f"--repeats and --context must be >= 1, got {repeats} and {context}")
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    if not smoke and not torch.cuda.is_available():
        raise FxforgeError("fxforge bench compile needs a CUDA device (use --smoke to exercise it on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in names:
        spec = NAMED_SHAPES[name]
        if smoke:  # tiny widths, but the model's own head_dim: the rows that BFP blocks must divide
            spec = dataclasses.replace(spec, num_layers=1, hidden_size=64, intermediate_size=128, num_heads=4,
                                       num_kv_heads=2, vocab_size=512)
        rows += bench_model(name, spec, chosen, option_values, (batch, length), batches, context, repeats,
                            _dtype(dtype), device, progress=lambda row: console.print(row))
    results = [dataclasses.asdict(r) for r in rows]
    _print_rows([{k: v for k, v in r.items() if k != "replaced"} for r in results])
    if json_out is not None:
        json_out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                        "torch": torch.__version__, "options": option_values, "rows": results},
                                       indent=2))


@app.command("export")
@_guard
def export_cmd(
    model: str = typer.Argument(..., help="artifact directory (or any model source)"),
    onnx: bool = typer.Option(False, "--onnx", help="write DIR/model.onnx (fxforge ops as ONNX functions)"),
    output: Path = typer.Option(..., "-o", "--output", help="directory to write into"),
):
    """Export MODEL: --onnx writes the runtime-shaped forward with its paged KV cache as ONNX."""
    from fxforge.artifact import check_output_dir
    from fxforge.onnx_export import check_exportable, export_onnx

    if not onnx:
        raise FxforgeError("choose an export format: --onnx (the only one so far)")
    check_output_dir(output)
    m = _load(model, "float32")
    check_exportable(m)
    with console.status("exporting to ONNX"):
        path = export_onnx(m, output)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _analysis_model(model: str):
    """Named shapes are analysed from their config (no weights needed); the rest are loaded."""
    from fxforge.ir.importers.named import NAMED_SHAPES

    if model in NAMED_SHAPES:
        import torch

        from fxforge.ir.model import Model

        with console.status(f"building {model} on the meta device"):
            return Model.from_state_dict(NAMED_SHAPES[model], None, device="meta", dtype=torch.bfloat16)
    return _load(model, "float32")


@app.command("recover")
@_guard
def recover_cmd(
    artifact: Path = typer.Argument(..., help="artifact to recover (compiled with a pass recovery trains: layer-tying, skip-decode)"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for the recovered artifact and its checkpoints"),
    minutes: float = typer.Option(..., "--minutes", help="training time budget in minutes (a resumed run counts the earlier time)"),
    device: str = typer.Option("auto", help="cuda, cpu or auto (cuda when available)"),
    data: str = typer.Option("gsm8k", help="text: gsm8k or a .txt/.jsonl path (its calibration split trains, its evaluation split scores)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps (even with time left)"),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (after a linear warm-up)"),
    warmup_steps: int = typer.Option(10, help="warm-up steps"),
    batch_size: int = typer.Option(8, help="windows per step"),
    seq_len: int = typer.Option(256, help="tokens per training window"),
    ce_weight: float = typer.Option(0.0, help="weight of next-token cross-entropy added to the KL"),
    temperature: float = typer.Option(1.0, help="distillation temperature"),
    samples: int = typer.Option(128, help="sequences the teacher samples on calibration prompts (0: none)"),
    sample_tokens: int = typer.Option(128, help="tokens per sampled sequence (at most)"),
    checkpoint_minutes: float = typer.Option(5.0, help="training minutes between checkpoints"),
    eval_tokens: int = typer.Option(16384, help="evaluation tokens for the perplexities"),
    eval_context: int = typer.Option(512, help="evaluation window length"),
    seed: int = typer.Option(0, help="seed of sampling and data order"),
):
    """Distil ARTIFACT back towards the model it was compiled from (KL on logits), bounded by --minutes;
    checkpoints as it goes, resumes when run again, prints the original's and the student's perplexity."""
    from fxforge.recover import RecoverySettings, prepare, run

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = RecoverySettings(minutes=minutes, max_steps=max_steps, lr=lr, warmup_steps=warmup_steps,
                                batch_size=batch_size, seq_len=seq_len, temperature=temperature, ce_weight=ce_weight,
                                samples=samples, sample_tokens=sample_tokens, checkpoint_minutes=checkpoint_minutes,
                                seed=seed)
    with console.status("loading the student and its teacher"):
        recovery = prepare(artifact, output, settings, data, device, eval_tokens, eval_context)
    try:
        summary = run(recovery, console)
    except KeyboardInterrupt:
        console.print(f"interrupted: checkpoint written to {output}/recovery; run the same command to resume")
        raise typer.Exit(130)
    _print_summary({k: v for k, v in summary.items() if not isinstance(v, dict)})


def _ints_at_least(text: str, option: str, minimum: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise FxforgeError(f"{option} must be comma-separated integers >= {minimum}, got {text!r}")
    return values


@app.command("tying-study")
@_guard
def tying_study_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model with real weights (the teacher of every run)"),
    random_init: bool = typer.Option(False, help="random weights: a smoke run of the code path, no quality claim"),
    data: str = typer.Option("gsm8k", help="text: gsm8k or a .txt/.jsonl path (calibration split trains, evaluation split scores)"),
    unique_layers: str = typer.Option("15,10", help="K values (comma-separated)"),
    inits: str = typer.Option("stepwise,average", help="initialisations of the shared blocks"),
    ranks: str = typer.Option("0,32,128", help="LoRA ranks (0 = pure tying)"),
    train_seconds: float = typer.Option(24.0, help="recovery budget of every run, in seconds of training"),
    max_steps: Optional[int] = StudyMaxStepsOpt,
    lr: float = StudyLrOpt,
    batch_size: int = typer.Option(8, help="windows per step"),
    seq_len: int = typer.Option(256, help="tokens per training window"),
    samples: int = StudySamplesOpt,
    sample_tokens: int = typer.Option(128, help="tokens per sampled sequence (at most)"),
    eval_tokens: int = StudyEvalTokensOpt,
    eval_context: int = typer.Option(512, help="evaluation window length"),
    device: str = typer.Option("auto", help="cuda, cpu or auto"),
    max_minutes: Optional[float] = StudyMaxMinutesOpt,
    resume: Optional[Path] = typer.Option(None, help="an earlier study's JSON (with its .text.safetensors): keep its runs, run the rest"),
    json_out: Path = typer.Option(Path("tying_study.json"), "--json-out", help="results (JSON, rewritten after every run)"),
    plot_out: Path = typer.Option(Path("tying_study.png"), "--plot", help="perplexity against unique parameters (PNG)"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown-out", help="write the markdown table here"),
):
    """The layer-tying quality study: tied / relaxed models vs layer dropping and zero-init LoRA at equal
    unique parameters, before and after the same recovery budget, with a plot."""
    import torch

    from fxforge.artifact import check_output_file
    from fxforge.data import load_texts
    from fxforge.ir.tokenizer import token_windows
    from fxforge.passes import LayerTying
    from fxforge.passes.manager import check_pipeline
    from fxforge.recover import RecoverySettings, training_text
    from fxforge.tying_study import load_previous, markdown, run_study, save, save_text, study_runs

    start = time.perf_counter()  # --max-minutes counts loading and the training text too
    for path, option in ((json_out, "--json-out"), (plot_out, "--plot"), (markdown_out, "--markdown-out")):
        if path is not None:
            check_output_file(path, option)
    ks, rank_list = _ints_at_least(unique_layers, "--unique-layers", 1), _ints_at_least(ranks, "--ranks", 0)
    init_list = [i.strip() for i in inits.split(",") if i.strip()]
    settings = RecoverySettings(minutes=train_seconds / 60, max_steps=max_steps, lr=lr, batch_size=batch_size,
                                seq_len=seq_len, samples=samples, sample_tokens=sample_tokens)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    previous, text = load_previous(resume, settings) if resume is not None else (None, None)
    base = _load(model, "float32", random_init, device)
    check_pipeline([LayerTying(unique_layers=k, init=i, rank=r) for k in ks for i in init_list for r in rank_list], base.spec)
    runs = study_runs(base.spec, ks, init_list, rank_list)
    console.print(f"{len(runs)} runs x {train_seconds:.0f} s of recovery (+ evaluation before and after each)")
    if text is None:
        with console.status("training text: calibration split + samples of the original"):
            text = training_text(base, data, settings)
    save_text(text, json_out)
    windows = token_windows(base.tokenizer, load_texts(data, "eval"), eval_context, eval_tokens)
    deadline = start + 60 * max_minutes if max_minutes else None
    results = run_study(base, runs, text, windows, settings, _study_progress(json_out), deadline, previous)
    results.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                   random_init=random_init, seconds=round(time.perf_counter() - start, 1))
    save(results, json_out, plot_out, markdown_out)
    out.print(markdown(results))
    out.print_json(json.dumps(results["targets"]))


def _study_progress(json_out: Path):
    """After each study run: one line, and the results so far rewritten (marked partial)."""
    def progress(partial: dict) -> None:
        row = partial["runs"][-1]
        console.print(f"{row['label']}: {row['perplexity_before']:.4g} -> {row['perplexity_after']:.4f} "
                      f"({row['total_seconds']} s)")
        json_out.write_text(json.dumps({**partial, "partial": True}, indent=2))

    return progress


@bench_app.command("tying")
@_guard
def bench_tying_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model (real weights) or a named shape / path with --random-init"),
    random_init: bool = typer.Option(False, help="random weights"),
    unique_layers: int = typer.Option(10, help="K of the tied and relaxed models"),
    rank: int = typer.Option(32, help="LoRA rank of the relaxed model"),
    batches: str = typer.Option("64,256", help="max running sequences to run (comma-separated); 2x as many prompts"),
    max_new_tokens: int = typer.Option(128, help="tokens generated per request (exactly)"),
    prompt_len: int = typer.Option(0, help="random prompts of this length (0: GSM8K chat prompts)"),
    repeats: int = typer.Option(3, help="timed generations per row (the median is reported)"),
    smoke: bool = typer.Option(False, "--smoke", help="allow CPU (float32): proves the code path, measures nothing"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """Tokens/s of the relaxed recursive model vs the original and the tied model without LoRA, under
    lockstep (CUDA graphs / eager) and depth-wise batching, with bytes per token against the roofline."""
    import torch

    from fxforge.artifact import check_output_file
    from fxforge.bench import chat_prompts, copy_bandwidth, random_prompts
    from fxforge.tying_bench import run_bench

    batch_list = _ints_at_least(batches, "--batches", 1)
    if repeats < 1 or max_new_tokens < 1:
        raise FxforgeError(f"--repeats and --max-new-tokens must be >= 1, got {repeats} and {max_new_tokens}")
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise FxforgeError("fxforge bench tying needs a CUDA device (use --smoke to exercise it on CPU)")
    base = _load(model, "bfloat16" if cuda else "float32", random_init, "cuda" if cuda else "cpu")
    count = 2 * max(batch_list)
    prompts = random_prompts(count, prompt_len, base.spec.vocab_size) if prompt_len else chat_prompts(base, count)
    results = run_bench(base, prompts, max_new_tokens, batch_list, unique_layers, rank, repeats,
                        copy_bandwidth() if cuda else None, progress=lambda row: console.print(
                            {k: v for k, v in row.items() if k != "all_seconds"}))
    results.update(model=model, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   max_new_tokens=max_new_tokens, prompts=count)
    _print_rows([{k: v for k, v in r.items() if k != "all_seconds"} for r in results["rows"]])
    out.print_json(json.dumps(results["targets"]))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


# -- issue 10: SkipDecode study and serving benchmark ------------------------------------------------

@app.command("skip-study")
@_guard
def skip_study_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model with real weights (the full model and teacher)"),
    random_init: bool = typer.Option(False, help="random weights: a smoke run of the code path, no quality claim"),
    data: str = typer.Option("gsm8k", help="text: gsm8k or a .txt/.jsonl path (calibration split trains, evaluation split scores)"),
    speedups: str = typer.Option("1.5,2,3", help="target layer speed-ups (N / average active layers)"),
    warmup_layers: int = typer.Option(1, help="layers every skip-decode token runs before the top a(t)"),
    decay: str = typer.Option("linear", help="skip-decode decay: linear or step"),
    prompts: int = typer.Option(200, help="held-out GSM8K questions generated greedily per model"),
    max_new_tokens: int = typer.Option(128, help="tokens per generation (also the schedule's span)"),
    train_seconds: float = typer.Option(60.0, help="training budget of every run, in seconds"),
    max_steps: Optional[int] = StudyMaxStepsOpt,
    lr: float = StudyLrOpt,
    batch_size: int = typer.Option(8, help="windows per step"),
    seq_len: int = typer.Option(256, help="tokens per training window"),
    samples: int = StudySamplesOpt,
    sample_tokens: int = typer.Option(128, help="tokens per sampled sequence (at most)"),
    eval_tokens: int = StudyEvalTokensOpt,
    eval_context: int = typer.Option(512, help="evaluation window length"),
    device: str = typer.Option("auto", help="cuda, cpu or auto"),
    max_minutes: Optional[float] = StudyMaxMinutesOpt,
    json_out: Path = typer.Option(Path("skip_study.json"), "--json-out", help="results (JSON, rewritten after every run)"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown-out", help="write the markdown table here"),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="perplexity and token agreement against speed-up (PNG)"),
):
    """The SkipDecode quality study: schedules at target speed-ups vs static early exit at the same average
    depth, before and after the same training budget (perplexity; exact match and token agreement with the
    full model's greedy output)."""
    import torch

    from fxforge.artifact import check_output_file
    from fxforge.data import load_texts
    from fxforge.ir.tokenizer import token_windows
    from fxforge.passes import SkipDecode
    from fxforge.passes.manager import check_pipeline
    from fxforge.recover import RecoverySettings, training_text
    from fxforge.skip_study import StudyOptions, markdown, run_study, save

    start = time.perf_counter()
    for path, option in ((json_out, "--json-out"), (markdown_out, "--markdown-out"), (plot_out, "--plot")):
        if path is not None:
            check_output_file(path, option)
    targets = _floats_at_least(speedups, "--speedups", 1.0)
    if prompts < 1 or max_new_tokens < 1:
        raise FxforgeError(f"--prompts and --max-new-tokens must be >= 1, got {prompts} and {max_new_tokens}")
    options = StudyOptions(tuple(targets), warmup_layers, decay, prompts, max_new_tokens)
    settings = RecoverySettings(minutes=train_seconds / 60, max_steps=max_steps, lr=lr, batch_size=batch_size,
                                seq_len=seq_len, samples=samples, sample_tokens=sample_tokens)
    configs = [SkipDecode.from_dict({"target_speedup": s, "warmup_layers": warmup_layers, "decay": decay,
                                     "span": max_new_tokens}) for s in targets]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    base = _load(model, "float32", random_init, device)
    check_pipeline(configs, base.spec)
    console.print(f"{2 * len(targets)} runs x {train_seconds:.0f} s of training (+ perplexity and {prompts} "
                  "generations before and after each)")
    with console.status("training text: calibration split + samples of the original"):
        text = training_text(base, data, settings)
    windows = token_windows(base.tokenizer, load_texts(data, "eval"), eval_context, eval_tokens)
    deadline = start + 60 * max_minutes if max_minutes else None
    results = run_study(base, text, windows, data, settings, options, _skip_study_progress(json_out), deadline)
    results.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                   random_init=random_init, seconds=round(time.perf_counter() - start, 1))
    save(results, json_out, markdown_out, plot_out)
    out.print(markdown(results))
    out.print_json(json.dumps(results["targets"]))


def _floats_at_least(text: str, option: str, minimum: float) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise FxforgeError(f"{option} must be comma-separated numbers >= {minimum}, got {text!r}")
    return values


def _skip_study_progress(json_out: Path):
    def progress(partial: dict) -> None:
        row = partial["runs"][-1]
        console.print(f"{row['method']} {row['target_speedup']}x: perplexity {row['before']['perplexity']:.4g} -> "
                      f"{row['after']['perplexity']:.4f}, token agreement {row['before']['token_agreement']:.3f} -> "
                      f"{row['after']['token_agreement']:.3f} ({row['total_seconds']} s)")
        json_out.write_text(json.dumps({**partial, "partial": True}, indent=2))

    return progress


@bench_app.command("skip-decode")
@_guard
def bench_skip_decode_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="model (real weights) or a named shape / path with --random-init"),
    random_init: bool = typer.Option(False, help="random weights"),
    speedups: str = typer.Option("1.5,2,3", help="target layer speed-ups of the skip-decode models"),
    warmup_layers: int = typer.Option(1, help="warm-up layers of the schedules"),
    decay: str = typer.Option("linear", help="decay of the schedules: linear or step"),
    levels: int = typer.Option(2, help="stairs of a step decay (as many depths, so graphs per batch bucket)"),
    batches: str = typer.Option("64,256", help="max running sequences to run (comma-separated); 2x as many prompts"),
    max_new_tokens: int = typer.Option(128, help="tokens generated per request (exactly; the schedules' span)"),
    prompt_len: int = typer.Option(0, help="random prompts of this length (0: GSM8K chat prompts)"),
    repeats: int = typer.Option(3, help="timed generations per row (the median is reported)"),
    skip_kv_fraction: float = typer.Option(1.0, help="pages of each skippable layer group, as a share of the main pool's"),
    smoke: bool = typer.Option(False, "--smoke", help="allow CPU (float32): proves the code path, measures nothing"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """Decode tokens/s of SkipDecode (policies bucket and mask) against the full model in the same run, and
    against the layer ratio N / average active layers."""
    import torch

    from fxforge.artifact import check_output_file
    from fxforge.bench import chat_prompts, random_prompts
    from fxforge.passes import SkipDecode
    from fxforge.passes.manager import check_pipeline
    from fxforge.skip_bench import run_bench

    batch_list = _ints_at_least(batches, "--batches", 1)
    targets = _floats_at_least(speedups, "--speedups", 1.0)
    if repeats < 1 or max_new_tokens < 1:
        raise FxforgeError(f"--repeats and --max-new-tokens must be >= 1, got {repeats} and {max_new_tokens}")
    if not 0 < skip_kv_fraction <= 1:
        raise FxforgeError(f"--skip-kv-fraction must be in (0, 1], got {skip_kv_fraction}")
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise FxforgeError("fxforge bench skip-decode needs a CUDA device (use --smoke to exercise it on CPU)")
    base = _load(model, "bfloat16" if cuda else "float32", random_init, "cuda" if cuda else "cpu")
    check_pipeline([SkipDecode.from_dict({"target_speedup": s, "warmup_layers": warmup_layers, "span": max_new_tokens,
                                          "decay": decay, "levels": levels}) for s in targets], base.spec)
    count = 2 * max(batch_list)
    prompt_ids = random_prompts(count, prompt_len, base.spec.vocab_size) if prompt_len else chat_prompts(base, count)
    results = run_bench(base, prompt_ids, max_new_tokens, batch_list, targets, warmup_layers, repeats,
                        progress=lambda row: console.print({k: v for k, v in row.items() if k != "all_seconds"}),
                        kv_fraction=skip_kv_fraction, decay=decay, levels=levels)
    results.update(model=model, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   max_new_tokens=max_new_tokens, prompts=count)
    _print_rows([{k: v for k, v in r.items() if k != "all_seconds"} for r in results["rows"]])
    out.print_json(json.dumps(results["targets"]))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


# -- issue 12: Op/B placement, device calibration, the Duplex study, expert offload ----------------

def _placement_extras(model) -> tuple[str, object]:
    """report.md section and a writer of placement.png for an artifact whose passes include opb-placement."""
    records = [r for r in getattr(model, "passes", []) if r["name"] == "opb-placement"]
    if not records:
        return "", None
    from fxforge.passes.opb_placement import placement_markdown, plot_placement

    plan = records[-1]["report"]
    return placement_markdown(plan, "placement.png"), lambda staging: plot_placement(plan, staging / "placement.png")


@app.command("calibrate-device")
@_guard
def calibrate_device_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="system file to write (devices + links, JSON)"),
    reps: int = typer.Option(5, help="timed runs per measurement (the median is kept)"),
    warmup: int = typer.Option(2, help="untimed runs before them"),
    quick: bool = typer.Option(False, "--quick", help="tiny buffers: proves the code path, measures little"),
    gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="measure the GPU and its host link when CUDA is available"),
    prefix: str = typer.Option("local", help="device names: PREFIX-gpu, PREFIX-cpu"),
):
    """Measure this machine (CPU and GPU copy bandwidth, matmul peaks, host-to-device link) into a device file
    that opb-placement, analyze and the benches read."""
    import torch
    from rich.progress import Progress

    from fxforge.artifact import check_output_file
    from fxforge.calibrate import CalibrationSettings, calibrate, calibration_steps

    settings = CalibrationSettings(reps=reps, warmup=warmup, quick=quick, prefix=prefix, gpu=gpu)
    target = check_output_file(output, "-o")
    if gpu and not torch.cuda.is_available():
        console.print("no CUDA device: the GPU and host-link measurements are skipped")
    with Progress(console=console) as progress:
        task = progress.add_task("calibrating", total=len(calibration_steps(settings)))
        system = calibrate(settings, lambda step: progress.update(task, advance=1, description=step))
    system.save(target)
    rows = [{"device": d.name, "kind": d.kind, "bandwidth_GBps": d.mem_bandwidth / 1e9,
             **{f"{k}_TFLOPs": v / 1e12 for k, v in d.peak_flops.items()}} for d in system.devices.values()]
    _print_rows(rows)
    for link in system.links:
        console.print(f"link {link.name}: {link.bandwidth / 1e9:.1f} GB/s, {link.latency_s * 1e6:.1f} us ({link.notes})")
    console.print(f"wrote {target}")


def _placement_config(devices, links, phase, batch, context, prefill_tokens, dtype, experts, skew, memory_budget_gb):
    from fxforge.passes.manager import resolve

    return resolve({"name": "opb-placement", "devices": devices, "links": links, "phase": phase, "batch": batch,
                    "context": context, "prefill_tokens": prefill_tokens, "dtype": _dtype(dtype).__repr__()
                    .removeprefix("torch."), "experts": experts, "skew": skew, "memory_budget_gb": memory_budget_gb})


@app.command("place")
@_guard
def place_cmd(
    model: str = typer.Argument(..., help="model: named shapes use their config (no weights), else loaded"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for plan.json, report.md, placement.png"),
    devices: str = typer.Option("h200,logic-pim", help="devices: built-in names (h100, h200, logic-pim, host-cpu), "
                                "device or system JSON files (calibrate-device), comma-separated"),
    links: str = typer.Option("", help="extra links A:B=TEMPLATE or A:B=GBPS[/LATENCY_US], comma-separated"),
    phase: str = typer.Option("decode", help="prefill, decode or mixed"),
    batch: int = typer.Option(64, help="sequences in the step"),
    context: int = typer.Option(4096, help="context length"),
    prefill_tokens: int = typer.Option(0, help="mixed: prefill tokens in the step"),
    dtype: str = typer.Option("bfloat16", help="weights and activations"),
    experts: str = typer.Option("uniform", help="expert token distribution: uniform, skewed or measured "
                                "(routing on the calibration split of --data; loads the weights)"),
    skew: float = typer.Option(1.0, help="skewed: Zipf exponent of the experts' routing shares"),
    memory_budget_gb: float = typer.Option(0.0, "--memory-budget-gb", help="weights + KV the compute side may "
                                           "hold (0: its memory); experts beyond it live on the memory side"),
    data: str = typer.Option("gsm8k", help="calibration text for --experts measured"),
    as_json: bool = typer.Option(False, "--json", help="print the plan's summary as JSON"),
):
    """Place MODEL's ops on DEVICES for a workload (the opb-placement pass on the model's graph) and write the
    plan, a report and the Op/B-vs-ridge plot; nothing is compiled."""
    import shutil
    import tempfile

    from fxforge.artifact import check_output_dir
    from fxforge.ir.importers.named import NAMED_SHAPES
    from fxforge.passes.manager import PassContext
    from fxforge.passes.opb_placement import memory_plan, opb_placement, placement_markdown, plot_placement

    config = _placement_config(devices, links, phase, batch, context, prefill_tokens, dtype, experts, skew,
                               memory_budget_gb)
    target = check_output_dir(output)
    if target.exists() and any(target.iterdir()):
        raise FxforgeError(f"-o {str(target)!r} is not empty; choose a new or empty directory")
    measured = config.experts.value == "measured"
    if model in NAMED_SHAPES and not measured:
        memory_plan(config, NAMED_SHAPES[model])  # before building anything
    m = _analysis_model(model) if not measured else _load(model, "float32")
    memory_plan(config, m.spec)
    from fxforge.ir.capture import capture

    gm = capture(m.module)
    calib = None
    if measured:
        from fxforge.data import load_texts

        calib = load_texts(data, split="calib")
    with console.status("placing"):
        result = opb_placement(gm, config, PassContext(model=m, calib=calib))
    plan = result.report
    config_out = (result.config or config).to_dict()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / "plan.json").write_text(json.dumps({"kind": "opb-placement", "model": model, "config": config_out,
                                                       "plan": plan}, indent=1, default=str))
        (staging / "report.md").write_text(f"# Op/B placement: {model}\n" + placement_markdown(plan, "placement.png"))
        plot_placement(plan, staging / "placement.png")
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    summary = {k: plan[k] for k in ("predicted_step_s", "per_device_s", "transfer_s", "single_device_s",
                                    "speedup_vs_best_single_device")}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(placement_markdown(plan))
        console.print(f"wrote {target}/plan.json, report.md, placement.png")


@app.command("duplex-study")
@_guard
def duplex_study_cmd(
    models: str = typer.Option("mixtral-8x7b,llama-3-70b-like", help="model shapes (comma-separated)"),
    batches: str = typer.Option("16,32,64,128,256", help="decode batches under continuous batching"),
    lengths: str = typer.Option("1024/1024,2048/512", help="prompt/generated lengths (LIN/LOUT, comma-separated)"),
    top_ks: str = typer.Option("1,2,4", help="top-k values of the experts' Op/B table"),
    opb_batches: str = typer.Option("1,4,16,64,256,1024", help="batches of the Op/B table"),
    skew: float = typer.Option(1.0, help="MoE models also run with Zipf(SKEW) expert routing (0: uniform only)"),
    smoke: bool = typer.Option(False, "--smoke", help="one layer per model, two batches: proves the code path"),
    json_out: Path = typer.Option(Path("duplex_study.json"), "--json-out", help="results (JSON)"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown-out", help="write the tables here"),
    plot: Path = typer.Option(Path("duplex_opb.png"), "--plot", help="Op/B against batch (PNG)"),
):
    """The Duplex paper's analysis on fxforge's cost model (a model, not a measurement): Op/B of MoE experts and
    GQA attention against batch and top-k, and modelled throughput of xPU + Logic-PIM against the xPU alone."""
    import dataclasses

    from rich.progress import Progress

    from fxforge.artifact import check_output_file
    from fxforge.duplex import StudySettings, markdown, plot_opb, run_study

    for path, option in ((json_out, "--json-out"), (markdown_out, "--markdown-out"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, option)
    try:
        pairs = tuple(tuple(int(x) for x in item.split("/")) for item in lengths.split(",") if item.strip())
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 for p in pairs):
        raise FxforgeError(f"--lengths must be LIN/LOUT pairs such as 1024/1024,2048/512, got {lengths!r}")
    settings = StudySettings(models=tuple(m.strip() for m in models.split(",") if m.strip()),
                             batches=tuple(_int_list(batches, "--batches")), lengths=pairs,
                             top_ks=tuple(_int_list(top_ks, "--top-ks")),
                             opb_batches=tuple(_int_list(opb_batches, "--opb-batches")), skew=skew)
    if smoke:
        settings = dataclasses.replace(settings, batches=settings.batches[:2], lengths=settings.lengths[:1],
                                       opb_batches=settings.opb_batches[:2], num_layers=1)
    total = len(settings.models) * len(settings.batches) * len(settings.lengths)
    with Progress(console=console) as progress:
        task = progress.add_task("duplex study", total=total)
        results = run_study(settings, lambda what: progress.update(task, advance=1, description=what))
    table = markdown(results)
    json_out.write_text(json.dumps(results, indent=1))
    plot_opb(results, plot)
    if markdown_out is not None:
        markdown_out.write_text(table)
    out.print(table)


@bench_app.command("offload")
@_guard
def bench_offload_cmd(
    model: str = typer.Argument("mixtral-8x7b", help="a named MoE shape (random weights)"),
    gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", help="GPU memory for the model's weights "
                                                  "(dense part first); default: keeps half of the experts off the GPU"),
    batches: str = typer.Option("1,8,64", help="decode batches"),
    repeats: int = typer.Option(5, help="timed steps per row (the median is reported)"),
    layers: int = typer.Option(0, help="MoE layers to run (0: the model's)"),
    devices: str = typer.Option("h200,host-cpu", help="the cost model's GPU, CPU and link: built-in names or a "
                                "calibrate-device file"),
    math: str = typer.Option("exact", help="exact (float32, as fused_moe_ref) or native (the weights' dtype)"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="scale the offload cost model's GPU, "
                                   "CPU and link terms to a quick measurement on layer 0 before the timed steps"),
    smoke: bool = typer.Option(False, "--smoke", help="tiny widths, CPU allowed: proves the code path"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="write results here"),
):
    """Offloaded MoE experts: tokens/s of the placement rule vs always copying weights vs always computing on the
    CPU, with the cost model's predicted step time next to the measured one."""
    import dataclasses

    import torch

    from fxforge.artifact import check_output_file
    from fxforge.ir.devices import load_system
    from fxforge.ir.importers.named import NAMED_SHAPES
    from fxforge.offload_bench import OffloadBench, costs_from, half_budget_gb, run_bench
    from fxforge.passes.opb_placement import weight_bytes
    from fxforge.runtime.expert_offload import resident_experts

    spec = NAMED_SHAPES.get(model)
    if spec is None or not spec.is_moe:
        moe = sorted(name for name, s in NAMED_SHAPES.items() if s.is_moe)
        raise FxforgeError(f"{model!r} is not a named MoE shape; choose one of {moe}")
    if math not in ("exact", "native"):
        raise FxforgeError(f"--math must be exact or native, got {math!r}")
    batch_list = _int_list(batches, "--batches")
    if repeats < 1 or layers < 0:
        raise FxforgeError(f"--repeats must be >= 1 and --layers >= 0, got {repeats} and {layers}")
    if json_out is not None:
        check_output_file(json_out, "--json-out")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise FxforgeError("fxforge bench offload needs a CUDA device (use --smoke to exercise it on CPU)")
    dtype = torch.bfloat16 if cuda else torch.float32
    if smoke:
        spec = dataclasses.replace(spec, hidden_size=64, moe_intermediate_size=96, intermediate_size=96, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512)
    act = torch.finfo(dtype).bits // 8
    budget = gpu_memory_gb if gpu_memory_gb is not None else half_budget_gb(spec, act)
    dense, expert = weight_bytes(spec, act)
    resident_experts(budget * 1e9, dense, expert, spec.num_layers, spec.num_experts)  # too small: fails here
    costs = costs_from(load_system(d.strip() for d in devices.split(",") if d.strip()),
                       str(dtype).removeprefix("torch."), math == "exact")
    bench = OffloadBench(spec, budget, tuple(batch_list), repeats, layers, math == "exact", calibrate)
    results = run_bench(bench, costs, torch.device("cuda" if cuda else "cpu"), dtype, progress=console.print)
    results.update(model=model, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   gpu_memory_gb=budget, smoke=smoke, math=math)
    _print_rows(results["rows"])
    out.print_json(json.dumps(results["targets"]))
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


@bench_app.command("costmodel")
@_guard
def bench_costmodel_cmd(
    models: str = typer.Option("llama-3-8b,mixtral-8x7b", help="named shapes, one layer each (random weights)"),
    device: str = typer.Option("h200", help="the device spec the predictions use: a built-in name or a device / "
                               "calibrate-device file (its GPU on CUDA, its CPU otherwise)"),
    batches: str = typer.Option("1,4,16,64,256,1024,2048", help="decode batches"),
    context: int = typer.Option(4096, help="decode context (cut for large batches to bound the KV cache)"),
    prefill: str = typer.Option("1x512,4x1024,8x2048", help="prefill steps: SEQUENCESxTOKENS, comma-separated"),
    repeats: int = typer.Option(5, help="timed forwards per workload (the median per node)"),
    smoke: bool = typer.Option(False, "--smoke", help="tiny widths, CPU allowed: proves the code path"),
    json_out: Path = typer.Option(Path("costmodel.json"), "--json-out", help="results (JSON)"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown-out", help="write the error table here"),
):
    """The cost model against measured node times (attention decode / prefill, projections, experts) over
    batches 1..2048, with per-class achieved fractions of peak calibrated to the measurements."""
    import dataclasses

    import torch

    import fxforge
    from fxforge.artifact import check_output_file
    from fxforge.costmodel_bench import CostBench, markdown, one_layer, run_bench
    from fxforge.ir.devices import load_system
    from fxforge.ir.importers.named import NAMED_SHAPES
    from fxforge.ir.model import Model

    for path, option in ((json_out, "--json-out"), (markdown_out, "--markdown-out")):
        if path is not None:
            check_output_file(path, option)
    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in NAMED_SHAPES]
    if unknown or not names:
        raise FxforgeError(f"--models: unknown {unknown}; named shapes: {', '.join(NAMED_SHAPES)}")
    try:
        steps = tuple(tuple(int(x) for x in item.lower().split("x")) for item in prefill.split(",") if item.strip())
    except ValueError:
        steps = ((0,),)
    if any(len(st) != 2 or min(st) < 1 for st in steps):
        raise FxforgeError(f"--prefill must be SEQUENCESxTOKENS items such as 4x1024, got {prefill!r}")
    if repeats < 1 or context < 1:
        raise FxforgeError(f"--repeats and --context must be >= 1, got {repeats} and {context}")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise FxforgeError("fxforge bench costmodel needs a CUDA device (use --smoke with a calibrate-device file)")
    system = load_system([device])
    kind = "xpu" if cuda else "cpu"
    spec_device = next((d for d in system.devices.values() if d.kind == kind), None)
    if spec_device is None:
        raise FxforgeError(f"--device {device!r} has no {kind} device; on this machine the predictions need one "
                           "(fxforge calibrate-device writes it)")
    bench = CostBench(decode_batches=tuple(_int_list(batches, "--batches")), context=context, prefill=steps,
                      repeats=repeats)
    dtype = torch.bfloat16 if cuda else torch.float32
    built = []
    for name in names:
        spec = one_layer(NAMED_SHAPES[name])
        if smoke:
            spec = dataclasses.replace(spec, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                       num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=512)
        model = Model.from_state_dict(spec, None, dtype=dtype, device="cuda" if cuda else "cpu")
        built.append(fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}]) if cuda else model)
    results = run_bench(built, bench, spec_device, progress=console.print)
    results.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if cuda else None, smoke=smoke)
    table = markdown(results)
    json_out.write_text(json.dumps(results, indent=1))
    if markdown_out is not None:
        markdown_out.write_text(table)
    out.print(table)
    out.print_json(json.dumps(results["targets"]))


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
