#!/usr/bin/env python3
"""Generates a Python client from Keyward's OpenAPI description with
openapi-python-client, imports it, and runs the v1 contract through it against a
live Keyward:

    encrypt -> decrypt (round trip) -> rotate -> encrypt (under the new version)
    -> decrypt the old ciphertext (and the new one) -> a tampered ciphertext is a
    typed 400 `decryption_failed`

The client is generated into a temporary folder, never into the checkout.

Environment:
    KEYWARD_URL            base URL of a running Keyward, e.g. http://127.0.0.1:8480
    KEYWARD_API_KEY        an API key id (kw_...) with the encrypt, decrypt and rotate
                           scopes (and `manage` when KEYWARD_ENCRYPTION_ID is not set)
    KEYWARD_API_SECRET     its secret (kws_...)
    KEYWARD_ENCRYPTION_ID  optional: the encryption to use (it gets rotated); without
                           it one is created through the generated client
    KEYWARD_SPEC           optional: the OpenAPI document (default: openapi/keyward.json
                           of this checkout)
    KEYWARD_OPENAPI_PYTHON_CLIENT
                           optional: the openapi-python-client executable (default:
                           next to this Python, else on PATH)

Exit status: 0 when every step matched, 1 on a mismatch or an unexpected answer
(the message says which step), 2 when the tools or settings are missing.
"""

import base64
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

PACKAGE = "keyward_client"
ROOT = Path(__file__).resolve().parents[2]


class Mismatch(Exception):
    pass


def die(code, message):
    print(f"generated_client.py: {message}", file=sys.stderr)
    sys.exit(code)


def setting(name):
    value = os.environ.get(name, "").strip()
    if not value:
        die(2, f"{name} is not set")
    return value


def generator():
    explicit = os.environ.get("KEYWARD_OPENAPI_PYTHON_CLIENT")
    if explicit:
        if not (Path(explicit).is_file() or shutil.which(explicit)):
            die(2, f"KEYWARD_OPENAPI_PYTHON_CLIENT={explicit} does not exist")
        return explicit
    beside = Path(sys.executable).parent / "openapi-python-client"
    if beside.exists():
        return str(beside)
    found = shutil.which("openapi-python-client")
    if found:
        return found
    die(
        2,
        "openapi-python-client is not installed (next to "
        f"{sys.executable} or on PATH): `source scripts/peers.sh && ensure_peer_venv` "
        "installs it into the test venv",
    )


def generate(spec, out_dir):
    """Generates the client package into out_dir/keyward_client; fails on any warning."""
    config = out_dir / "config.yaml"
    # No post hooks: the default ones run ruff from PATH, which only formats.
    config.write_text(
        f"post_hooks: []\npackage_name_override: {PACKAGE}\nproject_name_override: keyward-client\n"
    )
    cmd = [
        generator(),
        "generate",
        "--path",
        str(spec),
        "--config",
        str(config),
        "--meta",
        "none",
        "--fail-on-warning",
        "--output-path",
        str(out_dir / PACKAGE),
    ]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True)
    output = (run.stdout + run.stderr).strip()
    if run.returncode != 0 or not (out_dir / PACKAGE / "__init__.py").exists():
        die(
            1,
            f"openapi-python-client could not generate a client from {spec}:\n{output}",
        )
    print(f"generated {PACKAGE} from {spec} with {' '.join(cmd[:2])}")
    if output:
        print(output)


def expect(condition, step, message):
    if not condition:
        raise Mismatch(f"{step}: {message}")


def ok(step, response, want_type, status=200):
    """Asserts a detailed response: the status and the parsed model type."""
    body = response.content.decode("utf-8", "replace")
    expect(
        int(response.status_code) == status,
        step,
        f"HTTP {int(response.status_code)}, expected {status}: {body}",
    )
    expect(
        isinstance(response.parsed, want_type),
        step,
        f"parsed as {type(response.parsed).__name__}, expected {want_type.__name__}: {body}",
    )
    return response.parsed


def run_contract(url, key, secret, encryption_id):
    kc = importlib.import_module(PACKAGE)
    api = importlib.import_module(f"{PACKAGE}.api.contract")
    for name in ("encrypt", "decrypt", "rotate"):
        importlib.import_module(f"{PACKAGE}.api.contract.{name}")
    importlib.import_module(f"{PACKAGE}.api.encryptions.create")
    encryptions = importlib.import_module(f"{PACKAGE}.api.encryptions")
    models = importlib.import_module(f"{PACKAGE}.models")

    client = kc.AuthenticatedClient(
        base_url=url,
        token=key,
        prefix="",
        auth_header_name="X-Api-Key",
        headers={"X-Api-Secret": secret},
        raise_on_unexpected_status=True,
        timeout=30.0,
    )

    if encryption_id is None:
        created = ok(
            "create an encryption",
            encryptions.create.sync_detailed(
                client=client, body=models.CreateRequest(name="generated-client")
            ),
            models.EncryptionView,
            status=201,
        )
        encryption_id = str(created.encryption_id)
        print(f"created encryption {encryption_id}")

    def encrypt(step, data, version=None):
        body = models.EncryptRequest(encryption_id=encryption_id, data=data)
        if version is not None:
            body.encryption_version_id = version
        enc = ok(
            step,
            api.encrypt.sync_detailed(client=client, body=body),
            models.EncryptResponse,
        )
        expect(
            str(enc.encryption_id) == encryption_id,
            step,
            f"encryptionId {enc.encryption_id}",
        )
        expect(enc.algorithm == "AES-256-GCM", step, f"algorithm {enc.algorithm!r}")
        expect(bool(enc.cipher_text), step, "empty cipherText")
        expect(bool(enc.metadata.nonce), step, "no metadata.nonce")
        return enc

    def decrypt_request(enc, cipher_text=None):
        return models.DecryptRequest(
            encryption_id=enc.encryption_id,
            cipher_text=enc.cipher_text if cipher_text is None else cipher_text,
            encryption_version_id=enc.encryption_version_id,
            metadata=models.DecryptRequestMetadata.from_dict(enc.metadata.to_dict()),
        )

    def decrypt(step, enc, want):
        dec = ok(
            step,
            api.decrypt.sync_detailed(client=client, body=decrypt_request(enc)),
            models.DecryptResponse,
        )
        expect(dec.data == want, step, f"decrypted {dec.data!r}, expected {want!r}")

    plaintext = "héllo, keyward ✓ — generated client"
    first = encrypt("encrypt", plaintext)
    print(f"encrypt: version {first.encryption_version_id}")
    decrypt("decrypt (round trip)", first, plaintext)
    print("decrypt: round trip equal")

    rotated = ok(
        "rotate",
        api.rotate.sync_detailed(
            client=client, body=models.RotateRequest(encryption_id=encryption_id)
        ),
        models.RotateResponse,
    )
    new_version = rotated.new_version_id
    expect(
        new_version != first.encryption_version_id,
        "rotate",
        f"newVersionId {new_version} is the version encrypt used before",
    )
    print(f"rotate: new version {new_version}")

    second_text = "aGVsbG8sIGtleXdhcmQ="
    second = encrypt("encrypt after rotate", second_text)
    expect(
        second.encryption_version_id == new_version,
        "encrypt after rotate",
        f"used version {second.encryption_version_id}, expected the new one {new_version}",
    )
    print(f"encrypt after rotate: version {second.encryption_version_id}")

    decrypt("decrypt the old ciphertext after rotate", first, plaintext)
    decrypt("decrypt the new ciphertext", second, second_text)
    print("decrypt: the old ciphertext still decrypts, the new one too")

    named = encrypt(
        "encrypt under the old version by id", "named", first.encryption_version_id
    )
    expect(
        named.encryption_version_id == first.encryption_version_id,
        "encrypt under the old version by id",
        f"used version {named.encryption_version_id}",
    )
    decrypt("decrypt under the old version by id", named, "named")

    # A tampered ciphertext: the typed error model, one answer for every mismatch.
    raw = bytearray(base64.b64decode(first.cipher_text))
    raw[0] ^= 1
    tampered = base64.b64encode(bytes(raw)).decode()
    err = ok(
        "decrypt a tampered ciphertext",
        api.decrypt.sync_detailed(client=client, body=decrypt_request(first, tampered)),
        models.ErrorBody,
        status=400,
    )
    expect(
        err.error.code == "decryption_failed",
        "decrypt a tampered ciphertext",
        f"error code {err.error.code!r}, expected 'decryption_failed'",
    )
    print("decrypt of a tampered ciphertext: 400 decryption_failed (ErrorBody)")


def main():
    url = setting("KEYWARD_URL").rstrip("/")
    key = setting("KEYWARD_API_KEY")
    secret = setting("KEYWARD_API_SECRET")
    encryption_id = os.environ.get("KEYWARD_ENCRYPTION_ID", "").strip() or None
    if encryption_id is not None:
        try:
            encryption_id = str(uuid.UUID(encryption_id))
        except ValueError:
            die(2, f"KEYWARD_ENCRYPTION_ID is not a UUID: {encryption_id}")
    spec = Path(os.environ.get("KEYWARD_SPEC") or ROOT / "openapi" / "keyward.json")
    if not spec.is_file():
        die(2, f"the OpenAPI document {spec} does not exist")
    try:
        importlib.import_module("httpx")
        importlib.import_module("attrs")
    except ImportError as e:
        die(2, f"the generated client needs httpx and attrs in {sys.executable}: {e}")

    with tempfile.TemporaryDirectory(prefix="keyward-generated-client-") as tmp:
        out = Path(tmp)
        generate(spec, out)
        sys.path.insert(0, str(out))
        try:
            run_contract(url, key, secret, encryption_id)
        except Mismatch as e:
            die(1, f"FAILED at {e}")
        except Exception as e:  # noqa: BLE001 (an undocumented status, a bad body, no connection)
            die(1, f"FAILED with {type(e).__name__}: {e}")
        finally:
            sys.path.remove(str(out))
    print(
        "generated_client.py: the generated client ran encrypt, decrypt and rotate: OK"
    )


if __name__ == "__main__":
    main()
