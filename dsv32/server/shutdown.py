"""GracefulServer: uvicorn with a bounded graceful shutdown.

On SIGTERM (or SIGINT) uvicorn stops accepting connections and waits for the open ones to finish,
which a long generation can make last for minutes. Here the requests in flight get
`shutdown_timeout` seconds to finish; then the engine runner ends each with a clear error (a 503
`server_shutting_down`, or that error as the last event of a stream), the connections close, and
the process exits. uvicorn's own timeout, a few seconds later, is the backstop for a client that
does not read its stream.
"""

import threading

import uvicorn

BACKSTOP_S = 5.0


class GracefulServer(uvicorn.Server):
    def __init__(self, app, host: str, port: int, shutdown_timeout: float, runner, **config):
        super().__init__(uvicorn.Config(app, host=host, port=port,
                                        timeout_graceful_shutdown=shutdown_timeout + BACKSTOP_S, **config))
        self.shutdown_timeout, self.runner, self.timer = shutdown_timeout, runner, None

    def handle_exit(self, sig, frame) -> None:
        if self.timer is None:
            self.timer = threading.Timer(self.shutdown_timeout, self.runner.shut_down)
            self.timer.daemon = True
            self.timer.start()
        super().handle_exit(sig, frame)
