"""A worker that answers every connection with fixed bytes, then closes it.

For framings a well-behaved ASGI stub never produces: an answer delimited by the
connection closing (no `content-length`, no chunking), which RFC 9112 §6.3 allows and some
servers and proxies send.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class RawWorker:
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next(
                        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length:")),
                        0,
                    )  # fmt: skip
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + body)
                    conn.sendall(self.answer)

    @contextlib.contextmanager
    def running(self) -> Iterator[RawWorker]:
        self._thread.start()
        try:
            yield self
        finally:
            self._sock.close()
