#!/usr/bin/env python3
"""Writes tests/known-answers/stream-v1.bin: a stream in Keyward's stream
format, version 1 (docs/envelope.md, "Streams"), made here with Python's
`cryptography`, independently of the Rust code that must keep opening it
(src/crypto/stream.rs, `the_known_answer_stream_still_opens`).

Fixed inputs: data key 0x42 * 32, chunk size 1024, encryption id 0x01 * 16,
version id 0x02 * 16, salt 0x03 * 16, wrapped key 0x04 * 77, and 2500 bytes
of plaintext, byte i = (i * 7 + i // 251) mod 256."""
import hashlib
import pathlib
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CHUNK = 1024
data_key = b"\x42" * 32
salt = b"\x03" * 16
wrapped = b"\x04" * 77
header = (b"KWSTREAM" + bytes([1]) + struct.pack(">I", CHUNK) + b"\x01" * 16 + b"\x02" * 16
          + salt + struct.pack(">H", len(wrapped)) + wrapped)
plain = bytes(((i * 7 + i // 251) % 256) for i in range(2500))
key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"keyward:stream:v1").derive(data_key)
aad = hashlib.sha256(header).digest()
chunks = [plain[i:i + CHUNK] for i in range(0, len(plain), CHUNK)] or [b""]
out = bytearray(header)
for i, chunk in enumerate(chunks):
    nonce = i.to_bytes(11, "big") + bytes([1 if i == len(chunks) - 1 else 0])
    out += AESGCM(key).encrypt(nonce, chunk, aad)
path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/known-answers/stream-v1.bin")
path.write_bytes(bytes(out))
print(f"wrote {path}: {len(out)} bytes, sha256 {hashlib.sha256(out).hexdigest()}")
