//! Admin HTTP Basic authentication, byte-compatible with the Go tap: user `admin`, the
//! password compared in constant time, the same 401 body and `WWW-Authenticate` header.

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use subtle::ConstantTimeEq;

/// The body of every 401, exactly as Go's `json.Encoder` writes it (keys sorted, newline).
pub const UNAUTHORIZED_BODY: &str = "{\"error\":\"Unauthorized\",\"message\":\"atproto admin auth required, but missing or incorrect password\"}\n";

/// The admin password every request must carry.
#[derive(Clone)]
pub struct AdminAuth {
    password: String,
}

impl AdminAuth {
    /// Requires `admin:<password>` on every request.
    #[must_use]
    pub fn new(password: String) -> Self {
        Self { password }
    }

    /// The `Authorization` header value tap itself sends (to webhooks).
    #[must_use]
    pub fn header_value(&self) -> String {
        basic_header("admin", &self.password)
    }

    /// Whether these request headers carry the right credentials.
    #[must_use]
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some((user, pass)) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic)
        else {
            return false;
        };
        // Compare both even if the user is wrong, so timing says nothing about which failed.
        let pass_ok: bool = pass.as_bytes().ct_eq(self.password.as_bytes()).into();
        user == "admin" && pass_ok
    }
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth(<redacted>)")
    }
}

/// `Basic base64(user:pass)`.
#[must_use]
pub fn basic_header(user: &str, pass: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {token}")
}

/// Parses a Basic credential the way Go's `Request.BasicAuth` does: case-insensitive
/// scheme, standard base64, split at the first colon.
fn parse_basic(value: &str) -> Option<(String, String)> {
    const PREFIX: &str = "basic ";
    if value.len() < PREFIX.len() || !value[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&value[PREFIX.len()..])
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Middleware: every route, including `/health`, `/channel` and unknown paths.
pub async fn require_admin(
    State(auth): State<Option<AdminAuth>>,
    request: Request,
    next: Next,
) -> Response {
    match &auth {
        Some(auth) if !auth.allows(request.headers()) => unauthorized(),
        _ => next.run(request).await,
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"admin\", charset=\"UTF-8\""),
            ),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        UNAUTHORIZED_BODY,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn accepts_admin_with_the_right_password_only() {
        let auth = AdminAuth::new("secret".into());
        // The exact header the @atproto/tap client sends for password "secret".
        assert!(auth.allows(&headers("Basic YWRtaW46c2VjcmV0")));
        assert!(auth.allows(&headers("basic YWRtaW46c2VjcmV0")));
        assert!(!auth.allows(&headers(&basic_header("admin", "wrong"))));
        assert!(!auth.allows(&headers(&basic_header("root", "secret"))));
        assert!(!auth.allows(&headers("Bearer YWRtaW46c2VjcmV0")));
        assert!(!auth.allows(&headers("Basic !!!not-base64")));
        assert!(!auth.allows(&HeaderMap::new()));
    }

    #[test]
    fn passwords_containing_colons_split_at_the_first_colon() {
        let auth = AdminAuth::new("a:b:c".into());
        assert!(auth.allows(&headers(&basic_header("admin", "a:b:c"))));
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        assert!(!format!("{:?}", AdminAuth::new("hunter2".into())).contains("hunter2"));
    }
}
