"""The harness inside the sandbox: the first process of every run, standard library only.

The parent (`ttc.verifiers.sandbox`) starts it as `python -I -S -B -X utf8 -c <this file's source> ARGS`
inside the operating-system boundary (`sandbox_bwrap`), or directly with `isolation="guards-only"`.
It drops to the run's own uid (when started as root inside the boundary), sets its resource limits,
reads its job (a token, the program, the test cases, the guards' source) from a read-only descriptor and
closes it, installs the in-process guards (`sandbox_guards`: defence in depth), then runs the program and
the tests.

Why a pass cannot be forged. The verdict goes to the parent through a pipe, as a line that starts with
a random token the parent chose; the parent ignores exit statuses, stdout and everything else when it
decides "passed". The token lives only in the main thread's frame (a local of `_run_cases`); the
program and the tests run in a worker thread (`_worker`). The main thread writes "passed" only after it
has seen, with every other thread stopped, that the worker stands in `_park`, called from the very
`_worker` frame that took the tests at `_handoff`, with the arguments the main thread gave it: the
worker's own code can only get there by running every test case to its end. An audit hook (installed
before the program runs, and which nothing can remove) keeps the program from the main thread's frame
and from the tests: no frame of the main thread is ever handed out, no frame at all once the tests
run, no `gc` object walks, no tracing, profiling or further audit hooks, no new code objects built by
hand, no ctypes (which the boundary also leaves out of view). What remains possible is the program
winning the comparisons themselves (an object whose `==` is always true, a patched module that the
tests import), or corrupting the interpreter's memory (crafted bytecode loaded with `marshal`).

Statuses: each test case is "passed", "failed" (AssertionError), "memory" (MemoryError) or "error"
(anything else, SystemExit included: the case cannot have finished).
"""

import builtins
import gc
import marshal
import os
import resource
import sys
import types
import _thread

PASSED, FAILED, MEMORY, ERROR = "passed", "failed", "memory", "error"
CASE_CODES = (PASSED, FAILED, MEMORY, ERROR)  # a case's status travels as its index
EXIT_STATUS = {PASSED: 0, FAILED: 101, MEMORY: 102, ERROR: 103}
PROGRAM_PHASE, TESTS_PHASE, REPORTING = 0, 1, 2
_PROGRAM_FILE, _TESTS_FILE = "solution.py", "tests.py"
_exit, _real_setrlimit = os._exit, resource.setrlimit  # taken before the guards replace them


def main(argv: list) -> None:
    """ARGS: mode (tests | program), job fd, result fd, CPU seconds, memory bytes, processes, file bytes,
    uid to switch to (or -), the working folder. The job: (token, program, test cases, the guards' source
    or None)."""
    mode, job_fd, result_fd = argv[0], int(argv[1]), int(argv[2])
    cpu_seconds, memory_bytes, max_processes, max_file_bytes = map(int, argv[3:7])
    if argv[7] != "-":
        _become(int(argv[7]))
    _limit_resources(cpu_seconds, memory_bytes, max_processes, max_file_bytes)
    with os.fdopen(job_fd, "rb") as job:
        token, program, cases, guards = marshal.loads(job.read())
    workdir = argv[8]
    if mode == "program":
        _run_program(program, guards, workdir)
    else:
        _run_cases(token, program, cases, result_fd, guards, workdir)


def _become(uid: int) -> None:
    """Drop from root (holding only CAP_SETUID and CAP_SETGID, which bwrap gave) to `uid`, for good."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        return
    os.write(2, b"sandbox: could regain root after dropping it; refusing to run\n")
    os._exit(EXIT_STATUS[ERROR])


def _limit_resources(cpu_seconds: int, memory_bytes: int, max_processes: int, max_file_bytes: int) -> None:
    # RLIMIT_NPROC counts the processes and threads of the real uid (per user namespace): set after the
    # uid switch, it holds the run's own uid, which nothing else uses. The kernel does not apply it to root.
    # RLIMIT_CPU: SIGXCPU at the soft limit (again every CPU second after it); no hard limit of its own, so the
    # only SIGKILLs are the parent's wall clock and the kernel's OOM killer, and the parent can tell them apart
    limits = [(resource.RLIMIT_CPU, cpu_seconds, resource.RLIM_INFINITY),
              (resource.RLIMIT_AS, memory_bytes, memory_bytes),
              (resource.RLIMIT_FSIZE, max_file_bytes, max_file_bytes),
              (resource.RLIMIT_NPROC, max_processes, max_processes),
              (resource.RLIMIT_CORE, 0, 0)]
    for kind, soft, hard in limits:
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:  # without privileges a hard limit can only go down
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


# --- tests: the program and its test cases in a worker thread, the verdict from the main thread --------

def _run_cases(token: str, program: str, cases: tuple, result_fd: int, guards: bool, workdir: str) -> None:
    import _signal
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # _thread.interrupt_main() from the program does nothing

    errors: list = []  # (case index or None for the program, exception), reported after the verdict
    try:
        program_code = compile(program, _PROGRAM_FILE, "exec")
    except BaseException as error:  # SyntaxError, ValueError (NUL bytes), RecursionError, MemoryError
        os.write(result_fd, f"{token} {ERROR} \n".encode())
        _report_and_exit(ERROR, [(None, error)], len(cases))
    case_codes = []
    for index, case in enumerate(cases):
        try:
            case_codes.append(compile(case, _TESTS_FILE, "exec"))
        except BaseException as error:
            case_codes.append(None)  # reported as an error; the other cases still run
            errors.append((index, error))

    main_module = types.ModuleType("__main__")
    main_module.__file__ = os.path.join(workdir, _PROGRAM_FILE)
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module  # the harness's own module is no longer reachable by name
    sys.argv = [_PROGRAM_FILE]
    _install_guards(guards, workdir, block_exit=True)
    pristine_builtins = dict(builtins.__dict__)  # what the tests see (the guards' versions included)

    phase, window = [PROGRAM_PHASE], [False]
    sys.addaudithook(_audit_hook(_thread.get_ident(), phase, window, _thread.get_ident, gc.isenabled, ValueError,
                                 TESTS_PHASE, REPORTING))
    # From here on this frame and _judge use only their locals, taken now: once the worker runs, the
    # program can rebind builtins, module attributes and this module's globals, but not a frame's locals.
    judge, write, close, codes, os_error = _judge, os.write, os.close, CASE_CODES, OSError
    verdict, results, failures = judge(main_module, program_code, tuple(case_codes), pristine_builtins, phase, window,
                                       _real_setrlimit)
    line = f"{token} {codes[verdict]} {','.join([codes[c] for c in results])}\n"
    try:
        write(result_fd, line.encode())
    except os_error:  # the program closed or replaced the descriptor: no verdict, hence no pass
        pass
    close(result_fd)
    phase[0] = REPORTING  # the verdict is out: the program may now see anything, for the error report
    builtins.__dict__.update(pristine_builtins)  # formatting tracebacks needs an `exec` that works
    _report_and_exit(CASE_CODES[verdict], sorted(errors + failures, key=lambda e: -1 if e[0] is None else e[0]),
                     len(cases))


def _judge(main_module, program_code, case_codes, pristine_builtins, phase, window, setrlimit):
    """Start the worker and wait for it; return (verdict, per-case results, errors), statuses as indices
    into CASE_CODES. The verdict is "passed" only as described in the module's docstring. At the handoff
    RLIMIT_NPROC drops below the run's count: no process or thread can start while the tests run (a forked
    copy would be a main thread, whose signal handlers are handed frames)."""
    allocate_lock, thread_count, get_ident, start_thread = (_thread.allocate_lock, _thread._count, _thread.get_ident,
                                                           _thread.start_new_thread)
    gc_disable, gc_enable, gc_isenabled, current_frames = gc.disable, gc.enable, gc.isenabled, sys._current_frames
    type_, int_, list_, len_, range_, value_error = type, int, list, len, range, ValueError
    nproc = resource.RLIMIT_NPROC
    worker, worker_code, handoff_code, park_code = _worker, _worker.__code__, _handoff.__code__, _park.__code__
    harness_globals, builtins_dict, tests_phase, n_codes = globals(), builtins.__dict__, TESTS_PHASE, len(CASE_CODES)
    main_ident = get_ident()

    done, go, started = allocate_lock(), allocate_lock(), allocate_lock()
    done.acquire()
    go.acquire()
    started.acquire()
    status, tests_box = [None, None], [None, None]
    args = (exec, program_code, main_module, done, go, status, tests_box, _handoff, _park, AssertionError,
            MemoryError, BaseException, dict, started)
    arg_names = worker_code.co_varnames[:worker_code.co_argcount]

    def worker_top():
        """The worker's innermost frame when it is the only other thread, else None (gc must be off)."""
        if thread_count() != 1:
            return None
        window[0] = True
        try:
            frames = current_frames()
        except value_error:  # refused: the program turned gc back on meanwhile
            return None
        finally:
            window[0] = False
        if len_(frames) != 2:
            return None
        for ident in frames:
            if ident != main_ident:
                return frames[ident]

    def at(frame, code, caller):
        return frame is not None and frame.f_code is code and frame.f_back is caller

    start_thread(worker, args)
    # _thread._count() counts a thread only once it runs, so until then "no thread left" would read as "the
    # worker ended": an error verdict for a program that never ran (5% of runs on a busy machine). Wait for it.
    started.acquire()
    handed_over, delay = None, 0.05
    while True:
        # The worker releases `done` at its handoff, its park and its end; the main thread polls too,
        # quickly after a release (the worker's thread may take a moment to end), slowly otherwise.
        delay = 0.001 if done.acquire(True, delay) else (delay * 2 if delay < 0.05 else 0.05)
        was_enabled = gc_isenabled()
        gc_disable()  # with no other thread left, nothing can run a finalizer on this thread now
        if thread_count() == 0:  # the worker ended: the program raised (a hint the program could forge,
            hint = status[0]      # but never into a pass)
            return (hint if type_(hint) is int_ and 1 <= hint < n_codes else n_codes - 1), [], [(None, status[1])]
        top = worker_top()
        if handed_over is None and top is not None:
            if top.f_code is park_code:  # parked without having taken the tests
                return n_codes - 1, [], []
            root = top.f_back
            if at(top, handoff_code, root) and root is not None and root.f_back is None \
                    and root.f_code is worker_code and root.f_globals is harness_globals \
                    and root.f_builtins is builtins_dict:
                seen, same = root.f_locals, True
                for i in range_(len_(args)):
                    same = same and seen.get(arg_names[i]) is args[i]
                if same:
                    phase[0] = tests_phase
                    setrlimit(nproc, (1, 1))
                    tests_box[0], tests_box[1] = case_codes, pristine_builtins
                    if not at(worker_top(), handoff_code, root):  # it went on before taking the tests
                        return n_codes - 1, [], []
                    handed_over = root
                    go.release()
        elif top is not None and at(top, park_code, handed_over):
            found, failures = top.f_locals.get("results"), top.f_locals.get("failures")
            if type_(found) is list_ and len_(found) == len_(case_codes) and type_(failures) is list_:
                results, verdict = [], 0
                for c in found:
                    c = c if type_(c) is int_ and 0 <= c < n_codes else n_codes - 1
                    results.append(c)
                    verdict = c if c > verdict else verdict
                return verdict, results, failures
            return n_codes - 1, [], []
        if was_enabled:
            gc_enable()


def _worker(exec_, program_code, main_module, done, go, status, tests_box, handoff, park, assertion_error,
            memory_error, base_exception, dict_, started):
    """The program, then each test case in its own copy of the program's namespace. Uses only its
    arguments (no global or builtin name), which the main thread checks are its own."""
    started.release()
    ns = main_module.__dict__
    try:
        exec_(program_code, ns)
    except memory_error as error:
        ns.clear()  # free what the program held, so that reporting has memory to work with
        status[0], status[1] = 2, error
        if done.locked():
            done.release()
        return
    except assertion_error as error:
        status[0], status[1] = 1, error
        if done.locked():
            done.release()
        return
    except base_exception as error:  # SystemExit too: the tests cannot run after it
        status[0], status[1] = 3, error
        if done.locked():
            done.release()
        return
    handoff(done, go)
    case_codes, pristine = tests_box[0], tests_box[1]
    results, failures = [], []  # made after the handoff: nothing the program ran can hold them
    index = -1
    for code in case_codes:
        index += 1
        if code is None:
            results.append(3)
            continue
        # The program's names, less any that shadows a builtin, and builtins as they were before it ran.
        case_ns = dict_(ns)
        for name in ns:
            if name in pristine:
                del case_ns[name]
        case_ns["__builtins__"] = dict_(pristine)
        case_ns["__name__"] = "__main__"
        try:
            exec_(code, case_ns)
            results.append(0)
        except assertion_error as error:
            results.append(1)
            failures.append((index, error))
        except memory_error as error:
            case_ns.clear()
            results.append(2)
            failures.append((index, error))
        except base_exception as error:
            results.append(3)
            failures.append((index, error))
    park(done, go, results, failures)


def _handoff(done, go):
    if done.locked():  # `done` only wakes the main thread early: it polls anyway
        done.release()
    go.acquire()


def _park(done, go, results, failures):
    if done.locked():
        done.release()
    go.acquire()


def _audit_hook(main_ident, phase, window, get_ident, gc_isenabled, refusal, tests_phase, reporting):
    """The audit hook: refuses what would reach the main thread's frame, the tests' frames, or the
    interpreter's insides. Uses only its closure (never a global or builtin name)."""
    always = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
                        "sys.addaudithook", "code.__new__", "sys.monitoring.register_callback",
                        "sys.monitoring.use_tool_id", "sys.monitoring.set_events", "sys._current_exceptions"})
    frame_events = frozenset({"sys._getframe", "sys._getframemodulename"})
    frame_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
    code_attributes = frozenset({"__code__"})

    def hook(event, args):
        if phase[0] == reporting:
            return
        if event in always or event[:7] == "ctypes." or (event == "object.__setattr__"
                                                          and args[1] in code_attributes):
            raise refusal(f"sandbox: {event} is disabled")
        if event == "sys._current_frames":
            if not (window[0] and get_ident() == main_ident and not gc_isenabled()):
                raise refusal("sandbox: sys._current_frames is disabled")
        elif event in frame_events or (event == "object.__getattr__" and args[1] in frame_attributes):
            if phase[0] == tests_phase or get_ident() == main_ident:
                raise refusal("sandbox: frames cannot be inspected while the tests run")

    return hook


def _report_and_exit(status: str, errors: list, n_cases: int) -> None:
    """Write each error's traceback (from the program's or the tests' code on) to stderr, then exit."""
    for index, error in errors:
        if error is None:
            continue
        import traceback  # here: importing it costs a passing run a fifth of its start-up
        where = "" if index is None or n_cases < 2 else f"sandbox: test case {index}:\n"
        if isinstance(error, SystemExit):
            _report(f"{where}sandbox: SystemExit({error.code!r}) before the tests finished\n")
            continue
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # the harness's own frames
            tb = tb.tb_next
        try:
            text = "".join(traceback.format_exception(type(error), error, _innermost(tb)))
        except BaseException:  # a program's exception whose str() raises, or no memory left
            text = f"{type(error).__name__}\n"
        _report(where + text)
    _flush_and_exit(EXIT_STATUS[status])


# --- program: a stdin-to-stdout script in the main thread; its exit status is the result ---------------

def _run_program(program: str, guards: bool, workdir: str) -> None:
    main_module = types.ModuleType("__main__")
    main_module.__file__ = os.path.join(workdir, _PROGRAM_FILE)
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module
    sys.argv = [_PROGRAM_FILE]
    _install_guards(guards, workdir, block_exit=False)
    status = 0
    try:
        exec(compile(program, _PROGRAM_FILE, "exec"), main_module.__dict__)
    except SystemExit as stop:
        status = _exit_status_of(stop)
    except MemoryError:
        main_module.__dict__.clear()
        _report("MemoryError: the program ran out of its memory limit\n")
        status = EXIT_STATUS[MEMORY]
    except BaseException as error:
        import traceback

        tb = error.__traceback__.tb_next if error.__traceback__ is not None else None
        _report("".join(traceback.format_exception(type(error), error, _innermost(tb))))
        status = EXIT_STATUS[FAILED if isinstance(error, AssertionError) else ERROR]
    _flush_and_exit(status)


def _exit_status_of(stop: SystemExit) -> int:
    """What the interpreter would exit with for an uncaught SystemExit."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    _report(f"{stop.code}\n")
    return 1


# --- shared -----------------------------------------------------------------------------------------

def _install_guards(source, workdir: str, block_exit: bool) -> None:
    """The in-process guards (`sandbox_guards`, whose source came with the job; None: none)."""
    if source is not None:
        namespace = {"__name__": "sandbox_guards"}
        exec(compile(source, "<guards>", "exec"), namespace)
        namespace["install_guards"](os.path.realpath(workdir), block_exit)


def _innermost(tb, keep: int = 20):
    """The traceback from its `keep`-th last frame on: formatting all frames of a million-deep
    RecursionError takes seconds, even with traceback's own `limit`."""
    frames = []
    while tb is not None:
        frames.append(tb)
        if len(frames) > keep:
            frames.pop(0)
        tb = tb.tb_next
    return frames[0] if frames else None


def _report(text: str) -> None:
    try:
        sys.__stderr__.write(text)
    except BaseException:  # stderr closed by the program, or past the file size limit
        pass


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # EFBIG past RLIMIT_FSIZE, or a stream the program replaced or closed
            pass
    _exit(status)  # skips atexit handlers and finalizers, which the program may have registered


if __name__ == "__main__":
    main(sys.argv[1:])
