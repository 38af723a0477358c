"""The training-cost benchmark: its accounting on tiny models in-process, and the command end to
end on the tiny pretrained model (every arm in its own process)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from loram.config import TrainParams
from loram.data import collate
from loram.tiny import tiny_llama
from loram.train import lora_config, setup_training

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cost", ROOT / "benchmarks" / "train_cost.py")
train_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cost)


def _lora(vocab: int, **opts):
    m = tiny_llama(vocab=vocab)
    for p in m.parameters():
        p.requires_grad_(False)
    p = TrainParams(r=4, alpha=8, **opts)
    pm = get_peft_model(m, lora_config(p))
    setup_training(pm, p)
    pm.train()
    return pm, p


def _batch(vocab: int, rows: int = 2, length: int = 24):
    g = torch.Generator().manual_seed(0)
    ex = []
    for _ in range(rows):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        ex.append({"input_ids": ids, "labels": ids})
    return collate(ex, 0)


def test_saved_activations_shrink_with_each_option():
    """The accounting sees what each option removes: the stock loss saves the full logits
    (at least tokens x vocab fp32), the chunked loss none; checkpointed layers save less."""
    vocab = 1024
    batch = _batch(vocab)
    n_scored = int((batch["labels"][:, 1:] != -100).sum())
    sizes = {}
    for chunk, ckpt in ((0, False), (8, False), (8, True)):
        model, p = _lora(vocab, loss_chunk=chunk, grad_checkpointing=ckpt)
        sizes[chunk, ckpt] = train_cost._saved_activation_bytes(model, batch, "cpu", chunk)
        assert all(q.grad is None for q in model.parameters())  # nothing left behind
    acts0, logits0 = sizes[0, False]
    assert logits0 >= n_scored * vocab * 4
    assert sizes[8, False][1] == 0 and sizes[8, True][1] == 0
    # the chunked loss keeps the labelled hidden states (tokens x hidden) instead of the logits
    assert sum(sizes[8, False]) < acts0 + logits0
    assert sizes[8, True][0] < sizes[8, False][0]


def test_step_flops_counts_each_pass():
    """The FLOP bound: frozen projections forward + input gradient (+ a recomputation with
    checkpointing); lm_head over the labelled rows twice fused, three times when each chunk is
    recomputed, twice over every position with the stock loss."""
    from torch import nn

    model = tiny_llama()
    cfg = model.config
    proj = sum(
        m.in_features * m.out_features
        for layer in model.model.layers
        for m in layer.modules()
        if isinstance(m, nn.Linear)
    )
    head = cfg.hidden_size * cfg.vocab_size

    def flops(**kw):
        return train_cost.step_flops(model, 2, 32, 50, TrainParams(**kw))

    fused = flops(loss_chunk=16)
    assert fused["projections"] == 2 * 64 * proj * 2 and fused["lora"] == 0
    assert fused["lm_head"] == 2 * 50 * head * 2
    assert flops(loss_chunk=16, loss_fused=False)["lm_head"] == 2 * 50 * head * 3
    assert flops(loss_chunk=0)["lm_head"] == 2 * 64 * head * 2
    ckpt = flops(loss_chunk=16, grad_checkpointing=True)
    assert ckpt["projections"] == 2 * 64 * proj * 3
    assert fused["total"] == sum(v for k, v in fused.items() if k != "total")


def test_analytic_floor_counts_weights_state_and_one_chunk():
    cfg = tiny_llama().config
    p = TrainParams(loss_chunk=16, grad_checkpointing=True)
    ana = train_cost._analytic(cfg, p, n_tokens=64, micro=2, act_bytes=4, trainable=1000)
    assert ana["trainable_state"] == 16_000
    assert ana["layer_inputs"] == cfg.num_hidden_layers * 64 * cfg.hidden_size * 4
    assert ana["loss_transient"] == 3 * 16 * cfg.vocab_size * 4
    stock = train_cost._analytic(
        cfg, TrainParams(loss_chunk=0, grad_checkpointing=False), 64, 2, 4, 1000
    )
    assert stock["loss_transient"] == 3 * 64 * cfg.vocab_size * 4 and stock["layer_inputs"] == 0


def test_kernel_seconds_split_the_profiled_step():
    """The profiled forward + backward is split into matrix products, attention and the rest;
    with LoRA dropout off and the eager attention, the tiny model's step still has all three."""
    vocab = 256
    model, p = _lora(vocab, loss_chunk=8, dropout=0.0)
    ks = train_cost._kernel_seconds(model, _batch(vocab), "cpu", p)
    assert set(ks) == {"matmul", "attention", "other", "total", "wall"}
    assert ks["wall"] >= ks["total"] - 0.002  # ops never add up to more than the step
    assert ks["matmul"] > 0 and ks["attention"] > 0 and ks["other"] > 0
    assert abs(ks["total"] - (ks["matmul"] + ks["attention"] + ks["other"])) <= 0.0015
    assert all(q.grad is None for q in model.parameters())  # nothing left behind


def test_kernel_bound_is_the_ratio_of_matmul_and_attention_time():
    def row(label, mm, attn, other):
        return {"label": label, "arm": label, "peak_mib": 1.0, "samples_per_second": 1.0,
                "floor_mib": 1.0, "kernel_seconds": {"matmul": mm, "attention": attn,
                                                     "other": other, "total": mm + attn + other}}  # fmt: skip

    rows = [row("lora_full", 12.0, 3.0, 5.0), row("loram_stru", 8.0, 2.0, 4.0)]
    train_cost._ratios(rows)
    assert rows[1]["kernel_bound_vs_lora_full"] == 1.5  # (12 + 3) / (8 + 2); "other" is not in it
    assert rows[0]["kernel_bound_vs_lora_full"] == 1.0
    speed = [t for t in train_cost._targets(rows) if t["target"].startswith("throughput")]
    assert speed and speed[0]["kernel_bound"] == 1.5
    assert "x mm+attn" in train_cost._table(
        [{**r, "params_held": 1, "param_bytes": 1, "seconds_per_step": 1.0, "peak_vs_floor": 1.0,
          "breakdown_mib": dict.fromkeys(("weights", "trainable_state", "activations",
                                          "logits_loss", "runtime"), 0.0)} for r in rows]
    )  # fmt: skip


def test_repeated_runs_keep_the_median_run_and_every_runs_figures():
    def run(sec, peak, split=None):
        return {"seconds_per_step": sec, "peak_mib": peak, "kernel_seconds": split}

    row = train_cost._merge_runs(
        [run(20.0, 10.0, {"matmul": 1.0}), run(18.0, 11.0), run(25.0, 12.0)]
    )
    assert row["seconds_per_step"] == 20.0 and row["peak_mib"] == 10.0  # the median run's
    assert row["seconds_per_step_runs"] == [20.0, 18.0, 25.0] and row["runs"] == 3
    assert row["peak_mib_runs"] == [10.0, 11.0, 12.0]
    assert row["kernel_seconds"] == {"matmul": 1.0}  # profiled in the first run only
    two = train_cost._merge_runs([run(20.0, 10.0), run(18.0, 11.0)])
    assert two["seconds_per_step"] == 18.0  # the lower median of an even count
    one = train_cost._merge_runs([run(20.0, 10.0)])
    assert "runs" not in one and one["seconds_per_step"] == 20.0


# A stand-in arm process for the lockstep coordinator: it follows the child's side of the
# protocol (train_cost.Gate) with a few busy "steps" and prints the spans of its turns.
_FAKE_ARM = """
import json, sys, time
sys.path.insert(0, {bench!r})
from train_cost import Gate
steps, fail_at = int(sys.argv[1]), int(sys.argv[2])
gate = Gate(*map(int, sys.argv[sys.argv.index("--gate") + 1].split(",")))
gate.wait()
gate.done()
spans = []
for step in range(1, steps + 1):
    gate.wait()
    if step == fail_at:
        sys.exit(3)
    t = time.monotonic()
    while time.monotonic() - t < 0.02:
        pass
    spans.append([t, time.monotonic()])
    gate.done()
gate.wait()
print("RESULT " + json.dumps({{"spans": spans}}))
"""


def _fake_arm(steps: int, fail_at: int = 0) -> list[str]:
    code = _FAKE_ARM.format(bench=str(ROOT / "benchmarks"))
    return [sys.executable, "-c", code, str(steps), str(fail_at)]


def test_lockstep_runs_one_arm_at_a_time_and_interleaves_their_steps():
    res = train_cost.run_lockstep({a: _fake_arm(4) for a in ("a", "b", "c")}, 4, {})
    assert set(res) == {"a", "b", "c"} and all(len(r["spans"]) == 4 for r in res.values())
    turns = sorted((b, e, arm) for arm, r in res.items() for b, e in r["spans"])
    # never two arms computing at once
    assert all(e <= nb for (_, e, _), (nb, _, _) in zip(turns, turns[1:]))
    # step k of every arm runs before step k + 1 of any arm, the first arm rotating each turn
    order = [arm for _, _, arm in turns]
    assert order == ["b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]


def test_lockstep_names_the_arm_that_failed_and_stops_the_others():
    with pytest.raises(SystemExit, match="arm b failed"):
        train_cost.run_lockstep({"a": _fake_arm(3), "b": _fake_arm(3, fail_at=2)}, 3, {})


def test_ratios_and_targets():
    def row(label, peak, sps):
        return {"label": label, "arm": label.split("@")[0], "peak_mib": peak,
                "samples_per_second": sps, "floor_mib": peak / 4}  # fmt: skip

    rows = [row("lora_full", 100.0, 1.0), row("loram_stru", 50.0, 1.6),
            row("lora_full@stock", 200.0, 1.0), row("loram_stru@stock", 150.0, 1.3)]  # fmt: skip
    train_cost._ratios(rows)
    by = {r["label"]: r for r in rows}
    assert by["loram_stru"]["memory_vs_lora_full"] == 0.5
    assert by["loram_stru@stock"]["memory_vs_lora_full"] == 0.75
    assert by["loram_stru"]["memory_vs_stock"] == round(50 / 150, 4)
    assert "memory_vs_stock" not in by["lora_full@stock"]
    t = {
        x["target"].split(":")[0] + x["target"][-30:]: x["holds"] for x in train_cost._targets(rows)
    }
    assert sum(t.values()) == 4 and len(t) == 4  # ratio, throughput, two absolute: all hold
    by["loram_stru"]["memory_vs_lora_full"] = 0.6
    assert not all(x["holds"] for x in train_cost._targets(rows))


def _run(tmp_path, *args):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_cost.py"), "--model", "tiny-llama",
         "--steps", "3", "--repeat", "1", "--seq-len", "64", "--work", str(tmp_path / "work"), "--out", str(out),
         *args],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_train_cost_benchmark_on_tiny_model(tmp_path):
    res, stdout = _run(tmp_path, "--arms", "lora_full,loram_stru", "--loss-chunk", "32")
    arms = res["arms"]
    assert set(arms) == {"lora_full", "loram_stru"}
    full, stru = arms["lora_full"], arms["loram_stru"]
    assert stru["params_held"] < full["params_held"]  # pruning at 0.65 holds fewer
    assert full["memory_vs_lora_full"] == 1.0 and full["speed_vs_lora_full"] == 1.0
    for r in arms.values():
        assert r["peak_mib"] > 0 and r["seconds_per_step"] > 0 and r["seq_len"] == 64
        assert r["loss_chunk"] == 32 and r["grad_checkpointing"] is False  # the params default
        assert r["attn_implementation"] == "sdpa"
        b = r["breakdown_mib"]
        assert b["logits_loss"] == 0.0  # chunked: no saved full logits
        assert b["weights"] == round(r["param_bytes"] / 2**20, 1)
        assert r["floor_mib"] > b["weights"]
        assert r["kernel_seconds"]["matmul"] > 0  # --kernels is on by default
        assert r["block_cache"] is True and r["block_cache_stats"] is not None  # CPU default
        assert r["lockstep"] is True and len(r["step_seconds"]) == 3  # CPU default
    # lockstep: the two arms' steps never overlap in time
    spans = sorted(tuple(s) for r in arms.values() for s in r["step_spans"])
    assert all(e <= nb for (_, e), (nb, _) in zip(spans, spans[1:]))
    assert stru["kernel_bound_vs_lora_full"] > 0
    assert res["options"]["loss_chunk"] == 32 and res["targets"]
    assert "lora_full" in stdout and "x mem" in stdout and "breakdown" in stdout


@pytest.mark.slow
def test_train_cost_benchmark_compares_with_stock_settings(tmp_path):
    res, stdout = _run(
        tmp_path, "--arms", "lora_full,loram_stru,qloram_stru", "--compare-stock",
        "--no-grad-checkpointing", "--attn-implementation", "eager",
    )  # fmt: skip
    arms = res["arms"]
    assert set(arms) == {a + s for a in ("lora_full", "loram_stru", "qloram_stru")
                         for s in ("", "@stock")}  # fmt: skip
    q, stru = arms["qloram_stru"], arms["loram_stru"]
    assert q["params_held"] == stru["params_held"] and q["param_bytes"] < stru["param_bytes"]
    assert arms["lora_full"]["attn_implementation"] == "eager"
    assert arms["lora_full@stock"]["loss_chunk"] == 0
    # glibc's heap keeps freed memory: stock arms run one after another, the others in lockstep
    assert arms["lora_full@stock"]["lockstep"] is False and arms["lora_full"]["lockstep"] is True
    assert arms["lora_full@stock"]["breakdown_mib"]["logits_loss"] > 0
    for a in ("lora_full", "loram_stru", "qloram_stru"):
        assert "memory_vs_stock" in arms[a]
    assert any(t["target"].startswith("absolute") for t in res["targets"])
    assert "HOLDS" in stdout or "MISSES" in stdout


def test_analytic_floors_from_a_config_alone():
    """--analytic: meta models only; pruned arms hold what loram memory counts, NF4 fewer
    bytes for the same parameters, floors ordered as the weights."""
    from loram.memory import memory_report

    cfg = tiny_llama(layers=8).config
    p = TrainParams(loss_chunk=16)
    res = train_cost.analytic_arms(cfg, 0.65, 2, 32, 4, p)
    full, stru, q = res["lora_full"], res["loram_stru"], res["qloram_stru"]
    assert full["params_held"] == memory_report(cfg, "none", precision="fp32").held_params
    assert stru["params_held"] == memory_report(cfg, "structured", 0.65, "fp32").held_params
    assert q["params_held"] == stru["params_held"] and q["param_bytes"] < stru["param_bytes"]
    assert full["param_bytes"] == 4 * full["params_held"]
    assert q["floor_mib"] < stru["floor_mib"] < full["floor_mib"]
    assert full["floor_vs_lora_full"] == 1.0
    assert stru["lora_params"] < full["lora_params"]


def test_pruned_arms_train_a_directory_named_after_their_rounding():
    assert train_cost._source("lora_full", 8) == "base"
    assert train_cost._source("loram_stru", 1) == "stru"
    assert train_cost._source("qloram_stru", 8) == "stru-round8"
    assert train_cost._source("loram_rand", 64) == "rand-round64"


def test_mlp_shapes_times_the_exact_and_the_rounded_channel_counts():
    """tiny Llama: 96 channels, 0.65 keeps 33 exactly, 32 rounded to 8 (and to 16)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mlp_shapes.py"), "--model", "tiny-llama",
         "--round-to", "8", "16", "--tokens", "32", "--repeat", "3"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {ln.split(" (")[0]: ln for ln in proc.stdout.splitlines() if " (" in ln}
    assert {"unpruned", "exact", "round_to 8", "round_to 16"} <= set(rows)
    assert "(96)" in rows["unpruned"] and "(33)" in rows["exact"] and "(32)" in rows["round_to 8"]
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mlp_shapes.py"), "--model", "tiny-llama",
         "--round-to", "0"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "round_to = 0 is not allowed" in bad.stderr


def _stage_cost():
    spec = importlib.util.spec_from_file_location(
        "stage_cost", ROOT / "benchmarks" / "stage_cost.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_cost_table_scales_every_cost_per_100m_parameters():
    sc = _stage_cost()
    rows = [
        {"model": "a", "params": 50_000_000, "merge_seconds": 2.0, "gen_tokens_per_second": 10.0},
        {"model": "/x/b", "params": 200_000_000, "merge_seconds": 8.0,
         "gen_tokens_per_second": 2.5},
    ]  # fmt: skip
    text = sc.table(rows)
    per = text.split("\n\n")[1].splitlines()  # the second table
    a_line = next(ln for ln in per if ln.startswith("a "))
    b_line = next(ln for ln in per if ln.startswith("b "))
    # merge: 2 s per 50M = 4 s per 100M; 8 s per 200M = 4 s per 100M (proportional)
    assert "4.0000" in a_line and "4.0000" in b_line
    # generation: 1/10 s per token per 50M = 0.2 per 100M; 1/2.5 per 200M = 0.2 per 100M
    assert a_line.split().count("0.2000") == 1 and b_line.split().count("0.2000") == 1
    assert a_line.count("-") >= len(sc.COLUMNS) - 2  # missing figures print as '-'


def test_stage_cost_table_subtracts_the_process_startup_from_whole_stages_only():
    sc = _stage_cost()
    rows = [{"model": "a", "params": 50_000_000, "merge_seconds": 3.0,
             "align_seconds_per_step": 3.0}]  # fmt: skip
    line = next(ln for ln in sc.table(rows, startup=1.0).split("\n\n")[1].splitlines()
                if ln.startswith("a "))  # fmt: skip
    # merge: (3 - 1) s per 50M = 4 per 100M; align s/step is inside a loop: 3 per 50M = 6
    assert "4.0000" in line and "6.0000" in line


def test_optimizer_step_times_every_adamw_implementation():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "optimizer_step.py"), "--model", "tiny-llama",
         "--repeat", "2", "--lora-r", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"fused", "foreach", "for_loop"}
    assert rows["fused"][3] == "1.00" and all(float(r[1]) > 0 for r in rows.values())
    # LoRA r 4 on the pruned tiny model: A (4 x in) and B (out x 4) for each of its projections
    spec = importlib.util.spec_from_file_location(
        "opt_step", ROOT / "benchmarks" / "optimizer_step.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = tiny_llama().config
    shp = mod.shapes(cfg, 0.65, 4, 8)
    assert len(shp) == 2 * 7 * cfg.num_hidden_layers
    assert f"{sum(a * b for a, b in shp):,} parameters" in proc.stdout
    # --ratio 0 and no LoRA: every parameter of the original model, once (tied ones too)
    full = mod.shapes(cfg, 0.0, 0, 8)
    assert sum(math.prod(s) for s in full) == sum(p.numel() for p in tiny_llama().parameters())
