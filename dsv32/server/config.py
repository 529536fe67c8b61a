"""ServerConfig: the HTTP server's run-time knobs (`dsv32 serve` maps its flags onto it), read-only
after construction like every config here."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    max_queue: int = 64                     # waiting requests beyond which to answer 503
    max_n: int = 8                          # the largest `n` (choices per request) accepted
    api_key: str | None = None              # when set: every /v1, /tokenize, /detokenize request
                                            # needs `Authorization: Bearer <api_key>`
    allowed_origins: tuple[str, ...] = ()   # CORS: origins a browser page may call from ("*": any)
    max_request_bytes: int = 16 << 20       # a larger body is refused with 413
    shutdown_timeout: float = 30.0          # after SIGTERM: seconds in-flight requests may still run
    retry_after: int = 1                    # seconds, in the Retry-After header of a 503

    def __post_init__(self):
        for name in ("max_queue", "max_n", "max_request_bytes"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
