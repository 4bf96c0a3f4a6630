//! The HTTPS admission webhook server.
//!
//! - `POST /mutate` takes an `admission.k8s.io/v1` `AdmissionReview`, hands
//!   its request (and its `object` as sent) to a [`Handler`] and answers
//!   `200` with an
//!   `AdmissionReview` whose `response.uid` is the request's. The patch is
//!   sent base64-encoded, as the API server's Go types expect (kube's
//!   `AdmissionResponse` would serialise it as an array of numbers).
//! - A body that is not such a review (not JSON, another `apiVersion` or
//!   `kind`, no `request`, no `request.uid`) is answered `400` with a plain
//!   text message saying what is wrong: there is no uid to answer to.
//! - A review whose request carries a uid but cannot be read otherwise (an
//!   `object` that is not a Kubernetes object) is answered `200` with
//!   `allowed: false` and the reason, so the API server shows it.
//! - A handler that panics does not take the server down: the request is
//!   answered `allowed: false` with a message naming the failure. With
//!   `failurePolicy: Fail` the pod is then refused with that message instead
//!   of being created without its sidecar.
//! - `GET /healthz` answers `ok` on the same port.
//!
//! Every admission is logged (uid, operation, kind, namespace, name or
//! generateName, dryRun, allowed, patched).
//!
//! [`serve`] runs the router over TLS with `axum-server`: one task per
//! connection, a TLS handshake that does not finish within
//! [`HANDSHAKE_TIMEOUT`] is dropped without holding up other clients, and
//! the certificate is taken from [`ServerCerts`] (the rustls certificate
//! resolver of the server configuration) at each handshake, so it can be
//! swapped at run time.
//! [`start_webhook`] is the entry point of `warren-operator run`: it gets
//! the certificate (see [`crate::certs`] for the self-managed and cert-dir
//! modes), binds the listener and serves.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::Handle;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use base64::Engine;
use futures::FutureExt;
use futures::future::BoxFuture;
use kube::core::DynamicObject;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND,
};
use kube::core::{Status, TypeMeta};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::certs::{self, ServerCerts};

/// What decides an admission: the request in, the response out. The
/// response's uid is set to the request's whatever the handler put there.
///
/// The second argument is the request's `object` exactly as the API server
/// sent it (`None` when there is none). The typed request's object has
/// typed metadata, which drops fields it does not know; a patch must be
/// computed against the raw object, or it would remove them.
pub type Handler = Arc<
    dyn Fn(AdmissionRequest<DynamicObject>, Option<Value>) -> BoxFuture<'static, AdmissionResponse>
        + Send
        + Sync,
>;

/// A TLS handshake taking longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP request whose headers take longer than this is dropped.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest review accepted (an UPDATE carries the object twice).
pub const BODY_LIMIT: usize = 8 * 1024 * 1024;

/// The webhook's routes: `POST /mutate` and `GET /healthz`.
pub fn router(handler: Handler) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(handler)
}

fn bad_request(message: String) -> Response {
    tracing::warn!(%message, "invalid admission review");
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

fn v1_types() -> TypeMeta {
    TypeMeta {
        api_version: META_API_VERSION_V1.to_string(),
        kind: META_KIND.to_string(),
    }
}

/// A refusal for a request whose uid is known.
fn refuse(uid: &str, message: &str, reason: &str) -> AdmissionResponse {
    let mut response = AdmissionResponse::invalid(message);
    response.uid = uid.to_string();
    response.result = Status::failure(message, reason);
    response
}

async fn mutate(State(handler): State<Handler>, body: Bytes) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("the body is not JSON: {e}")),
    };
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind != META_KIND || api_version != META_API_VERSION_V1 {
        return bad_request(format!(
            "expected kind {META_KIND} apiVersion {META_API_VERSION_V1}, got kind {kind:?} apiVersion {api_version:?}"
        ));
    }
    let Some(request) = value.get("request").filter(|r| r.is_object()) else {
        return bad_request("the AdmissionReview has no request".to_string());
    };
    let uid = match request.get("uid").and_then(Value::as_str) {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => return bad_request("the AdmissionReview's request has no uid".to_string()),
    };
    let raw_object = request.get("object").filter(|o| !o.is_null()).cloned();
    let response = match serde_json::from_value::<AdmissionReview<DynamicObject>>(value) {
        Ok(review) => match review.try_into() {
            Ok(request) => admit(&handler, request, raw_object).await,
            Err(e) => refuse(&uid, &format!("warren webhook: {e}"), "InvalidRequest"),
        },
        Err(e) => {
            let message = format!("warren webhook: the admission request cannot be read: {e}");
            tracing::warn!(%uid, %message, allowed = false, "admission");
            refuse(&uid, &message, "InvalidRequest")
        }
    };
    match encode_review(response) {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(%uid, error = %e, "admission response not serialisable");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the admission response could not be serialised: {e}"),
            )
                .into_response()
        }
    }
}

/// Runs the handler, turning a panic into a refusal, and logs the outcome.
async fn admit(
    handler: &Handler,
    request: AdmissionRequest<DynamicObject>,
    raw_object: Option<Value>,
) -> AdmissionResponse {
    let uid = request.uid.clone();
    let operation = format!("{:?}", request.operation);
    let kind = request.kind.kind.clone();
    let namespace = request.namespace.clone().unwrap_or_default();
    let name = request.name.clone();
    let generate_name = request
        .object
        .as_ref()
        .and_then(|o| o.metadata.generate_name.clone())
        .unwrap_or_default();
    let dry_run = request.dry_run;
    let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(request, raw_object)))
    {
        Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
        Err(panic) => Err(panic),
    };
    let mut response = match outcome {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            let message =
                format!("warren webhook: internal error while handling the request: {what}");
            tracing::error!(%uid, %kind, %namespace, %name, %generate_name, panic = %what, "admission handler panicked");
            refuse(&uid, &message, "InternalError")
        }
    };
    response.uid = uid.clone();
    let patched = response.patch.is_some();
    let message = &response.result.message;
    tracing::info!(
        %uid, %operation, %kind, %namespace, %name, %generate_name, dry_run,
        allowed = response.allowed, patched, %message,
        "admission"
    );
    response
}

/// The v1 `AdmissionReview` JSON for a response, the patch base64-encoded.
pub fn encode_review(mut response: AdmissionResponse) -> serde_json::Result<Vec<u8>> {
    response.types = v1_types();
    let mut value = serde_json::to_value(response.into_review())?;
    if let Some(patch) = value.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(patch.take())?;
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    serde_json::to_vec(&value)
}

/// Serves the webhook over TLS on `listener` until `shutdown` completes.
///
/// Each connection runs in its own task: its TLS handshake (bounded by
/// [`HANDSHAKE_TIMEOUT`]) and HTTP/1.1 requests never hold up the accept
/// loop. At shutdown the listener is closed and handshakes in progress are
/// dropped; requests in flight are answered and their connections closed
/// on their own, after `serve` has returned.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerCerts>,
    handler: Handler,
    shutdown: impl Future,
) {
    let config = RustlsConfig::from_config(Arc::new(tls.server_config()));
    let acceptor = RustlsAcceptor::new(config).handshake_timeout(HANDSHAKE_TIMEOUT);
    let handle = Handle::new();
    let mut server = axum_server::Server::from_listener(listener)
        .acceptor(acceptor)
        .handle(handle.clone())
        .http1_only()
        .accept_error_handler(|peer: Option<&SocketAddr>, e: &std::io::Error| match peer {
            // A failed or timed-out TLS handshake.
            Some(peer) => tracing::debug!(%peer, error = %e, "webhook TLS handshake failed"),
            // Out of file descriptors and the like; the server waits, goes on.
            None => tracing::warn!(error = %e, "webhook accept failed"),
        });
    server
        .http_builder()
        .http1()
        .header_read_timeout(HEADER_TIMEOUT);
    tokio::select! {
        served = server.serve(router(handler).into_make_service()) => {
            // The listener is bound and axum's service cannot fail, so this
            // is not expected before shutdown.
            if let Err(e) = served {
                tracing::error!(error = %e, "webhook server stopped");
            }
        }
        _ = shutdown => {
            // Open connections see the graceful shutdown in their own tasks;
            // dropping the server closes the listener at once.
            handle.graceful_shutdown(None);
        }
    }
}

/// Settings of the webhook (flags of `warren-operator run`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// HTTPS listen address (`--webhook-listen`).
    pub listen: SocketAddr,
    /// Directory with `tls.crt` / `tls.key` (`--webhook-cert-dir`); none =
    /// self-managed certificates.
    pub cert_dir: Option<PathBuf>,
    /// The webhook Service's name (`--webhook-service`).
    pub service: String,
    /// The operator's namespace (`POD_NAMESPACE`).
    pub namespace: String,
    /// The MutatingWebhookConfiguration's name (`--webhook-config`).
    pub config_name: String,
    /// Validity of self-managed certificates (default 1 year).
    pub validity: Duration,
    /// Self-managed certificates are renewed with this much left (default
    /// 30 days).
    pub renew_before: Duration,
    /// How often the cert-dir is re-read, and the self-managed CA,
    /// certificate and `caBundle` checked (default 30 s).
    pub poll_interval: Duration,
}

impl WebhookSettings {
    /// Settings with the default validity, renewal margin and poll interval.
    pub fn new(
        listen: SocketAddr,
        cert_dir: Option<PathBuf>,
        service: impl Into<String>,
        namespace: impl Into<String>,
        config_name: impl Into<String>,
    ) -> WebhookSettings {
        WebhookSettings {
            listen,
            cert_dir,
            service: service.into(),
            namespace: namespace.into(),
            config_name: config_name.into(),
            validity: Duration::from_secs(365 * 24 * 3600),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            poll_interval: Duration::from_secs(30),
        }
    }
}

/// A started webhook.
#[derive(Debug)]
pub struct Webhook {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The certificate it serves.
    pub certs: Arc<ServerCerts>,
    /// The server; it runs until aborted (aborting also stops certificate
    /// renewal or reloading).
    pub task: tokio::task::JoinHandle<()>,
}

/// Gets the serving certificate (from `cert_dir`, or self-managed), binds
/// `listen` and serves `handler` there. Returns once the certificate is
/// loaded and the port bound; errors are a certificate that cannot be
/// loaded, a CA Secret that cannot be read or written, a port in use.
pub async fn start_webhook(
    settings: WebhookSettings,
    client: kube::Client,
    handler: Handler,
) -> anyhow::Result<Webhook> {
    let (certs, maintenance) = match &settings.cert_dir {
        Some(dir) => certs::start_cert_dir(dir.clone(), settings.poll_interval)?,
        None => {
            certs::start_self_managed(
                client,
                certs::SelfManaged {
                    service: settings.service.clone(),
                    namespace: settings.namespace.clone(),
                    config_name: settings.config_name.clone(),
                    validity: settings.validity,
                    renew_before: settings.renew_before,
                    check_every: settings.poll_interval,
                },
            )
            .await?
        }
    };
    let listener = match TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            maintenance.abort();
            return Err(anyhow::Error::new(e)
                .context(format!("binding the webhook listener {}", settings.listen)));
        }
    };
    let local_addr = listener.local_addr()?;
    tracing::info!(%local_addr, "admission webhook serving /mutate");
    let served = certs.clone();
    let task = tokio::spawn(async move {
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _maintenance = AbortOnDrop(maintenance);
        serve(listener, served, handler, std::future::pending::<()>()).await;
    });
    Ok(Webhook {
        local_addr,
        certs,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_is_sent_base64_encoded() {
        let request: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "userInfo": {},
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}}
        }))
        .unwrap();
        let request: AdmissionRequest<DynamicObject> = request.try_into().unwrap();
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}
        ]))
        .unwrap();
        let response = AdmissionResponse::from(&request)
            .with_patch(patch.clone())
            .unwrap();
        let json: Value = serde_json::from_slice(&encode_review(response).unwrap()).unwrap();
        assert_eq!(json["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(json["kind"], "AdmissionReview");
        assert_eq!(json["response"]["uid"], "u-1");
        assert_eq!(json["response"]["patchType"], "JSONPatch");
        let b64 = json["response"]["patch"].as_str().expect("a base64 string");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let back: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, patch);
    }

    #[test]
    fn a_response_without_patch_has_no_patch_field() {
        let json: Value =
            serde_json::from_slice(&encode_review(refuse("u-2", "no", "Forbidden")).unwrap())
                .unwrap();
        assert_eq!(json["response"]["uid"], "u-2");
        assert_eq!(json["response"]["allowed"], false);
        assert_eq!(json["response"]["status"]["message"], "no");
        assert!(json["response"].get("patch").is_none());
    }
}
