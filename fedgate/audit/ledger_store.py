"""The ledger's SQLite adapter (synchronous; one connection, one thread at a time).

Rules of this module:

1. Its own database file in WAL mode; tables ``entries`` (one row per audited message, ``seq`` the
   primary key) and ``checkpoints``. Nothing here hashes or signs: that is ``ledger_core``.
2. Blocking calls: the asyncio writer (``ledger_writer``) runs them on its own single thread; the
   CLI calls them directly.
3. Reads return entries in ``seq`` order exactly as stored, so verification sees what is on disk.
4. A batch is written with few statements: multi-row INSERTs of up to ``K_ROWS_PER_INSERT`` rows.
   The sqlite3 module releases the GIL around every statement step, and the writer thread must win
   it back each time from the event loop's thread: beside a thread running Python without pause, a
   40-row batch took 232-245 ms by ``executemany`` (one step per row) against 16-21 ms in three
   statements (``BEGIN``, one INSERT, ``COMMIT``): ``fedgate bench audit --micro``, case
   ``ledger_batch_beside_busy_thread``. The gain comes from the competition for the GIL.
"""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Literal

from fedgate.audit.ledger_core import K_GENESIS, Checkpoint, LedgerEntry, LedgerRecord
from fedgate.errors import ConfigError

__all__ = ["LedgerStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    direction TEXT NOT NULL,
    src_party TEXT NOT NULL,
    dst_party TEXT NOT NULL,
    session_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    message_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    verdict TEXT NOT NULL,
    rule TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_session ON entries (session_id, message_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    ts REAL NOT NULL,
    signature TEXT NOT NULL,
    public_key TEXT NOT NULL
);
"""

_COLUMNS = (
    "seq, ts, direction, src_party, dst_party, session_id, topic, message_id, size, sha256, verdict, rule, "
    "prev_hash, hash"
)
_WIDTH = _COLUMNS.count(",") + 1  # values per row
_ROW = "(" + ", ".join("?" * _WIDTH) + ")"
K_ROWS_PER_INSERT = 64  # rows per INSERT statement (64 x 14 variables, under SQLite's oldest limit of 999)


class LedgerStore:
    """Append-only access to one ledger file."""

    def __init__(
        self,
        path: pathlib.Path | str,
        *,
        synchronous: Literal["full", "normal"] = "normal",
        readonly: bool = False,
    ) -> None:
        self.path = pathlib.Path(path)
        if readonly:
            if not self.path.exists():
                raise ConfigError("ledger file not found", source=str(self.path))
            uri = f"file:{self.path.resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry, (0, genesis) when empty."""
        row = self._db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, K_GENESIS)

    def append(self, entries: Sequence[LedgerEntry], checkpoint: Checkpoint | None = None) -> None:
        """Write a batch of entries (and optionally a checkpoint) in one transaction."""
        values: list[object] = []
        for e in entries:
            r = e.record
            values += (e.seq, r.ts, r.direction, r.src_party, r.dst_party, r.session_id, r.topic, r.message_id,
                       r.size, r.sha256, r.verdict, r.rule, e.prev_hash, e.hash)
        step = K_ROWS_PER_INSERT * _WIDTH
        with self._transaction():
            for start in range(0, len(values), step):  # rule 4
                chunk = values[start : start + step]
                rows = ", ".join([_ROW] * (len(chunk) // _WIDTH))
                self._db.execute(f"INSERT INTO entries ({_COLUMNS}) VALUES {rows}", chunk)
            if checkpoint is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO checkpoints (seq, hash, ts, signature, public_key) VALUES (?, ?, ?, ?, ?)",
                    (checkpoint.seq, checkpoint.hash, checkpoint.ts, checkpoint.signature, checkpoint.public_key),
                )

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def entries(
        self, *, first: int = 1, last: int | None = None, session_id: str | None = None
    ) -> Iterator[LedgerEntry]:
        """Entries with ``first <= seq <= last`` (optionally of one session), in seq order."""
        sql = f"SELECT {_COLUMNS} FROM entries WHERE seq >= ?"
        args: list[object] = [first]
        if last is not None:
            sql += " AND seq <= ?"
            args.append(last)
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        for row in self._db.execute(sql + " ORDER BY seq", args):
            yield LedgerEntry(
                seq=int(row[0]),
                record=LedgerRecord(
                    ts=float(row[1]),
                    direction=str(row[2]),
                    src_party=str(row[3]),
                    dst_party=str(row[4]),
                    session_id=str(row[5]),
                    topic=str(row[6]),
                    message_id=str(row[7]),
                    size=int(row[8]),
                    sha256=str(row[9]),
                    verdict=str(row[10]),
                    rule=str(row[11]),
                ),
                prev_hash=str(row[12]),
                hash=str(row[13]),
            )

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._db.execute("SELECT seq, hash, ts, signature, public_key FROM checkpoints ORDER BY seq")
        return [Checkpoint(int(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4])) for r in rows]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
