"""A real MQTT broker for tests: Debian's mosquitto on a free 127.0.0.1 port.

::

    with MosquittoServer() as broker:              # anonymous clients allowed
        settings = MqttSettings(url=broker.url)

    with MosquittoServer(users={"canaryd": "pw", "alice": "pw"}, acl="...") as broker:
        ...                                        # passwords and an ACL, no anonymous

:meth:`MosquittoServer.stop` and :meth:`MosquittoServer.start` again reuse the port,
to play "the broker went away and came back"; with ``persistence=True`` the broker
saves its retained messages and persistent sessions on the way down and restores them.

This module does not need pytest; only :func:`require_mosquitto` does, and imports it
when called.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.services import _die_with_parent, _free_port, _Owned

__all__ = [
    "MOSQUITTO",
    "MOSQUITTO_PASSWD",
    "MosquittoError",
    "MosquittoServer",
    "require_mosquitto",
]

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
_READY_POLL_S = 0.02


class MosquittoError(RuntimeError):
    """mosquitto did not start or exited; the message has its log tail."""


def mosquitto_binary() -> str | None:
    """The broker executable, or ``None`` when mosquitto is not installed."""
    if os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    return shutil.which("mosquitto")


def require_mosquitto() -> str:
    """The broker executable; skips the calling test when mosquitto is not installed."""
    binary = mosquitto_binary()
    if binary is None:
        import pytest

        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    return binary


class MosquittoServer:
    """mosquitto listening on 127.0.0.1.

    Args:
        allow_anonymous: let clients connect without a username (default: only when
            no ``users`` are given).
        users: username → password, written to a password file with
            ``mosquitto_passwd``.
        acl: the text of an ACL file (``user``, ``topic``, ``pattern`` lines).
        persistence: save retained messages and sessions across :meth:`stop` /
            :meth:`start` (in the temporary directory).
        tls: speak MQTT over TLS (``mqtts://``) with a server certificate for
            127.0.0.1 issued by a throwaway CA (:attr:`ca_file`), made with ``openssl``.
        port: default: a free one, picked by the first :meth:`start`.
        ready_timeout_s: how long :meth:`start` waits for the port to accept.
    """

    def __init__(
        self,
        *,
        allow_anonymous: bool | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = False,
        tls: bool = False,
        port: int | None = None,
        ready_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.users = dict(users or {})
        self.allow_anonymous = not self.users if allow_anonymous is None else allow_anonymous
        self.acl = acl
        self.persistence = persistence
        self.tls = tls
        self._port = port
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self._owned = _Owned(self.workdir)
        self._finalizer = weakref.finalize(self, _Owned.close, self._owned)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("MosquittoServer has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` (``mqtts://`` with ``tls``)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """With ``tls``: the CA that issued the broker's certificate."""
        return self.workdir / "ca.pem"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """The broker's output, appended to across restarts."""
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        proc = self._owned.proc
        return proc is not None and proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            raise RuntimeError(f"mosquitto is already running on {self.url}")
        self._owned.stop(self.stop_timeout_s)
        binary = mosquitto_binary()
        if binary is None:
            raise MosquittoError("mosquitto is not installed (apt-get install -y mosquitto)")
        if self._port is None:
            self._port = _free_port()
        self._write_config()
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting on port {self.port}\n".encode())
            log.flush()
            self._owned.proc = subprocess.Popen(
                [*_die_with_parent(), binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            self._wait_ready()
        except BaseException:
            self._owned.stop(self.stop_timeout_s)
            raise

    def stop(self) -> None:
        """SIGTERM the broker and wait for it to exit; keeps the port and directory."""
        self.resume()  # a paused broker cannot handle SIGTERM
        self._owned.stop(self.stop_timeout_s)

    def pause(self) -> None:
        """SIGSTOP the broker: connections stay open but nothing is answered (a hung
        broker, or a network that drops packets)."""
        proc = self._owned.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the broker after :meth:`pause`."""
        proc = self._owned.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """:meth:`stop`, and remove the temporary directory."""
        self.resume()
        self._owned.close(self.stop_timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "no port yet"
        return f"<MosquittoServer {where} {'running' if self.running else 'stopped'}>"

    # -- internals ----------------------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:  # as root, mosquitto drops to the `mosquitto` user otherwise
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        else:
            lines.append("persistence false")
        if self.tls:
            cert, key = self._make_certificates()
            lines += [f"cafile {self.ca_file}", f"certfile {cert}", f"keyfile {key}"]
        if self.users:
            lines.append(f"password_file {self._write_passwords()}")
        if self.acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(self.acl)
            acl_path.chmod(0o600)
            lines.append(f"acl_file {acl_path}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def _make_certificates(self) -> tuple[Path, Path]:
        """A CA and a server certificate for 127.0.0.1 (once per server)."""
        cert, key = self.workdir / "server.pem", self.workdir / "server.key"
        if cert.exists():
            return cert, key
        openssl = shutil.which("openssl")
        if openssl is None:
            raise MosquittoError("tls needs the openssl command")
        ca_key, csr = self.workdir / "ca.key", self.workdir / "server.csr"
        ext = self.workdir / "server.ext"
        ext.write_text(
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for argv in (
            ["req", "-x509", *ec, "-keyout", ca_key, "-out", self.ca_file, "-days", "2",
             "-subj", "/CN=canaryd test CA"],
            ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", ca_key,
             "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext],
        ):  # fmt: skip
            subprocess.run([openssl, *map(str, argv)], check=True, capture_output=True)
        key.chmod(0o600)
        return cert, key

    def _write_passwords(self) -> Path:
        path = self.workdir / "passwd"
        if not os.access(MOSQUITTO_PASSWD, os.X_OK):
            raise MosquittoError(f"users need {MOSQUITTO_PASSWD} (package mosquitto)")
        path.unlink(missing_ok=True)
        for i, (user, password) in enumerate(self.users.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run(
                [MOSQUITTO_PASSWD, "-b", *create, str(path), user, password],
                check=True,
                capture_output=True,
            )
        path.chmod(0o600)
        return path

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            proc = self._owned.proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                raise MosquittoError(f"mosquitto exited ({code}) on start\n{self._tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise MosquittoError(
                    f"mosquitto did not listen on {self.url} within {self.ready_timeout_s:g}s\n"
                    f"{self._tail()}"
                )
            time.sleep(_READY_POLL_S)

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path}:\n{tail}"
