"""The operating-system boundary around a sandboxed run: bubblewrap (`bwrap`), kernel namespaces and a uid.

What a run sees and may do:
- Its own PID namespace (`--unshare-pid`), a new session, and `--die-with-parent`: it cannot see, signal
  or trace any process outside its tree, and when its first process ends (or the parent kills it) the
  kernel kills the rest of the tree, `setsid()` or not.
- No network (`--unshare-net`: a loopback interface of its own), and its own IPC, UTS and cgroup namespaces.
- A read-only view of only what the interpreter needs: the interpreter binary, its standard library
  (with `site-packages` emptied, `_ctypes` and `_tkinter` replaced by empty files), the shared libraries it
  and the stdlib's other extension modules load (found with `ldd`), and `/etc/ld.so.cache`. Not /root, not the project,
  not /work, no /proc, /sys or /etc beyond that. `/dev` has null, zero, full, random, urandom and tty.
- A private writable tmpfs of `WORKDIR_BYTES` at /sandbox (also /tmp), its working folder and HOME.
- A seccomp filter (x86_64 and aarch64) that refuses, with EPERM, the system calls a test program has no
  use for and that widen the kernel's attack surface: new user namespaces (clone with CLONE_NEWUSER,
  unshare, setns; clone3 answers ENOSYS so that libc falls back to clone), mounts, ptrace and
  process_vm_*, bpf, perf_event_open, userfaultfd, io_uring, keyrings, modules, kexec.
- An unprivileged uid. Started as root, bwrap runs without a user namespace, gives the harness only
  CAP_SETUID and CAP_SETGID, and the harness drops to a uid of its own (`run_uid()`: random in a range
  no account uses, so concurrent runs do not share RLIMIT_NPROC, which counts per uid) before reading its
  job; RLIMIT_NPROC then holds, which it does not for root. Started by another user, bwrap makes a user
  namespace in which the run is uid 65534 (`--unshare-user --uid 65534 --disable-userns`); the kernel
  counts RLIMIT_NPROC per user namespace, so it holds per run there too.
"""

from __future__ import annotations

import errno
import functools
import glob
import os
import platform
import re
import secrets
import shutil
import struct
import subprocess
import sys
import sysconfig

__all__ = ["WORKDIR", "WORKDIR_BYTES", "bwrap_path", "command", "run_uid", "runtime_view", "seccomp_filter"]

WORKDIR = "/sandbox"
WORKDIR_BYTES = 64 << 20  # the tmpfs's size: files written there are memory
NOBODY = 65534
_UID_BASE, _UID_SPAN = 2_000_000, 1_000_000  # run uids when started as root: no account, no file owns these


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def run_uid() -> int | None:
    """The uid the harness drops to (root only; None: bwrap's user namespace makes the run 65534)."""
    return _UID_BASE + secrets.randbelow(_UID_SPAN) if os.geteuid() == 0 else None


@functools.lru_cache(maxsize=1)
def runtime_view() -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(interpreter, files and folders to bind read-only at their own path, files to blank, folders to
    empty): this interpreter's view, computed once per process."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    stdlib = sysconfig.get_paths()["stdlib"]
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload")
    binds = [interpreter, stdlib]
    if os.path.isdir(dynload) and not dynload.startswith(stdlib + os.sep):
        binds.append(dynload)
    # ctypes would let a program write the harness's memory; tkinter needs a display (and X11's libraries)
    blank = tuple(sorted(p for name in ("_ctypes*.so", "_tkinter*.so")
                         for p in glob.glob(os.path.join(dynload, name))))
    extensions = [p for p in glob.glob(os.path.join(dynload, "*.so")) if p not in blank]
    binds += _shared_libraries([interpreter, *extensions])
    if os.path.isfile("/etc/ld.so.cache"):
        binds.append("/etc/ld.so.cache")
    empty = tuple(p for p in (os.path.join(stdlib, "site-packages"),) if os.path.isdir(p))
    return interpreter, tuple(dict.fromkeys(binds)), blank, empty


def _shared_libraries(binaries: list[str]) -> list[str]:
    """The shared libraries (and the dynamic loader) that `binaries` load, at the paths the loader uses;
    without `ldd`, the usual library folders whole."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return [p for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(p) and not os.path.islink(p)]
    found = subprocess.run([ldd, *binaries], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
    paths = re.findall(r"(?:=>\s*|^\s*)(/\S+)\s+\(0x", found, re.MULTILINE)
    return sorted({p for p in paths if os.path.exists(p)})


def command(info_fd: int, uid: int | None, seccomp_fd: int | None = None) -> list[str]:
    """The bwrap command line, up to and including the interpreter (the harness's arguments follow);
    `seccomp_fd` reads `seccomp_filter()`'s program."""
    interpreter, binds, blank, empty = runtime_view()
    args = [bwrap_path() or "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if seccomp_fd is not None:
        args += ["--add-seccomp-fd", str(seccomp_fd)]
    if uid is not None:  # bwrap runs as root: the harness switches to `uid` with these two capabilities
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns"]
    made: set[str] = set()
    for path in binds:
        args += _parents(path, made) + ["--ro-bind", path, path]
    for path in blank:
        args += ["--ro-bind", "/dev/null", path]
    for path in empty:
        args += ["--perms", "0555", "--tmpfs", path]
    args += ["--dev", "/dev", "--perms", "1777", "--size", str(WORKDIR_BYTES), "--tmpfs", WORKDIR,
             "--symlink", WORKDIR, "/tmp", "--chdir", WORKDIR, "--remount-ro", "/", "--info-fd", str(info_fd),
             "--", interpreter]
    return args


def _parents(path: str, made: set[str]) -> list[str]:
    """`--dir` for each folder above `path` not made yet, world-readable (bwrap would make them 0700
    as root, which the run's uid could not cross)."""
    out = []
    parent = os.path.dirname(path)
    chain = []
    while parent not in ("/", "") and parent not in made:
        chain.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(chain):
        made.add(folder)
        out += ["--perms", "0755", "--dir", folder]
    return out


# --- seccomp -------------------------------------------------------------------------------------

# (AUDIT_ARCH_*, refused system calls, clone, clone3) per machine; the numbers are each architecture's own.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272,
                            "setns": 308, "bpf": 321, "keyctl": 250, "add_key": 248, "request_key": 249,
                            "userfaultfd": 323, "perf_event_open": 298, "kexec_load": 246, "kexec_file_load": 320,
                            "init_module": 175, "finit_module": 313, "delete_module": 176, "process_vm_readv": 310,
                            "process_vm_writev": 311, "open_by_handle_at": 304, "io_uring_setup": 425,
                            "io_uring_enter": 426, "io_uring_register": 427, "fsopen": 430, "fsmount": 432,
                            "fsconfig": 431, "move_mount": 429, "open_tree": 428, "fspick": 433,
                            "mount_setattr": 442, "syslog": 103, "iopl": 172, "ioperm": 173}, 56, 435),
    "aarch64": (0xC00000B7, {"ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41, "unshare": 97,
                             "setns": 268, "bpf": 280, "keyctl": 219, "add_key": 217, "request_key": 218,
                             "userfaultfd": 282, "perf_event_open": 241, "kexec_load": 104, "kexec_file_load": 294,
                             "init_module": 105, "finit_module": 273, "delete_module": 106, "process_vm_readv": 270,
                             "process_vm_writev": 271, "open_by_handle_at": 265, "io_uring_setup": 425,
                             "io_uring_enter": 426, "io_uring_register": 427, "fsopen": 430, "fsmount": 432,
                             "fsconfig": 431, "move_mount": 429, "open_tree": 428, "fspick": 433,
                             "mount_setattr": 442, "syslog": 116}, 220, 435),
}
_CLONE_NEWUSER = 0x10000000
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000


@functools.lru_cache(maxsize=1)
def seccomp_filter() -> bytes | None:
    """The classic-BPF program bwrap loads (`--add-seccomp-fd`); None on other machines (no filter).

    A call from another ABI (i386 or x32 on x86_64) kills the process; the refused calls return EPERM;
    clone with CLONE_NEWUSER returns EPERM; clone3 returns ENOSYS (its flags sit in memory a filter cannot
    read), so that libc falls back to clone; everything else is allowed."""
    machine = platform.machine()
    if machine not in _SYSCALLS or sys.byteorder != "little":
        return None
    arch, refused, clone, clone3 = _SYSCALLS[machine]
    # (code, where the true branch goes, where the false branch goes, k); None: the next instruction.
    # seccomp_data: int nr at 0, u32 arch at 4, u64 args[6] from 16 (args[0]'s low half at 16, little-endian).
    program = [(_LD_W_ABS, None, None, 4), (_JEQ, None, "kill", arch), (_LD_W_ABS, None, None, 0)]
    labels = {}
    if machine == "x86_64":
        program.append((_JGE, "deny", None, 0x40000000))  # the x32 ABI's numbers
    program += [(_JEQ, "deny", None, number) for number in sorted(refused.values())]
    program += [(_JEQ, "enosys", None, clone3), (_JEQ, None, "allow", clone), (_LD_W_ABS, None, None, 16),
                (_JSET, "deny", "allow", _CLONE_NEWUSER)]
    for label, verdict in (("allow", _RET_ALLOW), ("deny", _RET_ERRNO | errno.EPERM),
                           ("enosys", _RET_ERRNO | errno.ENOSYS), ("kill", _RET_KILL)):
        labels[label] = len(program)
        program.append((_RET, None, None, verdict))

    def offset(target, index):
        return 0 if target is None else labels[target] - index - 1

    body = [(code, offset(t, i), offset(f, i), k) for i, (code, t, f, k) in enumerate(program)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in body)
