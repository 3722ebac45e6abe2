//! The admin HTTP API, on loopback by default.
//!
//! | route | token | purpose |
//! |---|---|---|
//! | `POST /api/v1/tunnels` | admin or spawner | issue a tunnel (credential + reserved port) |
//! | `GET /api/v1/tunnels` | admin or spawner | list tunnels with live status |
//! | `GET /api/v1/tunnels/{id}` | admin or spawner | one tunnel |
//! | `DELETE /api/v1/tunnels/{id}` | admin or spawner | revoke |
//! | `POST /api/v1/tunnels/{id}/renew` | admin or spawner | extend the expiry, restart the lease |
//! | `GET /healthz` | no | liveness: the process serves HTTP |
//! | `GET /readyz` | no | readiness: listeners bound, keys and state loaded, not draining |
//! | `GET /metrics` | no | Prometheus text; no user names, no secrets |
//!
//! Which token may do what is `tokens.rs`'s table. Tokens are compared in constant time.
//! Errors are `{"error": "..."}`.
//!
//! `serve` bounds what a client that connects and then goes slow can hold: at most
//! `admin.max_connections` connections (more are closed at accept, so a flood cannot take the
//! descriptors the tunnels need), `admin.header_timeout` to send each request's headers (an idle
//! keep-alive connection included) and `admin.body_timeout` to send its body (then 408).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::accept::AcceptErrors;
use crate::broker::{Broker, IssueError, IssueRequest, RenewError};
use crate::config::AdminConfig;
use crate::credentials::AuthKind;
use crate::grants::Grant;
use crate::tunnels::LiveStatus;

mod auth;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    /// The broker.
    pub broker: Broker,
    /// Flipped on once serving, off when draining.
    pub ready: Arc<AtomicBool>,
}

/// The whole admin app; tests call it without a socket.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/api/v1/tunnels", get(list).post(issue))
        .route("/api/v1/tunnels/{id}", get(show).delete(revoke))
        .route("/api/v1/tunnels/{id}/renew", post(renew))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let body_timeout = state.broker.config().admin.body_timeout;
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(body_timeout, read_body))
        .with_state(state)
}

/// Bound on a request body: an issue request with a public key is well under 1 KiB.
const MAX_BODY: usize = 64 * 1024;

/// How long open connections get to finish once the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Reads the whole body within `limit` before any handler runs, so a slow body never holds a
/// handler, and the 408 names the setting.
async fn read_body(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body unreadable or over {MAX_BODY} bytes"),
        ),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received within admin.body_timeout",
        ),
    }
}

/// Serves `app` on `listener` (HTTP/1.1) until `stop`, with the limits of `config`; then gives
/// open connections a short grace to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &AdminConfig,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    let mut errors = AcceptErrors::new("admin");
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    loop {
        let (socket, peer) = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => {
                    errors.accepted();
                    a
                }
                Err(e) => {
                    errors.pause(&e).await;
                    continue;
                }
            },
        };
        // Over the cap the connection is closed at once: queueing it would hold its descriptor.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "admin connection cap reached; closing");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let conn =
            http.serve_connection(TokioIo::new(socket), TowerToHyperService::new(app.clone()));
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}

/// A JSON error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let body = state.broker.metrics().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The body of `POST /api/v1/tunnels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// JupyterHub user name.
    pub user: String,
    /// JupyterHub server name.
    #[serde(default)]
    pub server_name: String,
    /// Lifetime in seconds.
    pub ttl_seconds: Option<u64>,
    /// The job's own public key.
    pub public_key: Option<String>,
    /// "key" (the default) or "certificate".
    #[serde(default)]
    pub auth: AuthKind,
    /// Lease in seconds; `tunnels.lease` when absent.
    pub lease_seconds: Option<u64>,
}

/// The body of `POST /api/v1/tunnels/{id}/renew`; an empty body is all defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// New lifetime from now; the lifetime asked at issue when absent.
    pub ttl_seconds: Option<u64>,
}

/// A tunnel as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct TunnelView {
    /// Tunnel id.
    pub id: String,
    /// JupyterHub user.
    pub user: String,
    /// JupyterHub server name.
    pub server_name: String,
    /// Reserved hub port.
    pub port: u16,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub expires_at: String,
    /// active, revoked or expired.
    pub state: String,
    /// The SSH user jobs log in as.
    pub ssh_user: String,
    /// The host name jobs dial, if configured.
    pub ssh_host: Option<String>,
    /// The SSH port jobs dial.
    pub ssh_port: u16,
    /// Pins the broker's host key for the job.
    pub known_hosts: String,
    /// The job key's fingerprint.
    pub fingerprint: String,
    /// A job session holds the forward.
    pub connected: bool,
    /// RFC 3339, while connected.
    pub connected_since: Option<String>,
    /// The job's address, while connected.
    pub peer: Option<String>,
    /// Bytes from hub clients to the job.
    pub bytes_to_job: u64,
    /// Bytes from the job to hub clients.
    pub bytes_from_job: u64,
    /// The proxy route's state.
    pub route: String,
    /// "key" or "certificate": which credential may publish it.
    #[serde(default)]
    pub auth: AuthKind,
    /// The host the proxy dials to reach `port` (`http://<tunnel_host>:<port>`).
    #[serde(default)]
    pub tunnel_host: String,
    /// The lease in seconds, if the tunnel has one.
    #[serde(default)]
    pub lease_seconds: Option<u64>,
    /// RFC 3339, once renewed.
    #[serde(default)]
    pub renewed_at: Option<String>,
    /// RFC 3339: when the lease runs out unless renewed, if the tunnel has one.
    #[serde(default)]
    pub lease_until: Option<String>,
    /// Whether the broker holds the tunnel's port (false for an ended tunnel).
    pub listening: bool,
    /// Why an active tunnel's port is not held, e.g. "port held by another process".
    pub listen_error: Option<String>,
    /// Only in the answer to an issue request that generated the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

fn view(broker: &Broker, grant: &Grant, live: Option<&LiveStatus>) -> TunnelView {
    let config = broker.config();
    let state = grant.ended().map_or("active", |e| e.reason.as_str());
    let link = live.and_then(|l| l.link);
    TunnelView {
        id: grant.id().to_owned(),
        user: grant.user().to_owned(),
        server_name: grant.server_name().to_owned(),
        port: grant.port(),
        created_at: rfc3339(grant.created_at()),
        expires_at: rfc3339(grant.expires_at()),
        state: state.to_owned(),
        ssh_user: config.ssh.user.clone(),
        ssh_host: config.ssh.public_host.clone(),
        ssh_port: broker.ssh_port(),
        known_hosts: broker.known_hosts_line(),
        fingerprint: grant.fingerprint().to_owned(),
        connected: link.is_some(),
        connected_since: link.map(|(since, _)| {
            rfc3339(
                since
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs(),
            )
        }),
        peer: link.map(|(_, peer)| peer.to_string()),
        bytes_to_job: live.map_or(0, |l| l.bytes_to_job),
        bytes_from_job: live.map_or(0, |l| l.bytes_from_job),
        route: broker.route_state(grant.id()).as_str().into(),
        auth: grant.auth(),
        tunnel_host: broker.tunnel_host().to_owned(),
        lease_seconds: grant.lease_seconds(),
        renewed_at: grant.renewed_at().map(rfc3339),
        lease_until: grant.lease_until().map(rfc3339),
        listening: live.is_some_and(|l| l.listening),
        listen_error: live.and_then(|l| l.listen_error).map(str::to_owned),
        private_key: None,
    }
}

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let t = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn issue(
    State(state): State<AdminState>,
    body: Result<Json<IssueBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        // axum says 422 for well-formed JSON of the wrong shape; to a caller both are a bad
        // body, so both are 400 (only a wrong content type keeps its 415).
        Err(JsonRejection::MissingJsonContentType(r)) => return error(r.status(), r.body_text()),
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let req = IssueRequest {
        user: body.user,
        server_name: body.server_name,
        ttl: body.ttl_seconds.map(Duration::from_secs),
        public_key: body.public_key,
        auth: body.auth,
        lease_seconds: body.lease_seconds,
    };
    match state.broker.issue(req).await {
        Ok(issued) => {
            let live = state.broker.get(issued.grant.id()).and_then(|(_, l)| l);
            let mut v = view(&state.broker, &issued.grant, live.as_ref());
            v.private_key = issued.private_key.map(|k| k.expose().to_owned());
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e @ IssueError::BadRequest(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ (IssueError::NoPort(_) | IssueError::Store(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

async fn list(State(state): State<AdminState>) -> Response {
    let tunnels: Vec<TunnelView> = state
        .broker
        .list()
        .iter()
        .map(|(g, live)| view(&state.broker, g, live.as_ref()))
        .collect();
    Json(json!({ "tunnels": tunnels })).into_response()
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.broker.get(&id) {
        Some((g, live)) => Json(view(&state.broker, &g, live.as_ref())).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no tunnel {id}")),
    }
}

async fn revoke(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.broker.revoke(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no tunnel {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn renew(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let body: RenewBody = if body.iter().all(u8::is_ascii_whitespace) {
        RenewBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("renew body: {e}")),
        }
    };
    let ttl = body.ttl_seconds.map(Duration::from_secs);
    match state.broker.renew(&id, ttl).await {
        Ok(grant) => {
            let live = state.broker.get(&id).and_then(|(_, l)| l);
            Json(view(&state.broker, &grant, live.as_ref())).into_response()
        }
        Err(e @ RenewError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ RenewError::Ended { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ RenewError::BadRequest(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ RenewError::Store(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
