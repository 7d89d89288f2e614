"""Integrity and signatures of an artifact: every file hashed, checked before anything is parsed.

An artifact is a set of named byte blobs ("files": zip entries of a ``.pt2``,
the ONNX model proto and its external-data files, an AOTInductor package's
entries) plus two small texts stored beside them:

- the **manifest** (JSON text, :mod:`recopt.export.manifest`), whose
  ``files`` field maps every file's name to its SHA-256;
- the **integrity record**, a compact canonical JSON object::

      {"manifest_sha256": "<hex>", "signature": null | {...}, "version": 1}

  holding the SHA-256 of the manifest's exact bytes and, optionally, a
  signature over that digest.

Loading (:func:`verify`) goes: integrity record (canonical form, known
keys) → SHA-256 of the manifest bytes → signature (when a ``verify_key`` is
given) → only then the manifest is parsed as JSON → the set of files equals
the manifest's list and every file's SHA-256 matches. The caller parses
nothing of a file before this returns.

Signing (optional): ``sign_key`` is an Ed25519 private key from the
``cryptography`` package (the ``[sign]`` extra) or a ``bytes``/``str``
secret of at least 16 bytes for HMAC-SHA256 (standard library). The
signature covers the manifest digest, hence every file. A hash alone
detects corruption and edits by someone who does not recompute it; a
signature tells a server that the artifact came from a holder of the key.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Mapping, Optional

from .errors import ArtifactError, SignatureError, TamperedArtifactError
from .manifest import MAX_MANIFEST_BYTES

INTEGRITY_VERSION = 1
SIGNED_PREFIX = b"recopt-artifact\x00v1\x00"
HMAC_MIN_KEY = 16


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ----------------------------------------------------------------------------- keys


def _is_ed25519_private(key) -> bool:
    return type(key).__name__ in ("Ed25519PrivateKey", "_Ed25519PrivateKey") or \
        "Ed25519PrivateKey" in [c.__name__ for c in type(key).__mro__]


def _is_ed25519_public(key) -> bool:
    return "Ed25519PublicKey" in [c.__name__ for c in type(key).__mro__]


def _hmac_secret(key, what: str) -> bytes:
    secret = key.encode() if isinstance(key, str) else key
    if not isinstance(secret, (bytes, bytearray)):
        raise ArtifactError(
            f"{what} must be an Ed25519 key from the cryptography package (pip install 'recopt[sign]') or a "
            f"bytes/str secret for HMAC-SHA256, got {type(key).__name__}")
    if len(secret) < HMAC_MIN_KEY:
        raise ArtifactError(f"{what}: an HMAC secret must be at least {HMAC_MIN_KEY} bytes long, got {len(secret)}")
    return bytes(secret)


def _raw_public(pub) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key) -> str:
    """A short public name of a key (Ed25519 public key, or a one-way tag of an HMAC secret)."""
    if _is_ed25519_private(key):
        key = key.public_key()
    if _is_ed25519_public(key):
        return "ed25519:" + sha256(_raw_public(key))[:16]
    return "hmac:" + sha256(b"recopt-hmac-key-id\x00" + _hmac_secret(key, "key"))[:16]


def sign(manifest_sha256: str, sign_key) -> dict:
    """The signature record over a manifest digest."""
    msg = SIGNED_PREFIX + manifest_sha256.encode()
    if _is_ed25519_private(sign_key):
        return {"alg": "ed25519", "key_id": key_id(sign_key),
                "value": base64.b64encode(sign_key.sign(msg)).decode()}
    secret = _hmac_secret(sign_key, "sign_key")
    return {"alg": "hmac-sha256", "key_id": key_id(secret),
            "value": base64.b64encode(hmac.new(secret, msg, hashlib.sha256).digest()).decode()}


def _check_signature(sig: Optional[dict], manifest_sha256: str, verify_key, path: str) -> None:
    if sig is None:
        raise SignatureError(f"refusing to load {path}: it is not signed, and verify_key was given. "
                             "Export it with recopt.export(..., sign_key=...)")
    msg = SIGNED_PREFIX + manifest_sha256.encode()
    alg = sig.get("alg")
    try:
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
    except ValueError:
        raise SignatureError(f"refusing to load {path}: its signature is not valid base64") from None
    if _is_ed25519_private(verify_key):
        verify_key = verify_key.public_key()
    if _is_ed25519_public(verify_key):
        if alg != "ed25519":
            raise SignatureError(f"refusing to load {path}: it is signed with {alg!r}, but verify_key is an "
                                 "Ed25519 public key")
        from cryptography.exceptions import InvalidSignature

        try:
            verify_key.verify(value, msg)
        except InvalidSignature:
            raise SignatureError(f"refusing to load {path}: its Ed25519 signature does not verify with this key "
                                 f"({key_id(verify_key)}; signed by {sig.get('key_id')})") from None
        return
    secret = _hmac_secret(verify_key, "verify_key")
    if alg != "hmac-sha256":
        raise SignatureError(f"refusing to load {path}: it is signed with {alg!r}, but verify_key is an HMAC "
                             "secret; pass the Ed25519 public key")
    want = hmac.new(secret, msg, hashlib.sha256).digest()
    if not hmac.compare_digest(want, value):
        raise SignatureError(f"refusing to load {path}: its HMAC-SHA256 signature does not match this key "
                             f"({key_id(secret)}; signed by {sig.get('key_id')})")


# ----------------------------------------------------------------------------- write / verify


def seal(manifest: dict, file_digests: Mapping[str, str], sign_key=None) -> tuple:
    """Put ``file_digests`` into ``manifest["files"]``; return (manifest bytes, integrity record bytes)."""
    from .manifest import dumps

    manifest["files"] = dict(sorted(file_digests.items()))
    text = dumps(manifest).encode()
    digest = sha256(text)
    record = {"manifest_sha256": digest, "signature": sign(digest, sign_key) if sign_key is not None else None,
              "version": INTEGRITY_VERSION}
    return text, _canonical(record)


def parse_record(record: bytes, path: str) -> dict:
    """The integrity record, refused unless it is exactly the canonical form recopt writes."""
    try:
        rec = json.loads(record.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise TamperedArtifactError(f"refusing to load {path}: its integrity record is not valid JSON; the "
                                    "artifact was modified or corrupted after export") from None
    ok = (isinstance(rec, dict) and set(rec) == {"manifest_sha256", "signature", "version"}
          and rec["version"] == INTEGRITY_VERSION and isinstance(rec["manifest_sha256"], str)
          and (rec["signature"] is None or (isinstance(rec["signature"], dict)
                                            and set(rec["signature"]) == {"alg", "key_id", "value"})))
    if not ok or _canonical(rec) != record:
        raise TamperedArtifactError(f"refusing to load {path}: its integrity record is not one recopt writes "
                                    "(unknown fields or layout); the artifact was modified or corrupted")
    return rec


def verify(manifest_bytes: Optional[bytes], record_bytes: Optional[bytes], file_digests: Mapping[str, str],
           path: str, verify_key=None) -> tuple:
    """Check the whole artifact; return (parsed manifest, integrity record). Raises ArtifactError (or a subclass)."""
    if manifest_bytes is None:
        raise ArtifactError(f"{path} has no recopt manifest, so it was not written by recopt.export (or the "
                            "manifest was stripped); recopt loads only artifacts it can check. Re-export it with "
                            "recopt.export")
    if record_bytes is None:
        raise ArtifactError(f"refusing to load {path}: it has a manifest but no integrity record (written by an "
                            "older recopt, or stripped); re-export it with recopt.export")
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"refusing to load {path}: its manifest is {len(manifest_bytes)} bytes "
                            f"(limit {MAX_MANIFEST_BYTES})")
    rec = parse_record(record_bytes, path)
    got = sha256(manifest_bytes)
    if not hmac.compare_digest(got, rec["manifest_sha256"]):
        raise TamperedArtifactError(
            f"refusing to load {path}: its manifest's SHA-256 is {got[:16]}… but the integrity record says "
            f"{rec['manifest_sha256'][:16]}…, so the artifact was modified or corrupted after export. "
            "Re-export the model with recopt.export")
    if verify_key is not None:
        _check_signature(rec["signature"], got, verify_key, path)
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"refusing to load {path}: its manifest is not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"refusing to load {path}: its manifest lists no file digests ('files'); re-export it")
    missing = sorted(set(files) - set(file_digests))
    extra = sorted(set(file_digests) - set(files))
    if missing or extra:
        what = (f"missing {missing[:3]}" if missing else "") + ("; " if missing and extra else "") + \
            (f"not in the manifest {extra[:3]}" if extra else "")
        raise TamperedArtifactError(f"refusing to load {path}: its files differ from the manifest's list ({what}); "
                                    "the artifact was modified or corrupted after export. Re-export it")
    for name in sorted(files):
        if not hmac.compare_digest(files[name], file_digests[name]):
            raise TamperedArtifactError(
                f"refusing to load {path}: {name} has SHA-256 {file_digests[name][:16]}… but the manifest "
                f"records {files[name][:16]}…, so the artifact was modified or corrupted after export. "
                "Re-export the model with recopt.export")
    return manifest, rec
