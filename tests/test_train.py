import sys

import pytest
import torch
from peft import get_peft_model
from tolerance import assert_within, forward_tol

from loram.config import AlignParams, TrainParams
from loram.data import collate
from loram.loss import batch_loss, evaluate_loss
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


# ---------------------------------------------------------------------- training-cost options
# The chunked loss (train.loss_chunk), activation checkpointing (train.grad_checkpointing) and
# the attention implementation change how the loss and its gradients are computed, never what
# they are: each is compared with the stock computation in float64, where the only difference
# is rounding (tolerances from tests/tolerance.py: forward_tol, paths=2).


def _ragged_batch(vocab=128, seed=0):
    """Three rows of different lengths (right padding) with unlabelled prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((13, 4), (9, 2), (16, 6)):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate(rows, pad_id=0), rows


def _model(build, mode, tie, vocab=128, dropout=0.0):
    """A float64 model: ``plain`` (every weight but lm_head trainable, as alignment), ``lora``
    (peft LoRA on the projections) or ``lora_head`` (also on lm_head, train.lm_head)."""
    m = build(vocab=vocab, tie=tie).double()
    if mode == "plain":
        for n, p in m.named_parameters():
            p.requires_grad_(not n.startswith("lm_head") and "embed_tokens" not in n)
        return m
    for p in m.parameters():
        p.requires_grad_(False)
    cfg = TrainParams(r=4, alpha=8, dropout=dropout, lm_head=mode == "lora_head")
    pm = get_peft_model(m, lora_config(cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at 0: make every LoRA branch contribute
        for p in pm.parameters():
            if p.requires_grad:
                p.data = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1).to(p)
    return pm


def _loss_and_grads(model, batch, chunk, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, n = batch_loss(model, batch, "cpu", chunk, **kw)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["plain", "lora", "lora_head"])
def test_chunked_loss_equals_stock_loss_and_gradients(build, tie, mode):
    batch, _ = _ragged_batch()
    model = _model(build, mode, tie)
    ref, n_ref, g_ref = _loss_and_grads(model, batch, 0)
    cfg = (model.get_base_model() if mode != "plain" else model).config
    assert n_ref == (batch["labels"][:, 1:] != -100).sum()
    for chunk in (1, 5, 64):  # one token, a remainder, all in one chunk
        loss, n, grads = _loss_and_grads(model, batch, chunk)
        assert n == n_ref
        # a sum of n per-token losses, each off by at most ~2 x the logits' error
        assert_within(loss, ref, n * 2 * forward_tol(cfg, ref / n, torch.float64, 2), "loss")
        assert grads.keys() == g_ref.keys() and g_ref
        for k, g in g_ref.items():
            assert_within(grads[k], g, forward_tol(cfg, g, torch.float64, 2), k)
    if mode == "lora_head":  # the head's LoRA matrices get a gradient: the wrapped module ran
        assert any("lm_head.lora_A" in k for k in g_ref)


def test_chunked_loss_uses_the_lora_wrapped_head():
    """With train.lm_head the loss goes through the head's LoRA branch, not the raw weight."""
    batch, _ = _ragged_batch()
    model = _model(tiny_llama, "lora_head", False)
    with_lora = batch_loss(model, batch, "cpu", 4)[0]
    with model.disable_adapter():
        without = batch_loss(model, batch, "cpu", 4)[0]
    head = model.get_base_model().lm_head
    with torch.no_grad():
        head.lora_B["default"].weight.zero_()
    only_body = batch_loss(model, batch, "cpu", 4)[0]
    assert abs(with_lora - only_body) > 1e-3 and abs(only_body - without) > 1e-3


def test_chunk_recomputation_replays_lora_dropout_on_the_head():
    """Checkpointed chunks recompute their logits in the backward pass with the same dropout
    masks: the gradients equal those of the chunks kept in memory (same RNG stream)."""
    batch, _ = _ragged_batch()
    model = _model(tiny_qwen2, "lora_head", True, dropout=0.5)
    cfg = model.get_base_model().config
    ref, _, g_ref = _loss_and_grads(model, batch, 4, use_checkpoint=False)
    loss, _, grads = _loss_and_grads(model, batch, 4, use_checkpoint=True)
    assert_within(loss, ref, forward_tol(cfg, ref, torch.float64, 2), "loss")
    for k, g in g_ref.items():
        assert_within(grads[k], g, forward_tol(cfg, g, torch.float64, 2), k)


def test_chunked_loss_never_holds_the_full_logits():
    """No tensor of the forward or backward pass holds more than one chunk of vocabulary
    scores (the stock loss makes several of batch x seq x vocab)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, chunk = 2048, 5

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = 0  # most rows of any tensor whose last dimension is the vocabulary

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                # (the head's weight, transposed for its matmul, is (hidden, vocab): not scores)
                weight_t = isinstance(t, torch.Tensor) and t.shape == (64, vocab)
                if isinstance(t, torch.Tensor) and t.shape[-1:] == (vocab,) and not weight_t:
                    self.rows = max(self.rows, t.numel() // vocab)
            return out

    batch, _ = _ragged_batch(vocab=vocab)
    tokens = batch["input_ids"].numel()
    for c, bound in ((0, None), (chunk, chunk)):
        model = _model(tiny_llama, "lora", False, vocab=vocab)
        with Largest() as seen:
            loss, _ = batch_loss(model, batch, "cpu", c)
            loss.backward()
        if bound is None:
            assert seen.rows == tokens  # the stock loss: every position's logits
        else:
            assert seen.rows <= bound


@pytest.mark.parametrize("chunk", [0, 3])
def test_evaluate_loss_is_the_same_with_chunks(chunk):
    _, rows = _ragged_batch()
    model = _model(tiny_llama, "lora", False)
    ref = evaluate_loss(model, rows, 2, pad_id=0, chunk=0)
    got = evaluate_loss(model, rows, 2, pad_id=0, chunk=chunk)
    cfg = model.get_base_model().config
    assert abs(got - ref) <= 2 * forward_tol(cfg, torch.tensor(ref), torch.float64, 2)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["plain", "lora"])
def test_fused_loss_equals_recomputed_chunks(build, tie, mode, monkeypatch):
    """train.loss_fused: a frozen plain lm_head takes each chunk's gradient in the forward
    pass. Loss and gradients equal the checkpointed chunks' (and so the stock loss's, above) up
    to rounding, and the fused path is the one that ran (its Function is called once per loss,
    never with loss_fused off)."""
    import loram.loss as L

    calls = []
    real = L._FusedHeadCE.apply
    monkeypatch.setattr(L._FusedHeadCE, "apply", lambda *a: calls.append(1) or real(*a))
    batch, _ = _ragged_batch()
    model = _model(build, mode, tie)
    cfg = (model.get_base_model() if mode != "plain" else model).config
    for chunk in (1, 5, 64):
        ref, n, g_ref = _loss_and_grads(model, batch, chunk, fused=False)
        assert not calls
        loss, n2, grads = _loss_and_grads(model, batch, chunk, fused=True)
        assert calls == [1] and n2 == n
        calls.clear()
        assert_within(loss, ref, n * 2 * forward_tol(cfg, ref / n, torch.float64, 2), "loss")
        assert grads.keys() == g_ref.keys() and g_ref
        for k, g in g_ref.items():
            assert_within(grads[k], g, forward_tol(cfg, g, torch.float64, 2), k)


def test_fused_loss_projects_onto_the_vocabulary_only_in_the_forward_pass():
    """Fused, the backward pass runs no vocabulary projection (no recomputed logits); unfused,
    it recomputes every chunk's. A trained head (LoRA on lm_head) is never fused."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from loram.loss import _fusable

    vocab = 2048

    class VocabMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "matmul") and out.shape[-1:] == (vocab,):
                self.n += 1
            return out

    batch, _ = _ragged_batch(vocab=vocab)
    for fused, expected in ((True, 0), (False, None)):
        model = _model(tiny_llama, "lora", False, vocab=vocab)
        loss, _ = batch_loss(model, batch, "cpu", 5, fused=fused)
        with VocabMatmuls() as seen:
            loss.backward()
        if expected is None:
            assert seen.n > 0  # the recomputed chunks
        else:
            assert seen.n == expected
    assert _fusable(_model(tiny_llama, "lora", True).get_base_model().lm_head)
    assert not _fusable(_model(tiny_llama, "lora_head", False).get_base_model().lm_head)


def test_negative_loss_chunk_is_refused():
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainParams(loss_chunk=-1)
    batch, _ = _ragged_batch()
    with pytest.raises(ValueError, match="chunk"):
        batch_loss(tiny_llama(), batch, "cpu", -3)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("mode", ["plain", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(build, mode):
    """Activation checkpointing (non-reentrant, no enable_input_require_grads) under a frozen
    peft base and full-rank training: same loss and gradients, LoRA dropout replayed."""
    from loram.train import grad_checkpointing_on, setup_training

    batch, _ = _ragged_batch()
    grads = []
    for ckpt in (False, True):
        model = _model(build, mode, False, dropout=0.3)
        setup_training(model, TrainParams(grad_checkpointing=ckpt, attn_implementation="eager"))
        assert grad_checkpointing_on(model) == ckpt
        grads.append(_loss_and_grads(model, batch, 0))
    cfg = (model if mode == "plain" else model.get_base_model()).config
    (l0, _, g0), (l1, _, g1) = grads
    assert_within(l1, l0, forward_tol(cfg, l0, torch.float64, 2), "loss")
    assert g0.keys() == g1.keys() and g0
    for k, g in g0.items():
        assert_within(g1[k], g, forward_tol(cfg, g, torch.float64, 2), k)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_setup_training_runs_the_attention_it_asks_for(impl, monkeypatch):
    """Which kernel actually runs: count calls of torch's scaled_dot_product_attention."""
    from loram.train import attn_implementation, setup_training

    calls = {"n": 0}
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model = _model(tiny_llama, "lora", False)  # built with eager (loram.tiny)
    setup_training(model, TrainParams(attn_implementation=impl, grad_checkpointing=True))
    assert attn_implementation(model) == impl
    batch, _ = _ragged_batch()
    model.train()
    batch_loss(model, batch, "cpu", 4)[0].backward()
    layers = model.get_base_model().config.num_hidden_layers
    # with grad checkpointing each layer also runs again in the backward pass
    assert calls["n"] == (2 * layers if impl == "sdpa" else 0)


@pytest.mark.parametrize("mode", ["plain", "lora_head"])
def test_chunked_loss_runs_through_a_ddp_wrapper(tmp_path, mode):
    """Under DDP (a 1-rank gloo group) the chunked loss is the wrapped model's forward: the same
    loss and gradients as the stock loss, no more than one chunk of logits, and the model's
    own forward is back afterwards (also an instance forward set before, as accelerate's
    mixed-precision wrapper is)."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    batch, _ = _ragged_batch()
    model = _model(tiny_qwen2, mode, False)
    cfg = (model.get_base_model() if mode != "plain" else model).config
    ref, _, g_ref = _loss_and_grads(model, batch, 0)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        inner = model.get_base_model() if mode != "plain" else model
        marker = inner.forward  # an instance attribute, as accelerate's autocast wrapper sets
        inner.forward = marker
        head = inner.get_output_embeddings()
        rows = []
        hook = head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
        model.zero_grad(set_to_none=True)
        loss, n = batch_loss(ddp, batch, "cpu", 5)
        loss.backward()
        hook.remove()
        assert rows and max(rows) <= 5 and sum(rows) >= n  # (the backward recomputes chunks)
        assert inner.__dict__["forward"] is marker
        assert_within(
            loss.detach(), ref, n * 2 * forward_tol(cfg, ref / n, torch.float64, 2), "loss"
        )
        grads = {
            k.removeprefix("module."): p.grad for k, p in ddp.named_parameters() if p.requires_grad
        }
        for k, g in g_ref.items():
            assert_within(grads[k], g, forward_tol(cfg, g, torch.float64, 2), k)
        # the hook above kept the chunks recomputed; without it the frozen head is fused
        model.zero_grad(set_to_none=True)
        loss, n = batch_loss(ddp, batch, "cpu", 5)
        loss.backward()
        assert_within(
            loss.detach(), ref, n * 2 * forward_tol(cfg, ref / n, torch.float64, 2), "fused loss"
        )
        for k, g in g_ref.items():
            p = dict(ddp.named_parameters())["module." + k]
            assert_within(p.grad, g, forward_tol(cfg, g, torch.float64, 2), k)
        del inner.forward
        batch_loss(ddp, batch, "cpu", 5)
        assert "forward" not in inner.__dict__
    finally:
        tdist.destroy_process_group()


# ---------------------------------------------------------------------- packing (train.packing)


def test_pack_rows_is_first_fit_decreasing():
    from loram.data import pack_rows

    assert pack_rows([5, 9, 3, 7, 1], 10) == [[1, 4], [3, 2], [0]]
    assert pack_rows([12, 2], 10) == [[0], [1]]  # longer than a row: a row of its own
    rows = pack_rows([4] * 6, 8)
    assert rows == [[0, 1], [2, 3], [4, 5]]


def test_collate_packed_layout():
    """Every token once, positions restarting per example, the first token of each example
    unlabelled, rows padded with a label-less sequence of their own."""
    from loram.data import collate_packed

    _, rows = _ragged_batch()  # lengths 13, 9, 16
    b = collate_packed(rows, pad_id=0, capacity=24)
    assert set(b) == {"input_ids", "labels", "position_ids"}
    assert b["input_ids"].shape == (2, 22)  # [16], [13 + 9]: first-fit decreasing
    assert b["position_ids"][0].tolist() == list(range(16)) + list(range(6))
    assert b["position_ids"][1].tolist() == list(range(13)) + list(range(9))
    assert b["input_ids"][1].tolist() == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert b["labels"][1, 13] == -100 and b["labels"][1, 14:].tolist() == rows[1]["labels"][1:]
    assert (b["labels"][0, 16:] == -100).all() and (b["input_ids"][0, 16:] == 0).all()
    scored = int((b["labels"] != -100).sum())
    assert scored == sum(sum(1 for v in r["labels"][1:] if v != -100) for r in rows)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_packed_batch_has_the_padded_batch_loss_and_gradients(build, attn, chunk):
    """No token attends across examples: the packed batch is the padded one up to rounding
    (in float64), whatever the attention implementation and the loss."""
    from loram.data import collate_packed
    from loram.train import set_attn_implementation

    padded, rows = _ragged_batch()
    model = _model(build, "lora", False)
    set_attn_implementation(model, attn)
    cfg = model.get_base_model().config
    # transformers' eager attention takes its softmax in float32 whatever the model's dtype, so
    # the eager rows are float32-accurate: the rounding of a softmax row depends on how its sum
    # is split into vector lanes (on an AVX2 CPU at one thread the packed and padded gradients
    # differ by 3e-6; float64 precision would be 1e-12).
    dt = torch.float32 if attn == "eager" else torch.float64
    ref, n_ref, g_ref = _loss_and_grads(model, padded, chunk)
    for capacity in (16, 29, 64):  # nothing shared, two in one row, all three in one row
        packed = collate_packed(rows, pad_id=0, capacity=capacity)
        loss, n, grads = _loss_and_grads(model, packed, chunk)
        assert n == n_ref
        assert_within(loss, ref, n * 2 * forward_tol(cfg, ref / n, dt, 2), "loss")
        for k, g in g_ref.items():
            assert_within(grads[k], g, forward_tol(cfg, g, dt, 2), k)
    # attention does cross examples when the positions do not restart: the check can fail
    leaky = collate_packed(rows, pad_id=0, capacity=64)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).unsqueeze(0)
    loss, _, _ = _loss_and_grads(model, leaky, chunk)
    assert abs(loss - ref) > 1e-3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_reset_peak_rss_starts_a_new_window():
    """The training window's peak excludes what was resident only before it (the load)."""
    from loram.train import peak_rss_mib, reset_peak_rss

    big = torch.ones(96 * 2**20 // 4)  # 96 MiB, touched
    before = peak_rss_mib()
    del big
    assert reset_peak_rss()
    after = peak_rss_mib()
    assert after <= before - 64  # the freed 96 MiB left the peak (allocator slack aside)
    small = torch.ones(16 * 2**20 // 4)
    assert peak_rss_mib() >= after + 8 and small.sum() > 0  # the new window tracks new peaks


_HEAP_PROBE = r"""
import ctypes, json, sys
import torch
from loram.config import TrainParams
from loram.train import bound_training_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
# block_cache off: glibc's own threshold is what this checks (the cache maps for itself)
applied = bound_training_heap(TrainParams(heap_mmap_threshold=int(sys.argv[1]), block_cache=False))
big = torch.empty(16 << 20, dtype=torch.uint8)  # mapped, then freed: glibc's dynamic threshold
del big                                         # rises to 16 MiB (unless it is fixed)
before = libc.mallinfo2().hblkhd
t = torch.ones(4 << 20, dtype=torch.uint8)      # 4 MiB: the size of an activation
print(json.dumps({"applied": applied, "mapped": libc.mallinfo2().hblkhd - before}))
"""


def test_heap_mmap_threshold_maps_activation_sized_tensors():
    """train.heap_mmap_threshold fixes glibc's mmap threshold: an activation-sized tensor gets a
    map of its own (returned to the system when freed). With 0, glibc's dynamic threshold has
    risen past it after a larger tensor was freed, and the tensor comes from the heap."""
    import ctypes
    import json
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")

    def probe(threshold):
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, str(threshold)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    fixed, dynamic = probe(131072), probe(0)
    assert fixed["applied"] and fixed["mapped"] >= 4 << 20
    assert not dynamic["applied"] and dynamic["mapped"] == 0


# ---------------------------------------------------------------------- train.dropout_rng


def _keep_bounds(n: int, q: float) -> tuple[float, float]:
    """Six binomial standard deviations around the keep rate ``q`` of ``n`` elements (the
    tests are seeded, so this only has to hold for the seeds used)."""
    sd = (q * (1 - q) / n) ** 0.5
    return q - 6 * sd, q + 6 * sd


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_packed_dropout_keeps_each_lane_at_the_rate_and_is_unbiased(p):
    """Every element of every 16-bit lane of a draw is kept at round((1-p) 2^16) / 2^16, kept
    values are scaled by its inverse (exact expectation) and dropped ones are 0."""
    from loram.train import PackedDropout

    d = PackedDropout(p).train()
    q = d.keep / 65536
    assert abs(q - (1 - p)) <= 2**-17
    x = torch.rand(1001, 400) + 0.5  # no zeros: kept <=> nonzero; odd size: a partial last draw
    torch.manual_seed(0)
    y = d(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (65536.0 / d.keep))
    flat = kept.flatten()
    for lane in range(4):  # the four 16-bit parts of each 64-bit draw
        part = flat[lane::4]
        lo, hi = _keep_bounds(part.numel(), q)
        assert lo <= part.float().mean() <= hi, lane
    torch.manual_seed(0)
    assert torch.equal(d(x), y)  # the global generator: seeded runs repeat
    assert not torch.equal(d(x), y)  # and the next draw differs
    assert torch.equal(d.eval()(x), x)


def test_packed_dropout_gradient_is_the_mask_and_replays_under_checkpoint():
    from torch.utils.checkpoint import checkpoint

    from loram.train import PackedDropout

    d = PackedDropout(0.3).train()
    lin = torch.nn.Linear(16, 8).double()
    x = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)

    def f(t):
        return lin(d(t)).square().sum()

    torch.manual_seed(3)
    f(x).backward()
    ref = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    checkpoint(f, x, use_reentrant=False).backward()  # recomputed forward: same mask
    assert torch.equal(x.grad, ref)
    torch.manual_seed(3)
    mask = d(torch.ones(64, 16, dtype=torch.float64)) != 0
    x.grad = None
    y = d.eval()(x)
    assert torch.equal(y, x)
    d.train()
    torch.manual_seed(3)
    d(x).sum().backward()
    assert torch.equal(x.grad, mask.double() * (65536.0 / d.keep))


def test_dropout_rng_packed_replaces_every_lora_dropout():
    from loram.train import PackedDropout, prepare_lora_model

    for rng, cls in (("torch", torch.nn.Dropout), ("packed", PackedDropout)):
        p = TrainParams(r=4, alpha=8, dropout=0.1, dropout_rng=rng)
        pm = prepare_lora_model(tiny_llama(), p, "cpu")
        drops = [
            d for m in pm.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()
        ]
        assert drops and all(type(d) is cls and d.p == 0.1 for d in drops)


def test_optimizer_choice_maps_to_torch_adamw_arguments():
    from loram.trainloop import adamw_impl

    assert adamw_impl("auto", "cpu", sharded=False) == {"fused": True}
    assert adamw_impl("auto", torch.device("cuda", 0), sharded=False) == {"fused": True}
    assert adamw_impl("auto", "cuda", sharded=True) == {}  # FSDP shards: torch's default
    assert adamw_impl("auto", "mps", sharded=False) == {}
    assert adamw_impl("fused", "cpu", sharded=True) == {"fused": True}  # asked for: as asked
    assert adamw_impl("foreach", "cpu", sharded=False) == {"foreach": True}
    assert adamw_impl("for_loop", "cpu", sharded=False) == {"foreach": False}


@pytest.mark.parametrize("choice", ["fused", "foreach", "for_loop"])
def test_every_optimizer_choice_takes_the_adamw_step(choice):
    """One float64 step of each implementation against AdamW written out (bias-corrected
    moments, decoupled weight decay): equal up to float64 rounding of a dozen operations."""
    from loram.trainloop import adamw_impl

    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.999), 1e-8
    ref, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    for t, gr in enumerate(grads, 1):
        ref = ref * (1 - lr * wd)
        m = b1 * m + (1 - b1) * gr
        v = b2 * v + (1 - b2) * gr * gr
        ref = ref - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    prm = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([prm], lr=lr, weight_decay=wd, **adamw_impl(choice, "cpu", False))
    for gr in grads:
        prm.grad = gr.clone()
        opt.step()
    # each step moves a weight by about lr; a dozen float64 operations per step
    assert (prm.detach() - ref).abs().max() <= 64 * torch.finfo(torch.float64).eps


def test_fused_and_loop_optimizers_train_the_same_weights(tmp_path, monkeypatch):
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            made.append(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    ex, lr = _examples(), 1e-2
    runs = {}
    for choice in ("auto", "for_loop"):
        cfg = TrainParams(
            warmup_steps=0, max_steps=3, lr=lr, micro_batch=2, save_every=3, eval_every=3,
            optimizer=choice,
        )  # fmt: skip
        model = _lora_model()
        init = _trainable(model)
        train_loop(model, ex, [], cfg, tmp_path / choice, pad_id=0)
        runs[choice] = init, _trainable(model)
    assert made[0].get("fused") is True and made[1].get("foreach") is False  # auto: fused on CPU
    (init, fused), (_, loop) = runs["auto"], runs["for_loop"]
    assert max((fused[k] - init[k]).abs().max() for k in init) > lr / 2  # it took the steps
    # The fused kernel computes the bias corrections in float32 (1 - 0.999^t: a relative error
    # up to eps32 / 0.001 = 1.2e-4 of each update) and the next gradients carry the difference
    # on: measured 1.4e-5 after three steps. A missing or wrong step differs by about lr.
    for k in init:
        assert (fused[k] - loop[k]).abs().max() < lr / 100, k
