//! The fixed v1 contract: `POST /v1/encrypt`, `/v1/decrypt`, `/v1/rotate`.
//! Field names, paths and meanings are not ours to change.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit_note::{AuditNote, RequestFacts};
use super::edge::REQUEST_ID;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, IdField, MasterKeyParam};
use super::extract::{
    ApiJson, Auth, DecryptScope, EncryptScope, MasterKeyHeader, RequiredScope, RotateScope,
};
use super::secret::{plain_str, secret_string, SecretBody};
use super::state::AppState;
use crate::audit::RequestId;
use crate::crypto::{SecretString, NONCE_LEN};
use crate::domain::apikeys::Scope;
use crate::domain::search::MAX_INDEXES;
use crate::domain::service::{ClientKey, Encrypted, IndexSelection, IndexValue, KeyError, Sealed};
use crate::domain::{EncryptionId, TenantId, VersionId};

/// The default algorithm (an encryption created without `algorithm`; see
/// [`crate::domain::algorithm::Algorithm`] for every one offered).
pub const ALGORITHM: &str = "AES-256-GCM";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `POST /v1/encrypt` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EncryptRequest {
    /// The encryption (key context) to encrypt under.
    #[schema(value_type = String, format = Uuid)]
    encryption_id: IdField,
    /// The data: any string (plain text or base64), returned byte for byte by decrypt.
    #[serde(deserialize_with = "secret_string")]
    #[schema(value_type = String)]
    data: SecretString,
    /// Encrypt under this version (active or enabled) instead of the active one.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Uuid, nullable = false)]
    encryption_version_id: Option<IdField>,
    /// The caller's context (up to 1024 characters; absent or empty: none),
    /// e.g. `users/42/email`: bound into the associated data of every
    /// algorithm, and needed again, byte for byte, to decrypt (a missing or
    /// different one is `decryption_failed`). Deterministic encryptions
    /// (`AES-256-GCM-SIV`) also derive their nonce from it. A string only;
    /// never logged or audited (docs/envelope.md).
    #[serde(default)]
    #[schema(max_length = 1024, nullable = false)]
    pub(super) context: Option<String>,
    /// Also return the value of these blind indexes (under their active
    /// versions) for the data. Needs the `index` scope besides `encrypt`.
    #[serde(default)]
    #[schema(nullable = false, max_items = 32)]
    indexes: Option<Vec<String>>,
}

/// The longest `context`, in characters.
pub(super) const MAX_CONTEXT_CHARS: usize = 1024;

/// A request's `indexes` list, checked for length (it names indexes of one
/// encryption, which has at most [`MAX_INDEXES`]).
fn index_names(names: &Option<Vec<String>>) -> Result<Option<&[String]>, ApiError> {
    match names {
        Some(n) if n.len() > MAX_INDEXES => Err(ApiError::InvalidRequest(format!(
            "`indexes`: at most {MAX_INDEXES} names"
        ))),
        other => Ok(other.as_deref()),
    }
}

/// A request's `context` as bytes (empty: none), checked for length.
pub(super) fn context_bytes(context: &Option<String>) -> Result<&[u8], ApiError> {
    let context = context.as_deref().unwrap_or("");
    if context.chars().count() > MAX_CONTEXT_CHARS {
        return Err(ApiError::InvalidRequest(format!(
            "`context`: at most {MAX_CONTEXT_CHARS} characters"
        )));
    }
    Ok(context.as_bytes())
}

/// What decrypt needs besides the ciphertext: pass it back unchanged.
/// `{}` for RSA-OAEP-256, whose ciphertext carries everything.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The 96-bit AES-GCM nonce, base64 (AES-256-GCM only).
    #[schema(format = Byte)]
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
}

/// `POST /v1/encrypt` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    /// Base64 of: for AES-256-GCM the ciphertext with the 16-byte GCM tag;
    /// for RSA-OAEP-256 one RSA-OAEP block (plaintexts up to the modulus
    /// size less 66 bytes) or a compact JWE (RSA-OAEP-256 + A256GCM) as
    /// ASCII (docs/algorithms.md).
    #[schema(format = Byte)]
    cipher_text: String,
    /// The encryption used.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The version used: store it with the ciphertext.
    #[schema(format = Uuid)]
    encryption_version_id: String,
    /// The encryption's algorithm: `AES-256-GCM`, `AES-256-GCM-SIV` for a
    /// deterministic encryption, or `RSA-OAEP-256`.
    #[schema(example = "AES-256-GCM")]
    algorithm: &'static str,
    /// What decrypt needs: store it with the ciphertext.
    metadata: Metadata,
    /// The blind-index values asked for with `indexes`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(super) indexes: Option<Vec<IndexValueView>>,
}

/// `POST /v1/index` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexRequest {
    /// The encryption whose indexes to compute.
    #[schema(format = Uuid)]
    pub(super) encryption_id: String,
    /// The plaintext, as encrypt would take it.
    #[serde(deserialize_with = "secret_string")]
    #[schema(value_type = String)]
    pub(super) data: SecretString,
    /// These indexes only (each must exist); absent: every index of the
    /// encryption.
    #[serde(default)]
    #[schema(nullable = false, max_items = 32)]
    pub(super) indexes: Option<Vec<String>>,
    /// Values under every live version of each index (newest first), not
    /// only the active one: what a lookup asks for while an index rotation
    /// is being rolled out (`WHERE email_idx IN (...)`).
    #[serde(default)]
    pub(super) all_versions: bool,
}

/// `POST /v1/index` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexResponse {
    /// The encryption.
    #[schema(format = Uuid)]
    pub(super) encryption_id: String,
    /// One value per index (per live version with `allVersions`).
    pub(super) indexes: Vec<IndexValueView>,
}

/// One blind-index value.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexValueView {
    /// The index.
    pub(super) name: String,
    /// The index version it was computed under.
    pub(super) version: i64,
    /// The value: lower-case hex of `ceil(bits / 8)` bytes.
    pub(super) value: String,
}

impl IndexValueView {
    /// The view of a computed value.
    pub(super) fn of(v: IndexValue) -> IndexValueView {
        IndexValueView {
            name: v.name,
            version: v.version,
            value: crate::crypto::hex(&v.value),
        }
    }
}

/// Encrypt data under the encryption's active version (or a named one).
#[utoipa::path(
    post,
    path = "/v1/encrypt",
    tag = "contract",
    params(MasterKeyParam),
    request_body = EncryptRequest,
    responses(
        (status = 200, description = "Encrypted", body = EncryptResponse),
        (status = 400, description = "Bad input (`malformed_json`, `invalid_request`, `invalid_master_key`, `master_key_not_applicable`)", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`certificate_mismatch`, `insufficient_scope`, `version_disabled` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `version_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
        (status = 409, description = "`version_exhausted`: the version (named explicitly, or the active one of a client-mode encryption) has made as many encryptions as its nonces allow (`max_encryptions_per_version`)", body = ErrorBody),
        (status = 422, description = "`version_not_encryptable`", body = ErrorBody),
        (status = 503, description = "`rotation_pending` (the active version reached the nonce bound, counting this replica's uses not yet recorded; it is rotated once the count is recorded: retry after Retry-After) or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn encrypt(
    State(state): State<AppState>,
    auth: Auth<EncryptScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<EncryptRequest>,
) -> Result<Response, ApiError> {
    let data_len = req.data.len();
    let (id, out, indexes) = Call::new(&state, &auth, &note, &client_key)
        .encrypt_sealed(req)
        .await?;
    // Base64 of the data and tag, two ids, the nonce and the field names.
    let headers = HeaderTexts::of_request();
    let mut body = String::with_capacity((data_len + 16) * 4 / 3 + 256 + headers.room());
    SealedResponse(id, &out, indexes.as_deref()).write_json(&mut body);
    let body_len = body.len();
    let mut body = body.into_bytes();
    let ends = headers.write(body_len, |text| body.extend_from_slice(text));
    Ok(answer(Bytes::from(body), body_len, ends))
}

/// One call of the contract, a request's or a batch item's: the service, the
/// caller's tenant, the request's audit note (which the call fills) and the
/// client key the request sent.
#[derive(Clone, Copy)]
pub(super) struct Call<'a> {
    state: &'a AppState,
    tenant: TenantId,
    note: &'a AuditNote,
    client_key: Option<&'a ClientKey>,
    /// Whether the caller holds `index` (encrypt's `indexes` option needs it).
    may_index: bool,
}

impl<'a> Call<'a> {
    /// A call by `auth`'s caller.
    pub(super) fn new<S: RequiredScope<Tenant = TenantId>>(
        state: &'a AppState,
        auth: &Auth<S>,
        note: &'a AuditNote,
        client_key: &'a MasterKeyHeader,
    ) -> Call<'a> {
        Call {
            state,
            tenant: auth.tenant,
            note,
            client_key: client_key.0.as_ref(),
            may_index: auth.principal.scopes.contains(Scope::Index),
        }
    }

    /// Encrypts under the active version, or the one named.
    pub(super) async fn encrypt(self, req: EncryptRequest) -> Result<EncryptResponse, ApiError> {
        let (id, out, indexes) = self.encrypt_sealed(req).await?;
        let mut response = encrypted_response(id, out);
        response.indexes = indexes;
        Ok(response)
    }

    /// [`Call::encrypt`], before its output becomes the response's strings
    /// (the single call writes its response straight from it).
    async fn encrypt_sealed(
        self,
        req: EncryptRequest,
    ) -> Result<(EncryptionId, Encrypted, Option<Vec<IndexValueView>>), ApiError> {
        let id = req.encryption_id.parse("encryptionId")?;
        self.note.encryption(id);
        let version = req.encryption_version_id;
        let version = version
            .map(|v| v.parse("encryptionVersionId"))
            .transpose()?;
        if let Some(v) = version {
            self.note.version(v);
        }
        let data = req.data.as_bytes();
        let context = context_bytes(&req.context)?;
        let names = index_names(&req.indexes)?;
        if names.is_some() && !self.may_index {
            return Err(ApiError::InsufficientScope(Scope::Index));
        }
        let service = &self.state.service;
        let out = service
            .encrypt(self.tenant, id, version, data, context, self.client_key)
            .await?;
        super::metrics::bytes_encrypted().increment(data.len() as u64);
        self.note.version(out.version_id);
        let indexes = match names {
            Some(names) => {
                let which = IndexSelection {
                    names: Some(names),
                    all_versions: false,
                };
                let values = service
                    .index_values(self.tenant, id, &req.data, which, self.client_key)
                    .await?;
                Some(values.into_iter().map(IndexValueView::of).collect())
            }
            None => None,
        };
        Ok((id, out, indexes))
    }

    /// Blind-index values of the data (no ciphertext, no decryption).
    pub(super) async fn index(self, req: IndexRequest) -> Result<IndexResponse, ApiError> {
        let id = parse_id(&req.encryption_id, "encryptionId")?;
        self.note.encryption(id);
        let which = IndexSelection {
            names: index_names(&req.indexes)?,
            all_versions: req.all_versions,
        };
        let values = self
            .state
            .service
            .index_values(self.tenant, id, &req.data, which, self.client_key)
            .await?;
        Ok(IndexResponse {
            encryption_id: id.to_string(),
            indexes: values.into_iter().map(IndexValueView::of).collect(),
        })
    }

    /// Decrypts a ciphertext made by encrypt.
    pub(super) async fn decrypt(
        self,
        mut req: DecryptRequest,
    ) -> Result<DecryptResponse, ApiError> {
        let context = req.context.take();
        let (id, version, nonce, ciphertext) = req.parse_noted(self.note)?;
        let context = context_bytes(&context)?;
        let (service, tenant, key) = (&self.state.service, self.tenant, self.client_key);
        let sealed = Sealed::new(version, nonce, &ciphertext).with_context(context);
        let opened = service.decrypt(tenant, id, sealed, key);
        let plaintext = opened.await?;
        super::metrics::bytes_decrypted().increment(plaintext.len() as u64);
        // The plaintext was a JSON string's UTF-8 bytes, and GCM authenticated
        // it, so this cannot fail unless the key itself is wrong, which GCM
        // already refused. The buffer becomes the string (no copy).
        let data = plaintext
            .into_string()
            .map_err(|_| ApiError::Key(KeyError::DecryptionFailed))?;
        Ok(DecryptResponse { data })
    }

    /// Re-encrypts a ciphertext under the active version; the plaintext never
    /// leaves the service.
    pub(super) async fn rewrap(self, mut req: DecryptRequest) -> Result<EncryptResponse, ApiError> {
        let context = req.context.take();
        let (id, version, nonce, ciphertext) = req.parse_noted(self.note)?;
        let context = context_bytes(&context)?;
        let (service, tenant, key) = (&self.state.service, self.tenant, self.client_key);
        let sealed = Sealed::new(version, nonce, &ciphertext).with_context(context);
        let rewrapped = service.rewrap(tenant, id, sealed, key);
        let out = rewrapped.await?;
        self.note.version(out.version_id);
        Ok(encrypted_response(id, out))
    }

    /// Makes a new version active.
    async fn rotate(self, req: RotateRequest) -> Result<RotateResponse, ApiError> {
        let id = parse_id(&req.encryption_id, "encryptionId")?;
        self.note.encryption(id);
        let service = &self.state.service;
        let new_version = service.rotate(self.tenant, id, self.client_key).await?;
        self.note.version(new_version);
        Ok(RotateResponse {
            new_version_id: new_version.to_string(),
        })
    }
}

/// The contract's encrypt output.
fn encrypted_response(id: EncryptionId, out: Encrypted) -> EncryptResponse {
    EncryptResponse {
        cipher_text: B64.encode(&out.ciphertext),
        encryption_id: id.to_string(),
        encryption_version_id: out.version_id.to_string(),
        algorithm: out.algorithm.as_str(),
        metadata: Metadata {
            nonce: out.nonce.map(|n| B64.encode(n)),
        },
        indexes: None,
    }
}

/// `POST /v1/decrypt` input: the fields encrypt returned.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecryptRequest {
    /// The encryption the ciphertext was made under.
    #[schema(value_type = String, format = Uuid)]
    encryption_id: IdField,
    /// The ciphertext, base64.
    #[schema(format = Byte)]
    cipher_text: String,
    /// The version that made it.
    #[schema(value_type = String, format = Uuid)]
    encryption_version_id: IdField,
    /// The metadata encrypt returned, unchanged.
    #[schema(value_type = Object)]
    metadata: DecryptMetadata,
    /// The `context` encrypt was given, byte for byte (absent or empty: none).
    #[serde(default)]
    #[schema(max_length = 1024, nullable = false)]
    context: Option<String>,
}

/// `POST /v1/decrypt` output.
#[derive(Serialize, ToSchema)]
pub struct DecryptResponse {
    /// Exactly the string that was encrypted.
    #[serde(serialize_with = "plain_str")]
    #[schema(value_type = String)]
    pub(super) data: SecretString,
}

/// Decrypt's `metadata`: any JSON object (anything else is bad input, as for
/// any field of the wrong type), read without building it as a map. It holds
/// the nonce only when the object is exactly what encrypt returned,
/// `{"nonce": <base64 of 12 bytes>}`; anything else (another member, a
/// repeated or missing nonce, a nonce that is not such a string) decrypts as
/// `decryption_failed`, like any tampering.
pub struct DecryptMetadata(Option<[u8; NONCE_LEN]>);

impl<'de> Deserialize<'de> for DecryptMetadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        use std::fmt;

        /// A member name: whether it is `nonce`.
        struct IsNonce(bool);
        impl<'de> Deserialize<'de> for IsNonce {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Name;
                impl Visitor<'_> for Name {
                    type Value = IsNonce;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a member name")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IsNonce, E> {
                        Ok(IsNonce(v == "nonce"))
                    }
                }
                d.deserialize_str(Name)
            }
        }

        /// The nonce member's value: the nonce if it is base64 of 12 bytes,
        /// `None` for any other JSON value.
        struct NonceValue(Option<[u8; NONCE_LEN]>);
        impl<'de> Deserialize<'de> for NonceValue {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Value;
                impl<'de> Visitor<'de> for Value {
                    type Value = NonceValue;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("any JSON value")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NonceValue, E> {
                        let mut nonce = [0u8; NONCE_LEN];
                        let ok = B64.decode_slice(v, &mut nonce) == Ok(NONCE_LEN);
                        Ok(NonceValue(ok.then_some(nonce)))
                    }
                    fn visit_bool<E>(self, _: bool) -> Result<NonceValue, E> {
                        Ok(NonceValue(None))
                    }
                    fn visit_i64<E>(self, _: i64) -> Result<NonceValue, E> {
                        Ok(NonceValue(None))
                    }
                    fn visit_u64<E>(self, _: u64) -> Result<NonceValue, E> {
                        Ok(NonceValue(None))
                    }
                    fn visit_f64<E>(self, _: f64) -> Result<NonceValue, E> {
                        Ok(NonceValue(None))
                    }
                    fn visit_unit<E>(self) -> Result<NonceValue, E> {
                        Ok(NonceValue(None))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<NonceValue, A::Error> {
                        while seq.next_element::<IgnoredAny>()?.is_some() {}
                        Ok(NonceValue(None))
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<NonceValue, A::Error> {
                        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                        Ok(NonceValue(None))
                    }
                }
                d.deserialize_any(Value)
            }
        }

        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = DecryptMetadata;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DecryptMetadata, A::Error> {
                let (mut nonce, mut nonces, mut others) = (None, 0, 0);
                while let Some(IsNonce(is_nonce)) = map.next_key()? {
                    if is_nonce {
                        nonces += 1;
                        nonce = map.next_value::<NonceValue>()?.0;
                    } else {
                        others += 1;
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(DecryptMetadata(if nonces == 1 && others == 0 {
                    nonce
                } else {
                    None
                }))
            }
        }
        d.deserialize_map(Object)
    }
}

/// Decrypt a ciphertext made by encrypt.
#[utoipa::path(
    post,
    path = "/v1/decrypt",
    tag = "contract",
    params(MasterKeyParam),
    request_body = DecryptRequest,
    responses(
        (status = 200, description = "Decrypted", body = DecryptResponse),
        (status = 400, description = "`decryption_failed` (wrong or tampered ciphertext, nonce, metadata or version), or bad input", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`certificate_mismatch`, `insufficient_scope`, `version_disabled` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
    )
)]
pub(super) async fn decrypt(
    State(state): State<AppState>,
    auth: Auth<DecryptScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<DecryptRequest>,
) -> Result<Response, ApiError> {
    let out = Call::new(&state, &auth, &note, &client_key)
        .decrypt(req)
        .await?;
    // Room for a few escapes; more, and the body moves to a larger buffer.
    let headers = HeaderTexts::of_request();
    let capacity = out.data.len() + out.data.len() / 16 + 16 + headers.room();
    let mut body = SecretBody::with_capacity(capacity);
    out.write_secret_json(&mut body);
    let body_len = body.len();
    let ends = headers.write(body_len, |text| body.push(text));
    Ok(answer(body.into_bytes(), body_len, ends))
}

/// The texts of the `Content-Length` and `X-Request-Id` of a `200` answer
/// to encrypt or decrypt, written after its body in the body's own buffer
/// (see [`answer`]): a header value made from text of its own is an
/// allocation each, one made from a slice of the body's buffer is none.
struct HeaderTexts {
    /// The request's id (`None`, outside the edge: none written).
    request_id: Option<RequestId>,
}

impl HeaderTexts {
    /// The texts for the request being answered.
    fn of_request() -> HeaderTexts {
        HeaderTexts {
            request_id: RequestFacts::read(|f| f.request_id).flatten(),
        }
    }

    /// The most bytes they take.
    fn room(&self) -> usize {
        20 + self.request_id.as_ref().map_or(0, |id| id.as_str().len())
    }

    /// Writes them with `push` after a body of `body_len` bytes: returns
    /// where the length and the id end.
    fn write(&self, body_len: usize, mut push: impl FnMut(&[u8])) -> (usize, usize) {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(body_len).as_bytes();
        push(digits);
        let length_end = body_len + digits.len();
        let id = self.request_id.as_ref().map_or("", |id| id.as_str());
        push(id.as_bytes());
        (length_end, length_end + id.len())
    }
}

/// A `200` JSON answer whose body is `buffer` up to `body_len`, and whose
/// `Content-Length` and `X-Request-Id` (when the request has one) are the
/// texts [`HeaderTexts::write`] put after it, ending at `ends`: the same
/// headers, in the same order, as the router and the edge would add, without
/// a buffer of their own, in the request's emptied header map. (A decrypt's
/// buffer holds plaintext: it is cleared when the last of the body and the
/// header values is dropped. Both values are marked sensitive, so that
/// HTTP/2's header compression never keeps them in its table, which would
/// hold the whole buffer, uncleared, for as long as the connection lasts.)
fn answer(buffer: Bytes, body_len: usize, ends: (usize, usize)) -> Response {
    let (length_end, id_end) = ends;
    let mut response = Response::new(axum::body::Body::from(buffer.slice(..body_len)));
    // The request's emptied header map, when there is one: no allocation.
    let mut headers = RequestFacts::change(|f| f.spare_headers.take())
        .flatten()
        .unwrap_or_default();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(mut length) = HeaderValue::from_maybe_shared(buffer.slice(body_len..length_end)) {
        length.set_sensitive(true);
        headers.insert(header::CONTENT_LENGTH, length);
    }
    if id_end > length_end {
        if let Ok(mut id) = HeaderValue::from_maybe_shared(buffer.slice(length_end..id_end)) {
            id.set_sensitive(true);
            headers.insert(REQUEST_ID, id);
        }
    }
    *response.headers_mut() = headers;
    response
}

/// A response body written straight to JSON: the same bytes serde_json writes
/// for the type's `Serialize` (which the OpenAPI document and the batch routes
/// use), without its per-byte escape checks (see [`crate::json`]).
trait WriteJson {
    fn write_json(&self, out: &mut String);
}

impl WriteJson for EncryptResponse {
    fn write_json(&self, out: &mut String) {
        let mut object = crate::json::Object::new(out);
        object
            .str("cipherText", &self.cipher_text)
            .str("encryptionId", &self.encryption_id)
            .str("encryptionVersionId", &self.encryption_version_id)
            .str("algorithm", self.algorithm)
            .with("metadata", |out| match &self.metadata.nonce {
                Some(nonce) => crate::json::Object::new(out).str("nonce", nonce).end(),
                None => crate::json::Object::new(out).end(),
            });
        if let Some(values) = &self.indexes {
            object.with("indexes", |out| write_index_values(out, values));
        }
        object.end();
    }
}

/// `[{"name","version","value"}, ...]`, as serde_json writes it.
pub(super) fn write_index_values(out: &mut String, values: &[IndexValueView]) {
    out.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        crate::json::Object::new(out)
            .str("name", &v.name)
            .u64("version", v.version.max(0) as u64)
            .str("value", &v.value)
            .end();
    }
    out.push(']');
}

/// Encrypt's output written straight from the sealed bytes and ids: the same
/// JSON as [`EncryptResponse`]'s, without making its strings first (four
/// allocations fewer per request).
struct SealedResponse<'a>(EncryptionId, &'a Encrypted, Option<&'a [IndexValueView]>);

impl WriteJson for SealedResponse<'_> {
    fn write_json(&self, out: &mut String) {
        let SealedResponse(id, sealed, indexes) = self;
        let (mut id_buf, mut version_buf) = ([0; 36], [0; 36]);
        let mut nonce_buf = [0u8; 16];
        // RSA-OAEP-256 has no nonce: its metadata is `{}`.
        let nonce = sealed
            .nonce
            .and_then(|n| B64.encode_slice(n, &mut nonce_buf).ok())
            .map(|n| std::str::from_utf8(&nonce_buf[..n]).unwrap_or_default());
        let mut object = crate::json::Object::new(out);
        object
            .with("cipherText", |out| {
                // Base64 never needs escaping.
                out.push('"');
                B64.encode_string(&sealed.ciphertext, out);
                out.push('"');
            })
            .str("encryptionId", id.encode(&mut id_buf))
            .str(
                "encryptionVersionId",
                sealed.version_id.encode(&mut version_buf),
            )
            .str("algorithm", sealed.algorithm.as_str())
            .with("metadata", |out| match nonce {
                Some(nonce) => crate::json::Object::new(out).str("nonce", nonce).end(),
                None => crate::json::Object::new(out).end(),
            });
        if let Some(values) = indexes {
            object.with("indexes", |out| write_index_values(out, values));
        }
        object.end();
    }
}

impl DecryptResponse {
    /// `{"data":"..."}`, as serde_json writes it, into memory cleared on drop.
    fn write_secret_json(&self, out: &mut SecretBody) {
        out.push(b"{\"data\":");
        // Writing to a `SecretBody` cannot fail.
        let _ = crate::json::write_str(out, &self.data);
        out.push(b"}");
    }
}

/// A decrypt request parsed: encryption, version, nonce (if the metadata holds
/// one) and ciphertext.
type ParsedCiphertext = (EncryptionId, VersionId, Option<[u8; NONCE_LEN]>, Vec<u8>);

impl DecryptRequest {
    /// Parses the fields; bad ids and bad base64 are `invalid_request`, while a
    /// bad nonce or metadata is left for `decryption_failed`. The ids go into
    /// the audit note as soon as they parse.
    fn parse_noted(self, note: &AuditNote) -> Result<ParsedCiphertext, ApiError> {
        let id = self.encryption_id.parse("encryptionId")?;
        note.encryption(id);
        let version = self.encryption_version_id.parse("encryptionVersionId")?;
        note.version(version);
        let ciphertext = B64
            .decode(self.cipher_text.as_bytes())
            .map_err(|_| ApiError::InvalidRequest("`cipherText`: not valid base64".into()))?;
        Ok((id, version, self.metadata.0, ciphertext))
    }
}

/// A decrypt body taken as far as the handler takes it before the key is
/// involved (the fuzz targets' entry, `crate::fuzzing`).
#[cfg(feature = "fuzzing")]
pub(super) fn parse_decrypt_body(bytes: &[u8]) {
    if let Ok(req) = super::extract::parse_json::<DecryptRequest>(bytes) {
        let _ = req.parse_noted(&AuditNote::default());
    }
}

/// `POST /v1/rotate` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    /// The encryption to rotate.
    #[schema(format = Uuid)]
    encryption_id: String,
}

/// `POST /v1/rotate` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotateResponse {
    /// The new active version; older versions keep decrypting.
    #[schema(format = Uuid)]
    new_version_id: String,
}

/// Make a new version active. Every older version keeps decrypting.
#[utoipa::path(
    post,
    path = "/v1/rotate",
    tag = "contract",
    params(MasterKeyParam),
    request_body = RotateRequest,
    responses(
        (status = 200, description = "Rotated", body = RotateResponse),
        (status = 400, description = "Bad input", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`certificate_mismatch`, `insufficient_scope` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
    )
)]
pub(super) async fn rotate(
    State(state): State<AppState>,
    auth: Auth<RotateScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<RotateRequest>,
) -> Result<Json<RotateResponse>, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    call.rotate(req).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(value: &impl WriteJson) -> String {
        let mut out = String::new();
        value.write_json(&mut out);
        out
    }

    #[test]
    fn decrypt_metadata_holds_a_nonce_only_when_it_is_exactly_what_encrypt_returned() {
        let nonce = |json: &str| {
            serde_json::from_str::<DecryptMetadata>(json)
                .map(|m| m.0)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            nonce(r#"{"nonce":"AAECAwQFBgcICQoL"}"#),
            Ok(Some([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
        );
        // Escaped the long way round, it is the same string.
        assert_eq!(
            nonce(r#"{"nonce":"AAECAwQFBgcICQo\u004c"}"#),
            Ok(Some([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
        );
        for tampered in [
            r#"{}"#,
            r#"{"nonce":"AAAA"}"#,
            r#"{"nonce":"AAECAwQFBgcICQoLDA=="}"#,
            r#"{"nonce":"not base64!"}"#,
            r#"{"nonce":7}"#,
            r#"{"nonce":null}"#,
            r#"{"nonce":true}"#,
            r#"{"nonce":1.5}"#,
            r#"{"nonce":["AAECAwQFBgcICQoL"]}"#,
            r#"{"nonce":{"nonce":"AAECAwQFBgcICQoL"}}"#,
            r#"{"nonce":"AAECAwQFBgcICQoL","extra":1}"#,
            r#"{"extra":[1,{"a":null}],"nonce":"AAECAwQFBgcICQoL"}"#,
            r#"{"nonce":"AAECAwQFBgcICQoL","nonce":"AAECAwQFBgcICQoL"}"#,
        ] {
            assert_eq!(nonce(tampered), Ok(None), "{tampered}");
        }
        // Not an object at all is bad input, with serde's usual wording.
        for bad in [r#""nonce""#, "[]", "null", "3"] {
            let err = nonce(bad).expect_err(bad);
            assert!(err.contains("expected a map"), "{bad}: {err}");
        }
    }

    #[test]
    fn responses_are_written_as_serde_json_serializes_them() {
        let encrypted = EncryptResponse {
            cipher_text: "q83vASNFZ4mrze8BI0VniQ==".into(),
            encryption_id: "00000000-0000-0000-0000-000000000001".into(),
            encryption_version_id: "00000000-0000-0000-0000-000000000002".into(),
            algorithm: ALGORITHM,
            metadata: Metadata {
                nonce: Some("AAECAwQFBgcICQoL".into()),
            },
            indexes: None,
        };
        let mut indexed = EncryptResponse {
            indexes: Some(vec![
                IndexValueView {
                    name: "email".into(),
                    version: 2,
                    value: "0a1b".into(),
                },
                IndexValueView {
                    name: "phone".into(),
                    version: 1,
                    value: "ff".into(),
                },
            ]),
            ..encrypted_response(
                crate::domain::EncryptionId::new_random(),
                Encrypted {
                    algorithm: crate::domain::algorithm::Algorithm::Aes256GcmSiv,
                    version_id: crate::domain::VersionId::new_random(),
                    nonce: Some([7; NONCE_LEN]),
                    ciphertext: vec![1, 2, 3],
                },
            )
        };
        assert_eq!(
            written(&indexed),
            serde_json::to_string(&indexed).expect("serializes")
        );
        indexed.indexes = Some(vec![]);
        assert_eq!(
            written(&indexed),
            serde_json::to_string(&indexed).expect("serializes")
        );
        assert_eq!(
            written(&encrypted),
            serde_json::to_string(&encrypted).expect("serializes")
        );
        let rsa = EncryptResponse {
            algorithm: "RSA-OAEP-256",
            metadata: Metadata { nonce: None },
            ..encrypted
        };
        assert_eq!(
            written(&rsa),
            serde_json::to_string(&rsa).expect("serializes")
        );
        for len in [0, 1, 2, 3, 64, 1024] {
            for algorithm in crate::domain::algorithm::Algorithm::ALL {
                let sealed = Encrypted {
                    algorithm,
                    version_id: VersionId::new_random(),
                    nonce: (algorithm != crate::domain::algorithm::Algorithm::RsaOaep256)
                        .then_some([7; NONCE_LEN]),
                    ciphertext: (0..len + 16).map(|i| i as u8).collect(),
                };
                let id = EncryptionId::new_random();
                let indexes = [IndexValueView {
                    name: "email".into(),
                    version: 2,
                    value: "ab12".into(),
                }];
                for with in [None, Some(&indexes[..])] {
                    let direct = written(&SealedResponse(id, &sealed, with));
                    let copy = Encrypted {
                        ciphertext: sealed.ciphertext.clone(),
                        ..sealed
                    };
                    let mut via_strings = encrypted_response(id, copy);
                    via_strings.indexes = with.map(|v| {
                        v.iter()
                            .map(|i| IndexValueView {
                                name: i.name.clone(),
                                version: i.version,
                                value: i.value.clone(),
                            })
                            .collect()
                    });
                    assert_eq!(
                        direct,
                        serde_json::to_string(&via_strings).expect("serializes")
                    );
                }
            }
        }
        for data in [
            "",
            "plain",
            "\"quotes\", \\backslashes\\, \n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}",
            "ünïcödé 日本語 🔐 \u{2028}",
            &"x".repeat(17_000),
        ] {
            let decrypted = DecryptResponse {
                data: SecretString::new(data.into()),
            };
            let mut body = SecretBody::with_capacity(1);
            decrypted.write_secret_json(&mut body);
            assert_eq!(
                body.as_bytes(),
                serde_json::to_vec(&decrypted)
                    .expect("serializes")
                    .as_slice()
            );
        }
    }

    /// Known answers for the contract's own encoding of a ciphertext (see
    /// docs/security.md, "Byte layouts"); `crypto::wycheproof` checks the
    /// bytes themselves. Run with `scripts/test wycheproof`.
    mod wycheproof {
        use super::*;
        use ::wycheproof::aead::{TestName, TestSet};

        /// `scripts/known-answers.py`'s `SEALED_DATA` (sealed under nonce
        /// 00..0b), as the contract carries it.
        const SEALED_DATA_B64: &str =
            "DGevbKSXpjvmL/j838kZA/Ch4kbKW25c2uVJIpFa+NfdF+qNhrmS/BwS6Q==";
        const SEALED_DATA: &str = "0c67af6ca497a63be62ff8fcdfc91903f0a1e246ca5b6e5cdae54922915af8d7dd17ea8d86b992fc1c12e9";
        const ENCRYPTION_ID: &str = "00112233-4455-6677-8899-aabbccddeeff";
        const VERSION_ID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

        #[test]
        fn wycheproof_aes_gcm_nonces_are_a_nonce_in_decrypt_metadata_only_at_96_bits() {
            let set = TestSet::load(TestName::AesGcm).unwrap();
            let (mut taken, mut refused) = (0, 0);
            for group in set.test_groups {
                for t in group.tests {
                    let json = format!(r#"{{"nonce":"{}"}}"#, B64.encode(t.nonce.as_slice()));
                    let parsed = serde_json::from_str::<DecryptMetadata>(&json).unwrap().0;
                    if group.nonce_size == 96 {
                        assert_eq!(
                            parsed.as_ref().map(|n| n.as_slice()),
                            Some(t.nonce.as_slice())
                        );
                        taken += 1;
                    } else {
                        // Decrypt answers `decryption_failed`, as for any tampering.
                        assert_eq!(
                            parsed, None,
                            "tcId {}: a {}-bit nonce",
                            t.tc_id, group.nonce_size
                        );
                        refused += 1;
                    }
                }
            }
            assert!(taken > 0 && refused > 0, "{taken} taken, {refused} refused");
        }

        #[test]
        fn wycheproof_keyward_encrypt_response_of_format_v1_is_fixed() {
            let out = Encrypted {
                algorithm: crate::domain::algorithm::Algorithm::Aes256Gcm,
                version_id: VERSION_ID.parse().unwrap(),
                nonce: Some(std::array::from_fn(|i| i as u8)),
                ciphertext: crate::crypto::parse_hex(SEALED_DATA).unwrap(),
            };
            let response = encrypted_response(ENCRYPTION_ID.parse().unwrap(), out);
            assert_eq!(
                written(&response),
                format!(
                    r#"{{"cipherText":"{SEALED_DATA_B64}","encryptionId":"{ENCRYPTION_ID}","encryptionVersionId":"{VERSION_ID}","algorithm":"AES-256-GCM","metadata":{{"nonce":"AAECAwQFBgcICQoL"}}}}"#
                )
            );
        }

        #[test]
        fn wycheproof_keyward_decrypt_request_of_format_v1_parses_to_its_bytes() {
            let body = format!(
                r#"{{"encryptionId":"{ENCRYPTION_ID}","cipherText":"{SEALED_DATA_B64}","encryptionVersionId":"{VERSION_ID}","metadata":{{"nonce":"AAECAwQFBgcICQoL"}}}}"#
            );
            let request: DecryptRequest = serde_json::from_str(&body).unwrap();
            let (id, version, nonce, ciphertext) =
                request.parse_noted(&AuditNote::default()).unwrap();
            assert_eq!(id.to_string(), ENCRYPTION_ID);
            assert_eq!(version.to_string(), VERSION_ID);
            assert_eq!(nonce, Some(std::array::from_fn(|i| i as u8)));
            assert_eq!(crate::crypto::hex(&ciphertext), SEALED_DATA);
        }
    }
}
