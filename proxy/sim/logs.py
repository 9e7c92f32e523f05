"""The simulator's console log as ComfyUI keeps it (app/logger.py, api_server/services/terminal_service.py):
the last 300 writes as `{"t": ISO time, "m": text}`, served by `/internal/logs` and `/internal/logs/raw`,
and pushed as `logs` messages to the sockets that `PATCH /internal/logs/subscribe`d. The simulator writes
the lines ComfyUI writes for every prompt: "got prompt", "invalid prompt: …", "Prompt executed in …"."""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any

from proxy.sim.hub import SocketHub

CAPACITY = 300
TERMINAL_SIZE = {"cols": 80, "rows": 24}   # what ComfyUI reports without a terminal (its fallback)


class SimLog:
    def __init__(self, hub: SocketHub) -> None:
        self.hub = hub
        self.entries: deque[dict[str, str]] = deque(maxlen=CAPACITY)
        self.subscriptions: set[str] = set()
        self._size_sent = False

    def info(self, message: str) -> None:
        """One logging call: the stream handler writes the message and a newline, then flushes."""
        entries = [{"t": datetime.now().isoformat(), "m": message + "\n"}]
        self.entries.extend(entries)
        for sid in list(self.subscriptions):
            if sid not in self.hub.sockets:
                self.subscriptions.discard(sid)   # ComfyUI drops subscribers whose socket is gone
                continue
            self.hub.send_sync("logs", {"entries": entries, "size": self._new_size()}, sid)

    def _new_size(self) -> dict[str, int] | None:
        """ComfyUI sends the terminal size once, then None while it does not change."""
        if self._size_sent:
            return None
        self._size_sent = True
        return dict(TERMINAL_SIZE)

    def raw(self) -> dict[str, Any]:
        self._size_sent = True
        return {"entries": list(self.entries), "size": dict(TERMINAL_SIZE)}

    def text(self) -> str:
        return "".join(e["t"] + " - " + e["m"] for e in self.entries)
