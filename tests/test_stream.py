"""Offline stages in bounded memory: the streaming prune / merge paths and the shard I/O give
exactly what the in-memory paths give (tensors bit for bit, config, manifest, masks)."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from loram.merge import merge_to_dir
from loram.models import load_model
from loram.prune.artifact import load_safetensors_dir, save_pruned, structure_digest
from loram.prune.common import pruned_layers
from loram.prune.masks import load_masks, save_masks
from loram.prune.sparse import prune_sparse, sparse_manifest, sparsity_report
from loram.prune.stream import prune_to_dir
from loram.prune.structured import prune_structured
from loram.shards import ShardReader, ShardWriter, parse_size
from loram.tiny import tiny_llama, tiny_qwen2

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD = 20_000  # bytes: the tiny models (about 0.4 MB) are written as many shards + an index


def _same_tensors(a, b):
    sa, sb = load_safetensors_dir(a), load_safetensors_dir(b)
    assert set(sa) == set(sb)
    for k in sb:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _json(d, name):
    return json.loads((d / name).read_text())


@pytest.fixture(params=["llama", "qwen2"])
def base(request, tmp_path):
    """A tiny base model saved in bfloat16 (as the base stage saves a bf16 model)."""
    model = BUILDERS[request.param]().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


# ------------------------------------------------------------------------------ shard I/O


def test_shard_writer_reader_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(30, 20, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "d": torch.randn(3, 3, generator=g).to(torch.float16)[:, 1],  # not contiguous
        "e": torch.zeros(0, 5),
    }
    with ShardWriter(tmp_path, max_shard_bytes=1000) as w:
        for k, t in tensors.items():
            w.add(k, t)
    index = _json(tmp_path, "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    r = ShardReader(tmp_path)
    for k, t in tensors.items():  # the safetensors library reads them back
        with safe_open(str(tmp_path / index["weight_map"][k]), framework="pt") as fh:
            got = fh.get_tensor(k)
        assert got.dtype == t.dtype and torch.equal(got, t)
        assert torch.equal(r.get(k), t) and r.shape(k) == tuple(t.shape)
    with pytest.raises(ValueError, match="written twice"):
        with ShardWriter(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None) as w2:
            w2.add("a", tensors["a"])
            w2.add("a", tensors["a"])
    assert not list((tmp_path / "x").iterdir())  # an aborted writer leaves nothing
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 1024**3
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


def test_single_shard_is_model_safetensors(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.add("x", torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ------------------------------------------------------------------------------ merge


def _adapter(base_dir, tmp_path, lm_head: bool):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = PROJ + (["lm_head"] if lm_head else [])
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    return tmp_path / "adapter"


@pytest.mark.parametrize("dtype", ["auto", "float32", "float16"])
def test_streaming_merge_equals_in_memory(base, tmp_path, dtype):
    tied = _json(base, "config.json").get("tie_word_embeddings")
    adapter = _adapter(base, tmp_path, lm_head=not tied)
    g = torch.Generator().manual_seed(1)
    masks = {
        "model.layers.1.mlp.up_proj": torch.rand(
            ShardReader(base).shape("model.layers.1.mlp.up_proj.weight"), generator=g
        )
        < 0.5
    }
    for m in (None, masks):
        a = merge_to_dir(base, adapter, tmp_path / "s", dtype, masks=m, max_shard_bytes=SHARD)
        b = merge_to_dir(base, adapter, tmp_path / "m", dtype, masks=m, streaming=False)
        assert (a / "model.safetensors.index.json").is_file()
        _same_tensors(a, b)
        for name in ("config.json", "generation_config.json"):
            assert _json(a, name) == _json(b, name), name
        loaded = AutoModelForCausalLM.from_pretrained(a)  # plain transformers, no peft
        assert loaded.dtype == (torch.bfloat16 if dtype == "auto" else getattr(torch, dtype))


def test_streaming_merge_falls_back_for_modules_to_save(base, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["model.norm"])
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.25)
    pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    with caplog.at_level("INFO", logger="loram.merge"):
        a = merge_to_dir(base, tmp_path / "adapter", tmp_path / "s", max_shard_bytes=SHARD)
    assert "merging in memory" in caplog.text
    b = merge_to_dir(base, tmp_path / "adapter", tmp_path / "m", streaming=False)
    _same_tensors(a, b)


# ------------------------------------------------------------------------------ prune


def _calib(vocab=128, n=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        ids = torch.randint(0, vocab, (1, seq), generator=g)
        att = torch.ones(1, seq, dtype=torch.long)
        labels = ids.clone()
        if b == 1:
            att[0, -3:] = 0
            labels[0, -3:] = -100
        out.append({"input_ids": ids, "attention_mask": att, "labels": labels})
    return out


def _in_memory(base_dir, out, method, criterion, ratio, calib, seed=0, round_to=1):
    """What the prune stage did before streaming: load whole, prune in place, save_pruned."""
    model, _ = load_model(str(base_dir), dtype=torch.bfloat16, with_tokenizer=False)
    layers = pruned_layers(model.config.num_hidden_layers)
    if method in ("structured", "random"):
        man = prune_structured(
            model,
            ratio,
            layers,
            criterion=criterion,
            calib_batches=calib,
            seed=seed,
            progress=False,
            round_to=round_to,
        )
        save_pruned(model, man, out)
        return
    pattern = "nm" if method == "semi" else "unstructured"
    masks = prune_sparse(
        model,
        layers,
        pattern=pattern,
        ratio=ratio,
        criterion=criterion,
        calib_batches=calib,
        progress=False,
    )
    man = sparse_manifest(
        model,
        layers,
        pattern=pattern,
        criterion=criterion,
        ratio=ratio,
        sparsity=sparsity_report(model, masks),
    )
    save_pruned(
        model,
        man,
        out,
        extra_files={man["masks_file"]: lambda p: save_masks(p, masks)},
    )


CASES = [
    ("unstructured", "wanda"),
    ("unstructured", "sparsegpt"),
    ("semi", "magnitude"),
    ("semi", "wanda"),
    ("structured", "magnitude"),
    ("structured", "taylor"),
    ("random", "random"),
]


@pytest.mark.parametrize("method,criterion", CASES)
def test_streaming_prune_equals_in_memory(base, tmp_path, method, criterion):
    calib = _calib() if criterion in ("wanda", "sparsegpt", "taylor") else None
    structured = method in ("structured", "random")
    # structured: 0.65 keeps 33 of 96 / 28 of 80 channels, rounded to 32 by round_to 8
    ratio, round_to = (0.65, 8) if structured else (0.5, 1)
    _in_memory(base, tmp_path / "mem", method, criterion, ratio, copy.deepcopy(calib), 4, round_to)
    n_layers = _json(base, "config.json")["num_hidden_layers"]
    res = prune_to_dir(
        base,
        tmp_path / "stream",
        method=method,
        ratio=ratio,
        criterion=criterion,
        layers=pruned_layers(n_layers),
        calib_batches=copy.deepcopy(calib),
        seed=4,
        max_shard_bytes=SHARD,
        progress=False,
        round_to=round_to,
    )
    a, b = tmp_path / "stream", tmp_path / "mem"
    if structured:
        assert res["manifest"]["round_to"] == 8
        assert {len(s["mlp_channels"]) for s in res["manifest"]["structure"].values()} == {32}
    assert (a / "model.safetensors.index.json").is_file()
    _same_tensors(a, b)
    for name in ("config.json", "generation_config.json", "loram_manifest.json"):
        assert _json(a, name) == _json(b, name), name
    assert res["manifest"] == _json(b, "loram_manifest.json")
    assert structure_digest(a) == structure_digest(b)
    if method in ("semi", "unstructured"):
        assert (a / "loram_masks.safetensors").read_bytes() == (
            b / "loram_masks.safetensors"
        ).read_bytes()
        assert load_masks(a / "loram_masks.safetensors")
    from loram.prune.artifact import load_pruned

    model, _ = load_pruned(a)  # the pruned directory loads as before
    assert model.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ helpers


def test_packed_masks_and_streamed_sparsity_equal_the_in_memory_ones(tmp_path):
    from loram.prune.masks import open_masks
    from loram.prune.sparse import mask_sparsity, streamed_sparsity

    model = tiny_llama()
    masks = prune_sparse(model, [1, 2], pattern="nm", criterion="magnitude", progress=False)
    with torch.no_grad():  # a densified position, so pruned_nonzero is not trivially 0
        model.get_submodule("model.layers.1.mlp.up_proj").weight[0, 0] = 1.0
        masks["model.layers.1.mlp.up_proj"][0, 0] = False
    model.save_pretrained(tmp_path / "m")
    save_masks(tmp_path / "masks.safetensors", masks)
    lazy = open_masks(tmp_path / "masks.safetensors")
    assert set(lazy) == set(masks) and len(lazy) == len(masks)
    assert all(torch.equal(lazy[k], masks[k]) for k in masks)
    assert lazy.shape("model.layers.2.self_attn.q_proj") == (64, 64)
    report, vs_mask = streamed_sparsity(tmp_path / "m", lazy)
    assert report == sparsity_report(model, masks)
    assert vs_mask == mask_sparsity(model, masks) and vs_mask["pruned_nonzero"] == 1


def test_masks_file_bytes_are_the_same_every_time(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {f"m{i}": torch.rand(5, 9, generator=g) < 0.5 for i in range(6)}
    blobs = set()
    for i in range(5):
        save_masks(tmp_path / f"{i}.safetensors", masks)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1


def test_bound_heap_sets_the_glibc_threshold():
    import platform

    from loram.shards import bound_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert bound_heap() is True
