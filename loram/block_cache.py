"""loram's CPU block cache for torch tensors (``csrc/block_cache.cpp``): build, install, stats.

A CPU training step allocates and frees tens of gigabytes of activation-sized tensors. With
glibc's heap the freed memory stays resident and fragments; with a fixed mmap threshold
(``heap_mmap_threshold``) every fresh tensor faults its pages in from the kernel, which took a
third of the step's CPU time on the benchmark's model (README "Training cost"). The block cache
is a ``c10::Allocator`` registered as torch's CPU allocator: tensors of at least ``min_bytes``
get blocks it maps itself; a freed block is kept for the next tensor of its size class (eight
classes per octave), and before it maps a new block it unmaps idle ones worth as much, so it
holds about the peak of live tensors and reuses it step after step.

The C++ source is compiled once per torch version with torch's extension builder (a C++
compiler and ninja) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
Where that fails, :func:`install` says why and returns False; training then runs on the bounded
heap alone.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "block_cache.cpp"
_STATS = ("hits", "misses", "unmapped", "live_bytes", "idle_bytes", "peak_bytes")


def build_dir() -> Path:
    """Where the compiled cache lives: one directory per source, torch version and C++ ABI."""
    import torch

    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{int(torch._C._GLIBCXX_USE_CXX11_ABI)}".encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"loram_block_cache_{key.hexdigest()[:16]}"


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled cache (built on first use), or None and the reason it is unavailable."""
    import torch

    if not hasattr(torch._C, "_GLIBCXX_USE_CXX11_ABI") or os.name != "posix":
        return None, "needs a POSIX system and a torch that exposes its C++ ABI"
    out = build_dir()
    lib = out / f"{out.name}.so"
    try:
        from torch.utils.cpp_extension import load

        out.mkdir(parents=True, exist_ok=True)
        if not lib.is_file():
            log.info("building loram's CPU block cache (once per torch version) in %s", out)
        # also when built: load() takes the build directory's lock, so a process never opens a
        # library another one is still linking
        load(
            out.name,
            [str(SOURCE)],
            extra_cflags=["-O2"],
            build_directory=str(out),
            is_python_module=False,
            verbose=False,
        )
        cdll = ctypes.CDLL(str(lib))
    except Exception as e:  # no compiler, no ninja, no headers: the bounded heap stays
        first = str(e).strip().splitlines()
        return (
            None,
            f"could not build or load {SOURCE.name} ({type(e).__name__}: {first[0] if first else ''})",
        )
    cdll.loram_block_cache_install.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
    cdll.loram_block_cache_install.restype = ctypes.c_int
    cdll.loram_block_cache_uninstall.restype = ctypes.c_int
    cdll.loram_block_cache_installed.restype = ctypes.c_int
    cdll.loram_block_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    return cdll, ""


def available() -> tuple[bool, str]:
    """Whether the cache can be used here (building it if needed), and why not."""
    lib, why = _library()
    return lib is not None, why


def install(min_bytes: int, max_idle: int | None = None) -> bool:
    """Make the block cache torch's CPU allocator for tensors of ``min_bytes`` and more, keeping
    at most ``max_idle`` bytes of idle blocks (None: no limit beyond the eviction before each
    new map). Tensors allocated before keep their allocator. Calling it again only changes the
    two limits. Returns False (with a warning saying why) where the cache is unavailable."""
    lib, why = _library()
    if lib is None:
        log.warning("CPU block cache unavailable, training on the bounded heap: %s", why)
        return False
    limit = (1 << 64) - 1 if max_idle is None else int(max_idle)
    return bool(lib.loram_block_cache_install(int(min_bytes), limit))


def uninstall() -> bool:
    """Give torch back the CPU allocator it had before :func:`install` (for new tensors; blocks
    already handed out still come back to the cache) and unmap the idle blocks."""
    lib, _ = _library()
    return bool(lib is not None and lib.loram_block_cache_uninstall())


def installed() -> bool:
    """Whether the block cache is torch's CPU allocator now."""
    lib, _ = _library()
    return bool(lib is not None and lib.loram_block_cache_installed())


def flush() -> None:
    """Unmap every idle block (live tensors are untouched)."""
    lib, _ = _library()
    if lib is not None:
        lib.loram_block_cache_flush()


def flush_if_loaded() -> None:
    """:func:`flush` where the cache is already loaded in this process (never builds it)."""
    if _library.cache_info().currsize:
        flush()


def stats() -> dict | None:
    """Counters since the process started: hits (a freed block reused), misses (a block mapped),
    unmapped (idle blocks given back), and the bytes of blocks live, idle, and the peak of
    live + idle since :func:`reset_peak`; None where the cache is unavailable."""
    lib, _ = _library()
    if lib is None:
        return None
    arr = (ctypes.c_uint64 * len(_STATS))()
    lib.loram_block_cache_stats(arr)
    return dict(zip(_STATS, (int(v) for v in arr)))


def reset_peak() -> None:
    lib, _ = _library()
    if lib is not None:
        lib.loram_block_cache_reset_peak()
