"""A bounded, explicit shutdown: on SIGTERM or Ctrl-C the server stops taking connections and lets
running requests finish for `grace` seconds; then the engine closes and every unfinished request ends
with an error saying why (a stream's last event, a 503 body), before uvicorn closes the connections."""

from __future__ import annotations

import sys
import threading

import uvicorn

# uvicorn's own limit comes this long after ours, so the final error events are written before it cancels
FLUSH_S = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that closes `engine` `grace` seconds after the first exit signal, at once on a second."""

    def __init__(self, config: uvicorn.Config, engine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._timer is None:
            running, waiting = self.engine.scheduler.counts()
            if running or waiting:
                print(f"gemmarun: shutting down; {running + waiting} request(s) get up to {self.grace:g} s to finish "
                      "(Ctrl-C again to stop now)", file=sys.stderr, flush=True)  # fmt: skip
            reason = f"the server is shutting down and its grace period of {self.grace:g} s ended before this request finished"
            self._timer = threading.Timer(self.grace, self.engine.close, kwargs={"reason": reason})
            self._timer.daemon = True
            self._timer.start()
        else:  # a second signal: stop now, still telling each request why
            self._timer.cancel()
            self.engine.close(reason="the server was stopped (a second interrupt) before this request finished")
        super().handle_exit(sig, frame)


def run(app, engine, host: str, port: int, grace: float, log_level: str) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + FLUSH_S)
    GracefulServer(config, engine, grace).run()
