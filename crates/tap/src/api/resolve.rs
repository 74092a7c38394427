//! `GET /resolve/{did}`: the DID document, regenerated from the cached identity as the Go
//! tap does (original-behaviour §3.1.1): `id`, `alsoKnownAs`, the verification methods
//! controlled by the DID and the services, empty arrays omitted, no `@context`.
//!
//! Unlike the Go tap, a DID that does not exist answers 404 (decisions row 12).

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tap_atproto::did_doc::DidDocument;
use tap_atproto::syntax::Did;

use super::{ApiError, ApiState, json};
use crate::identity::IdentityError;

/// The regenerated document.
#[derive(Debug, Serialize)]
struct Document<'a> {
    id: &'a str,
    #[serde(rename = "alsoKnownAs", skip_serializing_if = "Vec::is_empty")]
    also_known_as: Vec<&'a str>,
    #[serde(rename = "verificationMethod", skip_serializing_if = "Vec::is_empty")]
    verification_method: Vec<Method<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    service: Vec<Service<'a>>,
}

#[derive(Debug, Serialize)]
struct Method<'a> {
    id: String,
    #[serde(rename = "type")]
    method_type: &'a str,
    controller: &'a str,
    #[serde(rename = "publicKeyMultibase")]
    public_key_multibase: &'a str,
}

#[derive(Debug, Serialize)]
struct Service<'a> {
    id: String,
    #[serde(rename = "type")]
    service_type: &'a str,
    #[serde(rename = "serviceEndpoint")]
    service_endpoint: &'a str,
}

/// The fragment of `id` when it is `#frag` or `<did>#frag`.
fn fragment<'a>(did: &str, id: &'a str) -> Option<&'a str> {
    let (prefix, frag) = id.split_once('#')?;
    (prefix.is_empty() || prefix == did).then_some(frag)
}

/// Rebuilds the document the way the Go identity package re-serialises a parsed identity:
/// keys only when controlled by the DID itself, services only with a string endpoint.
fn regenerate(doc: &DidDocument) -> Document<'_> {
    let did = doc.id.as_str();
    let verification_method = doc
        .verification_method
        .iter()
        .filter(|vm| vm.controller.as_deref() == Some(did))
        .filter_map(|vm| {
            Some(Method {
                id: format!("{did}#{}", fragment(did, &vm.id)?),
                method_type: &vm.method_type,
                controller: did,
                public_key_multibase: vm.public_key_multibase.as_deref()?,
            })
        })
        .collect();
    let service = doc
        .service
        .iter()
        .filter_map(|s| {
            Some(Service {
                id: format!("#{}", fragment(did, &s.id)?),
                service_type: &s.service_type,
                service_endpoint: s.service_endpoint.as_str()?,
            })
        })
        .collect();
    Document {
        id: did,
        also_known_as: doc.also_known_as.iter().map(String::as_str).collect(),
        verification_method,
        service,
    }
}

/// `GET /resolve/{did}`: 200 with the document; 400 `improperly formatted DID`; 404 `DID
/// not found` (also for DIDs no atproto account can have, e.g. an unsupported method);
/// 500 `failed to resolve DID` when resolution itself failed.
pub(super) async fn resolve(State(state): State<ApiState>, Path(raw): Path<String>) -> Response {
    let Ok(did) = Did::new(raw) else {
        return ApiError::bad_request("improperly formatted DID").into_response();
    };
    match state.identity.resolve(&did).await {
        Ok(ident) => json(StatusCode::OK, &regenerate(&ident.doc)),
        Err(IdentityError::NotFound { .. } | IdentityError::Unsupported { .. }) => {
            ApiError::new(StatusCode::NOT_FOUND, "DID not found").into_response()
        }
        Err(e) => {
            tracing::warn!(%did, error = %e, "Resolving a DID failed.");
            ApiError::internal("failed to resolve DID").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regenerated_document_keeps_owned_keys_and_string_services_only() {
        let doc = DidDocument::parse(
            br##"{
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": "did:plc:abc",
            "alsoKnownAs": ["at://alice.test"],
            "verificationMethod": [
              {"id": "#atproto", "type": "Multikey", "controller": "did:plc:abc", "publicKeyMultibase": "zKey"},
              {"id": "did:plc:abc#other", "type": "Multikey", "controller": "did:plc:someone", "publicKeyMultibase": "zX"},
              {"id": "did:plc:zzz#atproto", "type": "Multikey", "controller": "did:plc:abc", "publicKeyMultibase": "zY"}
            ],
            "service": [
              {"id": "did:plc:abc#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://pds.example.com"},
              {"id": "#map", "type": "X", "serviceEndpoint": {"a": 1}}
            ]
        }"##,
        )
        .unwrap();
        let out = serde_json::to_value(regenerate(&doc)).unwrap();
        assert_eq!(
            out,
            serde_json::json!({
                "id": "did:plc:abc",
                "alsoKnownAs": ["at://alice.test"],
                "verificationMethod": [{
                    "id": "did:plc:abc#atproto",
                    "type": "Multikey",
                    "controller": "did:plc:abc",
                    "publicKeyMultibase": "zKey"
                }],
                "service": [{
                    "id": "#atproto_pds",
                    "type": "AtprotoPersonalDataServer",
                    "serviceEndpoint": "https://pds.example.com"
                }]
            })
        );
    }

    #[test]
    fn regenerated_document_omits_empty_arrays() {
        let doc = DidDocument::parse(br#"{"id":"did:web:example.com"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&regenerate(&doc)).unwrap(),
            r#"{"id":"did:web:example.com"}"#
        );
    }
}
