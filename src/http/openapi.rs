//! The OpenAPI description, generated from the handlers by utoipa. The server
//! serves it at `/openapi.json`; `openapi/keyward.json` in the repository is the
//! same document (a test fails when they drift; `keyward openapi >
//! openapi/keyward.json` regenerates it).

use axum::http::Method;
use utoipa::openapi::link::{Link, LinkBuilder};
use utoipa::openapi::path::{Operation, Paths};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::extract::Requirement;
use super::routes::{BodySize, ROUTES};
use super::{
    accounts, admin, audit, batch, contract, datakeys, encryptions, error, jobs, keys, metrics,
    ops, search, stream,
};

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        // The refusals that routes answer whatever their handler does (a
        // handler documents its own when it has more reasons): those of
        // authentication for the routes that take credentials, as the route
        // table says, and those of the body for the routes that take one.
        for route in ROUTES {
            let Some(operation) = operation_mut(&mut api.paths, route.path, &route.method) else {
                continue;
            };
            let mut refusals: Vec<(&str, String)> = Vec::new();
            if let Some(requirement) = route.scope {
                let none = std::iter::empty::<String>;
                operation.security = Some(vec![
                    SecurityRequirement::new("apiKey", none()).add("apiSecret", none())
                ]);
                let forbidden = match requirement {
                    Requirement::Tenant(_) => format!(
                        "`certificate_mismatch`, `insufficient_scope` (needs a {}) or `tenant_key_required` (an operator key)",
                        requirement.describe()
                    ),
                    _ => format!(
                        "`certificate_mismatch` or `insufficient_scope` (needs a {})",
                        requirement.describe()
                    ),
                };
                refusals.extend([
                    (
                        "401",
                        "`missing_credentials` or `invalid_credentials`".to_string(),
                    ),
                    ("403", forbidden),
                ]);
            }
            if operation.request_body.is_some() {
                // A streamed body has no size limit.
                if route.body != BodySize::Stream {
                    refusals.push(("413", "`payload_too_large`".to_string()));
                }
                refusals.push(("415", "`unsupported_media_type`".to_string()));
            }
            let responses = &mut operation.responses.responses;
            for (status, description) in refusals {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error_response(&description));
            }
            if route.scope.is_some() {
                responses.insert(
                    "429".to_string(),
                    error_response(
                        "`rate_limited`, `too_many_failed_attempts` or (calls with `X-Master-Key`) \
                         `too_many_master_key_attempts`, with Retry-After",
                    ),
                );
            }
        }
        // Bodies that may be left out entirely (they mean `{}`).
        for (path, method) in [
            ("/v1/encryptions", Method::POST),
            ("/v1/encryptions/{id}", Method::PATCH),
        ] {
            let operation = operation_mut(&mut api.paths, path, &method);
            if let Some(body) = operation.and_then(|o| o.request_body.as_mut()) {
                body.required = Some(utoipa::openapi::Required::False);
            }
        }
        let components = api.components.get_or_insert_with(Default::default);
        // Request objects whose unknown fields are refused, described by hand.
        for name in ["PolicyRequest", "JobSourceSchema", "IndexColumnSchema"] {
            if let Some(utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(o))) =
                components.schemas.get_mut(name)
            {
                o.additional_properties = Some(Box::new(
                    utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
                ));
            }
        }
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "The API key id (kw_...). Always sent together with X-Api-Secret.",
            ))),
        );
        components.add_security_scheme(
            "apiSecret",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Secret",
                "The API key's secret (kws_...).",
            ))),
        );
    }
}

/// The operation of `method` on `path`.
/// OpenAPI links between the operations that hand each other ids and
/// ciphertexts, so that a stateful client (schemathesis) chains real calls:
/// create → encrypt, rotate; encrypt → decrypt, rewrap, rotate; rewrap →
/// decrypt; rotate → encrypt with the new version.
struct Links;

/// A link and its name in a response's `links`.
type NamedLink = (&'static str, RefOr<Link>);

/// A link to the operation at `path` (POST) whose request body takes these
/// fields from runtime expressions.
fn post_link(description: &str, path: &str, body: &[(&str, &str)]) -> RefOr<Link> {
    let body: serde_json::Map<String, serde_json::Value> = body
        .iter()
        .map(|(field, expression)| (field.to_string(), (*expression).into()))
        .collect();
    RefOr::T(
        LinkBuilder::new()
            .operation_ref(format!("#/paths/{}/post", path.replace('/', "~1")))
            .request_body(Some(serde_json::Value::Object(body)))
            .description(description)
            .build(),
    )
}

impl Modify for Links {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        const CIPHERTEXT: [(&str, &str); 4] = [
            ("encryptionId", "$response.body#/encryptionId"),
            ("cipherText", "$response.body#/cipherText"),
            ("encryptionVersionId", "$response.body#/encryptionVersionId"),
            ("metadata", "$response.body#/metadata"),
        ];
        let decrypt = || {
            post_link(
                "Decrypt the ciphertext just made",
                "/v1/decrypt",
                &CIPHERTEXT,
            )
        };
        let rewrap = || {
            post_link(
                "Re-encrypt the ciphertext just made under the active version",
                "/v1/rewrap",
                &CIPHERTEXT,
            )
        };
        let rotate = |from: &'static str| {
            post_link(
                "Rotate the encryption",
                "/v1/rotate",
                &[("encryptionId", from)],
            )
        };
        let links: [(&str, &str, Vec<NamedLink>); 4] = [
            (
                "/v1/encryptions",
                "201",
                vec![
                    (
                        "Encrypt",
                        post_link(
                            "Encrypt under the new encryption",
                            "/v1/encrypt",
                            &[("encryptionId", "$response.body#/encryptionId")],
                        ),
                    ),
                    ("Rotate", rotate("$response.body#/encryptionId")),
                ],
            ),
            (
                "/v1/encrypt",
                "200",
                vec![
                    ("Decrypt", decrypt()),
                    ("Rewrap", rewrap()),
                    ("Rotate", rotate("$response.body#/encryptionId")),
                ],
            ),
            ("/v1/rewrap", "200", vec![("Decrypt", decrypt())]),
            (
                "/v1/rotate",
                "200",
                vec![(
                    "EncryptWithNewVersion",
                    post_link(
                        "Encrypt under the version the rotation made",
                        "/v1/encrypt",
                        &[
                            ("encryptionId", "$request.body#/encryptionId"),
                            ("encryptionVersionId", "$response.body#/newVersionId"),
                        ],
                    ),
                )],
            ),
        ];
        for (path, status, targets) in links {
            let Some(operation) = operation_mut(&mut api.paths, path, &Method::POST) else {
                continue;
            };
            if let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) {
                for (name, link) in targets {
                    response.links.insert(name.to_string(), link);
                }
            }
        }
    }
}

fn operation_mut<'a>(
    paths: &'a mut Paths,
    path: &str,
    method: &Method,
) -> Option<&'a mut Operation> {
    let item = paths.paths.get_mut(path)?;
    match *method {
        Method::GET => item.get.as_mut(),
        Method::POST => item.post.as_mut(),
        Method::PATCH => item.patch.as_mut(),
        Method::PUT => item.put.as_mut(),
        Method::DELETE => item.delete.as_mut(),
        _ => None,
    }
}

/// An error response: `description` and an [`error::ErrorBody`].
fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// The whole API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keyward",
        description = "An encryption service: per-tenant versioned data keys wrapped by a master key. \
                       `/v1/encrypt`, `/v1/decrypt` and `/v1/rotate` are a fixed contract.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        contract::encrypt,
        contract::decrypt,
        contract::rotate,
        encryptions::create,
        encryptions::list,
        encryptions::show,
        batch::rewrap,
        batch::encrypt_batch,
        batch::decrypt_batch,
        batch::rewrap_batch,
        datakeys::generate,
        datakeys::unwrap,
        datakeys::rewrap,
        stream::encrypt,
        stream::decrypt,
        encryptions::update,
        encryptions::update_version,
        search::index,
        search::index_batch,
        search::create_index,
        search::list_indexes,
        search::update_index,
        search::rotate_index,
        keys::public_key,
        keys::wrapping_key,
        keys::import,
        keys::export,
        jobs::create,
        jobs::list,
        jobs::show,
        jobs::cancel,
        accounts::list_own_keys,
        accounts::create_own_key,
        accounts::revoke_own_key,
        accounts::list_tenants,
        accounts::create_tenant,
        accounts::disable_tenant,
        accounts::list_tenant_keys,
        accounts::create_tenant_key,
        accounts::revoke_tenant_key,
        admin::status,
        admin::rotate,
        admin::client_certificates,
        audit::list,
        ops::healthz,
        ops::readyz,
        metrics::metrics,
        ops::openapi_json,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&Security, &Links),
    tags(
        (name = "contract", description = "The fixed v1 contract"),
        (name = "encryptions", description = "Creating and inspecting encryptions (scope `manage`)"),
        (name = "lifecycle", description = "Rewrap and batches"),
        (name = "search", description = "Search over encrypted fields: blind-index values (scope `index`, never `decrypt`), index definitions (`manage`) and index-key rotation (`rotate`); see docs/search.md"),
        (name = "keys", description = "RSA public keys (scope `encrypt`), key import (scope `import`) and controlled export (scope `export`)"),
        (name = "envelope", description = "Envelope encryption: data keys minted (scope `datakey`), unwrapped (scope `unwrap`) and rewrapped (scope `rotate`); bodies of any size streamed through encryption (scope `encrypt`) and decryption (scope `decrypt`) in Keyward's stream format; see docs/envelope.md"),
        (name = "jobs", description = "Re-encryption of data at rest (scope `manage`)"),
        (name = "api-keys", description = "A tenant's own API keys (tenant key with `admin`)"),
        (name = "operator", description = "Tenants and any tenant's API keys (operator key with `operator`)"),
        (name = "admin", description = "Service-wide operations: root-KEK rotation and the client certificates Keyward issued (operator key with `operator`); the audit log (a tenant key with `admin` reads its own tenant's, an operator key with `audit` every tenant's)"),
        (name = "operations", description = "Health, readiness and Prometheus metrics, no authentication"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON with a trailing newline, exactly as checked in.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    // A tree of structs, strings and string-keyed maps, written to memory:
    // serde_json has nothing to fail on (a failure would show in every test).
    #[allow(clippy::expect_used)]
    let mut json = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    // utoipa 5 writes a Link's `operationRef` and `requestBody` under their
    // Rust names; the document's keys are otherwise all camelCase, so these
    // two (with the pretty printer's `": "`) appear nowhere else.
    json.replace("\"operation_ref\": ", "\"operationRef\": ")
        .replace("\"request_body\": ", "\"requestBody\": ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_spec_is_what_the_server_serves() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/keyward.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == super::document(),
            "openapi/keyward.json is out of date: run `cargo run -- openapi > openapi/keyward.json`"
        );
    }

    #[test]
    fn every_link_names_an_operation_of_the_document_and_fields_of_its_body() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let mut links = 0;
        for (_, item) in doc["paths"].as_object().unwrap() {
            for (_, operation) in item.as_object().unwrap() {
                for (_, response) in operation["responses"].as_object().unwrap() {
                    let Some(named) = response.get("links") else {
                        continue;
                    };
                    for (name, link) in named.as_object().unwrap() {
                        links += 1;
                        let target = link["operationRef"].as_str().unwrap();
                        let pointer = target.strip_prefix('#').unwrap();
                        let operation = doc.pointer(pointer).unwrap_or_else(|| {
                            panic!("link {name} points at {target}, which is not in the document")
                        });
                        let schema = &operation["requestBody"]["content"]["application/json"]
                            ["schema"]["$ref"];
                        let schema = schema.as_str().unwrap().strip_prefix('#').unwrap();
                        let properties = &doc.pointer(schema).unwrap()["properties"];
                        for (field, expression) in link["requestBody"].as_object().unwrap() {
                            assert!(
                                properties.get(field).is_some(),
                                "link {name}: no field {field}"
                            );
                            assert!(expression.as_str().unwrap().starts_with('$'));
                        }
                        assert!(
                            link.get("operation_ref").is_none()
                                && link.get("request_body").is_none()
                        );
                    }
                }
            }
        }
        assert_eq!(links, 7);
    }
}
