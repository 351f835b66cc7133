"""A private, throwaway PostgreSQL cluster in a directory we own (devnet and tests).

Used only when the operator did not configure `DATABASE_URL`: `make run` keeps its cluster under
`.devnet/postgres/`, the test suite under a temp dir. Nothing here touches a system cluster.

Layout of `data_dir`: `pgdata/` (the cluster), `server.log` (server output, appended), `run/` (the
unix socket). Listening is on 127.0.0.1 only, with trust auth, so the DSN carries no secret.

Guarantees
- `start()` returns the DSN only once asyncpg has connected with it and run a query. An initialized
  `data_dir` is reused (no initdb); a server left running on it by a process that died is stopped
  first. If `start()` fails, no server process is left behind.
- `stop()` is idempotent and returns only once no server process of this cluster is alive: fast
  shutdown, then immediate, then SIGKILL.
- `restart()` keeps the port, so a DSN handed out earlier stays valid.
- `durable=False` (default) turns fsync, synchronous_commit and full_page_writes off: fast, but a
  machine crash may lose the cluster. `durable=True` keeps PostgreSQL's defaults (crash tests).
- Every subprocess is async and bounded by a timeout; failures raise `PostgresError` carrying the
  tail of `server.log`.
- PostgreSQL refuses to run as root, so as root the binaries run as the `postgres` system user via
  `runuser`: `data_dir` is chowned to it, and each parent directory of `data_dir` that user cannot
  traverse gets o+x (nothing else changes). As any other user the binaries run as that user.
- That o+x may be taken away again: every pytest session run as root resets `/tmp/pytest-of-root`
  to 0700, which made a running server PANIC at its next checkpoint (it reopens pg_control through
  the -D path). So as root the server gets `-D /proc/self/cwd` and runs in pgdata: that path does
  not go through the parents. Readiness checks and stops are done by us, not by `pg_ctl` (which
  reaches pgdata by its path, and `pg_ctl start -w` then waits out its whole timeout). Only initdb
  and the launch of the postmaster still need the parents; `start()` re-applies the o+x and retries
  when they lost access.
- A cluster still running when the interpreter exits normally gets a fast-shutdown signal from an
  atexit hook; after SIGKILL of our process the next `start()` on the same `data_dir` cleans up.

Backends: Debian's binaries (the highest `/usr/lib/postgresql/<version>/bin` that has initdb,
pg_ctl and postgres), else the binaries bundled in the `pgserver` wheel (`pip install
'facilitator[devnet]'`). Both are driven the same way and give the same kind of DSN (TCP on
127.0.0.1). pgserver's own Python API is not used: as root it silently creates a system user, it
is synchronous, and it offers no restart or kill. `FACILITATOR_PG_BACKEND=debian|pgserver` forces
one.

Linux only (processes are identified through /proc). Not supported: two `PostgresCluster` objects
on one `data_dir` at the same time.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import asyncpg

log = logging.getLogger(__name__)

BACKEND_ENV = "FACILITATOR_PG_BACKEND"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
# pg_ctl is not run, but a bin dir without it is a broken or partial installation.
REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres")
SERVER_OS_USER = "postgres"  # the account the binaries run as when we are root
DB_USER = "postgres"
DB_NAME = "postgres"
MAX_CONNECTIONS = 200

INITDB_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60.0  # also covers crash recovery after an immediate stop or a kill
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.01
PORT_ATTEMPTS = 3
ACCESS_ATTEMPTS = 3
LOG_TAIL_BYTES = 4000
SUN_PATH_MAX = 107  # bytes usable in a unix socket path (sockaddr_un.sun_path minus the NUL)

StopMode = Literal["fast", "immediate"]
# The signals `pg_ctl stop -m <mode>` sends to the postmaster.
STOP_SIGNALS: dict[str, signal.Signals] = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class PostgresError(RuntimeError):
    """The throwaway cluster could not be found, started or stopped."""


# ---------------------------------------------------------------- backends


@dataclass(frozen=True)
class PostgresBackend:
    """Where the PostgreSQL programs come from."""

    name: str  # "debian" | "pgserver"
    bin_dir: Path

    def program(self, name: str) -> str:
        return str(self.bin_dir / name)


def find_backend(forced: str | None = None, *, debian_root: Path = DEBIAN_ROOT) -> PostgresBackend:
    """Debian's binaries if present, else pgserver's. `forced`, or else $FACILITATOR_PG_BACKEND,
    picks one of them."""
    choice = (forced if forced is not None else os.environ.get(BACKEND_ENV, "")).strip().lower()
    finders = {"debian": lambda: _debian_backend(debian_root), "pgserver": _pgserver_backend}
    if choice and choice not in finders:
        raise PostgresError(f"{BACKEND_ENV}={choice!r}: expected 'debian' or 'pgserver'")
    problems = []
    for name, finder in finders.items():
        if choice and name != choice:
            continue
        try:
            return finder()
        except PostgresError as exc:
            problems.append(str(exc))
    raise PostgresError("no usable PostgreSQL binaries: " + "; ".join(problems))


def _debian_backend(debian_root: Path) -> PostgresBackend:
    versions = sorted(
        (_version_key(d.name), d / "bin") for d in _subdirs(debian_root) if _version_key(d.name)
    )
    for _, bin_dir in reversed(versions):  # highest version first
        if not _missing_programs(bin_dir):
            return PostgresBackend("debian", bin_dir)
    raise PostgresError(
        f"debian: no {debian_root}/<version>/bin with {', '.join(REQUIRED_PROGRAMS)} "
        "(apt-get install postgresql)"
    )


def _pgserver_backend() -> PostgresBackend:
    # find_spec locates the wheel without importing it: importing pgserver has side effects
    # (runtime-dir warnings, lock files) and we only need its bundled binaries.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise PostgresError("pgserver: not installed (pip install 'facilitator[devnet]')")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"  # layout of pgserver 0.1.4
    missing = _missing_programs(bin_dir)
    if missing:
        raise PostgresError(f"pgserver: {bin_dir} lacks {', '.join(missing)}")
    return PostgresBackend("pgserver", bin_dir)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def _version_key(name: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return ()
    return tuple(int(part) for part in name.split("."))


def _missing_programs(bin_dir: Path) -> list[str]:
    return [p for p in REQUIRED_PROGRAMS if not os.access(bin_dir / p, os.X_OK)]


# ---------------------------------------------------------------- the cluster


class PostgresCluster:
    """One throwaway cluster living in `data_dir`; see the module docstring for the guarantees."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        durable: bool = False,
        backend: PostgresBackend | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.durable = durable
        self.backend = backend or find_backend()
        self._port = port
        # A port we picked ourselves may be replaced if someone grabbed it before the server
        # bound it, but only until a DSN has been handed out.
        self._may_change_port = port is None
        self._started = False
        self._launcher: asyncio.subprocess.Process | None = None

    # ---- public API

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def dsn(self) -> str:
        if self._port is None:
            raise PostgresError("the cluster has not been started yet")
        return f"postgresql://{DB_USER}@127.0.0.1:{self._port}/{DB_NAME}"

    def is_running(self) -> bool:
        """Whether any server process of this cluster is alive (whoever started it)."""
        return bool(self._server_pids())

    async def start(self) -> str:
        """Initialize `data_dir` if needed, start the server and return its DSN once it answers."""
        if self._started and self.is_running():
            return self.dsn
        began = time.monotonic()
        self._prepare_data_dir()
        if self.is_running():
            log.warning("stopping a server left running on %s", self.pgdata)
            await self._shutdown("fast")
        try:
            await self._initialize_and_start()
        except BaseException:
            with contextlib.suppress(PostgresError):  # the original error matters more
                await self._shutdown("immediate")
            raise
        self._started = True
        self._may_change_port = False
        _RUNNING[self.pgdata] = self._postmaster_pid() or 0
        log.info("postgres (%s) ready at %s in %.2f s", self.backend.name, self.dsn,
                 time.monotonic() - began)
        return self.dsn

    async def stop(self) -> None:
        """Stop the server; a no-op when nothing runs. Returns once no server process is alive."""
        await self._shutdown("fast")

    async def restart(self, mode: StopMode = "fast") -> str:
        """Stop, then start on the same port; `immediate` skips the shutdown checkpoint, so the
        start runs crash recovery."""
        if mode not in STOP_SIGNALS:
            raise ValueError(f"restart mode must be 'fast' or 'immediate', not {mode!r}")
        await self._shutdown(mode)
        return await self.start()

    async def kill(self) -> None:
        """SIGKILL the postmaster and all its children at once (a crash of the whole server)."""
        self._forget_running()
        await self._kill_server_processes()
        await self._reap_launcher()

    async def __aenter__(self) -> PostgresCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- directory and permissions

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._socket_dir().mkdir(exist_ok=True)
        owner = self._server_account()
        if owner is not None:
            _make_parents_traversable(self.data_dir.resolve(), owner)
            _chown_tree(self.data_dir, owner)
            self.data_dir.chmod(0o700)  # the log and socket are nobody else's business

    def _server_lost_access(self) -> bool:
        """Whether a parent of `data_dir` is (again) closed to the account the server runs as."""
        account = self._server_account()
        return account is not None and not _parents_traversable(self.data_dir.resolve(), account)

    def _server_account(self) -> pwd.struct_passwd | None:
        """The account the binaries must run as, or None to run them as ourselves."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            raise PostgresError(
                f"running as root, PostgreSQL needs a non-root system user {SERVER_OS_USER!r} "
                f"to own the cluster; create it (useradd --system --user-group {SERVER_OS_USER}) "
                "or run as a non-root user"
            ) from None

    def _remove_stale_lock_files(self) -> None:
        # A killed postmaster may stay a zombie until init reaps it (~1.5 s under this VM's init),
        # and a zombie passes PostgreSQL's kill(pid, 0) test for "another postmaster is running"
        # in both lock files. Called only when no server process serves pgdata, so these files
        # are stale; the socket dir holds nothing but this cluster's files.
        stale = [self.pgdata / "postmaster.pid", *self._socket_dir().glob(".s.PGSQL.*")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _socket_dir(self) -> Path:
        return self.data_dir / "run"

    def _socket_dir_arg(self) -> str:
        # A too long socket path makes the postmaster refuse to start; the DSN uses TCP anyway,
        # so in that case go without a unix socket rather than fail.
        socket_file = self._socket_dir() / ".s.PGSQL.65535"
        return str(self._socket_dir()) if len(os.fsencode(socket_file)) <= SUN_PATH_MAX else ""

    # ---- initdb and postmaster

    async def _initialize_and_start(self) -> None:
        for attempt in range(1, ACCESS_ATTEMPTS + 1):
            try:
                if not (self.pgdata / "PG_VERSION").exists():
                    await self._initdb()
                await self._start_server()
                return
            except PostgresError:
                if not (self._server_lost_access() and attempt < ACCESS_ATTEMPTS):
                    raise
            log.warning("%s lost access to %s while starting; restoring o+x and retrying",
                        SERVER_OS_USER, self.data_dir)
            await self._shutdown("immediate")
            self._prepare_data_dir()

    async def _initdb(self) -> None:
        created_by_us = not self.pgdata.exists()
        try:
            await self._run(
                [self.backend.program("initdb"), "-D", str(self.pgdata), "-A", "trust",
                 "-U", DB_USER, "--no-sync", "-E", "UTF8", "--locale=C"],
                timeout=INITDB_TIMEOUT_S, what="initdb",
            )
        except PostgresError:
            # initdb cleans up after itself only if it can still reach pgdata; a half-initialized
            # cluster would later fail to start with a misleading error. Never delete a pgdata
            # that was there before (initdb refused it: not empty).
            if created_by_us:
                shutil.rmtree(self.pgdata, ignore_errors=True)
            raise

    async def _start_server(self) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if self._port is None:
                self._port = _free_port()
            log_offset = _file_size(self.log_path)
            try:
                await self._launch_postmaster()
                await self._wait_until_ready()
                return
            except PostgresError:
                lost_race = "could not bind" in _read_from(self.log_path, log_offset)
                if not (lost_race and self._may_change_port and attempt < PORT_ATTEMPTS):
                    raise
                self._port = None

    async def _launch_postmaster(self) -> None:
        """Spawn the postmaster in its own session: a Ctrl-C in our terminal must not reach it
        (stop() shuts it down in order), and it does not depend on our process staying alive."""
        self._remove_stale_lock_files()
        # Opened by us and inherited: the server never needs to reach the log by its path.
        with open(self.log_path, "ab") as server_log:
            self._launcher = await asyncio.create_subprocess_exec(
                *self._as_server_user([self.backend.program("postgres"), "-D",
                                       self._data_dir_arg(), *self._server_args()]),
                stdin=subprocess.DEVNULL, stdout=server_log, stderr=subprocess.STDOUT,
                cwd=self.pgdata, env=_child_env(), start_new_session=True,
            )

    def _data_dir_arg(self) -> str:
        # As root we opened up parent directories that are not ours, and their owner may close
        # them again. PostgreSQL keeps using the -D path (pg_control at every checkpoint), so give
        # it its working directory through /proc, which does not traverse the parents.
        return "/proc/self/cwd" if self._server_account() is not None else str(self.pgdata)

    def _server_args(self) -> list[str]:
        args = ["-c", "listen_addresses=127.0.0.1", "-p", str(self._port),
                "-k", self._socket_dir_arg(), "-c", f"max_connections={MAX_CONNECTIONS}"]
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"]
        return args

    async def _wait_until_ready(self) -> None:
        """Until asyncpg, through the DSN, reaches *this* server; fails fast if it exits."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._launcher is not None and self._launcher.returncode is not None:
                raise PostgresError(
                    f"postgres exited with code {self._launcher.returncode} while starting on "
                    f"port {self._port}{self._log_tail()}"
                )
            ours, problem = await self._ask_unless_exited()
            if ours:
                return
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"postgres did not accept connections on port {self._port} within "
                    f"{START_TIMEOUT_S:.0f} s (last: {problem}){self._log_tail()}"
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _ask_unless_exited(self) -> tuple[bool, str]:
        """`_answers_from`, abandoned as soon as the postmaster we launched exits."""
        asking = asyncio.ensure_future(_answers_from(self.dsn, self.pgdata))
        if self._launcher is None:
            return await asking
        exiting = asyncio.ensure_future(self._launcher.wait())
        await asyncio.wait({asking, exiting}, return_when=asyncio.FIRST_COMPLETED)
        exiting.cancel()
        if asking.done():
            return asking.result()
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        return False, "postgres exited"

    # ---- shutdown

    async def _shutdown(self, first_mode: StopMode) -> None:
        self._forget_running()
        escalation: tuple[StopMode, ...] = ("fast", "immediate")
        modes = escalation[escalation.index(first_mode):]
        for mode in modes:
            if not self.is_running():
                break
            await self._signal_postmaster(mode)
        if self.is_running():
            log.warning("postgres on %s ignored the shutdown signals; sending SIGKILL", self.pgdata)
            await self._kill_server_processes()
        await self._reap_launcher()

    async def _signal_postmaster(self, mode: StopMode) -> None:
        """What `pg_ctl stop -m <mode> -w` does, without needing the path to pgdata."""
        pid = self._postmaster_pid()
        if pid is None:
            return  # only orphaned children left: the caller escalates to SIGKILL
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, STOP_SIGNALS[mode])
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.is_running() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _kill_server_processes(self) -> None:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while pids := self._server_pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise PostgresError(f"postgres processes {pids} survived SIGKILL{self._log_tail()}")
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _reap_launcher(self) -> None:
        # The process we spawned (runuser, or the postmaster itself) exits with the server;
        # collect its status so no zombie and no asyncio warning stays behind.
        launcher, self._launcher = self._launcher, None
        if launcher is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(launcher.wait(), KILL_TIMEOUT_S)

    def _server_pids(self) -> list[int]:
        """Live postgres processes (postmaster and children) serving our pgdata.

        Found through /proc rather than postmaster.pid, which is stale after a kill and does not
        list the children: every server process runs the `postgres` executable with its working
        directory in pgdata. Zombies have no working directory and are skipped.
        """
        pgdata = str(self.pgdata.resolve())
        return [pid for pid in _all_pids() if _serves(pid, pgdata)]

    def _postmaster_pid(self) -> int | None:
        """The pid in postmaster.pid, if that process is alive and serves pgdata."""
        try:
            first_line = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        pid = int(first_line) if first_line.strip().isdigit() else 0
        return pid if pid and _serves(pid, str(self.pgdata.resolve())) else None

    def _forget_running(self) -> None:
        self._started = False
        _RUNNING.pop(self.pgdata, None)

    # ---- subprocesses

    async def _run(self, argv: list[str], *, timeout: float, what: str) -> str:
        """Run a program to completion (as the server's account when we are root)."""
        process = await asyncio.create_subprocess_exec(
            *self._as_server_user(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=self.data_dir, env=_child_env(),
            start_new_session=True,  # so a timeout can kill runuser and its child together
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except asyncio.TimeoutError:
            raise PostgresError(
                f"{what} timed out after {timeout:.0f} s{self._log_tail()}"
            ) from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        text = output.decode(errors="replace")
        if process.returncode != 0:
            raise PostgresError(
                f"{what} failed with exit code {process.returncode}:\n{text[-LOG_TAIL_BYTES:]}"
                f"{self._log_tail()}"
            )
        return text

    def _as_server_user(self, argv: list[str]) -> list[str]:
        account = self._server_account()
        if account is None:
            return argv
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", account.pw_name, "--", *argv]

    def _log_tail(self) -> str:
        size = _file_size(self.log_path)
        if size == 0:
            return f"\n(no server log at {self.log_path})"
        tail = _read_from(self.log_path, max(0, size - LOG_TAIL_BYTES))
        return f"\n--- tail of {self.log_path} ---\n{tail}"


# ---------------------------------------------------------------- helpers


async def _answers_from(dsn: str, pgdata: Path) -> tuple[bool, str]:
    """Whether a server process of the cluster in `pgdata` answers a query through `dsn`; if not,
    why (not started yet, or another PostgreSQL holds the port)."""
    try:
        # Short: a starting server answers at once ("starting up"), and a port squatter that
        # is not PostgreSQL must not stall the loop that notices our postmaster has exited.
        connection = await asyncpg.connect(dsn, timeout=1)
        try:
            backend_pid = await connection.fetchval("SELECT pg_backend_pid()")
            if _serves(backend_pid, str(pgdata.resolve())):
                return True, ""
            return False, "another PostgreSQL answers on that port"
        finally:
            await connection.close()
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return False, repr(exc)


def _free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    # PG* variables of the operator's shell (PGPORT, PGDATA, PGOPTIONS ...) would silently change
    # what initdb and postgres do; the cluster must behave the same everywhere.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _make_parents_traversable(path: Path, account: pwd.struct_passwd) -> None:
    """Add o+x to each parent of `path` that `account` could not traverse; change nothing else."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for parent in path.parents:
        st = parent.stat()
        if _can_traverse(st, account.pw_uid, groups):
            continue
        log.info("adding o+x to %s so %s can reach the cluster", parent, account.pw_name)
        parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _parents_traversable(path: Path, account: pwd.struct_passwd) -> bool:
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    return all(_can_traverse(parent.stat(), account.pw_uid, groups) for parent in path.parents)


def _can_traverse(st: os.stat_result, uid: int, groups: set[int]) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _chown_tree(root: Path, account: pwd.struct_passwd) -> None:
    """Give everything under `root` to `account` (only entries it does not own already)."""
    for directory, dirnames, filenames in os.walk(root):
        for name in (".", *dirnames, *filenames):
            entry = os.path.join(directory, name)
            if os.lstat(entry).st_uid != account.pw_uid:
                os.lchown(entry, account.pw_uid, account.pw_gid)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _serves(pid: int, pgdata: str) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:  # gone, a zombie, or not ours to inspect
        return False
    in_pgdata = cwd == pgdata or cwd.startswith(pgdata + os.sep)
    return in_pgdata and os.path.basename(exe).split(" ")[0] == "postgres"


# pgdata -> postmaster pid of clusters started and not yet stopped, so that a normal interpreter
# exit does not leak servers.
_RUNNING: dict[Path, int] = {}


@atexit.register
def _stop_leftover_clusters() -> None:
    for pgdata, pid in list(_RUNNING.items()):
        if pid and _serves(pid, str(pgdata.resolve())):  # not a recycled pid
            with contextlib.suppress(OSError):
                os.kill(pid, STOP_SIGNALS["fast"])  # the server finishes shutting down alone
    _RUNNING.clear()
