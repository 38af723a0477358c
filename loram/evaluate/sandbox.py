"""Run untrusted (model-written) Python programs in a separate, confined process.

The program never runs in this interpreter. ``check_program`` writes it to a fresh temporary
directory and starts ``python -I`` on it through a small launcher, choosing the strongest
isolation the machine allows (see ``sandbox_info()``):

``namespaces`` (running as root, ``unshare`` works; tried first)
    new network, mount and PID namespaces (``unshare --net --mount --pid --fork --kill-child
    --mount-proc``); the working directory is a private size-limited tmpfs; every other mount
    is remounted read-only inside the namespace; the program then runs as a fresh random
    unprivileged uid/gid with no supplementary groups, no capabilities and ``no_new_privs``.
``userns`` (``unshare --user`` works: unprivileged user namespaces, or root where only those
are allowed)
    the same namespaces inside a user namespace; all capabilities are dropped from the
    bounding set before the program starts, so it cannot undo the read-only remounts.
``rlimits`` (fallback, only with ``policy="rlimits"``)
    resource limits, a new session, a launcher that is a child subreaper (kills orphans), and a
    Python-level guard that removes ``fork``/``exec`` and ``socket``. The guard is defence in
    depth only (``ctypes``/``_socket`` bypass it): no network or filesystem isolation.

``policy="strict"`` (the default, ``eval.sandbox``) fails closed: it tries ``namespaces`` (as
root), then ``userns``, and raises ``SandboxUnavailable`` rather than fall back to ``rlimits``.

In every mode: wall-clock timeout that SIGKILLs the whole process group (and, with a PID
namespace, everything in it), RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (forks; enforced
for a non-root uid, which is why root mode switches uid), RLIMIT_FSIZE (caps stdout/stderr and
any file the program writes), RLIMIT_NOFILE, no core dumps, a scrubbed environment, stdin from
``/dev/null``, and the temporary directory is removed afterwards.

This module only needs the standard library.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

try:
    from loram.errors import LoramError
except ImportError:  # this file used on its own (it needs only the standard library)

    class LoramError(Exception):  # type: ignore[no-redef]
        """Stand-in for loram.errors.LoramError."""


Status = Literal["passed", "failed", "timeout", "error"]
ISOLATION_MODES = ("namespaces", "userns", "rlimits")
SANDBOX_POLICIES = ("strict", "rlimits")
"""``strict``: namespace isolation or refuse; ``rlimits``: accept the rlimits-only fallback."""


class SandboxUnavailable(LoramError):
    """``strict`` sandbox requested but no namespace isolation works on this machine."""


#: launcher exit code meaning "the sandbox could not be set up" (never the program's fault)
SETUP_EXIT = 121
_SIGNAL_EXIT = 122
_SETUP_TAG = "loram-sandbox setup:"
_BACKSTOP_S = 2.0

# The launcher runs as ``python -I -S -c _LAUNCHER <json>``: first inside the new namespaces
# (as root there), it builds the confinement and then execs the interpreter on the program.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])

def fail(msg):
    os.write(2, ("%s %s\n" % (cfg["tag"], msg)).encode())
    os._exit(cfg["setup_exit"])

libc = ctypes.CDLL(None, use_errno=True)

def mount(src, tgt, fstype, flags, data):
    enc = lambda s: s.encode() if s is not None else None
    rc = libc.mount(enc(src), enc(tgt), enc(fstype), ctypes.c_ulong(flags), enc(data))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), tgt)

def prctl(option, arg2=0):
    rc = libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                    ctypes.c_ulong(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

def unescape(path):
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND = 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}
SPECIAL_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs",
              "securityfs", "pstore", "bpf", "fusectl", "configfs", "hugetlbfs",
              "binfmt_misc", "autofs", "devtmpfs", "efivarfs", "rpc_pipefs", "nsfs"}
mode = cfg["mode"]
work = cfg["work"]
try:
    if mode in ("namespaces", "userns"):
        with open(cfg["program_path"], "rb") as fh:
            program = fh.read()
        # 1. the working directory becomes a fresh private tmpfs of bounded size
        mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
              "size=%dm,mode=0700" % cfg["tmpfs_mb"])
        os.chdir(work)
        with open("prog.py", "wb") as fh:
            fh.write(program)
        if cfg["uid"] is not None:
            os.chown(".", cfg["uid"], cfg["uid"])
        # 2. every other mount becomes read-only (only inside this mount namespace)
        with open("/proc/self/mounts") as fh:
            mounts = [line.split()[:4] for line in fh]
        for _src, target, fstype, opts in mounts:
            target = unescape(target)
            if target == work or "ro" in opts.split(","):
                continue
            try:
                st = os.statvfs(target).f_flag
                keep = 0
                for st_bit, ms_bit in ST_TO_MS.items():
                    if st & st_bit:
                        keep |= ms_bit
                mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
            except OSError as exc:
                if fstype not in SPECIAL_FS:
                    fail("cannot make %s read-only: %s" % (target, exc))
except Exception as exc:
    fail("%s: %s" % (type(exc).__name__, exc))
# The launcher stays as the namespace's init (so the program keeps ordinary signal semantics,
# and everything it forks dies with the namespace) and reports the program's wait status.
status_fd = cfg["status_fd"]
# orphans of the program (e.g. a double fork) are re-parented to this launcher, which kills
# them once the program exits (without a PID namespace nothing else would)
try:
    prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
except OSError as exc:
    fail("cannot become a child subreaper: %s" % exc)
pid = os.fork()
if pid == 0:
    try:
        os.close(status_fd)
        # 3. resource limits (inherited across exec)
        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        # 4. drop privileges
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if mode == "userns":
            for cap in range(64):
                try:
                    prctl(24, cap)  # PR_CAPBSET_DROP
                except OSError:
                    break
        if mode in ("namespaces", "userns"):
            prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    except Exception as exc:
        fail("%s: %s" % (type(exc).__name__, exc))
    try:
        os.execve(cfg["python"], [cfg["python"], "-I", "prog.py"], cfg["env"])
    except OSError as exc:
        fail("cannot exec %s: %s" % (cfg["python"], exc))
import signal

timed_out = False

# The alarm handler kills the program and returns (it never raises): the alarm may fire at any
# point, even just after the program died of its CPU limit, which is near the same instant.
def on_alarm(signum, frame):
    global timed_out
    timed_out = True
    try:
        os.kill(pid, 9)
    except OSError:
        pass

signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
_, wstatus = os.waitpid(pid, 0)  # retried after the handler runs (PEP 475)
signal.setitimer(signal.ITIMER_REAL, 0)
def reap_orphans():
    me = str(os.getpid())
    for _ in range(1000):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as fh:
                    ppid = fh.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if ppid == me:
                found = True
                try:
                    os.kill(int(entry), 9)
                except OSError:
                    pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not found:
            return

reap_orphans()
if timed_out:
    os.write(status_fd, b"timeout 0")
    os._exit(cfg["signal_exit"])
if os.WIFSIGNALED(wstatus):
    os.write(status_fd, b"signal %d" % os.WTERMSIG(wstatus))
    os._exit(cfg["signal_exit"])
code = os.WEXITSTATUS(wstatus)
os.write(status_fd, b"exit %d" % code)
os._exit(code)
"""

# Python-level guard prepended to the program when the OS cannot isolate it (or on request).
# Not a security boundary: it only stops accidental or naive process creation / networking.
_GUARD = r"""
def _loram_guard():
    import os as _os, socket as _socket, subprocess as _subprocess
    def _deny(*_a, **_k):
        raise PermissionError("disabled by the loram sandbox guard")
    for _name in ("fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp",
                  "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
                  "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                  "spawnvp", "spawnvpe", "kill", "killpg"):
        if hasattr(_os, _name):
            setattr(_os, _name, _deny)
    _subprocess.Popen = _deny
    for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(_socket, _name, _deny)
_loram_guard()
del _loram_guard
"""

_PROBE = "import json, math, os, sys\nprint(sys.version_info[0], sys.version_info[1])\n"


@dataclass
class Result:
    """Outcome of one sandboxed run."""

    status: Status
    reason: str
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    isolation: str = ""

    @property
    def passed(self) -> bool:
        """True when the program exited with status 0."""
        return self.status == "passed"

    def to_dict(self) -> dict:
        """JSON-serializable form."""
        return asdict(self)


@dataclass(frozen=True)
class SandboxInfo:
    """Which isolation this machine gives, and why."""

    isolation: str
    python: str
    defenses: tuple[str, ...]
    missing: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-serializable form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_DEFENSES = {
    "namespaces": (
        "network namespace (no interfaces up: no network, not even 127.0.0.1)",
        "PID namespace (the whole tree dies with the program; host processes invisible)",
        "mount namespace: private tmpfs working directory, all other mounts read-only",
        "fresh unprivileged uid/gid, no groups, no capabilities, no_new_privs",
        "RLIMIT_NPROC (fork limit, enforced because the uid is not root)",
        "RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_NOFILE / no core dumps",
        "wall-clock timeout killing the process group",
        "scrubbed environment, stdin from /dev/null, output capped",
    ),
    "userns": (
        "user + network namespace (no network, not even 127.0.0.1)",
        "PID namespace (the whole tree dies with the program)",
        "mount namespace: private tmpfs working directory, all other mounts read-only",
        "capability bounding set emptied, no_new_privs",
        "RLIMIT_NPROC counted inside the user namespace",
        "RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_NOFILE / no core dumps",
        "wall-clock timeout killing the process group",
        "scrubbed environment, stdin from /dev/null, output capped",
    ),
    "rlimits": (
        "RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_NOFILE / no core dumps",
        "wall-clock timeout enforced by the launcher, then the process group is killed",
        "launcher is a child subreaper: orphans (double forks, setsid) are killed at the end",
        "scrubbed environment, stdin from /dev/null, output capped",
        "Python-level guard removing fork/exec/socket (bypassable: not a boundary)",
    ),
}
_MISSING = {
    "namespaces": (),
    "userns": (),
    "rlimits": (
        "no network isolation: `_socket` or ctypes bypass the Python guard and reach local "
        "listeners and the network",
        "no filesystem isolation: the program can create files outside its working directory "
        "(/tmp, /var/tmp, /dev/shm) and change or delete any file writable by its uid (a "
        "fresh uid when started as root, else the invoking user)",
        "when not root, the program runs as the invoking user: it can signal (kill) that "
        "user's processes, and RLIMIT_NPROC counts all of them",
    ),
}


def _scrubbed_env(work: str) -> dict[str, str]:
    """The only environment the program sees."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _count_user_tasks(uid: int) -> int:
    """Threads currently owned by ``uid`` (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                status = fh.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                total += int(fields.get("Threads", "1").strip())
        except ValueError:
            continue
    return total


def _rlimits(
    mode: str, timeout_s: float, memory_mb: int, max_procs: int, max_output_bytes: int
) -> dict[str, tuple[int, int]]:
    cpu = max(1, math.ceil(timeout_s))
    limits: dict[str, tuple[int, int]] = {
        "RLIMIT_AS": (memory_mb * 2**20, memory_mb * 2**20),
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (max_output_bytes, max_output_bytes),
        "RLIMIT_NOFILE": (64, 64),
        "RLIMIT_CORE": (0, 0),
    }
    if mode in ("namespaces", "userns") or os.geteuid() == 0:
        # a per-sandbox count: own user namespace, or a fresh uid when started as root
        limits["RLIMIT_NPROC"] = (max_procs, max_procs)
    else:
        # counts every thread of this user on the machine: allow max_procs more than now
        n = _count_user_tasks(os.geteuid()) + max_procs
        limits["RLIMIT_NPROC"] = (n, n)
    return limits


def _command(mode: str) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    ns = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if mode == "namespaces":
        return [unshare, *ns]
    if mode == "userns":
        return [unshare, "--user", "--map-root-user", *ns]
    return []


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(limit)
    return data.decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a per-run uid: catches children that left the
    process group, e.g. with setsid, when there is no PID namespace to collapse)."""
    for _ in range(5):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                os.kill(int(entry), signal.SIGKILL)
                found = True
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _run(
    program: str,
    *,
    mode: str,
    python: str,
    timeout_s: float,
    memory_mb: int,
    max_procs: int,
    max_output_bytes: int,
    tmpfs_mb: int,
    guard: bool,
) -> Result:
    start = time.monotonic()
    outer = tempfile.mkdtemp(prefix="loram-sbx-")
    try:
        os.chmod(outer, 0o711)  # traversable (the interpreter resolves the script path)
        work = os.path.join(outer, "work")
        os.mkdir(work, 0o700)
        source = (_GUARD + "\n" if guard else "") + program
        program_path = os.path.join(outer if mode != "rlimits" else work, "prog.py")
        with open(program_path, "w", encoding="utf-8") as fh:
            fh.write(source)
        uid = None
        if os.geteuid() == 0 and mode != "userns":
            # a fresh unprivileged uid: RLIMIT_NPROC then applies and counts only this
            # sandbox, and the program loses root's file access and capabilities
            uid = 1_000_000 + secrets.randbelow(2_000_000_000)
            if mode == "rlimits":
                os.chown(work, uid, uid)
        cfg = {
            "mode": mode,
            "work": work,
            "program_path": program_path,
            "python": python,
            "uid": uid,
            "tmpfs_mb": tmpfs_mb,
            "rlimits": _rlimits(mode, timeout_s, memory_mb, max_procs, max_output_bytes),
            "env": _scrubbed_env(work),
            "timeout_s": float(timeout_s),
            "tag": _SETUP_TAG,
            "setup_exit": SETUP_EXIT,
            "signal_exit": _SIGNAL_EXIT,
        }
        status_r, status_w = os.pipe()
        cfg["status_fd"] = status_w
        cmd = [*_command(mode), sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        timed_out = False
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                os.chmod(out_path, 0o600)
                os.chmod(err_path, 0o600)
                try:
                    proc = subprocess.Popen(
                        cmd,
                        cwd=work,
                        env=_scrubbed_env(work),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                        close_fds=True,
                        pass_fds=(status_w,),
                    )
                finally:
                    os.close(status_w)
                try:
                    # the launcher enforces timeout_s itself (and kills orphans); this is
                    # the backstop should the launcher hang
                    proc.wait(timeout=timeout_s + _BACKSTOP_S)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    # kill stragglers too (forked children left in the group)
                    _kill_group(proc.pid)
                    proc.kill()
                    proc.wait()
                    if uid is not None and mode == "rlimits":
                        _kill_uid(uid)
            os.set_blocking(status_r, False)
            try:
                report = os.read(status_r, 64).decode()
            except BlockingIOError:
                report = ""
        finally:
            os.close(status_r)
        duration = time.monotonic() - start
        stdout = _read_capped(out_path, max_output_bytes)
        stderr = _read_capped(err_path, max_output_bytes)
        rc = proc.returncode
        kind, _, value = report.partition(" ")
        if kind == "exit":
            rc = int(value)
        elif kind == "signal":
            rc = -int(value)
        if kind == "timeout":
            timed_out, rc = True, None
        if timed_out:
            status, reason = "timeout", f"wall-clock timeout after {timeout_s:g}s"
        elif rc == SETUP_EXIT and _SETUP_TAG in stderr:
            status, reason = "error", _last_line(stderr)
        elif rc == 0:
            status, reason = "passed", "exit status 0"
        elif rc is not None and rc < 0:
            sig = signal.Signals(-rc)
            cpu_limit = math.ceil(timeout_s)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and duration >= 0.9 * cpu_limit):
                status, reason = "timeout", f"CPU time limit ({sig.name})"
            else:
                status, reason = "error", f"killed by {sig.name}"
        else:
            status = "failed"
            reason = _last_line(stderr) or f"exit status {rc}"
        return Result(status, reason, rc, stdout, stderr, duration, mode)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def _candidate_pythons() -> list[str]:
    seen: list[str] = []
    for cand in (
        sys.executable,
        getattr(sys, "_base_executable", None),
        os.path.realpath(sys.executable),
        shutil.which("python3"),
        "/usr/bin/python3",
        "/usr/local/bin/python3",
    ):
        if cand and os.path.exists(cand) and cand not in seen:
            seen.append(cand)
    return seen


def _probe(mode: str) -> tuple[str | None, str]:
    """First interpreter that runs a trivial program in ``mode``; (None, why) if none."""
    want = f"{sys.version_info[0]} {sys.version_info[1]}"
    fallback: str | None = None
    why = ""
    for python in _candidate_pythons():
        try:
            res = _run(
                _PROBE,
                mode=mode,
                python=python,
                timeout_s=20.0,
                memory_mb=1024,
                max_procs=8,
                max_output_bytes=2**16,
                tmpfs_mb=8,
                guard=False,
            )
        except OSError as exc:  # e.g. unshare missing
            return None, f"{type(exc).__name__}: {exc}"
        if res.passed:
            if res.stdout.strip() == want:
                return python, ""
            fallback = fallback or python
        else:
            why = f"{python}: {res.status}: {res.reason}"
            if _SETUP_TAG in res.stderr and "cannot exec" not in res.stderr:
                return None, why  # the mode itself does not work, not the interpreter
    return fallback, why


@functools.cache
def _probe_cached(mode: str) -> tuple[str | None, str]:
    return _probe(mode)


@functools.lru_cache(maxsize=1)
def sandbox_info() -> SandboxInfo:
    """Probe (once) the strongest isolation that works here, and the interpreter it uses.

    Tries the root namespace mode (when running as root), then the user-namespace mode, then
    falls back to ``rlimits`` (which only ``policy="rlimits"`` accepts, see ``require``).
    """
    notes: list[str] = []
    order = ["namespaces", "userns"] if os.geteuid() == 0 else ["userns"]
    if shutil.which("unshare") is None:
        notes.append("util-linux `unshare` not found")
        order = []
    for mode in order:
        python, why = _probe_cached(mode)
        if python is not None:
            if python != sys.executable:
                notes.append(
                    "the running interpreter is not usable by the sandbox uid; programs run "
                    "with " + os.path.basename(python)
                )
            return SandboxInfo(mode, python, _DEFENSES[mode], _MISSING[mode], tuple(notes))
        notes.append(f"{mode} isolation unavailable: {why}")
    python, why = _probe_cached("rlimits")
    if python is None:
        notes.append(f"no interpreter runs under the sandbox: {why}")
        python = sys.executable
    return SandboxInfo("rlimits", python, _DEFENSES["rlimits"], _MISSING["rlimits"], tuple(notes))


def reset() -> None:
    """Forget the probed isolation (e.g. after changing PATH or the machine's settings)."""
    sandbox_info.cache_clear()
    _probe_cached.cache_clear()


HOW_TO_ENABLE = (
    "enable namespaces (as root: allow unshare, e.g. `docker run --cap-add SYS_ADMIN "
    "--security-opt seccomp=unconfined`; as a user: allow unprivileged user namespaces, e.g. "
    "`sysctl kernel.unprivileged_userns_clone=1`, `sysctl user.max_user_namespaces=15000`, "
    "Ubuntu >= 23.10 also `sysctl kernel.apparmor_restrict_unprivileged_userns=0`), or opt in "
    "to the weaker sandbox knowingly with `eval.sandbox: rlimits` (model-written code can then "
    "reach the network and local services, change files and signal processes of your user)"
)


def require(policy: str = "strict") -> SandboxInfo:
    """The isolation ``policy`` allows here, or ``SandboxUnavailable`` before anything runs.

    ``strict``: only ``namespaces`` or ``userns`` (fails closed). ``rlimits``: the strongest
    available, the rlimits-only fallback accepted (with a warning).
    """
    if policy not in SANDBOX_POLICIES:
        raise ValueError(f"sandbox policy must be one of {SANDBOX_POLICIES}, got {policy!r}")
    info = sandbox_info()
    if info.isolation != "rlimits":
        return info
    if policy == "strict":
        why = "; ".join(info.notes) or "no namespace isolation"
        raise SandboxUnavailable(
            "eval.sandbox is 'strict' but no isolated sandbox works on this machine, so "
            f"model-written code will not run ({why}). To fix: {HOW_TO_ENABLE}"
        )
    import logging

    logging.getLogger(__name__).warning(
        "sandbox: rlimits only (eval.sandbox: rlimits); NOT contained: %s", "; ".join(info.missing)
    )
    return info


def check_program(
    program: str,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    *,
    max_procs: int = 8,
    max_output_bytes: int = 2**20,
    tmpfs_mb: int = 64,
    isolation: str | None = None,
    guard: bool | None = None,
    policy: str = "strict",
) -> Result:
    """Run ``program`` (Python source) confined; passed iff it exits with status 0.

    ``isolation`` forces one of ``ISOLATION_MODES``; by default the strongest that works and
    that ``policy`` accepts (``strict`` raises ``SandboxUnavailable`` rather than run without
    namespaces, see ``require``). ``guard`` prepends the Python-level fork/exec/socket guard
    (default: only in ``rlimits`` mode, where the OS gives no network isolation).
    """
    if isolation is None:
        info = require(policy)
        mode = info.isolation
    else:
        info = sandbox_info()
        mode = isolation
    if mode not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {mode!r}")
    if mode == info.isolation:
        python = info.python
    else:
        python, why = _probe_cached(mode)
        if python is None:
            return Result("error", f"{mode} isolation unavailable: {why}", isolation=mode)
    return _run(
        program,
        mode=mode,
        python=python,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_procs=max_procs,
        max_output_bytes=max_output_bytes,
        tmpfs_mb=tmpfs_mb,
        guard=(mode == "rlimits") if guard is None else guard,
    )


def check_programs(
    programs: Sequence[str] | Iterable[str], *, workers: int | None = None, **kwargs
) -> list[Result]:
    """``check_program`` over many programs, ``workers`` at a time (threads; each run is a process)."""
    programs = list(programs)
    if not programs:
        return []
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    if kwargs.get("isolation") is None:
        require(kwargs.get("policy", "strict"))  # probe once (and fail closed) before fanning out
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: check_program(p, **kwargs), programs))
