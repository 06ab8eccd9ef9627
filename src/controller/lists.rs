//! The operator API's lists and the views built on them: `GET /v1/tasks`, `/v1/machines`,
//! `/v1/scripts[/{id}]`, `/v1/pools[/{id}]`, and what every list shares: the query string
//! (unknown or repeated parameters are refused, naming them), `limit`, and the opaque
//! `cursor` of the next page (`Fieldhand-Next-Cursor`).
//!
//! A cursor is the key of the last row of a page (its time and id, or only its id for
//! machines) with the list it belongs to, hex-encoded: the next page starts strictly after
//! that key, so pages neither repeat nor skip rows while rows are added, and a cursor of
//! one list is refused by another.

use std::collections::BTreeMap;

use super::errors::{one_of, ApiError};
use super::store::{AuditRow, MachineFilter, PoolCount, TaskFilter, TaskSummaryRow};
use super::Controller;
use crate::proto::api;
use crate::proto::domain::{ErrorCode, TaskKind, TaskState};
use crate::sys::clock;

/// Rows per page when `limit` is not given, and the most a page may have.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("cursor {0:?} is not a cursor this API gave out (use Fieldhand-Next-Cursor as it is)")]
    BadCursor(String),
    #[error("cursor {cursor:?} belongs to the {found} list, not to the {wanted} list")]
    OtherList {
        cursor: String,
        found: String,
        wanted: &'static str,
    },
}

impl From<ListError> for ApiError {
    fn from(e: ListError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

/// Which list a cursor pages through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tasks,
    Machines,
    Scripts,
    Audit,
}

impl ListKind {
    fn name(self) -> &'static str {
        match self {
            ListKind::Tasks => "tasks",
            ListKind::Machines => "machines",
            ListKind::Scripts => "scripts",
            ListKind::Audit => "audit",
        }
    }
}

/// The key of the last row of a page: its time (not for machines, ordered by id alone) and
/// its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub ms: Option<i64>,
    pub id: String,
}

/// The cursor text of `key` in list `kind`.
pub fn encode_cursor(kind: ListKind, key: &Cursor) -> String {
    let ms = key.ms.map(|m| m.to_string()).unwrap_or_default();
    hex::encode(format!("1\n{}\n{ms}\n{}", kind.name(), key.id))
}

/// Reads a cursor of list `kind`; anything else (not hex, not ours, another list's) is
/// refused naming the cursor.
pub fn decode_cursor(kind: ListKind, text: &str) -> Result<Cursor, ListError> {
    let bad = || ListError::BadCursor(text.to_string());
    let raw = hex::decode(text).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = raw.splitn(4, '\n');
    let (Some("1"), Some(list), Some(ms), Some(id)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if list != kind.name() {
        return Err(ListError::OtherList {
            cursor: text.to_string(),
            found: list.to_string(),
            wanted: kind.name(),
        });
    }
    let ms = match (kind, ms) {
        (ListKind::Machines, "") => None,
        (ListKind::Machines, _) => return Err(bad()),
        (ListKind::Tasks | ListKind::Scripts | ListKind::Audit, ms) => {
            Some(ms.parse::<i64>().map_err(|_| bad())?)
        }
    };
    if id.is_empty() {
        return Err(bad());
    }
    Ok(Cursor {
        ms,
        id: id.to_string(),
    })
}

/// A page of a list: its rows, and the cursor of the next page when there are more.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// From up to `limit + 1` rows read: the extra row only tells that there are more, and
    /// the next page starts after the last row kept.
    pub fn of(mut rows: Vec<T>, limit: u32, kind: ListKind, key: impl Fn(&T) -> Cursor) -> Page<T> {
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next = more
            .then(|| rows.last().map(|r| encode_cursor(kind, &key(r))))
            .flatten();
        Page { items: rows, next }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next: self.next,
        }
    }
}

/// A request's query string, decoded: each parameter at most once, and only those the
/// route takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(BTreeMap<String, String>);

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Query {
    /// Parses `raw` (the URI's query, if any); `allowed` are the parameters the route takes;
    /// `name=` (empty) counts as absent.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Query, ApiError> {
        let mut out = BTreeMap::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
                return Err(ApiError::invalid(format!(
                    "query parameter {pair:?} is not percent-encoded UTF-8"
                )));
            };
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {k:?}; this route takes {}",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
            // An empty value is no value (what a form with a blank filter sends).
            if v.is_empty() {
                continue;
            }
            if out.insert(k.clone(), v).is_some() {
                return Err(ApiError::invalid(format!(
                    "query parameter {k:?} is given twice"
                )));
            }
        }
        Ok(Query(out))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `limit`: 1..=1000, 100 when absent.
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(ApiError::invalid(format!(
                    "limit {v:?} must be an integer 1..={MAX_LIMIT} (default {DEFAULT_LIMIT})"
                ))),
            },
        }
    }

    /// `cursor`, decoded for list `kind`.
    pub fn cursor(&self, kind: ListKind) -> Result<Option<Cursor>, ApiError> {
        Ok(self
            .get("cursor")
            .map(|c| decode_cursor(kind, c))
            .transpose()?)
    }

    /// A non-empty pool id, if given.
    fn pool_id(&self) -> Result<Option<String>, ApiError> {
        self.get("pool_id")
            .map(|p| {
                crate::pki::validate_name("pool_id", p)
                    .map(|()| p.to_string())
                    .map_err(|e| ApiError::invalid(e.to_string()))
            })
            .transpose()
    }
}

fn ms_text(ms: i64) -> String {
    clock::from_unix_ms(ms)
        .map(clock::rfc3339)
        .unwrap_or_default()
}

fn task_summary(t: TaskSummaryRow) -> api::TaskSummary {
    api::TaskSummary {
        task_id: t.task_id,
        kind: t.kind,
        pool_id: t.pool_id,
        state: t.state,
        created_at: ms_text(t.created_ms),
        finished_at: t.finished_ms.map(ms_text),
        created_by: t.created_by,
        cancelled_by: t.cancelled_by,
        machine_states: t.machine_states,
    }
}

/// `GET /v1/tasks?pool_id=&state=&kind=&created_after=&limit=&cursor=`, newest first.
pub async fn list_tasks(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<Page<api::TaskSummary>, ApiError> {
    let q = Query::parse(
        query,
        &[
            "pool_id",
            "state",
            "kind",
            "created_after",
            "limit",
            "cursor",
        ],
    )?;
    let filter = TaskFilter {
        pool_id: q.pool_id()?,
        state: q
            .get("state")
            .map(|v| one_of("state", v, TaskState::parse, TaskState::texts()))
            .transpose()?,
        kind: q
            .get("kind")
            .map(|v| one_of("kind", v, TaskKind::parse, TaskKind::texts()))
            .transpose()?,
        created_after_ms: q
            .get("created_after")
            .map(|v| {
                clock::parse_rfc3339(v).map(clock::unix_ms).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "created_after {v:?} is not an RFC 3339 time (e.g. 2026-01-31T08:00:00Z)"
                    ))
                })
            })
            .transpose()?,
    };
    let limit = q.limit()?;
    let after = q.cursor(ListKind::Tasks)?;
    let rows = ctl
        .store
        .read(move |tx| {
            let after = after.as_ref().map(|c| (c.ms.unwrap_or(0), c.id.as_str()));
            tx.task_page(&filter, after, limit + 1)
        })
        .await?;
    Ok(Page::of(rows, limit, ListKind::Tasks, |t| Cursor {
        ms: Some(t.created_ms),
        id: t.task_id.clone(),
    })
    .map(task_summary))
}

/// `GET /v1/machines?pool_id=&online=&limit=&cursor=`, by machine id. Without `limit` or
/// `cursor` every matching machine is listed, as before pages existed; with either, one
/// page is read: only as many rows as the page needs (more only while `online` filters
/// rows out).
pub async fn list_machines(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<Page<api::Machine>, ApiError> {
    let q = Query::parse(query, &["pool_id", "online", "limit", "cursor"])?;
    let filter = MachineFilter {
        pool_id: q.pool_id()?,
    };
    let online = match q.get("online") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(v) => {
            return Err(ApiError::invalid(format!(
                "online {v:?} must be true or false"
            )))
        }
    };
    let paged = q.get("limit").is_some() || q.get("cursor").is_some();
    let limit = q.limit()?;
    let after = q.cursor(ListKind::Machines)?.map(|c| c.id);
    let live = super::views::Liveness::of(ctl);
    let rows = ctl
        .store
        .read(move |tx| {
            let want = if paged {
                limit as usize + 1
            } else {
                usize::MAX
            };
            let chunk = if paged {
                (limit + 1).max(DEFAULT_LIMIT)
            } else {
                u32::MAX
            };
            let mut out = Vec::new();
            let mut from = after;
            loop {
                let rows = tx.machine_page(&filter, from.as_deref(), chunk)?;
                let exhausted = rows.len() < chunk as usize;
                from = rows.last().map(|m| m.machine_id.clone());
                for m in rows {
                    if online.is_none_or(|o| live.online(&m) == o) && out.len() < want {
                        out.push(super::views::machine_view(tx, m, &live)?);
                    }
                }
                if exhausted || out.len() >= want {
                    return Ok::<_, ApiError>(out);
                }
            }
        })
        .await?;
    if !paged {
        return Ok(Page {
            items: rows,
            next: None,
        });
    }
    Ok(Page::of(rows, limit, ListKind::Machines, |m| Cursor {
        ms: None,
        id: m.machine_id.clone(),
    }))
}

fn script_summary(s: super::store::ScriptRow) -> api::ScriptSummary {
    api::ScriptSummary {
        script_id: s.script_id,
        name: s.name,
        command_type: s.command_type,
        sha256: s.sha256,
        created_at: ms_text(s.created_ms),
    }
}

/// `GET /v1/scripts?limit=&cursor=`, newest first.
pub async fn list_scripts(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<Page<api::ScriptSummary>, ApiError> {
    let q = Query::parse(query, &["limit", "cursor"])?;
    let limit = q.limit()?;
    let after = q.cursor(ListKind::Scripts)?;
    let rows = ctl
        .store
        .read(move |tx| {
            let after = after.as_ref().map(|c| (c.ms.unwrap_or(0), c.id.as_str()));
            tx.script_page(after, limit + 1)
        })
        .await?;
    Ok(Page::of(rows, limit, ListKind::Scripts, |s| Cursor {
        ms: Some(s.created_ms),
        id: s.script_id.clone(),
    })
    .map(script_summary))
}

/// `GET /v1/scripts/{script_id}`, with its content.
pub async fn get_script(ctl: &Controller, script_id: String) -> Result<api::Script, ApiError> {
    let id = script_id.clone();
    let s = ctl
        .store
        .read(move |tx| tx.script(&id))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                ErrorCode::ScriptNotFound,
                format!("script_id {script_id:?} does not exist"),
            )
        })?;
    Ok(api::Script {
        created_at: ms_text(s.created_ms),
        script_id: s.script_id,
        name: s.name,
        command_type: s.command_type,
        sha256: s.sha256,
        content: s.content,
    })
}

/// `GET /v1/pools`: every pool with machines in service or an image operation, by id.
pub async fn list_pools(ctl: &Controller) -> Result<Vec<api::PoolSummary>, ApiError> {
    let live = super::views::Liveness::of(ctl);
    ctl.store
        .read(move |tx| {
            let mut pools: BTreeMap<String, Vec<PoolCount>> = BTreeMap::new();
            for m in tx.pool_members(None)? {
                pools.entry(m.pool_id.clone()).or_default().push(m);
            }
            for p in tx.image_pools()? {
                pools.entry(p).or_default();
            }
            let mut out = Vec::with_capacity(pools.len());
            for (pool_id, members) in pools {
                out.push(api::PoolSummary {
                    machines: members.len() as u32,
                    online: count_online(&members, &live),
                    provisioning: super::images::provisioning_in(tx, &pool_id)?,
                    pool_id,
                });
            }
            Ok(out)
        })
        .await
}

fn count_online(members: &[PoolCount], live: &super::views::Liveness) -> u32 {
    members
        .iter()
        .filter(|m| live.online_at(&m.machine_id, m.last_seen_ms))
        .count() as u32
}

/// `GET /v1/pools/{pool_id}`; 404 for a pool with neither machines nor an image operation.
pub async fn get_pool(ctl: &Controller, pool_id: String) -> Result<api::Pool, ApiError> {
    crate::pki::validate_name("pool_id", &pool_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let live = super::views::Liveness::of(ctl);
    ctl.store
        .read(move |tx| {
            let members = tx.pool_members(Some(&pool_id))?;
            if members.is_empty() && tx.pool_image(&pool_id)?.is_none() {
                return Err(ApiError::not_found(
                    ErrorCode::NotFound,
                    format!("pool_id {pool_id:?}: no machine is in it and it has no image"),
                ));
            }
            Ok(api::Pool {
                online: count_online(&members, &live),
                machines: members.into_iter().map(|m| m.machine_id).collect(),
                provisioning: super::images::provisioning_in(tx, &pool_id)?,
                pool_id,
            })
        })
        .await
}

fn audit_view(r: AuditRow) -> api::AuditRecord {
    api::AuditRecord {
        at: clock::from_unix_ms(r.at_ms)
            .map(clock::rfc3339)
            .unwrap_or_default(),
        request: serde_json::from_str(&r.request_json)
            .unwrap_or(serde_json::Value::String(r.request_json)),
        audit_id: r.audit_id,
        operator: r.operator,
        action: r.action,
        target: r.target,
    }
}

/// `GET /v1/audit?limit=&cursor=`, newest first.
pub async fn audit(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<Page<api::AuditRecord>, ApiError> {
    let q = Query::parse(query, &["limit", "cursor"])?;
    let limit = q.limit()?;
    let after = q.cursor(ListKind::Audit)?;
    let rows = ctl
        .store
        .read(move |tx| {
            let after = after.as_ref().map(|c| (c.ms.unwrap_or(0), c.id.as_str()));
            tx.audit_page(after, limit + 1)
        })
        .await?;
    Ok(Page::of(rows, limit, ListKind::Audit, |r| Cursor {
        ms: Some(r.at_ms),
        id: r.audit_id.clone(),
    })
    .map(audit_view))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_stay_in_their_list() {
        let key = Cursor {
            ms: Some(1_700_000_000_123),
            id: "6d0e0fb0-1b71".into(),
        };
        let text = encode_cursor(ListKind::Tasks, &key);
        assert_eq!(decode_cursor(ListKind::Tasks, &text), Ok(key.clone()));
        assert!(text.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
        // The same key is another text in another list, and refused there.
        let e = decode_cursor(ListKind::Audit, &text).unwrap_err();
        assert!(matches!(e, ListError::OtherList { .. }), "{e}");
        let m = Cursor {
            ms: None,
            id: "m-01".into(),
        };
        assert_eq!(
            decode_cursor(ListKind::Machines, &encode_cursor(ListKind::Machines, &m)),
            Ok(m)
        );
        // An id with the separator in it survives (the id is the rest of the text).
        let odd = Cursor {
            ms: Some(-1),
            id: "a\nb".into(),
        };
        assert_eq!(
            decode_cursor(ListKind::Audit, &encode_cursor(ListKind::Audit, &odd)),
            Ok(odd)
        );
    }

    #[test]
    fn bad_cursors_are_refused_naming_the_cursor() {
        for bad in [
            "zz",
            "",
            &hex::encode("2\ntasks\n1\nx"),
            &hex::encode("1\ntasks\nsoon\nx"),
            &hex::encode("1\ntasks\n1\n"),
            &hex::encode("1\nmachines\n5\nx"),
            &hex::encode([0xff, 0xfe]),
        ] {
            let e = decode_cursor(ListKind::Tasks, bad)
                .or_else(|_| decode_cursor(ListKind::Machines, bad))
                .err();
            let e = e.unwrap_or_else(|| panic!("{bad:?} was accepted"));
            let api: ApiError = e.into();
            assert_eq!(api.status, http::StatusCode::BAD_REQUEST);
            assert!(api.msg.starts_with("cursor "), "{}", api.msg);
        }
    }

    #[test]
    fn a_page_of_limit_plus_one_rows_has_a_next_cursor() {
        let key = |n: &i64| Cursor {
            ms: Some(*n),
            id: n.to_string(),
        };
        let p = Page::of(vec![5, 4, 3], 2, ListKind::Audit, key);
        assert_eq!(p.items, [5, 4]);
        let next = decode_cursor(ListKind::Audit, p.next.as_deref().unwrap()).unwrap();
        assert_eq!(
            next.ms,
            Some(4),
            "the next page starts after the last row shown"
        );
        let last = Page::of(vec![2, 1], 2, ListKind::Audit, key);
        assert_eq!((last.items.len(), last.next), (2, None));
    }

    #[test]
    fn queries_name_what_they_refuse() {
        let q = Query::parse(
            Some("limit=5&created_after=2026-01-01T00%3A00%3A00%2B02%3A00"),
            &["limit", "created_after"],
        )
        .unwrap();
        assert_eq!(q.get("created_after"), Some("2026-01-01T00:00:00+02:00"));
        assert_eq!(q.limit(), Ok(5));
        for (raw, word) in [
            ("limit=0", "limit \"0\""),
            ("limit=1001", "limit \"1001\""),
            ("limit=ten", "limit \"ten\""),
        ] {
            let e = Query::parse(Some(raw), &["limit"])
                .unwrap()
                .limit()
                .unwrap_err();
            assert!(e.msg.contains(word), "{}", e.msg);
        }
        assert_eq!(
            Query::parse(None, &["limit"]).unwrap().limit(),
            Ok(DEFAULT_LIMIT)
        );
        let e = Query::parse(Some("limt=5"), &["limit"]).unwrap_err();
        assert!(e.msg.contains("\"limt\""), "{}", e.msg);
        let e = Query::parse(Some("limit=5&limit=6"), &["limit"]).unwrap_err();
        assert!(e.msg.contains("twice"), "{}", e.msg);
        let e = Query::parse(Some("limit=%zz"), &["limit"]).unwrap_err();
        assert!(e.msg.contains("percent"), "{}", e.msg);
    }
}
