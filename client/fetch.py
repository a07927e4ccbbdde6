"""A model's client files from the swarm's nodes (rpc ModelFile), for a client with neither the files nor the hub.

The config, tokenizer, generation defaults and a safetensors file of the client parts (embeddings, final
norm, head) are downloaded from a node announcing the swarm's majority weights fingerprint, checked against
that fingerprint (common/weights/fingerprint.py: it covers the config and every client-part tensor), and only
then cached in ~/.cache/potluck/models/<fingerprint>/, a folder ModelFiles opens like any model's. A node
serving other bytes is refused and the next one tried."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import grpc

from client.config import ClientConfig
from client.transport import LoopThread, Peer
from client.weights import majority_fingerprint
from common.swarm.dht import make_discovery
from common.swarm.membership import SwarmConfig
from common.swarm.records import PeerRecord
from common.weights.errors import ModelLoadError
from common.weights.files import SAFETENSORS_SINGLE, ModelFiles
from common.weights.fingerprint import CLIENT_PARTS_FILE, SHARED_FILES, weights_fingerprint
from common.wire.generated import potluck_pb2 as pb
from common.wire.security import PLAINTEXT, Security

log = logging.getLogger(__name__)

CACHE_ROOT = Path("~/.cache/potluck/models")
MAX_FILE_BYTES = 16 << 30  # a client-parts file larger than this is refused (a 70B model's is ~4 GB)


def cached(fingerprint: str, cache: Path = CACHE_ROOT) -> Path | None:
    """The cached folder of the model with `fingerprint`, if an earlier fetch verified and kept it."""
    folder = cache.expanduser() / fingerprint
    return folder if (folder / "config.json").is_file() and (folder / SAFETENSORS_SINGLE).is_file() else None


async def fetch_model(model_id: str, records: list[PeerRecord], security: Security = PLAINTEXT,
                      cache: Path = CACHE_ROOT, timeout: float = 600.0) -> Path:
    """The folder of `model_id`'s client files, fetched from the nodes in `records` (or the cache).

    ModelLoadError if no node announces it, the nodes do not agree on a fingerprint, or none serves files
    that match it."""
    serving = [r for r in records if r.model_id == model_id]
    if not serving:
        known = sorted({r.model_id for r in records})
        raise ModelLoadError(f"no node of the swarm serves {model_id!r}" + (f" (it serves {', '.join(known)})"
                                                                            if known else ""))
    fingerprint = majority_fingerprint(serving)
    if not fingerprint:
        raise ModelLoadError(f"the nodes serving {model_id!r} agree on no weights fingerprint: "
                             "give the model's files (--model PATH) instead")
    if (folder := cached(fingerprint, cache)) is not None:
        return folder
    cache = cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    problems = []
    for record in sorted((r for r in serving if r.weights == fingerprint), key=lambda r: r.load):
        scratch = cache / f".{fingerprint}.{uuid.uuid4().hex[:8]}"
        try:
            await _download(record.address, scratch, security, timeout)
            got = weights_fingerprint(ModelFiles.open(str(scratch)))
            if got != fingerprint:
                raise ModelLoadError(f"its files have weights fingerprint {got}, its record says {fingerprint}")
            try:
                scratch.rename(cache / fingerprint)
            except OSError:  # another process cached it meanwhile
                if cached(fingerprint, cache) is None:
                    raise
            log.info("fetched the client files of %s from %s into %s", model_id, record.address, cache / fingerprint)
            return cache / fingerprint
        except (ModelLoadError, OSError, grpc.aio.AioRpcError, ValueError) as error:
            detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            problems.append(f"{record.address}: {detail}")
            log.warning("refused the model files of %s: %s", record.address, detail)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    raise ModelLoadError(f"no node served the files of {model_id!r} (weights {fingerprint}): " + "; ".join(problems))


async def _download(address: str, folder: Path, security: Security, timeout: float) -> None:
    folder.mkdir(parents=True)
    peer = Peer(address, security)
    try:
        for name in (CLIENT_PARTS_FILE, *SHARED_FILES):
            target = folder / (SAFETENSORS_SINGLE if name == CLIENT_PARTS_FILE else name)
            try:
                await _one_file(peer, name, target, timeout)
            except grpc.aio.AioRpcError as error:
                target.unlink(missing_ok=True)  # an optional file the node does not have leaves no empty file
                if error.code() != grpc.StatusCode.NOT_FOUND or name in (CLIENT_PARTS_FILE, "config.json"):
                    raise
    finally:
        await peer.close()


async def _one_file(peer: Peer, name: str, target: Path, timeout: float) -> None:
    written = 0
    with open(target, "wb") as out:
        size = 0
        async for chunk in peer.stub.ModelFile(pb.ModelFileRequest(name=name), timeout=timeout):
            size = chunk.size
            written += len(chunk.data)
            if written > min(chunk.size, MAX_FILE_BYTES):
                raise ModelLoadError(f"{name} is larger than announced ({chunk.size} bytes) or than "
                                     f"{MAX_FILE_BYTES >> 30} GiB")
            out.write(chunk.data)
    if written != size:
        raise ModelLoadError(f"{name} ended after {written} of its {size} bytes")


def from_swarm(model: str, config: ClientConfig, revision: str | None = None) -> ModelFiles | None:
    """`model`'s client files fetched from the swarm (or the cache) when `model` names no local path, the
    client discovers the swarm by gossip, and a node announces that model id; otherwise None."""
    if revision is not None or config.peers or config.uses_dht or Path(model).expanduser().exists():
        return None
    loop = LoopThread()
    try:
        folder = loop.run(_from_swarm(model, config, Path(config.model_cache)))
    finally:
        loop.close()
    if folder is None:
        return None
    files = ModelFiles.open(str(folder))
    files.model_id = model
    return files


async def _from_swarm(model: str, config: ClientConfig, cache: Path) -> Path | None:
    security = config.security()
    swarm = SwarmConfig(bootstrap=config.bootstrap, mdns=config.mdns, mdns_interface=config.mdns_interface)
    membership = make_discovery(swarm, None, security=security)
    await membership.start()
    try:
        await membership.pull_all()
        if not config.bootstrap:  # mDNS only: give the LAN's nodes the discovery timeout to answer
            await membership.wait_for(lambda: any(r.model_id == model for r in membership.live()),
                                      config.discovery_timeout)
        records = membership.live()
    finally:
        await membership.close()
    if not any(r.model_id == model for r in records):
        return None
    return await fetch_model(model, records, security, cache)
