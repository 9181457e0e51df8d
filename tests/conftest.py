"""Session-wide check: the test run leaves no process behind.

At the start the pytest process becomes a *child subreaper* (Linux ``prctl``), so a helper whose
parent died (a checkpoint writer of a SIGKILLed rank, say) is re-parented to pytest instead of to
init and stays visible as its descendant. At the end, after a short grace period, any descendant
still alive (other than pytest's own multiprocessing resource tracker, which exits with pytest, and
megatron's cached results Manager of pytest's own process, shut down first) is listed, killed, and
the session fails.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Dict, List

import pytest

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
GRACE_S = 10.0


def pytest_sessionstart(session: pytest.Session) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children_by_parent() -> Dict[int, List[int]]:
    """{parent pid: [child pids]} of every process, from /proc."""
    tree: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":  # zombies are dead (reaped below)
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _descendants(root: int) -> List[int]:
    tree, found, todo = _children_by_parent(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def _own_resource_tracker() -> int:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None) or -1


def _stop_megatron_results_manager() -> None:
    """Shut down the multiprocessing Manager that megatron-core caches, once per process, as the
    results channel of its checkpoint writer (``filesystem_async._results_queue``). A test that calls
    ``dist_checkpointing.save`` inside the pytest process itself (a NeMo-style save, say) starts it;
    it is pytest's own child and would stop at interpreter exit, so it is not a survivor."""
    module = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    channel = getattr(module, "_results_queue", None)
    manager = getattr(channel, "_manager", None)
    if manager is not None:
        manager.shutdown()
        module._results_queue = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.path.isdir("/proc"):
        return
    _stop_megatron_results_manager()
    deadline = time.monotonic() + GRACE_S
    while True:
        _reap_zombies()
        survivors = [pid for pid in _descendants(os.getpid()) if pid != _own_resource_tracker()]
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not survivors:
        return
    lines = [f"  pid {pid}: {_command(pid)}" for pid in survivors]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap_zombies()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"\n{len(survivors)} process(es) started by the tests outlived them (now killed):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
