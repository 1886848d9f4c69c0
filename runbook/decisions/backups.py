"""Database backups as plain data: how they are named in the bucket, which stored objects
make a complete backup, which one a restore means, whether a manifest can be trusted, and
whether a restored database holds what the manifest says.

A backup is two objects under `<prefix><database>/`:

    20261103T020000.482113Z.dump.zst                 the pg_dump archive (custom format)
    20261103T020000.482113Z.dump.zst.manifest.json   written only after the archive is whole

so "complete" means "has a manifest". The id is the UTC start time to the microsecond:
it sorts by age and is unique because backups of one database never overlap (a lock).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MANIFEST_FORMAT = "complianceagent-backup/1"
MANIFEST_SUFFIX = ".manifest.json"
BACKUP_ID_FORMAT = "%Y%m%dT%H%M%S.%fZ"
BACKUP_ID_PATTERN = r"\d{8}T\d{6}\.\d{6}Z"
LATEST = "latest"
# PostgreSQL truncates identifiers longer than this; a truncated name could collide.
MAX_IDENTIFIER = 63


class Compression(enum.StrEnum):
    """How the archive is compressed, and therefore how a restore undoes it."""

    ZSTD = "zstd"  # pg_dump -Fc -Z0, compressed by us in the stream (zstandard)
    GZIP = "gzip"  # pg_dump -Fc with its own zlib compression; stored as written

    @property
    def extension(self) -> str:
        return ".dump.zst" if self is Compression.ZSTD else ".dump"


_KEY = re.compile(
    rf"(?P<id>{BACKUP_ID_PATTERN})\.dump(?:\.zst)?(?P<manifest>{re.escape(MANIFEST_SUFFIX)})?"
)


class BackupNotFound(LookupError):
    """No backup matches what was asked for; the message lists what there is."""


class InvalidManifest(ValueError):
    """A manifest is missing a field, has a wrong one, or does not belong to its archive."""


# --- names ------------------------------------------------------------------------------


def backup_id_for(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime(BACKUP_ID_FORMAT)


def taken_at(backup_id: str) -> dt.datetime:
    return dt.datetime.strptime(backup_id, BACKUP_ID_FORMAT).replace(tzinfo=dt.UTC)


def backups_prefix(prefix: str, database: str) -> str:
    """Where one database's backups live: `postgres/` + `complianceagent/`."""
    return f"{prefix}{database}/"


def dump_key(prefix: str, database: str, backup_id: str, compression: Compression) -> str:
    return f"{backups_prefix(prefix, database)}{backup_id}{compression.extension}"


def manifest_key(archive_key: str) -> str:
    return archive_key + MANIFEST_SUFFIX


def dated_database_name(database: str, purpose: str, at: dt.datetime) -> str:
    """`complianceagent` + `pre_restore` → `complianceagent_pre_restore_20261103t020000z`.

    Lower case, so it never needs quoting in psql; the database part is shortened if the
    whole would exceed PostgreSQL's 63-character limit (the date part must survive).
    """
    suffix = f"_{purpose}_{at.astimezone(dt.UTC):%Y%m%dt%H%M%Sz}"
    return database.lower()[: MAX_IDENTIFIER - len(suffix)] + suffix


# --- which objects make which backups ---------------------------------------------------


@dataclass(frozen=True)
class BackupEntry:
    """One backup as the bucket shows it: its archive and manifest, either may be missing."""

    backup_id: str
    archive_key: str | None = None
    manifest_key: str | None = None
    size: int = 0

    @property
    def complete(self) -> bool:
        return self.archive_key is not None and self.manifest_key is not None

    @property
    def taken_at(self) -> dt.datetime:
        return taken_at(self.backup_id)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.archive_key, self.manifest_key) if k is not None)

    @property
    def state(self) -> str:
        if self.complete:
            return "complete"
        return "incomplete: no manifest" if self.archive_key else "incomplete: no archive"


def catalogue(objects: Iterable[Mapping[str, Any]], prefix: str) -> list[BackupEntry]:
    """Group a bucket listing (`{"key", "size"}` items) into backups, oldest first.

    Objects directly under `prefix` that are not named like a backup are left out: what
    we do not recognise we neither restore nor delete.
    """
    found: dict[str, dict[str, Any]] = {}
    for obj in objects:
        key = str(obj["key"])
        if not key.startswith(prefix):
            continue
        match = _KEY.fullmatch(key[len(prefix) :])
        if match is None:
            continue
        entry = found.setdefault(match["id"], {"backup_id": match["id"]})
        if match["manifest"]:
            entry["manifest_key"] = key
        else:
            entry["archive_key"] = key
            entry["size"] = int(obj.get("size") or 0)
    # A manifest only counts for the archive it was named after.
    entries = []
    for entry in found.values():
        archive = entry.get("archive_key")
        if archive is not None and entry.get("manifest_key", manifest_key(archive)) != (
            manifest_key(archive)
        ):
            entry["manifest_key"] = None
        entries.append(BackupEntry(**entry))
    return sorted(entries, key=lambda e: e.backup_id)


def select_backup(entries: Iterable[BackupEntry], wanted: str) -> BackupEntry:
    """The backup a restore of `wanted` (an id, or `latest`) means.

    `latest` is the newest *complete* backup: an archive without a manifest may be a
    backup that died before it was finished, and is skipped. An id must name a complete
    backup. Raises `BackupNotFound` saying what there is instead.
    """
    entries = list(entries)
    complete = [e for e in entries if e.complete]
    if wanted == LATEST:
        if not complete:
            incomplete = len(entries) - len(complete)
            raise BackupNotFound(
                "there is no complete backup to restore"
                + (f" ({incomplete} incomplete ones, without manifest)" if incomplete else "")
            )
        return max(complete, key=lambda e: e.backup_id)
    for entry in entries:
        if entry.backup_id == wanted:
            if not entry.complete:
                raise BackupNotFound(f"backup {wanted} is {entry.state}; it cannot be restored")
            return entry
    newest = ", ".join(e.backup_id for e in complete[-3:][::-1]) or "none"
    raise BackupNotFound(f"there is no backup {wanted}; newest complete ones: {newest}")


# --- the manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """What a backup holds, written after its archive was stored whole."""

    backup_id: str
    database: str
    archive_key: str
    compression: Compression
    size_bytes: int
    dump_bytes: int
    sha256: str
    started_at: dt.datetime
    finished_at: dt.datetime
    server_version: str
    server_version_num: int
    pg_dump_version: str
    snapshot: str
    row_counts: dict[str, int] = field(default_factory=dict)
    schema_version: str | None = None
    format: str = MANIFEST_FORMAT

    def to_json(self) -> str:
        document = {
            "format": self.format,
            "backup_id": self.backup_id,
            "database": self.database,
            "archive_key": self.archive_key,
            "compression": self.compression.value,
            "size_bytes": self.size_bytes,
            "dump_bytes": self.dump_bytes,
            "sha256": self.sha256,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "server_version": self.server_version,
            "server_version_num": self.server_version_num,
            "pg_dump_version": self.pg_dump_version,
            "snapshot": self.snapshot,
            "schema_version": self.schema_version,
            "row_counts": dict(sorted(self.row_counts.items())),
        }
        return json.dumps(document, indent=2) + "\n"

    @property
    def total_rows(self) -> int:
        return sum(self.row_counts.values())


def _field(document: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in document:
        raise InvalidManifest(f"manifest has no {name!r}")
    value = document[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidManifest(f"manifest field {name!r} has a wrong type: {value!r:.60}")
    return value


def _time(document: Mapping[str, Any], name: str) -> dt.datetime:
    raw = _field(document, name, str)
    try:
        parsed = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidManifest(f"manifest field {name!r} is not a time: {raw!r:.60}") from None
    if parsed.tzinfo is None:
        raise InvalidManifest(f"manifest field {name!r} has no time zone: {raw!r:.60}")
    return parsed


def parse_manifest(text: str | bytes, archive_key: str) -> Manifest:
    """Read and check the manifest of the archive at `archive_key`.

    Raises `InvalidManifest` naming the first thing wrong: not JSON, an unknown format,
    a missing or mistyped field, or a manifest that describes a different archive.
    """
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidManifest(f"manifest is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidManifest("manifest is not a JSON object")
    if document.get("format") != MANIFEST_FORMAT:
        raise InvalidManifest(f"unknown manifest format {document.get('format')!r:.60}")
    if _field(document, "archive_key", str) != archive_key:
        raise InvalidManifest(
            f"manifest describes {document['archive_key']!r:.200}, not {archive_key!r}"
        )
    try:
        compression = Compression(_field(document, "compression", str))
    except ValueError:
        raise InvalidManifest(f"unknown compression {document['compression']!r:.60}") from None
    sha256 = _field(document, "sha256", str)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidManifest(f"manifest sha256 is not a SHA-256 digest: {sha256!r:.80}")
    counts = _field(document, "row_counts", dict)
    for table, rows in counts.items():
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise InvalidManifest(f"row count of {table!r:.80} is not a count: {rows!r:.40}")
    size_bytes = _field(document, "size_bytes", int)
    dump_bytes = _field(document, "dump_bytes", int)
    if size_bytes <= 0 or dump_bytes <= 0:
        raise InvalidManifest("manifest says the archive is empty")
    started_at, finished_at = _time(document, "started_at"), _time(document, "finished_at")
    if finished_at < started_at:
        raise InvalidManifest("manifest finished_at is before started_at")
    backup_id = _field(document, "backup_id", str)
    if not re.fullmatch(BACKUP_ID_PATTERN, backup_id) or backup_id not in archive_key:
        raise InvalidManifest(f"manifest backup_id {backup_id!r:.60} does not match its key")
    schema_version = document.get("schema_version")
    return Manifest(
        backup_id=backup_id,
        database=_field(document, "database", str),
        archive_key=archive_key,
        compression=compression,
        size_bytes=size_bytes,
        dump_bytes=dump_bytes,
        sha256=sha256,
        started_at=started_at,
        finished_at=finished_at,
        server_version=_field(document, "server_version", str),
        server_version_num=_field(document, "server_version_num", int),
        pg_dump_version=_field(document, "pg_dump_version", str),
        snapshot=_field(document, "snapshot", str),
        row_counts=dict(counts),
        schema_version=schema_version if isinstance(schema_version, str) else None,
    )


# --- checks against the manifest -------------------------------------------------------


def archive_problem(manifest: Manifest, size: int, sha256: str) -> str:
    """Empty if the stored archive is the one the manifest describes; else what differs."""
    if size != manifest.size_bytes:
        return f"archive is {size} bytes, the manifest says {manifest.size_bytes}" + (
            " (truncated)" if size < manifest.size_bytes else ""
        )
    if sha256 != manifest.sha256:
        return f"archive SHA-256 is {sha256[:16]}…, the manifest says {manifest.sha256[:16]}…"
    return ""


def row_count_problems(expected: Mapping[str, int], actual: Mapping[str, int]) -> list[str]:
    """Every table whose restored row count differs from the manifest's (empty: all match)."""
    problems = [f"{t}: missing (manifest: {expected[t]} rows)" for t in expected if t not in actual]
    problems += [f"{t}: not in the backup ({actual[t]} rows)" for t in actual if t not in expected]
    problems += [
        f"{t}: {actual[t]} rows, manifest says {expected[t]}"
        for t in expected
        if t in actual and actual[t] != expected[t]
    ]
    return sorted(problems)


# --- for people ---------------------------------------------------------------------------


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(age: dt.timedelta) -> str:
    """`2 d 3 h`, `3 h 12 min`, `4 min`, `40 s` — what an approver needs, no more."""
    seconds = max(0, int(age.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"
