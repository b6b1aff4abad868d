"""Channels kept per address that follow the certificate files.

A gRPC channel keeps the credentials it was made with: every reconnect of
its connection presents the same certificate and trusts the same CA. After
a rotation (docs/security.md, "Rotating certificates") a cached channel
would go on presenting a certificate the peers no longer accept, or refuse
theirs, until the process restarts. So every cache of channels asks a
`CredentialWatch` for the generation of its certificate files and replaces
a channel made under an older one; the old channel finishes the calls it
carries (`RETIRE_GRACE`) and closes.

The watch looks at the files' signatures at most once per `CHECK_EVERY`
seconds, and moves to a new generation only once the new set is whole (the
certificate matches the key, the CA file parses): a rotation writes the
files one after the other, and a channel made between two writes would
fail every handshake.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from .config import SecurityConfig
from .security import aio_channel, identity_files, sync_channel

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0       # seconds between two looks at the files' signatures
RETIRE_GRACE = 30.0     # seconds a replaced channel keeps serving the calls it carries

Channel = TypeVar("Channel")


class CredentialWatch:
    """The generation of one identity's certificate, key and CA files (0
    with TLS off): it grows by one each time the files changed and form a
    whole set again."""

    def __init__(self, security: SecurityConfig, identity: str | None, *,
                 check_every: float = CHECK_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._security = security
        self._identity = identity
        self._check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        self._generation = 0
        self._checked_at = float("-inf")
        self._signature = self._read_signature() if security.tls else ()
        self._refused: tuple[Any, ...] = ()      # a signature whose set was not whole (logged once)

    def generation(self) -> int:
        if not self._security.tls:
            return 0
        now = self._clock()
        with self._lock:
            if now - self._checked_at < self._check_every:
                return self._generation
            self._checked_at = now
            signature = self._read_signature()
            if signature == self._signature:
                return self._generation
            problem = self._incomplete()
            if problem is not None:
                if signature != self._refused:
                    self._refused = signature
                    log.warning("security.rotation_incomplete", extra={"identity": self._identity or "client",
                                                                       "problem": problem})
                return self._generation
            self._signature = signature
            self._generation += 1
            log.info("security.channel_credentials_changed", extra={"identity": self._identity or "client",
                                                                     "generation": self._generation})
            return self._generation

    def _paths(self) -> tuple[Any, ...]:
        cert_file, key_file = identity_files(self._security, self._identity)
        return cert_file, key_file, self._security.ca_file

    def _read_signature(self) -> tuple[Any, ...]:
        out = []
        for path in self._paths():
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _incomplete(self) -> str | None:
        """Why the files are not a whole set now (None: they are)."""
        # Imported here: only a rotation needs it, and the CLI starts faster without it.
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert_file, key_file, ca_file = self._paths()
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            authorities = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            return f"cannot read the certificate files: {exc}"
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
            return f"{cert_file} does not match {key_file}"
        if not authorities:
            return f"{ca_file} holds no certificate"
        return None


class _ChannelCache(ABC, Generic[Channel]):
    """One channel per address, replaced when the watch's generation moved."""

    def __init__(self, security: SecurityConfig, identity: str | None,
                 options: Sequence[tuple[str, Any]] = (), watch: CredentialWatch | None = None) -> None:
        self._security = security
        self._identity = identity
        self._options = tuple(options)
        self.watch = watch if watch is not None else CredentialWatch(security, identity)
        self._channels: dict[str, tuple[int, Channel]] = {}

    def get(self, address: str) -> Channel:
        generation = self.watch.generation()
        held = self._channels.get(address)
        if held is not None and held[0] == generation:
            return held[1]
        channel = self._open(address)
        self._channels[address] = (generation, channel)
        if held is not None:
            self._retire(held[1])
        return channel

    def forget(self, address: str) -> None:
        """Close the channel to `address` (after its grace), if there is one."""
        held = self._channels.pop(address, None)
        if held is not None:
            self._retire(held[1])

    def _take_all(self) -> list[Channel]:
        channels = [channel for _, channel in self._channels.values()]
        self._channels = {}
        return channels

    @abstractmethod
    def _open(self, address: str) -> Channel:
        """A new channel to `address` with the files as they are now."""

    @abstractmethod
    def _retire(self, channel: Channel) -> None:
        """Close `channel` once the calls it carries had RETIRE_GRACE to finish."""


class AioChannelCache(_ChannelCache[grpc.aio.Channel]):
    """Asyncio channels; `get` and `close` run on the event loop."""

    def _open(self, address: str) -> grpc.aio.Channel:
        return aio_channel(address, self._security, self._identity, self._options)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=RETIRE_GRACE))
        _retiring.add(task)
        task.add_done_callback(_retiring.discard)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._take_all()), return_exceptions=True)


class SyncChannelCache(_ChannelCache[grpc.Channel]):
    """Blocking channels; safe to use from several threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            return super().get(address)

    def _open(self, address: str) -> grpc.Channel:
        return sync_channel(address, self._security, self._identity, self._options)

    def _retire(self, channel: grpc.Channel) -> None:
        timer = threading.Timer(RETIRE_GRACE, channel.close)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        with self._lock:
            channels = self._take_all()
        for channel in channels:
            channel.close()


# Closing channels the event loop must keep a reference to until they are closed.
_retiring: set[asyncio.Task[None]] = set()
