"""Recovery of a LoRA trained on the pruned model, and merging into the original model."""

import contextlib
import copy
import json
import logging
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tolerance import assert_within, forward_tol, max_ratio, merge_bound
from transformers import AutoModelForCausalLM

from loram.merge import merge_adapter, merge_to_dir
from loram.prune.artifact import save_pruned
from loram.prune.structured import prune_structured
from loram.recover import recover_adapter, recover_state_dict
from loram.tiny import tiny_llama, tiny_qwen2

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 4, 8
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def kept_indices(cfg, manifest, layer):
    """Kept original indices per family, spelled out head by head (test-only)."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    g = heads // kv
    s = manifest["structure"][str(layer)]
    q = [qh * hd + i for h in s["kv_heads"] for qh in range(h * g, (h + 1) * g) for i in range(hd)]
    kvc = [h * hd + i for h in s["kv_heads"] for i in range(hd)]
    return {"q": q, "kv": kvc, "mlp": list(s["mlp_channels"])}


# proj -> (axis pruned, family)
AXIS = {
    "q_proj": ("out", "q"),
    "k_proj": ("out", "kv"),
    "v_proj": ("out", "kv"),
    "o_proj": ("in", "q"),
    "gate_proj": ("out", "mlp"),
    "up_proj": ("out", "mlp"),
    "down_proj": ("in", "mlp"),
}


def block(layer, proj):
    return f"model.layers.{layer}.{'self_attn' if proj in PROJ[:4] else 'mlp'}.{proj}"


def zeroed(model, manifest):
    """The original with pruned rows/columns (and biases) zeroed, from the manifest indices."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in manifest["layers"]:
            keep = kept_indices(model.config, manifest, layer)
            for proj, (axis, fam) in AXIS.items():
                lin = ref.get_submodule(block(layer, proj))
                n = lin.weight.shape[0 if axis == "out" else 1]
                drop = [i for i in range(n) if i not in keep[fam]]
                if axis == "out":
                    lin.weight[drop] = 0
                    if lin.bias is not None:
                        lin.bias[drop] = 0
                else:
                    lin.weight[:, drop] = 0
    return ref


@contextlib.contextmanager
def no_warnings():
    """Fail on any Python warning or peft/transformers log record about keys or shapes."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    msgs = [str(w.message) for w in caught] + records
    bad = [
        m
        for m in msgs
        if any(s in m.lower() for s in ("missing", "unexpected", "mismatch", "size"))
    ]
    assert not bad, bad


def train_lora(model, targets, steps=3, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    pm.train()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


@pytest.fixture(params=["llama", "qwen2", "llama_mha"])
def trained(request, tmp_path):
    """Original model, pruned dir + manifest, a LoRA trained on the pruned model, its dir."""
    from loram.tiny import TINY_BUILDERS

    arch = request.param
    original = TINY_BUILDERS[arch]()
    model = copy.deepcopy(original)
    layers = [1, 2] if arch == "llama_mha" else [1, 2, 4]
    ratio = {"llama": 0.5, "qwen2": 0.65, "llama_mha": 0.3}[arch]
    man = prune_structured(model, ratio, layers, "random", seed=2, progress=False)
    save_pruned(model, man, tmp_path / "pruned")
    targets = PROJ + (() if original.config.tie_word_embeddings else ("lm_head",))
    pm = train_lora(model, targets)
    pm.save_pretrained(tmp_path / "adapter")
    return {"original": original, "manifest": man, "peft": pm, "dir": tmp_path, "targets": targets}


def test_recovered_adapter_reproduces_pruned_model(trained):
    t = trained
    out = recover_adapter(t["dir"] / "adapter", t["dir"] / "pruned", t["dir"] / "rec")
    ref = zeroed(t["original"], t["manifest"]).double()  # the reference runs in float64
    with no_warnings():
        loaded = PeftModel.from_pretrained(ref, str(out))
    want, got = logits(loaded), logits(t["peft"])
    tol = forward_tol(t["original"].config, want)  # rounding of one float32 forward
    assert_within(got, want, tol, "pruned + LoRA vs zeroed original + recovered LoRA")
    # ... and the test can fail: without the LoRA the outputs differ by more than tol.
    with loaded.disable_adapter():
        assert max_ratio(logits(loaded), got, tol) > 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA


def test_recovered_values_and_zero_delta(trained):
    t = trained
    out = recover_adapter(t["dir"] / "adapter", t["manifest"], t["dir"] / "rec")
    small = load_file(str(t["dir"] / "adapter" / "adapter_model.safetensors"))
    big = load_file(str(out / "adapter_model.safetensors"))
    assert set(big) == {k for k in small if ".base_layer." not in k}
    cfg, man = t["original"].config, t["manifest"]
    checked = 0
    for layer in range(cfg.num_hidden_layers):
        for proj, (axis, fam) in AXIS.items():
            key = f"base_model.model.{block(layer, proj)}"
            a_s, b_s = small[f"{key}.lora_A.weight"], small[f"{key}.lora_B.weight"]
            a, b = big[f"{key}.lora_A.weight"], big[f"{key}.lora_B.weight"]
            w = t["original"].get_submodule(block(layer, proj)).weight
            assert a.shape == (R, w.shape[1]) and b.shape == (w.shape[0], R)
            assert b_s.abs().min() > 0  # trained: B is non-zero everywhere
            if layer not in man["layers"]:
                assert torch.equal(a, a_s) and torch.equal(b, b_s)
                continue
            keep = kept_indices(cfg, man, layer)[fam]
            delta = b @ a
            if axis == "out":
                drop = [i for i in range(w.shape[0]) if i not in keep]
                assert torch.equal(b[keep], b_s) and torch.equal(a, a_s)
                assert torch.equal(b[drop], torch.zeros(len(drop), R))
                assert torch.equal(delta[drop], torch.zeros(len(drop), w.shape[1]))
                assert delta[keep].abs().sum() > 0
            else:
                drop = [i for i in range(w.shape[1]) if i not in keep]
                assert torch.equal(a[:, keep], a_s) and torch.equal(b, b_s)
                assert torch.equal(a[:, drop], torch.zeros(R, len(drop)))
                assert torch.equal(delta[:, drop], torch.zeros(w.shape[0], len(drop)))
            checked += 1
    assert checked == 7 * len(man["layers"])
    if "lm_head" in t["targets"]:
        assert torch.equal(
            big["base_model.model.lm_head.lora_B.weight"],
            small["base_model.model.lm_head.lora_B.weight"],
        )


def test_norm_a_fills_pruned_columns(trained):
    t = trained
    man, cfg = t["manifest"], t["original"].config
    small = load_file(str(t["dir"] / "adapter" / "adapter_model.safetensors"))
    a1 = recover_state_dict(small, man, cfg, norm_a=True, seed=5)
    a2 = recover_state_dict(small, man, cfg, norm_a=True, seed=5)
    a3 = recover_state_dict(small, man, cfg, norm_a=True, seed=6)
    fills = []
    for layer in man["layers"]:
        for proj in ("o_proj", "down_proj"):
            k = f"base_model.model.{block(layer, proj)}.lora_A.weight"
            keep = kept_indices(cfg, man, layer)[AXIS[proj][1]]
            drop = [i for i in range(a1[k].shape[1]) if i not in keep]
            assert torch.equal(a1[k][:, keep], small[k])
            assert torch.equal(a1[k], a2[k]) and not torch.equal(a1[k], a3[k])
            fills.append(a1[k][:, drop].reshape(-1))
            b = a1[k.replace("lora_A", "lora_B")]
            assert (b @ a1[k])[:, drop].abs().sum() > 0  # ΔW is no longer zero there
    fills = torch.cat(fills)
    assert fills.numel() > 200
    assert 0.65 / R < fills.var().item() < 1.35 / R
    assert abs(fills.mean().item()) < 0.1


def test_recover_rejects_adapter_that_does_not_fit(trained):
    t = trained
    other = prune_structured(
        copy.deepcopy(t["original"]), 0.95, t["manifest"]["layers"], "random", progress=False
    )
    with pytest.raises(
        ValueError, match=r"has shape \(\d+, \d+\) but the pruning manifest implies"
    ):
        recover_adapter(t["dir"] / "adapter", other, t["dir"] / "bad")
    assert not (t["dir"] / "bad").exists()


def test_unrecovered_adapter_does_not_load_on_original(trained):
    t = trained
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(copy.deepcopy(t["original"]), str(t["dir"] / "adapter"))


def test_no_warnings_check_can_fail(tmp_path):
    model = tiny_llama()
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"])
    )
    pm.save_pretrained(tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    sd.pop(sorted(sd)[0])
    save_file(sd, str(tmp_path / "a" / "adapter_model.safetensors"), {"format": "pt"})
    with pytest.raises(AssertionError, match="missing adapter keys"), no_warnings():
        PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"))


def test_sparse_manifest_recovery_is_identity(tmp_path):
    model = tiny_qwen2()
    pm = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PROJ), init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "a")
    man = {
        "format": "loram-pruned/1",
        "method": "unstructured",
        "criterion": "wanda",
        "ratio": 0.55,
        "layers": [1, 2],
    }
    out = recover_adapter(tmp_path / "a", man, tmp_path / "r", base_model_path="some/base")
    a, b = (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "some/base"
    )


# ------------------------------------------------------------------------------ merge


def merged_formula(w0, rec, path):
    """W + (α/r)·B·A of module ``path`` in float64 (exact to ~1e-16), and the bound on
    the rounding of the same merge done in float32, elementwise (``tolerance.merge_bound``)."""
    b = rec[f"base_model.model.{path}.lora_B.weight"]
    a = rec[f"base_model.model.{path}.lora_A.weight"]
    want = w0.detach().double() + (ALPHA / R) * b.double() @ a.double()
    return want, merge_bound(w0, b, a, ALPHA / R)


def test_merge_equals_independent_formula(trained, tmp_path):
    t = trained
    out = recover_adapter(t["dir"] / "adapter", t["dir"] / "pruned", t["dir"] / "rec")
    rec = load_file(str(out / "adapter_model.safetensors"))
    original = t["original"]
    with no_warnings():  # unmerged W x + s·B(A x), in float64
        unmerged = PeftModel.from_pretrained(copy.deepcopy(original).double(), str(out))
    expected_logits = logits(unmerged)
    merged = merge_adapter(copy.deepcopy(original), out)
    assert type(merged) is type(original)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    m_sd, o_sd = merged.state_dict(), original.state_dict()
    assert set(m_sd) == set(o_sd)
    touched = set()
    for key in rec:
        if not key.endswith("lora_A.weight"):
            continue
        path = key[len("base_model.model.") : -len(".lora_A.weight")]
        want, bound = merged_formula(o_sd[path + ".weight"], rec, path)
        assert_within(m_sd[path + ".weight"], want, bound, path)
        touched.add(path + ".weight")
    assert len(touched) == 7 * original.config.num_hidden_layers + ("lm_head" in t["targets"])
    for k in o_sd:
        if k not in touched:
            assert torch.equal(m_sd[k], o_sd[k]), k
    tol = forward_tol(original.config, expected_logits)  # rounding of one float32 forward
    assert_within(logits(merged), expected_logits, tol, "merged vs unmerged logits")


def test_masked_merge_keeps_masked_weights_exact(trained):
    t = trained
    out = recover_adapter(t["dir"] / "adapter", t["manifest"], t["dir"] / "rec")
    rec = load_file(str(out / "adapter_model.safetensors"))
    original = t["original"]
    g = torch.Generator().manual_seed(0)
    paths = [block(1, "q_proj"), block(3, "down_proj"), block(0, "up_proj")]
    masks = {
        p: torch.rand(original.get_submodule(p).weight.shape, generator=g) < 0.5 for p in paths
    }
    merged = merge_adapter(copy.deepcopy(original), out, masks=masks)
    for p in paths:
        w0 = original.get_submodule(p).weight
        w = merged.get_submodule(p).weight
        want, bound = merged_formula(w0, rec, p)
        m = masks[p]
        assert torch.equal(w[~m], w0[~m])
        assert_within(w[m], want[m], bound[m], p)
        assert not torch.equal(w[m], w0[m])
    p = block(2, "k_proj")  # not masked: full merge
    want, bound = merged_formula(original.get_submodule(p).weight, rec, p)
    assert_within(merged.get_submodule(p).weight, want, bound, p)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        merge_adapter(
            copy.deepcopy(original), out, masks={paths[0]: torch.ones(3, 3, dtype=torch.bool)}
        )
    with pytest.raises(KeyError, match="not in the model"):
        merge_adapter(
            copy.deepcopy(original),
            out,
            masks={"model.layers.99.mlp.up_proj": torch.ones(1, dtype=torch.bool)},
        )


def test_merge_to_dir_loads_without_peft(tmp_path):
    original = tiny_llama()
    model = copy.deepcopy(original)
    man = prune_structured(model, 0.5, [1, 2, 3, 4], "random", progress=False)
    pm = train_lora(model, PROJ)
    pm.save_pretrained(tmp_path / "adapter")
    rec = recover_adapter(tmp_path / "adapter", man, tmp_path / "rec")
    original.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    out = merge_to_dir(tmp_path / "base", rec, tmp_path / "merged", "bfloat16")
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged", "rec"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    want = merge_adapter(copy.deepcopy(original), rec).to(torch.bfloat16).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="dtype"):
        merge_to_dir(tmp_path / "base", rec, tmp_path / "m2", "float8")
    save_pruned(pm.unload(), man, tmp_path / "pruned")
    with pytest.raises(ValueError, match="original, unpruned model"):
        merge_to_dir(tmp_path / "pruned", rec, tmp_path / "m3")


def test_live_state_dict_keys_with_adapter_name(trained):
    t = trained
    live = {k: v.detach() for k, v in t["peft"].state_dict().items() if ".lora_" in k}
    assert all(".default." in k for k in live)
    saved = load_file(str(t["dir"] / "adapter" / "adapter_model.safetensors"))
    a = recover_state_dict(live, t["manifest"], t["original"].config)
    b = recover_state_dict(saved, t["manifest"], t["original"].config)
    assert {k.replace(".default.", ".") for k in a} == set(b)
    assert all(torch.equal(v, b[k.replace(".default.", ".")]) for k, v in a.items())
