"""PostgreSQL for `python -m bench.peers`: our own databases, WAL and table sizes.

Every database this creates is named ``undying_bench_<pid>[_suffix]`` and dropped at the
end; nothing else on the server is written. Bytes written are the WAL the server
generated during a run (``pg_current_wal_insert_lsn()`` before and after): WAL is
per server, not per database, so the transactions committed meanwhile in *other*
databases are counted too and reported with the figure (``others_xacts``): 0 means
the WAL figure is ours alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get("UNDYING_BENCH_PG", DEFAULT_ADMIN_URL)


def db_url(name: str) -> str:
    base, _, _ = admin_url().rpartition("/")
    return f"{base}/{name}"


def bench_db_name(suffix: str = "") -> str:
    return f"undying_bench_{os.getpid()}{'_' + suffix if suffix else ''}"


def _connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def admin() -> Iterator[Any]:
    conn = _connect(admin_url())
    try:
        yield conn
    finally:
        conn.close()


def create_db(name: str) -> str:
    if not name.startswith("undying_bench_"):
        raise ValueError(f"refusing to create {name!r}: not a bench database")
    with admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    return db_url(name)


def drop_db(name: str) -> None:
    if not name.startswith("undying_bench_"):
        raise ValueError(f"refusing to drop {name!r}: not a bench database")
    with admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_info() -> dict[str, Any]:
    with admin() as c:
        def show(name: str) -> str:
            return str(c.execute(f"SHOW {name}").fetchone()[0])

        return {"version": show("server_version"), "synchronous_commit": show("synchronous_commit"),
                "fsync": show("fsync"), "wal_level": show("wal_level"),
                "full_page_writes": show("full_page_writes"), "wal_sync_method": show("wal_sync_method"),
                "wal_compression": show("wal_compression"),
                "default_toast_compression": show("default_toast_compression")}


class WalProbe:
    """WAL bytes generated between `start` and `stop`, with the other databases' commits."""

    def __init__(self, ours: tuple[str, ...]) -> None:
        self.ours = ours
        self.conn = _connect(admin_url())
        self.lsn0: str = ""
        self.others0 = 0

    def _others(self) -> int:
        row = self.conn.execute(
            "SELECT coalesce(sum(xact_commit + xact_rollback), 0) FROM pg_stat_database "
            "WHERE datname IS NOT NULL AND NOT (datname = ANY(%s)) AND datname <> 'postgres'",
            (list(self.ours),)).fetchone()
        return int(row[0])

    def start(self) -> None:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        self.others0 = self._others()
        self.lsn0 = self.conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]

    def stop(self) -> dict[str, int]:
        wal = self.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)",
                                (self.lsn0,)).fetchone()[0]
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        return {"wal_bytes": int(wal), "others_xacts": self._others() - self.others0}

    def close(self) -> None:
        self.conn.close()


def table_bytes(url: str, schema: str, tables: tuple[str, ...] | None = None) -> int:
    """Heap + TOAST + indexes of ``schema``'s tables (or the named ones)."""
    with contextlib.closing(_connect(url)) as c:
        q = ("SELECT coalesce(sum(pg_total_relation_size(cl.oid)), 0) FROM pg_class cl "
             "JOIN pg_namespace ns ON ns.oid = cl.relnamespace "
             "WHERE ns.nspname = %s AND cl.relkind IN ('r', 'p')")
        args: list[Any] = [schema]
        if tables is not None:
            q += " AND cl.relname = ANY(%s)"
            args.append(list(tables))
        return int(c.execute(q, args).fetchone()[0])


def query_int(url: str, sql: str, args: tuple[Any, ...] = ()) -> int:
    with contextlib.closing(_connect(url)) as c:
        row = c.execute(sql, args).fetchone()
        return int(row[0] or 0) if row else 0


def execute(url: str, sql: str, args: tuple[Any, ...] = ()) -> None:
    with contextlib.closing(_connect(url)) as c:
        c.execute(sql, args or None)
