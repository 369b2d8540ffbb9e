//! Retrying registry requests: which failures are worth another attempt, and how long to wait.
//!
//! Every request to a registry (a manifest GET, a blob HEAD, a blob GET with its whole body, a
//! blob upload from its POST to its final PUT, a manifest PUT) is one *attempt*, made again when
//! it fails in a way that a later attempt may not: a 5xx answer, 408, 429 (or the registry's
//! `TOOMANYREQUESTS` code), a connection reset or timeout, a body that ends early, an upload
//! session the registry forgot. Refused connections, DNS and TLS failures, 401/403/404, content
//! that does not match its digest and every other answer are final at once: another attempt
//! would get the same.
//!
//! Waits grow exponentially from [`RetryPolicy::base_delay`], each a random point in the upper
//! half of its step (jitter, so that parallel uploads failing together do not retry together),
//! each at most [`RetryPolicy::max_delay`], and all of a request's waits together at most
//! [`RetryPolicy::max_total_delay`] (the request's *retry budget*, set by
//! `SHMOCKER_REGISTRY_MAX_WAIT`).
//!
//! An answer with a `Retry-After` header (registries send it with 429 and 503; it is honoured on
//! any answer that is retried) sets the wait instead: what the registry asked, in seconds or as
//! an HTTP-date, never less, plus a random extra of a tenth of it (at least 0.1 s, at most 1 s,
//! and never past the budget) so that parallel requests refused together spread out. The asked
//! wait may exceed [`RetryPolicy::max_delay`], but not what is left of the budget: a registry
//! asking for longer ends the request at once with [`RegistryError::RetryAfterTooLong`], which
//! names the registry and the wait it asked for and says what to do, rather than retrying
//! sooner than asked or holding the build past its budget. The retry notice says when its wait
//! came from `Retry-After`. A 429 without the header waits at least [`RATE_LIMIT_MIN_DELAY`].
//! The header reaches us through a patched `oci-client` (third_party/oci-client/PATCHES.md):
//! the published crate drops response headers from its errors.
//!
//! Each attempt also has a time limit, so that a stalled or trickling connection cannot hold a
//! build for ever: [`RetryPolicy::request_timeout`] for manifests and blob checks,
//! [`RetryPolicy::transfer_timeout`] (scaled to the blob's size) for blob transfers. An attempt
//! that runs out of time is abandoned (a pulled blob's temp file is deleted) and counts as a
//! transient failure.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};

use super::RegistryError;

/// The environment variable that sets how many attempts each request gets (1 turns retries off).
pub const ATTEMPTS_ENV: &str = "SHMOCKER_REGISTRY_ATTEMPTS";
/// The environment variable that sets a request's retry budget: how many seconds all of its
/// waits between attempts may add up to ([`RetryPolicy::max_total_delay`]).
pub const MAX_WAIT_ENV: &str = "SHMOCKER_REGISTRY_MAX_WAIT";
/// The largest [`MAX_WAIT_ENV`] accepted, in seconds.
pub const MAX_WAIT_LIMIT: u64 = 3600;
/// The least a request answered with 429 (without `Retry-After`) waits before its next attempt.
pub const RATE_LIMIT_MIN_DELAY: Duration = Duration::from_secs(1);

/// How often and how patiently a request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (at least 1).
    pub attempts: u32,
    /// The first wait; each next one doubles.
    pub base_delay: Duration,
    /// No single wait is longer.
    pub max_delay: Duration,
    /// A request gives up once its waits would add up to more than this (its retry budget).
    pub max_total_delay: Duration,
    /// The time limit of one attempt of a request without a blob body (a manifest GET or PUT,
    /// a blob HEAD).
    pub request_timeout: Duration,
    /// The least time limit of one attempt of a blob transfer (pull or push), however small.
    pub min_transfer_timeout: Duration,
    /// The slowest transfer rate (bytes per second) a blob transfer is given time for: a blob
    /// of N bytes gets `max(min_transfer_timeout, N / min_transfer_rate)` per attempt.
    pub min_transfer_rate: u64,
}

impl Default for RetryPolicy {
    /// 6 attempts, waiting about 0.5, 1, 2, 4 and 8 s (at most 10 s each, 40 s in all); each
    /// attempt at most 60 s, or for a blob 5 minutes or 1 s per MB, whichever is longer.
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            max_total_delay: Duration::from_secs(40),
            request_timeout: Duration::from_secs(60),
            min_transfer_timeout: Duration::from_secs(5 * 60),
            min_transfer_rate: 1_000_000,
        }
    }
}

impl RetryPolicy {
    /// The default policy with the attempts from `SHMOCKER_REGISTRY_ATTEMPTS` and the retry
    /// budget from `SHMOCKER_REGISTRY_MAX_WAIT`, where set.
    pub fn from_env() -> Result<RetryPolicy, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<RetryPolicy, String> {
        let mut p = RetryPolicy::default();
        if let Some(v) = var(MAX_WAIT_ENV) {
            let secs = v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_WAIT_LIMIT)
                .ok_or_else(|| {
                    format!(
                        "{MAX_WAIT_ENV}={v:?} is not a number of seconds from 0 to {MAX_WAIT_LIMIT}"
                    )
                })?;
            p.max_total_delay = Duration::from_secs(secs);
        }
        if let Some(v) = var(ATTEMPTS_ENV) {
            p.attempts = v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    format!("{ATTEMPTS_ENV}={v:?} is not a number of attempts from 1 to 100")
                })?;
        }
        Ok(p)
    }

    /// The time limit of one attempt to transfer a blob of `size` bytes.
    pub fn transfer_timeout(&self, size: u64) -> Duration {
        let at_min_rate = Duration::from_secs(size / self.min_transfer_rate.max(1));
        at_min_rate.max(self.min_transfer_timeout)
    }

    /// The wait before attempt `attempt + 1` (`attempt` counts from 1), with jitter.
    fn delay(&self, attempt: u32, rate_limited: bool) -> Duration {
        let step = self
            .base_delay
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.max_delay);
        // Uniform in [step/2, step].
        let half = step / 2;
        let jitter = half.mul_f64(random_unit());
        let d = half + jitter;
        if rate_limited {
            d.max(RATE_LIMIT_MIN_DELAY)
        } else {
            d
        }
    }

    /// The wait before the next attempt when the registry asked for `asked` (`Retry-After`) and
    /// `left` of the budget remains (`asked <= left`): `asked` plus upward jitter, within `left`.
    fn asked_delay(asked: Duration, left: Duration) -> Duration {
        let spread = (asked / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        asked
            .saturating_add(spread.mul_f64(random_unit()))
            .min(left)
            .max(asked)
    }
}

/// A number in [0, 1), different on every call and in every process: std's randomly keyed
/// SipHash over a counter and the clock. Jitter needs spread, not cryptographic quality.
fn random_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Told about each retry, e.g. to print a warning. Never given credentials: the text is built
/// from the request's description and the error's message, which carry none.
#[derive(Clone)]
pub struct RetryNotice(Arc<dyn Fn(&str) + Send + Sync>);

impl RetryNotice {
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> RetryNotice {
        RetryNotice(Arc::new(f))
    }
}

impl std::fmt::Debug for RetryNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryNotice")
    }
}

/// How one attempt ended, when it did not succeed.
pub(crate) enum Failure {
    /// Worth another attempt; `rate_limited` for 429; `retry_after` the wait the registry asked
    /// for, if its answer had a `Retry-After` header. (Boxed: a `Result` with this as its error
    /// stays small.)
    Transient {
        error: Box<RegistryError>,
        rate_limited: bool,
        retry_after: Option<Duration>,
    },
    /// Refused credentials (401). Retried once: oci-client sends a request without credentials
    /// when its token handshake failed (a reset or 503 on the `/v2/` ping), and the next
    /// attempt repeats the handshake. Wrong credentials fail the same way twice.
    Unauthorized(RegistryError),
    /// Final: report it as is.
    Final(RegistryError),
}

impl Failure {
    /// Sorts an `oci-client` error, translated by `classify`.
    pub(crate) fn from_oci(
        e: OciDistributionError,
        classify: impl FnOnce(OciDistributionError) -> RegistryError,
    ) -> Failure {
        if unauthorized(&e) {
            return Failure::Unauthorized(classify(e));
        }
        match transient(&e) {
            Some(rate_limited) => Failure::Transient {
                retry_after: e.retry_after(),
                error: Box::new(classify(e)),
                rate_limited,
            },
            None => Failure::Final(classify(e)),
        }
    }

    pub(crate) fn transient(error: RegistryError) -> Failure {
        Failure::Transient {
            error: Box::new(error),
            rate_limited: false,
            retry_after: None,
        }
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Failure {
        Failure::Final(e)
    }
}

/// Runs `attempt` until it succeeds, fails finally, or the policy's budget is spent. `what`
/// describes the request for retry notices ("push blob sha256:… to 127.0.0.1:5000/app:1").
/// An attempt still running after `limit` is dropped and counts as a transient failure, told
/// by `timed_out(limit)`.
pub(crate) async fn run<T, F, Fut>(
    policy: &RetryPolicy,
    notice: Option<&RetryNotice>,
    what: &str,
    limit: Duration,
    timed_out: impl Fn(Duration) -> RegistryError,
    mut attempt: F,
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let mut n = 1;
    loop {
        let outcome = tokio::time::timeout(limit, attempt())
            .await
            .unwrap_or_else(|_| Err(Failure::transient(timed_out(limit))));
        let (error, rate_limited, retry_after) = match outcome {
            Ok(v) => return Ok(v),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Unauthorized(e)) if n > 1 || policy.attempts == 1 => return Err(e),
            Err(Failure::Unauthorized(error)) => (error, false, None),
            Err(Failure::Transient {
                error,
                rate_limited,
                retry_after,
            }) => (*error, rate_limited, retry_after),
        };
        let left = policy.max_total_delay.saturating_sub(waited);
        let delay = match retry_after {
            // The registry said when: not sooner, and not past the budget either.
            Some(asked) if n < policy.attempts && asked > left => {
                return Err(RegistryError::RetryAfterTooLong {
                    asked,
                    left,
                    budget: policy.max_total_delay,
                    last: Box::new(error),
                });
            }
            Some(asked) => RetryPolicy::asked_delay(asked, left),
            None => policy.delay(n, rate_limited),
        };
        let out_of_attempts = n >= policy.attempts;
        if out_of_attempts || waited + delay > policy.max_total_delay {
            if n == 1 && out_of_attempts {
                // SHMOCKER_REGISTRY_ATTEMPTS=1: no retries were asked for.
                return Err(error);
            }
            return Err(RegistryError::GaveUp {
                attempts: n,
                seconds: started.elapsed().as_secs_f64(),
                more: if out_of_attempts {
                    "allow more attempts with SHMOCKER_REGISTRY_ATTEMPTS"
                } else {
                    "allow longer waits between attempts with SHMOCKER_REGISTRY_MAX_WAIT=SECONDS"
                },
                last: Box::new(error),
            });
        }
        if let Some(notice) = notice {
            let asked = retry_after.map_or(String::new(), |a| {
                format!(
                    ", as the registry asked with Retry-After ({})",
                    super::error::seconds(a)
                )
            });
            notice.0(&format!(
                "{what}: attempt {n} of {} failed ({error}); retrying in {:.1}s{asked}",
                policy.attempts,
                delay.as_secs_f64()
            ));
        }
        tokio::time::sleep(delay).await;
        waited += delay;
        n += 1;
    }
}

fn unauthorized(e: &OciDistributionError) -> bool {
    use OciDistributionError as E;
    match e {
        E::UnauthorizedError { .. } | E::ServerError { code: 401, .. } => true,
        E::RequestError(e) => e.status().is_some_and(|s| s.as_u16() == 401),
        _ => false,
    }
}

/// `Some(rate_limited)` when an `oci-client` error is worth another attempt.
fn transient(e: &OciDistributionError) -> Option<bool> {
    use OciDistributionError as E;
    match e {
        E::ServerError { code, .. } => status_transient(*code),
        // This error form does not carry the status; a `Retry-After` (sent with 429 and 503)
        // says that the registry expects another attempt, whatever code its body names.
        E::RegistryError {
            retry_after: Some(_),
            ..
        } => Some(true),
        E::RegistryError { envelope, .. } => {
            let codes = || envelope.errors.iter().map(|e| &e.code);
            if codes().any(|c| matches!(c, OciErrorCode::Toomanyrequests)) {
                Some(true)
            } else if codes().any(|c| {
                // The upload session is gone (the registry restarted, or a proxy lost it): a
                // fresh session from a new POST will do.
                matches!(
                    c,
                    OciErrorCode::BlobUploadUnknown | OciErrorCode::BlobUploadInvalid
                )
            }) {
                Some(false)
            } else {
                None
            }
        }
        E::RequestError(e) => reqwest_transient(e),
        E::IoError(e) => io_transient(e),
        _ => None,
    }
}

fn status_transient(code: u16) -> Option<bool> {
    match code {
        429 => Some(true),
        408 | 500..=599 => Some(false),
        _ => None,
    }
}

fn reqwest_transient(e: &reqwest::Error) -> Option<bool> {
    if let Some(status) = e.status() {
        return status_transient(status.as_u16());
    }
    if e.is_timeout() {
        return Some(false);
    }
    if e.is_connect() || e.is_builder() || e.is_redirect() {
        // Refused, no such host, a TLS handshake that failed: the next attempt meets the same.
        return None;
    }
    // Reset, closed mid-answer, a body that ended early.
    Some(false)
}

/// For the `io::Error`s a blob stream yields: a reqwest error inside is judged as such, a
/// digest that did not match what arrived is final.
pub(crate) fn io_transient(e: &std::io::Error) -> Option<bool> {
    if let Some(inner) = e.get_ref() {
        if let Some(re) = inner.downcast_ref::<reqwest::Error>() {
            return reqwest_transient(re);
        }
        if inner.downcast_ref::<DigestError>().is_some() {
            return None;
        }
    }
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::TimedOut
            | K::Interrupted
    )
    .then_some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_total_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        }
    }

    const LIMIT: Duration = Duration::from_secs(60);

    fn timed_out(limit: Duration) -> RegistryError {
        RegistryError::Registry {
            host: "reg:5000".into(),
            reference: "reg:5000/app:1".into(),
            action: "pull blob sha256:ab of".into(),
            detail: format!("no answer within {limit:?}"),
        }
    }

    fn err(n: u32) -> RegistryError {
        RegistryError::Registry {
            host: "reg:5000".into(),
            reference: "reg:5000/app:1".into(),
            action: "push blob sha256:ab to".into(),
            detail: format!("HTTP 503 (attempt {n})"),
        }
    }

    #[test]
    fn delays_grow_with_jitter_and_stay_bounded() {
        let p = RetryPolicy::default();
        for attempt in 1..=10 {
            let step = (p.base_delay * (1 << (attempt - 1))).min(p.max_delay);
            let d = p.delay(attempt, false);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        assert!(p.delay(1, true) >= RATE_LIMIT_MIN_DELAY);
        // Jitter spreads the waits.
        let ds: std::collections::HashSet<_> = (0..20).map(|_| p.delay(3, false)).collect();
        assert!(ds.len() > 1);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let notices = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = notices.clone();
        let notice = RetryNotice::new(move |m| seen.lock().unwrap().push(m.to_string()));
        let out = run(
            &policy(6),
            Some(&notice),
            "push blob",
            LIMIT,
            timed_out,
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n < 3 {
                    Err(Failure::transient(err(n)))
                } else {
                    Ok(n)
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(out, 3);
        let notices = notices.lock().unwrap();
        assert_eq!(notices.len(), 2);
        assert!(notices[0].contains("attempt 1 of 6") && notices[0].contains("HTTP 503"));
    }

    #[tokio::test]
    async fn the_budget_ends_in_an_error_naming_the_last_failure() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let e = run(&policy(4), None, "x", LIMIT, timed_out, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Err::<(), _>(Failure::transient(err(n)))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let msg = e.to_string();
        assert!(
            matches!(e, RegistryError::GaveUp { attempts: 4, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("reg:5000/app:1")
                && msg.contains("sha256:ab")
                && msg.contains("attempt 4")
                && msg.contains("SHMOCKER_REGISTRY_ATTEMPTS"),
            "{msg}"
        );

        // Ended by the budget of waits rather than the attempts: the message says which.
        let tight = RetryPolicy {
            max_total_delay: Duration::from_millis(3),
            ..policy(6)
        };
        let e = run(&tight, None, "x", LIMIT, timed_out, || async {
            Err::<(), _>(Failure::transient(err(1)))
        })
        .await
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("SHMOCKER_REGISTRY_MAX_WAIT") && !msg.contains("ATTEMPTS"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn final_failures_are_not_retried() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let e = run(&policy(6), None, "x", LIMIT, timed_out, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Failure::Final(err(1)))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(e, RegistryError::Registry { .. }));
    }

    #[tokio::test]
    async fn refused_credentials_get_one_more_attempt() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let e = run(&policy(6), None, "x", LIMIT, timed_out, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Failure::Unauthorized(err(1)))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The error itself, not a give-up: it says what to do about the credentials.
        assert!(matches!(e, RegistryError::Registry { .. }));
        let e = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert!(unauthorized(&e) && transient(&e).is_none());
    }

    #[tokio::test]
    async fn an_attempt_that_hangs_is_cut_off_and_retried() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let limit = Duration::from_millis(50);
        // The first attempt never ends; the second answers.
        let out = run(&policy(3), None, "x", limit, timed_out, || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, Failure>("done")
        })
        .await
        .unwrap();
        assert_eq!((out, calls.load(Ordering::SeqCst)), ("done", 2));
        // Never answering at all: a bounded give-up that says why.
        let started = Instant::now();
        let e = run(&policy(3), None, "x", limit, timed_out, || async {
            std::future::pending::<Result<(), Failure>>().await
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = e.to_string();
        assert!(
            matches!(e, RegistryError::GaveUp { attempts: 3, .. })
                && msg.contains("no answer within"),
            "{msg}"
        );
    }

    #[test]
    fn transfer_limits_scale_with_size() {
        let p = RetryPolicy::default();
        assert_eq!(p.transfer_timeout(0), Duration::from_secs(300));
        assert_eq!(p.transfer_timeout(10_000_000), Duration::from_secs(300));
        assert_eq!(p.transfer_timeout(2_000_000_000), Duration::from_secs(2000));
        assert_eq!(p.request_timeout, Duration::from_secs(60));
    }

    #[test]
    fn statuses_are_sorted() {
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "u".into(),
            message: String::new(),
            retry_after: None,
        };
        assert_eq!(transient(&server(503)), Some(false));
        assert_eq!(transient(&server(500)), Some(false));
        assert_eq!(transient(&server(429)), Some(true));
        assert_eq!(transient(&server(404)), None);
        assert_eq!(transient(&server(400)), None);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(io_transient(&reset), Some(false));
        let other = std::io::Error::other("disk full");
        assert_eq!(io_transient(&other), None);
    }

    #[test]
    fn retry_after_values_are_parsed() {
        use oci_client::errors::parse_retry_after;
        use std::time::{SystemTime, UNIX_EPOCH};
        // 1994-11-06 08:49:30 UTC, 7 s before the dates below.
        let now = UNIX_EPOCH + Duration::from_secs(784_111_770);
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(parse_retry_after("2", now), secs(2));
        assert_eq!(parse_retry_after(" 120 ", now), secs(120));
        assert_eq!(parse_retry_after("0", now), secs(0));
        // An HTTP-date in the future, in its three forms (RFC 9110, section 5.6.7).
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_retry_after(date, now), secs(7), "{date}");
        }
        // One in the past: retry now.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            secs(0)
        );
        // Relative to the real clock, too.
        let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
        let header = soon.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let wait = parse_retry_after(&header, SystemTime::now()).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{header}: {wait:?}"
        );
        // Anything else is not a Retry-After value, and is ignored.
        for garbage in [
            "",
            "soon",
            "-1",
            "+5",
            "1.5",
            "2 s",
            "99999999999999999999999",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "06 Nov 1994",
        ] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn errors_hand_on_the_asked_wait() {
        let e = OciDistributionError::ServerError {
            code: 429,
            url: "u".into(),
            message: String::new(),
            retry_after: Some(Duration::from_secs(2)),
        };
        match Failure::from_oci(e, |_| err(1)) {
            Failure::Transient {
                rate_limited,
                retry_after,
                ..
            } => assert_eq!(
                (rate_limited, retry_after),
                (true, Some(Duration::from_secs(2)))
            ),
            _ => panic!("a 429 is transient"),
        }
    }

    #[test]
    fn asked_waits_get_only_upward_jitter_within_the_budget() {
        let asked = Duration::from_secs(2);
        for _ in 0..50 {
            let d = RetryPolicy::asked_delay(asked, Duration::from_secs(40));
            assert!(
                d >= asked && d <= asked + Duration::from_millis(200),
                "{d:?}"
            );
        }
        // The jitter never goes past the budget; the asked wait itself always stays.
        assert_eq!(RetryPolicy::asked_delay(asked, asked), asked);
        let zero = RetryPolicy::asked_delay(Duration::ZERO, Duration::from_secs(1));
        assert!(zero <= Duration::from_millis(100), "{zero:?}");
    }

    /// A 503 whose `Retry-After` asked for `ms` (a 429 would wait at least 1 s anyway).
    fn asked(n: u32, ms: u64) -> Failure {
        Failure::Transient {
            error: Box::new(err(n)),
            rate_limited: false,
            retry_after: Some(Duration::from_millis(ms)),
        }
    }

    #[tokio::test]
    async fn retry_after_sets_the_wait_past_the_backoff() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let notices = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = notices.clone();
        let notice = RetryNotice::new(move |m| seen.lock().unwrap().push(m.to_string()));
        let started = Instant::now();
        // The test policy waits at most 4 ms; the registry asks for 300 ms.
        let out = run(
            &policy(6),
            Some(&notice),
            "push blob",
            LIMIT,
            timed_out,
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n < 2 { Err(asked(n, 300)) } else { Ok(n) }
            },
        )
        .await
        .unwrap();
        assert_eq!(out, 2);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let notices = notices.lock().unwrap();
        assert_eq!(notices.len(), 1);
        assert!(
            notices[0].contains("as the registry asked with Retry-After (0.3s)"),
            "{}",
            notices[0]
        );
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_budget_fails_at_once() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        // 1 s of budget; the registry asks for 5 s.
        let e = run(&policy(6), None, "x", LIMIT, timed_out, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Err::<(), _>(asked(n, 5000))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let msg = e.to_string();
        assert!(
            matches!(e, RegistryError::RetryAfterTooLong { .. }),
            "{msg}"
        );
        for needle in [
            "reg:5000",
            "asked to be retried in 5s with Retry-After",
            "more than this request's retry budget of 1s;",
            "try again later",
            MAX_WAIT_ENV,
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        // Later in a request, what is left of the budget counts: 0.6 s asked fits the first
        // time (1 s left), not the second (under 0.4 s left).
        let calls = std::sync::atomic::AtomicU32::new(0);
        let e = run(&policy(6), None, "x", LIMIT, timed_out, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Err::<(), _>(asked(n, 600))
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let msg = e.to_string();
        assert!(
            matches!(e, RegistryError::RetryAfterTooLong { .. })
                && msg.contains("asked to be retried in 0.6s")
                && msg.contains("left of this request's retry budget of 1s;"),
            "{msg}"
        );
    }

    fn policy_from(vars: &[(&str, &str)]) -> Result<RetryPolicy, String> {
        RetryPolicy::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_budget_and_attempts_come_from_the_environment() {
        assert_eq!(policy_from(&[]).unwrap(), RetryPolicy::default());
        let p = policy_from(&[(MAX_WAIT_ENV, "300"), (ATTEMPTS_ENV, "3")]).unwrap();
        assert_eq!(
            (p.max_total_delay, p.attempts),
            (Duration::from_secs(300), 3)
        );
        for bad in ["-1", "3601", "1.5", "lots"] {
            let e = policy_from(&[(MAX_WAIT_ENV, bad)]).unwrap_err();
            assert!(e.contains(MAX_WAIT_ENV) && e.contains("0 to 3600"), "{e}");
        }
    }
}
