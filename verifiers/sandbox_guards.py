"""The in-process guards: defence in depth inside the sandbox, not a boundary.

The harness (`sandbox_child`) compiles this file's source, which the parent sends with the job, and calls
`install_guards` before the program runs. They replace process creation, new sockets, signals to other
processes, rlimit changes, ctypes and writes outside the working folder with functions that raise
PermissionError. Python code can undo any of them (the guards' closures hold the real functions, modules
can be imported afresh); what holds is the operating system's boundary (`sandbox_bwrap`). Standard
library only.
"""

import builtins
import os
import resource
import sys


def install_guards(sandbox_dir: str, block_exit: bool) -> None:
    """Replace process creation, networking, signals to others, rlimit changes, ctypes and writes
    outside `sandbox_dir` with functions that raise PermissionError. Defence in depth only: Python
    code can undo them; the boundary is the operating system's."""
    import _io
    import _posixsubprocess
    import _socket
    import io
    import posix

    real_open, real_os_open, real_getpid, real_getpgrp = builtins.open, os.open, os.getpid, os.getpgrp

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise PermissionError(f"{what} disabled in sandbox")
        return refused

    def patch(names: list, replacement_for) -> None:  # os re-exports posix; both are patched
        for module in (os, posix):
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, replacement_for(getattr(module, name)))

    # Processes: os.exec*, os.spawn*, os.popen, subprocess and multiprocessing all end in these
    # (subprocess binds `_posixsubprocess.fork_exec` when it is imported, which is later, if ever).
    refuse_processes = refuse("process creation")
    patch(["fork", "forkpty", "system", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
           "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
           "posix_spawn", "posix_spawnp"], lambda real: refuse_processes)
    _posixsubprocess.fork_exec = refuse_processes
    if block_exit:  # the tests must run to their end
        patch(["_exit"], lambda real: refuse("exiting before the tests finish is"))
    resource.setrlimit = resource.prlimit = refuse("changing resource limits")
    sys.modules["ctypes"] = sys.modules["_ctypes"] = None  # `import ctypes` now raises ImportError

    # Network: only new sockets are refused; wrapping an existing descriptor (socketpair, used by
    # asyncio) is allowed. `socket.socket`, defined when `socket` is imported (later), subclasses this.
    class GuardedSocket(_socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                raise PermissionError("network disabled in sandbox")
            super().__init__(family, type, proto, fileno)
    _socket.socket = _socket.SocketType = GuardedSocket

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
