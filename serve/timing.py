"""Per-request hop timings, sent back as ``Server-Timing`` when a client asks (``X-Gliomaseg-Timing: 1``).

The replica times what it does (reading the body, decoding it, the model call's own overhead, the batch
wait, the model, the encode, and its whole handler as ``app``) and gives the handler's wall-clock
window, so a client on the same machine derives the two hops it cannot see: proxy (its send until the
handler starts: loopback, the ingress (HAProxy or Serve's proxy actor), the replica's HTTP server) and
response (the handler's end until it has the whole answer).
"""

from __future__ import annotations

import time

HOPS = ("proxy", "read", "decode", "handle", "wait", "model", "encode", "response")


class Hops:
    """Seconds per named step of one request; ``mark(name)`` closes the step since the previous mark."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.wall_start = time.time()
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.last
        self.last = now

    def split(self, name: str, parts: dict[str, float]) -> None:
        """Close step ``name`` and carve ``parts`` (measured inside it, e.g. by the model) out of it."""
        self.mark(name)
        for key, seconds in parts.items():
            self.parts[key] = self.parts.get(key, 0.0) + seconds
            self.parts[name] -= seconds

    def headers(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        app = time.perf_counter() - self.start
        items = [f"{k};dur={1000 * v:.3f}" for k, v in self.parts.items()] + [f"app;dur={1000 * app:.3f}"]
        return {"Server-Timing": ", ".join(items),
                "X-Timing-Window": f"{self.wall_start:.6f},{self.wall_start + app:.6f}"}


def parse(server_timing: str) -> dict[str, float]:
    """``Server-Timing`` -> {name: milliseconds} (entries without ``dur`` are skipped)."""
    out: dict[str, float] = {}
    for entry in server_timing.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur" and name:
                out[name] = float(value)
    return out


def breakdown(server_timing: str, window: str, sent: float, received: float) -> dict[str, float]:
    """One request's hops in ms (HOPS), from its headers and the client's wall-clock send/receive times."""
    parts = parse(server_timing)
    begin, end = (float(v) for v in window.split(","))
    out = {k: parts.get(k, 0.0) for k in HOPS if k not in ("proxy", "response")}
    out["proxy"] = 1000 * (begin - sent)
    out["response"] = 1000 * (received - end)
    out["total"] = 1000 * (received - sent)
    return out
