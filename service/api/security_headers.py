"""Headers that tell browsers how to treat every answer, as ASGI middleware.

- Every response: `X-Content-Type-Options: nosniff` (a browser takes a body only as the type it
  was sent as) and `Cache-Control: no-store` (answers carry subject data, fetched with API keys:
  no browser or proxy cache keeps them).
- Every HTML page besides: a Content Security Policy that loads nothing from anywhere, runs no
  script and may not be framed (the audit report needs only its inline style sheet and SVG), and
  `Referrer-Policy: no-referrer`.

A header the route set itself wins: the dashboard's page allows its own script and fetches, and
the artifact and the dashboard's files are cached (`no-cache`, revalidated).
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Inline styles only: the report's style sheet and the style attributes of matplotlib's SVG.
PAGE_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")

EVERY_RESPONSE = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))
HTML_PAGE = ((b"content-security-policy", PAGE_POLICY.encode()), (b"referrer-policy", b"no-referrer"))


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_security_headers(message.get("headers", []))}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The response's headers and the defaults above that it does not set itself."""
    given = {name.lower(): value for name, value in headers}
    defaults = EVERY_RESPONSE + (HTML_PAGE if given.get(b"content-type", b"").startswith(b"text/html") else ())
    return [*headers, *((name, value) for name, value in defaults if name not in given)]
