import copy

import pytest
import torch
from tolerance import assert_within, forward_tol

from loram.models import count_params, load_model, resolve_source, save_model_dir
from loram.tiny import tiny_llama, tiny_qwen2


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_local_dir_round_trip(tmp_path, build):
    model = build()
    save_model_dir(model, None, tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"), with_tokenizer=False)
    assert tok is None
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the reload may pick another attention kernel (sdpa vs eager)
        want = copy.deepcopy(model).double()(x).logits  # reference in float64
        got = loaded(x).logits
    assert_within(got, want, forward_tol(model.config, want), "reloaded model's logits")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
    )
    assert count_params(loaded) == count_params(model)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        ".loram-output.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_resolve_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        resolve_source(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="neither an embedded name"):
        resolve_source(str(tmp_path / "missing" / "dir"))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_source("smollm2-135m").kind == "embedded"


@pytest.mark.slow
def test_embedded_gguf_model_loads_and_generates(tmp_path):
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    save_model_dir(model, tok, tmp_path / "base")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert getattr(again.config, "quantization_config", None) is None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = again.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0][ids.input_ids.shape[1] :])
