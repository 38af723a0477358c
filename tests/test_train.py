import pytest
import torch
from peft import get_peft_model

from loram.config import AlignParams, TrainParams
from loram.tiny import tiny_llama, tiny_qwen2
from loram.train import lora_config
from loram.trainloop import batch_indices, train_loop


def _examples(n=12, length=10, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def _lora_model(build=tiny_llama):
    m = build()
    for p in m.parameters():
        p.requires_grad_(False)
    return get_peft_model(m, lora_config(TrainParams(r=4, alpha=8, dropout=0.1)))


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(10, s, 2, 2, seed=1) for s in range(6)]
    b = [batch_indices(10, s, 2, 2, seed=1) for s in range(6)]
    assert a == b
    flat = [i for step in a[:2] for mb in step for i in mb]
    assert sorted(flat[:8]) == sorted(set(flat[:8]))  # no repeats within an epoch


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_interrupted_training_resumes_to_identical_weights(tmp_path, build):
    cfg = TrainParams(
        max_steps=6,
        lr=1e-2,
        warmup_steps=1,
        micro_batch=2,
        grad_accum=2,
        save_every=3,
        eval_every=3,
    )
    ex, val = _examples(), _examples(4, seed=1)

    ref = _lora_model(build)
    hist_ref = train_loop(ref, ex, val, cfg, tmp_path / "ref", pad_id=0)

    crashed = _lora_model(build)
    calls = {"n": 0}

    def crash():
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_loop(crashed, ex, val, cfg, tmp_path / "run", pad_id=0, after_step=crash)
    resumed = _lora_model(build)  # a fresh process: weights come from the checkpoint only
    hist = train_loop(resumed, ex, val, cfg, tmp_path / "run", pad_id=0)

    a, b = _trainable(ref), _trainable(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [h["step"] for h in hist] == list(range(1, 7))
    assert [round(h["loss"], 5) for h in hist] == [round(h["loss"], 5) for h in hist_ref]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_changed_settings_do_not_resume(tmp_path):
    ex = _examples()
    cfg = TrainParams(
        warmup_steps=0, max_steps=2, lr=1e-2, micro_batch=2, save_every=1, eval_every=1
    )
    train_loop(_lora_model(), ex, [], cfg, tmp_path, pad_id=0)
    cfg2 = TrainParams(
        warmup_steps=0, max_steps=2, lr=5e-3, micro_batch=2, save_every=1, eval_every=1
    )
    hist = train_loop(_lora_model(), ex, [], cfg2, tmp_path, pad_id=0)
    assert [h["step"] for h in hist] == [1, 2]  # started afresh


def test_weights_digest_samples_large_tensors_exactly():
    from loram.trainloop import weights_digest

    big = torch.nn.Linear(28311552 // 4096, 4096, bias=False)  # float32 linspace would overflow
    d1 = weights_digest(big)
    with torch.no_grad():
        big.weight.view(-1)[-1] += 1.0  # the last element is always sampled
    assert weights_digest(big) != d1


def test_other_start_weights_or_data_do_not_resume(tmp_path):
    """A re-pruned / re-aligned base (same shapes, other values) or other data starts afresh."""
    ex = _examples()
    cfg = TrainParams(
        warmup_steps=0, max_steps=2, lr=1e-2, micro_batch=2, save_every=1, eval_every=1
    )
    first = _lora_model()
    train_loop(first, ex, [], cfg, tmp_path, pad_id=0)
    trained = _trainable(first)

    other = _lora_model()
    with torch.no_grad():  # one base weight changed, everything else identical
        other.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight[0, 0] += 1.0
    hist = train_loop(other, ex, [], cfg, tmp_path, pad_id=0)
    assert [h["step"] for h in hist] == [1, 2]

    hist = train_loop(_lora_model(), _examples(seed=5), [], cfg, tmp_path, pad_id=0)
    assert [h["step"] for h in hist] == [1, 2]

    # the same start and data still resume (finished: nothing re-run, the weights come back)
    train_loop(_lora_model(), ex, [], cfg, tmp_path / "again", pad_id=0)
    same = _lora_model()
    hist = train_loop(same, ex, [], cfg, tmp_path / "again", pad_id=0)
    assert [h["step"] for h in hist] == [1, 2]
    for k, v in _trainable(same).items():
        assert torch.equal(v, trained[k]), k


def test_align_keeps_sparsity_masks_exact(tmp_path):
    from loram.prune.sparse import prune_sparse
    from loram.train import align_model

    model = tiny_llama()
    masks = prune_sparse(
        model, [1, 2], pattern="nm", n=2, m=4, criterion="magnitude", progress=False
    )

    class Tok:
        eos_token_id = 1
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + (ord(c) % 120) for c in text]}

    texts = ["the quick brown fox jumps over the lazy dog " * 4] * 8
    p = AlignParams(
        max_steps=3,
        lr=1e-2,
        warmup_steps=0,
        micro_batch=2,
        seq_len=16,
        max_val_blocks=2,
        save_every=10,
    )
    before = {n: w.detach().clone() for n, w in model.named_parameters()}
    res = align_model(model, Tok(), texts, p, tmp_path, masks=masks)
    changed = 0
    for path, mask in masks.items():
        w = model.get_submodule(path).weight
        assert torch.all(w[~mask] == 0), path
        changed += int(not torch.equal(w, before[path + ".weight"]))
    assert changed == len(masks)
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert res["val_loss_after"] < res["val_loss_before"]
