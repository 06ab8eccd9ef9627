//! The router: every request's path to its handler, after the checks that hold for all of
//! them (no certificate: enrollment only; a revoked serial; the role's API; the agent's
//! session), with the route table that 405 answers are made from.

use std::future::Future;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::errors::ApiError;
use super::lists::Page;
use super::{
    agent_api, api, audit, blobs, errors, identity, images, lists, rebuild, rerun, revoked_error,
    settings, software, views, Controller, BODY_LIMIT,
};
use crate::net::server::{error_response, json_response, read_body, Handler, Peer};
use crate::net::Body;
use crate::pki::Role;
use crate::proto::domain::{AuditAction, ErrorCode};
use crate::sys::clock;

/// While transactions wait this long for the database, agent requests are shed; below it,
/// every request waits its turn (a burst the database clears in a second is not overload).
const SHED_LAG: std::time::Duration = std::time::Duration::from_millis(1500);
/// What a shed agent is told to wait.
const SHED_RETRY_AFTER_SECONDS: u64 = 2;

impl Controller {
    async fn route(&self, req: Request<Incoming>, peer: Peer) -> Result<Response<Body>, ApiError> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let Some(cert) = peer.cert.clone() else {
            // No client certificate: enrollment is the only thing such a client can do.
            if method == Method::POST && segs == ["agent", "v1", "enroll"] {
                let body = read_body(req.into_body(), 64 * 1024).await.map_err(|e| {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        ErrorCode::RequestTooLarge,
                        e.to_string(),
                    )
                })?;
                let enrolled = identity::enroll(self, &body).await?;
                return Ok(json_response(StatusCode::OK, &enrolled));
            }
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::CertificateRequired,
                format!("{method} {path} needs a client certificate; without one only POST /agent/v1/enroll is served"),
            ));
        };
        if self.revoked.contains(&cert.serial) {
            return Err(revoked_error());
        }
        let Some(peer) = cert.identity.clone() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "the client certificate carries no urn:fieldhand identity",
            ));
        };
        if segs == ["metrics"] {
            return match (peer.role, &method) {
                (Role::Operator | Role::Metrics, &Method::GET) => {
                    let text = super::metrics::render(self).await?;
                    Ok(Response::builder()
                        .status(StatusCode::OK)
                        .header(
                            http::header::CONTENT_TYPE,
                            crate::metrics_text::CONTENT_TYPE,
                        )
                        .body(crate::net::full(text.into_bytes()))
                        .unwrap_or_else(|_| empty(StatusCode::INTERNAL_SERVER_ERROR)))
                }
                (Role::Operator | Role::Metrics, _) => Err(no_route(&method, &path, &segs)),
                (Role::Agent, _) => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    format!("{peer} may not read /metrics: operator and metrics certificates may"),
                )),
            };
        }
        let area = match segs.first() {
            Some(&"agent") => Role::Agent,
            Some(&"v1") | Some(&"ui") => Role::Operator,
            _ => {
                return Err(ApiError::not_found(
                    ErrorCode::NotFound,
                    format!("no route for {path}"),
                ))
            }
        };
        if peer.role != area {
            let allowed = match peer.role {
                Role::Agent => "agent certificates may only use the agent protocol (/agent/v1)",
                Role::Operator => {
                    "operator certificates may only use the operator API (/v1), its page (/ui/) \
                     and /metrics"
                }
                Role::Metrics => "metrics certificates may only GET /metrics",
            };
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("{peer} may not call {path}: {allowed}"),
            ));
        }
        if area == Role::Agent && self.store.queue_lag() > SHED_LAG {
            // Overload slows agents down instead of queueing requests that outlive their
            // timeouts: they come back after Retry-After (operators are never shed).
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ControllerBusy,
                format!(
                    "the controller is busy (its database queue is {} ms behind, {} \
                     transactions); retry after {} s",
                    self.store.queue_lag().as_millis(),
                    self.store.queue_depth(),
                    SHED_RETRY_AFTER_SECONDS
                ),
            ));
        }
        let call = match area {
            Role::Agent => {
                let header = req
                    .headers()
                    .get(crate::proto::agent::SESSION_HEADER)
                    .map(|v| v.to_str().unwrap_or("\u{fffd}"));
                Some(identity::AgentCall {
                    machine_id: peer.name.clone(),
                    cert: cert.clone(),
                    session: identity::Session::from_header(header)?,
                })
            }
            Role::Operator | Role::Metrics => None,
        };
        let ok = |v: &dyn erased::Json| Ok(v.respond(StatusCode::OK));
        if segs[0] == "ui" {
            return super::ui::respond(&method, &segs[1..])
                .ok_or_else(|| no_route(&method, &path, &segs));
        }
        // Payload routes stream their bodies instead of buffering them.
        match (area, &method, &segs[1..]) {
            (Role::Operator, &Method::POST, ["blobs"]) => {
                let declared = req
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                let blob = self
                    .blobs
                    .upload(req.into_body(), declared, self.cfg.body_timeout)
                    .await?;
                tracing::info!(sha256 = %blob.sha256, size = blob.size, by = %peer, "blob stored");
                audit::record_alone(
                    self,
                    &peer,
                    AuditAction::BlobUpload,
                    blob.sha256.clone(),
                    blob.clone(),
                )
                .await?;
                return ok(&blob);
            }
            (Role::Agent, &Method::GET, ["v1", "blobs", sha]) => {
                // An agent sees only its own work: a blob is served only while one of its
                // in-flight assignments references it.
                let (blob, quiet, now) = (
                    sha.to_string(),
                    self.cfg.identity_conflict_quiet,
                    clock::unix_ms(clock::now()),
                );
                let c = call.clone().expect("agent area has a call");
                let allowed = blobs::valid_sha256(sha)
                    && self
                        .store
                        .tx(move |tx| {
                            identity::gate(tx, &c, None, now, quiet)?;
                            Ok::<_, ApiError>(tx.assigned_blob(&c.machine_id, &blob)?)
                        })
                        .await?;
                if !allowed {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::Forbidden,
                        format!("{peer} has no assignment in flight that uses blob {sha}"),
                    ));
                }
                return self.blobs.download(sha, req.headers());
            }
            (Role::Operator, &Method::GET, ["blobs", sha]) => return ok(&self.blobs.info(sha)?),
            (Role::Operator, &Method::DELETE, ["blobs", sha]) => {
                return ok(&self.delete_blob(sha, &peer).await?)
            }
            _ => {}
        }
        let body = if matches!(method, Method::POST | Method::PUT) {
            let read = read_body(req.into_body(), BODY_LIMIT);
            tokio::time::timeout(self.cfg.body_timeout, read)
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        ErrorCode::RequestTimeout,
                        format!(
                            "the request body did not arrive within {} s (request_body_timeout_seconds)",
                            self.cfg.body_timeout.as_secs()
                        ),
                    )
                })?
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        ErrorCode::RequestTooLarge,
                        e.to_string(),
                    )
                })?
        } else {
            bytes::Bytes::new()
        };
        if let Some(call) = call {
            return match (&method, &segs[1..]) {
                (&Method::POST, ["v1", "heartbeat"]) => {
                    agent_api::heartbeat(self, call, &body).await?;
                    Ok(empty(StatusCode::NO_CONTENT))
                }
                (&Method::POST, ["v1", "poll"]) => ok(&agent_api::poll(self, call, &body).await?),
                (&Method::POST, ["v1", "events"]) => {
                    ok(&agent_api::events(self, call, &body).await?)
                }
                (&Method::GET, ["v1", "assignments", id]) => {
                    ok(&agent_api::get_assignment(self, call, id.to_string()).await?)
                }
                (&Method::POST, ["v1", "renew"]) => ok(&identity::renew(self, call, &body).await?),
                _ => Err(no_route(&method, &path, &segs)),
            };
        }
        match (area, &method, &segs[1..]) {
            (Role::Operator, &Method::POST, ["enrollment-tokens"]) => {
                ok(&identity::create_token(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["enrollment-tokens"]) => {
                ok(&identity::list_tokens(self).await?)
            }
            (Role::Operator, &Method::DELETE, ["enrollment-tokens", id]) => {
                ok(&identity::delete_token(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::PUT, ["machines", id, "pool"]) => {
                identity::move_machine(self, &peer, id.to_string(), errors::parse_json(&body)?)
                    .await?;
                ok(&views::get_machine(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::DELETE, ["machines", id]) => {
                ok(&identity::decommission(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["revocations"]) => {
                ok(&identity::revoke(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["revocations"]) => {
                ok(&identity::list_revocations(self).await?)
            }
            (Role::Operator, &Method::POST, ["scripts"]) => {
                ok(&api::create_script(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["scripts"]) => {
                page(lists::list_scripts(self, query.as_deref()).await?)
            }
            (Role::Operator, &Method::GET, ["scripts", id]) => {
                ok(&lists::get_script(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["pools", pool, "script-executions"]) => ok(
                &api::create_execution(self, &peer, pool.to_string(), errors::parse_json(&body)?)
                    .await?,
            ),
            (Role::Operator, &Method::GET, ["tasks"]) => {
                page(lists::list_tasks(self, query.as_deref()).await?)
            }
            (Role::Operator, &Method::GET, ["tasks", id]) => {
                ok(&views::get_task(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["tasks", id, "summary"]) => {
                ok(&views::task_summary(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["tasks", id, "machines"]) => {
                let q = views::page_query(query.as_deref())?;
                ok(&views::task_machines_page(self, id.to_string(), q).await?)
            }
            (Role::Operator, &Method::POST, ["tasks", id, "cancel"]) => {
                ok(&api::cancel_task(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["machines"]) => {
                page(lists::list_machines(self, query.as_deref()).await?)
            }
            (Role::Operator, &Method::GET, ["pools"]) => ok(&lists::list_pools(self).await?),
            (Role::Operator, &Method::GET, ["pools", pool]) => {
                ok(&lists::get_pool(self, pool.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["audit"]) => {
                page(lists::audit(self, query.as_deref()).await?)
            }
            (Role::Operator, &Method::POST, ["tasks", id, "retry"]) => {
                ok(&rerun::retry(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["tasks", id, "resume"]) => {
                ok(&rerun::resume(self, &peer, id.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["pools", pool, "power-limit"]) => {
                ok(&settings::get_power_limit(self, pool.to_string()).await?)
            }
            (Role::Operator, &Method::PUT, ["pools", pool, "power-limit"]) => ok(
                &settings::put_power_limit(self, pool.to_string(), errors::parse_json(&body)?)
                    .await?,
            ),
            (Role::Operator, &Method::GET, ["settings"]) => {
                ok(&settings::get_settings(self).await?)
            }
            (Role::Operator, &Method::GET, ["openapi.json"]) => ok(&super::openapi::document()),
            (Role::Operator, &Method::POST, ["images"]) => {
                ok(&images::create_image(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["images"]) => ok(&images::list_images(self).await?),
            (Role::Operator, &Method::POST, ["pools", pool, "push-image"]) => {
                ok(
                    &images::push(self, &peer, pool.to_string(), errors::parse_json(&body)?)
                        .await?,
                )
            }
            (Role::Operator, &Method::POST, ["pools", pool, "push-image", "cancel"]) => {
                ok(&images::cancel_push(self, &peer, pool.to_string()).await?)
            }
            (Role::Operator, &Method::GET, ["pools", pool, "provisioning-status"]) => {
                ok(&images::provisioning_status(self, pool.to_string()).await?)
            }
            (Role::Operator, &Method::DELETE, ["pools", pool, "image"]) => {
                ok(&images::unpublish(self, &peer, pool.to_string()).await?)
            }
            (Role::Operator, &Method::POST, ["desktops", "rebuild"]) => {
                ok(&rebuild::rebuild(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::GET, ["machines", id]) => {
                ok(&views::get_machine(self, id.to_string()).await?)
            }
            (Role::Operator, &Method::PUT, ["settings"]) => {
                ok(&settings::put_settings(self, &peer, errors::parse_json(&body)?).await?)
            }
            (Role::Operator, &Method::PUT, ["hosts", id, "software", "desired"]) => ok(
                &software::put_desired(self, &peer, id.to_string(), errors::parse_json(&body)?)
                    .await?,
            ),
            (Role::Operator, &Method::POST, ["hosts", id, "software", "stage"]) => {
                let req = if body.iter().all(u8::is_ascii_whitespace) {
                    Default::default()
                } else {
                    errors::parse_json(&body)?
                };
                ok(&software::stage(self, &peer, id.to_string(), req).await?)
            }
            (Role::Operator, &Method::GET, ["hosts", id, "software"]) => {
                ok(&software::host_software(self, id.to_string()).await?)
            }
            _ => Err(no_route(&method, &path, &segs)),
        }
    }
}

/// Every route, as `(method, path pattern)` (`*`: one segment of any value): what a known
/// path with the wrong method is told it allows. Keep it in step with `Controller::route`
/// (`tests/it/validation.rs` checks every operator route against it).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "agent/v1/enroll"),
    ("POST", "agent/v1/heartbeat"),
    ("POST", "agent/v1/poll"),
    ("POST", "agent/v1/events"),
    ("POST", "agent/v1/renew"),
    ("GET", "agent/v1/assignments/*"),
    ("GET", "agent/v1/blobs/*"),
    ("POST", "v1/blobs"),
    ("GET", "v1/blobs/*"),
    ("DELETE", "v1/blobs/*"),
    ("POST", "v1/scripts"),
    ("GET", "v1/scripts"),
    ("GET", "v1/scripts/*"),
    ("POST", "v1/pools/*/script-executions"),
    ("GET", "v1/tasks"),
    ("GET", "v1/tasks/*"),
    ("GET", "v1/tasks/*/summary"),
    ("GET", "v1/tasks/*/machines"),
    ("POST", "v1/tasks/*/cancel"),
    ("POST", "v1/tasks/*/retry"),
    ("POST", "v1/tasks/*/resume"),
    ("GET", "v1/pools/*/power-limit"),
    ("PUT", "v1/pools/*/power-limit"),
    ("GET", "v1/machines"),
    ("GET", "v1/machines/*"),
    ("DELETE", "v1/machines/*"),
    ("PUT", "v1/machines/*/pool"),
    ("GET", "v1/settings"),
    ("PUT", "v1/settings"),
    ("POST", "v1/images"),
    ("GET", "v1/images"),
    ("POST", "v1/pools/*/push-image"),
    ("POST", "v1/pools/*/push-image/cancel"),
    ("GET", "v1/pools"),
    ("GET", "v1/pools/*"),
    ("GET", "v1/pools/*/provisioning-status"),
    ("DELETE", "v1/pools/*/image"),
    ("POST", "v1/desktops/rebuild"),
    ("PUT", "v1/hosts/*/software/desired"),
    ("POST", "v1/hosts/*/software/stage"),
    ("GET", "v1/hosts/*/software"),
    ("POST", "v1/enrollment-tokens"),
    ("GET", "v1/enrollment-tokens"),
    ("DELETE", "v1/enrollment-tokens/*"),
    ("POST", "v1/revocations"),
    ("GET", "v1/revocations"),
    ("GET", "v1/audit"),
    ("GET", "v1/openapi.json"),
    ("GET", "metrics"),
    // The rollout page (`controller::ui`): not part of the documented API.
    ("GET", "ui"),
    ("GET", "ui/index.html"),
    ("GET", "ui/app.js"),
    ("GET", "ui/app.css"),
];

/// The route a request took, as its pattern in [`ROUTES`] (`v1/tasks/*`): the label of its
/// metrics, so ids never become label values.
fn route_label(method: &Method, path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    ROUTES
        .iter()
        .find(|(m, pattern)| {
            let p: Vec<&str> = pattern.split('/').collect();
            *m == method.as_str()
                && p.len() == segs.len()
                && p.iter().zip(&segs).all(|(a, b)| *a == "*" || a == b)
        })
        .map(|(_, p)| *p)
        .unwrap_or("unmatched")
}

/// 405 with the methods the path allows, or 404 for a path no route has.
fn no_route(method: &Method, path: &str, segs: &[&str]) -> ApiError {
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, pattern)| {
            let p: Vec<&str> = pattern.split('/').collect();
            p.len() == segs.len() && p.iter().zip(segs).all(|(a, b)| *a == "*" || a == b)
        })
        .map(|(m, _)| *m)
        .collect();
    if allowed.is_empty() {
        return ApiError::not_found(ErrorCode::NotFound, format!("no route for {method} {path}"));
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!(
            "{method} is not allowed on {path}; allowed: {}",
            allowed.join(", ")
        ),
    )
}

/// Lets `route` answer any wire type with one helper without boxing at every call site.
mod erased {
    use super::*;
    pub trait Json {
        fn respond(&self, status: StatusCode) -> Response<Body>;
    }
    impl<T: serde::Serialize> Json for T {
        fn respond(&self, status: StatusCode) -> Response<Body> {
            json_response(status, self)
        }
    }
}

/// A page of a list: a JSON array, and `Fieldhand-Next-Cursor` when there are more rows.
fn page<T: serde::Serialize>(p: Page<T>) -> Result<Response<Body>, ApiError> {
    let mut r = json_response(StatusCode::OK, &p.items);
    if let Some(next) = p.next {
        // A cursor is hex: always a valid header value.
        let v = http::HeaderValue::from_str(&next).map_err(ApiError::internal)?;
        r.headers_mut()
            .insert(crate::proto::api::NEXT_CURSOR_HEADER, v);
    }
    Ok(r)
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(crate::net::full(bytes::Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The router as seen by the HTTPS server.
pub struct Router(pub(super) Arc<Controller>);

impl Handler for Router {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Body>> + Send {
        let ctl = self.0.clone();
        async move {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let began = std::time::Instant::now();
            let response = match ctl.route(req, peer).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%method, %path, status = %e.status, code = %e.code, msg = %e.msg, "request refused");
                    let allow = (e.status == StatusCode::METHOD_NOT_ALLOWED)
                        .then(|| e.msg.rsplit_once("allowed: ").map(|(_, a)| a.to_string()))
                        .flatten();
                    let mut r = error_response(e.status, e.code, e.msg);
                    if let Some(v) = allow.and_then(|a| http::HeaderValue::from_str(&a).ok()) {
                        r.headers_mut().insert(http::header::ALLOW, v);
                    }
                    if e.code == ErrorCode::ControllerBusy {
                        r.headers_mut().insert(
                            http::header::RETRY_AFTER,
                            http::HeaderValue::from(SHED_RETRY_AFTER_SECONDS),
                        );
                    }
                    if e.status == StatusCode::TOO_MANY_REQUESTS {
                        r.headers_mut().insert(
                            http::header::RETRY_AFTER,
                            http::HeaderValue::from_static("1"),
                        );
                    }
                    r
                }
            };
            ctl.metrics.request(
                route_label(&method, &path),
                method.as_str(),
                response.status().as_u16(),
                began.elapsed(),
            );
            response
        }
    }
}
