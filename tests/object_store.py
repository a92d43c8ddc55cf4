"""A real S3-compatible server for the tests (moto's server mode, a subprocess on 127.0.0.1) and a TCP relay
in front of it that can go down, come back, or hold a request mid-upload: the faults of a cluster's store."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from conftest import SAFETY_NET

SECRET = "fgds-test-secret-7c41e9"  # distinctive: a test looks for it in every file and line the run writes
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on a free loopback port; ``auth=True``: every request needs credentials it
    knows (it knows none: access denied)."""

    def __init__(self, auth: bool = False):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > SAFETY_NET:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fs(self):
        """An s3fs filesystem talking to this server directly (not through a relay)."""
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret=SECRET, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


_REQUEST = re.compile(rb"(PUT|GET|HEAD|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")


class Relay:
    """A TCP relay on 127.0.0.1 in front of ``port``. ``down()``: cut every open connection and refuse new
    ones (a store that went away); ``up()``: listen again on the same port. ``hold(pattern)``: the next PUT
    whose path matches is relayed without the rest of its body, and ``held`` is set (an upload in flight).
    ``down_at(pattern, n)``: go down when the n-th PUT matching ``pattern`` arrives (n-1 went through)."""

    def __init__(self, port: int):
        self.target, self.port = port, free_port()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener = None
        self.hold_pattern, self.held = None, threading.Event()
        self.down_pattern, self.down_count, self.went_down = None, 0, threading.Event()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self.listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        with self.lock:
            lst, self.listener = self.listener, None
            conns, self.conns = list(self.conns), set()
        if lst is not None:
            lst.close()
        for c in conns:
            _close(c)
        self.went_down.set()

    def hold(self, pattern: str) -> None:
        self.held.clear()
        self.hold_pattern = re.compile(pattern.encode())

    def down_at(self, pattern: str, n: int) -> None:
        self.went_down.clear()
        self.down_pattern, self.down_count = re.compile(pattern.encode()), n

    def _accept(self, lst) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(client)
                continue
            with self.lock:
                if self.listener is not lst:
                    _close(client), _close(server)
                    return
                self.conns |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream: bool) -> None:
        swallow = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                m = _REQUEST.match(data) if upstream else None
                if m and m.group(1) == b"PUT":
                    path = m.group(2)
                    if self.down_pattern is not None and self.down_pattern.search(path):
                        self.down_count -= 1
                        if self.down_count <= 0:
                            self.down_pattern = None
                            self.down()
                            return
                    if self.hold_pattern is not None and self.hold_pattern.search(path):
                        self.hold_pattern = None
                        head = data.find(b"\r\n\r\n") + 4
                        dst.sendall(data[:head + 16])  # the head and a few bytes of the body, then nothing
                        swallow = True
                        self.held.set()
                        continue
                if not swallow:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(dst)  # a client killed mid-upload: the server sees the connection reset


def _close(s) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
