"""A loopback delay line: a TCP proxy that holds every chunk for a fixed time in each direction, so a server on
this machine answers as if it were across a network (one round trip costs twice the delay, plus the server).

Used by bench/directory_gcs.py in front of the GCS emulator. Runs in its own thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class DelayLine:
    def __init__(self, target_port: int, delay_seconds: float, host: str = "127.0.0.1"):
        self.target_port = target_port
        self.delay = delay_seconds
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="delayline", daemon=True)

    def __enter__(self) -> DelayLine:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.call_soon(self._loop.stop)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._connection, self.host, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward chunks in order, each no earlier than ``delay`` after it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(1 << 16):
                await queue.put((time.monotonic() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        await queue.put((0.0, b""))
        with contextlib.suppress(ConnectionError, OSError):
            await sender
            writer.close()
