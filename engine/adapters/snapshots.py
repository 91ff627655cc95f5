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
            except NotFoundError:
                from nats.js.api import ObjectStoreConfig, StorageType

                self._store = await self.js.create_object_store(
                    BUCKET, ObjectStoreConfig(bucket=BUCKET, storage=StorageType.FILE, replicas=self.replicas)
                )
        return self._store

    def _signature(self, seq: int, body: bytes) -> str:
        return "-" if self.signer is None else self.signer.sign(f"snapshot.{self.name}.{seq}", body)

    @staticmethod
    def compress(pieces: Iterable[bytes]) -> bytes:
        compressor = zlib.compressobj(1)
        return b"".join(compressor.compress(piece) for piece in pieces) + compressor.flush()

    def encode(self, seq: int, body: bytes) -> bytes:
        return b"%s %d %s\n" % (MAGIC, seq, self._signature(seq, body).encode()) + body

    def decode(self, blob: bytes) -> tuple[int, dict[str, Any]]:
        head, _, body = blob.partition(b"\n")
        magic, seq_text, signature = head.split(b" ")
        if magic != MAGIC:
            raise ValueError("not a tradeengine snapshot")
        seq = int(seq_text)
        if self.signer is not None and signature.decode() != self._signature(seq, body):
            raise ValueError("the snapshot's signature is not the worker's")
        data: dict[str, Any] = orjson.loads(zlib.decompress(body))
        return seq, data

    async def load(self) -> tuple[int, dict[str, Any]] | None:
        """(stream sequence it covers, the state as data), or None if there is none yet."""
        try:
            found = await (await self._bucket()).get(self.name)
        except NotFoundError:
            return None
        return self.decode(found.data or b"")

    async def save(self, seq: int, body: bytes) -> int:
        blob = self.encode(seq, body)
        await (await self._bucket()).put(self.name, blob)
        return len(blob)
