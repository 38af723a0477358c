"""Several processes for one stage, on accelerate: the launcher, the ``Accelerator`` and FSDP.

A stage with ``processes: N > 1`` (``train`` / ``align``) re-runs its own ``run`` in N worker
processes that this module starts (``torch.multiprocessing`` with the spawn method), each with the
environment ``torch.distributed`` reads (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``).
In a worker, :func:`accelerator` builds accelerate's ``Accelerator``, which joins the process group
(gloo on CPU, nccl on GPUs, one GPU per worker) and wraps the model in DDP or, with
``sharding: fsdp``, FSDP2 (``fully_shard`` of every decoder layer). So ``dvc repro`` and
``dvc exp run -S train.processes=2`` need no external launcher.

The data split: the global batch of a step stays ``micro_batch x grad_accum`` examples, whatever N;
its micro-batches are dealt to the ranks (micro-batch j to rank j mod N). When N divides
``grad_accum`` every micro-batch is the same tensor, with the same dropout stream, as in a
1-process run, and the gradients are summed across ranks: the loss curve is the 1-process one up to
the order of floating-point additions. Otherwise N must divide ``micro_batch`` and the step is cut
into ``grad_accum x N`` micro-batches of ``micro_batch / N`` (:func:`layout`): the same examples in
the same order, i.e. the 1-process run with that micro-batch.

Failures: the first worker that fails (an error, or killed by a signal) ends the stage; the parent
stops the others (no worker is left waiting in a collective) and raises one :class:`LoramError`
line. Workers die with their parent (``PR_SET_PDEATHSIG`` on Linux). Only rank 0 writes outputs;
checkpoints are written at a step's end, so a re-run resumes from the last one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from loram.errors import LoramError

log = logging.getLogger(__name__)

_WORKER_ENV = "LORAM_DIST_WORKER"
"""Set in a worker's environment: the stage runs its body instead of launching again."""


def in_worker() -> bool:
    """True inside a worker started by :func:`launch`."""
    return os.environ.get(_WORKER_ENV) == "1"


def rank() -> int:
    """This process's rank (0 outside a worker)."""
    return int(os.environ.get("RANK", "0")) if in_worker() else 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if in_worker() else 1


def is_main() -> bool:
    """Whether this process writes the stage's outputs (rank 0, or the only process)."""
    return rank() == 0


FSDP_ON_CPU = "LORAM_TEST_FSDP_ON_CPU"
"""Test-only: with ``1``, ``sharding: fsdp`` runs on CPU processes (see :func:`accelerator`)."""


def check_split(section: str, p) -> None:
    """One-line error, before any heavy work, for settings the engine cannot honour."""
    n = p.processes
    if p.sharding == "fsdp":
        if _device_kind() == "cpu" and os.environ.get(FSDP_ON_CPU) != "1":
            raise LoramError(
                f"{section}.sharding: fsdp needs GPUs (accelerate runs FSDP on accelerators, not "
                f"on CPU processes); use {section}.sharding: none on the CPU"
            )
        if n < 2:
            raise LoramError(
                f"{section}.sharding: fsdp shards across processes: set {section}.processes to "
                "the number of GPUs (2 or more), or use sharding: none on one GPU"
            )
    layout(section, p)
    if n > 1 and _device_kind() == "cuda":
        import torch

        have = torch.cuda.device_count()
        if n > have:
            raise LoramError(
                f"{section}.processes is {n} but {have} GPU(s) are visible: one process per GPU"
            )


def layout(section: str, p) -> tuple[int, int]:
    """``(micro_batch, grad_accum)`` that ``p.processes`` processes run for the global batch
    ``p.micro_batch x p.grad_accum``: the same when the processes divide ``grad_accum`` (whole
    micro-batches are dealt out), else micro-batches of ``micro_batch / processes`` examples,
    ``grad_accum x processes`` of them (the same examples, in the same order). One-line error when
    the processes divide neither."""
    n, m, a = p.processes, p.micro_batch, p.grad_accum
    if a % n == 0:
        return m, a
    if m % n == 0:
        return m // n, a * n
    raise LoramError(
        f"{section}.processes ({n}) must divide {section}.grad_accum ({a}) or "
        f"{section}.micro_batch ({m}): the global batch (micro_batch x grad_accum) is split "
        "evenly across the processes"
    )


def _device_kind() -> str:
    from loram.models import default_device

    return "cuda" if default_device().startswith("cuda") else "cpu"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        pass


def _worker(
    index: int,
    parent: int,
    n: int,
    port: int,
    errors,
    init,
    fn: Callable,
    args: tuple,
    kwargs: dict,
) -> None:
    """Body of worker ``index``: the distributed environment, then ``fn(*args, **kwargs)``.

    A failure is reported to the parent as one line on ``errors`` (no traceback on the console,
    unless ``LORAM_DEBUG``) and the worker exits with status 2.
    """
    _die_with_parent()
    if os.getppid() != parent:  # the stage died before the line above: do not run on alone
        os._exit(1)
    os.environ.update(
        {
            _WORKER_ENV: "1",
            "RANK": str(index),
            "LOCAL_RANK": str(index),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    if torch.cuda.is_available() and os.environ.get("LORAM_DEVICE", "cuda").startswith("cuda"):
        torch.cuda.set_device(index)  # "cuda" means this worker's GPU from here on
    # CPU workers share the cores instead of each taking them all.
    torch.set_num_threads(max(1, torch.get_num_threads() // n))
    if init is not None:
        init()
    if index != 0:  # progress bars and log lines come from rank 0 only
        logging.getLogger().setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which ends the stage
        if os.environ.get("LORAM_DEBUG"):
            import traceback

            traceback.print_exc()
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        errors.put((index, type(exc).__name__, msg))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    finally:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            td.destroy_process_group()


_USER_ERRORS = frozenset(
    {"LoramError", "ArtifactError", "ParamsError", "ValueError", "FileNotFoundError",
     "NotADirectoryError", "PermissionError", "OSError"}
)  # fmt: skip
"""Exceptions the CLI reports as one line (loram.pipeline.entry.guarded): passed on as they are."""


def launch(
    what: str, n: int, fn: Callable, args: tuple, kwargs: dict, init: Callable | None = None
) -> None:
    """Run ``fn(*args, **kwargs)`` in ``n`` worker processes; return when all have finished.

    ``fn`` and ``init`` (run first in each worker, e.g. to set up logging) must be importable by
    name (module-level functions) and the arguments picklable.
    Raises one-line :class:`LoramError` when a worker fails or is killed; the other workers
    are stopped first.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    log.info("%s: starting %d processes (data-parallel, rendezvous 127.0.0.1:%d)", what, n, port)
    procs = mp.start_processes(
        _worker,
        args=(os.getpid(), n, port, errors, init, fn, args, kwargs),
        nprocs=n,
        join=False,
        start_method="spawn",
    )
    try:
        while not procs.join():
            pass
    except mp.ProcessExitedException as exc:
        # join() has stopped the other workers (SIGTERM) and waited for them.
        _raise_cause(exc, [p.exitcode for p in procs.processes], errors, n)
    except mp.ProcessRaisedException as exc:  # pragma: no cover - _worker catches everything
        raise LoramError(f"a process failed: {str(exc).strip().splitlines()[-1]}") from None
    except KeyboardInterrupt:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        raise


def _raise_cause(exc, exitcodes: list, errors, n: int) -> None:
    """One :class:`LoramError` naming the cause of a failed launch.

    A worker killed by a signal (other than the SIGTERM that stops the rest) is the cause even
    when another worker noticed first (its collective broke and it reported that); otherwise the
    first reported error, a user error before any other (worded as a 1-process run would)."""
    killed = [(exc.error_index, exc.exit_code)] if (exc.exit_code or 0) < 0 else []
    killed += [
        (i, c) for i, c in enumerate(exitcodes) if c is not None and c < 0 and c != -signal.SIGTERM
    ]
    if killed:
        index, code = killed[0]
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise LoramError(
            f"process {index} of {n} was killed by {name}; the others were stopped; re-run to "
            "resume from the last checkpoint"
        ) from None
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    user = [r for r in reported if r[1] in _USER_ERRORS]
    if user:
        raise LoramError(user[0][2]) from None
    if reported:
        index, kind, msg = reported[0]
        raise LoramError(
            f"process {index} of {n} failed: {kind}: {msg} (LORAM_DEBUG=1 shows the traceback)"
        ) from None
    raise LoramError(
        f"process {exc.error_index} of {n} exited with status {exc.exit_code}; the others were "
        "stopped; re-run to resume from the last checkpoint"
    ) from None


# ------------------------------------------------------------------ the accelerator


def resolve_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for ``precision`` (auto: bf16 on a GPU that has it)."""
    if precision == "fp32":
        return "no"
    if precision == "bf16":
        return "bf16"
    import torch

    if _device_kind() == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def fsdp_plugin(model):
    """accelerate's FSDP2 plugin: every decoder layer is one ``fully_shard`` unit (the model's
    ``_no_split_modules``: e.g. ``LlamaDecoderLayer``), the root holds the embeddings, final norm
    and lm_head; parameters re-shard after the forward (ZeRO-3); full state dicts on save.

    NF4 (QLoRAM) layers shard when their packed storage is a float dtype
    (:func:`loram.quant.quantize_nf4` with ``quant_storage``), as FSDP2 needs.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=wrap_classes(model),
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,  # the model's own gradient checkpointing, if any
    )


def wrap_classes(model) -> list[str]:
    """Class names of the model's decoder layers (the FSDP wrapping unit)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(inner, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in inner.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise LoramError(
            f"sharding: fsdp needs the decoder layer class of {type(inner).__name__} "
            "(its _no_split_modules); none is present in the model"
        )
    return sorted(names)


def accelerator(p, model=None):
    """An ``Accelerator`` for the stage's params ``p`` (``processes``, ``sharding``,
    ``precision``), on the device :func:`loram.models.default_device` names."""
    from accelerate import Accelerator

    mp = resolve_precision(p.precision)
    plugin = fsdp_plugin(model) if p.sharding == "fsdp" else None
    cpu = _device_kind() == "cpu"
    acc = Accelerator(cpu=cpu, mixed_precision=mp, fsdp_plugin=plugin)
    if plugin is not None and cpu and os.environ.get(FSDP_ON_CPU) == "1":
        # Test hook: accelerate runs FSDP on accelerators only, torch's FSDP2 also on gloo/CPU;
        # this lets the tests run the same FSDP code path (accelerate's fsdp2 preparation, the
        # gathered checkpoints) on CPU processes. Not for real runs.
        from accelerate.utils import DistributedType

        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def release() -> None:
    """Forget accelerate's per-process state (a later stage in the same process may use other
    settings, e.g. the tests that run several stages in one process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
