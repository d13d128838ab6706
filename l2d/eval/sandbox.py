"""Run untrusted generated code in a sandbox: one fresh process per sample.

Layers, outermost first (each stops what the next one misses):

1. **Namespaces** (when ``unshare`` works here, probed once per process): the program runs under
   ``unshare --net --pid --fork --kill-child`` (plus ``--user --map-root-user`` when not root).
   ``--net`` gives it a network namespace with only a downed loopback: no connection can leave,
   not even to 127.0.0.1 of the host. ``--pid`` makes it pid 1 of its own pid namespace: it cannot
   see or signal the caller's processes, and when it (or the ``unshare`` parent we kill on
   timeout) dies, the kernel kills every process left in the namespace, including children that
   called ``setsid()`` to escape the process group.
2. **Resource limits** (``resource.setrlimit``, soft = hard so the program cannot raise them, and
   ``resource.setrlimit`` is blocked afterwards): address space (memory), CPU seconds, number of
   processes (``RLIMIT_NPROC``, against fork bombs), file size, open files, no core dumps. The
   kernel does not apply ``RLIMIT_NPROC`` to uid 0: when the caller is root, fork bombs are
   stopped by layer 3 and cleaned up by layer 1, not by the limit.
3. **A prelude with an audit hook** (``sys.addaudithook``, installed before the program is
   compiled): writes (``open`` for writing, mkdir, chmod, truncate, utime, links), removals
   (``os.remove``, ``os.rmdir``, ``shutil.rmtree``) and renames are allowed only inside the
   sandbox directory (paths resolved with ``realpath``, so symlinks do not help); process creation
   (``os.fork``, ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``subprocess.Popen``, and the raw
   ``_posixsubprocess.fork_exec``, which has no audit event and is replaced), signals
   (``os.kill``), sockets and DNS, and loading ``ctypes`` (the usual way around audit hooks) all
   raise ``PermissionError``. Audit hooks are not a security boundary against a determined
   attacker with a memory-corruption bug; they are a second wall behind the OS-level layers.
4. **A throwaway working directory**: a fresh temporary directory is the cwd, ``HOME`` and
   ``TMPDIR``; the environment is otherwise minimal; the interpreter runs with ``-I`` (ignores
   ``PYTHON*`` variables and the user site); the directory is deleted afterwards.
5. **A wall-clock timeout**: the whole process group is killed with ``SIGKILL``.

Without a usable ``unshare`` (layer 1), the network is blocked by the audit hook alone (socket
creation raises), and escaped background processes are reached only through the process group.
``isolation()`` says which mode is in use.

What it cannot stop: reading world-readable files (the program may read, not write, the caller's
files; when the caller is root, file permissions do not protect them and the audit hook is the
only barrier against writes); a program that corrupts the interpreter's memory to disable the
audit hook; writes through ``os.open(..., dir_fd=...)`` relative to a directory descriptor
opened outside the sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

__all__ = ["SandboxConfig", "SandboxResult", "run_program", "run_programs", "isolation"]

# Exit code the prelude uses when the sandbox itself could not be set up (status "error").
_SETUP_FAILED = 86


@dataclass
class SandboxConfig:
    """Limits for one sandboxed run.

    Args:
        timeout: wall-clock seconds before the process group is killed (status "timeout").
        cpu_seconds: CPU-time limit (``RLIMIT_CPU``); exceeding it also counts as "timeout".
        memory_mb: address-space limit (``RLIMIT_AS``) in MiB.
        max_processes: ``RLIMIT_NPROC`` (processes/threads of the user; ignored by the kernel for
            root).
        max_file_mb: largest file the program may write (``RLIMIT_FSIZE``), stdout/stderr included.
        max_open_files: ``RLIMIT_NOFILE``.
        namespaces: use ``unshare`` network + pid namespaces when available.
        audit_hook: install the prelude's audit hook (turn off only to test the other layers).
        tail_chars: how much of the end of stdout/stderr to keep in the result.
    """

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_processes: int = 8
    max_file_mb: int = 16
    max_open_files: int = 256
    namespaces: bool = True
    audit_hook: bool = True
    tail_chars: int = 2000


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is "passed" (exit code 0), "failed" (the program raised, exited non-zero or was
    killed by a signal such as the memory limit), "timeout" (wall clock or CPU limit) or "error"
    (the sandbox could not run the program at all).
    """

    status: str
    returncode: int | None
    duration: float
    stderr: str = ""
    stdout: str = ""
    isolation: str = field(default="")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The prelude runs before the user program, inside the sandboxed interpreter. It sets the limits,
# neuters the raw fork primitive, installs the audit hook, then executes the program as __main__.
_PRELUDE = r'''
import sys, os, json, resource
cfg = json.loads(sys.argv[1])
try:
    for name, value in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), tuple(value))
    SANDBOX = os.path.realpath(cfg["dir"])
    os.chdir(SANDBOX)
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    if cfg["audit_hook"]:
        import _posixsubprocess  # fork_exec raises no audit event: replace it before anyone can use it
        def _no_fork_exec(*args, **kwargs):
            raise PermissionError("sandbox: process creation is blocked")
        _posixsubprocess.fork_exec = _no_fork_exec
        _realpath, _sep, _fsdecode, _fspath = os.path.realpath, os.sep, os.fsdecode, os.fspath
        _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        _ALLOWED_WRITES = {"/dev/null"}
        # event -> (indices of path arguments that must lie inside, indices of dir_fd arguments)
        _PATH_EVENTS = {
            "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
            "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
            "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.truncate": ((0,), ()),
            "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
            "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.mkfifo": ((0,), (2,)),
            "os.mknod": ((0,), (3,)), "shutil.rmtree": ((0,), ()), "shutil.copyfile": ((1,), ()),
            "shutil.copytree": ((1,), ()), "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()),
        }
        _BLOCKED = {
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
            "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "os.chroot",
            "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            "socket.gethostbyname_ex", "socket.getnameinfo", "ctypes.dlopen", "ctypes.dlsym",
            "ctypes.cdata", "ctypes.addressof", "ctypes.call_function",
        }
        _BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess"}

        def _inside(path):
            if isinstance(path, int):  # an already open descriptor
                return True
            try:
                path = _fsdecode(_fspath(path))
            except TypeError:
                return False
            resolved = _realpath(path)
            return resolved == SANDBOX or resolved.startswith(SANDBOX + _sep)

        _busy = [False]

        def _hook(event, args):
            if _busy[0]:  # realpath inside the hook raises events of its own
                return
            _busy[0] = True
            try:
                if event == "open":
                    path, mode, flags = args
                    writing = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
                        isinstance(mode, str) and any(c in mode for c in "wax+"))
                    if writing and path not in _ALLOWED_WRITES and not _inside(path):
                        raise PermissionError(f"sandbox: writing outside the sandbox: {path!r}")
                elif event in _BLOCKED:
                    raise PermissionError(f"sandbox: {event} is blocked")
                elif event == "import" and args[0].partition(".")[0] in _BLOCKED_IMPORTS:
                    raise PermissionError(f"sandbox: import of {args[0]} is blocked")
                elif event in _PATH_EVENTS:
                    paths, dir_fds = _PATH_EVENTS[event]
                    if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
                        raise PermissionError(f"sandbox: {event} with dir_fd is blocked")
                    for i in paths:
                        if i < len(args) and not _inside(args[i]):
                            raise PermissionError(f"sandbox: {event} outside the sandbox: {args[i]!r}")
            finally:
                _busy[0] = False

        sys.addaudithook(_hook)
except BaseException as exc:
    print(f"sandbox setup failed: {exc!r}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(%d)
del cfg, f
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
''' % _SETUP_FAILED


def _rlimits(config: SandboxConfig) -> list:
    mib = 1024 * 1024
    cpu = max(1, int(config.cpu_seconds))
    limits = [
        ("RLIMIT_AS", (config.memory_mb * mib, config.memory_mb * mib)),
        ("RLIMIT_CPU", (cpu, cpu)),  # SIGKILL at the limit (pid 1 of a pid namespace ignores SIGXCPU)
        ("RLIMIT_NPROC", (config.max_processes, config.max_processes)),
        ("RLIMIT_FSIZE", (config.max_file_mb * mib, config.max_file_mb * mib)),
        ("RLIMIT_NOFILE", (config.max_open_files, config.max_open_files)),
        ("RLIMIT_CORE", (0, 0)),
    ]
    return limits


_NAMESPACE_CANDIDATES = (
    ("unshare", "--net", "--pid", "--fork", "--kill-child"),
    ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
)


@lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
    """The first ``unshare`` invocation that can start a Python here, or () if none can."""
    if shutil.which("unshare") is None or os.environ.get("L2D_SANDBOX_NAMESPACES") == "0":
        return ()
    for prefix in _NAMESPACE_CANDIDATES:
        try:
            done = subprocess.run([*prefix, "--", sys.executable, "-I", "-c", "pass"],
                                  capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def isolation(config: SandboxConfig | None = None) -> str:
    """Which containment is in use: "namespaces+audit", "namespaces", "audit" or "rlimits-only"."""
    config = config or SandboxConfig()
    ns = bool(config.namespaces and _namespace_prefix())
    parts = (["namespaces"] if ns else []) + (["audit"] if config.audit_hook else [])
    return "+".join(parts) or "rlimits-only"


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            return f.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:  # not proc.kill(): Popen.send_signal polls first and would reap the process behind
        os.kill(proc.pid, signal.SIGKILL)  # _wait's back (it is not reaped yet: pid still ours)
    except ProcessLookupError:
        pass


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[int | None, float]:
    """Wait for ``proc`` up to ``timeout`` seconds: (exit code or None, CPU seconds it used).

    ``os.wait4`` returns the CPU time of the process and of the descendants it reaped (the
    sandboxed interpreter under ``unshare``), which ``Popen.wait`` does not.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere; the exit code is all that is left
            return (proc.returncode if proc.returncode is not None else -1), 0.0
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None, 0.0
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def run_program(source: str, config: SandboxConfig | None = None) -> SandboxResult:
    """Run the Python ``source`` in a fresh sandboxed interpreter and report how it ended."""
    config = config or SandboxConfig()
    prefix = _namespace_prefix() if config.namespaces else ()
    mode = isolation(config)
    outer = tempfile.mkdtemp(prefix="l2d-sandbox-")
    start = time.monotonic()
    try:
        work = os.path.join(outer, "work")  # the only place the program may write
        os.mkdir(work)
        program = os.path.join(outer, "program.py")  # outside work/: the program cannot rewrite it
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {"dir": work, "program": program, "audit_hook": config.audit_hook,
               "rlimits": _rlimits(config)}
        env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8"}
        cmd = [*prefix, *(["--"] if prefix else []), sys.executable, "-I", "-c", _PRELUDE,
               json.dumps(cfg)]
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, start_new_session=True,
                                        close_fds=True)
            except OSError as exc:
                return SandboxResult("error", None, time.monotonic() - start,
                                     stderr=f"could not start the sandbox: {exc!r}", isolation=mode)
            rc, cpu_used = _wait(proc, config.timeout)
            timed_out = rc is None
            _kill_group(proc)  # also reaps anything the program left in its group
            if timed_out:
                rc, cpu_used = _wait(proc, None)
        duration = time.monotonic() - start
        # The CPU limit ends a program with SIGXCPU, or with SIGKILL at the hard limit (pid 1 of a
        # pid namespace ignores SIGXCPU, and `unshare` then reports a plain failure): judge by the
        # CPU time the process tree used rather than by the exit code.
        cpu_killed = rc != 0 and cpu_used >= 0.95 * max(1, int(config.cpu_seconds))
        if timed_out or cpu_killed:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc == _SETUP_FAILED:
            status = "error"
        else:
            status = "failed"
        return SandboxResult(status, rc, duration, stderr=_tail(err_path, config.tail_chars),
                             stdout=_tail(out_path, config.tail_chars), isolation=mode)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def run_programs(sources: Sequence[str], config: SandboxConfig | None = None,
                 workers: int = 2) -> list[SandboxResult]:
    """Run many programs, each in its own sandbox, ``workers`` at a time; results keep the order."""
    if not sources:
        return []
    _namespace_prefix()  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, config), sources))
