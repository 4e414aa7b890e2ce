"""Live demo sessions by id: bounded in number and closed when idle (the browser keeps only the id)."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Optional

from .sessions import AppConfig, PipelineCache, Session

__all__ = ["SessionStore"]


class SessionStore:
    """Live sessions by id: at most ``config.max_sessions`` (least recently used closed first), idle ones
    closed after ``config.session_ttl_s``. ``clock`` is injectable for tests."""

    def __init__(self, config: AppConfig, cache: PipelineCache, clock: Callable[[], float] = time.monotonic):
        self.config, self.cache, self.clock = config, cache, clock
        self._sessions: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        for sid, (s, t) in list(self._sessions.items()):
            if now - t > self.config.session_ttl_s:
                self._sessions.pop(sid)
                s.close()

    def open(self, sid: Optional[str] = None) -> tuple[Session, str]:
        """``(session, note)``: session ``sid`` (marked as used), or a new one; ``note`` says why it is new."""
        with self._lock:
            self._expire()
            if sid in self._sessions:
                self._sessions.move_to_end(sid)
                s = self._sessions[sid][0]
                self._sessions[sid] = (s, self.clock())
                return s, ""
        s = Session(self.config, self.cache)  # outside the lock: loading concepts takes a moment
        with self._lock:
            self._sessions[s.id] = (s, self.clock())
            while len(self._sessions) > self.config.max_sessions:
                _, (old, _) = self._sessions.popitem(last=False)
                old.close()
        return s, ("" if sid is None else "your previous session expired: started a new one")

    def close(self, sid: Optional[str]) -> None:
        with self._lock:
            got = self._sessions.pop(sid, None) if sid else None
        if got:
            got[0].close()
