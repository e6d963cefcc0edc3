"""Real text for evaluation and calibration: the GSM8K test set, or any .txt / .jsonl file.

GSM8K (1,319 problems) is split once, deterministically: problems 0..999 are the evaluation text,
1000..1318 the calibration text, so a calibrated pass never sees the text it is scored on.
"""

from __future__ import annotations

import json
from pathlib import Path

from fxforge.errors import FxforgeError

GSM8K_EVAL_END = 1000
SPLITS = ("eval", "calib", "all")


def gsm8k_path() -> Path:
    from fxforge.ir.importers.fetch import GSM8K, fetch_package_file

    return fetch_package_file(*GSM8K)


def load_texts(data: str, split: str = "eval") -> list[str]:
    """Documents of `data` ("gsm8k" or a .txt/.jsonl path) for the given split."""
    if split not in SPLITS:
        raise FxforgeError(f"split={split!r} is not valid; expected one of {SPLITS}")
    if data == "gsm8k":
        docs = _jsonl_docs(gsm8k_path())
        return {"eval": docs[:GSM8K_EVAL_END], "calib": docs[GSM8K_EVAL_END:], "all": docs}[split]
    path = Path(data)
    if not path.is_file():
        raise FxforgeError(f"data {data!r} is neither 'gsm8k' nor a readable .txt/.jsonl file")
    if path.suffix == ".jsonl":
        docs = _jsonl_docs(path)
    elif path.suffix == ".txt":
        docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        raise FxforgeError(f"data file {data!r} has suffix {path.suffix!r}; expected .txt or .jsonl")
    if not docs:
        raise FxforgeError(f"data file {data!r} contains no text")
    if split == "all":
        return docs
    cut = max(1, int(len(docs) * 0.75)) if len(docs) > 1 else 1
    return docs[:cut] if split == "eval" else (docs[cut:] or docs[:cut])


def _jsonl_docs(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise FxforgeError(f"{path}:{i + 1} is not valid JSON") from None
        if isinstance(row, str):
            docs.append(row)
        elif "question" in row and "answer" in row:
            docs.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
        elif "text" in row:
            docs.append(row["text"])
        else:
            raise FxforgeError(f"{path}:{i + 1} has none of the keys 'text' or 'question'/'answer'")
    return docs
