"""Memory accountant: the paper's numbers to the last digit, and meta counts vs real models."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from loram import memory
from loram.cli import main
from loram.tiny import tiny_llama, tiny_llama_mha, tiny_qwen2

ORIGINAL = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
}


# ----------------------------------------------------------------------------- paper numbers


MEASURED = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m")  # checked by loram plan


def test_shipped_configs_are_the_paper_models_and_the_measured_ones():
    assert memory.available_configs() == sorted([*ORIGINAL, *MEASURED])


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_original_counts(name):
    r = memory.memory_report(name, "none")
    assert r.original_params == r.pruned_params == r.held_params == ORIGINAL[name]
    assert r.layers == [] and r.ratio == 0.0
    assert f"{r.reduction:.2f}" == "1.00"


def test_small_baselines_hbm():
    assert f"{memory.memory_report('llama-2-7b', 'none').gib:.2f}" == "12.55"
    assert f"{memory.memory_report('llama-3.1-8b', 'none').gib:.2f}" == "14.96"


@pytest.mark.parametrize("method", ["structured", "random"])
def test_llama2_13b_loram_065(method):
    r = memory.memory_report("llama-2-13b", method, 0.65, "bf16")
    assert r.original_params == 13_015_864_320
    assert r.pruned_params == r.held_params == r.nonzero_params == 6_005_662_720
    assert r.held_bytes == 2 * 6_005_662_720
    assert f"{r.reduction:.2f}" == "2.17"
    assert f"{r.gib:.2f}" == "11.19"
    assert r.layers == list(range(4, 38))  # 40 layers: the first 4 and last 2 stay dense


def test_llama2_70b_qloram_085():
    r = memory.memory_report("llama-2-70b", "structured", 0.85, "nf4", "paper")
    assert r.original_params == 68_976_648_192
    assert r.pruned_params == 16_272_924_672  # the real pruned model
    assert r.held_params == 4_068_231_168  # the paper's QLoRAM count: a quarter of it
    assert f"{r.reduction:.2f}" == "16.95"
    assert f"{r.gib:.2f}" == "7.58"
    assert r.layers == list(range(4, 78))


def test_llama31_70b_qloram_085():
    r = memory.memory_report("llama-3.1-70b", "structured", 0.85, "nf4")
    assert r.original_params == 70_553_706_496
    assert r.held_params == 4_462_495_744
    assert f"{r.reduction:.2f}" == "15.81"
    assert f"{r.gib:.2f}" == "8.31"


@pytest.mark.parametrize("ratio, reduction", [(0.65, "9.82"), (0.75, "12.84"), (0.95, "28.56")])
def test_llama2_70b_qloram_ratios(ratio, reduction):
    r = memory.memory_report("llama-2-70b", "structured", ratio, "nf4", "paper")
    assert f"{r.reduction:.2f}" == reduction


def test_precisions_scale_bytes():
    bf16 = memory.memory_report("llama-2-13b", "structured", 0.65, "bf16")
    fp16 = memory.memory_report("llama-2-13b", "structured", 0.65, "FP16")
    fp32 = memory.memory_report("llama-2-13b", "structured", 0.65, "fp32")
    assert bf16.held_bytes == fp16.held_bytes == fp32.held_bytes // 2
    assert fp32.reduction == bf16.reduction  # the same precision on both sides


def test_semi_and_unstructured_hold_the_dense_count():
    for method, ratio in [("semi", 0.5), ("unstructured", 0.55)]:
        r = memory.memory_report("llama-2-13b", method, ratio)
        assert r.pruned_params == r.held_params == 13_015_864_320
        assert f"{r.reduction:.2f}" == "1.00"
        assert r.nonzero_params < r.pruned_params
    # 2:4 halves every projection weight of the 34 pruned layers exactly.
    r = memory.memory_report("llama-2-13b", "semi", 0.5)
    proj = 4 * 5120 * 5120 + 3 * 5120 * 13824
    assert r.nonzero_params == 13_015_864_320 - 34 * proj // 2


def test_layer_range_options():
    r = memory.memory_report("llama-2-13b", "structured", 0.65, first_layer=0, last_dense=0)
    assert r.layers == list(range(40))
    assert r.pruned_params < 6_005_662_720


# ----------------------------------------------------------------------------- real tiny models


def _kept(d: int, ratio: float) -> int:
    return max(1, d - math.ceil(Fraction(str(ratio)) * d))


def _kept_heads(kv: int, ratio: float) -> int:
    return max(1, kv - math.floor(Fraction(str(ratio)) * kv))


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _prune_by_hand(model, ratio: float, layers: list[int], seed: int = 0):
    """Structured pruning of a real model with random kept channels and KV heads."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    group = heads // kv
    for i in layers:
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        kv_keep = torch.randperm(kv, generator=g)[: _kept_heads(kv, ratio)].sort().values
        kv_idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kv_keep])
        q_heads = [h * group + j for h in kv_keep.tolist() for j in range(group)]
        q_idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
        attn.q_proj = _sliced(attn.q_proj, rows=q_idx)
        attn.k_proj = _sliced(attn.k_proj, rows=kv_idx)
        attn.v_proj = _sliced(attn.v_proj, rows=kv_idx)
        attn.o_proj = _sliced(attn.o_proj, cols=q_idx)
        d = mlp.gate_proj.out_features
        ch = torch.randperm(d, generator=g)[: _kept(d, ratio)].sort().values
        mlp.gate_proj = _sliced(mlp.gate_proj, rows=ch)
        mlp.up_proj = _sliced(mlp.up_proj, rows=ch)
        mlp.down_proj = _sliced(mlp.down_proj, cols=ch)
    return model


def _real_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


TINY = {"llama": tiny_llama, "qwen2": tiny_qwen2, "llama_mha": tiny_llama_mha}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.65, 0.9])
def test_meta_count_matches_real_pruned_model(arch, ratio):
    model = TINY[arch]()
    n = model.config.num_hidden_layers
    layers = list(range(1, n - 1))  # 6 layers -> 1..4, 4 layers -> 1..2 (depth-scaled defaults)
    original = _real_count(model)
    _prune_by_hand(model, ratio, layers)
    with torch.no_grad():  # the hand-pruned model still runs
        out = model(torch.arange(10).unsqueeze(0)).logits
    assert out.shape == (1, 10, model.config.vocab_size)
    r = memory.memory_report(TINY[arch]().config, "structured", ratio)
    assert r.layers == layers
    assert r.original_params == original
    assert r.pruned_params == _real_count(model)
    assert memory.memory_report(TINY[arch]().config, "random", ratio).pruned_params == (
        r.pruned_params
    )


def test_tiny_kept_counts_by_hand():
    # tiny_llama: MLP 96, 8 query heads over 2 KV heads of 8 dims, hidden 64, no bias.
    # At 0.65 a pruned layer keeps 96 - 63 = 33 channels and 1 KV head with 4 query heads.
    r = memory.memory_report(tiny_llama().config, "structured", 0.65)
    dense_layer = 64 * 64 * 2 + 64 * 16 * 2 + 3 * 64 * 96
    pruned_layer = 64 * 32 * 2 + 64 * 8 * 2 + 3 * 64 * 33
    assert r.original_params - r.pruned_params == 4 * (dense_layer - pruned_layer)
    # tiny_qwen2: q/k/v biases shrink too (4 heads of 16 over 2 KV heads, MLP 80 -> 28).
    r = memory.memory_report(tiny_qwen2().config, "structured", 0.65)
    dense_layer = 64 * 64 * 2 + 64 + 2 * (64 * 32 + 32) + 3 * 64 * 80
    pruned_layer = 64 * 32 * 2 + 32 + 2 * (64 * 16 + 16) + 3 * 64 * 28
    assert r.original_params - r.pruned_params == 4 * (dense_layer - pruned_layer)


def _mask_semi(w: torch.Tensor, n: int, m: int = 4) -> None:
    rows, cols = w.shape
    for start in range(0, cols, m):
        block = w[:, start : start + m]
        k = min(n, block.shape[1])
        idx = block.abs().topk(k, dim=1, largest=False).indices
        block.scatter_(1, idx, 0.0)


def _mask_unstructured(w: torch.Tensor, ratio: float) -> None:
    k = math.floor(Fraction(str(ratio)) * w.numel() + Fraction(1, 2))  # round half up
    idx = w.abs().flatten().topk(k, largest=False).indices
    w.view(-1)[idx] = 0.0


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("method, ratio", [("semi", 0.5), ("semi", 0.75), ("unstructured", 0.55)])
def test_nonzero_matches_real_sparse_model(arch, method, ratio):
    model = TINY[arch]()
    layers = list(range(1, model.config.num_hidden_layers - 1))
    with torch.no_grad():
        for i in layers:
            layer = model.model.layers[i]
            for block, names in [(layer.self_attn, "qkvo"), (layer.mlp, ("gate", "up", "down"))]:
                for name in names:
                    w = getattr(block, f"{name}_proj").weight.data
                    if method == "semi":
                        _mask_semi(w, round(ratio * 4))
                    else:
                        _mask_unstructured(w, ratio)
    r = memory.memory_report(TINY[arch]().config, method, ratio)
    assert r.pruned_params == r.original_params == _real_count(model)
    assert r.nonzero_params == sum(int(torch.count_nonzero(p)) for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(TINY))
def test_bitsandbytes_bytes_match_real_quantization(arch):
    F = pytest.importorskip("bitsandbytes.functional")
    model = TINY[arch]()
    layers = list(range(1, model.config.num_hidden_layers - 1))
    _prune_by_hand(model, 0.65, layers)
    total, quantised = 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
            w = mod.weight.data.to(torch.bfloat16)
            out, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            parts = [out, st.absmax, st.state2.absmax, st.code, st.state2.code, st.offset]
            total += sum(t.numel() * t.element_size() for t in parts)
            quantised.add(id(mod.weight))
    total += sum(2 * p.numel() for p in model.parameters() if id(p) not in quantised)
    r = memory.memory_report(TINY[arch]().config, "structured", 0.65, "nf4", "bitsandbytes")
    assert r.held_bytes == total
    assert r.held_params == math.ceil(total / 2)


def test_bitsandbytes_mode_on_70b_is_close_to_the_paper_count():
    paper = memory.memory_report("llama-2-70b", "structured", 0.85, "nf4", "paper")
    bnb = memory.memory_report("llama-2-70b", "structured", 0.85, "nf4", "bitsandbytes")
    # 16-bit embeddings and lm_head plus the absmax constants cost more than a flat 4 bits.
    assert paper.held_bytes < bnb.held_bytes < 1.2 * paper.held_bytes


# ----------------------------------------------------------------------------- config inputs


def test_config_from_path_dir_and_object(tmp_path):
    cfg = tiny_qwen2().config
    cfg.save_pretrained(tmp_path / "m")
    from_obj = memory.memory_report(cfg, "structured", 0.5)
    from_dir = memory.memory_report(tmp_path / "m", "structured", 0.5)
    from_file = memory.memory_report(str(tmp_path / "m" / "config.json"), "structured", 0.5)
    assert from_obj.pruned_params == from_dir.pruned_params == from_file.pruned_params
    assert from_dir.model == from_file.model == "m"
    shipped = memory.memory_report(memory.CONFIG_DIR / "llama-2-13b.json", "none")
    assert shipped.original_params == ORIGINAL["llama-2-13b"]
    assert memory.memory_report("LLaMA-2-13B.json", "none").model == "llama-2-13b"


def test_shipped_configs_carry_the_hf_fields():
    cfg = memory.load_config("llama-3.1-70b")
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (8192, 28672, 80)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (64, 8, 128256)
    assert cfg.tie_word_embeddings is False and cfg.rms_norm_eps == 1e-5


# ----------------------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="available: llama-2-13b, llama-2-70b"):
        memory.load_config("llama-2-99b")
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="0 <= ratio < 1"):
            memory.memory_report("llama-2-7b", "structured", ratio)
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        memory.memory_report("llama-2-7b", "structured", 0.5, "int3")
    with pytest.raises(ValueError, match="unknown nf4 mode"):
        memory.memory_report("llama-2-7b", "structured", 0.5, "nf4", "gptq")
    with pytest.raises(ValueError, match="unknown pruning method"):
        memory.memory_report("llama-2-7b", "magnitude", 0.5)
    with pytest.raises(ValueError, match="2:4"):
        memory.memory_report("llama-2-7b", "semi", 0.3)


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memory.load_config(tmp_path)


# ----------------------------------------------------------------------------- CLI


def test_cli_table(capsys):
    rc = main(["memory", "--config", "llama-2-13b", "--method", "structured", "--ratio", "0.65"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("llama-2-13b", "13,015,864,320", "6,005,662,720", "2.17", "11.19"):
        assert text in out


def test_cli_many_configs_and_ratios(capsys):
    argv = ["memory", "--config", "llama-2-70b", "--ratio", "0.65", "--ratio", "0.75,0.95"]
    rc = main(argv + ["--precision", "nf4", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [f"{r['reduction']:.2f}" for r in rows] == ["9.82", "12.84", "28.56"]
    rc = main(["memory", "--config", "llama-2-7b,llama-3.1-8b", "--config", "llama-2-13b"])
    assert rc == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("llama-2-7b", "llama-3.1-8b", "llama-2-13b"))


def test_cli_semi_shows_nonzero(capsys):
    assert main(["memory", "--config", "llama-2-13b", "--method", "semi"]) == 0
    out = capsys.readouterr().out
    assert "params non-zero" in out and "0.50" in out


def test_cli_paper_tables(capsys):
    assert main(["memory", "--paper-tables"]) == 0
    out = capsys.readouterr().out
    for text in (
        "6,005,662,720",
        "11.19",
        "4,068,231,168",
        "16.95",
        "7.58",
        "4,462,495,744",
        "15.81",
        "8.31",
        "9.82",
        "12.84",
        "28.56",
        "6,738,415,616",
        "8,030,261,248",
    ):
        assert text in out, text


def test_cli_errors(capsys):
    assert main(["memory", "--config", "llama-2-99b"]) == 2
    err = capsys.readouterr().err
    assert "unknown config" in err and "llama-3.1-70b" in err
    assert main(["memory", "--config", "llama-2-7b", "--ratio", "1.0"]) == 2
    assert "0 <= ratio < 1" in capsys.readouterr().err
    assert main(["memory", "--config", "llama-2-7b", "--ratio", "abc"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main(["memory"]) == 2
    assert "--paper-tables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--config", "llama-2-7b", "--precision", "int3"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_shipped_configs_of_the_measured_models():
    # as transformers loads the embedded GGUF (tied) and the Qwen GGUFs (output matrix untied)
    counts = {
        "smollm2-135m": 134_515_008,
        "qwen2.5-coder-0.5b": 630_167_424,
        "qwen2.5-coder-1.5b": 1_777_088_000,
    }
    for name, n in counts.items():
        assert memory.memory_report(name, "none").original_params == n
    assert memory.load_config("smollm2-135m").tie_word_embeddings is True
    assert memory.load_config("qwen2.5-coder-1.5b").tie_word_embeddings is False
