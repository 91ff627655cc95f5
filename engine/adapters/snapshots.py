"""Snapshots of the worker's state in a NATS object store (issue #16): `<magic> <seq> <sig>\\n`
then the state as zlib-compressed JSON. With EVENTS_SIGNING_KEY the snapshot is signed like the
events, and one without a valid signature is not loaded."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import orjson
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from engine.adapters.event_signing import EventSigner
from engine.adapters.leases import with_replicas

BUCKET = "tradeengine_snapshots"
MAGIC = b"tradeengine-snapshot"


class SnapshotStore:
    def __init__(
        self, js: JetStreamContext, name: str, signer: EventSigner | None, replicas: int = 1
    ) -> None:
        self.js, self.name, self.signer, self.replicas = js, name, signer, replicas
        self._store: ObjectStore | None = None

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(BUCKET)
                if self.replicas > 1:
                    await with_replicas(self.js, f"OBJ_{BUCKET}", self.replicas)
            except NotFoundError:
                from nats.js.api import ObjectStoreConfig, StorageType

                self._store = await self.js.create_object_store(
                    BUCKET, ObjectStoreConfig(bucket=BUCKET, storage=StorageType.FILE, replicas=self.replicas)
                )
        return self._store

    def _signature(self, seq: int, stream: str, body: bytes) -> str:
        return "-" if self.signer is None else self.signer.sign(f"snapshot.{self.name}.{seq}.{stream}", body)

    @staticmethod
    def compress(pieces: Iterable[bytes]) -> bytes:
        compressor = zlib.compressobj(1)
        return b"".join(compressor.compress(piece) for piece in pieces) + compressor.flush()

    def encode(self, seq: int, stream: str, body: bytes) -> bytes:
        """`stream`: the EVENTS stream's creation time, so a snapshot of another stream (deleted
        and made again) is told apart."""
        return (
            b"%s %d %s %s\n" % (MAGIC, seq, stream.encode(), self._signature(seq, stream, body).encode())
            + body
        )

    def decode(self, blob: bytes) -> tuple[int, str, dict[str, Any]]:
        head, _, body = blob.partition(b"\n")
        magic, seq_text, stream_bytes, signature = head.split(b" ")
        if magic != MAGIC:
            raise ValueError("not a tradeengine snapshot")
        seq, stream = int(seq_text), stream_bytes.decode()
        if self.signer is not None and signature.decode() != self._signature(seq, stream, body):
            raise ValueError("the snapshot's signature is not the worker's")
        data: dict[str, Any] = orjson.loads(zlib.decompress(body))
        return seq, stream, data

    async def load(self) -> tuple[int, str, dict[str, Any]] | None:
        """(stream sequence it covers, the stream's creation time, the state as data), or None
        if there is none yet."""
        try:
            found = await (await self._bucket()).get(self.name)
        except NotFoundError:
            return None
        return self.decode(found.data or b"")

    async def save(self, seq: int, body: bytes, stream: str) -> int:
        blob = self.encode(seq, stream, body)
        await (await self._bucket()).put(self.name, blob)
        return len(blob)
