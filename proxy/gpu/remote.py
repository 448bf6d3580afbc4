"""GpuSource over HTTP: ``GET /gpus`` of an emulator or of a remote ``ollamux agent``."""

from __future__ import annotations

import aiohttp

from proxy.gpu import GpuReading


class HttpGpuSource:
    """Reads ``{"gpus": [...]}`` from ``url`` with the shared client session.

    ``token``, when given, goes as ``Authorization: Bearer TOKEN`` (an agent's ``--token``).
    """

    def __init__(
        self, session: aiohttp.ClientSession, url: str, *, timeout: float = 2.0, token: str = ""
    ) -> None:
        self._session = session
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def read(self) -> list[GpuReading]:
        async with self._session.get(
            self._url, timeout=self._timeout, headers=self._headers
        ) as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
        return [GpuReading.from_json(item) for item in data.get("gpus", [])]
