"""A webhook receiver for the demo and the tests: a real local HTTP endpoint that
accepts a message only when its Standard Webhooks signature verifies (with the
``standardwebhooks`` library's own verifier) and answers 401 otherwise."""

from __future__ import annotations

import asyncio
from typing import Any

from standardwebhooks import Webhook


class Receiver:
    """A real HTTP endpoint that accepts webhooks only with a valid signature."""

    def __init__(self) -> None:
        self.secret = ""  # the endpoint's signing secret (whsec_...)
        self.received: list[dict[str, Any]] = []
        self.rejected = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            try:
                payload = Webhook(self.secret).verify(body, headers)
                self.received.append({"headers": headers, "payload": payload})
                status = b"204 No Content"
            except Exception:
                self.rejected += 1
                status = b"401 Unauthorized"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
        finally:
            writer.close()

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [r["payload"] for r in self.received if r["payload"]["type"] == event_type]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
