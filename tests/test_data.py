import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loram.config import SourceParams
from loram.data import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    collate,
    detag_brown,
    encode_instruction,
    load_rows,
    normalize_row,
    pack_examples,
    pack_text,
    split_rows,
)

WORDS = "<pad> <eos> <unk> ### Instruction: Response: <|user|> <|assistant|> <|end|> what is two plus three five the answer a b c d e f".split()


def make_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
            "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}"
        )
    return tok


def test_chat_template_masks_prompt_and_ends_turn():
    tok = make_tokenizer(chat=True)
    ex = encode_instruction(tok, "what is two plus three", "five", seq_len=64)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "what is two plus three"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.convert_ids_to_tokens(ids[n_prompt:]) == ["five", "<|end|>"]


def test_plain_template_without_chat_template():
    tok = make_tokenizer(chat=False)
    ex = encode_instruction(tok, "what is two plus three", "five", seq_len=64)
    n_prompt = len(tok(PLAIN_TEMPLATE.format(prompt="what is two plus three"))["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.convert_ids_to_tokens(ex["input_ids"][n_prompt:]) == ["five", "<eos>"]


def test_truncation_drops_examples_without_response():
    tok = make_tokenizer(chat=True)
    assert encode_instruction(tok, "what is two plus three", "five", seq_len=3) is None
    ex = encode_instruction(tok, "a", "b c d e f", seq_len=6)
    assert len(ex["input_ids"]) == 6


def test_packing_keeps_labels_aligned():
    exs = [
        {
            "input_ids": list(range(i * 10, i * 10 + 7)),
            "labels": [-100] * 3 + list(range(i * 10 + 3, i * 10 + 7)),
        }
        for i in range(5)
    ]
    blocks = pack_examples(exs, 8)
    assert len(blocks) == 35 // 8
    flat_ids = [t for e in exs for t in e["input_ids"]]
    flat_lab = [t for e in exs for t in e["labels"]]
    for k, b in enumerate(blocks):
        assert b["input_ids"] == flat_ids[k * 8 : (k + 1) * 8]
        assert b["labels"] == flat_lab[k * 8 : (k + 1) * 8]


def test_pack_text_blocks_exact_length_with_eos():
    tok = make_tokenizer(chat=False)
    blocks = pack_text(tok, ["a b c", "d e f a"], 3)
    assert [len(b["input_ids"]) for b in blocks] == [3, 3, 3]
    eos = tok.eos_token_id
    flat = [t for b in blocks for t in b["input_ids"]]
    assert flat[3] == eos and blocks[0]["labels"] == blocks[0]["input_ids"]


def test_collate_pads_and_masks():
    b = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=0,
    )
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["input_ids"].dtype == torch.long


def test_split_is_deterministic_and_disjoint():
    rows = [{"prompt": str(i), "response": "x"} for i in range(100)]
    t1, v1 = split_rows(rows, 0.1, 50, seed=3)
    t2, v2 = split_rows(rows, 0.1, 50, seed=3)
    t3, v3 = split_rows(rows, 0.1, 50, seed=4)
    assert v1 == v2 and t1 == t2 and v1 != v3
    assert len(v1) == 10 and len(t1) == 90
    assert {r["prompt"] for r in v1}.isdisjoint({r["prompt"] for r in t1})
    assert len(split_rows(rows, 0.5, 7, 0)[1]) == 7


def test_grouped_split_keeps_each_group_on_one_side():
    # 30 problems x 4 languages, language-major like the embedded MBPP rows
    rows = [
        {"prompt": f"{task}-{lang}", "response": "x", "group": f"t{task}"}
        for lang in "abcd"
        for task in range(30)
    ]
    train, val = split_rows(rows, 0.1, 50, seed=0)
    assert len(val) == 12
    val_groups = {r["group"] for r in val}
    train_groups = {r["group"] for r in train}
    assert val_groups.isdisjoint(train_groups)
    # whole groups drawn: 3 groups x 4 rows exactly fill 12, nothing dropped
    assert len(val_groups) == 3 and len(train) == 108
    assert len({r["prompt"][-1] for r in val[:6]}) > 1  # a prefix mixes the languages
    assert split_rows(rows, 0.1, 50, seed=0) == (train, val)
    assert split_rows(rows, 0.1, 50, seed=1)[1] != val
    # a cut group: 10 rows wanted, 3 groups drawn (12 rows), 2 dropped, none moved to train
    train, val = split_rows(rows, 0.1, 10, seed=0)
    assert len(val) == 10 and len(train) == 108
    assert {r["group"] for r in val}.isdisjoint({r["group"] for r in train})
    with pytest.raises(ValueError, match="all 2 groups"):
        split_rows([{"prompt": "p", "response": "r", "group": g} for g in "aabb"], 0.9, 3, 0)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": "i", "input": "x", "output": "o"}, {"prompt": "i\n\nx", "response": "o"}),
        ({"instruction": "i", "input": "", "output": "o"}, {"prompt": "i", "response": "o"}),
        ({"question": "q", "answer": "a #### 3"}, {"prompt": "q", "response": "a #### 3"}),
        ({"problem": "p", "solution": "s"}, {"prompt": "p", "response": "s"}),
        ({"prompt": "p", "completion": "c"}, {"prompt": "p", "response": "c"}),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "h"},
                    {"from": "gpt", "value": "g"},
                ]
            },
            {"prompt": "h", "response": "g"},
        ),
        (
            {"system_prompt": "be nice", "question": "q", "response": "r"},
            {"prompt": "be nice\n\nq", "response": "r"},
        ),
        ({"text": "hello"}, {"text": "hello"}),
    ],
)
def test_normalize_known_schemas(row, expected):
    assert normalize_row(row) == expected


def test_unknown_schema_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot recognise the row schema.*foo"):
        normalize_row({"foo": 1})


def test_local_files_of_each_type(tmp_path):
    rows = [{"instruction": "i", "input": "", "output": str(k)} for k in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("one doc\n\nsecond doc\n")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        got = load_rows(SourceParams(kind="file", name=str(tmp_path / name)))
        assert [r["response"] for r in got] == ["0", "1", "2"]
    txt = load_rows(SourceParams(kind="file", name=str(tmp_path / "a.txt"), format="text"))
    assert txt == [{"text": "one doc"}, {"text": "second doc"}]
    assert (
        len(load_rows(SourceParams(kind="file", name=str(tmp_path / "a.jsonl"), max_rows=2))) == 2
    )


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(SourceParams(kind="file", name=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="unknown; allowed: math, gsm8k, mbpp, brown, pydoc"):
        load_rows(SourceParams(kind="embedded", name="openhermes"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_rows(SourceParams(kind="file", name=str(tmp_path / "x.xml")))


def test_embedded_sources_are_real_and_sized():
    math_rows = load_rows(SourceParams(kind="embedded", name="math"))
    assert len(math_rows) == 5000 and "\\boxed" in math_rows[0]["response"]
    gsm = load_rows(SourceParams(kind="embedded", name="gsm8k", split="test"))
    assert len(gsm) == 1319 and all("####" in r["response"] for r in gsm)
    assert len(load_rows(SourceParams(kind="embedded", name="pydoc", format="text"))) > 50
    mbpp = load_rows(SourceParams(kind="embedded", name="mbpp"))
    assert len(mbpp) == 5000 and len({r["group"] for r in mbpp}) == 500
    py = [r for r in mbpp if r["prompt"].endswith("Write it in python.")]
    assert len(py) == 500 and all("\r" not in r["response"] for r in mbpp)
    assert any(r["response"].lstrip().startswith("def ") for r in py)


def test_brown_detagging():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\tIt/pps did/dod n't/* ./.\n"
    assert detag_brown(raw) == 'The jury said " no ". \nIt didn\'t.'.replace(" \n", "\n")


# ---------------------------------------------------------------------------------------------
# Validation: every bad input names the file (or source) and the 1-based row / line


def _lines(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _parquet(rows):
    def write(path):
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)

    return write


def _gzip(data: bytes, cut: int | None = None):
    import gzip

    blob = gzip.compress(data)
    return blob[:cut] if cut else blob


OK = {"prompt": "p", "response": "r"}

# (file name, content: bytes or a writer, format, substrings the message must contain)
BAD_INPUTS = [
    # 1. malformed JSON: physical line number, blank lines counted
    ("a.jsonl", _lines(OK, OK, '{"prompt": "p",'), "auto", ["line 3", "invalid JSON"]),
    ("b.jsonl", _lines(OK, "", OK, "  ", '{"prompt": x}'), "auto", ["line 5", "invalid JSON"]),
    (
        "train.jsonl",
        _lines(OK, OK)[:-1] + b'\n{"prompt": "p", "resp',
        "auto",
        ["line 3", "invalid JSON", "truncated"],
    ),
    ("c.json", b'[{"prompt": "p",\n "response": "r"},\n {"prompt" "x"}]', "auto", ["line 3"]),
    # 2. a row that is not an object
    ("d.jsonl", _lines(OK, "[1, 2]"), "auto", ["line 2", "expected a JSON object", "array"]),
    ("e.jsonl", _lines(OK, OK, "42"), "auto", ["line 3", "expected a JSON object", "number"]),
    ("f.jsonl", _lines('"text"'), "auto", ["line 1", "expected a JSON object", "string"]),
    ("g.jsonl", _lines(OK, "null"), "auto", ["line 2", "expected a JSON object", "null"]),
    ("h.json", json.dumps([OK, OK, [1]]).encode(), "auto", ["row 3", "expected a JSON object"]),
    (
        "i.json",
        json.dumps({"data": [OK, None]}).encode(),
        "auto",
        ["row 2", "expected a JSON object", "null"],
    ),
    # 3. used fields: null / NaN / non-string / empty / whitespace, every schema and chat turns
    (
        "j.jsonl",
        _lines(OK, {"prompt": None, "response": "r"}),
        "auto",
        ["line 2", "'prompt'", "null"],
    ),
    (
        "k.jsonl",
        _lines('{"prompt": "p", "response": NaN}'),
        "auto",
        ["line 1", "'response'", "NaN"],
    ),
    (
        "l.jsonl",
        _lines(OK, {"question": "q", "answer": 42}),
        "auto",
        ["line 2", "'answer'", "not a string"],
    ),
    (
        "m.jsonl",
        _lines({"instruction": "  ", "output": "o"}),
        "auto",
        ["line 1", "'instruction'", "empty"],
    ),
    (
        "n.jsonl",
        _lines(OK, OK, {"problem": "p", "solution": ""}),
        "auto",
        ["line 3", "'solution'", "empty"],
    ),
    ("o.jsonl", _lines({"prompt": "p", "completion": []}), "auto", ["line 1", "'completion'"]),
    (
        "p.jsonl",
        _lines({"instruction": "i", "input": 5, "output": "o"}),
        "auto",
        ["line 1", "'input'"],
    ),
    (
        "q.jsonl",
        _lines(OK, {"instruction": "i", "response": None}),
        "auto",
        ["line 2", "'response'"],
    ),
    (
        "r.jsonl",
        _lines({"system_prompt": "s", "question": "\t", "response": "r"}),
        "auto",
        ["line 1", "'question'", "empty"],
    ),
    (
        "s.jsonl",
        _lines(
            OK,
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]},
        ),
        "auto",
        ["line 2", "'messages[1].content'", "empty"],
    ),
    (
        "t.jsonl",
        _lines({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "g"}]}),
        "auto",
        ["line 1", "'conversations[0].value'", "not a string"],
    ),
    ("u.jsonl", _lines({"messages": "hi"}), "auto", ["line 1", "'messages'", "not a list"]),
    (
        "v.jsonl",
        _lines({"messages": [{"role": "user", "content": "u"}]}),
        "auto",
        ["line 1", "no user turn"],
    ),
    (
        "w.jsonl",
        _lines({"messages": [["user", "u"]]}),
        "auto",
        ["line 1", "'messages[0]'", "not an object"],
    ),
    ("x.jsonl", _lines({"text": "t"}, {"text": ""}), "auto", ["line 2", "'text'", "empty"]),
    ("y.jsonl", _lines({"text": "t"}, {"body": "b"}), "text", ["line 2", "'text'", "missing"]),
    (
        "z.json",
        json.dumps([OK, {"prompt": "p", "response": None}]).encode(),
        "auto",
        ["row 2", "'response'"],
    ),
    # CSV: 1-based data row, plus the file line counting the header (row 1 = line 2)
    (
        "a.csv",
        b"prompt,response\np,r\np,r\np,r\np,\n",
        "auto",
        ["row 4 (line 5", "'response'", "NaN"],
    ),
    (
        "b.csv",
        b"instruction,input,output\ni,,o\n  ,x,o\n",
        "auto",
        ["row 2 (line 3", "'instruction'"],
    ),
    ("c.csv", b"prompt,response\np,r\n\n\n,r\n", "auto", ["row 2 (line 5", "'prompt'", "NaN"]),
    ("f.csv", b"prompt,response\np,1\np,2\n", "auto", ["row 1 (line 2", "'response'", "number"]),
    ("d.csv", b'prompt,response\n"p\nq",r\n,r\n', "auto", ["row 2 (line 4", "'prompt'", "NaN"]),
    ("e.csv", b"prompt,response\np,r\np,r,extra\n", "auto", ["cannot parse CSV"]),
    # parquet: same field checks, 1-based row
    (
        "a.parquet",
        _parquet([OK, OK, {"prompt": "p", "response": None}]),
        "auto",
        ["row 3", "'response'"],
    ),
    (
        "b.parquet",
        _parquet([OK, {"prompt": "", "response": "r"}]),
        "auto",
        ["row 2", "'prompt'", "empty"],
    ),
    ("c.parquet", b"PAR1 not really", "auto", ["not a readable parquet file"]),
    # 4. binary / not UTF-8, and gzip that is not gzip
    (
        "bin.jsonl",
        _lines(OK) + b'{"prompt": "\xff\xfe"}\n',
        "auto",
        ["not UTF-8", "line 2", "0xff"],
    ),
    ("bin.txt", b"one\ntwo\n\x80three\n", "text", ["not UTF-8", "line 3", "0x80"]),
    ("bin.csv", b"prompt,response\np,r\np,\xe9t\xe9\n", "auto", ["not UTF-8", "line 3", "0xe9"]),
    ("bin.json", b'[{"prompt": "\xc3"}]', "auto", ["not UTF-8", "line 1", "0xc3"]),
    ("gz.jsonl", _gzip(_lines(OK)), "auto", ["not UTF-8", "line 1", "gzip"]),
    ("plain.jsonl.gz", _lines(OK), "auto", ["not a valid gzip file"]),
    ("cut.jsonl.gz", _gzip(_lines(*[OK] * 50), cut=30), "auto", ["not a valid gzip file"]),
    ("bin.jsonl.gz", _gzip(_lines(OK, OK) + b"\xff\n"), "auto", ["not UTF-8", "line 3"]),
    ("bad.txt.gz", _gzip(_lines("doc") + b'"doc', cut=None)[:-1] + b"?", "text", ["gzip"]),
    # 5. unrecognised schema: keys found and the schemas accepted
    (
        "schema.jsonl",
        _lines(OK, {"foo": 1, "bar": 2}),
        "auto",
        ["line 2", "cannot recognise the row schema", "bar, foo", "problem/solution"],
    ),
    ("schema.csv", b"a,b\n1,2\n", "auto", ["row 1 (line 2", "keys: a, b", "prompt/response"]),
    (
        "inst.txt",
        b"a doc\n",
        "instruction",
        ["line 1", "plain-text row (keys: text)", "format is 'instruction'"],
    ),
    # 6. empty files
    ("empty.jsonl", b"", "auto", ["no rows"]),
    ("blank.jsonl", b"\n  \n\n", "auto", ["no rows"]),
    ("empty.json", b"", "auto", ["no rows"]),
    ("list.json", b"[]", "auto", ["no rows"]),
    ("empty.csv", b"", "auto", ["no rows"]),
    ("header.csv", b"prompt,response\n", "auto", ["no rows"]),
    ("empty.txt", b"\n\n", "text", ["no rows"]),
    ("empty.txt.gz", _gzip(b""), "text", ["no rows"]),
    ("empty.parquet", _parquet({"prompt": [], "response": []}), "auto", ["no rows"]),
    # 7. JSON top level neither a list nor an object with a list under data/rows/train
    ("top.json", json.dumps({"items": [OK]}).encode(), "auto", ["'data'/'rows'/'train'", "items"]),
    ("num.json", b"42", "auto", ["top level is a number"]),
    ("str.json", b'"rows"', "auto", ["top level is a string"]),
]


@pytest.mark.parametrize("name, content, fmt, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_the_file_and_row(tmp_path, name, content, fmt, expected):
    from loram.data import DataError

    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_rows(SourceParams(kind="file", name=str(path), format=fmt))
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_example_messages(tmp_path):
    from loram.data import DataError

    path = tmp_path / "data.csv"
    path.write_text("prompt,response\na,b\nc,d\ne,f\ng,\n")
    with pytest.raises(DataError) as err:
        load_rows(SourceParams(kind="file", name=str(path)))
    assert str(err.value) == (
        f"{path} row 4 (line 5 counting the header): field 'response' is empty (NaN)"
    )
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "resp')
    with pytest.raises(DataError) as err:
        load_rows(SourceParams(kind="file", name=str(path)))
    assert str(err.value) == (
        f"{path} line 3: invalid JSON (Unterminated string starting at: column 17; "
        "the last line has no newline: truncated file?)"
    )


def test_read_jsonl_names_the_file(tmp_path):
    from loram.data import DataError, read_jsonl, write_jsonl

    rows = [{"prompt": f"p{k}", "response": "r", "group": "g"} for k in range(4)]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - 20])  # cut in the middle of the last line
    with pytest.raises(DataError, match=rf"{path} line 4: invalid JSON .*truncated"):
        read_jsonl(path)
    write_jsonl(path, [rows[0], {"prompt": "p", "response": ""}])
    with pytest.raises(DataError, match=rf"{path} line 2: field 'response' is empty"):
        read_jsonl(path)
    path.write_text("")
    with pytest.raises(DataError, match=rf"{path} holds no rows"):
        read_jsonl(path)


def test_embedded_and_hub_sources_are_named(monkeypatch):
    import sys
    import types

    from loram import data
    from loram.data import DataError

    monkeypatch.setitem(data.EMBEDDED, "fake", lambda split: [OK, OK, {"prompt": "p"}])
    with pytest.raises(DataError) as err:
        load_rows(SourceParams(kind="embedded", name="fake"))
    assert str(err.value).startswith("embedded source 'fake' row 3: cannot recognise")

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, subset, split: [OK, {"question": "q", "answer": None}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as err:
        load_rows(SourceParams(kind="hub", name="org/x", split="train"))
    assert str(err.value) == (
        "hub data set 'org/x' (split train) row 2: field 'answer' is empty (null)"
    )
    fake.load_dataset = lambda name, subset, split: [{"text": "plain"}]
    with pytest.raises(
        DataError, match=r"hub data set 'org/x' \(split train\) row 1: a plain-text row"
    ):
        load_rows(SourceParams(kind="hub", name="org/x", split="train", format="instruction"))


def test_valid_files_of_every_format_load_as_before(tmp_path):
    import gzip

    import pandas as pd

    alpaca = [
        {"instruction": "i0", "input": "", "output": "o0", "group": "g0"},
        {"instruction": "i1", "input": "x", "output": "o1", "group": "g1"},
        {"instruction": "i2", "input": "None", "output": "NA", "group": "g1"},
    ]
    expected = [
        {"prompt": "i0", "response": "o0", "group": "g0"},
        {"prompt": "i1\n\nx", "response": "o1", "group": "g1"},
        {"prompt": "i2\n\nNone", "response": "NA", "group": "g1"},
    ]
    jsonl = "".join(json.dumps(r) + "\n" for r in alpaca)
    (tmp_path / "a.jsonl").write_text("\n" + jsonl.replace("\n", "\r\n", 1) + "\n")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "a.json").write_text(json.dumps(alpaca, indent=1))
    (tmp_path / "b.json").write_text(json.dumps({"rows": alpaca}))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps({"train": alpaca}).encode()))
    pd.DataFrame(alpaca).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(alpaca).to_csv(tmp_path / "a.csv", index=False)  # empty input: an empty cell
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "b.json", "a.json.gz", "a.parquet", "a.csv"):
        got = load_rows(SourceParams(kind="file", name=str(tmp_path / name)))
        assert got == expected, name
    chat = [
        {
            "messages": [
                {"role": "system", "content": None},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"system_prompt": None, "question": "q", "response": "r"},
        {"instruction": "i", "context": "c", "response": "r"},
        {"question": "q", "answer": "a #### 3"},
        {"problem": "p", "solution": "s"},
        {"prompt": "p", "completion": " c "},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    assert load_rows(SourceParams(kind="file", name=str(tmp_path / "chat.jsonl"))) == [
        {"prompt": "u", "response": "a"},
        {"prompt": "q", "response": "r"},
        {"prompt": "i\n\nc", "response": "r"},
        {"prompt": "q", "response": "a #### 3"},
        {"prompt": "p", "response": "s"},
        {"prompt": "p", "response": " c "},
    ]
    docs = "  one doc \n\n\tsecond doc\n"
    (tmp_path / "a.txt").write_text(docs)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(docs.encode()))
    (tmp_path / "t.jsonl").write_text('{"text": " one doc "}\n{"content": "c", "n": 1}\n')
    for name in ("a.txt", "a.txt.gz"):
        got = load_rows(SourceParams(kind="file", name=str(tmp_path / name), format="text"))
        assert got == [{"text": "one doc"}, {"text": "second doc"}], name
    got = load_rows(SourceParams(kind="file", name=str(tmp_path / "t.jsonl")))
    assert got == [{"text": " one doc "}, {"text": "c"}]
