"""Training and alignment on several processes (accelerate, gloo on CPU).

Fast cases check the settings, the split of a step's micro-batches, the fingerprint and the FSDP
configuration (accelerate runs FSDP on accelerators only, so on this CPU machine its plugin,
wrapping policy and shardable NF4 storage are checked without a device). The slow cases start
the ``loram`` CLI with ``train.processes: 2``: the loss curve and adapter equal the 1-process
run's; killing a worker ends the stage with one line and a re-run resumes.

Tolerances (see tests/tolerance.py). Rank r runs micro-batches r, r+2, ... of every step, whole
and with the dropout stream of the micro-batch, so each micro-batch's forward and backward is the
1-process computation, only with another thread count: its gradient is within
``forward_rtol(paths=2)`` (relative) of the 1-process one; the cross-rank sum changes the order
of ``grad_accum`` additions, far below that. An AdamW step is a smooth, normalised function of
the gradient (|step| <= lr): a relative gradient error ρ moves it by about ρ·|step|, and such
errors add up over the steps, so the adapter tensors may differ by ``steps · ρ · max|tensor|``.
The loss of each step is a forward of weights that differ by that much, far below the 1e-4
relative per step that the issue asks for (checked as such).
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from distworker import hold_or_fail
from tinyproject import SOURCES, write_sources
from tolerance import eps, forward_rtol

from loram import distributed as dist
from loram.config import AlignParams, TrainParams
from loram.errors import LoramError
from loram.trainloop import batch_indices, rank_share, run_fingerprint

# ------------------------------------------------------------------ settings and the split


def test_the_processes_must_split_the_global_batch_evenly():
    with pytest.raises(LoramError) as err:
        dist.check_split("train", TrainParams(processes=2, micro_batch=3, grad_accum=3))
    assert str(err.value).startswith(
        "train.processes (2) must divide train.grad_accum (3) or train.micro_batch (3)"
    )
    dist.check_split("align", AlignParams(processes=2, grad_accum=4))  # fine
    dist.check_split("train", TrainParams(processes=1, grad_accum=3))  # fine


@pytest.mark.parametrize(
    ("n", "micro", "accum", "expected"),
    [
        (1, 4, 1, (4, 1)),
        (2, 1, 2, (1, 2)),
        (2, 4, 1, (2, 2)),
        (4, 4, 3, (1, 12)),
        (3, 2, 6, (2, 6)),
    ],
)
def test_layout_keeps_the_global_batch_and_its_order(n, micro, accum, expected):
    p = TrainParams(processes=n, micro_batch=micro, grad_accum=accum)
    m, a = dist.layout("train", p)
    assert (m, a) == expected and a % n == 0
    flat = [i for idx in batch_indices(n=7, step=3, micro=micro, accum=accum, seed=2) for i in idx]
    same = [i for idx in batch_indices(n=7, step=3, micro=m, accum=a, seed=2) for i in idx]
    assert flat == same  # the same examples, in the same order, whatever the cut


def test_fsdp_is_refused_on_the_cpu_and_on_one_process(monkeypatch):
    monkeypatch.setattr(dist, "_device_kind", lambda: "cpu")
    with pytest.raises(LoramError, match=r"train.sharding: fsdp needs GPUs"):
        dist.check_split("train", TrainParams(processes=2, grad_accum=2, sharding="fsdp"))
    monkeypatch.setattr(dist, "_device_kind", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(LoramError, match=r"align.sharding: fsdp shards across processes"):
        dist.check_split("align", AlignParams(processes=1, sharding="fsdp"))
    dist.check_split("align", AlignParams(processes=8, grad_accum=8, sharding="fsdp"))
    with pytest.raises(LoramError, match=r"train.processes is 16 but 8 GPU"):
        dist.check_split("train", TrainParams(processes=16, grad_accum=16))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_micro_batch_goes_whole_to_one_rank(n):
    micro = batch_indices(n=13, step=5, micro=3, accum=8, seed=1)
    shares = [rank_share(micro, r, n) for r in range(n)]
    assert sorted((j, idx) for s in shares for j, idx in s) == list(enumerate(micro))
    assert {len(s) for s in shares} == {8 // n}


def test_processes_do_not_change_the_fingerprint_but_precision_does():
    one = run_fingerprint(TrainParams())
    assert run_fingerprint(TrainParams(processes=4, grad_accum=4)) != one  # grad_accum shapes it
    assert run_fingerprint(TrainParams(processes=4)) == one
    assert run_fingerprint(TrainParams(precision="bf16")) != one


def test_precision_auto_is_fp32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(dist, "_device_kind", lambda: "cpu")
    assert dist.resolve_precision("auto") == "no"
    assert dist.resolve_precision("fp32") == "no"
    assert dist.resolve_precision("bf16") == "bf16"


# ------------------------------------------------------------------ the launcher


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("raise", "^bad thing on rank 1$"),
        ("kill", "^process 1 of 2 was killed by SIGKILL; the others were stopped; re-run"),
    ],
)
def test_a_failing_worker_ends_the_launch_at_once(how, message):
    t0 = time.time()
    with pytest.raises(LoramError, match=message):
        dist.launch("test", 2, hold_or_fail, (how,), {})
    assert time.time() - t0 < 300  # rank 0 was stopped, not waited for (it sleeps 600 s)


def test_launch_returns_when_every_worker_is_done():
    assert dist.launch("test", 2, hold_or_fail, ("ok",), {}) is None


class _Queue:
    def __init__(self, items):
        self.items = list(items)

    def empty(self):
        return not self.items

    def get(self):
        return self.items.pop(0)


@pytest.mark.parametrize(
    ("seen", "codes", "reports", "message"),
    [
        # rank 1 killed; rank 0's collective broke, it reported that and was noticed first
        (0, [2, -9], [(0, "RuntimeError", "Connection closed by peer")], "^process 1 of 2 was killed by SIGKILL"),
        (1, [-15, -9], [], "^process 1 of 2 was killed by SIGKILL"),
        # a user error on one rank, the other stopped by the launcher's SIGTERM
        (1, [-15, 2], [(1, "ValueError", "no training examples")], "^no training examples$"),
        (0, [2, -15], [(0, "RuntimeError", "boom"), (1, "LoramError", "bad row")], "^bad row$"),
        (0, [2, -15], [(0, "RuntimeError", "boom")], r"^process 0 of 2 failed: RuntimeError: boom \(LORAM_DEBUG"),
        (0, [3, -15], [], "^process 0 of 2 exited with status 3"),
    ],
)  # fmt: skip
def test_the_cause_of_a_failed_launch_is_named(seen, codes, reports, message):
    import torch.multiprocessing as mp

    exc = mp.ProcessExitedException("x", error_index=seen, error_pid=1, exit_code=codes[seen])
    with pytest.raises(LoramError, match=message):
        dist._raise_cause(exc, codes, _Queue(reports), 2)


# ------------------------------------------------------------------ FSDP without a device


def _peft_tiny(factory):
    from peft import get_peft_model

    from loram.train import lora_config

    return get_peft_model(factory(), lora_config(TrainParams(r=4)))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_fsdp_plugin_wraps_exactly_the_decoder_layers(name):
    """The plugin accelerate gets, and the modules its FSDP2 auto-wrap policy turns into
    ``fully_shard`` units on the (LoRA-wrapped) model: every decoder layer and nothing else."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from loram import tiny

    model = _peft_tiny(getattr(tiny, name))
    plugin = dist.fsdp_plugin(model)
    layer_cls = type(model.get_base_model().model.layers[0])
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == [layer_cls.__name__]
    assert plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    layers = list(model.get_base_model().model.layers)
    assert len(wrapped) == len(layers) and all(a is b for a, b in zip(wrapped, layers))


def test_fsdp_needs_a_decoder_layer_class():
    with pytest.raises(LoramError, match="decoder layer class"):
        dist.wrap_classes(torch.nn.Linear(2, 2))


def test_nf4_with_float_storage_is_shardable_and_computes_the_same():
    """QLoRAM under FSDP: the packed NF4 weights stored as a float dtype (what FSDP2 shards)
    hold the same bits and give the same forward as the default uint8 storage."""
    pytest.importorskip("bitsandbytes")
    from loram.quant import quantize_nf4
    from loram.tiny import tiny_llama

    ids = torch.arange(24).reshape(2, 12) % 100
    outs = {}
    for storage in (torch.uint8, torch.float32):
        m = quantize_nf4(tiny_llama(), quant_storage=storage).eval()
        packed = [p for p in m.parameters() if type(p).__name__ == "Params4bit"]
        assert packed and all(p.dtype == storage for p in packed)
        assert all(p.is_floating_point() for p in packed) == (storage != torch.uint8)
        with torch.no_grad():
            outs[storage] = m(input_ids=ids).logits
    assert torch.equal(outs[torch.uint8], outs[torch.float32])


# ------------------------------------------------------------------ 2 processes through the CLI

PARAMS = {
    "base": {"model": "tiny-llama"},
    "data": SOURCES,
    "prune": {"calib_samples": 2, "calib_seq_len": 64},
    "align": {"max_steps": 2, "warmup_steps": 0, "micro_batch": 1, "grad_accum": 2,
              "seq_len": 64, "save_every": 1},
    "train": {"max_steps": 4, "warmup_steps": 1, "micro_batch": 1, "grad_accum": 2,
              "seq_len": 96, "save_every": 2, "eval_every": 2, "max_val_rows": 2},
    "eval": {"ppl_max_rows": 2, "ppl_seq_len": 64, "batch_size": 2, "tasks": []},
}  # fmt: skip

TRAIN = ["train", "--model", "artifacts/pruned", "--data", "artifacts/data"]


def _train_argv(tag: str, params: str) -> list[str]:
    return [*TRAIN, "--out", f"artifacts/{tag}", "--checkpoints", f"ckpt/{tag}", "--metrics",
            f"metrics/{tag}.json", "--plots", f"plots/{tag}.csv", "--params", params]  # fmt: skip


def _params(root: Path, name: str, **train) -> str:
    p = yaml.safe_load(yaml.safe_dump(PARAMS))
    p["train"].update(train)
    (root / name).write_text(yaml.safe_dump(p, sort_keys=False))
    return name


def _cli(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "loram.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _curve(path: Path) -> list[float]:
    with path.open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same_run(root: Path, ref: str, other: str, steps: int) -> None:
    from transformers import AutoConfig

    a, b = _curve(root / f"plots/{ref}.csv"), _curve(root / f"plots/{other}.csv")
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    cfg = AutoConfig.from_pretrained(root / "artifacts/pruned")
    rho = forward_rtol(cfg, torch.float32, paths=2)
    ta, tb = _adapter(root / f"artifacts/{ref}"), _adapter(root / f"artifacts/{other}")
    assert ta.keys() == tb.keys()
    for k in ta:
        tol = steps * rho * ta[k].abs().max().item()
        err = (ta[k] - tb[k]).abs().max().item()
        assert err <= tol, (k, err, tol)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with base, data and pruned model, and a 1-process training run."""
    from loram.cli import main

    root = tmp_path_factory.mktemp("dist")
    write_sources(root, n_train=24, n_ood=6, n_align=40)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["base", "--out", "artifacts/base", "--metrics", "metrics/base.json"]) == 0
        assert main(["data", "--out", "artifacts/data", "--metrics", "metrics/data.json"]) == 0
        assert main(["prune", "--base", "artifacts/base", "--data", "artifacts/data", "--out",
                     "artifacts/pruned", "--metrics", "metrics/prune.json"]) == 0  # fmt: skip
        assert main(_train_argv("one", _params(root, "one.yaml"))) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_processes_train_like_one(project, sharding):
    """``train.processes: 2`` (gloo, same global batch): the 1-process loss curve and adapter.
    ``fsdp`` runs accelerate's FSDP2 preparation on CPU processes through the test hook
    (accelerate itself enables FSDP on accelerators only): sharded parameters, gathered
    checkpoints and the gathered adapter."""
    tag = f"two_{sharding}"
    env = {dist.FSDP_ON_CPU: "1"} if sharding == "fsdp" else {}
    params = _params(project, f"{tag}.yaml", processes=2, sharding=sharding)
    run = _cli(_train_argv(tag, params), project, env)
    log, _ = run.communicate(timeout=900)
    assert run.returncode == 0, log
    if sharding == "fsdp":
        assert "accelerate FSDP2 on 2 process(es)" in log and " 0 of " not in log, log
    else:
        assert "accelerate MULTI_CPU on 2 process(es)" in log and " 0 of " in log, log
    _assert_same_run(project, "one", tag, PARAMS["train"]["max_steps"])
    assert not (project / f"ckpt/{tag}/last").exists()  # keep_checkpoint: false, as with 1


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_processes_align_like_one(project, sharding):
    """``align.processes: 2``: the same loss curve as 1 process (alignment trains all weights)
    and the same aligned weights (within the derived tolerance)."""
    from loram.cli import main

    p = yaml.safe_load(yaml.safe_dump(PARAMS))
    (project / "a1.yaml").write_text(yaml.safe_dump(p))
    p["align"].update(processes=2, sharding=sharding)
    (project / "a2.yaml").write_text(yaml.safe_dump(p))
    env = {dist.FSDP_ON_CPU: "1"} if sharding == "fsdp" else {}

    def argv(tag, params):
        return ["align", "--pruned", "artifacts/pruned", "--data", "artifacts/data", "--out",
                f"artifacts/{tag}", "--checkpoints", f"ckpt/{tag}", "--metrics",
                f"metrics/{tag}.json", "--plots", f"plots/{tag}.csv", "--params", params]  # fmt: skip

    cwd = os.getcwd()
    os.chdir(project)
    try:
        assert main(argv("al1", "a1.yaml")) == 0
    finally:
        os.chdir(cwd)
    run = _cli(argv("al2", "a2.yaml"), project, env)
    log, _ = run.communicate(timeout=900)
    assert run.returncode == 0, log
    a, b = _curve(project / "plots/al1.csv"), _curve(project / "plots/al2.csv")
    steps = PARAMS["align"]["max_steps"]
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    assert (project / "artifacts/al2/loram_manifest.json").exists()
    from safetensors.torch import load_file
    from transformers import AutoConfig

    rho = forward_rtol(AutoConfig.from_pretrained(project / "artifacts/pruned"), paths=2)
    w1, w2 = ({k: v for f in sorted((project / f"artifacts/{t}").glob("*.safetensors"))
               for k, v in load_file(str(f)).items()} for t in ("al1", "al2"))  # fmt: skip
    assert w1.keys() == w2.keys()
    before = {k: v for f in sorted((project / "artifacts/pruned").glob("*.safetensors"))
              for k, v in load_file(str(f)).items()}  # fmt: skip
    for k in w1:  # the update's relative error rho per step, plus one rounding of the weight
        moved = (w1[k].double() - before[k].double()).abs().max().item()
        err = (w1[k].double() - w2[k].double()).abs().max().item()
        tol = steps * rho * moved + eps(w1[k].dtype) * w1[k].abs().max().item()
        assert err <= tol, (k, err, tol)


def _workers(pid: int) -> list[int]:
    """The spawned worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmd:
                out.append(int(child))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_killing_a_worker_fails_cleanly_and_a_rerun_resumes(project):
    steps = 30
    params = _params(project, "kill.yaml", processes=2, max_steps=steps, save_every=2,
                     eval_every=steps)  # fmt: skip
    ref = _params(project, "kill_ref.yaml", max_steps=steps, save_every=2, eval_every=steps)
    from loram.cli import main

    cwd = os.getcwd()
    os.chdir(project)
    try:
        assert main(_train_argv("kill_ref", ref)) == 0
    finally:
        os.chdir(cwd)

    run = _cli(_train_argv("kill", params), project)
    state = project / "ckpt/kill/last/state.json"
    deadline = time.time() + 600
    while not state.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    workers = _workers(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    t0 = time.time()
    log, _ = run.communicate(timeout=120)  # no hang: the other worker is stopped
    assert run.returncode == 2, log
    assert "Traceback" not in log, log
    err = [ln for ln in log.splitlines() if ln.startswith("loram train: error:")]
    assert len(err) == 1 and "killed by SIGKILL" in err[0] and "resume" in err[0], log
    assert time.time() - t0 < 120
    assert not any(_alive(w) for w in workers), "a worker outlived the stage"
    assert not (project / "artifacts/kill").exists(), "the run finished before the kill"
    step = yaml.safe_load(state.read_text())["step"]
    assert 0 < step < steps

    again = _cli(_train_argv("kill", params), project)
    log, _ = again.communicate(timeout=900)
    assert again.returncode == 0, log
    assert f"at step {step}" in log and "resuming" in log, log
    _assert_same_run(project, "kill_ref", "kill", steps)


def test_each_micro_batch_has_its_own_dropout_seed():
    from loram.trainloop import micro_seed

    seeds = {micro_seed(3, step, j) for step in range(200) for j in range(64)}
    assert len(seeds) == 200 * 64
    assert micro_seed(3, 17, 0) == 3 * 1_000_003 + 17  # grad_accum 1: the per-step seed as before


def test_bf16_precision_autocasts_and_keeps_fp32_weights(tmp_path, caplog):
    """precision: bf16 runs the forward under accelerate's bf16 autocast (another loss than
    fp32) with fp32 LoRA weights; one process may run loops of both precisions in turn
    (accelerate's state is released after each)."""
    import logging

    from peft import get_peft_model

    from loram.tiny import tiny_llama
    from loram.train import lora_config
    from loram.trainloop import train_loop

    g = torch.Generator().manual_seed(0)
    ex = []
    for _ in range(8):
        ids = torch.randint(0, 128, (10,), generator=g).tolist()
        ex.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    losses = {}
    for precision in ("fp32", "bf16", "fp32"):
        m = tiny_llama()
        for p in m.parameters():
            p.requires_grad_(False)
        model = get_peft_model(m, lora_config(TrainParams(r=4, dropout=0.0)))
        cfg = TrainParams(max_steps=2, micro_batch=2, warmup_steps=0, precision=precision)
        with caplog.at_level(logging.INFO, logger="loram.trainloop"):
            hist = train_loop(model, ex, [], cfg, tmp_path / precision, pad_id=0)
        want = "mixed precision bf16" if precision == "bf16" else "mixed precision no"
        assert want in caplog.text
        caplog.clear()
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        losses.setdefault(precision, []).append(hist[0]["loss"])
    assert losses["fp32"][0] == losses["fp32"][1]  # deterministic, state released in between
    assert losses["bf16"][0] != losses["fp32"][0]
    assert math.isfinite(losses["bf16"][0])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_workers_die_with_the_stage(project):
    """SIGKILL of the stage's own process (e.g. dvc killed): its workers end too (no orphan
    keeps training or writes outputs)."""
    params = _params(project, "orphan.yaml", processes=2, max_steps=400, save_every=400,
                     eval_every=400)  # fmt: skip
    run = _cli(_train_argv("orphan", params), project)
    deadline = time.time() + 600
    workers = []
    while len(workers) < 2 and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        workers = _workers(run.pid)
    assert len(workers) == 2, workers
    run.kill()
    run.communicate(timeout=600)  # the workers share its stdout: EOF once they are gone too
    deadline = time.time() + 60
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "a worker outlived the stage"
    assert not (project / "artifacts/orphan").exists()


def test_align_disabled_passes_the_pruned_model_through(project):
    """``align.enabled: false``: the pruned model is the output, and every declared output of
    the stage exists (DVC fails a stage whose output is missing), the checkpoint folder too."""
    from loram.cli import main

    p = yaml.safe_load(yaml.safe_dump(PARAMS))
    p["align"]["enabled"] = False
    (project / "off.yaml").write_text(yaml.safe_dump(p))
    cwd = os.getcwd()
    os.chdir(project)
    try:
        assert main(["align", "--pruned", "artifacts/pruned", "--data", "artifacts/data", "--out",
                     "artifacts/off", "--checkpoints", "ckpt/off", "--metrics", "metrics/off.json",
                     "--plots", "plots/off.csv", "--params", "off.yaml"]) == 0  # fmt: skip
    finally:
        os.chdir(cwd)
    assert (project / "ckpt/off").is_dir() and (project / "plots/off.csv").is_file()
    assert (project / "metrics/off.json").read_text().count('"enabled": false') == 1
    pruned = sorted(f.name for f in (project / "artifacts/pruned").iterdir())
    assert sorted(f.name for f in (project / "artifacts/off").iterdir()) == pruned
