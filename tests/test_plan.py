"""The memory planner (``loram plan``): its activation count against what autograd really keeps,
its answers to the paper's settings, the ratio search and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from loram import plan as P
from loram.cli import main
from loram.prune.common import LINEAR_PROJ, pruned_layers
from loram.tiny import tiny_llama, tiny_llama_mha, tiny_qwen2

TINY = {"llama": tiny_llama, "qwen2": tiny_qwen2, "llama_mha": tiny_llama_mha}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward pass of one
    forward (walking the graph's ``_saved_*`` attributes, each storage counted once)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, stack, storages, total = set(), [out.grad_fn], set(), 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed / not available
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if not isinstance(t, torch.Tensor) or t.numel() <= 1:
                    continue  # scalars (philox seeds, shapes) are no activations
                ptr = t.untyped_storage().data_ptr()
                if ptr in params or ptr in storages:
                    continue
                storages.add(ptr)
                total += t.untyped_storage().nbytes()
        stack.extend(nxt for nxt, _ in node.next_functions)
    return total


def lora_model(model, dtype, targets, lm_head: bool, dropout: float, r: int = 4):
    """A frozen ``model`` in ``dtype`` with fp32 peft LoRA, as loram.train builds it."""
    from peft import LoraConfig, get_peft_model

    model = model.to(dtype)
    for prm in model.parameters():
        prm.requires_grad_(False)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=dropout,
        target_modules=list(targets) + (["lm_head"] if lm_head else []),
    )
    pm = get_peft_model(model, cfg, autocast_adapter_dtype=True)
    with torch.no_grad():
        for prm in pm.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
    return pm.train()


CASES = [
    (arch, prec, attn, dropout, targets, lm_head)
    for arch in ("llama", "qwen2")
    for prec in ("fp32", "bf16")
    for attn in ("sdpa", "eager")
    for dropout in (0.0, 0.05)
    for targets, lm_head in (
        (LINEAR_PROJ, False),
        (("q_proj", "v_proj"), True),
        (("down_proj",), False),
    )
]


@pytest.mark.parametrize("arch, prec, attn, dropout, targets, lm_head", CASES)
def test_activations_equal_what_autograd_keeps(arch, prec, attn, dropout, targets, lm_head):
    model = TINY[arch](layers=3)
    model.config._attn_implementation = attn
    pm = lora_model(model, DTYPES[prec], targets, lm_head, dropout)
    b, s = 2, 16
    ids = torch.randint(
        0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)
    )
    setting = P.Setting(
        precision=prec, r=4, targets=targets, lm_head=lm_head, dropout=dropout,
        micro_batch=b, seq_len=s, attention=attn, device="cpu",
    )  # fmt: skip
    assert P.plan(TINY[arch](layers=3).config, setting).activations == saved_bytes(pm, ids)


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize(("prec", "round_to"), [("fp32", 1), ("bf16", 1), ("fp32", 8)])
def test_activations_of_a_really_pruned_model(arch, prec, round_to):
    from loram.prune.structured import prune_structured

    model = TINY[arch]()
    layers = pruned_layers(model.config.num_hidden_layers, None, None)
    torch.manual_seed(0)
    prune_structured(model, 0.5, layers, criterion="random", seed=0, round_to=round_to)
    model.config._attn_implementation = "sdpa"
    pm = lora_model(model, DTYPES[prec], LINEAR_PROJ, False, 0.05)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    setting = P.Setting(
        method="loram-rand", ratio=0.5, precision=prec, r=4, micro_batch=2, seq_len=12,
        device="cpu", round_to=round_to,
    )  # fmt: skip
    planned = P.plan(TINY[arch]().config, setting)
    assert planned.activations == saved_bytes(pm, ids)
    assert planned.lora_params == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    dense = P.plan(TINY[arch]().config, P.Setting(precision=prec, r=4, micro_batch=2, seq_len=12))
    assert planned.weights < dense.weights


@pytest.mark.parametrize("arch", sorted(TINY))
def test_activations_with_packed_dropout_masks(arch):
    """train.dropout_rng packed keeps a bool mask per dropout: the planner's dropout_rng."""
    from loram.train import use_packed_dropout

    model = TINY[arch](layers=3)
    model.config._attn_implementation = "sdpa"
    pm = lora_model(model, DTYPES["fp32"], LINEAR_PROJ, False, 0.05)
    assert use_packed_dropout(pm) > 0
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    kw = dict(precision="fp32", r=4, micro_batch=2, seq_len=16, device="cpu")
    packed = P.plan(TINY[arch](layers=3).config, P.Setting(dropout_rng="packed", **kw))
    assert packed.activations == saved_bytes(pm, ids)
    torch_masks = P.plan(TINY[arch](layers=3).config, P.Setting(**kw))
    assert packed.activations < torch_masks.activations
    with pytest.raises(ValueError, match="dropout_rng"):
        P.plan(TINY[arch](layers=3).config, P.Setting(dropout_rng="fast", **kw))


def test_cuda_dropout_keeps_a_byte_mask():
    cfg = tiny_llama().config
    cpu = P.plan(cfg, P.Setting(device="cpu"))
    cuda = P.plan(cfg, P.Setting(device="cuda"))
    # the fp32 noise of every dropout whose input needs a gradient becomes one byte:
    # 5 layers x (q, k, v on the hidden size, o on q_out, gate, up, down) + layer 0's o/gate/up/down
    h, q, mlp = 64, 64, 96
    per_layer = 3 * h + q + 2 * h + mlp
    first = q + 2 * h + mlp
    tokens = 4 * 512
    assert cpu.activations - cuda.activations == tokens * 3 * (5 * per_layer + first)


def test_loss_bytes_stock_and_chunked():
    s = P.Setting(micro_batch=4, seq_len=512, precision="bf16")
    V, h, shifted = 49152, 576, 4 * 511
    # backward of the log-softmax: NLL's gradient + kept output + input gradient, fp32
    assert P.loss_bytes(s, V, h) == 12 * shifted * V
    chunked = P.loss_bytes(P.Setting(loss_chunk=256), V, h)
    assert chunked == 2 * shifted * h + 12 * 256 * V
    # a chunk larger than the batch is the batch
    assert P.loss_bytes(P.Setting(loss_chunk=10**6), V, h) == 2 * shifted * h + 12 * shifted * V
    # fp32, one row: the shifted slice is contiguous, no copy; forward 4 + 4, backward 12
    one = P.Setting(micro_batch=1, seq_len=8, precision="fp32")
    assert P.loss_bytes(one, 10, 4) == 12 * 7 * 10


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    cfg = P.load_config("llama-2-13b")
    full = P.plan(cfg, P.Setting())
    ckpt = P.plan(cfg, P.Setting(grad_checkpointing=True))
    inputs = 40 * 4 * 512 * 2 * 5120
    assert ckpt.detail["checkpoints"] == inputs
    assert ckpt.peak < full.peak / 2
    assert ckpt.weights == full.weights and ckpt.optimizer == full.optimizer
    chunked = P.plan(cfg, P.Setting(grad_checkpointing=True, loss_chunk=256))
    assert chunked.peak <= ckpt.peak


# ----------------------------------------------------------------------------- the paper


PAPER_TABLE8_MIB = {  # Table 8: micro-batch 4 x 512, LoRA r 8 on q,k,v,o,gate,up,down,lm_head
    ("llama-2-13b", "lora"): 51_661,
    ("llama-2-13b", "loram-stru"): 29_799,
    ("llama-2-7b", "lora"): 30_517,
}
# The paper's code (junzhang-zj/LoRAM, 2_pruned_low_rank_matrix_training.py): bf16 base,
# flash-attention-2 (it keeps what SDPA keeps), HF Trainer with bf16 autocast (the LoRA branch
# computes in bf16), dropout 0.05, lm_head adapted.
PAPER_CODE = P.Setting(
    lm_head=True, lora_dtype="bf16", device="cuda", attention="sdpa", round_to=1
)  # LLM-Pruner keeps the ratio's exact channel count


@pytest.mark.parametrize("model, method", sorted(PAPER_TABLE8_MIB))
def test_table8_peak_memory(model, method):
    """The planner counts allocated tensors (``max_memory_allocated``); a device-level figure also
    holds the CUDA context and the caching allocator's slack, so the paper's measurement may only
    be higher, by a few percent: within 8% below it (measured here: -4.4%, -5.9%, -5.6%)."""
    got = P.plan(model, P.Setting(**{**PAPER_CODE.__dict__, "method": method})).peak_mib
    paper = PAPER_TABLE8_MIB[(model, method)]
    assert 0.92 * paper <= got <= paper
    # loram's own training (fp32 LoRA branch) needs more: the fp32 inputs of every LoRA A
    ours = P.plan(model, P.Setting(method=method, lm_head=True)).peak_mib
    assert ours > got


def test_table8_ratio_stru_vs_lora():
    lora = P.plan("llama-2-13b", PAPER_CODE).peak
    stru = P.plan("llama-2-13b", P.Setting(**{**PAPER_CODE.__dict__, "method": "loram-stru"})).peak
    assert abs(stru / lora - 29_799 / 51_661) < 0.02  # 0.568 vs the paper's 0.577


@pytest.mark.parametrize("lora_dtype", ["bf16", "fp32"])
def test_llama31_70b_qloram_stru_085_fits_one_80gb_gpu(lora_dtype):
    budget = P.parse_size("80GB")
    s = P.Setting(method="qloram-stru", ratio=0.85, lm_head=True, lora_dtype=lora_dtype)
    q = P.plan("llama-3.1-70b", s)
    assert q.peak < budget
    assert q.weights < 13 * 2**30  # NF4 pruned weights: ~11.5 GiB
    # ... where neither LoRA on the full model nor the unquantised pruned model fits
    assert P.plan("llama-3.1-70b", P.Setting(method="lora", lm_head=True)).peak > budget
    assert P.plan("llama-3.1-70b", P.Setting(method="loram-stru", ratio=0.85)).peak > budget


def test_smallest_fitting_ratio():
    budget = P.parse_size("80GiB")
    s = P.Setting(method="qloram-stru", lm_head=True)
    ratio, found = P.smallest_fitting_ratio("llama-3.1-70b", s, budget)
    assert found.peak <= budget and found.setting.ratio == ratio
    below = P.plan("llama-3.1-70b", P.Setting(**{**s.__dict__, "ratio": round(ratio - 0.01, 2)}))
    assert below.peak > budget
    assert P.smallest_fitting_ratio("llama-3.1-70b", s, 10 * 2**30) is None
    tiny = P.smallest_fitting_ratio("llama-2-7b", P.Setting(method="loram-rand"), 10**15)
    assert tiny[0] == 0.01  # everything fits: the smallest ratio on the grid
    assert P.smallest_fitting_ratio("llama-2-7b", P.Setting(method="lora"), 10**15) is None


def test_peak_shrinks_with_the_ratio():
    peaks = [
        P.plan("llama-2-13b", P.Setting(method="loram-stru", ratio=r)).peak
        for r in (0.0, 0.3, 0.5, 0.65, 0.85)
    ]
    assert peaks == sorted(peaks, reverse=True)


def test_parse_size():
    assert P.parse_size("80GB") == P.parse_size("80GiB") == P.parse_size("80") == 80 * 2**30
    assert P.parse_size("24000MiB") == 24000 * 2**20
    assert P.parse_size("0.5 TB") == 2**39
    for bad in ("eighty", "80XB", "-3GB", "0"):
        with pytest.raises(ValueError, match="not a size"):
            P.parse_size(bad)


def test_setting_errors():
    for kwargs, msg in [
        ({"method": "qlorax"}, "unknown method"),
        ({"precision": "nf4"}, "nf4 is a method"),
        ({"targets": ("w_proj",)}, "LoRA targets"),
        ({"micro_batch": 0}, "micro_batch = 0"),
        ({"loss_chunk": -1}, "loss_chunk"),
        ({"lora_dtype": "int8"}, "unknown lora_dtype"),
    ]:
        with pytest.raises(ValueError, match=msg):
            P.plan("llama-2-7b", P.Setting(**kwargs))


# ----------------------------------------------------------------------------- CLI


def test_cli_table(capsys):
    argv = ["plan", "--model", "llama-3.1-70b", "--ratio", "0.85", "--lm-head", "--budget", "80GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "qloram-stru" in out and "loram-stru" in out and "lora " in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("llama")}
    assert rows["lora"][-1] == "NO" and rows["qloram-stru"][-1] == "yes"
    assert "smallest ratio that fits" in out


def test_cli_json(capsys):
    argv = ["plan", "--model", "llama-2-13b", "--method", "lora,loram-stru", "--budget", "40GiB"]
    assert main(argv + ["--json", "--grad-checkpointing", "--loss-chunk", "256"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert [p["setting"]["method"] for p in obj["plans"]] == ["lora", "loram-stru"]
    for p in obj["plans"]:
        parts = ("weights", "lora", "grads", "optimizer", "activations", "logits", "overhead")
        assert p["peak"] == sum(p[k] for k in parts)
        assert p["setting"]["grad_checkpointing"] and p["setting"]["loss_chunk"] == 256
    assert obj["plans"][0]["fits"] is True  # 13B LoRA with checkpointing and a chunked loss
    assert obj["smallest_fitting_ratio"]["loram-stru"]["ratio"] == 0.01


def test_cli_model_dir_and_tiny(capsys, tmp_path):
    tiny_qwen2().config.save_pretrained(tmp_path / "m")
    assert main(["plan", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    assert "device cpu" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny-llama", "--method", "qloram-rand"]) == 0


def test_cli_errors(capsys):
    assert main(["plan", "--model", "llama-2-99b"]) == 2
    assert "unknown config" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--method", "lora,fancy"]) == 2
    assert "unknown method 'fancy'" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--budget", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--targets", "x_proj"]) == 2
    assert "LoRA targets" in capsys.readouterr().err


def test_cpu_overhead_and_qloram_load_phase():
    cfg = P.load_config("qwen2.5-coder-1.5b")
    gpu = P.plan(cfg, P.Setting(method="qloram-stru", micro_batch=1, seq_len=64))
    cpu = P.plan(cfg, P.Setting(method="qloram-stru", micro_batch=1, seq_len=64, device="cpu"))
    assert gpu.overhead == 0 and gpu.peak_phase == "loss"
    assert cpu.overhead == int((P.CPU_OVERHEAD_MIB + P.CPU_NF4_OVERHEAD_MIB) * 2**20)
    # on CPU the dense pruned bf16 model exists before quantize_nf4: more than the NF4 training
    dense = P.plan(cfg, P.Setting(method="loram-stru", micro_batch=1, seq_len=64))
    assert cpu.peak_phase == "load" and cpu.peak == cpu.detail["load_peak"]
    assert cpu.peak > dense.weights > cpu.weights


def test_nf4_keeps_the_rest_in_the_base_dtype():
    cfg = tiny_llama().config  # untied: embeddings, lm_head and norms stay unquantised
    s = P.Setting(method="qloram-stru")
    fp32 = P.plan(cfg, P.Setting(**{**s.__dict__, "precision": "fp32"}))
    bf16 = P.plan(cfg, s)
    rest = 2 * 128 * 64 + 64 * (2 * 6 + 1)  # embed, lm_head, 2 norms a layer + the final norm
    assert fp32.weights - bf16.weights == 2 * rest
