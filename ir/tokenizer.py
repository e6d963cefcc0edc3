"""Tokenizer: a `tokenizers.Tokenizer` plus the few facts generation needs (BOS/EOS ids, chat template).

Built from a GGUF file's vocabulary (byte-level BPE, or sentencepiece-style BPE), from a Hugging Face
tokenizer.json directory, or from an in-memory HF fast tokenizer; saved as tokenizer.json +
tokenizer_config.json, which Hugging Face can read back too.

Whether BOS is prepended is the backend's post-processor's business, as in HF: `encode(text)` adds
it only when the source said so (GGUF `tokenizer.ggml.add_bos_token`, HF's post-processor).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from fxforge.ir.errors import FxforgeError, UnsupportedArchitectureError

TOKENIZER_CONFIG_VERSION = 1
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(regex: str | None = None) -> pre_tokenizers.PreTokenizer:
    """GPT-2 byte-level pre-tokenizer, with its own regex or a model-specific split before it."""
    if regex is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# llama.cpp `tokenizer.ggml.pre` -> how text is split before BPE (llama.cpp's llm_tokenizer_bpe rules).
_GGUF_PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    # individual digits first, then the GPT-2 regex
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
}


class Tokenizer:
    """Text <-> token ids, and chat prompts via the model's Jinja chat template."""

    def __init__(self, backend: Backend, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template

    # -- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the chat template, as HF does."""
        if not self.chat_template:
            raise FxforgeError("this tokenizer has no chat template; encode the prompt as plain text (chat=False)")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json (readable by HF's PreTrainedTokenizerFast too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"fxforge_tokenizer_version": TOKENIZER_CONFIG_VERSION,
                  "tokenizer_class": "PreTrainedTokenizerFast",
                  "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                  "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        return cls.from_hf_dir(directory)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> "Tokenizer":
        """tokenizer.json (+ tokenizer_config.json / chat_template.jinja when present)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FxforgeError(f"{directory} has no tokenizer.json; a fast (tokenizers) tokenizer is needed")
        backend = Backend.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        version = config.get("fxforge_tokenizer_version", TOKENIZER_CONFIG_VERSION)
        if version != TOKENIZER_CONFIG_VERSION:
            raise FxforgeError(f"{config_path} has fxforge_tokenizer_version={version}; "
                               f"this fxforge reads version {TOKENIZER_CONFIG_VERSION}")
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        bos = _special_id(backend, config, "bos")
        if config.get("add_bos_token") and bos is not None and bos not in backend.encode("a").ids[:1]:
            _add_bos_post_processor(backend, bos)
        return cls(backend, bos, _special_id(backend, config, "eos"), _template_str(template))

    @classmethod
    def from_hf(cls, tokenizer) -> "Tokenizer":
        """From an in-memory HF fast tokenizer (its backend is copied, never shared)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise FxforgeError(f"{type(tokenizer).__name__} is not a fast tokenizer; fxforge needs one "
                               "backed by the `tokenizers` library (PreTrainedTokenizerFast)")
        return cls(Backend.from_str(backend.to_str()), tokenizer.bos_token_id, tokenizer.eos_token_id,
                   _template_str(getattr(tokenizer, "chat_template", None)))

    @classmethod
    def from_gguf_fields(cls, reader) -> "Tokenizer":
        """From a GGUFReader's tokenizer.ggml.* metadata (byte-level BPE or sentencepiece-style BPE)."""
        fields = reader.fields

        def get(key, default=None):
            return fields[key].contents() if key in fields else default

        kind = get("tokenizer.ggml.model")
        tokens = get("tokenizer.ggml.tokens")
        if tokens is None:
            raise FxforgeError("this GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
        token_types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, get("tokenizer.ggml.merges") or [], get("tokenizer.ggml.pre", "default"))
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, get("tokenizer.ggml.scores"), get("tokenizer.ggml.unknown_token_id"),
                                         get("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True
        else:
            raise UnsupportedArchitectureError(
                f"GGUF tokenizer model {kind!r} is not supported; expected 'gpt2' (byte-level BPE) or 'llama'")
        _add_gguf_special_tokens(backend, tokens, token_types, byte_level=kind == "gpt2")
        bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
        if get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
            _add_bos_post_processor(backend, bos)
        return cls(backend, bos, eos, get("tokenizer.chat_template"))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Backend:
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise UnsupportedArchitectureError(
            f"GGUF pre-tokenizer {pre!r} is not supported; expected one of {sorted(_GGUF_PRE_TOKENIZERS)}")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _GGUF_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _sentencepiece_bpe(tokens: list[str], scores, unk_id: int | None, add_space_prefix: bool) -> Backend:
    """Llama/Mistral sentencepiece vocab as BPE; merges recovered from the token scores (as HF does)."""
    if scores is None:
        raise FxforgeError("this GGUF sentencepiece vocabulary has no tokenizer.ggml.scores")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = tokens[unk_id] if unk_id is not None else None
    backend = Backend(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space_prefix
                                                     else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return backend


def _add_gguf_special_tokens(backend: Backend, tokens, token_types, byte_level: bool) -> None:
    """Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens.

    In a byte-level vocab a 'control' token spelled outside the byte alphabet is a converter mislabel;
    llama.cpp and HF leave it alone, and so do we.
    """
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if byte_level else None
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types)
               if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types)
            if kind == _USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _add_bos_post_processor(backend: Backend, bos_id: int) -> None:
    bos = backend.id_to_token(bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])


def _special_id(backend: Backend, config: dict, which: str) -> int | None:
    if config.get(f"{which}_token_id") is not None:
        return int(config[f"{which}_token_id"])
    token = config.get(f"{which}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if token else None


def _template_str(template) -> str | None:
    """HF allows a dict of named templates; the one named 'default' is what apply_chat_template uses."""
    if isinstance(template, dict):
        return template.get("default")
    if isinstance(template, list):
        return next((t["template"] for t in template if t.get("name") == "default"), None)
    return template or None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    """Same environment as HF's apply_chat_template: sandboxed, trim/lstrip blocks, its helpers."""
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def token_windows(tokenizer, texts: list[str], context: int, max_tokens: int | None) -> torch.Tensor:
    """Documents joined by blank lines, tokenized once, cut into non-overlapping windows [N, context].

    Each window scores context-1 tokens; enough windows are taken to score max_tokens tokens.
    """
    if context < 2:
        raise FxforgeError(f"context={context} must be at least 2 tokens")
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        if max_tokens and len(ids) >= (max_tokens // (context - 1) + 1) * context:
            break
    windows = len(ids) // context
    if max_tokens:
        windows = min(windows, math.ceil(max_tokens / (context - 1)))
    if windows == 0:
        raise FxforgeError(f"the text has {len(ids)} tokens, fewer than one window of context={context}")
    return torch.tensor(ids[: windows * context]).view(windows, context)
