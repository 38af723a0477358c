"""LoRAM-Stru / LoRAM-Rand: kept counts, exact equivalence with zeroing, importance, manifests."""

import copy
import json

import pytest
import torch
from tolerance import assert_within, forward_rtol, forward_tol, max_ratio, sum_rtol
from torch import nn

from loram.prune.common import kept_kv_heads, kept_mlp_channels
from loram.prune.structured import (
    ManifestError,
    apply_structure,
    check_manifest,
    module_indices,
    prune_structured,
    structured_importance,
)
from loram.tiny import tiny_llama, tiny_llama_mha, tiny_qwen2

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calib(vocab=128, n=2, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, seq), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def zeroed_reference(model, manifest):
    """The original model with every pruned weight zeroed, computed head by head (test-only)."""
    ref = copy.deepcopy(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv
    with torch.no_grad():
        for layer in manifest["layers"]:
            keep = manifest["structure"][str(layer)]
            att, mlp = ref.model.layers[layer].self_attn, ref.model.layers[layer].mlp
            for qh in range(heads):
                if qh // group not in keep["kv_heads"]:
                    rows = slice(qh * hd, (qh + 1) * hd)
                    att.q_proj.weight[rows] = 0
                    if att.q_proj.bias is not None:
                        att.q_proj.bias[rows] = 0
                    att.o_proj.weight[:, rows] = 0
            for h in range(kv):
                if h not in keep["kv_heads"]:
                    rows = slice(h * hd, (h + 1) * hd)
                    for lin in (att.k_proj, att.v_proj):
                        lin.weight[rows] = 0
                        if lin.bias is not None:
                            lin.bias[rows] = 0
            for c in range(cfg.intermediate_size):
                if c not in keep["mlp_channels"]:
                    mlp.gate_proj.weight[c] = 0
                    mlp.up_proj.weight[c] = 0
                    mlp.down_proj.weight[:, c] = 0
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------ counts


@pytest.mark.parametrize(
    "dim,ratio,kept",
    [
        (1536, 0.65, 537),
        (13824, 0.65, 4838),
        (11008, 0.65, 3852),
        (96, 0.0, 96),
        (96, 0.99, 1),
        (10, 0.07, 9),
    ],
)
def test_kept_mlp_formula(dim, ratio, kept):
    assert kept_mlp_channels(dim, ratio) == kept


@pytest.mark.parametrize(
    "dim,ratio,round_to,kept",
    [
        (1536, 0.65, 8, 536),  # 537 -> nearest multiple of 8
        (1536, 0.65, 64, 512),  # 537 / 64 = 8.39
        (13824, 0.65, 8, 4840),  # 4838 -> 4840
        (8960, 0.85, 64, 1344),  # already a multiple: unchanged
        (72, 0.5, 8, 40),  # 36: a tie rounds up
        (96, 0.99, 8, 8),  # never below one multiple
        (100, 0.0, 8, 100),  # the nearest multiple (104) would exceed dim: all kept
        (6, 0.5, 8, 3),  # dim < round_to: the exact count
        (1536, 0.65, 1, 537),
    ],
)
def test_kept_mlp_rounded(dim, ratio, round_to, kept):
    assert kept_mlp_channels(dim, ratio, round_to) == kept
    # an independent statement of the rule: the multiple nearest the exact count, clamped
    exact = kept_mlp_channels(dim, ratio)
    if round_to > 1 and dim >= round_to:
        assert kept == min(dim, max(round_to, min(
            range(round_to, dim + round_to, round_to), key=lambda k: (abs(k - exact), -k)
        )))  # fmt: skip


@pytest.mark.parametrize("bad", [0, -8, 2.0, True, "8"])
def test_round_to_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"round_to = {bad!r} is not allowed"):
        kept_mlp_channels(96, 0.5, bad)


@pytest.mark.parametrize(
    "kv,ratio,kept",
    [
        (3, 0.65, 2),
        (40, 0.65, 14),
        (8, 0.85, 2),
        (2, 0.95, 1),
        (2, 0.5, 1),
        (6, 0.3, 5),
        (2, 0.0, 2),
    ],
)
def test_kept_kv_formula(kv, ratio, kept):
    assert kept_kv_heads(kv, ratio) == kept


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    "ratio,criterion",
    [
        (0.0, "magnitude"),
        (0.3, "taylor"),
        (0.5, "random"),
        (0.65, "taylor"),
        (0.95, "magnitude"),
        (0.99, "random"),
    ],
)
def test_pruned_equals_zeroed_original(tiny_model, ratio, criterion):
    original = copy.deepcopy(tiny_model)
    cfg = tiny_model.config
    layers = [1, 2] if cfg.num_hidden_layers == 4 else [1, 2, 4]
    batches = calib() if criterion == "taylor" else None
    man = prune_structured(tiny_model, ratio, layers, criterion, batches, seed=3, progress=False)

    # Manifest: JSON round trip, counts, sorted, config untouched.
    assert json.loads(json.dumps(man)) == man
    assert tiny_model.config.to_dict() == original.config.to_dict()
    kv, d = cfg.num_key_value_heads, cfg.intermediate_size
    for layer in layers:
        s = man["structure"][str(layer)]
        assert len(s["kv_heads"]) == kept_kv_heads(kv, ratio)
        assert len(s["mlp_channels"]) == kept_mlp_channels(d, ratio)
        assert s["kv_heads"] == sorted(set(s["kv_heads"]))
        assert s["mlp_channels"] == sorted(set(s["mlp_channels"]))
    if ratio == 0.99:
        assert all(len(man["structure"][str(x)]["mlp_channels"]) == 1 for x in layers)
        assert all(len(man["structure"][str(x)]["kv_heads"]) == 1 for x in layers)
    assert man["params"]["original"] == sum(p.numel() for p in original.parameters())
    assert man["params"]["pruned"] == sum(p.numel() for p in tiny_model.parameters())
    assert (man["params"]["pruned"] < man["params"]["original"]) == (ratio > 0)

    # Weights: the kept rows/columns of the original, index by index.
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    g = heads // kv
    for layer in layers:
        s = man["structure"][str(layer)]
        q_rows = [
            qh * hd + i for h in s["kv_heads"] for qh in range(h * g, h * g + g) for i in range(hd)
        ]
        kv_rows = [h * hd + i for h in s["kv_heads"] for i in range(hd)]
        ch = s["mlp_channels"]
        po, pp = original.model.layers[layer], tiny_model.model.layers[layer]
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            a, b = getattr(po.self_attn, name), getattr(pp.self_attn, name)
            assert torch.equal(b.weight, a.weight[rows])
            if a.bias is not None:
                assert torch.equal(b.bias, a.bias[rows])
        assert torch.equal(pp.self_attn.o_proj.weight, po.self_attn.o_proj.weight[:, q_rows])
        assert torch.equal(pp.mlp.gate_proj.weight, po.mlp.gate_proj.weight[ch])
        assert torch.equal(pp.mlp.up_proj.weight, po.mlp.up_proj.weight[ch])
        assert torch.equal(pp.mlp.down_proj.weight, po.mlp.down_proj.weight[:, ch])
        assert all(type(getattr(pp.self_attn, n)) is nn.Linear for n in PROJ[:4])

    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    want = logits(zeroed_reference(original, man).double(), ids)  # reference in float64
    got = logits(tiny_model, ids)
    tol = forward_tol(cfg, want)  # rounding of one float32 forward
    assert_within(got, want, tol, "pruned vs zeroed original")
    if ratio > 0:  # the comparison can fail: pruning changes the original's output
        assert max_ratio(logits(original, ids), got, tol) > 1


def test_module_indices_and_apply_structure():
    model = tiny_llama()
    fresh = tiny_llama(seed=5)
    man = prune_structured(model, 0.5, [1, 3], "random", seed=7, progress=False)
    idx = module_indices(man, model.config)
    assert sorted(idx) == sorted(
        f"model.layers.{x}.{b}.{p}"
        for x in (1, 3)
        for b, p in [("self_attn", p) for p in PROJ[:4]] + [("mlp", p) for p in PROJ[4:]]
    )
    (h,) = man["structure"]["1"]["kv_heads"]  # 2 KV heads at 0.5 -> 1 kept, 4 q heads of 8 each
    assert idx["model.layers.1.self_attn.q_proj"][0] == "out"
    assert idx["model.layers.1.self_attn.q_proj"][1].tolist() == list(range(h * 32, h * 32 + 32))
    assert idx["model.layers.1.self_attn.k_proj"][1].tolist() == list(range(h * 8, h * 8 + 8))
    assert idx["model.layers.1.self_attn.o_proj"][0] == "in"
    assert idx["model.layers.1.self_attn.o_proj"][1].tolist() == list(range(h * 32, h * 32 + 32))
    assert idx["model.layers.1.mlp.down_proj"][0] == "in"
    assert idx["model.layers.1.mlp.up_proj"][1].tolist() == man["structure"]["1"]["mlp_channels"]
    assert all(v.dtype == torch.long for _, v in idx.values())

    apply_structure(fresh, man)
    for path in idx:
        assert fresh.get_submodule(path).weight.shape == model.get_submodule(path).weight.shape
    with pytest.raises(ValueError, match="already pruned"):
        apply_structure(fresh, man)


def test_mha_indices_map_one_query_head_per_kv_head():
    model = tiny_llama_mha()  # 6 heads, 6 KV heads, head_dim 8
    man = prune_structured(model, 0.5, [1], "random", seed=0, progress=False)
    kept = man["structure"]["1"]["kv_heads"]
    assert len(kept) == 3
    q = module_indices(man)["model.layers.1.self_attn.q_proj"][1].tolist()
    assert q == [h * 8 + i for h in kept for i in range(8)]


# ------------------------------------------------------------------------------ importance


def brute_force_scores(model, layers, batches, use_grad):
    """Σ|w·g| (or Σ|w|) per KV head and MLP channel, from torch.autograd, head by head.

    The float32 terms are summed in float64: the sums add no float32 rounding of their own."""
    model = copy.deepcopy(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    g = heads // kv
    tensors = {}
    for layer in layers:
        blk = model.model.layers[layer]
        for p in PROJ:
            lin = getattr(blk.self_attn if p in PROJ[:4] else blk.mlp, p)
            tensors[(layer, p, "w")] = lin.weight
            if lin.bias is not None:
                tensors[(layer, p, "b")] = lin.bias
    keys = list(tensors)
    grads = {k: torch.zeros_like(tensors[k]) for k in keys}
    if use_grad:
        for batch in batches:
            loss = model(**batch).loss
            for k, gr in zip(keys, torch.autograd.grad(loss, [tensors[k] for k in keys])):
                grads[k] += gr
    score = {
        k: (tensors[k].detach() * grads[k]).abs() if use_grad else tensors[k].detach().abs()
        for k in keys
    }

    def total(t):  # float64 sum of the float32 terms
        return t.sum(dtype=torch.float64).item()

    out = {}
    for layer in layers:
        head_s = []
        for h in range(kv):
            s = 0.0
            for qh in range(h * g, h * g + g):
                s += total(score[(layer, "q_proj", "w")][qh * hd : (qh + 1) * hd])
                if (layer, "q_proj", "b") in score:
                    s += total(score[(layer, "q_proj", "b")][qh * hd : (qh + 1) * hd])
                s += total(score[(layer, "o_proj", "w")][:, qh * hd : (qh + 1) * hd])
            for p in ("k_proj", "v_proj"):
                s += total(score[(layer, p, "w")][h * hd : (h + 1) * hd])
                if (layer, p, "b") in score:
                    s += total(score[(layer, p, "b")][h * hd : (h + 1) * hd])
            head_s.append(s)
        ch_s = []
        for c in range(cfg.intermediate_size):
            s = total(score[(layer, "gate_proj", "w")][c])
            s += total(score[(layer, "up_proj", "w")][c])
            s += total(score[(layer, "down_proj", "w")][:, c])
            ch_s.append(s)
        out[layer] = {
            "kv_heads": torch.tensor(head_s, dtype=torch.float64),
            "mlp_channels": torch.tensor(ch_s, dtype=torch.float64),
        }
    return out


def test_taylor_matches_brute_force(tiny_model):
    batches = calib()
    layers = [1, 2]
    tiny_model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # must be restored
    want = brute_force_scores(tiny_model, layers, batches, use_grad=True)
    got = structured_importance(tiny_model, layers, "taylor", batches, progress=False)
    # The gradient is an end-to-end float32 computation (forward + backward, done twice: here
    # and in the library); then float64 sums of at most all of a layer's parameters.
    n = sum(p.numel() for p in tiny_model.model.layers[layers[0]].parameters())
    rtol = forward_rtol(tiny_model.config, paths=2) + sum_rtol(n)
    for layer in layers:
        for k in ("kv_heads", "mlp_channels"):
            torch.testing.assert_close(got[layer][k], want[layer][k], rtol=rtol, atol=0)
            assert (got[layer][k] > 0).all()
    assert all(p.grad is None for p in tiny_model.parameters())
    assert not tiny_model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert tiny_model.model.layers[1].mlp.up_proj.weight.requires_grad

    # The pruning keeps the top scores of the brute force (ties: lower index).
    man = prune_structured(
        copy.deepcopy(tiny_model), 0.5, layers, "taylor", batches, progress=False
    )
    for layer in layers:
        for k, n in (
            ("kv_heads", kept_kv_heads(tiny_model.config.num_key_value_heads, 0.5)),
            ("mlp_channels", kept_mlp_channels(tiny_model.config.intermediate_size, 0.5)),
        ):
            s = want[layer][k].tolist()
            top = sorted(sorted(range(len(s)), key=lambda i: (-s[i], i))[:n])
            assert man["structure"][str(layer)][k] == top
            # ... and the cut is decided by more than rounding (else exact indices are fragile)
            cut = sorted(s, reverse=True)
            assert cut[n - 1] - cut[n] > rtol * cut[n - 1]


def test_magnitude_matches_brute_force():
    model = tiny_qwen2()
    want = brute_force_scores(model, [2], None, use_grad=False)
    got = structured_importance(model, [2], "magnitude")
    n = sum(p.numel() for p in model.model.layers[2].parameters())  # >= terms of any sum
    for k in ("kv_heads", "mlp_channels"):  # the same float64 terms, summed in another order
        torch.testing.assert_close(got[2][k], want[2][k], rtol=sum_rtol(n), atol=0)


def test_taylor_on_bf16_model_computes_in_fp32_and_restores_dtype():
    batches = calib()
    model = tiny_llama().to(torch.bfloat16)
    as_fp32 = copy.deepcopy(model).float()
    m1 = prune_structured(model, 0.5, [1, 2], "taylor", batches, progress=False)
    m2 = prune_structured(as_fp32, 0.5, [1, 2], "taylor", batches, progress=False)
    assert m1["structure"] == m2["structure"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_random_is_seeded_and_ties_are_deterministic():
    a = prune_structured(tiny_llama(), 0.5, [1, 2, 3], "random", seed=11, progress=False)
    b = prune_structured(tiny_llama(seed=4), 0.5, [1, 2, 3], "random", seed=11, progress=False)
    c = prune_structured(tiny_llama(), 0.5, [1, 2, 3], "random", seed=12, progress=False)
    assert a["structure"] == b["structure"]
    assert a["structure"] != c["structure"]
    assert a["method"] == "random" and a["criterion"] == "random"

    flat = tiny_llama()
    with torch.no_grad():
        for p in flat.parameters():
            p.fill_(0.1)
    man = prune_structured(flat, 0.65, [1], "magnitude", progress=False)
    assert man["structure"]["1"] == {"kv_heads": [0], "mlp_channels": list(range(33))}


def test_taylor_needs_calibration_and_valid_criterion():
    with pytest.raises(ValueError, match="calib_batches"):
        prune_structured(tiny_llama(), 0.5, [1], "taylor", None, progress=False)
    with pytest.raises(ValueError, match="criterion"):
        prune_structured(tiny_llama(), 0.5, [1], "wanda", progress=False)
    with pytest.raises(ValueError, match="ratio"):
        prune_structured(tiny_llama(), 1.0, [1], "random", progress=False)


# ------------------------------------------------------------------------------ manifest checks


@pytest.fixture(scope="module")
def manifest():
    return prune_structured(tiny_llama(), 0.5, [1, 2, 3, 4], "random", seed=0, progress=False)


def test_check_manifest_accepts_its_own(manifest):
    assert check_manifest(manifest, tiny_llama().config) == manifest
    assert check_manifest(manifest) == manifest
    assert manifest["round_to"] == 1
    older = {k: v for k, v in manifest.items() if k != "round_to"}  # before round_to existed
    assert check_manifest(older) == older


@pytest.mark.parametrize("criterion", ["random", "magnitude"])
def test_prune_rounds_kept_channels_and_records_it(criterion):
    """tiny Llama MHA (72 channels) at 0.65 keeps 25 exactly and 24 rounded to 8; the pruned
    model has those shapes, the manifest says round_to and passes its own check."""
    model = tiny_llama_mha()
    man = prune_structured(model, 0.65, [1, 2], criterion, seed=0, progress=False, round_to=8)
    assert man["round_to"] == 8
    assert check_manifest(man, tiny_llama_mha().config) == man
    for i in (1, 2):
        assert len(man["structure"][str(i)]["mlp_channels"]) == 24
        assert model.model.layers[i].mlp.gate_proj.out_features == 24
        assert model.model.layers[i].mlp.down_proj.in_features == 24
    assert model.model.layers[0].mlp.gate_proj.out_features == 72
    exact = prune_structured(tiny_llama_mha(), 0.65, [1, 2], criterion, seed=0, progress=False)
    assert len(exact["structure"]["1"]["mlp_channels"]) == 25


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(format="loram-pruned/0"), "format = 'loram-pruned/0'"),
        (lambda m: m.update(method="stru"), "method"),
        (lambda m: m.update(layers=[1, 2, 3, 9]), r"out of range for a model with 6 layers"),
        (lambda m: m.update(layers=[1, 2, 3]), "structure keys"),
        (
            lambda m: m["structure"]["2"].update(kv_heads=[2]),
            r"kv_heads has indices out of range \[0, 2\)",
        ),
        (lambda m: m["structure"]["2"].update(mlp_channels=[5] * 48), "duplicate"),
        (
            lambda m: m["structure"]["2"].update(mlp_channels=list(range(47))),
            "keeps 47 of 96.*imply 48",
        ),
        (lambda m: m["structure"]["2"].update(mlp_channels=list(range(48))[::-1]), "sorted"),
        # 48 of 96 kept: a multiple of 16 but not the multiple of 64 nearest 48 (64)
        (lambda m: m.update(round_to=64), "keeps 48 of 96.*imply 64"),
        (lambda m: m.update(round_to=0), "round_to = 0 must be an integer >= 1"),
        (lambda m: m.update(round_to="8"), "round_to = '8' must be an integer >= 1"),
        (
            lambda m: m["geometry"].update(head_dim=16),
            "head_dim is 16 in the manifest but 8 in the model config",
        ),
    ],
)
def test_check_manifest_errors(manifest, edit, match):
    bad = copy.deepcopy(manifest)
    edit(bad)
    with pytest.raises(ManifestError, match=match):
        check_manifest(bad, tiny_llama().config)


def test_manifest_from_other_model_is_a_clear_error(manifest):
    with pytest.raises(
        ManifestError, match="num_hidden_layers is 6 in the manifest but 4 in the model config"
    ):
        apply_structure(tiny_llama(layers=4), manifest)
    with pytest.raises(ManifestError, match="in the manifest but .* in the model config"):
        apply_structure(tiny_qwen2(), manifest)
