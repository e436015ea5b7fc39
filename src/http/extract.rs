//! Request extractors: who is calling (with the scope the route needs, visible
//! in each handler's signature), the optional client master key, and the JSON
//! body parsed once at the edge with errors that name fields but never values.

use std::str::FromStr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use utoipa::IntoParams;

use super::audit_note::RequestFacts;
use super::edge::BodyClaim;
use super::error::ApiError;
use super::state::AppState;
use crate::domain::apikeys::Scope;
use crate::domain::identity::ClientIdentity;
use crate::domain::service::{ClientKey, Principal};
use crate::domain::TenantId;

// Parsed once: looking a header up by `&str` parses the name every time.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_API_SECRET: HeaderName = HeaderName::from_static("x-api-secret");
const X_MASTER_KEY: HeaderName = HeaderName::from_static("x-master-key");

/// Who may call a route: which kind of API key, holding which scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// A tenant key with this scope; it acts on its own tenant only. An
    /// operator key is refused with `403 tenant_key_required`.
    Tenant(Scope),
    /// An operator key with this scope. A tenant key is refused with
    /// `403 insufficient_scope` (it can never hold an operator scope).
    Operator(Scope),
    /// A tenant key with the first scope (acting on its own tenant), or an
    /// operator key with the second (acting on every tenant).
    TenantOrOperator(Scope, Scope),
}

impl Requirement {
    /// The scope names, for documents: `admin`, or `admin` / `audit`.
    pub fn describe(self) -> String {
        match self {
            Requirement::Tenant(s) => format!("tenant key with `{}`", s.as_str()),
            Requirement::Operator(s) => format!("operator key with `{}`", s.as_str()),
            Requirement::TenantOrOperator(t, o) => format!(
                "tenant key with `{}` (its own tenant) or operator key with `{}`",
                t.as_str(),
                o.as_str()
            ),
        }
    }
}

/// What a route requires of its caller, as a type (a "scope marker").
pub trait RequiredScope: Send + Sync + 'static {
    /// The requirement.
    const REQUIRES: Requirement;
    /// What the handler learns about the caller's tenant: a [`TenantId`] on
    /// tenant routes, nothing on operator routes, `Option<TenantId>` (`None`:
    /// an operator) where both are admitted.
    type Tenant: Copy + Send + Sync + 'static;
    /// [`Self::Tenant`] from the authenticated key's tenant; `None` if this
    /// kind of key cannot call the route (the extractor has refused it before).
    fn tenant(of_key: Option<TenantId>) -> Option<Self::Tenant>;
}

macro_rules! scope_marker {
    ($name:ident, tenant: $scope:expr) => {
        #[doc = concat!("Tenant routes needing `", stringify!($scope), "`.")]
        pub struct $name;
        impl RequiredScope for $name {
            const REQUIRES: Requirement = Requirement::Tenant($scope);
            type Tenant = TenantId;
            fn tenant(of_key: Option<TenantId>) -> Option<TenantId> {
                of_key
            }
        }
    };
    ($name:ident, operator: $scope:expr) => {
        #[doc = concat!("Operator routes needing `", stringify!($scope), "`.")]
        pub struct $name;
        impl RequiredScope for $name {
            const REQUIRES: Requirement = Requirement::Operator($scope);
            type Tenant = ();
            fn tenant(of_key: Option<TenantId>) -> Option<()> {
                of_key.is_none().then_some(())
            }
        }
    };
    ($name:ident, tenant: $tenant:expr, operator: $operator:expr) => {
        #[doc = concat!("Routes for a tenant key with `", stringify!($tenant), "` or an operator key with `", stringify!($operator), "`.")]
        pub struct $name;
        impl RequiredScope for $name {
            const REQUIRES: Requirement = Requirement::TenantOrOperator($tenant, $operator);
            type Tenant = Option<TenantId>;
            fn tenant(of_key: Option<TenantId>) -> Option<Option<TenantId>> {
                Some(of_key)
            }
        }
    };
}
scope_marker!(EncryptScope, tenant: Scope::Encrypt);
scope_marker!(DecryptScope, tenant: Scope::Decrypt);
scope_marker!(RotateScope, tenant: Scope::Rotate);
scope_marker!(ManageScope, tenant: Scope::Manage);
scope_marker!(AdminScope, tenant: Scope::Admin);
scope_marker!(IndexScope, tenant: Scope::Index);
scope_marker!(ImportScope, tenant: Scope::Import);
scope_marker!(ExportScope, tenant: Scope::Export);
scope_marker!(DataKeyScope, tenant: Scope::DataKey);
scope_marker!(UnwrapScope, tenant: Scope::Unwrap);
scope_marker!(OperatorScope, operator: Scope::Operator);
scope_marker!(AuditReadScope, tenant: Scope::Admin, operator: Scope::Audit);

/// An authenticated caller allowed by `S`.
pub struct Auth<S: RequiredScope> {
    /// Who is calling.
    pub principal: Principal,
    /// The caller's tenant, as `S` sees it (see [`RequiredScope::Tenant`]).
    pub tenant: S::Tenant,
}

/// Whether `principal` meets `requirement`; the refusal if not.
fn admit(principal: &Principal, requirement: Requirement) -> Result<(), ApiError> {
    let tenant_key = principal.tenant_id.is_some();
    match requirement {
        Requirement::Tenant(_) if !tenant_key => Err(ApiError::TenantKeyRequired),
        Requirement::Tenant(scope) | Requirement::Operator(scope) => {
            // A tenant key never holds an operator scope (a row that says
            // otherwise does not authenticate), so this also keeps tenant keys
            // off operator routes; the kind is checked as well.
            if principal.scopes.contains(scope) && (tenant_key != scope.is_operator()) {
                Ok(())
            } else {
                Err(ApiError::InsufficientScope(scope))
            }
        }
        Requirement::TenantOrOperator(tenant, operator) => {
            let scope = if tenant_key { tenant } else { operator };
            if principal.scopes.contains(scope) {
                Ok(())
            } else {
                Err(ApiError::InsufficientScope(scope))
            }
        }
    }
}

fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, ()> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    first.to_str().map(Some).map_err(|_| ())
}

impl<S: RequiredScope> FromRequestParts<AppState> for Auth<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (addr, note) =
            RequestFacts::read(|f| (f.client_addr, f.note.clone())).unwrap_or_default();
        let key = single_header(&parts.headers, &X_API_KEY);
        let secret = single_header(&parts.headers, &X_API_SECRET);
        let (key, secret) = match (key, secret) {
            (Ok(Some(k)), Ok(Some(s))) => (k, s),
            (Ok(None), Ok(None)) => {
                // No credentials cost nothing to send: bounded per address.
                state.guard.check_unauthenticated(addr)?;
                return Err(ApiError::MissingCredentials);
            }
            // One without the other, or repeated, or not text: present but
            // malformed, not absent.
            _ => {
                state.guard.check_unauthenticated(addr)?;
                return Err(ApiError::InvalidCredentials);
            }
        };
        let principal = match check_credentials(state, key, secret, addr).await {
            Ok(p) => p,
            Err(e) => {
                // The audit record names the key id presented, only when it has
                // the form of one (never a secret pasted into the wrong header).
                if let Some(note) = &note {
                    if crate::domain::service::looks_like_key_id(key) {
                        note.refused(key);
                    }
                }
                return Err(e);
            }
        };
        if let Some(note) = note {
            note.caller(&principal);
        }
        if let Some(bound) = &principal.cert_spki_sha256 {
            // A key bound to a certificate works only on a connection that
            // presented that certificate's public key. Checked before the
            // key's rate limit, so that a thief holding the secret but not the
            // certificate cannot spend the holder's rate; and counted like a
            // wrong secret against the thief's address.
            let presented = parts.extensions.get::<Arc<ClientIdentity>>();
            let matches = presented.is_some_and(|id| bool::from(id.spki_sha256.ct_eq(bound)));
            if !matches {
                metrics::counter!("keyward_auth_failures_total").increment(1);
                state.guard.record_failure(addr);
                return Err(ApiError::CertificateMismatch);
            }
        }
        state.guard.check_rate(&principal.key_id)?;
        admit(&principal, S::REQUIRES)?;
        // `admit` let only the kinds of key that `S` takes through.
        let tenant = S::tenant(principal.tenant_id).ok_or(ApiError::TenantKeyRequired)?;
        Ok(Auth { principal, tenant })
    }
}

/// The key id and secret, then the lockout of the client's address for a
/// wrong one; a refusal counts towards the lockout of the address, never of
/// the key id (see [`crate::domain::guard`]: a lockout per key id could be
/// aimed at its holder by anyone who knows the id).
///
/// A locked address still gets through with a right secret: the lockout
/// stops guessing and noise, and a right secret is not a guess (secrets are
/// 256-bit random). So a lockout earned by someone else behind the same
/// address (a NAT, a load balancer, a spoofed forwarding header from a
/// misdeclared proxy) never locks out a key's holder.
async fn check_credentials(
    state: &AppState,
    key: &str,
    secret: &str,
    addr: Option<std::net::IpAddr>,
) -> Result<Principal, ApiError> {
    match state.service.authenticate(key, secret).await {
        Ok(p) => Ok(p),
        Err(crate::domain::service::AuthError::InvalidCredentials) => {
            metrics::counter!("keyward_auth_failures_total").increment(1);
            // Already locked: say so (with Retry-After) rather than count on.
            state.guard.check_lockout(addr)?;
            state.guard.record_failure(addr);
            Err(ApiError::InvalidCredentials)
        }
        Err(e) => Err(e.into()),
    }
}

/// The optional `X-Master-Key` header. Present but malformed is an error, never
/// treated as absent.
pub struct MasterKeyHeader(pub Option<ClientKey>);

impl<St: Send + Sync> FromRequestParts<St> for MasterKeyHeader {
    type Rejection = ApiError;

    /// The key is decoded into zeroizing memory, and the header taken out of
    /// the request, so that nothing after this extractor (a later layer, the
    /// request's drop at the end of the response) holds it. Its bytes are
    /// hyper's: `HeaderValue` offers no way to clear them.
    async fn from_request_parts(parts: &mut Parts, _: &St) -> Result<Self, ApiError> {
        let key = match single_header(&parts.headers, &X_MASTER_KEY) {
            Ok(None) => Ok(MasterKeyHeader(None)),
            Ok(Some(v)) => ClientKey::from_base64(v)
                .map(|k| MasterKeyHeader(Some(k)))
                .ok_or(ApiError::InvalidMasterKeyHeader),
            Err(()) => Err(ApiError::InvalidMasterKeyHeader),
        };
        parts.headers.remove(&X_MASTER_KEY);
        key
    }
}

/// The `X-Master-Key` header, accepted by encrypt, decrypt, rotate and create.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct MasterKeyParam {
    /// Client-provided master key (zero-knowledge mode): base64 of 32 to 512 bytes.
    /// Required for encryptions created with it; refused for platform-managed ones.
    #[param(
        rename = "X-Master-Key",
        nullable = false,
        pattern = r"^(?:(?:[A-Za-z0-9+/]{4}){10}[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=?|(?:[A-Za-z0-9+/]{4}){11,170}(?:[A-Za-z0-9+/][AQgw](?:==)?|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=?)?)$"
    )]
    x_master_key: Option<String>,
}

/// Parses a UUID field into an id newtype; the error names the field only.
pub(crate) fn parse_id<T: FromStr>(value: &str, field: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::InvalidRequest(format!("`{field}`: not a UUID")))
}

/// A UUID member of a request body, parsed as it is read instead of copied
/// into a `String` first (an allocation per member). A value that is not a
/// UUID is kept as such, for the handler to refuse with the member's name
/// ([`IdField::parse`]) at the point, and with the message, of [`parse_id`];
/// a value that is not a string is serde's error, as for a `String`.
#[derive(Clone, Copy)]
pub struct IdField(Option<uuid::Uuid>);

impl IdField {
    /// The id, or `invalid_request` naming `field` (as [`parse_id`]).
    pub(crate) fn parse<T: From<uuid::Uuid>>(self, field: &str) -> Result<T, ApiError> {
        self.0
            .map(T::from)
            .ok_or_else(|| ApiError::InvalidRequest(format!("`{field}`: not a UUID")))
    }
}

impl<'de> serde::Deserialize<'de> for IdField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = IdField;
            // What `String`'s visitor expects: the same error messages.
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IdField, E> {
                // `FromStr` of the id types.
                Ok(IdField(uuid::Uuid::try_parse(v).ok()))
            }
        }
        d.deserialize_str(Text)
    }
}

/// Like [`parse_id`], for a field that may be left out.
pub(crate) fn parse_optional_id<T: FromStr>(
    value: Option<&str>,
    field: &str,
) -> Result<Option<T>, ApiError> {
    value.map(|v| parse_id(v, field)).transpose()
}

/// A JSON body of type `T`. An empty body counts as `{}` when `T` allows it
/// (every field optional); otherwise it is a missing-field error.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, St: Send + Sync> FromRequest<St> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &St) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ok = ct
                .to_str()
                .ok()
                .and_then(|v| v.split(';').next())
                .is_some_and(|mime| is_json_mime(mime.trim()));
            if !ok {
                return Err(ApiError::UnsupportedMediaType);
            }
        }
        let limit = RequestFacts::read(|f| f.body_limit)
            .flatten()
            .unwrap_or(AXUM_DEFAULT_BODY_LIMIT);
        // Batch and large bodies take their share of the memory budget now,
        // after the caller was authenticated and before a byte is read.
        if let Some(claim) = req.extensions().get::<BodyClaim>() {
            claim.take()?;
        }
        // Nothing reads the request's headers after this extractor: the
        // answer may reuse their map (see `RequestFacts::spare_headers`).
        let (mut parts, body) = req.into_parts();
        parts.headers.clear();
        RequestFacts::change(|f| f.spare_headers = Some(std::mem::take(&mut parts.headers)));
        drop(parts);
        let bytes = read_body(body, limit).await?;
        let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
            parse_json(b"{}")
        } else {
            parse_json(&bytes)
        };
        // An encrypt body holds plaintext: cleared once parsed, when it is
        // Keyward's alone to clear.
        super::secret::clear_if_unique(bytes);
        parsed.map(ApiJson)
    }
}

/// The body limit where none was set (axum's default): no route that takes a
/// body is built without one.
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 << 20;

/// Whether a media type (without its parameters) is JSON:
/// `application/json` or `application/*+json`, in any case.
fn is_json_mime(mime: &str) -> bool {
    const APPLICATION: &str = "application/";
    const SUFFIX: &str = "+json";
    let (bytes, n) = (mime.as_bytes(), mime.len());
    mime.eq_ignore_ascii_case("application/json")
        || (n >= APPLICATION.len() + SUFFIX.len()
            && bytes[..APPLICATION.len()].eq_ignore_ascii_case(APPLICATION.as_bytes())
            && bytes[n - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX.as_bytes()))
}

/// The whole body, at most `limit` bytes (`payload_too_large` beyond, as soon
/// as a frame goes over). A body that comes in one frame is that frame's
/// bytes, not a copy; more frames are joined into one buffer.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let (mut single, mut joined, mut total) = (None::<Bytes>, bytes::BytesMut::new(), 0usize);
    let mut frames = body.into_data_stream();
    // An encrypt body is plaintext: every copy this makes of it is cleared
    // before it is freed (a frame once copied, the joined buffer when it
    // grows or the body is refused).
    let refuse = |single: Option<Bytes>, joined: &mut bytes::BytesMut, error: ApiError| {
        if let Some(single) = single {
            super::secret::clear_if_unique(single);
        }
        zeroize::Zeroize::zeroize(&mut joined[..]);
        Err(error)
    };
    while let Some(data) = frames.next().await {
        let Ok(data) = data else {
            let error = ApiError::InvalidRequest("the request body could not be read".into());
            return refuse(single, &mut joined, error);
        };
        if data.is_empty() {
            continue;
        }
        total = total.saturating_add(data.len());
        if total > limit {
            super::secret::clear_if_unique(data);
            return refuse(single, &mut joined, ApiError::PayloadTooLarge(limit));
        }
        match single.take() {
            None if joined.is_empty() => single = Some(data),
            first => {
                if let Some(first) = first {
                    append_cleared(&mut joined, &first);
                    super::secret::clear_if_unique(first);
                }
                append_cleared(&mut joined, &data);
                super::secret::clear_if_unique(data);
            }
        }
    }
    Ok(single.unwrap_or_else(|| joined.freeze()))
}

/// Appends `data` to `joined`, growing it by hand so that the buffer it
/// outgrows is cleared before it is freed.
fn append_cleared(joined: &mut bytes::BytesMut, data: &[u8]) {
    if joined.capacity() - joined.len() < data.len() {
        let needed = joined.len() + data.len();
        let mut grown = bytes::BytesMut::with_capacity(needed.max(2 * joined.capacity()));
        grown.extend_from_slice(joined);
        zeroize::Zeroize::zeroize(&mut joined[..]);
        *joined = grown;
    }
    joined.extend_from_slice(data);
}

/// Deserializes `bytes`, turning serde's errors into messages that name the
/// field and the problem but never echo a value from the request.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Every body is an object: serde's derived structs would also take an
    // array of the fields in order, which no client means to send.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    }
    // Most bodies parse: only a failure pays for tracking the path to the
    // field it names.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                ApiError::InvalidRequest(describe_data_error(&path, &inner.to_string()))
            }
            _ => {
                ApiError::MalformedJson(format!("line {}, column {}", inner.line(), inner.column()))
            }
        }
    })?;
    de.end().map_err(|e| {
        ApiError::MalformedJson(format!(
            "trailing characters at line {}, column {}",
            e.line(),
            e.column()
        ))
    })?;
    Ok(value)
}

/// Deserializes a nested struct from a JSON object only (not from an array of
/// its fields in order, which serde's derive also accepts).
pub fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::Deserialize;
    let map = serde_json::Map::deserialize(deserializer)?;
    T::deserialize(serde_json::Value::Object(map)).map_err(serde::de::Error::custom)
}

/// An optional `u32` that also accepts a JSON number with a zero fraction
/// (`5.0`): JSON has one number type, and JSON Schema calls 5.0 an integer.
pub fn whole_number<'de, D>(deserializer: D) -> Result<Option<u32>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    let Some(n) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX))
                .map(|f| f as u64)
        })
        .and_then(|v| u32::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Other("a number"),
                &"a whole number from 0 to 4294967295",
            )
        })
}

fn describe_data_error(path: &str, message: &str) -> String {
    let at = if path == "." || path.is_empty() {
        String::new()
    } else {
        format!("`{path}`: ")
    };
    // serde's own messages quote the offending value after "invalid type:" and
    // "invalid value:"; keep only the part naming what was expected.
    let expected = message
        .rsplit_once(", expected ")
        .map(|(_, e)| e.split(" at line ").next().unwrap_or(e).to_string());
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        return format!("{at}missing field `{field}`");
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field: String = rest
            .split('`')
            .next()
            .unwrap_or("")
            .chars()
            .take(64)
            .collect();
        // serde_path_to_error's path already ends with the unknown field.
        let parent = path
            .strip_suffix(field.as_str())
            .unwrap_or(path)
            .trim_end_matches('.');
        return if parent.is_empty() || parent == "." {
            format!("unknown field `{field}`")
        } else {
            format!("`{parent}`: unknown field `{field}`")
        };
    }
    if message.starts_with("invalid type") {
        return format!(
            "{at}wrong type, expected {}",
            expected.as_deref().unwrap_or("another type")
        );
    }
    match expected {
        Some(e) => format!("{at}invalid value, expected {e}"),
        None => format!("{at}invalid value"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        encryption_id: String,
        count: Option<u32>,
    }

    fn message(json: &str) -> String {
        match parse_json::<Body>(json.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(b) => panic!("parsed {b:?}"),
        }
    }

    #[test]
    fn errors_name_the_field_but_not_the_value() {
        assert_eq!(message("{}"), "missing field `encryptionId`");
        let m = message(r#"{"encryptionId": 5}"#);
        assert!(
            m.contains("`encryptionId`") && m.contains("wrong type") && !m.contains('5'),
            "{m}"
        );
        let m = message(r#"{"encryptionId": "x", "count": "secret-value"}"#);
        assert!(m.contains("`count`") && !m.contains("secret-value"), "{m}");
        let m = message(r#"{"encryptionId": "x", "encryptionID": "y"}"#);
        assert!(m.contains("unknown field `encryptionID`"), "{m}");
        assert!(matches!(
            parse_json::<Body>(b"{"),
            Err(ApiError::MalformedJson(_))
        ));
        assert!(matches!(
            parse_json::<Body>(br#"{"encryptionId":"x"} x"#),
            Err(ApiError::MalformedJson(_))
        ));
    }
}
