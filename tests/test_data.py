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
