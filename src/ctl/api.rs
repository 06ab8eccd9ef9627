//! The operator API as `fieldhandctl` calls it. Every request is first a [`Call`] (method,
//! path with its query, JSON body), made by the pure functions below so unit tests can check
//! exactly what goes on the wire, then sent by [`Api`] over the library's HTTPS client.
//! A listing follows its `Fieldhand-Next-Cursor` header page by page; a route the controller
//! does not have (404 "no route", or 405) is reported as such, so a CLI newer than its
//! controller says "upgrade it" instead of "not found".

use std::time::Duration;

use http::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::CtlError;
use crate::net::client::HttpsClient;
use crate::net::NetError;
use crate::proto::api;
use crate::proto::ctl::{ScriptExecutionRequest, NEXT_CURSOR_HEADER};
use crate::proto::domain::{TaskKind, TaskState};

/// One request, before it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: Method,
    /// The path and query, e.g. `/v1/tasks?state=RUNNING&limit=20`.
    pub path: String,
    pub body: Option<Value>,
    /// The route as the API documents it (`GET /v1/tasks/{id}`), for messages.
    pub route: &'static str,
}

/// Percent-encodes one path segment or query value (RFC 3986 unreserved characters stay).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `path?k=v&...` with the pairs whose value is present, in the order given.
fn with_query(path: String, pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        path
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

fn call(method: Method, route: &'static str, path: String) -> Call {
    Call {
        method,
        path,
        body: None,
        route,
    }
}

fn with_body(mut c: Call, body: &impl Serialize) -> Call {
    // The proto types serialize infallibly (no maps with non-string keys).
    c.body = Some(serde_json::to_value(body).unwrap_or(Value::Null));
    c
}

/// What `tasks ls` filters on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub pool_id: Option<String>,
    pub state: Option<TaskState>,
    pub kind: Option<TaskKind>,
    /// RFC 3339.
    pub created_after: Option<String>,
}

pub fn tasks(f: &TaskFilter, limit: Option<usize>, cursor: Option<&str>) -> Call {
    let path = with_query(
        "/v1/tasks".into(),
        &[
            ("pool_id", f.pool_id.clone()),
            ("state", f.state.map(|s| s.as_str().to_string())),
            ("kind", f.kind.map(|k| k.as_str().to_string())),
            ("created_after", f.created_after.clone()),
            ("limit", limit.map(|l| l.to_string())),
            ("cursor", cursor.map(str::to_string)),
        ],
    );
    call(Method::GET, "GET /v1/tasks", path)
}

pub fn machines(
    pool: Option<&str>,
    online: Option<bool>,
    limit: Option<usize>,
    cursor: Option<&str>,
) -> Call {
    let path = with_query(
        "/v1/machines".into(),
        &[
            ("pool_id", pool.map(str::to_string)),
            ("online", online.map(|o| o.to_string())),
            ("limit", limit.map(|l| l.to_string())),
            ("cursor", cursor.map(str::to_string)),
        ],
    );
    call(Method::GET, "GET /v1/machines", path)
}

pub fn machine(id: &str) -> Call {
    let path = format!("/v1/machines/{}", encode(id));
    call(Method::GET, "GET /v1/machines/{id}", path)
}

pub fn move_machine(id: &str, pool: &str) -> Call {
    let path = format!("/v1/machines/{}/pool", encode(id));
    let body = api::MoveMachine {
        pool_id: pool.to_string(),
    };
    with_body(call(Method::PUT, "PUT /v1/machines/{id}/pool", path), &body)
}

pub fn decommission(id: &str) -> Call {
    let path = format!("/v1/machines/{}", encode(id));
    call(Method::DELETE, "DELETE /v1/machines/{id}", path)
}

pub fn pools() -> Call {
    call(Method::GET, "GET /v1/pools", "/v1/pools".into())
}

pub fn pool(id: &str) -> Call {
    let path = format!("/v1/pools/{}", encode(id));
    call(Method::GET, "GET /v1/pools/{id}", path)
}

pub fn create_script(body: &api::CreateScript) -> Call {
    with_body(
        call(Method::POST, "POST /v1/scripts", "/v1/scripts".into()),
        body,
    )
}

pub fn scripts() -> Call {
    call(Method::GET, "GET /v1/scripts", "/v1/scripts".into())
}

pub fn script(id: &str) -> Call {
    let path = format!("/v1/scripts/{}", encode(id));
    call(Method::GET, "GET /v1/scripts/{id}", path)
}

pub fn execute(pool: &str, body: &ScriptExecutionRequest) -> Call {
    let path = format!("/v1/pools/{}/script-executions", encode(pool));
    let route = "POST /v1/pools/{id}/script-executions";
    with_body(call(Method::POST, route, path), body)
}

pub fn push_image(pool: &str, body: &api::PushImage) -> Call {
    let path = format!("/v1/pools/{}/push-image", encode(pool));
    with_body(
        call(Method::POST, "POST /v1/pools/{id}/push-image", path),
        body,
    )
}

pub fn rebuild(body: &api::RebuildDesktops) -> Call {
    let path = "/v1/desktops/rebuild".to_string();
    with_body(call(Method::POST, "POST /v1/desktops/rebuild", path), body)
}

pub fn stage(host: &str, body: &api::StageSoftware) -> Call {
    let path = format!("/v1/hosts/{}/software/stage", encode(host));
    let route = "POST /v1/hosts/{id}/software/stage";
    with_body(call(Method::POST, route, path), body)
}

pub fn task(id: &str) -> Call {
    let path = format!("/v1/tasks/{}", encode(id));
    call(Method::GET, "GET /v1/tasks/{id}", path)
}

pub fn task_summary(id: &str) -> Call {
    let path = format!("/v1/tasks/{}/summary", encode(id));
    call(Method::GET, "GET /v1/tasks/{id}/summary", path)
}

pub fn cancel(id: &str) -> Call {
    let path = format!("/v1/tasks/{}/cancel", encode(id));
    call(Method::POST, "POST /v1/tasks/{id}/cancel", path)
}

pub fn retry(id: &str) -> Call {
    let path = format!("/v1/tasks/{}/retry", encode(id));
    call(Method::POST, "POST /v1/tasks/{id}/retry", path)
}

pub fn resume(id: &str) -> Call {
    let path = format!("/v1/tasks/{}/resume", encode(id));
    call(Method::POST, "POST /v1/tasks/{id}/resume", path)
}

pub fn create_token(body: &api::CreateEnrollmentToken) -> Call {
    let path = "/v1/enrollment-tokens".to_string();
    with_body(call(Method::POST, "POST /v1/enrollment-tokens", path), body)
}

pub fn tokens() -> Call {
    let path = "/v1/enrollment-tokens".to_string();
    call(Method::GET, "GET /v1/enrollment-tokens", path)
}

pub fn delete_token(id: &str) -> Call {
    let path = format!("/v1/enrollment-tokens/{}", encode(id));
    call(Method::DELETE, "DELETE /v1/enrollment-tokens/{id}", path)
}

/// Whether an error answer means the controller has no such route (rather than no such
/// task or machine): the router's 404 says "no route for", and a known path with another
/// method is a 405.
pub fn is_missing_route(e: &NetError) -> bool {
    match e {
        NetError::Status {
            status, error_msg, ..
        } => *status == 405 || (*status == 404 && error_msg.starts_with("no route for")),
        NetError::BadUrl { .. }
        | NetError::Connect { .. }
        | NetError::Tls { .. }
        | NetError::Http { .. }
        | NetError::Timeout { .. }
        | NetError::Busy { .. }
        | NetError::Decode { .. }
        | NetError::Encode { .. } => false,
    }
}

/// The HTTPS client, with the time one request may take.
#[derive(Debug, Clone)]
pub struct Api {
    http: HttpsClient,
    timeout: Duration,
}

impl Api {
    pub fn new(http: HttpsClient, timeout: Duration) -> Self {
        Api { http, timeout }
    }

    /// Sends one call: the answer as JSON, and the next page's cursor if the answer has one.
    pub async fn send(&self, c: &Call) -> Result<(Value, Option<String>), CtlError> {
        let res = self
            .http
            .json_with_headers::<Value, Value>(
                c.method.clone(),
                &c.path,
                c.body.as_ref(),
                self.timeout,
            )
            .await;
        match res {
            Ok((v, head)) => {
                let cursor = head
                    .get(NEXT_CURSOR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string);
                Ok((v, cursor))
            }
            Err(e) if is_missing_route(&e) => Err(CtlError::MissingRoute {
                route: c.route,
                error: e,
            }),
            Err(e) => Err(CtlError::Api(e)),
        }
    }

    /// One call, decoded into `T`; also the JSON as the controller sent it (for `--output
    /// json`, which shows fields this CLI does not know).
    pub async fn get<T: DeserializeOwned>(&self, c: &Call) -> Result<(T, Value), CtlError> {
        let (v, _) = self.send(c).await?;
        Ok((decode(c, &v)?, v))
    }

    /// Every row of a listing, page by page, up to `limit` rows.
    pub async fn list(
        &self,
        page: impl Fn(Option<&str>) -> Call,
        limit: Option<usize>,
    ) -> Result<(Vec<Value>, Call), CtlError> {
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let c = page(cursor.as_deref());
            let (v, next) = self.send(&c).await?;
            let Value::Array(items) = v else {
                return Err(CtlError::Decode {
                    route: c.route,
                    reason: "expected a JSON array".into(),
                });
            };
            rows.extend(items);
            if let Some(l) = limit {
                if rows.len() >= l {
                    rows.truncate(l);
                    return Ok((rows, c));
                }
            }
            match next {
                // A controller that repeats a cursor would loop forever.
                Some(n) if cursor.as_deref() != Some(n.as_str()) => cursor = Some(n),
                Some(_) | None => return Ok((rows, c)),
            }
        }
    }
}

pub fn decode<T: DeserializeOwned>(c: &Call, v: &Value) -> Result<T, CtlError> {
    T::deserialize(v).map_err(|e| CtlError::Decode {
        route: c.route,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ctl::Amount;
    use crate::proto::domain::PostFinish;
    use serde_json::json;

    #[test]
    fn listing_queries_carry_only_the_filters_given() {
        let f = TaskFilter {
            pool_id: Some("desk tops".into()),
            state: Some(TaskState::Running),
            kind: Some(TaskKind::ImageApply),
            created_after: Some("2026-01-01T00:00:00+01:00".into()),
        };
        let c = tasks(&f, Some(20), Some("abc="));
        assert_eq!(c.method, Method::GET);
        assert_eq!(
            c.path,
            "/v1/tasks?pool_id=desk%20tops&state=RUNNING&kind=image_apply&created_after=2026-01-01T00%3A00%3A00%2B01%3A00&limit=20&cursor=abc%3D"
        );
        assert_eq!(tasks(&TaskFilter::default(), None, None).path, "/v1/tasks");
        assert_eq!(
            machines(Some("p"), Some(false), Some(5), None).path,
            "/v1/machines?pool_id=p&online=false&limit=5"
        );
        assert_eq!(
            machines(None, None, None, Some("c")).path,
            "/v1/machines?cursor=c"
        );
    }

    #[test]
    fn new_routes_are_called_as_documented() {
        assert_eq!(
            (pools().method, pools().path),
            (Method::GET, "/v1/pools".into())
        );
        assert_eq!(pool("p1").path, "/v1/pools/p1");
        assert_eq!(scripts().path, "/v1/scripts");
        assert_eq!(script("s/1").path, "/v1/scripts/s%2F1");
        let r = retry("t1");
        assert_eq!(
            (r.method, r.path, r.body),
            (Method::POST, "/v1/tasks/t1/retry".into(), None)
        );
        assert_eq!(resume("t1").path, "/v1/tasks/t1/resume");
        assert_eq!(resume("t1").method, Method::POST);
    }

    #[test]
    fn bodies_are_the_api_json() {
        let req = ScriptExecutionRequest {
            command_content: Some("systemctl restart foo".into()),
            command_type: Some("sh".into()),
            gray_count: Some(Amount::Percent(10)),
            max_errors: Some(Amount::Count(2)),
            post_finish: Some(PostFinish::Reboot),
            ..Default::default()
        };
        let c = execute("desktops", &req);
        assert_eq!(c.path, "/v1/pools/desktops/script-executions");
        assert_eq!(
            c.body,
            Some(
                json!({"command_content": "systemctl restart foo", "command_type": "sh",
                        "gray_count": "10%", "max_errors": 2, "post_finish": "reboot"})
            )
        );
        let m = move_machine("m1", "p2");
        assert_eq!(
            (m.method, m.body),
            (Method::PUT, Some(json!({"pool_id": "p2"})))
        );
    }

    #[test]
    fn only_a_missing_route_reads_as_one() {
        let status = |status, msg: &str| NetError::Status {
            url: "u".into(),
            status,
            error_code: "NOT_FOUND".into(),
            error_msg: msg.into(),
        };
        assert!(is_missing_route(&status(404, "no route for GET /v1/tasks")));
        assert!(is_missing_route(&status(
            405,
            "GET is not allowed on /v1/scripts"
        )));
        assert!(!is_missing_route(&status(
            404,
            "task_id \"x\" does not exist"
        )));
        assert!(!is_missing_route(&status(400, "no route for")));
    }
}
