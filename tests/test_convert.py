"""Streaming conversion (loram.convert): bit for bit what transformers' from_pretrained gives.

Tiny GGUF files are written here with the ``gguf`` package (quantized Q8_0 / Q4_0 / Q4_1 / F16
tensors, a GPT-2-style tokenizer): a Qwen2 with q/k/v biases and an untied output matrix, and a
Llama with GQA (whose q/k rows llama.cpp permutes) and tied embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from loram import convert
from loram.tiny import _byte_of_symbol


def _tokens() -> tuple[list[str], list[str], list[int]]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    merges = ["Ġ t", "h e", "Ġt he"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*alphabet, "Ġt", "he", "Ġthe", *specials]
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)
    return tokens, merges, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp stores Llama q/k projections in (rotary halves interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path: Path, arch: str, tie: bool, seed: int = 0):
    """A tiny random model of ``arch`` (qwen2 | llama) as a GGUF file; returns the HF model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokens, merges, types = _tokens()
    kw = dict(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    cls, cfg = (
        (Qwen2ForCausalLM, Qwen2Config(**kw))
        if arch == "qwen2"
        else (LlamaForCausalLM, LlamaConfig(**kw))
    )
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    arch_enum = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    qtypes = [
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
    ]
    for i, (hf, p) in enumerate(model.state_dict().items()):
        if tie and hf == "lm_head.weight":
            continue
        base, suffix = hf.rsplit(".", 1)
        gname = names.get_name(base) + "." + suffix
        data = p.numpy().astype(np.float32)
        if arch == "llama" and ".self_attn.q_proj." in hf:
            data = _permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf:
            data = _permute(data, cfg.num_key_value_heads)
        if data.ndim == 1:
            w.add_tensor(gname, data)
        elif i % 5 == 4:
            w.add_tensor(gname, data.astype(np.float16))
        else:
            qt = qtypes[i % 3]
            w.add_tensor(gname, gguf.quantize(data, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def _reference(model: str, gguf_file: str | None, dtype, out: Path) -> None:
    """What loading the whole model with transformers and saving it gives."""
    from loram.models import load_model, save_model_dir

    m, tok = load_model(model, gguf_file, dtype)
    save_model_dir(m, tok, out)


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), f"{k} differs"
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    for c in (ca, cb):
        c.pop("transformers_version", None)
    assert ca == cb
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name


@pytest.mark.parametrize(
    "arch,tie,dtype",
    [
        ("qwen2", False, torch.float32),
        ("qwen2", False, torch.bfloat16),
        ("llama", True, torch.float32),
    ],
)
def test_gguf_streams_bit_identical(tmp_path, arch, tie, dtype):
    from loram.models import load_hf_model

    f = tmp_path / f"{arch}.gguf"
    hf = write_gguf(f, arch, tie)
    ref, out = tmp_path / "ref", tmp_path / "out"
    _reference(str(f), None, dtype, ref)
    res = convert.convert_model(str(f), out, dtype=dtype, shard_bytes=40_000)
    assert res.streamed and len(res.files) > 1 and (out / "model.safetensors.index.json").is_file()
    _assert_same(ref, out)
    # The saved generation config stops at both end tokens; the GGUF names only <|im_end|>.
    tokens = _tokens()[0]
    end = sorted(tokens.index(t) for t in ("<|endoftext|>", "<|im_end|>"))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == end
    m = load_hf_model(out)
    assert m.config.tie_word_embeddings is tie and res.params == sum(
        p.numel() for p in set(m.parameters())
    )
    got = dict(m.named_parameters())
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        want = hf.state_dict()[name]
        err = (got[name].float() - want).abs().max().item()
        assert err < 0.1 * want.abs().max().item(), (name, err)  # q/k rows un-permuted
    ids = torch.tensor([[5, 9, 200, 3]])
    from loram.models import load_model

    gg, _ = load_model(str(f), None, dtype)  # straight from the GGUF: the one id it stores
    assert gg.generation_config.eos_token_id == tokens.index("<|im_end|>")
    if dtype == torch.float32:
        refm = load_hf_model(ref)
        assert torch.equal(m(ids).logits, refm(ids).logits)


def test_index_and_shard_limit(tmp_path):
    f = tmp_path / "q.gguf"
    write_gguf(f, "qwen2", tie=False)
    out = tmp_path / "out"
    convert.convert_model(str(f), out, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as s:
            t = s.get_tensor(name)
        sizes[shard] = sizes.get(shard, 0) + t.numel() * t.element_size()
    assert sum(sizes.values()) == index["metadata"]["total_size"]
    # a shard holds more than the limit only when a single tensor is larger than it
    big = max(t.numel() * t.element_size() for t in _tensors(out).values())
    assert max(sizes.values()) <= max(100_000, big)


def test_safetensors_dir_streams_and_odd_dirs_fall_back(tmp_path):
    f = tmp_path / "q.gguf"
    write_gguf(f, "llama", tie=True)
    src = tmp_path / "src"
    convert.convert_model(str(f), src, shard_bytes=30_000)  # a sharded fp32 directory
    ref, out = tmp_path / "ref", tmp_path / "out"
    _reference(str(src), None, torch.bfloat16, ref)
    res = convert.convert_model(str(src), out, dtype=torch.bfloat16)
    assert res.streamed and res.files == ["model.safetensors"]
    _assert_same(ref, out)
    # A directory whose tensor names are not the model's (here an extra tensor) is loaded whole.
    odd = tmp_path / "odd"
    odd.mkdir()
    for p in src.iterdir():
        (odd / p.name).write_bytes(p.read_bytes())
    from safetensors.torch import save_file

    index = json.loads((odd / "model.safetensors.index.json").read_text())
    save_file({"extra.weight": torch.ones(2)}, str(odd / "extra.safetensors"))
    index["weight_map"]["extra.weight"] = "extra.safetensors"
    (odd / "model.safetensors.index.json").write_text(json.dumps(index))
    res = convert.convert_model(str(odd), tmp_path / "odd-out", dtype=torch.bfloat16)
    assert not res.streamed
    assert sorted(_tensors(tmp_path / "odd-out")) == sorted(_tensors(out))


def test_shard_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="shard_bytes"):
        convert.ShardWriter(tmp_path, 0)
    w = convert.ShardWriter(tmp_path, 100)
    with pytest.raises(ValueError, match="no tensors"):
        w.close()
    w.add("a", torch.zeros(3))
    with pytest.raises(ValueError, match="written twice"):
        w.add("a", torch.zeros(3))


def test_truncated_safetensors_input_is_named(tmp_path):
    f = tmp_path / "q.gguf"
    write_gguf(f, "qwen2", tie=False)
    src = tmp_path / "src"
    convert.convert_model(str(f), src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    from loram.errors import ArtifactError

    with pytest.raises(ArtifactError, match="model.safetensors is not a valid safetensors file"):
        convert.convert_model(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_embedded_smollm2_streams_bit_identical(tmp_path):
    """The embedded SmolLM2 (Llama, tied, Q4_1 GGUF): the streamed conversion equals
    transformers' from_pretrained(gguf_file=...) + save_pretrained, tensor for tensor."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    _reference("smollm2-135m", None, torch.float32, ref)
    res = convert.convert_model("smollm2-135m", out, dtype=torch.float32)
    assert res.streamed
    _assert_same(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_installed_qwen_streams_bit_identical(tmp_path, name):
    """The real Qwen2.5-Coder GGUFs (Q4_K_M / Q6_K, untied output matrix), when installed:
    streamed conversion == from_pretrained(gguf_file=...) + save_pretrained, in bfloat16.
    Never downloads (skipped when not installed); the 1.5B needs ~8 GB of RAM."""
    from loram import install

    if install.installed_path(install.MODELS[name]) is None:
        pytest.skip(f"{name} is not installed (`loram install {name}`)")
    ref, out = tmp_path / "ref", tmp_path / "out"
    _reference(name, None, torch.bfloat16, ref)
    res = convert.convert_model(name, out, dtype=torch.bfloat16)
    assert res.streamed and not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    _assert_same(ref, out)


@pytest.mark.slow  # two fresh processes that import torch and transformers: ~15-35 s
def test_base_convert_benchmark_on_a_tiny_gguf(tmp_path):
    """benchmarks/base_convert.py: both modes in fresh processes, the outputs bit-identical."""
    import subprocess
    import sys

    f = tmp_path / "q.gguf"
    write_gguf(f, "qwen2", tie=False)
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "base_convert.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--model", str(f), "--dtype", "float32", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensors bit-identical between the two: True" in proc.stdout
    res = json.loads(out.read_text())
    assert [m["mode"] for m in res["modes"]] == ["stream", "memory"]
    assert [m["streamed"] for m in res["modes"]] == [True, False]
    assert all(
        m["peak_rss_mib"] > 0 and m["params"] == res["modes"][0]["params"] for m in res["modes"]
    )
