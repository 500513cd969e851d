"""A local CloudWatch Logs endpoint for tests and benchmarks: moto's server, over HTTP.

The shipper talks to it with its real aiobotocore client; only the endpoint changes
(``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS``), with dummy credentials.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


class LocalCloudWatch:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What a client needs to use this endpoint."""
        return {"AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-west-2"}

    def start(self, timeout: float = 20) -> None:
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
