"""The pruned-model directory: save, reload from the directory alone, strict checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loram.prune.artifact import MANIFEST_NAME, load_pruned, read_manifest, save_pruned
from loram.prune.structured import ManifestError, prune_structured
from loram.tiny import tiny_llama, tiny_qwen2


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def pruned_dir(tmp_path):
    model = tiny_qwen2()  # tied embeddings and q/k/v biases
    man = prune_structured(model, 0.5, [1, 2, 3, 4], "random", seed=1, progress=False)
    save_pruned(model, man, tmp_path / "pruned")
    return tmp_path / "pruned", model, man


def test_round_trip_same_logits(tiny_model, tmp_path):
    cfg = tiny_model.config.to_dict()
    man = prune_structured(tiny_model, 0.65, [1, 2], "magnitude", progress=False)
    out = save_pruned(tiny_model, man, tmp_path / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temp dirs left behind

    stored = load_file(str(out / "model.safetensors"))
    for name, t in tiny_model.state_dict().items():
        if name in stored:
            assert stored[name].shape == t.shape
    assert stored["model.layers.1.mlp.up_proj.weight"].shape[0] < cfg["intermediate_size"]
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk["intermediate_size"] == cfg["intermediate_size"]
    assert on_disk["num_key_value_heads"] == cfg["num_key_value_heads"]

    loaded, man2 = load_pruned(out)
    assert man2 == man
    loaded.set_attn_implementation("eager")
    for name, t in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert torch.equal(logits(loaded, IDS), logits(tiny_model, IDS))
    if cfg["tie_word_embeddings"]:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    else:
        assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_load_dtype_and_overwrite(pruned_dir):
    d, model, man = pruned_dir
    half, _ = load_pruned(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # Saving again over an existing directory replaces it atomically.
    save_pruned(model, man, d)
    assert (d / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in d.parent.iterdir()) == ["pruned"]


def test_save_refuses_unpruned_model_with_structured_manifest(pruned_dir, tmp_path):
    _, _, man = pruned_dir
    with pytest.raises(ValueError, match="not pruned as the manifest says"):
        save_pruned(tiny_qwen2(), man, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _rewrite(d, edit):
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), {"format": "pt"})


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: sd.pop("model.layers.2.mlp.gate_proj.weight"),
            r"missing.*model\.layers\.2\.mlp\.gate_proj\.weight",
        ),
        (lambda sd: sd.update(extra=torch.zeros(2)), "unexpected.*extra"),
        (
            lambda sd: sd.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 64)}),
            r"model\.layers\.1\.self_attn\.k_proj\.weight has shape \(32, 64\) in the file .* expects \(16, 64\)",
        ),
        (lambda sd: sd.pop("model.embed_tokens.weight"), "missing.*embed_tokens"),
    ],
)
def test_load_is_strict(pruned_dir, edit, match):
    d, _, _ = pruned_dir
    _rewrite(d, edit)
    with pytest.raises(ValueError, match=match):
        load_pruned(d)


def test_manifest_that_does_not_fit_is_an_error(pruned_dir):
    d, _, man = pruned_dir
    bad = dict(
        man,
        layers=[1, 2, 3, 4, 6],
        structure=dict(man["structure"], **{"6": man["structure"]["1"]}),
    )
    (d / MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(
        ManifestError, match=r"layers \[6\] are out of range for a model with 6 layers"
    ):
        load_pruned(d)
    geom = dict(man["geometry"], intermediate_size=96)
    (d / MANIFEST_NAME).write_text(json.dumps(dict(man, geometry=geom)))
    with pytest.raises(
        ManifestError, match="intermediate_size is 96 in the manifest but 80 in the model config"
    ):
        load_pruned(d)


def test_corrupt_or_missing_manifest(pruned_dir, tmp_path):
    d, _, _ = pruned_dir
    (d / MANIFEST_NAME).write_text('{"format": "loram-pruned/1", ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(d)
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_pruned(d)
    (d / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must be a JSON object"):
        read_manifest(d)
    (d / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="loram_manifest.json"):
        load_pruned(d)


def test_sparse_manifest_loads_without_resizing(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[:, ::2] = 0  # stand-in for a sparse method
    man = {
        "format": "loram-pruned/1",
        "method": "semi",
        "criterion": "wanda",
        "ratio": 0.5,
        "layers": [1, 2, 3, 4],
        "model_type": "llama",
        "geometry": {
            "hidden_size": 64,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 96,
            "num_hidden_layers": 6,
        },
    }
    save_pruned(model, man, tmp_path / "s")
    loaded, man2 = load_pruned(tmp_path / "s")
    loaded.set_attn_implementation("eager")
    assert man2["method"] == "semi"
    assert loaded.model.layers[2].mlp.up_proj.weight.shape == (96, 64)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_tokenizer_is_saved(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    model = tiny_llama()
    man = prune_structured(model, 0.3, [1], "random", progress=False)
    save_pruned(model, man, tmp_path / "t", tokenizer=tok)
    assert AutoTokenizer.from_pretrained(tmp_path / "t")("a b")["input_ids"] == [1, 2]
