"""loram.block_cache: torch's CPU allocator keeping freed blocks for reuse.

Installing it changes the allocator of the whole process, so every check runs in a fresh
interpreter (``_run``) and the test process keeps torch's own allocator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from loram import block_cache


def _run(code: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "_stderr": out.stderr}


@pytest.fixture(scope="module", autouse=True)
def _built():
    ok, why = block_cache.available()  # builds it once for the module's subprocesses
    if not ok:
        pytest.skip(f"the block cache cannot be built here: {why}")


def test_freed_blocks_are_reused_and_values_survive():
    r = _run(
        """
        import json, torch
        from loram import block_cache as bc
        want_b = torch.arange(1 << 20, dtype=torch.float64).mul(2).add(1).float()
        want_c = torch.arange(1 << 20, dtype=torch.float64).mul(3).float()
        assert bc.install(1 << 16)
        s0 = bc.stats()
        a = torch.arange(1 << 20, dtype=torch.float32)           # 4 MiB: a block of its own
        b = a * 2 + 1                                           # a * 2 is mapped, then idle
        ok_b = bool(torch.equal(b, want_b))
        ptr = b.data_ptr()
        del b                                                   # its block goes idle
        c = a * 3                                               # same size class: reused
        s1 = bc.stats()
        ok_c = bool(torch.equal(c, want_c))
        small = torch.ones(100)                                 # below min_bytes: not ours
        s2 = bc.stats()
        print(json.dumps({"s0": s0, "s1": s1, "s2": s2, "same": c.data_ptr() == ptr,
                          "ok": ok_b and ok_c, "installed": bc.installed()}))
        """
    )
    s0, s1, s2 = r["s0"], r["s1"], r["s2"]
    assert r["installed"] and r["ok"]
    assert s1["misses"] - s0["misses"] == 3  # a, a * 2 and b were mapped
    assert s1["hits"] - s0["hits"] == 1 and r["same"]  # c took b's block (the last freed)
    assert s1["idle_bytes"] - s0["idle_bytes"] == 4 << 20  # a * 2's
    assert s1["live_bytes"] - s0["live_bytes"] == 2 * (4 << 20)
    assert (s2["hits"], s2["misses"]) == (s1["hits"], s1["misses"])


def test_a_new_map_first_unmaps_idle_blocks_so_the_cache_holds_the_live_peak():
    """After 8 blocks of 4 MiB go idle, a 16 MiB tensor evicts 4 of them (the cache does not
    grow by 16 MiB), and the cache's peak stays the 32 MiB once live."""
    r = _run(
        """
        import json, torch
        from loram import block_cache as bc
        assert bc.install(1 << 16)
        bc.reset_peak()
        xs = [torch.empty(1 << 20) for _ in range(8)]           # 8 x 4 MiB live
        del xs                                                  # all idle
        s1 = bc.stats()
        big = torch.empty(4 << 20)                              # 16 MiB: a miss
        s2 = bc.stats()
        print(json.dumps({"s1": s1, "s2": s2}))
        """
    )
    s1, s2 = r["s1"], r["s2"]
    mib = 1 << 20
    assert s1["idle_bytes"] == 32 * mib and s1["live_bytes"] == 0
    assert s2["unmapped"] - s1["unmapped"] == 4
    assert s2["idle_bytes"] == 16 * mib and s2["live_bytes"] == 16 * mib
    assert s2["peak_bytes"] == 32 * mib


def test_max_idle_zero_unmaps_every_freed_block_and_uninstall_restores_torch():
    r = _run(
        """
        import json, torch
        from loram import block_cache as bc
        assert bc.install(1 << 16, max_idle=0)
        x = torch.empty(1 << 20); del x
        s1 = bc.stats()
        assert bc.uninstall() and not bc.installed()
        y = torch.empty(1 << 20)                                # torch's allocator again
        s2 = bc.stats()
        print(json.dumps({"s1": s1, "s2": s2}))
        """
    )
    s1, s2 = r["s1"], r["s2"]
    assert s1["idle_bytes"] == 0 and s1["unmapped"] >= 1
    assert s2["misses"] == s1["misses"] and s2["hits"] == s1["hits"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
def test_reset_peak_rss_gives_the_idle_blocks_back():
    """The training window starts without the blocks the load left idle in the cache: they
    leave the resident memory (read from /proc/self/statm, not from the peak)."""
    r = _run(
        """
        import json, os, torch
        from loram import block_cache as bc
        from loram.train import reset_peak_rss
        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        assert bc.install(1 << 16)
        big = torch.ones(96 * 2**20 // 4)                       # 96 MiB, touched
        del big                                                 # idle in the cache, resident
        idle, before = bc.stats()["idle_bytes"], rss_mib()
        reset_peak_rss()
        print(json.dumps({"before": before, "after": rss_mib(), "idle": idle,
                          "idle_after": bc.stats()["idle_bytes"]}))
        """
    )
    assert r["idle"] >= 96 * 2**20 and r["idle_after"] == 0
    assert r["after"] <= r["before"] - 90  # the 96 MiB block went back to the system


def test_training_under_the_cache_gives_the_same_loss_and_gradients():
    """A LoRA step of a tiny Llama in float64, before and after the cache is installed, in one
    process: the allocator changes where tensors live, not what they hold."""
    r = _run(
        """
        import json, torch
        from loram.config import TrainParams
        from loram.loss import batch_loss
        from loram.tiny import tiny_llama
        from loram.train import bound_training_heap, prepare_lora_model
        from loram import block_cache as bc
        torch.manual_seed(0)
        p = TrainParams(r=4, dropout=0.0, block_cache=False, loss_chunk=16)
        model = prepare_lora_model(tiny_llama(seed=0).double(), p, "cpu")
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (4, 64))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        def step():
            model.zero_grad(set_to_none=True)
            loss, _ = batch_loss(model, batch, "cpu", p.loss_chunk)
            loss.backward()
            return loss.item(), [q.grad.clone() for q in model.parameters() if q.requires_grad]
        ref_loss, ref_grads = step()
        before = bc.stats()["misses"] if bc.installed() else None
        bound_training_heap(TrainParams(heap_mmap_threshold=4096), "cpu")
        loss, grads = step()
        s = bc.stats()
        diff = max((g - h).abs().max().item() / (h.abs().max().item() + 1e-300)
                   for g, h in zip(grads, ref_grads))
        print(json.dumps({"installed": bc.installed(), "before": before, "uses": s["hits"] + s["misses"],
                          "loss": [loss, ref_loss], "diff": diff}))
        """
    )
    assert r["installed"] and r["before"] is None and r["uses"] > 0
    # float64, same kernels on the same inputs: at most a few ulps from a changed alignment
    assert abs(r["loss"][0] - r["loss"][1]) <= 1e-12 * abs(r["loss"][1])
    assert r["diff"] <= 1e-10


def test_bound_training_heap_installs_the_cache_only_for_cpu_training():
    """Off with block_cache false, with heap_mmap_threshold 0 and for a GPU device (nothing is
    allocated there), on with the defaults on CPU. One process, in that order: installing is for
    the rest of the process."""
    r = _run(
        """
        import json
        from loram.config import TrainParams
        from loram.train import bound_training_heap
        from loram import block_cache as bc
        seen = []
        for kwargs, device in [({"block_cache": False}, "cpu"), ({"heap_mmap_threshold": 0}, "cpu"),
                               ({}, "cuda"), ({}, "cpu")]:
            bound_training_heap(TrainParams(**kwargs), device)
            seen.append(bc.installed())
        print(json.dumps({"seen": seen}))
        """
    )
    assert r["seen"] == [False, False, False, True]


def test_without_a_compiler_training_warns_and_keeps_the_bounded_heap(tmp_path):
    """No C++ compiler (CXX points nowhere, fresh extension directory): install says why and
    returns False, torch keeps its allocator, and the heap threshold still applies."""
    r = _run(
        """
        import json, logging
        logging.basicConfig(level=logging.WARNING)
        import torch
        from loram.config import TrainParams
        from loram.train import bound_training_heap
        from loram import block_cache as bc
        applied = bound_training_heap(TrainParams(), "cpu")
        x = torch.ones(1 << 20).sum().item()
        print(json.dumps({"applied": applied, "installed": bc.installed(),
                          "available": bc.available()[0], "x": x}))
        """,
        env={"CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path)},
    )
    err = r.pop("_stderr")
    assert r == {"applied": True, "installed": False, "available": False, "x": float(1 << 20)}
    assert "CPU block cache unavailable, training on the bounded heap" in err
    assert "could not build or load block_cache.cpp" in err
