//! Query strings, parsed once into typed structs that also describe them in
//! the OpenAPI document (`IntoParams`). Each field reads its value with
//! [`value`] (through `#[serde(deserialize_with)]`), so a bad value is
//! `invalid_request` with a message that names the parameter and what it must
//! be, never the value; an unknown parameter is `invalid_request` naming the
//! known ones.

use std::fmt;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::{DeserializeOwned, Deserializer, Visitor};
use utoipa::openapi::path::ParameterIn;
use utoipa::IntoParams;

use super::error::ApiError;

/// Largest page size of the list endpoints.
pub(crate) const MAX_PAGE: u32 = 1000;
/// Default page size of the list endpoints.
pub(crate) const DEFAULT_PAGE: u32 = 100;

/// Why a `cursor` is refused.
pub(crate) const NOT_A_CURSOR: &str = "not a cursor returned by this endpoint";

/// The query string parsed into `T`.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + IntoParams,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Parses `query` into `T`. A parameter given more than once is read each
/// time, in order (every value must be valid), and the last one counts. Linear
/// in the number of pairs: the query string is the caller's to make long.
pub fn parse<T: DeserializeOwned + IntoParams>(query: &str) -> Result<T, ApiError> {
    let pairs: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
    let mut last_at = std::collections::HashMap::with_capacity(pairs.len());
    for (i, (name, _)) in pairs.iter().enumerate() {
        last_at.insert(name.as_ref(), i);
    }
    if last_at.len() == pairs.len() {
        return deserialize(query);
    }
    let mut last = form_urlencoded::Serializer::new(String::new());
    for (i, (name, value)) in pairs.iter().enumerate() {
        let one = form_urlencoded::Serializer::new(String::new())
            .append_pair(name, value)
            .finish();
        deserialize::<T>(&one)?;
        if last_at.get(name.as_ref()) == Some(&i) {
            last.append_pair(name, value);
        }
    }
    deserialize(&last.finish())
}

fn deserialize<T: DeserializeOwned + IntoParams>(query: &str) -> Result<T, ApiError> {
    let pairs = form_urlencoded::parse(query.as_bytes());
    serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs)).map_err(|e| {
        let known: Vec<String> = T::into_params(|| Some(ParameterIn::Query))
            .into_iter()
            .map(|p| p.name)
            .collect();
        let field = match e.path().iter().next_back() {
            Some(serde_path_to_error::Segment::Map { key }) => known.iter().find(|k| *k == key),
            _ => None,
        };
        if let Some(field) = field {
            return ApiError::InvalidRequest(format!("`{field}`: {}", e.inner()));
        }
        if pairs
            .into_iter()
            .any(|(name, _)| !known.iter().any(|k| *k == name))
        {
            return ApiError::InvalidRequest(format!(
                "unknown query parameter (expected {})",
                one_of(&known)
            ));
        }
        ApiError::InvalidRequest("the query string does not parse".into())
    })
}

/// "`a`, `b` or `c`".
fn one_of(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "none".into(),
    }
}

/// A parameter's value as `read` makes it, for `#[serde(deserialize_with)]`
/// on an optional field (with `#[serde(default)]`); when `read` refuses it,
/// the error is `refusal`, which says what the value must be.
pub fn value<'de, D, T, R>(
    deserializer: D,
    read: impl FnOnce(&str) -> Option<T>,
    refusal: R,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    R: fmt::Display,
{
    struct Text<F, R>(F, R);

    impl<T, F: FnOnce(&str) -> Option<T>, R: fmt::Display> Visitor<'_> for Text<F, R> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.1.fmt(f)
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            let Text(read, refusal) = self;
            read(v).ok_or_else(|| E::custom(refusal))
        }
    }

    deserializer.deserialize_str(Text(read, refusal)).map(Some)
}

/// A `limit` parameter: 1 to [`MAX_PAGE`].
pub fn page_limit<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    const _: () = assert!(MAX_PAGE == 1000, "the message below names it");
    value(
        deserializer,
        |v| v.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n)),
        "must be an integer from 1 to 1000",
    )
}

/// A UUID parameter, kept as given.
pub fn uuid_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    value(
        deserializer,
        |v| v.parse::<uuid::Uuid>().ok().map(|_| v.to_string()),
        "not a UUID",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, IntoParams, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[into_params(parameter_in = Query, rename_all = "camelCase")]
    struct Params {
        #[serde(default, deserialize_with = "page_limit")]
        limit: Option<u32>,
        #[serde(default, deserialize_with = "uuid_text")]
        tenant_id: Option<String>,
    }

    fn message(query: &str) -> String {
        match parse::<Params>(query) {
            Err(ApiError::InvalidRequest(m)) => m,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn parameters_are_typed_and_optional() {
        let id = "8d3c5f6e-2a4b-4c1d-9e8f-0a1b2c3d4e5f";
        assert_eq!(
            parse::<Params>(&format!("limit=5&tenantId={id}")).unwrap(),
            Params {
                limit: Some(5),
                tenant_id: Some(id.into())
            }
        );
        assert_eq!(
            parse::<Params>("").unwrap(),
            Params {
                limit: None,
                tenant_id: None
            }
        );
        // Percent-decoded before it is read.
        assert_eq!(parse::<Params>("limit=%31%30").unwrap().limit, Some(10));
    }

    #[test]
    fn bad_values_name_the_parameter_but_not_the_value() {
        for bad in ["0", "1001", "abc", "", "-1", "secret-value"] {
            assert_eq!(
                message(&format!("limit={bad}")),
                "`limit`: must be an integer from 1 to 1000"
            );
        }
        assert_eq!(message("tenantId=secret-value"), "`tenantId`: not a UUID");
        for unknown in ["colour=red", "limit=5&secret-value=1", "LIMIT=5"] {
            assert_eq!(
                message(unknown),
                "unknown query parameter (expected `limit` or `tenantId`)"
            );
        }
    }

    #[test]
    fn a_repeated_parameter_is_checked_every_time_and_the_last_counts() {
        assert_eq!(parse::<Params>("limit=5&limit=7").unwrap().limit, Some(7));
        assert_eq!(
            message("limit=0&limit=7"),
            "`limit`: must be an integer from 1 to 1000"
        );
        assert_eq!(
            message("limit=7&limit=0"),
            "`limit`: must be an integer from 1 to 1000"
        );
        assert_eq!(
            message("limit=7&colour=red&limit=8"),
            "unknown query parameter (expected `limit` or `tenantId`)"
        );
    }

    #[test]
    fn names_are_listed_as_a_sentence() {
        let names = |n: &[&str]| one_of(&n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(names(&["limit"]), "`limit`");
        assert_eq!(names(&["limit", "cursor"]), "`limit` or `cursor`");
        assert_eq!(names(&["a", "b", "c"]), "`a`, `b` or `c`");
    }
}
