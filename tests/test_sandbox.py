"""Containment of the code sandbox: each threat is tried for real and must fail harmlessly."""

import os
import socket
import threading
import time

import pytest

from l2d.eval.sandbox import SandboxConfig, isolation, run_program, run_programs

# Tight limits keep every test short; the defaults are for real evaluation.
FAST = SandboxConfig(timeout=2.0, cpu_seconds=2, memory_mb=512, max_processes=8)
HAS_NAMESPACES = isolation(SandboxConfig(audit_hook=False)) == "namespaces"
needs_namespaces = pytest.mark.skipif(not HAS_NAMESPACES, reason="unshare is not usable here")


def run(source, **overrides):
    cfg = SandboxConfig(**{**FAST.__dict__, **overrides})
    return run_program(source, cfg)


def test_correct_code_passes_and_output_is_captured():
    r = run("print(sum(range(10)))\nassert 1 + 1 == 2\n")
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.stdout.strip() == "45"
    assert 0 < r.duration < 2


def test_failing_assertion_and_exit_codes_fail():
    r = run("assert 1 + 1 == 3, 'arithmetic is broken'")
    assert r.status == "failed" and not r.passed
    assert "arithmetic is broken" in r.stderr
    assert run("raise SystemExit(3)").returncode == 3
    assert run("def f(:\n  pass").status == "failed"  # a syntax error is the program's failure


def test_infinite_loop_times_out_on_the_wall_clock():
    start = time.monotonic()
    r = run("while True:\n    pass\n", timeout=1.0, cpu_seconds=30)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 5


def test_cpu_limit_counts_as_timeout():
    r = run("while True:\n    pass\n", timeout=20.0, cpu_seconds=1)
    assert r.status == "timeout"
    assert r.duration < 10


@pytest.mark.parametrize("source", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nwhile True:\n    subprocess.Popen(['python3', '-c', 'pass'])\n",
    "import os\nos.system('yes > /dev/null &')\n",
    "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()\n",
    "import _posixsubprocess\n_posixsubprocess.fork_exec()\n",
    "import ctypes\nctypes.CDLL(None).fork()\n",
])
def test_fork_bomb_is_contained(source):
    before = len(os.listdir("/proc"))
    r = run(source)
    assert r.status == "failed", r
    assert "PermissionError" in r.stderr
    assert r.duration < 2
    assert len(os.listdir("/proc")) < before + 20  # no stray processes on the test machine


@pytest.mark.parametrize("source", [
    "x = bytearray(8 * 1024 ** 3)\n",
    "x = [0] * (2 * 1024 ** 3)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 ** 2))\n",
])
def test_huge_allocation_fails(source):
    r = run(source)
    assert r.status == "failed"
    assert "MemoryError" in r.stderr
    assert r.duration < 2


@pytest.mark.parametrize("how", ["open", "os_open", "symlink", "pathlib", "rename_into"])
def test_writing_outside_the_sandbox_fails(tmp_path, how):
    target = tmp_path / "escaped.txt"
    source = {
        "open": f"open({str(target)!r}, 'w').write('pwned')",
        "os_open": f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        "symlink": f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('pwned')",
        "pathlib": f"import pathlib\npathlib.Path({str(target)!r}).write_text('pwned')",
        "rename_into": f"import os\nopen('mine', 'w').write('pwned')\nos.rename('mine', {str(target)!r})",
    }[how]
    r = run(source)
    assert r.status == "failed"
    assert "PermissionError" in r.stderr
    assert not target.exists()


@pytest.mark.parametrize("how", ["remove", "unlink", "rmtree", "rename", "truncate", "chmod"])
def test_caller_files_survive(tmp_path, how):
    victim = tmp_path / "data" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    source = {
        "remove": f"import os\nos.remove({str(victim)!r})",
        "unlink": f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        "rmtree": f"import shutil\nshutil.rmtree({str(victim.parent)!r})",
        "rename": f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        "truncate": f"import os\nos.truncate({str(victim)!r}, 0)",
        "chmod": f"import os\nos.chmod({str(victim)!r}, 0)",
    }[how]
    r = run(source)
    assert r.status == "failed"
    assert victim.read_text() == "keep me"
    assert oct(victim.stat().st_mode & 0o777) != "0o0"


@pytest.fixture
def listening_server():
    """A TCP server on the host's loopback that records whether anybody connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(1.0)
    connected = []

    def accept():
        try:
            conn, _ = server.accept()
            connected.append(True)
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    server.close()
    thread.join(timeout=5)


CONNECT = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
           "s.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n")


@pytest.mark.parametrize("layers", [
    {},  # everything on
    {"namespaces": False},  # the audit hook alone
    pytest.param({"audit_hook": False}, marks=needs_namespaces),  # the network namespace alone
])
def test_network_connect_fails(listening_server, layers):
    port, connected = listening_server
    r = run(CONNECT.format(port=port), **layers)
    assert r.status == "failed"
    assert "connected" not in r.stdout
    time.sleep(0.1)
    assert not connected


def test_network_reachable_without_the_sandbox_layers(listening_server):
    # The control for the test above: the same program does connect when nothing blocks it.
    port, connected = listening_server
    r = run(CONNECT.format(port=port), namespaces=False, audit_hook=False)
    assert r.passed and "connected" in r.stdout


@needs_namespaces
def test_escaped_background_process_is_killed(tmp_path):
    # With the audit hook off, a child detaches (setsid) and would write a file a second later;
    # the pid namespace must kill it when the sandbox ends.
    marker = tmp_path / "still_alive"
    source = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.0)\n"
              f"    open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\nprint('parent done')\n")
    r = run(source, audit_hook=False)
    assert r.passed
    time.sleep(1.5)
    assert not marker.exists()


def test_throwaway_working_directory():
    r = run("import os, tempfile\nprint(os.getcwd())\nprint(os.environ['HOME'])\n"
            "print(tempfile.gettempdir())\nopen('scratch.txt', 'w').write('ok')\n")
    assert r.passed
    cwd, home, tmp = r.stdout.split()
    assert cwd == home == tmp
    assert not os.path.exists(cwd)  # deleted after the run


def test_limits_are_set_and_cannot_be_raised():
    r = run("import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", max_processes=5)
    assert "(5, 5)" in r.stdout
    assert r.status == "failed"


def test_parallel_runner_keeps_order():
    sources = [f"print({i})" if i % 3 else f"raise ValueError({i})" for i in range(8)]
    results = run_programs(sources, FAST, workers=2)
    assert [r.passed for r in results] == [bool(i % 3) for i in range(8)]
    assert [r.stdout.strip() for r in results if r.passed] == [str(i) for i in range(8) if i % 3]
