"""Run untrusted, model-written Python against tests, in a child process with hard limits.

Layers, outermost first:
1. A fresh temporary directory as working directory and HOME, removed afterwards; a minimal
   environment; the interpreter in isolated mode without site-packages (`-I -S`): stdlib only.
2. A new session, so the program and anything it starts share one process group, which is killed
   with SIGKILL after the wall-clock timeout and again after a normal exit (leftover children).
   The group is killed before the child is reaped, so its id cannot have been reused by then.
3. Resource limits set by the child on itself before the program runs: CPU seconds, address space,
   file size, process count, no core files. (Set in the child rather than in a `preexec_fn`,
   which may deadlock when the parent has threads, and we run many sandboxes from threads.)
4. Linux, when permitted: a new, empty network namespace, and, when started as root, all
   capabilities dropped, so the program cannot raise its hard limits or re-enter the network.
5. In-process guards (`_install_guards`): defence in depth, not a security boundary, because
   Python code can undo them (importlib, gc, frame inspection).

Known limits: reading files is not restricted. When the parent runs as root, RLIMIT_NPROC is not
enforced (the kernel exempts uid 0), the child still has uid 0 (the interpreter may live in a
directory only root can read, so the child cannot switch to another user), and the only thing
that stops writes outside the sandbox, or signals to other root processes, is the in-process
guard. A program that defeats the guards and calls setsid() can outlive its process group.

Exit statuses: "passed" means the program (code, then tests) ran to its end. An AssertionError is
"failed"; any other exception (SyntaxError, NameError, ...) is "error", as is SystemExit while tests
run (the tests cannot have finished). POSIX only; the namespace and capability layers Linux only.
"""

from __future__ import annotations

import builtins
import collections
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_tests", "run_program", "run_tests_many", "STATUSES"]

STATUSES = ("passed", "failed", "timeout", "memory", "error")
_OUTPUT_CAP_BYTES = 4096  # per stream: the first and last 2 KB are kept
_SOLUTION_FILE, _TESTS_FILE = "solution.py", "tests.py"
# The child reports how the program ended through its exit status; 0 means it ran to its end.
_EXIT_FAILED, _EXIT_MEMORY, _EXIT_ERROR = 101, 102, 103
_THIS_FILE = os.path.abspath(__file__)


@dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int  # negative: killed by that signal
    stdout: str  # truncated to _OUTPUT_CAP_BYTES, keeping its head and tail
    stderr: str
    wall_s: float

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
              max_file_bytes: int = 1 << 20) -> SandboxResult:
    """Run `code`, then `tests` (asserts) in the same namespace; "passed" if the tests ran to their end.

    unittest-style tests must not end in `unittest.main()`, whose SystemExit is an "error" here
    (it cannot be told apart from the solution exiting early); end them with
    `assert unittest.main(exit=False).result.wasSuccessful()` instead.
    """
    limits = _Limits(timeout_s, memory_mb, max_processes, max_file_bytes)
    return _execute("tests", {_SOLUTION_FILE: code, _TESTS_FILE: tests}, "", limits)


def run_program(code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32,
                max_file_bytes: int = 1 << 20) -> SandboxResult:
    """Run a stdin-to-stdout program; "passed" means exit status 0 (compare `.stdout` yourself).
    Unlike in `run_tests`, the program may end itself with sys.exit(); exit statuses 101-103 are
    the sandbox's own ("failed", "memory", "error")."""
    limits = _Limits(timeout_s, memory_mb, max_processes, max_file_bytes)
    return _execute("program", {_SOLUTION_FILE: code}, stdin, limits)


def run_tests_many(cases: list[tuple[str, str]], max_workers: int = 2, **limits) -> list[SandboxResult]:
    """`run_tests` on each (code, tests) pair, `max_workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda case: run_tests(case[0], case[1], **limits), cases))


# --- parent side -------------------------------------------------------------------------------

def _execute(mode: str, files: dict[str, str], stdin: str, limits: _Limits) -> SandboxResult:
    sandbox_dir = tempfile.mkdtemp(prefix="ttc_sandbox_")
    try:
        for name, text in files.items():
            with open(os.path.join(sandbox_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        with ExitStack() as stack:
            stdout_file = stack.enter_context(tempfile.TemporaryFile())  # unnamed: the child cannot reach it by path
            stderr_file = stack.enter_context(tempfile.TemporaryFile())
            stdin_source = subprocess.DEVNULL
            if stdin:
                stdin_source = stack.enter_context(tempfile.TemporaryFile())
                stdin_source.write(stdin.encode("utf-8"))
                stdin_source.seek(0)
            cpu_seconds = math.ceil(limits.timeout_s) + 1  # the wall clock should fire first
            command = [sys.executable, "-I", "-S", "-B", _THIS_FILE, mode, str(cpu_seconds),
                       str(limits.memory_mb << 20), str(limits.max_processes), str(limits.max_file_bytes)]
            started = time.monotonic()
            process = subprocess.Popen(command, cwd=sandbox_dir, env=_child_environment(sandbox_dir),
                                       stdin=stdin_source, stdout=stdout_file, stderr=stderr_file,
                                       start_new_session=True)
            try:
                exited = _wait_without_reaping(process.pid, limits.timeout_s)
            finally:
                _kill_process_group(process.pid)
                process.wait()
            wall_s = time.monotonic() - started
            stdout, stderr = _read_capped(stdout_file), _read_capped(stderr_file)
    finally:
        shutil.rmtree(sandbox_dir, ignore_errors=True)
    status = _status(process.returncode, timed_out=not exited, stderr=stderr)
    return SandboxResult(status, process.returncode, stdout, stderr, wall_s)


def _child_environment(sandbox_dir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": sandbox_dir,
        "TMPDIR": sandbox_dir,
        "PYTHONDONTWRITEBYTECODE": "1",  # ignored under -I (hence -B too), but read by any child interpreter
        "MALLOC_ARENA_MAX": "2",  # each glibc thread arena reserves 64 MB of address space (RLIMIT_AS)
    }


def _wait_without_reaping(pid: int, timeout_s: float) -> bool:
    """Wait until the child exits (True) or the timeout passes (False), leaving it unreaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(timeout_s * 1000))
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


def _kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


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


def _status(returncode: int, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == _EXIT_FAILED:
        return "failed"
    # SIGKILL that we did not send is most likely the kernel's OOM killer.
    if returncode in (_EXIT_MEMORY, -signal.SIGKILL):
        return "memory"
    if returncode != _EXIT_ERROR and "MemoryError" in stderr:  # the interpreter itself died of it
        return "memory"
    return "error"


# --- child side: runs as `python -I -S -B sandbox.py MODE CPU_S MEMORY_BYTES NPROC FSIZE` ---------

def _child_main(argv: list[str]) -> None:
    real_exit = os._exit
    mode = argv[0]
    cpu_seconds, memory_bytes, max_processes, max_file_bytes = map(int, argv[1:])
    _limit_resources(cpu_seconds, memory_bytes, max_processes, max_file_bytes)
    _isolate_with_kernel()
    _install_guards(os.path.realpath(os.getcwd()), block_exit=(mode == "tests"))
    status = _run_untrusted([_SOLUTION_FILE, _TESTS_FILE] if mode == "tests" else [_SOLUTION_FILE],
                            exit_allowed=(mode == "program"))
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # EFBIG past RLIMIT_FSIZE, or a stream the program replaced or closed
            pass
    real_exit(status)  # skips atexit handlers and finalizers, which the program may have registered


def _limit_resources(cpu_seconds: int, memory_bytes: int, max_processes: int, max_file_bytes: int) -> None:
    limits = [(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard
              (resource.RLIMIT_AS, memory_bytes, memory_bytes),
              (resource.RLIMIT_FSIZE, max_file_bytes, max_file_bytes),
              (resource.RLIMIT_NPROC, max_processes, max_processes),
              (resource.RLIMIT_CORE, 0, 0)]
    # RLIMIT_NPROC counts every process and thread of the user, not only the sandbox's: on a busy
    # non-root account the program may be unable to start even a thread. Root is exempt from it.
    for kind, soft, hard in limits:
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:  # without privileges a hard limit can only go down
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def _isolate_with_kernel() -> None:
    """Best effort, Linux: an empty network namespace (needs CAP_SYS_ADMIN), then drop every
    capability so that root cannot raise its hard limits, leave the namespace, or regain
    capabilities by exec. Each step that the kernel refuses is skipped."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return
    clone_newnet = 0x40000000
    libc.unshare(clone_newnet)
    if os.geteuid() != 0:
        return
    pr_set_securebits, pr_capbset_drop, pr_set_no_new_privs = 28, 24, 38
    # NOROOT, NO_SETUID_FIXUP and KEEP_CAPS_LOCKED, locked: uid 0 no longer implies capabilities.
    securebits_without_root_privilege = 0x2F
    libc.prctl(pr_set_securebits, securebits_without_root_privilege, 0, 0, 0)
    for capability in range(64):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    linux_capability_version_3 = 0x20080522
    libc.capset(ctypes.byref(Header(linux_capability_version_3, 0)), (Data * 2)())  # all zero: no capabilities


def _install_guards(sandbox_dir: str, block_exit: bool) -> None:
    """Replace process creation, networking, signals to others, rlimit changes, ctypes and writes
    outside `sandbox_dir` with functions that raise PermissionError. Defence in depth only."""
    import _io
    import _posixsubprocess
    import _socket
    import io
    import posix
    import socket

    real_open, real_os_open, real_getpid, real_getpgrp = builtins.open, os.open, os.getpid, os.getpgrp

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise PermissionError(f"{what} disabled in sandbox")
        return refused

    def patch(names: list[str], replacement_for) -> None:  # os re-exports posix; both are patched
        for module in (os, posix):
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, replacement_for(getattr(module, name)))

    # Processes: os.exec*, os.spawn*, os.popen, subprocess and multiprocessing all end in these.
    refuse_processes = refuse("process creation")
    patch(["fork", "forkpty", "system", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
           "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
           "posix_spawn", "posix_spawnp"], lambda real: refuse_processes)
    _posixsubprocess.fork_exec = subprocess._fork_exec = refuse_processes  # subprocess binds it at import

    class RefusedPopen(subprocess.Popen):
        __init__ = refuse_processes
    subprocess.Popen = RefusedPopen
    if block_exit:  # the tests must run to their end; sys.exit is caught in _run_untrusted
        patch(["_exit"], lambda real: refuse("exiting before the tests finish is"))
    resource.setrlimit = resource.prlimit = refuse("changing resource limits")
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None  # `import ctypes` now raises ImportError

    # Network: only new sockets are refused; wrapping an existing descriptor (socketpair, used by
    # asyncio) is allowed. `base.__init__`, not super(): socket.socket.__init__ calls
    # `_socket.socket.__init__(self, ...)`, which is then the guarded class of the other layer.
    def guarded_socket_class(base):
        class GuardedSocket(base):
            def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
                if fileno is None:
                    raise PermissionError("network disabled in sandbox")
                base.__init__(self, family, type, proto, fileno)
        return GuardedSocket
    socket.socket = socket.SocketType = guarded_socket_class(socket.socket)
    _socket.socket = _socket.SocketType = guarded_socket_class(_socket.socket)

    # Signals: only to itself (kill, pidfd_open) or its own process group (killpg).
    def only_own(own_id):
        def wrap(real):
            def guarded(target, *args):
                if target != own_id():
                    raise PermissionError("signals to other processes disabled in sandbox")
                return real(target, *args)
            return guarded
        return wrap
    patch(["kill", "pidfd_open"], only_own(real_getpid))
    patch(["killpg"], only_own(real_getpgrp))

    # Files: writing, creating, deleting or changing anything outside the sandbox directory.
    def check_writable(path, dir_fd=None) -> None:
        if isinstance(path, int):  # an already open descriptor
            return
        path = os.fsdecode(os.fspath(path))
        if path in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            return
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)  # symlinks resolved: a link inside pointing outside is outside
        if real != sandbox_dir and not real.startswith(sandbox_dir + os.sep):
            raise PermissionError(f"writing outside the sandbox directory disabled: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(flag in mode for flag in "wax+"):
            check_writable(file)
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check_writable(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    dir_fd_argument = {"path": "dir_fd", "src": "src_dir_fd", "dst": "dst_dir_fd"}

    def guard_paths(*names):  # the leading parameters, by name; None: not written (symlink's src)
        def wrap(real):
            def guarded(*args, **kwargs):
                for name, path in [*zip(names, args), *((n, kwargs[n]) for n in names if n in kwargs)]:
                    if name is not None:
                        check_writable(path, kwargs.get(dir_fd_argument[name], kwargs.get("dir_fd")))
                return real(*args, **kwargs)
            return guarded
        return wrap

    builtins.open = io.open = _io.open = guarded_open
    patch(["open"], lambda real: guarded_os_open)
    patch(["mkdir", "rmdir", "remove", "unlink", "chmod", "chown", "lchown", "truncate", "utime", "mkfifo", "mknod",
           "setxattr", "removexattr"], guard_paths("path"))
    patch(["rename", "replace", "link"], guard_paths("src", "dst"))
    patch(["symlink"], guard_paths(None, "dst"))


def _run_untrusted(filenames: list[str], exit_allowed: bool) -> int:
    """Execute the files in order in one fresh `__main__` namespace; return the exit status."""
    main = types.ModuleType("__main__")
    main.__file__ = os.path.abspath(filenames[0])
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [filenames[0]]
    for filename in filenames:
        try:
            with open(filename, encoding="utf-8") as f:
                source = f.read()
            exec(compile(source, filename, "exec"), main.__dict__)
        except SystemExit as stop:
            if exit_allowed:
                return _exit_status_of(stop)
            _report(f"sandbox: SystemExit({stop.code!r}) in {filename} before the tests finished\n")
            return _EXIT_ERROR
        except MemoryError:
            main.__dict__.clear()  # free what the program held, so that reporting has memory to work with
            _report("MemoryError: the program ran out of its memory limit\n")
            return _EXIT_MEMORY
        except BaseException as error:
            _report("".join(traceback.format_exception(type(error), error, _innermost(error.__traceback__.tb_next))))
            return _EXIT_FAILED if isinstance(error, AssertionError) else _EXIT_ERROR
    return 0


def _innermost(tb: types.TracebackType | None, keep: int = 20) -> types.TracebackType | None:
    """The traceback from its `keep`-th last frame on: formatting all frames of a million-deep
    RecursionError takes seconds, even with traceback's own `limit`."""
    frames = collections.deque(maxlen=keep)
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames[0] if frames else None


def _exit_status_of(stop: SystemExit) -> int:
    """What the interpreter would exit with for an uncaught SystemExit."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    _report(f"{stop.code}\n")
    return 1


def _report(text: str) -> None:
    try:
        sys.__stderr__.write(text)
    except BaseException:  # stderr closed by the program, or past the file size limit
        pass


if __name__ == "__main__":
    _child_main(sys.argv[1:])
