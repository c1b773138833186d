"""Support for the fault tests: child processes that run a script, a seeded random, session checks.

Each test module holds the text of the script its children run.  Starting a
fresh interpreter and importing SQLAlchemy and a driver takes about half a
second of CPU, which hundreds of children cannot afford on a small machine, so
children come from a *fork server*: a ``python -c`` subprocess that imports
gc3session and the database drivers once, then forks one child per request.
A child is a process of its own from then on: it opens its session after the
fork (nothing is shared with the server but imported modules), runs the
script with its own ``sys.argv`` and environment, and is killed with SIGKILL
by pid.  Its stdout and stderr go to files, so every line it printed and
flushed before a kill is still there to read.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gc3session import Session
from gc3session.exceptions import LoadWarning, RepairWarning
from gc3session.persistence.atomic import TEMP_PREFIX

#: Set this to a seed printed by a failed run to replay the same random choices.
SEED_VARIABLE = "GC3SESSION_FAULT_SEED"
#: How long a child may take to print a line the parent waits for.
CHILD_TIMEOUT = 120.0


def seeded_random(test_name: str) -> tuple[random.Random, str]:
    """A Random for one test and a note to put in failure messages; the seed is printed."""
    seed = os.environ.get(SEED_VARIABLE) or str(random.SystemRandom().randrange(2**32))
    print(f"{test_name}: random seed {seed} (replay with {SEED_VARIABLE}={seed})")
    return random.Random(f"{seed}/{test_name}"), f"[seed {seed}: replay with {SEED_VARIABLE}={seed}]"


#: The fork server.  Requests on stdin, one JSON object a line: ``script``, ``argv``, ``env``, ``out``, ``err``,
#: ``name``.  It answers on stdout ``forked NAME PID`` and, once it has reaped a child, ``exited NAME PID CODE``
#: (CODE is minus the signal number for a child killed by a signal).
FORK_SERVER = r"""
import json, os, select, sys, traceback
import gc3session, gc3session.session, gc3session.persistence.sql
import sqlalchemy.dialects.sqlite.pysqlite, sqlite3, secrets, random
try:
    import psycopg, sqlalchemy.dialects.postgresql.psycopg
except ImportError:
    pass

def run_child(request):
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (devnull, out, err):
            os.close(fd)
        os.environ.update(request["env"])
        sys.argv = ["-c", *request["argv"]]
        exec(compile(request["script"], f"<{request['name']}>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

names = {}
pending = b""
while True:
    while names:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        os.write(1, f"exited {names.pop(pid)} {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
    ready, _, _ = select.select([0], [], [], 0.002)
    if not ready:
        continue
    chunk = os.read(0, 1 << 20)
    if not chunk:
        break
    pending += chunk
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        names[pid] = request["name"]
        os.write(1, f"forked {request['name']} {pid}\n".encode())
"""


class ForkServer:
    """A ``python -c FORK_SERVER`` subprocess that forks children on request."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.out = directory / "fork-server.out"
        self.children: list[Child] = []
        self._count = 0
        with open(self.out, "wb") as stdout, open(directory / "fork-server.err", "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, env=env
            )

    def _answers(self, word: str) -> dict[str, list[str]]:
        found = {}
        for line in self.out.read_text().split("\n")[:-1]:
            fields = line.split()
            if fields and fields[0] == word:
                found[fields[1]] = fields[2:]
        return found

    def _await(self, word: str, name: str, timeout: float = CHILD_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            answer = self._answers(word).get(name)
            if answer is not None:
                return answer
            if self.proc.poll() is not None:
                err = (self.directory / "fork-server.err").read_text()[-3000:]
                raise AssertionError(f"the fork server died ({self.proc.returncode}):\n{err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the fork server gave no {word!r} for {name} in {timeout}s")
            time.sleep(0.001)

    def start(
        self, script: str, args: Iterable[Any], name: str | None = None, env: dict[str, str] | None = None
    ) -> Child:
        """Fork a child that runs ``script`` with ``sys.argv[1:] == args`` (and ``env`` added to its environment)."""
        self._count += 1
        name = f"{name or 'child'}-{self._count}"
        out = self.directory / f"{name}.out"
        request = {
            "script": script, "argv": [str(a) for a in args], "env": env or {}, "name": name,
            "out": str(out), "err": str(out.with_name(out.name + ".err")),
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        pid = int(self._await("forked", name)[0])
        child = Child(self, name, pid, out)
        self.children.append(child)
        return child

    def exit_code(self, name: str) -> int | None:
        answer = self._answers("exited").get(name)
        return None if answer is None else int(answer[1])

    def wait(self, name: str, timeout: float = CHILD_TIMEOUT) -> int:
        return int(self._await("exited", name, timeout)[1])

    def close(self) -> None:
        for child in self.children:
            child.kill()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Child:
    """A process forked by a :class:`ForkServer`."""

    def __init__(self, server: ForkServer, name: str, pid: int, out: Path) -> None:
        self.server = server
        self.name = name
        self.pid = pid
        self.out = out
        self.err = out.with_name(out.name + ".err")
        self.returncode: int | None = None

    def lines(self) -> list[str]:
        """The complete lines printed so far (a line cut by a kill is left out)."""
        try:
            text = self.out.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]

    def stderr(self) -> str:
        try:
            return self.err.read_bytes().decode("utf-8", "replace")[-3000:]
        except FileNotFoundError:
            return ""

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.name)
        return self.returncode

    def wait_for(self, word: str, timeout: float = CHILD_TIMEOUT) -> list[str]:
        """Wait until the child prints a line whose first word is ``word``; return that line's other fields."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.poll() is not None
            for line in self.lines():
                fields = line.split()
                if fields and fields[0] == word:
                    return fields[1:]
            if exited:
                raise AssertionError(
                    f"{self.name} exited ({self.returncode}) before printing {word!r}:\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} printed no {word!r} line in {timeout}s:\n{self.stderr()}")
            time.sleep(0.001)

    def kill(self) -> None:
        """SIGKILL, and wait until the fork server has reaped the child."""
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.returncode = self.server.wait(self.name)

    def finish(self, timeout: float = CHILD_TIMEOUT) -> list[str]:
        """Wait for a normal exit; fail with the child's stderr otherwise; return its lines."""
        try:
            self.returncode = self.server.wait(self.name, timeout)
        except AssertionError:
            self.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout}s:\n{self.stderr()}") from None
        assert self.returncode == 0, f"{self.name} failed ({self.returncode}):\n{self.stderr()}"
        return self.lines()

    def assert_quiet(self, context: str = "") -> None:
        """The child printed no warning and no traceback (a RepairWarning, say, means it found damage)."""
        text = self.stderr()
        assert "Warning" not in text and "Traceback" not in text, f"{self.name} complained {context}:\n{text}"


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """One fork server for the whole test run."""
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


@pytest.fixture(name="children")
def children_fixture(fork_server: ForkServer) -> Iterator[ForkServer]:
    """The fork server; every child a test started is killed when the test ends.

    Tests ask for it as ``children``; import it as ``children_fixture`` so that the
    parameter does not shadow an imported name.
    """
    before = len(fork_server.children)
    yield fork_server
    for child in fork_server.children[before:]:
        child.kill()


def open_checked(path: Path | str, context: str = "") -> Session:
    """``Session(path)``, failing on any LoadWarning or RepairWarning and on any load error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = Session(path)
    bad = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (LoadWarning, RepairWarning))
    ]
    try:
        assert not bad, f"opening the session warned {context}: {bad}"
        assert session.load_errors == {}, f"tasks failed to load {context}: {session.load_errors}"
    except BaseException:
        session.store.close()
        raise
    return session


def index_file_lines(path: Path | str) -> list[str]:
    """The non-blank lines of a session's index.txt, exactly as written (duplicates kept)."""
    text = Path(path, Session.INDEX_FILENAME).read_bytes().decode("utf-8", "replace")
    return [line.strip() for line in text.split("\n") if line.strip()]


def temp_files(*directories: Path | str) -> list[str]:
    """Temporary files (``.tmp-*``) below the directories."""
    found: list[str] = []
    for directory in directories:
        if os.path.isdir(directory):
            found += [str(p) for p in Path(directory).rglob(f"{TEMP_PREFIX}*")]
    return found


def assert_no_temp_ids(session: Session, context: str = "") -> None:
    """No temporary file is taken for a task: neither the session nor its store lists one."""
    listed = session.store.list()
    bogus = [oid for oid in [*session.list_ids(), *listed] if oid.startswith(TEMP_PREFIX) or TEMP_PREFIX in oid]
    assert not bogus, f"temporary files taken for tasks {context}: {bogus[:5]}"
