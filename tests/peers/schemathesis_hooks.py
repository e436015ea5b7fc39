"""Schemathesis hooks for Keyward (loaded by tests/peers/schemathesis.sh through
SCHEMATHESIS_HOOKS).

One check is replaced: `positive_data_acceptance` (ST202, "a request the schema
allows must not be refused") becomes `keyward_positive_data_acceptance`, the same
check except for the refusals no schema can express, because they depend on
state or on cryptography rather than on the shape of the request. Each is matched
by operation, status and error code, so any other refusal of a schema-valid
request still fails:

- a ciphertext, nonce or version that does not authenticate: 400
  `decryption_failed` (decrypt, rewrap, data-key unwrap and rewrap, decrypt
  stream); a body that is not a Keyward stream: 400 `invalid_stream`; an
  `X-Keyward-Context` that is not percent-encoded UTF-8 of at most 1024
  characters: 400 `invalid_request` (the streaming routes);
- a well-formed `X-Master-Key` sent for a platform-managed encryption: 400
  `master_key_not_applicable`;
- a `cursor` this endpoint did not hand out: 400 `invalid_request` on `cursor`
  (GET /v1/encryptions, GET /v1/audit, GET /v1/api-keys,
  GET /v1/tenants/{tenantId}/api-keys);
- a policy out of range for this encryption (`minDecryptionVersion` above the
  active version, a period on a client-mode encryption) or an `autoRotatePeriod`
  that does not parse as a duration: 422 `invalid_policy`, 400 on
  `autoRotatePeriod` (PATCH /v1/encryptions/{id});
- a re-encryption source that is not registered and granted: 422
  `job_source_unavailable`, or a bad identifier: 422 `invalid_job` (POST /v1/jobs);
- a version whose state forbids the operation: 410 `version_destroyed`, 422
  `version_not_encryptable`;
- RSA and key import (docs/algorithms.md): a `keySize` other than 3072 or 4096
  or for AES, an RSA encryption asked with `X-Master-Key` (400 on `keySize` /
  platform-managed, POST /v1/encryptions); the public key of an AES encryption
  (422 `not_asymmetric`); key material that does not unwrap under the
  tenant's wrapping key (400 `import_failed`) or a client-mode target (422
  `import_not_supported`); an export target that is not an RSA public key of
  3072 bits or more in PEM (400 on `publicKey`).
- blind indexes: a normalisation step given twice (400 `invalid_request`),
  a name already taken or the per-encryption limit reached (409
  `index_exists`, `too_many_indexes`), a `minVersion` above the index's active
  version (422 `invalid_index_change`), a destroy of a key version a live index
  version derives from (409 `version_anchors_index`).
"""

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


# (method, path or "*") -> {(status, error code, message prefix or None)}
SEMANTIC_REFUSALS = {
    ("*", "*"): {
        (400, "master_key_not_applicable", None),
        (410, "version_destroyed", None),
    },
    ("POST", "/v1/encryptions/{id}/indexes"): {
        # A repeated step: OpenAPI 3.1 can say uniqueItems, utoipa cannot.
        (400, "invalid_request", "`normalizations`: normalization"),
        (409, "index_exists", None),
        (409, "too_many_indexes", None),
    },
    ("PATCH", "/v1/encryptions/{id}/indexes/{name}"): {(422, "invalid_index_change", None)},
    # Eight live index versions: raise minVersion first.
    ("POST", "/v1/encryptions/{id}/indexes/{name}/rotate"): {(409, "too_many_index_versions", None)},
    ("PATCH", "/v1/encryptions/{id}/versions/{versionId}"): {(409, "version_anchors_index", None)},
    ("POST", "/v1/decrypt"): {(400, "decryption_failed", None)},
    ("POST", "/v1/rewrap"): {(400, "decryption_failed", None)},
    # A schema-valid wrapped data key that is not one (issue #20).
    ("POST", "/v1/datakey/unwrap"): {(400, "decryption_failed", None)},
    ("POST", "/v1/datakey/rewrap"): {(400, "decryption_failed", None)},
    # Streams: a body that is not a Keyward stream, or one whose key does
    # not unwrap; a context header that is not percent-encoded UTF-8 of at
    # most 1024 characters (the schema says string: no pattern says that).
    ("POST", "/v1/decrypt/stream"): {
        (400, "invalid_stream", None),
        (400, "decryption_failed", None),
        (400, "invalid_request", "`X-Keyward-Context`"),
        (400, "invalid_request", "the stream's chunk size is over"),
    },
    # A chunk size whose memory is over what this server's
    # `max_concurrent_body_bytes` lets one stream hold (the schema's maximum
    # is the format's, 16 MiB: the server's depends on its configuration).
    ("POST", "/v1/encrypt/stream"): {
        (400, "invalid_request", "`X-Keyward-Context`"),
        (400, "invalid_request", "`chunkSize` is over"),
    },
    ("POST", "/v1/encrypt"): {(422, "version_not_encryptable", None)},
    ("GET", "/v1/encryptions"): {(400, "invalid_request", "`cursor`")},
    ("GET", "/v1/audit"): {(400, "invalid_request", "`cursor`")},
    ("GET", "/v1/api-keys"): {(400, "invalid_request", "`cursor`")},
    ("GET", "/v1/tenants/{tenantId}/api-keys"): {(400, "invalid_request", "`cursor`")},
    ("PATCH", "/v1/encryptions/{id}"): {
        (422, "invalid_policy", None),
        (400, "invalid_request", "`autoRotatePeriod`: not a duration"),
    },
    ("POST", "/v1/jobs"): {(422, "invalid_job", None), (422, "job_source_unavailable", None)},
    ("POST", "/v1/encryptions"): {
        (400, "invalid_request", "`keySize`"),
        (400, "invalid_request", "an `RSA-OAEP-256` encryption is platform-managed"),
    },
    ("GET", "/v1/encryptions/{id}/versions/{versionId}/public-key"): {(422, "not_asymmetric", None)},
    ("POST", "/v1/encryptions/{id}/import"): {
        (400, "import_failed", None),
        (422, "import_not_supported", None),
    },
    ("POST", "/v1/encryptions/{id}/versions/{versionId}/export"): {
        (400, "invalid_request", "`publicKey`"),
    },
}


def _error(response):
    try:
        body = response.json()
        return body["error"]["code"], body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None, None


def is_semantic_refusal(case, response):
    code, message = _error(response)
    if code is None:
        return False
    method = case.operation.method.upper()
    path = case.operation.path
    for key in (("*", "*"), (method, path)):
        for status, want_code, prefix in SEMANTIC_REFUSALS.get(key, ()):
            if (
                response.status_code == status
                and code == want_code
                and (prefix is None or message.startswith(prefix))
            ):
                return True
    return False


@schemathesis.check
def keyward_positive_data_acceptance(ctx, response, case):
    """positive_data_acceptance, minus the refusals listed above."""
    if is_semantic_refusal(case, response):
        return None
    return positive_data_acceptance(ctx, response, case)
