"""The web chat page: `GET /` serves one static page (static/index.html, chat.css, chat.js; no
build step, nothing fetched from elsewhere) that talks to this server's /v1/models and
/v1/chat/completions like any other OpenAI client.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")


def add_web_page(app: FastAPI) -> None:
    """Mount the page at / and its files under /static/ (the page names them relatively, so it
    also works behind a proxy that serves the API under a path prefix)."""
    app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
