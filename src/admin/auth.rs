//! The admin API's authorization layer: which token may call what (the table is in `tokens`).

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tracing::warn;

use super::{AdminState, error};
use crate::tokens::{load_spawner_tokens, spawner_may};

/// The admin API's authorization layer: the admin token may call anything, a spawner token
/// what `spawner_may` allows (else 403), anything else is 401.
pub async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| crate::secret::Secret::new(t.trim()));
    let Some(token) = presented else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing 'Authorization: Bearer <admin token>'",
        );
    };
    if state.broker.admin_token().matches(token.expose()) {
        return next.run(req).await;
    }
    let dir = state.broker.config().tokens_dir();
    let (tokens, refused) = tokio::task::spawn_blocking(move || load_spawner_tokens(&dir))
        .await
        .unwrap_or_default();
    // Every token is compared (no early exit), so the timing does not tell which one is close.
    let spawner = tokens
        .iter()
        .fold(false, |hit, t| hit | t.matches(token.expose()));
    if !spawner {
        if !refused.is_empty() {
            warn!(
                ?refused,
                "spawner token files refused; fix their permissions"
            );
        }
        return error(
            StatusCode::UNAUTHORIZED,
            "wrong admin token (and not a spawner token)",
        );
    }
    if spawner_may(req.method(), req.uri().path()) {
        next.run(req).await
    } else {
        error(
            StatusCode::FORBIDDEN,
            "a spawner token may only issue, list, show, renew and revoke tunnels",
        )
    }
}
