import glob
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ttc.verifiers.sandbox import run_program, run_tests, run_tests_many

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the sandbox is POSIX-only")


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, process group) of every process."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            found.append((int(entry), fields[0], int(fields[1]), int(fields[2])))
    return found


def _alive(pid: int, grace_s: float = 1.0) -> bool:
    """Whether `pid` still runs after `grace_s` (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + grace_s
    while any(p == pid and state != "Z" for p, state, _, _ in _processes()):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)
    return False


def test_correct_solution_passes():
    result = run_tests("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n", timeout_s=2)
    assert (result.status, result.passed, result.returncode) == ("passed", True, 0)


def test_wrong_solution_fails_and_reports_the_assertion():
    result = run_tests("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n", timeout_s=2)
    assert (result.status, result.passed) == ("failed", False)
    assert 'File "tests.py", line 1' in result.stderr and "AssertionError" in result.stderr


def test_syntax_error_is_an_error_not_a_failure():
    result = run_tests("def add(a, b) return a + b\n", "assert add(2, 3) == 5\n", timeout_s=2)
    assert result.status == "error"
    assert "SyntaxError" in result.stderr


def test_exception_other_than_assertion_is_an_error():
    result = run_tests("def add(a, b):\n    return a + c\n", "assert add(2, 3) == 5\n", timeout_s=2)
    assert result.status == "error"
    assert "NameError" in result.stderr


def test_stdlib_math_is_not_shadowed_by_the_verifier_module_of_the_same_name():
    result = run_tests("import math\n", "assert math.isqrt(17) == 4\n", timeout_s=2)
    assert result.status == "passed", result.stderr


def test_infinite_loop_is_killed_as_a_timeout_after_its_timeout_and_leaves_no_process():
    result = run_tests("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n", "", timeout_s=1)
    assert result.status == "timeout"
    assert result.returncode in (-signal.SIGKILL, -signal.SIGXCPU)  # the wall-clock kill, or the CPU limit's
    assert result.wall_s >= 1.0  # only a lower bound: on a loaded machine the kill may come late
    assert not _alive(int(result.stdout.split()[0]))


def test_fork_bomb_ends_as_error_and_leaves_no_process():
    bomb = "import os\nprint(os.getpgrp(), flush=True)\nwhile True:\n    os.fork()\n"
    result = run_tests(bomb, "", timeout_s=2)
    assert result.status == "error"
    group = int(result.stdout.split()[0])
    leftovers = [p for p in _processes() if p[1] != "Z" and (p[3] == group or p[2] == os.getpid())]
    assert leftovers == []


def test_subprocess_is_refused():
    result = run_tests("import subprocess\nsubprocess.run(['true'])\n", "", timeout_s=2)
    assert result.status == "error"
    assert "PermissionError" in result.stderr


def test_child_that_bypasses_the_guards_is_killed_with_its_process_group():
    # Undo the ctypes block and fork through libc: the in-process guard is not a boundary,
    # the process group kill after the program ends is.
    escape = ("import sys, time\n"
              "del sys.modules['ctypes'], sys.modules['_ctypes']\n"
              "import ctypes\n"
              "pid = ctypes.CDLL(None).fork()\n"
              "if pid == 0:\n"
              "    time.sleep(30)\n"
              "print(pid, flush=True)\n")
    result = run_tests(escape, "", timeout_s=2)
    assert result.status == "passed", result.stderr
    assert not _alive(int(result.stdout.split()[0]))


def test_memory_bomb_ends_as_memory():
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**6))\n"
    result = run_tests(bomb, "", timeout_s=2, memory_mb=128)
    assert result.status == "memory"


def test_writing_outside_the_sandbox_directory_is_refused():
    path = f"/tmp/ttc_sandbox_escape_{secrets.token_hex(8)}"
    for code in (f"open({path!r}, 'w').write('x')\n",
                 f"import os\nos.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY))\n",
                 f"import os\nos.symlink('/tmp', 'link')\nopen('link/{os.path.basename(path)}', 'w')\n"):
        result = run_tests(code, "", timeout_s=2)
        assert result.status == "error" and "PermissionError" in result.stderr
        assert not os.path.exists(path)


def test_writing_inside_the_sandbox_directory_is_allowed():
    code = "with open('notes.txt', 'w') as f:\n    f.write('kept')\n"
    result = run_tests(code, "assert open('notes.txt').read() == 'kept'\n", timeout_s=2)
    assert result.status == "passed", result.stderr


def test_socket_to_localhost_is_refused():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = run_tests(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", "",
                           timeout_s=2)
        assert result.status == "error" and "network disabled" in result.stderr
        with pytest.raises(BlockingIOError):  # nothing connected
            listener.accept()


def test_killing_the_parent_is_refused_and_the_test_process_survives():
    result = run_tests("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "", timeout_s=2)
    assert result.status == "error"
    assert "signals to other processes disabled" in result.stderr


def test_exiting_before_the_tests_run_is_an_error_not_a_pass():
    for exit_call in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        result = run_tests(exit_call, "assert False\n", timeout_s=2)
        assert result.status == "error", exit_call


def test_raising_resource_limits_is_refused():
    code = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n"
    assert run_tests(code, "", timeout_s=2).status == "error"


@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities are only dropped when started as root")
def test_program_started_by_root_has_no_capabilities():
    code = "status = open('/proc/self/status').read()\n"
    tests = "assert status.split('CapEff:')[1].split()[0] == '0' * 16, status\n"
    assert run_tests(code, tests, timeout_s=2).status == "passed"


def test_temporary_directory_is_removed_afterwards():
    result = run_tests("import os\nprint(os.getcwd())\n", "", timeout_s=2)
    sandbox_dir = result.stdout.strip()
    assert os.path.basename(sandbox_dir).startswith("ttc_sandbox_")
    assert not os.path.exists(sandbox_dir)


def test_output_is_truncated_to_its_head_and_tail():
    result = run_tests("print('a' * 100_000 + 'z')\n", "", timeout_s=2)
    assert result.status == "passed"
    assert result.stdout.startswith("aaa") and result.stdout.endswith("z\n")
    assert "bytes left out" in result.stdout and len(result.stdout) < 5000


def test_run_program_feeds_stdin_and_may_exit_itself():
    code = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)\n"
    result = run_program(code, stdin="1 2 3\n", timeout_s=2)
    assert (result.status, result.stdout) == ("passed", "6\n")
    assert run_program("import sys\nsys.exit(3)\n", timeout_s=2).returncode == 3


def test_many_sandboxes_run_concurrently_from_threads_in_input_order():
    cases = [("x = 1\n", "assert x == 1\n"), ("x = 2\n", "assert x == 1\n")] * 3
    results = run_tests_many(cases, max_workers=3, timeout_s=2)
    assert [r.status for r in results] == ["passed", "failed"] * 3
    # Both programs wait for a "go" file; the test gives it only once it sees both waiting at the same time, so
    # one after the other they would not pass. Clocks only bound how long a broken run takes to fail.
    token = secrets.token_hex(8)
    waiter = f"import os, time\nopen('here-{token}', 'w').close()\nwhile not os.path.exists('go'):\n    time.sleep(0.01)\n"
    with ThreadPoolExecutor(max_workers=1) as thread:
        running = thread.submit(run_tests_many, [(waiter, ""), (waiter, "")], max_workers=2, timeout_s=30)
        waiting, deadline = [], time.monotonic() + 20
        while len(waiting) < 2 and time.monotonic() < deadline and not running.done():
            waiting = glob.glob(os.path.join(tempfile.gettempdir(), "ttc_sandbox_*", f"here-{token}"))
            time.sleep(0.01)
        for mark in waiting:
            open(os.path.join(os.path.dirname(mark), "go"), "w").close()
        results = running.result()
    assert len(waiting) == 2  # both sandboxes were running at once
    assert [r.status for r in results] == ["passed", "passed"], [r.stderr for r in results]
