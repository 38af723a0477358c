"""Tests for the results report: table, bolding, verdicts, plots, sweep parser, CLI."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from loram import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ARMS: dict[str, dict] = {
    "original": {
        "arm": "original",
        "kind": "original",
        "description": "SmolLM2 base, no training",
        "params_original": 134515008,
        "params_held": None,
        "ppl": {"in_domain": 4.33, "ood_gsm8k": 5.0, "general_text": 28.0},
        "bench": {
            "gsm8k/exact_match_strict": 0.08,
            "csr": 0.40,
            "arc_easy/acc": 0.55,
            "metadata": {"limit": 10},
        },
    },
    "lora_full": {
        "arm": "lora_full",
        "kind": "lora_full",
        "params_original": 134515008,
        "params_held": 134515008,
        "peak_rss_mib": 5100.0,
        "train_seconds": 900.25,
        "ppl": {"in_domain": 3.80, "ood_gsm8k": 4.1, "general_text": 29.0},
        "bench": {"gsm8k/exact_match_strict": 0.12, "csr": 0.45, "arc_easy/acc": 0.56},
    },
    "lora_small": {
        "arm": "lora_small",
        "kind": "lora_small",
        "params_held": 50000000,
        "ppl": {"in_domain": 6.5},
        "bench": {"gsm8k/exact_match_strict": 0.02},
    },
    "loram": {
        "arm": "loram",
        "kind": "loram",
        "method": "structured",
        "ratio": 0.65,
        "aligned": True,
        "quantize": "none",
        "params_original": 134515008,
        "params_held": 86006592,
        "reduction": 1.564,
        "peak_rss_mib": 3700.2,
        "train_seconds": 512.3,
        "ppl": {"in_domain": 3.91, "ood_gsm8k": 4.2, "general_text": 30.1},
        "bench": {"gsm8k/exact_match_strict": 0.10, "csr": 0.43, "humaneval/pass@1": 0.0},
    },
    "loram_noalign": {"arm": "loram_noalign", "kind": "variant", "ppl": {"in_domain": 4.5}},
    "no_recovery": {"arm": "no_recovery", "kind": "no_recovery", "ppl": {"in_domain": 9.0}},
    "zeta": {"arm": "zeta", "kind": "something_else"},
    "alpha": {"kind": "weird"},  # no "arm": the file stem is used
}


def write_arms(d: Path, arms: dict[str, dict] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in (arms or ARMS).items():
        (d / f"{name}.json").write_text(json.dumps(obj))
    return d


def write_losses(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for arm, scale in (("loram", 1.0), ("lora_full", 0.9)):
        lines = ["arm,step,loss,val_loss,lr"]
        for step in range(1, 11):
            val = f"{scale * 2.5 / step:.3f}" if step % 5 == 0 else ""
            lines.append(f"{arm},{step},{scale * 3.0 / step:.4f},{val},1e-4")
        (d / f"{arm}.csv").write_text("\n".join(lines) + "\n")
    return d


def by_arm(arms: list[dict]) -> dict[str, dict]:
    return {a["arm"]: a for a in arms}


def table_rows(md: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by arm (first cell), cells stripped."""
    block = md.split(report.TABLE_START)[1].split(report.TABLE_END)[0].strip().splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    rows = {"__header__": header}
    for line in block[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def cell(rows: dict[str, list[str]], arm: str, label: str) -> str:
    return rows[arm][rows["__header__"].index(label)]


# ---------------------------------------------------------------------------------------------


def test_collect_order_and_errors(tmp_path: Path) -> None:
    arms = report.collect_arms(write_arms(tmp_path / "m"))
    assert [a["arm"] for a in arms] == [
        "original",
        "lora_full",
        "lora_small",
        "loram",
        "loram_noalign",
        "no_recovery",
        "alpha",
        "zeta",
    ]
    with pytest.raises(FileNotFoundError, match="no arm metrics"):
        report.collect_arms((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        report.collect_arms(tmp_path / "missing")
    bad = write_arms(tmp_path / "bad", {"loram": ARMS["loram"]})
    (bad / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        report.collect_arms(bad)


def test_table_columns_and_formatting(tmp_path: Path) -> None:
    arms = report.collect_arms(write_arms(tmp_path / "m"))
    df = report.results_table(arms)
    assert len(df) == len(ARMS)
    assert list(df.columns) == [
        "arm",
        "description",
        "params_held",
        "reduction",
        "peak_rss_mib",
        "train_seconds",
        "gsm8k/exact_match_strict",
        "csr",
        "arc_easy/acc",
        "humaneval/pass@1",
        "ppl/in_domain",
        "ppl/ood_gsm8k",
        "ppl/general_text",
    ]
    # reduction derived from params when absent
    assert df.set_index("arm").at["lora_full", "reduction"] == pytest.approx(1.0)

    rows = table_rows(report.render_markdown(arms, {}))
    assert rows["__header__"][:6] == [
        "arm",
        "description",
        "params held in training",
        "reduction ×",
        "peak memory of the training stage (MiB)",
        "training time (s)",
    ]
    assert len(rows) - 1 == len(ARMS)
    assert cell(rows, "loram", "params held in training") == "86,006,592"
    assert cell(rows, "loram", "reduction ×") == "1.56×"
    assert cell(rows, "loram", "peak memory of the training stage (MiB)") == "3,700.2"
    assert cell(rows, "loram", "training time (s)") == "512.3"
    assert cell(rows, "loram", "description") == "structured 0.65, aligned"  # built from fields
    assert cell(rows, "original", "description") == "SmolLM2 base, no training"
    assert cell(rows, "original", "GSM8K strict") == "8.0%"
    assert cell(rows, "original", "in_domain ppl") == "4.33"
    assert cell(rows, "original", "params held in training") == "–"
    assert cell(rows, "zeta", "CSR mean") == "–"

    # change an input -> the output changes
    changed = json.loads(json.dumps(ARMS))
    changed["loram"]["params_held"] = 12345678
    changed["loram"]["ppl"]["general_text"] = 31.456
    rows2 = table_rows(
        report.render_markdown(report.collect_arms(write_arms(tmp_path / "m2", changed)), {})
    )
    assert cell(rows2, "loram", "params held in training") == "12,345,678"
    assert cell(rows2, "loram", "general_text ppl") == "31.46"


def test_bolding_best_trained_value(tmp_path: Path) -> None:
    arms = report.collect_arms(write_arms(tmp_path / "m"))
    best = report.best_arms(arms)
    assert best["ppl/in_domain"] == {"lora_full"}  # lowest among trained (original excluded)
    assert best["ppl/general_text"] == {"lora_full"}  # 29.0 < 30.1 (original's 28.0 not counted)
    assert best["gsm8k/exact_match_strict"] == {"lora_full"}  # highest
    assert best["humaneval/pass@1"] == {"loram"}
    rows = table_rows(report.render_markdown(arms, {}))
    assert cell(rows, "lora_full", "in_domain ppl") == "**3.80**"
    assert cell(rows, "original", "general_text ppl") == "28.00"  # original is never bolded
    assert cell(rows, "loram", "in_domain ppl") == "3.91"
    assert cell(rows, "lora_full", "GSM8K strict") == "**12.0%**"

    # flip the ranking: now LoRAM wins the perplexity column
    changed = json.loads(json.dumps(ARMS))
    changed["loram"]["ppl"]["in_domain"] = 3.5
    arms2 = report.collect_arms(write_arms(tmp_path / "m2", changed))
    assert report.best_arms(arms2)["ppl/in_domain"] == {"loram"}


def write_details(mdir: Path, arm: str, records: list[dict], provenance: dict | None = None):
    folder = mdir.parent / "details" / arm
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "provenance.json").write_text(json.dumps(provenance or {}))


def scores(task: str, key: str, values: list[float]) -> list[dict]:
    return [
        {"task": task, "doc_id": i, "filter": "none", "scores": {key: v}}
        for i, v in enumerate(values)
    ]


def ppl_rows(name: str, nll: list[float], tokens: int = 10) -> list[dict]:
    return [
        {"task": f"ppl/{name}", "doc_id": i, "nll": x, "tokens": tokens} for i, x in enumerate(nll)
    ]


def test_verdict_sentences(tmp_path: Path) -> None:
    mdir = write_arms(tmp_path / "m")
    # GSM8K: 5 / 50 vs 4 / 50 with 1 discordant pair: McNemar p = 1 -> no verdict
    gsm_me = [1.0] * 5 + [0.0] * 45
    gsm_orig = [1.0] * 4 + [0.0] * 46
    # CSR (arc_easy): 30 documents only LoRAM gets right, none the reverse: p ~ 2e-9
    arc_me, arc_orig = [1.0] * 60 + [0.0] * 40, [1.0] * 30 + [0.0] * 70
    # perplexity: LoRAM lower on every in-domain document, higher on every general one
    nll_orig = [10.0 + 0.1 * i for i in range(30)]
    write_details(
        mdir,
        "loram",
        scores("gsm8k", "exact_match_strict", gsm_me)
        + scores("arc_easy", "acc", arc_me)
        + ppl_rows("in_domain", [x - 1.0 for x in nll_orig])
        + ppl_rows("general_text", [x + 1.0 for x in nll_orig]),
    )
    write_details(
        mdir,
        "original",
        scores("gsm8k", "exact_match_strict", gsm_orig)
        + scores("arc_easy", "acc", arc_orig)
        + ppl_rows("in_domain", nll_orig)
        + ppl_rows("general_text", nll_orig),
    )
    arms = report.collect_arms(mdir)
    sentences = {s.split(":")[0]: s for s in report.verdict_sentences(arms)}
    assert set(sentences) == {
        "loram vs original",
        "loram vs lora_full",
        "loram vs lora_small",
        "loram vs no_recovery",
    }
    vs_orig = sentences["loram vs original"]
    assert re.search(
        r"in_domain ppl 3\.91 vs 4\.33 \(better, p = [0-9.e-]+, paired bootstrap\)", vs_orig
    )
    assert re.search(r"general_text ppl 30\.10 vs 28\.00 \(worse, p = ", vs_orig)
    assert "GSM8K strict 10.0% vs 8.0% (no detectable difference (n = 50))" in vs_orig
    assert re.search(
        r"CSR mean 43\.0% vs 40\.0% \(better, p = [0-9.e-]+, paired bootstrap\)", vs_orig
    )
    assert "ood_gsm8k ppl 4.20 vs 5.00 (no per-document results: no verdict)" in vs_orig
    assert "better on 2, worse on 1, no verdict on 2 of 5" in vs_orig
    vs_full = sentences["loram vs lora_full"]  # no per-document results for lora_full
    assert "(better" not in vs_full and "(worse" not in vs_full
    assert "GSM8K strict 10.0% vs 12.0% (no per-document results: no verdict)" in vs_full
    md = report.render_markdown(arms, {"command": "loram report", "limits": {"ppl_max_rows": 5}})
    assert "- loram vs original: GSM8K strict 10.0% vs 8.0% (no detectable difference" in md
    assert "- command: loram report" in md
    assert "- limits: ppl_max_rows=5" in md


def test_small_samples_never_get_a_verdict(tmp_path: Path) -> None:
    """The issue's case: WinoGrande 70% vs 50% on 10 documents is not a difference."""
    arms = {
        "original": {
            "arm": "original",
            "kind": "original",
            "bench": {"winogrande/acc": 0.5, "winogrande/acc_stderr": 0.167},
        },
        "loram": {
            "arm": "loram",
            "kind": "loram",
            "bench": {"winogrande/acc": 0.7, "winogrande/acc_stderr": 0.153},
        },
    }
    mdir = write_arms(tmp_path / "m", arms)
    write_details(mdir, "loram", scores("winogrande", "acc", [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]))
    write_details(mdir, "original", scores("winogrande", "acc", [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]))
    (sentence,) = report.verdict_sentences(report.collect_arms(mdir))
    assert "WinoGrande 70.0% vs 50.0% (no detectable difference (n = 10))" in sentence


def test_table_shows_error_bars(tmp_path: Path) -> None:
    arms = {
        "original": {
            "arm": "original",
            "kind": "original",
            "ppl": {"in_domain": 4.33},
            "ppl_ci95": {"in_domain": {"low": 4.1, "high": 4.6}},
            "bench": {
                "csr": 0.4,
                "csr_stderr": 0.029,
                "csr_ci95_low": 0.34,
                "csr_ci95_high": 0.46,
                "humaneval/pass@1": 0.0,
                "humaneval/pass@1_stderr": 0.0,
                "humaneval/pass@1_ci95_low": 0.0,
                "humaneval/pass@1_ci95_high": 0.5615,
            },
        },
    }
    mdir = write_arms(tmp_path / "m", arms)
    write_details(
        mdir,
        "original",
        [],
        {
            "arm": "original",
            "bench": {
                "seeds": {"fewshot": 1234},
                "sandbox": {"isolation": "userns", "policy": "strict"},
                "tasks": {
                    "piqa": {
                        "n_docs": 50,
                        "n_docs_total": 1838,
                        "num_fewshot": 1,
                        "split_note": "few-shot examples from validation (stock: train)",
                    }
                },
            },
        },
    )
    loaded = report.collect_arms(mdir)
    md = report.render_markdown(loaded)
    rows = table_rows(md)
    assert cell(rows, "original", "CSR mean") == "40.0% ± 2.9"
    assert cell(rows, "original", "HumanEval pass@1") == "0.0% [0.0–56.1]"  # Wilson at 0/3
    assert cell(rows, "original", "in_domain ppl") == "4.33 [4.10–4.60]"
    assert "piqa: 50 of 1838 documents, 1-shot, few-shot examples from validation" in md
    assert "sandbox mode userns (eval.sandbox: strict) for: original" in md
    assert "seeds: fewshot 1234" in md
    rec = report.results_records(report.results_table(loaded), loaded)["arms"]["original"]
    assert rec["csr_stderr"] == 0.029 and rec["ppl/in_domain_ci95_high"] == 4.6
    assert "description" not in rec
    assert all(v is None or isinstance(v, (int, float)) for v in rec.values())


def test_plots_and_write_report(tmp_path: Path) -> None:
    mdir = write_arms(tmp_path / "metrics" / "arms")
    ldir = write_losses(tmp_path / "plots" / "loss")
    out = tmp_path / "reports"
    paths = report.write_report(mdir, ldir, out, meta={"date": "today"})
    assert set(paths) == {"loss", "benchmarks", "perplexity", "markdown", "json"}
    for key in ("loss", "benchmarks", "perplexity"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, key
    md = paths["markdown"].read_text()
    for name in ("loss.png", "benchmarks.png", "perplexity.png"):
        assert f"]({name})" in md
    rec = json.loads(paths["json"].read_text())
    assert rec["arms"]["loram"]["ppl/in_domain"] == 3.91
    assert rec["arms"]["original"]["params_held"] is None
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    table = report.readme_table(paths["markdown"])
    assert table.startswith("| arm |") and table.count("\n") == len(ARMS) + 1
    # no loss CSVs: the loss plot is skipped, the rest still written
    assert report.plot_losses(tmp_path / "nowhere", tmp_path / "x.png") is None


DVC_EXP_SHOW = [  # shape observed from `dvc exp show --json` (DVC 3.67)
    {
        "rev": "workspace",
        "name": None,
        "data": {
            "rev": "workspace",
            "timestamp": None,
            "params": {"params.yaml": {"data": {"prune": {"method": "random", "ratio": 0.3}}}},
            "metrics": {
                "metrics/arms/loram.json": {
                    "data": {
                        "arm": "loram",
                        "kind": "loram",
                        "ppl": {"in_domain": 3.3},
                        "bench": {"csr": 0.47, "metadata": {}},
                    }
                }
            },
            "deps": {"stage.py": {"hash": "3b57", "size": 301, "nfiles": None}},
            "outs": {},
            "meta": {},
        },
        "error": None,
        "experiments": None,
    },
    {
        "rev": "f50652b91c5cc3fa684a49fd5e38907adb3da43d",
        "name": "master",
        "data": {
            "rev": "f50652b91c5cc3fa684a49fd5e38907adb3da43d",
            "timestamp": "2026-11-28T18:29:41",
            "params": {
                "params.yaml": {
                    "data": {
                        "prune": {"method": "structured", "ratio": 0.65},
                        "align": {"enabled": True},
                    }
                }
            },
            "metrics": {
                "metrics/arms/original.json": {"data": {"arm": "original", "ppl": {"x": 1}}},
                "metrics/arms/loram.json": {
                    "data": {"arm": "loram", "ppl": {"in_domain": 3.65}, "bench": {"csr": 0.435}}
                },
            },
            "deps": {},
            "outs": {},
            "meta": {},
        },
        "error": None,
        "experiments": [
            {
                "revs": [
                    {
                        "rev": "43939f8090a660bf2bb1d9a64345d58bea0f1a20",
                        "name": "aulic-bean",
                        "data": {
                            "rev": "43939f8090a660bf2bb1d9a64345d58bea0f1a20",
                            "timestamp": "2026-11-28T18:29:45",
                            "params": {
                                "params.yaml": {
                                    "data": {"prune": {"method": "random", "ratio": 0.3}}
                                }
                            },
                            "metrics": {
                                "metrics/arms/loram.json": {
                                    "data": {
                                        "arm": "loram",
                                        "kind": "loram",
                                        "ppl": {"in_domain": 3.3},
                                        "bench": {"csr": 0.47, "metadata": {}},
                                    }
                                }
                            },
                            "deps": {"stage.py": {"hash": "3b57", "size": 301, "nfiles": None}},
                            "outs": {},
                            "meta": {},
                        },
                        "error": None,
                        "experiments": None,
                    }
                ],
                "executor": None,
                "name": "aulic-bean",
            },
            {
                "revs": [
                    {
                        "rev": "44d6164bf2fcb045035bc646d04a219b299af8b0",
                        "name": "crude-debs",
                        "data": {
                            "rev": "44d6164bf2fcb045035bc646d04a219b299af8b0",
                            "timestamp": "2026-11-28T18:29:43",
                            "params": {
                                "params.yaml": {
                                    "data": {"prune": {"method": "structured", "ratio": 0.5}}
                                }
                            },
                            "metrics": {
                                "metrics/arms/loram.json": {
                                    "data": {
                                        "arm": "loram",
                                        "ppl": {"in_domain": 3.5},
                                        "bench": {"csr": 0.45},
                                    }
                                }
                            },
                        },
                        "error": None,
                        "experiments": None,
                    }
                ],
                "executor": None,
                "name": "crude-debs",
            },
            {  # a failed experiment: no metrics, must be skipped
                "revs": [
                    {
                        "rev": "0" * 40,
                        "name": "failed-one",
                        "data": {"rev": "0" * 40, "params": {}, "metrics": {}},
                        "error": {"type": "ReproductionError", "msg": "boom"},
                        "experiments": None,
                    }
                ],
                "executor": None,
                "name": "failed-one",
            },
        ],
    },
]


def test_sweep_parser_table_and_plot(tmp_path: Path) -> None:
    rows = report.sweep_rows_from_dvc_exp_json(json.loads(json.dumps(DVC_EXP_SHOW)))
    got = [(r["method"], r["ratio"], r["name"], r["ppl"]["in_domain"]) for r in rows]
    assert got == [
        ("random", 0.3, "aulic-bean", 3.3),  # the identical workspace row is dropped
        ("structured", 0.5, "crude-debs", 3.5),
        ("structured", 0.65, "master", 3.65),
    ]
    assert rows[2]["aligned"] is True and rows[0]["aligned"] is None
    assert "metadata" not in rows[0]["bench"]
    table = report.render_sweep_table(rows)
    assert "| structured | 0.5 | – | crude-debs | 3.50 | 45.0% |" in table
    png = report.plot_sweep(rows, tmp_path / "sweep.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC
    assert report.plot_sweep(rows[:1], tmp_path / "one.png") is None
    assert not (tmp_path / "one.png").exists()


def test_cli_report(tmp_path: Path) -> None:
    mdir = write_arms(tmp_path / "m")
    ldir = write_losses(tmp_path / "l")
    sweep = tmp_path / "exp.json"
    sweep.write_text(json.dumps(DVC_EXP_SHOW))
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "report",
            "--metrics-dir",
            str(mdir),
            "--loss-dir",
            str(ldir),
            "--out",
            str(tmp_path / "r"),
        ]
        + ["--sweep-json", str(sweep), "--params", str(tmp_path / "none.yaml")]
    )
    assert args.func(args) == 0
    md = (tmp_path / "r" / "results.md").read_text()
    assert "## Pruning-ratio sweep" in md and "](sweep.png)" in md
    assert "- command: loram report --metrics-dir" in md
    assert (tmp_path / "r" / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_optional_cost_columns_appear_only_when_reported() -> None:
    arms = [
        {"arm": "original", "kind": "original", "ppl": {"in_domain": 4.0}},
        {
            "arm": "semi",
            "kind": "variant",
            "params_held": 100,
            "base_param_bytes": 3 * 2**20,
            "sparsity": 0.5,
            "ppl": {"in_domain": 5.0},
        },
    ]
    df = report.results_table(arms).set_index("arm")
    assert df.at["semi", "base_weight_mib"] == pytest.approx(3.0)
    assert report.format_value("sparsity", df.at["semi", "sparsity"]) == "50.0%"
    plain = report.results_table([arms[0]])
    assert "sparsity" not in plain.columns and "base_weight_mib" not in plain.columns


def test_sweep_parser_skips_training_metrics_of_the_same_arm() -> None:
    rec = {
        "rev": "abc",
        "name": "exp-1",
        "data": {
            "params": {"params.yaml": {"data": {"prune": {"ratio": 0.5, "method": "structured"}}}},
            "metrics": {
                "metrics/train/loram.json": {"data": {"arm": "loram", "train_seconds": 3.0}},
                "metrics/arms/loram.json": {"data": {"arm": "loram", "ppl": {"in_domain": 4.5}}},
            },
        },
    }
    rows = report.sweep_rows_from_dvc_exp_json(
        [{"rev": "r", "data": rec["data"], "experiments": [{"revs": [rec]}]}]
    )
    assert rows and all(r["ppl"] == {"in_domain": 4.5} for r in rows)


def test_report_keeps_only_the_arms_of_the_params(tmp_path: Path) -> None:
    """A profile's run leaves the default run's committed metrics of other arms in
    metrics/arms: the report shows the arms its params.yaml runs, and says what it left out."""
    import yaml

    m = write_arms(tmp_path / "m")
    stale = dict(next(iter(ARMS.values())), arm="stale_arm")
    (m / "stale_arm.json").write_text(json.dumps(stale))
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    only = report.pipeline_arms(params)
    assert "stale_arm" not in only and {"original", "lora_full", "loram"} <= only
    assert report.pipeline_arms(tmp_path / "absent.yaml") is None
    kept = {a["arm"] for a in report.collect_arms(m, only)}
    assert "stale_arm" in {a["arm"] for a in report.collect_arms(m)}
    assert kept == {a["arm"] for a in report.collect_arms(m)} & only and "loram" in kept
    paths = report.write_report(m, write_losses(tmp_path / "l"), tmp_path / "out", only=only)
    assert "stale_arm" not in paths["markdown"].read_text()
    with pytest.raises(FileNotFoundError, match="no metrics"):
        report.collect_arms(m, {"nothing"})
