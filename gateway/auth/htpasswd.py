"""Apache/nginx htpasswd files: parsing, and re-reading when the file changes.

Lines are `user:hash` (nginx also allows `user:hash:comment`); `#` comments and blank
lines are skipped. Hashes must be an accepted scheme: plaintext and crypt-DES are refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gateway.auth import hashes

log = logging.getLogger("gateway.auth")

# How often the file's stat is looked at; a change is picked up within this time.
CHECK_INTERVAL: Final = 1.0
Stamp = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Htpasswd:
    entries: dict[str, str] = field(default_factory=dict)  # user -> hash
    problems: tuple[str, ...] = ()  # "line N: ..." (never the hash itself)


def parse_htpasswd(data: bytes) -> Htpasswd:
    entries: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            problems.append(f"line {number}: not UTF-8")
            continue
        if not line or line.startswith("#"):
            continue
        user, colon, rest = line.partition(":")
        hashed = rest.partition(":")[0].strip()
        if not colon or not user or not hashed:
            problems.append(f"line {number}: expected `user:hash`")
            continue
        refusal = hashes.refusal(hashed)
        if refusal:
            problems.append(f"line {number}: the password of {user!r} {refusal}")
            continue
        if user in entries:
            problems.append(f"line {number}: {user!r} appears twice")
            continue
        entries[user] = hashed
    return Htpasswd(entries, tuple(problems))


def read_htpasswd(path: str) -> Htpasswd:
    """Parse the file; an unreadable file is one problem (and no users: fail closed)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        return Htpasswd(problems=(f"cannot read {path}: {exc.strerror or exc}",))
    return parse_htpasswd(data)


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class HtpasswdSource:
    """The current contents of one htpasswd file.

    `refresh()` stats the file at most once per CHECK_INTERVAL and re-reads it when its
    mtime, size or inode changed (editors and `htpasswd` replace it by rename). The read is
    synchronous: these files are small and local, and it happens once per change.
    """

    __slots__ = ("path", "_clock", "_next_check", "_stamp", "entries")

    def __init__(self, path: str, *, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._next_check = clock() + CHECK_INTERVAL
        self._stamp = _stamp(path)
        self.entries = read_htpasswd(path).entries  # the config check reported any problem

    def refresh(self) -> bool:
        """True when the file changed and was re-read."""
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_INTERVAL
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        parsed = read_htpasswd(self.path)
        for problem in parsed.problems:
            log.error("auth.htpasswd %s: %s (entry ignored)", self.path, problem)
        self.entries = parsed.entries
        log.info("auth.htpasswd %s re-read: %d users", self.path, len(parsed.entries))
        return True
