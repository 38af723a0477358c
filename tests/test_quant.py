"""QLoRAM: LoRA on an NF4 pruned base; the adapter recovers and merges into the fp32 original."""

import pytest
import torch
from peft import PeftModel, get_peft_model

pytest.importorskip("bitsandbytes")

from loram.config import TrainParams  # noqa: E402
from loram.prune.structured import prune_structured  # noqa: E402
from loram.quant import parameter_bytes, quantize_nf4  # noqa: E402
from loram.recover import recover_adapter  # noqa: E402
from loram.tiny import tiny_llama, tiny_qwen2  # noqa: E402
from loram.train import lora_config  # noqa: E402
from loram.trainloop import train_loop  # noqa: E402


def _linear_bytes_fp32(model) -> int:
    return sum(
        m.weight.numel() * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
        for layer in model.model.layers
        for block in (layer.self_attn, layer.mlp)
        for m in block.children()
        if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_qloram_trains_recovers_and_merges_into_fp32_original(tmp_path, build):
    original = build()
    pruned = build()
    manifest = prune_structured(
        pruned, 0.5, [1, 2, 3, 4], criterion="random", seed=1, progress=False
    )
    fp32_linear = _linear_bytes_fp32(pruned)
    q = quantize_nf4(pruned)
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    assert n4 == 7 * q.config.num_hidden_layers
    for p in q.parameters():
        p.requires_grad_(False)
    peft = get_peft_model(q, lora_config(TrainParams(r=4, alpha=8, dropout=0.0)))
    mem = parameter_bytes(peft)
    # 4-bit weights + constants of the decoder projections: under a quarter of their fp32 bytes.
    assert mem["quantized_bytes"] < fp32_linear / 4
    assert mem["quantized_bytes"] > fp32_linear / 10  # really stored, not dropped

    g = torch.Generator().manual_seed(0)
    ex = [
        {"input_ids": (ids := torch.randint(0, 128, (12,), generator=g).tolist()), "labels": ids}
        for _ in range(8)
    ]
    cfg = TrainParams(
        warmup_steps=0, max_steps=3, lr=5e-2, micro_batch=2, save_every=3, eval_every=3
    )
    hist = train_loop(peft, ex, ex[:2], cfg, tmp_path / "ckpt", pad_id=0)  # eval: no-grad forward
    assert len(hist) == 3 and "val_loss" in hist[-1]
    peft.save_pretrained(tmp_path / "pruned_adapter")
    recover_adapter(tmp_path / "pruned_adapter", manifest, tmp_path / "adapter")

    merged_ref = PeftModel.from_pretrained(build(), tmp_path / "adapter").merge_and_unload()
    assert merged_ref.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32
    # The update really reached the full-precision original, and only on kept rows/columns.
    delta = (
        merged_ref.model.layers[1].mlp.up_proj.weight - original.model.layers[1].mlp.up_proj.weight
    )
    kept = torch.tensor(manifest["structure"]["1"]["mlp_channels"])
    pruned_rows = torch.ones(delta.shape[0], dtype=torch.bool)
    pruned_rows[kept] = False
    assert delta[kept].abs().sum() > 0
    assert torch.all(delta[pruned_rows] == 0)


def test_quantize_releases_the_memory_mapped_weights(tmp_path):
    """After quantize_nf4 no parameter points into the safetensors file the base was loaded
    from (so the mapping, and the file pages of the replaced projections, can go), values
    are unchanged and tied weights stay one parameter."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tiny_llama()
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        mapped = {k: fh.get_tensor(k) for k in fh.keys()}
    model = tiny_llama()
    model.load_state_dict(mapped, strict=False, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    file_ptrs = {t.untyped_storage().data_ptr() for t in mapped.values()}
    assert model.model.norm.weight.untyped_storage().data_ptr() in file_ptrs  # really shared

    q = quantize_nf4(model)
    for name, p in q.named_parameters():
        assert p.untyped_storage().data_ptr() not in file_ptrs, name
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert torch.equal(q.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(q.model.norm.weight, sd["model.norm.weight"])
