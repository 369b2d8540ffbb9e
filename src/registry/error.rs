//! [`RegistryError`] and the translation of `oci-client`'s errors into it.
//!
//! `oci-client` reports failures as transport errors, HTTP codes or OCI error envelopes. A user
//! needs to know something else: *what* failed (which image, which blob), *where* (which registry
//! host) and *what to do*. [`classify`] does that translation once, with the context of the
//! operation that failed, so every caller gets the same wording.

use oci_client::errors::{DigestError, OciDistributionError, OciEnvelope, OciErrorCode};

use crate::store::StoreError;

/// Everything that can go wrong talking to a registry. Every message names the image reference
/// and/or registry host, and says what to try next. No variant ever carries a password or token.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Nothing answered: connection refused, DNS failure, TLS handshake failure or timeout.
    #[error("cannot reach registry {host} ({scheme}) for {reference}: {detail}; {hint}")]
    Unreachable {
        host: String,
        scheme: String,
        reference: String,
        detail: String,
        hint: String,
    },

    /// The registry (or its token service) refused the credentials, or there were none.
    #[error("unauthorized: registry {host} refused to {action} {reference} ({detail}); {hint}")]
    Unauthorized {
        host: String,
        reference: String,
        action: &'static str,
        detail: String,
        hint: String,
    },

    /// The tag, digest or repository does not exist.
    #[error(
        "image {reference} not found: no such tag/repository on registry {host} ({detail}); check the name and tag"
    )]
    ManifestNotFound {
        reference: String,
        host: String,
        detail: String,
    },

    /// A blob the manifest refers to is missing from the registry.
    #[error(
        "blob {digest} of {reference} not found on registry {host}; the image in the registry is incomplete (push it again)"
    )]
    BlobNotFound {
        reference: String,
        host: String,
        digest: String,
    },

    /// The image is an index (multi-platform) without an entry for the requested platform.
    #[error(
        "image {reference} has no manifest for platform {wanted}; it provides: {}; build for one of those or use another base image",
        if .available.is_empty() { "no platform at all".to_string() } else { .available.join(", ") }
    )]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: Vec<String>,
    },

    /// Content did not hash to the digest it was asked for by.
    #[error(
        "digest mismatch for {what} of {reference}: expected {expected}, got {actual}; the registry sent different or corrupted content (try again, or check the registry)"
    )]
    DigestMismatch {
        reference: String,
        what: String,
        expected: String,
        actual: String,
    },

    /// Content was not the size its descriptor says.
    #[error(
        "size mismatch for blob {digest} of {reference}: the descriptor says {expected} bytes, got {actual}; the manifest or the blob is corrupt"
    )]
    SizeMismatch {
        reference: String,
        digest: String,
        expected: u64,
        actual: u64,
    },

    /// A push needs a blob that neither the registry nor the local store has.
    #[error(
        "cannot push {reference}: blob {digest} is not in the registry and not in the local store ({path}); the manifest was not pushed. Rebuild the image to recreate the blob"
    )]
    MissingLocalBlob {
        reference: String,
        digest: String,
        path: String,
    },

    /// A blob upload went through but the registry does not have the blob afterwards.
    #[error(
        "cannot push {reference}: registry {host} accepted blob {digest} but does not have it afterwards; the manifest was not pushed. Try again, or check the registry's storage"
    )]
    BlobNotPresentAfterPush {
        reference: String,
        host: String,
        digest: String,
    },

    /// A manifest or index that cannot be used (unparsable, unsupported media type, ...).
    #[error("invalid manifest for {reference}: {detail}")]
    InvalidManifest { reference: String, detail: String },

    /// The caller asked for something inconsistent (e.g. a manifest that names a blob not given).
    #[error("cannot {action} {reference}: {detail}")]
    InvalidRequest {
        action: &'static str,
        reference: String,
        detail: String,
    },

    /// Any other failure reported by the registry (5xx, unexpected answers, broken transfers).
    #[error("registry {host} failed to {action} {reference}: {detail}")]
    Registry {
        host: String,
        reference: String,
        action: String,
        detail: String,
    },

    /// The credentials file or helper exists but cannot be used.
    #[error(
        "cannot read registry credentials for {host} from {source_path}: {detail}; fix that file or log in again (`docker login {host}`)"
    )]
    Credentials {
        host: String,
        source_path: String,
        detail: String,
    },

    /// A CA certificate from certs.d cannot be loaded.
    #[error(
        "cannot use TLS certificate {path} for registry {host}: {detail}; fix or remove that file"
    )]
    TlsConfig {
        host: String,
        path: String,
        detail: String,
    },

    /// A request kept failing in ways worth retrying until its retry budget was spent.
    #[error(
        "{last} (gave up after {attempts} attempts over {seconds:.1}s: the registry kept failing; try again later, or {more})"
    )]
    GaveUp {
        attempts: u32,
        seconds: f64,
        /// What would allow more retries: more attempts, or a larger budget for waits.
        more: &'static str,
        /// The last attempt's error: it names the registry, the image, the blob and the status.
        last: Box<RegistryError>,
    },

    /// The registry asked (with `Retry-After`) to be retried later than the request's retry
    /// budget allows, so the request ended at once instead of waiting past its budget.
    #[error(
        "{last} (the registry asked to be retried in {} with Retry-After, more than {}; try again later, or allow longer waits with {}=SECONDS, at most {})",
        seconds(*.asked), budget_left(*.left, *.budget), super::retry::MAX_WAIT_ENV, super::retry::MAX_WAIT_LIMIT
    )]
    RetryAfterTooLong {
        asked: std::time::Duration,
        left: std::time::Duration,
        budget: std::time::Duration,
        /// The refused attempt's error: it names the registry, the image, the blob and the status.
        last: Box<RegistryError>,
    },

    /// `--pull=never` and the image (or one of its layers) is not in the local store.
    #[error(
        "{reference} is not in the local store ({missing}) and --pull=never forbids asking the registry for base images; build once with --pull=missing or --pull=always to store it"
    )]
    NotStored { reference: String, missing: String },

    /// The local blob store failed.
    #[error("local store failed while {action} {reference}: {source}")]
    Store {
        action: String,
        reference: String,
        #[source]
        source: StoreError,
    },
}

/// What was being done when an `oci-client` call failed; decides which error a 404 becomes, etc.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op<'a> {
    PullManifest,
    PullBlob(&'a str),
    CheckBlob(&'a str),
    PushBlob(&'a str),
    PushManifest,
}

impl Op<'_> {
    fn verb(&self) -> &'static str {
        match self {
            Op::PullManifest | Op::PullBlob(_) => "pull",
            // Blobs are only checked for when pushing.
            Op::CheckBlob(_) | Op::PushBlob(_) | Op::PushManifest => "push",
        }
    }

    fn action(&self) -> String {
        match self {
            Op::PullManifest => "pull the manifest of".to_string(),
            Op::PullBlob(d) => format!("pull blob {d} of"),
            Op::CheckBlob(d) => format!("check for blob {d} in"),
            Op::PushBlob(d) => format!("push blob {d} to"),
            Op::PushManifest => "push the manifest of".to_string(),
        }
    }
}

/// The context of a failed call: the image, the registry and how it is reached.
pub(crate) struct Ctx<'a> {
    pub reference: &'a str,
    pub host: &'a str,
    pub scheme: &'a str,
    /// Where the credentials came from (never the secret itself), for the unauthorized hint.
    pub credentials: &'a str,
    pub op: Op<'a>,
}

/// Server messages can be whole HTML pages; keep errors readable (and free of the secrets a
/// URL may carry: see [`redact_urls`]).
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let s = redact_urls(s);
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `e: source: source ...`, which is where reqwest keeps the useful part ("Connection refused"),
/// with every URL in it redacted (see [`redact_urls`]).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    redact_urls(&parts.join(": "))
}

/// `text` with the query, fragment and user info of every `http(s)://` URL in it replaced by
/// `<redacted>`. reqwest names the URL a failed request went to, and `oci-client` follows
/// redirects: a blob's URL may be a pre-signed S3 or CDN link whose query holds a signature
/// and a session token (`X-Amz-Signature`, `X-Amz-Security-Token`), valid for a while to
/// anyone who reads the build log.
pub(crate) fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = find_url(rest) {
        out.push_str(&rest[..start]);
        let url_and_more = &rest[start..];
        let end = url_and_more
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(url_and_more.len());
        let url = &url_and_more[..end];
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let (scheme, after) = url.split_at(scheme_end);
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, tail) = after.split_at(authority_end);
        out.push_str(scheme);
        match authority.rsplit_once('@') {
            Some((_, host)) => {
                out.push_str("<redacted>@");
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        match tail.find(['?', '#']) {
            Some(q) => {
                out.push_str(&tail[..q]);
                out.push_str(&tail[q..q + 1]);
                out.push_str("<redacted>");
            }
            None => out.push_str(tail),
        }
        rest = &url_and_more[end..];
    }
    out.push_str(rest);
    out
}

/// A wait as people write it: `2s`, `1.6s`, `3600s`.
pub(crate) fn seconds(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// "this request's retry budget of 40s", or with "the 12.5s left of" before it once some of it
/// was spent.
fn budget_left(left: std::time::Duration, budget: std::time::Duration) -> String {
    if left == budget {
        format!("this request's retry budget of {}", seconds(budget))
    } else {
        format!(
            "the {} left of this request's retry budget of {}",
            seconds(left),
            seconds(budget)
        )
    }
}

/// Where the next `http://` or `https://` URL starts, case-insensitively.
fn find_url(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    [lower.find("http://"), lower.find("https://")]
        .into_iter()
        .flatten()
        .min()
}

impl Ctx<'_> {
    fn unauthorized(&self, detail: String) -> RegistryError {
        RegistryError::Unauthorized {
            host: self.host.to_string(),
            reference: self.reference.to_string(),
            action: self.op.verb(),
            detail,
            hint: format!(
                "credentials used: {}; log in with `docker login {}` (or put them in the docker config.json / containers auth.json) and check they allow {}",
                self.credentials,
                self.host,
                self.op.verb()
            ),
        }
    }

    fn not_found(&self, detail: String) -> RegistryError {
        match self.op {
            Op::PullBlob(d) | Op::CheckBlob(d) => RegistryError::BlobNotFound {
                reference: self.reference.to_string(),
                host: self.host.to_string(),
                digest: d.to_string(),
            },
            Op::PullManifest => RegistryError::ManifestNotFound {
                reference: self.reference.to_string(),
                host: self.host.to_string(),
                detail,
            },
            Op::PushBlob(_) | Op::PushManifest => self.other(format!("not found: {detail}")),
        }
    }

    pub(crate) fn other(&self, detail: String) -> RegistryError {
        RegistryError::Registry {
            host: self.host.to_string(),
            reference: self.reference.to_string(),
            action: self.op.action(),
            detail,
        }
    }

    fn digest_mismatch(&self, expected: String, actual: String) -> RegistryError {
        let what = match self.op {
            Op::PullBlob(d) | Op::CheckBlob(d) | Op::PushBlob(d) => format!("blob {d}"),
            Op::PullManifest | Op::PushManifest => "the manifest".to_string(),
        };
        RegistryError::DigestMismatch {
            reference: self.reference.to_string(),
            what,
            expected,
            actual,
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> RegistryError {
        let detail = error_chain(e);
        let lower = detail.to_lowercase();
        let insecure = if self.scheme == "https" {
            format!(
                ", or pass --insecure-registry {} if it speaks plain HTTP",
                self.host
            )
        } else {
            String::new()
        };
        let hint = if lower.contains("dns")
            || lower.contains("lookup")
            || lower.contains("name or service not known")
        {
            format!(
                "check the registry name {} and this machine's DNS/network",
                self.host
            )
        } else if self.scheme == "https"
            && (lower.contains("certificate")
                || lower.contains("tls")
                || lower.contains("handshake")
                || lower.contains("corrupt message"))
        {
            format!(
                "the TLS connection failed: if {h} uses a private CA, put the CA certificate in /etc/docker/certs.d/{h}/ca.crt or /etc/containers/certs.d/{h}/ca.crt{insecure}",
                h = self.host
            )
        } else {
            format!(
                "check that the registry at {} is running and reachable{insecure}",
                self.host
            )
        };
        RegistryError::Unreachable {
            host: self.host.to_string(),
            scheme: self.scheme.to_string(),
            reference: self.reference.to_string(),
            detail,
            hint,
        }
    }

    fn for_status(&self, code: u16, detail: String) -> RegistryError {
        match code {
            401 | 403 => self.unauthorized(detail),
            404 => self.not_found(detail),
            _ => self.other(detail),
        }
    }

    fn for_reqwest(&self, e: &reqwest::Error) -> RegistryError {
        if let Some(status) = e.status() {
            return self.for_status(status.as_u16(), format!("HTTP {status}"));
        }
        if e.is_connect() || e.is_timeout() {
            return self.unreachable(e);
        }
        self.other(format!("transfer failed: {}", error_chain(e)))
    }

    fn for_io(&self, e: &std::io::Error) -> RegistryError {
        if let Some(inner) = e.get_ref() {
            if let Some(DigestError::VerificationError { expected, actual }) =
                inner.downcast_ref::<DigestError>()
            {
                return self.digest_mismatch(expected.clone(), actual.clone());
            }
            if let Some(re) = inner.downcast_ref::<reqwest::Error>() {
                return self.for_reqwest(re);
            }
        }
        self.other(error_chain(e))
    }
}

fn envelope_text(env: &OciEnvelope) -> String {
    let parts: Vec<String> = env
        .errors
        .iter()
        .map(|e| {
            let code = serde_json::to_value(&e.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            if e.message.is_empty() {
                code
            } else {
                format!("{code}: {}", e.message)
            }
        })
        .collect();
    truncate(&parts.join("; "), 300)
}

/// Turns an `oci-client` error into a [`RegistryError`] for the operation in `ctx`.
pub(crate) fn classify(err: OciDistributionError, ctx: &Ctx<'_>) -> RegistryError {
    use OciDistributionError as E;
    match err {
        E::RequestError(e) => ctx.for_reqwest(&e),
        E::IoError(e) => ctx.for_io(&e),
        E::UnauthorizedError { .. } => ctx.unauthorized("HTTP 401".to_string()),
        E::AuthenticationFailure(reason) => ctx.unauthorized(format!(
            "the token service refused: {}",
            truncate(&reason, 200)
        )),
        E::RegistryError { envelope, .. } => {
            let detail = envelope_text(&envelope);
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ctx.unauthorized(detail)
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                ctx.not_found(detail)
            } else {
                ctx.other(detail)
            }
        }
        // A TLS registry spoken to in plain HTTP (loopback without a certs.d CA, or an
        // insecure host that is not) answers this; say how to fix it.
        E::ServerError {
            code: 400, message, ..
        } if message.contains("HTTP request to an HTTPS server") => RegistryError::Unreachable {
            host: ctx.host.to_string(),
            scheme: ctx.scheme.to_string(),
            reference: ctx.reference.to_string(),
            detail: truncate(&message, 200),
            hint: format!(
                "{h} speaks HTTPS: put its CA certificate in /etc/docker/certs.d/{h}/ca.crt (or /etc/containers/certs.d/{h}/) so shmocker uses TLS for it, and do not list it as an insecure registry",
                h = ctx.host
            ),
        },
        E::ServerError { code, message, .. } => {
            let detail = match serde_json::from_str::<OciEnvelope>(&message) {
                Ok(env) => format!("HTTP {code}: {}", envelope_text(&env)),
                Err(_) if message.trim().is_empty() => format!("HTTP {code}"),
                Err(_) => format!("HTTP {code}: {}", truncate(&message, 300)),
            };
            ctx.for_status(code, detail)
        }
        E::DigestError(DigestError::VerificationError { expected, actual }) => {
            ctx.digest_mismatch(expected, actual)
        }
        other => ctx.other(truncate(&other.to_string(), 500)),
    }
}

/// Like [`classify`], for the `io::Error`s a blob stream yields (which wrap reqwest and digest
/// errors).
pub(crate) fn classify_io(err: &std::io::Error, ctx: &Ctx<'_>) -> RegistryError {
    ctx.for_io(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNED: &str = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=secretsig&X-Amz-Security-Token=secrettoken";

    #[test]
    fn urls_lose_their_query_and_user_info() {
        let text = format!(
            "error sending request for url (https://bucket.s3.amazonaws.com/docker/blobs/data?{SIGNED}#frag): \
             redirected from HTTP://user:secretpw@reg.example:5000/v2/app/blobs/sha256:ab?x=secretq \"https://h/p?secretq2\""
        );
        let out = redact_urls(&text);
        assert!(!out.contains("secret"), "{out}");
        for kept in [
            "error sending request for url (https://bucket.s3.amazonaws.com/docker/blobs/data?<redacted>): ",
            "HTTP://<redacted>@reg.example:5000/v2/app/blobs/sha256:ab?<redacted> ",
            "\"https://h/p?<redacted>\"",
        ] {
            assert!(out.contains(kept), "{kept:?} not in {out}");
        }
        let plain = "connection refused (os error 111) at http://127.0.0.1:5000/v2/";
        assert_eq!(redact_urls(plain), plain);
        assert_eq!(redact_urls("no url ?here@"), "no url ?here@");
    }

    #[tokio::test]
    async fn reqwest_errors_never_show_a_signed_query() {
        // A port nobody listens on: the request fails to connect, and reqwest's error names
        // the URL, as it would after a redirect to a pre-signed blob URL.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://user:secretpw@127.0.0.1:{port}/docker/blobs/data?{SIGNED}");
        let e = reqwest::Client::new().get(&url).send().await.unwrap_err();
        assert!(
            e.to_string().contains("secretsig"),
            "reqwest shows the URL: {e}"
        );
        let chain = error_chain(&e);
        assert!(!chain.contains("secret"), "{chain}");
        assert!(
            chain.contains(&format!("127.0.0.1:{port}/docker/blobs/data")),
            "{chain}"
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let ctx = Ctx {
            reference: "reg.example/app:1",
            host: "reg.example",
            scheme: "https",
            credentials: "none",
            op: Op::PullBlob(&digest),
        };
        let msg = classify(OciDistributionError::RequestError(e), &ctx).to_string();
        assert!(!msg.contains("secret"), "{msg}");
        assert!(msg.contains("reg.example/app:1"), "{msg}");
        // Errors that carry a URL in their own text, and streamed blobs' io errors.
        let e = reqwest::Client::new().get(&url).send().await.unwrap_err();
        let msg = classify_io(&std::io::Error::other(e), &ctx).to_string();
        assert!(!msg.contains("secret"), "{msg}");
        let e = OciDistributionError::SpecViolationError(format!("redirected to {url}"));
        let msg = classify(e, &ctx).to_string();
        assert!(
            !msg.contains("secret") && msg.contains("?<redacted>"),
            "{msg}"
        );
    }
}
