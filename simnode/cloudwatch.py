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

from simnode.netns import socket_in


class LocalCloudWatch:
    """``netns``: serve on that namespace's loopback (where a simulated node's processes
    run); None: this one's."""

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        with socket_in(netns, socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What a client needs to use this endpoint."""
        return {
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-west-2",
        }

    def start(self, timeout: float = 20) -> None:
        exe = Path(sys.executable).parent / "moto_server"
        enter = [] if self.netns is None else ["nsenter", f"--net=/run/netns/{self.netns}"]
        self.proc = subprocess.Popen(
            [*enter, str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setblocking(True)
                s.settimeout(0.2)
                try:
                    s.connect(("127.0.0.1", self.port))
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
