#!/usr/bin/env python3
"""A small fake of Azure Key Vault's data plane and of Entra ID's token
endpoint, for the `azure-key-vault` provider's tests (tests/api/azure.rs).

No Azure Key Vault emulator can be installed on the test machines, so this is
built from Azure's published REST specification (azure-rest-api-specs,
specification/keyvault/data-plane/Microsoft.KeyVault/stable/7.4/keys.json):
only what Keyward uses, shaped like the specification's examples
(tests/peers/azure_key_vault_examples/, the responses' templates):

  POST /keys/{name}[/{version}]/wrapkey     (wrapKey-example.json)
  POST /keys/{name}/{version}/unwrapkey     (unwrapKey-example.json)
  GET  /keys/{name}[/{version}]             (GetKey-example.json)
  POST /{tenant}/oauth2/v2.0/token          (client credentials, the
                                             client-secret flow of Entra ID)

Every vault call needs `?api-version=` and a bearer token this process issued
for scope https://vault.azure.net/.default; without one it answers 401 with
the challenge Key Vault sends (`WWW-Authenticate: Bearer authorization=...,
resource=https://vault.azure.net`), which is how the official SDK learns the
scope. RSA-OAEP-256 is real (pyca/cryptography, RSA 2048, OAEP with SHA-256
and MGF1-SHA-256). Errors are Key Vault's JSON error body
({"error": {"code", "message"}}): 404 KeyNotFound, 400 BadParameter for a
ciphertext the key cannot unwrap, 401 Unauthorized; Entra ID's
{"error", "error_description", "error_codes"} with 401 invalid_client for a
wrong secret.

It serves HTTPS with a certificate from a throwaway CA it makes in STATE
(ca.pem, for the client to trust), keeps its RSA keys and their versions in
STATE, and the tokens it issued, so a restarted fake (same STATE, same port)
is the same vault.

Not implemented (and so not proved by the tests): A256KW (Managed HSM),
RSA1_5 and RSA-OAEP, key rotation or versions beyond the first, access
policies and RBAC beyond "this client id with this secret", managed identity
and workload identity token endpoints, throttling (429), soft delete.

Usage: azure_key_vault_fake.py --port P --state DIR --tenant T --client-id C
       --client-secret S --key NAME [--key NAME ...]
"""
import argparse
import base64
import datetime
import ipaddress
import json
import os
import secrets
import ssl
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

SCOPE = "https://vault.azure.net/.default"
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "azure_key_vault_examples")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def example(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        return json.load(f)["responses"]["200"]["body"]


def make_tls(state):
    """A CA and a server certificate for 127.0.0.1 and localhost, once."""
    ca_pem, cert_pem, key_pem = (os.path.join(state, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    if os.path.exists(key_pem):
        return cert_pem, key_pem
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Keyward test Azure Key Vault fake CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with open(ca_pem, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(cert_pem, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_pem, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_pem, key_pem


def load_keys(state, names):
    """name -> (version, RSA private key), made once and kept in STATE."""
    keys = {}
    for name in names:
        path = os.path.join(state, f"key-{name}.pem")
        vpath = os.path.join(state, f"key-{name}.version")
        if not os.path.exists(path):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            with open(path, "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
            with open(vpath, "w") as f:
                f.write(uuid.uuid4().hex)
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(vpath) as f:
            keys[name] = (f.read().strip(), key)
    return keys


OAEP256 = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class Vault:
    def __init__(self, args):
        self.args = args
        self.keys = load_keys(args.state, args.key)
        # Issued tokens outlive a restart of the fake, as Entra ID's tokens
        # outlive a Key Vault outage (they are valid for an hour either way).
        self.tokens_file = os.path.join(args.state, "tokens")
        self.tokens = set()
        if os.path.exists(self.tokens_file):
            with open(self.tokens_file) as f:
                self.tokens = set(f.read().split())
        self.lock = threading.Lock()
        self.base = f"https://127.0.0.1:{args.port}"


def handler(vault):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("fake-akv: " + (fmt % a) + "\n")

        def reply(self, status, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-ms-request-id", str(uuid.uuid4()))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def error(self, status, code, message):
            self.reply(status, {"error": {"code": code, "message": message}})

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def authorized(self):
            auth = self.headers.get("Authorization", "")
            with vault.lock:
                ok = auth.startswith("Bearer ") and auth[7:] in vault.tokens
            if not ok:
                # Key Vault's challenge: the authority and the resource.
                self.reply(401, {"error": {"code": "Unauthorized",
                                           "message": "AKV10000: Request is missing a Bearer or PoP token."}},
                           [("WWW-Authenticate",
                             f'Bearer authorization="{vault.base}/{vault.args.tenant}", '
                             f'resource="https://vault.azure.net"')])
            return ok

        def route(self, method):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            parts = [p for p in url.path.split("/") if p]
            body = self.body()
            if method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
                return self.token(parts[0], body)
            if not parts or parts[0] != "keys":
                return self.error(404, "NotFound", "no such path")
            if "api-version" not in query:
                return self.error(400, "BadParameter", "api-version is required")
            if not self.authorized():
                return
            op = parts[-1] if method == "POST" else None
            names = parts[1:-1] if op else parts[1:]
            if not names or len(names) > 2:
                return self.error(404, "NotFound", "no such path")
            name, version = names[0], (names[1] if len(names) == 2 else None)
            if name not in vault.keys:
                return self.error(404, "KeyNotFound",
                                  f"A key with (name/id) {name} was not found in this key vault.")
            kversion, key = vault.keys[name]
            if version not in (None, kversion):
                return self.error(404, "KeyNotFound",
                                  f"A key with (name/id) {name}/{version} was not found in this key vault.")
            kid = f"{vault.base}/keys/{name}/{kversion}"
            if method == "GET" and op is None:
                out = example("GetKey-example.json")
                nums = key.public_key().public_numbers()
                out["key"].update({"kid": kid, "n": b64url(nums.n.to_bytes(256, "big")),
                                   "e": b64url(nums.e.to_bytes(3, "big"))})
                return self.reply(200, out)
            if op not in ("wrapkey", "unwrapkey"):
                return self.error(404, "NotFound", "no such operation")
            try:
                params = json.loads(body)
                alg, value = params["alg"], unb64url(params["value"])
            except (ValueError, KeyError, TypeError):
                return self.error(400, "BadParameter", "the request body is not a key operation")
            if alg != "RSA-OAEP-256":
                return self.error(400, "BadParameter", f"algorithm {alg} is not implemented by this fake")
            out = example("wrapKey-example.json" if op == "wrapkey" else "unwrapKey-example.json")
            if op == "wrapkey":
                out.update({"kid": kid, "value": b64url(key.public_key().encrypt(value, OAEP256))})
            else:
                if version is None:
                    return self.error(404, "NotFound", "unwrapkey needs a key version")
                try:
                    plain = key.decrypt(value, OAEP256)
                except ValueError:
                    return self.error(400, "BadParameter", "Invalid parameter: value.")
                out.update({"kid": kid, "value": b64url(plain)})
            self.reply(200, out)

        def token(self, tenant, body):
            form = urllib.parse.parse_qs(body.decode())
            get = lambda k: (form.get(k) or [""])[0]
            if tenant != vault.args.tenant:
                return self.reply(400, {"error": "invalid_request", "error_codes": [90002],
                                        "error_description": f"AADSTS90002: Tenant '{tenant}' not found."})
            if get("grant_type") != "client_credentials" or get("client_id") != vault.args.client_id \
                    or not secrets.compare_digest(get("client_secret"), vault.args.client_secret):
                return self.reply(401, {"error": "invalid_client", "error_codes": [7000215],
                                        "error_description": "AADSTS7000215: Invalid client secret provided."})
            if get("scope") != SCOPE:
                return self.reply(400, {"error": "invalid_scope", "error_codes": [70011],
                                        "error_description": f"AADSTS70011: scope {get('scope')} is not valid."})
            token = secrets.token_urlsafe(32)
            with vault.lock:
                vault.tokens.add(token)
                with open(vault.tokens_file, "a") as f:
                    f.write(token + "\n")
            self.reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                             "access_token": token})

        def do_GET(self):
            self.route("GET")

        def do_POST(self):
            self.route("POST")

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--key", action="append", required=True)
    args = p.parse_args()
    os.makedirs(args.state, exist_ok=True)
    cert, key = make_tls(args.state)
    vault = Vault(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(vault))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"fake Azure Key Vault on {vault.base}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
