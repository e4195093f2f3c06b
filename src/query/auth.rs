//! The layer in front of every service (a tower layer on the tonic server).
//!
//! For `tally.v1.*` calls: reads `authorization: Bearer <key>`, checks the key
//! ([`KeyRing::check`]), checks its role against the service (Query: provider keys;
//! Ingest: ingest keys; Admin: admin keys), applies the key's rate limit, and puts the
//! [`Principal`] in the request's extensions for the service. Health and reflection
//! are open, as stock tools and probes expect.
//!
//! Answers: no or unknown or revoked key: UNAUTHENTICATED (the same message for all
//! three); a key of another role: PERMISSION_DENIED; over the rate: RESOURCE_EXHAUSTED.
//! Every call's latency is recorded in `tally_query_seconds{rpc, code}` (for a
//! stream, until its response starts).

use super::keys::{KeyRing, Principal, Role};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// A token bucket per key: `rate` tokens per second, at most `rate` saved up.
struct Limiter {
    rate: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    fn allow(&self, key: &str) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("lock");
        let (tokens, at) = b.entry(key.to_owned()).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Shared {
    ring: KeyRing,
    limiter: Limiter,
}

#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl AuthLayer {
    pub fn new(ring: KeyRing, rate_per_key: u32) -> AuthLayer {
        AuthLayer {
            shared: Arc::new(Shared {
                ring,
                limiter: Limiter {
                    rate: f64::from(rate_per_key),
                    buckets: Mutex::new(HashMap::new()),
                },
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Which role a service needs; `None` for the open ones.
fn needs(service: &str) -> Option<fn(&Role) -> bool> {
    match service {
        "tally.v1.Query" => Some(|r| matches!(r, Role::Provider { .. })),
        "tally.v1.Ingest" => Some(|r| matches!(r, Role::Ingest)),
        "tally.v1.Admin" => Some(|r| matches!(r, Role::Admin)),
        _ => None,
    }
}

/// The presented key, if the header has the expected shape.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn record(rpc: &str, code: tonic::Code, started: Instant) {
    metrics::histogram!(crate::metrics::QUERY_SECONDS, "rpc" => rpc.to_owned(), "code" => format!("{code:?}"))
        .record(started.elapsed().as_secs_f64());
}

/// The code of a response: from `grpc-status` in its headers (an error answered at
/// once), else OK (a unary success sends its status in the trailers).
fn code_of<B>(r: &http::Response<B>) -> tonic::Code {
    r.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let path = req.uri().path().to_owned();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let Some(allowed) = needs(service) else {
            return Box::pin(self.inner.call(req));
        };
        let rpc = method.to_owned();
        let refuse = |status: tonic::Status| -> Self::Future {
            record(&rpc, status.code(), started);
            Box::pin(std::future::ready(Ok(status.into_http())))
        };
        let principal: Option<Principal> =
            bearer(req.headers()).and_then(|k| self.shared.ring.check(k));
        let Some(principal) = principal else {
            return refuse(tonic::Status::unauthenticated(
                "missing, unknown or revoked API key: send `authorization: Bearer <key>`",
            ));
        };
        if !allowed(&principal.role) {
            tracing::info!(key = %principal.key_id, role = %principal.role.describe(), %path, "refused: wrong role");
            let role = match principal.role {
                Role::Provider { .. } => "provider",
                Role::Ingest => "ingest",
                Role::Admin => "admin",
            };
            return refuse(tonic::Status::permission_denied(format!(
                "this key (role {role}) cannot call {service}"
            )));
        }
        if !self.shared.limiter.allow(&principal.key_id) {
            return refuse(tonic::Status::resource_exhausted(
                "request rate over this key's limit; retry later",
            ));
        }
        req.extensions_mut().insert(principal);
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let r = inner.call(req).await?;
            record(&rpc, code_of(&r), started);
            Ok(r)
        })
    }
}

/// The principal the layer put in a request.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| tonic::Status::unauthenticated("no API key"))
}

/// The tenant of a Query request (the layer only lets provider keys through).
pub fn tenant<T>(req: &tonic::Request<T>) -> Result<super::keys::Tenant, tonic::Status> {
    principal(req)?
        .tenant()
        .ok_or_else(|| tonic::Status::permission_denied("Query needs a provider key"))
}
