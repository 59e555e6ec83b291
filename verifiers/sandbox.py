"""Run untrusted, model-written Python against tests inside an operating-system boundary.

Every run is a fresh interpreter, the harness (`sandbox_child`), inside bubblewrap (`sandbox_bwrap`):
an unprivileged uid, its own PID, network, IPC and UTS namespaces, a read-only view of only what the
interpreter needs, a private tmpfs as its working folder and a seccomp filter; resource limits (CPU
seconds, address space, file size, processes, no core files) that hold for it; and the whole process
tree killed with it. When no such boundary can be set up (bwrap missing, or failing its self-test), a run raises
`SandboxUnavailable` in one line, unless the caller opts into `isolation="guards-only"`: the harness
in a child process with the same limits, whose in-process guards are not a security boundary (and
whose process limit does not hold for root). The guards also run inside the boundary, as defence in depth.

Verdicts: "passed" comes only from a line on a pipe that starts with a random token, which the harness
writes once it has seen every test case run to its end (see `sandbox_child`); exiting early, printing,
or replacing `exec` or the harness's functions does not produce one. "failed" is an AssertionError, "memory"
a MemoryError (or the kernel's OOM kill), "timeout" the CPU limit or the wall clock, "error" anything else
(SystemExit while the tests run included: they cannot have finished). `run_program` is a script's own
exit status instead: 0 is "passed". Linux only with the boundary; guards-only runs on POSIX.

Time: `timeout_s` is CPU seconds (RLIMIT_CPU, whole seconds, rounded up; all the harness's threads count), as
a judge counts them, so a program that shares a loaded machine with others (an eval checking programs in
parallel on two cores) is not failed for the time it spent waiting for a core, up to a slowdown of
`WALL_FACTOR`: the wall clock stops every run at `WALL_FACTOR` times the CPU limit, which also ends what uses
no CPU (a sleep, a blocked read) and a program that ignores SIGXCPU. Limit: RLIMIT_CPU holds per process; a
program that starts workers (at most `max_processes`) can spend more CPU than that in all, until the wall clock.
"""

from __future__ import annotations

import marshal
import math
import os
import re
import select
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ttc.verifiers import sandbox_bwrap
from ttc.verifiers.sandbox_child import CASE_CODES, EXIT_STATUS

__all__ = ["SandboxResult", "SandboxUnavailable", "run_tests", "run_cases", "run_program", "run_tests_many",
           "check_boundary", "STATUSES", "ISOLATIONS"]

STATUSES = ("passed", "failed", "timeout", "memory", "error")
WALL_FACTOR = 3  # the wall clock's limit, in multiples of the CPU limit: room for a 3x slower (loaded) machine
ISOLATIONS = ("bwrap", "guards-only")
_OUTPUT_CAP_BYTES = 4096  # per stream: the first and last 2 KB are kept
_CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")
_GUARDS_SOURCE = (Path(__file__).parent / "sandbox_guards.py").read_text(encoding="utf-8")
_EXIT_NAMES = {code: name for name, code in EXIT_STATUS.items()}
_TEARDOWN_S = 10.0  # how long a killed sandbox may take to empty its PID namespace (normally milliseconds)


class SandboxUnavailable(RuntimeError):
    """No operating-system boundary can be set up here (one line says why and what to do)."""


@dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int  # the harness's exit status; negative: killed by that signal
    stdout: str  # truncated to _OUTPUT_CAP_BYTES, keeping its head and tail
    stderr: str
    wall_s: float
    cases: tuple[str, ...] = ()  # run_cases: each case's status, when the run reached its verdict

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_processes: int
    max_file_bytes: int

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_processes <= 0 or self.max_file_bytes < 0:
            raise ValueError(f"sandbox limits must be positive: {self}")


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
              max_file_bytes: int = 1 << 20, isolation: str = "bwrap") -> SandboxResult:
    """Run `code`, then `tests` (asserts) in a copy of its namespace; "passed" if the tests ran to their end.

    unittest-style tests must not end in `unittest.main()`, whose SystemExit is an "error" here
    (it cannot be told apart from the solution exiting early); end them with
    `assert unittest.main(exit=False).result.wasSuccessful()` instead.
    """
    return run_cases(code, [tests], timeout_s, memory_mb, max_processes, max_file_bytes, isolation)


def run_cases(code: str, cases: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
              max_file_bytes: int = 1 << 20, isolation: str = "bwrap") -> SandboxResult:
    """Run `code` once, then each test case in its own copy of the program's namespace, in one sandbox.
    `.cases` has each case's status; `.status` is "passed" when every case passed, else the worst one
    (error > memory > failed), or the run's own when it never reached a verdict (timeout, a crash)."""
    limits = _Limits(timeout_s, memory_mb, max_processes, max_file_bytes)
    return _execute("tests", code, list(cases), "", limits, isolation)


def run_program(code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
                max_file_bytes: int = 1 << 20, isolation: str = "bwrap") -> SandboxResult:
    """Run a stdin-to-stdout program; "passed" means exit status 0 (compare `.stdout` yourself).
    Unlike in `run_tests`, the program may end itself with sys.exit(); exit statuses 101-103 are
    the sandbox's own ("failed", "memory", "error")."""
    limits = _Limits(timeout_s, memory_mb, max_processes, max_file_bytes)
    return _execute("program", code, [], stdin, limits, isolation)


def run_tests_many(cases: list[tuple[str, str]], max_workers: int = 2, **limits) -> list[SandboxResult]:
    """`run_tests` on each (code, tests) pair, `max_workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda case: run_tests(case[0], case[1], **limits), cases))


# --- the boundary's self-test --------------------------------------------------------------------

_checked: dict[str, str | None] = {}  # "bwrap" -> None (it holds) or why not
_check_lock = threading.Lock()

# What the self-test's program reports from inside: each line "name value".
_PROBE = """
import os, socket
print("uid", os.getuid())
try:
    os.setuid(0)
    print("regained", 1)
except OSError:  # EPERM; EINVAL in a user namespace where root is not mapped
    print("regained", 0)
print("sees", int(any(os.path.exists(p) for p in {hidden!r})))
print("interfaces", ",".join(name for _, name in socket.if_nameindex()))
try:
    open("/usr/ttc-probe", "w")
    print("wrote", 1)
except OSError:
    print("wrote", 0)
print("pid", os.getpid())
"""


def check_boundary() -> None:
    """Raise SandboxUnavailable unless bwrap is installed and a probe run inside it shows the boundary
    holds (an unprivileged uid that cannot regain root, no view of this project or /root, loopback only,
    a read-only root, its own PID namespace). Once per process; about one sandbox start."""
    with _check_lock:
        if "bwrap" not in _checked:
            _checked["bwrap"] = _probe_boundary()
    if _checked["bwrap"] is not None:
        raise SandboxUnavailable(_checked["bwrap"] + '; isolation="guards-only" runs without it, but its in-process '
                                 "guards are not a security boundary")


def _probe_boundary() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the sandbox's boundary (bubblewrap) needs Linux"
    if sandbox_bwrap.bwrap_path() is None:
        return "no operating-system sandbox: bwrap is not installed (apt-get install bubblewrap)"
    hidden = [str(Path(__file__).resolve().parent), "/etc/passwd", "/proc/1", *_home_entries_not_bound()]
    hidden = [p for p in hidden if os.path.exists(p)]
    result = _execute("program", _PROBE.format(hidden=hidden), [], "", _Limits(30.0, 512, 16, 1 << 20), "bwrap",
                      guards=False, checked=True)
    facts = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    if result.status != "passed" or len(facts) < 6:
        why = (result.stderr.strip().splitlines() or [f"status {result.status}"])[-1]
        return f"bwrap cannot build the sandbox here ({why})"
    problems = [what for what, bad in [
        ("runs as root", facts["uid"] == "0"), ("can regain root", facts["regained"] == "1"),
        ("sees host files", facts["sees"] == "1"), (f"has network interfaces {facts['interfaces']}",
                                                    facts["interfaces"] != "lo"),
        ("can write outside its folder", facts["wrote"] == "1"), ("shares the host's PIDs", int(facts["pid"]) > 10)]
        if bad]
    return f"the bwrap sandbox failed its self-test: it {', '.join(problems)}" if problems else None


def _home_entries_not_bound(limit: int = 3) -> list[str]:
    """A few entries of the home folder that the view does not need (the interpreter may live under it)."""
    home = os.path.expanduser("~")
    needed = set(sandbox_bwrap.runtime_view()[1])
    try:
        entries = sorted(os.listdir(home))
    except OSError:
        return []
    paths = [os.path.join(home, e) for e in entries]
    return [p for p in paths if not any(n == p or n.startswith(p + os.sep) for n in needed)][:limit]


# --- parent side ---------------------------------------------------------------------------------

def _execute(mode: str, code: str, cases: list[str], stdin: str, limits: _Limits, isolation: str,
             guards: bool = True, checked: bool = False) -> SandboxResult:
    """One run. `guards=False` leaves out the in-process guards (the tests use it to check the boundary
    alone); `checked=True` skips the self-test (the self-test's own run)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation is one of {ISOLATIONS}, not {isolation!r}")
    boundary = isolation == "bwrap"
    if boundary and not checked:
        check_boundary()
    token = secrets.token_hex(16)
    with ExitStack() as stack:
        job_fd = _readonly_fd(marshal.dumps((token, code, tuple(cases), _GUARDS_SOURCE if guards else None)))
        stack.callback(os.close, job_fd)
        stdin_fd = _readonly_fd(stdin.encode("utf-8")) if stdin else os.open(os.devnull, os.O_RDONLY)
        stack.callback(os.close, stdin_fd)
        stdout_file = stack.enter_context(tempfile.TemporaryFile())  # unnamed: nothing can reach it by path
        stderr_file = stack.enter_context(tempfile.TemporaryFile())
        result_read, result_write = os.pipe()
        stack.callback(os.close, result_read)
        cpu_seconds = math.ceil(limits.timeout_s)  # RLIMIT_CPU counts whole seconds
        wall_limit_s = cpu_seconds * WALL_FACTOR
        if boundary:
            uid = sandbox_bwrap.run_uid()
            workdir = sandbox_bwrap.WORKDIR
            info_read, info_write = os.pipe()
            stack.callback(os.close, info_read)
            bpf = sandbox_bwrap.seccomp_filter()
            seccomp_fd = _readonly_fd(bpf) if bpf is not None else None
            command = sandbox_bwrap.command(info_write, uid, seccomp_fd)
            passed_fds = (job_fd, result_write, info_write) + (() if seccomp_fd is None else (seccomp_fd,))
        else:
            uid, info_read, info_write = None, None, None
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ttc_sandbox_"))
            command = [sys.executable]
            passed_fds = (job_fd, result_write)
        command += ["-I", "-S", "-B", "-X", "utf8", "-c", _CHILD_SOURCE, mode, str(job_fd), str(result_write),
                    str(cpu_seconds), str(limits.memory_mb << 20), str(limits.max_processes),
                    str(limits.max_file_bytes), "-" if uid is None else str(uid), workdir]
        started = time.monotonic()
        try:
            process = subprocess.Popen(command, cwd=None if boundary else workdir, env=_child_environment(workdir),
                                       stdin=stdin_fd, stdout=stdout_file, stderr=stderr_file, pass_fds=passed_fds,
                                       start_new_session=True)
        finally:
            for fd in passed_fds[1:]:
                os.close(fd)
        inner = None
        try:
            if info_read is not None:
                inner = _sandbox_init(info_read, started + wall_limit_s)
            exited = _wait_without_reaping(process.pid, max(0.0, started + wall_limit_s - time.monotonic()))
        finally:
            _kill_tree(process, inner)
        wall_s = time.monotonic() - started
        verdict = _read_verdict(result_read, token)
        stdout, stderr = _read_capped(stdout_file), _read_capped(stderr_file)
    returncode = _returncode(process.returncode, boundary)
    if mode == "program":
        return SandboxResult(_status_of_exit(returncode, not exited, stderr), returncode, stdout, stderr, wall_s)
    if verdict is not None and (verdict[0] != "passed" or len(verdict[1]) == len(cases)):
        status, case_statuses = verdict
        return SandboxResult(status, returncode, stdout, stderr, wall_s, case_statuses)
    status = _status_of_exit(returncode, not exited, stderr)
    if status == "passed":  # it exited with 0 before the harness gave its verdict
        status = "error"
        stderr += "\nsandbox: the run ended before its tests finished (no verdict from the harness)\n"
    return SandboxResult(status, returncode, stdout, stderr, wall_s)


def _readonly_fd(data: bytes) -> int:
    """A read-only descriptor of `data` in an unlinked file: the run can read it, not change it."""
    fd, path = tempfile.mkstemp(prefix="ttc_sandbox_job_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return os.open(path, os.O_RDONLY)
    finally:
        os.unlink(path)


def _child_environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "MALLOC_ARENA_MAX": "2",  # each glibc thread arena reserves 64 MB of address space (RLIMIT_AS)
    }


def _sandbox_init(info_read: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's PID 1 (bwrap's init, as seen from here), from bwrap's --info-fd; None if
    bwrap wrote none by the deadline (it failed before making the namespace)."""
    data = b""
    while b"}" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([info_read], [], [], remaining)[0]:
            return None
        chunk = os.read(info_read, 4096)
        if not chunk:
            break
        data += chunk
    match = re.search(rb'"child-pid"\s*:\s*(\d+)', data)
    if match is None:
        return None
    try:
        return os.pidfd_open(int(match.group(1)))
    except (ProcessLookupError, OSError):  # already gone
        return None


def _wait_without_reaping(pid: int, timeout_s: float) -> bool:
    """Wait until the child exits (True) or the timeout passes (False), leaving it unreaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
        pidfd = None
    if pidfd is not None:
        try:
            return _wait_pidfd(pidfd, timeout_s)
        finally:
            os.close(pidfd)
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.05)
    return True


def _wait_pidfd(pidfd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _kill_tree(process: subprocess.Popen, inner: int | None) -> None:
    """Kill the run's whole tree and return once it is gone. With the boundary: SIGKILL to the sandbox's
    PID 1, after which the kernel kills every process of its namespace, and its pidfd reports the exit
    only once they all have; then bwrap itself. Without it: the process group (a program that called
    setsid() escapes that: the guards-only mode's known limit)."""
    if inner is not None:
        try:
            signal.pidfd_send_signal(inner, signal.SIGKILL)
        except ProcessLookupError:  # it ended already
            pass
        _wait_pidfd(inner, _TEARDOWN_S)
        os.close(inner)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group of bwrap (or of the harness, without the boundary)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_verdict(result_read: int, token: str) -> tuple[str, tuple[str, ...]] | None:
    """The harness's verdict: the first line on the pipe that starts with the token. Everything else
    (what the program may have written there) is ignored. Read without blocking: every writer is dead."""
    os.set_blocking(result_read, False)
    data = b""
    try:
        while len(data) < (1 << 20):
            chunk = os.read(result_read, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    match = re.search(rb"(?:^|\n)" + token.encode() + rb" (\w+) ([\w,]*)\n", data)
    if match is None:
        return None
    status = match.group(1).decode()
    cases = tuple(c for c in match.group(2).decode().split(",") if c)
    if status not in STATUSES or not all(c in CASE_CODES for c in cases):
        return None
    return status, cases


def _returncode(code: int, boundary: bool) -> int:
    """The harness's exit status, as subprocess reports it (negative: a signal). bwrap reports a signal
    that killed the harness as 128 + signal."""
    if boundary and code > 128 and code - 128 in signal.valid_signals():
        return -(code - 128)
    return code


def _status_of_exit(returncode: int, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode in _EXIT_NAMES:
        return _EXIT_NAMES[returncode]
    # SIGKILL that we did not send is most likely the kernel's OOM killer.
    if returncode == -signal.SIGKILL or "MemoryError" in stderr:
        return "memory"
    return "error"


def _read_capped(file) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    if size <= _OUTPUT_CAP_BYTES:
        return file.read().decode("utf-8", errors="replace")
    half = _OUTPUT_CAP_BYTES // 2
    head = file.read(half)
    file.seek(size - half)
    tail = file.read(half)
    marker = f"\n... [{size - 2 * half} bytes left out] ...\n".encode()
    return (head + marker + tail).decode("utf-8", errors="replace")
