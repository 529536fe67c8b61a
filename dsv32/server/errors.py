"""The server's errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}."""

from fastapi.responses import JSONResponse


class ClientGone(Exception):
    """The client hung up before its request got its first token (answered 499, to nobody)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)
