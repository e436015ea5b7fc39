#!/usr/bin/env python3
"""Keyward's own byte layouts, computed without Keyward.

    ~/.cache/keyward/peers-venv/bin/python scripts/known-answers.py

Prints the fixed vectors that `src/crypto/wycheproof.rs` and
`src/audit/verify.rs` (module `wycheproof`) check Keyward against, from the
layouts written down in docs/security.md ("Byte layouts") and the Python
`cryptography` package's AES-GCM, HKDF and Ed25519: an implementation that
shares no code with Keyward's (AWS-LC through aws-lc-rs). The values are
checked in; this script is how they were made, and how to check them again.
Nothing here is secret: every key is a fixed test pattern.
"""
import base64
import hashlib
import json

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def pattern(start, n):
    return bytes(range(start, start + n))


ENCRYPTION_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
VERSION_ID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
KEK_ID = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
JOB_ID = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf")
DATA_KEY = pattern(0x00, 32)
ROOT_KEK = pattern(0x20, 32)
MASTER_KEY = pattern(0x40, 32)
CLIENT_KEY = pattern(0x60, 32)
SALT = pattern(0x80, 32)
DATA_NONCE = pattern(0x00, 12)
DEK_NONCE = pattern(0x10, 12)
KEK_NONCE = pattern(0x20, 12)
CLIENT_DEK_NONCE = pattern(0x30, 12)
JOB_NONCE = pattern(0x40, 12)
PLAINTEXT = "Keyward known answer: 1 €".encode()
JOB_SOURCE = b'{"name":"orders","table":"orders"}'

DATA_AAD = b"keyward:data:v1\0" + ENCRYPTION_ID + VERSION_ID
DEK_AAD = b"keyward:dek:v1\0\0" + ENCRYPTION_ID + VERSION_ID + KEK_ID
CLIENT_DEK_AAD = b"keyward:dek:v1\0\0" + ENCRYPTION_ID + VERSION_ID + bytes(16)
KEK_AAD = b"keyward:kek:v1\0\0" + KEK_ID
JOB_AAD = b"keyward:job:v1\0\0" + JOB_ID


def seal(key, nonce, aad, plaintext):
    """AES-256-GCM: ciphertext || 16-byte tag."""
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def hkdf(salt, ikm, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None, info=info).derive(ikm)


def checkpoint_key(kek):
    seed = hkdf(b"", kek, b"keyward:audit-checkpoint:v1")
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public, hashlib.sha256(public).hexdigest()[:16]


def record(seq, prev, **fields):
    """An audit record line: fields in the record's order, `hash` last."""
    obj = {"seq": seq}
    obj.update(fields)
    obj["prev"] = prev
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return body[:-1] + ',"hash":"' + digest + '"}', digest


def audit_file():
    private, public, key_id = checkpoint_key(ROOT_KEK)
    genesis = "0" * 64
    lines = []
    first, h1 = record(
        1, genesis, time="2026-01-01T00:00:00.000Z", operation="encryption.create",
        outcome="ok", status=200, requestId="req-1", actor="api_key", apiKeyId="kw_test",
        tenantId="11111111-1111-4111-8111-111111111111",
        encryptionId="00112233-4455-6677-8899-aabbccddeeff",
        versionId="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
    )
    second, h2 = record(
        2, h1, time="2026-01-01T00:00:01.000Z", operation="decrypt", outcome="error",
        error="decryption_failed", status=400, requestId="req-2", actor="api_key",
        apiKeyId="kw_test", tenantId="11111111-1111-4111-8111-111111111111",
        peer="127.0.0.1", encryptionId="00112233-4455-6677-8899-aabbccddeeff",
        versionId="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", batchIndex=0,
    )
    third, h3 = record(
        3, h2, time="2026-01-01T00:00:02.000Z", operation="rotate.automatic",
        outcome="ok", actor="system",
    )
    lines += [first, second, third]
    body = json.dumps(
        {"seq": 3, "hash": h3, "fileStart": 1, "fileStartPrev": genesis,
         "time": "2026-01-01T00:00:03.000Z", "reason": "shutdown", "keyId": key_id},
        separators=(",", ":"),
    )
    signature = private.sign(b"keyward:audit-checkpoint:v1\n" + body.encode())
    lines.append('{"checkpoint":' + body + ',"signature":"' + signature.hex() + '"}')
    return lines, public


def b64url(data):
    """base64url without padding, as format v2 writes ids and hashes."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def record_v2(seq, prev, state_prev, **fields):
    """An audit record line of format v2: `"v":2`, `seq`, the fields in the
    record's order; `h` = SHA-256(previous hash || the line without `prev`
    and `h`), `prev` stated only when `state_prev`."""
    obj = {"v": 2, "seq": seq}
    obj.update(fields)
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(prev + body.encode()).digest()
    stated = ',"prev":"' + b64url(prev) + '"' if state_prev else ""
    return body[:-1] + stated + ',"h":"' + b64url(digest) + '"}', digest


def audit_file_v2():
    """The v1 file above, continued in format v2 by a restarted writer: its
    first record states `prev` (the last v1 record's hash), the next does
    not; then a checkpoint covering all five."""
    private, public, key_id = checkpoint_key(ROOT_KEK)
    lines, _ = audit_file()
    h3 = bytes.fromhex(json.loads(lines[2])["hash"])
    uuid = lambda text: b64url(bytes.fromhex(text.replace("-", "")))
    fourth, h4 = record_v2(
        4, h3, True, t=1767225604000, op="encrypt", st=200,
        rid=uuid("a258363d-c1c2-4faa-bc21-929259815394"),
        key=b64url(bytes.fromhex("bcf8ecd166f2eada597f837c")),
        ten=uuid("11111111-1111-4111-8111-111111111111"), ip="10.1.2.3",
        enc=uuid("00112233-4455-6677-8899-aabbccddeeff"),
        ver=uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
    )
    fifth, h5 = record_v2(
        5, h4, False, t=1767225605000, op="decrypt", err="decryption_failed",
        st=200, requestId="req-5", key=b64url(bytes.fromhex("bcf8ecd166f2eada597f837c")),
        ten=uuid("11111111-1111-4111-8111-111111111111"),
        enc=uuid("00112233-4455-6677-8899-aabbccddeeff"),
        ver=uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), n=2, idx="3,17",
    )
    lines += [fourth, fifth]
    body = json.dumps(
        {"seq": 5, "hash": h5.hex(), "fileStart": 1, "fileStartPrev": "0" * 64,
         "time": "2026-01-01T00:00:06.000Z", "reason": "shutdown", "keyId": key_id},
        separators=(",", ":"),
    )
    signature = private.sign(b"keyward:audit-checkpoint:v1\n" + body.encode())
    lines.append('{"checkpoint":' + body + ',"signature":"' + signature.hex() + '"}')
    return lines, public


def main():
    client_wrapping_key = hkdf(SALT, CLIENT_KEY, b"keyward:client-wrap:v1" + ENCRYPTION_ID)
    _, public, key_id = checkpoint_key(ROOT_KEK)
    body = b'{"seq":0}'
    private, _, _ = checkpoint_key(ROOT_KEK)
    out = {
        "DATA_AAD": DATA_AAD,
        "DEK_AAD": DEK_AAD,
        "KEK_AAD": KEK_AAD,
        "JOB_AAD": JOB_AAD,
        "SEALED_DATA": seal(DATA_KEY, DATA_NONCE, DATA_AAD, PLAINTEXT),
        "WRAPPED_DEK": DEK_NONCE + seal(ROOT_KEK, DEK_NONCE, DEK_AAD, DATA_KEY),
        "WRAPPED_KEK": KEK_NONCE + seal(MASTER_KEY, KEK_NONCE, KEK_AAD, ROOT_KEK),
        "CLIENT_WRAPPING_KEY": client_wrapping_key,
        "CLIENT_WRAPPED_DEK": CLIENT_DEK_NONCE
        + seal(client_wrapping_key, CLIENT_DEK_NONCE, CLIENT_DEK_AAD, DATA_KEY),
        "SEALED_JOB_SOURCE": JOB_NONCE + seal(ROOT_KEK, JOB_NONCE, JOB_AAD, JOB_SOURCE),
        "CHECKPOINT_PUBLIC_KEY": public,
        "CHECKPOINT_SIGNATURE": private.sign(b"keyward:audit-checkpoint:v1\n" + body),
    }
    for name, value in out.items():
        print(f'const {name}: &str = "{value.hex()}";')
    print(f'const CHECKPOINT_KEY_ID: &str = "{key_id}";')
    print()
    lines, _ = audit_file()
    print("audit file (tests/known-answers/audit-format-v1.log):")
    for line in lines:
        print(line)
    print()
    lines, _ = audit_file_v2()
    print("audit file (tests/known-answers/audit-format-v2.log):")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
