//! The fleet commands: machines (list, show, move to a pool, decommission), pools (list,
//! show with members and seed 001's provisioning status) and enrollment tokens.

use serde_json::Value;

use super::api::{self, decode, Api};
use super::table::{self, cut, keep, opt, WIDTH};
use super::{CtlError, Out};
use crate::exit::Exit;
use crate::proto::api::{
    CreateEnrollmentToken, Decommissioned, EnrollmentToken, EnrollmentTokenCreated, Machine,
};
use crate::proto::ctl::{PoolDetail, PoolProvisioning, PoolSummary};

/// Rows asked for per page of a listing.
pub const PAGE: usize = 500;

/// Whether a machine passes `machines ls`'s filters. The controller filters too; this keeps
/// the answer right from a controller that ignores the query (before 0.2).
pub fn machine_matches(m: &Machine, pool: Option<&str>, online: Option<bool>) -> bool {
    let pool_ok = match pool {
        Some(p) => m.pool_id.as_deref() == Some(p),
        None => true,
    };
    pool_ok && online.is_none_or(|o| m.online == o)
}

pub fn machines_table(ms: &[Machine]) -> String {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            vec![
                m.machine_id.clone(),
                opt(m.pool_id.as_deref()),
                if m.online { "yes" } else { "no" }.into(),
                m.last_seen.clone(),
                m.agent_version.clone(),
                opt(m.image.as_ref().and_then(|i| i.current_image_id.as_deref())),
            ]
        })
        .collect();
    let cols = [
        keep("MACHINE"),
        cut("POOL"),
        keep("ONLINE"),
        cut("LAST SEEN"),
        cut("AGENT"),
        cut("IMAGE"),
    ];
    table::render(&cols, &rows, WIDTH)
}

pub async fn machines_ls(
    api: &Api,
    pool: Option<String>,
    online: Option<bool>,
    out: Out,
) -> Result<Exit, CtlError> {
    let (rows, call) = api
        .list(
            |cursor| api::machines(pool.as_deref(), online, Some(PAGE), cursor),
            None,
        )
        .await?;
    let mut raw = Vec::new();
    let mut ms = Vec::new();
    for v in rows {
        let m: Machine = decode(&call, &v)?;
        if machine_matches(&m, pool.as_deref(), online) {
            raw.push(v);
            ms.push(m);
        }
    }
    out.either(&Value::Array(raw), || machines_table(&ms))?;
    Ok(Exit::Ok)
}

pub fn machine_text(m: &Machine) -> String {
    let mut items = vec![
        ("machine", m.machine_id.clone()),
        ("pool", opt(m.pool_id.as_deref())),
        ("online", m.online.to_string()),
        ("last seen", m.last_seen.clone()),
        ("agent", m.agent_version.clone()),
    ];
    if let Some(f) = &m.facts {
        items.push(("hostname", f.hostname.clone()));
        items.push(("os", format!("{} ({})", f.os, f.kernel)));
        items.push(("gpu", f.gpu.to_string()));
    }
    items.push(("certificate", opt(m.certificate_serial.as_deref())));
    items.push(("valid until", opt(m.certificate_not_after.as_deref())));
    if m.identity_conflict {
        items.push((
            "identity",
            "CONFLICT: two live agents use this identity".into(),
        ));
    }
    if let Some(i) = &m.image {
        items.push((
            "current image",
            format!(
                "{} {}",
                opt(i.current_image_id.as_deref()),
                opt(i.current_image_state)
            ),
        ));
        if i.pending_image_id.is_some() {
            items.push((
                "pending image",
                format!(
                    "{} {} {}%",
                    opt(i.pending_image_id.as_deref()),
                    opt(i.pending_image_state),
                    opt(i.pending_image_progress)
                ),
            ));
        }
    }
    table::pairs(&items, WIDTH)
}

pub async fn machines_show(api: &Api, id: &str, out: Out) -> Result<Exit, CtlError> {
    let (m, raw) = api.get::<Machine>(&api::machine(id)).await?;
    out.either(&raw, || machine_text(&m))?;
    Ok(Exit::Ok)
}

pub async fn machines_move(api: &Api, id: &str, pool: &str, out: Out) -> Result<Exit, CtlError> {
    let (m, raw) = api.get::<Machine>(&api::move_machine(id, pool)).await?;
    out.either(&raw, || {
        format!(
            "moved {} to pool {}\n{}",
            m.machine_id,
            opt(m.pool_id.as_deref()),
            machine_text(&m)
        )
    })?;
    Ok(Exit::Ok)
}

pub async fn decommission(api: &Api, id: &str, out: Out) -> Result<Exit, CtlError> {
    let (d, raw) = api.get::<Decommissioned>(&api::decommission(id)).await?;
    out.either(&raw, || {
        format!(
            "decommissioned {}: certificate {} revoked, {} unfinished assignments cancelled\n",
            d.machine_id,
            opt(d.revoked_serial.as_deref()),
            d.cancelled_assignments
        )
    })?;
    Ok(Exit::Ok)
}

/// `OPERATION current→pending`, for a pool row.
fn provisioning_cell(p: Option<&PoolProvisioning>) -> (String, String, String) {
    let Some(p) = p else {
        return ("-".into(), "-".into(), "-".into());
    };
    let current = match (&p.current_image_id, p.current_image_state) {
        (Some(id), Some(s)) => format!("{id} {s}"),
        (Some(id), None) => id.clone(),
        (None, _) => "-".into(),
    };
    let pending = match (&p.pending_image_id, p.pending_image_state) {
        (Some(id), Some(s)) => format!("{id} {s}"),
        (Some(id), None) => id.clone(),
        (None, _) => "-".into(),
    };
    (opt(p.operation), current, pending)
}

pub fn pools_table(ps: &[PoolSummary]) -> String {
    let rows: Vec<Vec<String>> = ps
        .iter()
        .map(|p| {
            let (op, current, pending) = provisioning_cell(p.provisioning.as_ref());
            vec![
                p.pool_id.clone(),
                p.machines.to_string(),
                p.online.to_string(),
                op,
                current,
                pending,
            ]
        })
        .collect();
    let cols = [
        keep("POOL"),
        keep("MACHINES"),
        keep("ONLINE"),
        cut("OPERATION"),
        cut("CURRENT IMAGE"),
        cut("PENDING IMAGE"),
    ];
    table::render(&cols, &rows, WIDTH)
}

pub async fn pools_ls(api: &Api, out: Out) -> Result<Exit, CtlError> {
    let (ps, raw) = api.get::<Vec<PoolSummary>>(&api::pools()).await?;
    out.either(&raw, || pools_table(&ps))?;
    Ok(Exit::Ok)
}

pub fn pool_text(p: &PoolDetail) -> String {
    let mut items = vec![
        ("pool", p.pool_id.clone()),
        ("machines", p.machines.len().to_string()),
        ("online", p.online.to_string()),
    ];
    let prov = p.provisioning.clone().unwrap_or_default();
    let (op, current, pending) = provisioning_cell(Some(&prov));
    items.push(("operation", op));
    items.push(("current image", current));
    items.push(("pending image", pending));
    if let Some(pr) = prov.pending_image_progress {
        items.push(("staged", format!("{pr}%")));
    }
    if let Some(t) = prov.start_time {
        items.push(("start time", format!("{t} (epoch ms)")));
    }
    if let Some(t) = &prov.task_id {
        items.push(("task", t.clone()));
    }
    let mut s = table::pairs(&items, WIDTH);
    s.push_str("members:\n");
    for m in &p.machines {
        s.push_str(&format!("  {m}\n"));
    }
    s
}

pub async fn pools_show(api: &Api, id: &str, out: Out) -> Result<Exit, CtlError> {
    let (p, raw) = api.get::<PoolDetail>(&api::pool(id)).await?;
    out.either(&raw, || pool_text(&p))?;
    Ok(Exit::Ok)
}

pub async fn token_create(
    api: &Api,
    req: &CreateEnrollmentToken,
    out: Out,
) -> Result<Exit, CtlError> {
    let (t, raw) = api
        .get::<EnrollmentTokenCreated>(&api::create_token(req))
        .await?;
    out.either(&raw, || {
        // The token alone on its last line, for `| tail -1 > enrollment-token`.
        format!(
            "token {} for pool {} ({} uses, expires {}); the secret is shown only now:\n{}\n",
            t.token_id,
            t.pool_id,
            t.uses_left
                .map_or_else(|| "unlimited".to_string(), |u| u.to_string()),
            t.expires_at,
            t.token
        )
    })?;
    Ok(Exit::Ok)
}

pub fn tokens_table(ts: &[EnrollmentToken]) -> String {
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                t.token_id.clone(),
                t.pool_id.clone(),
                t.uses_left
                    .map_or_else(|| "any".to_string(), |u| u.to_string()),
                t.expires_at.clone(),
                t.created_by.clone(),
            ]
        })
        .collect();
    let cols = [
        keep("TOKEN"),
        cut("POOL"),
        keep("USES LEFT"),
        cut("EXPIRES"),
        cut("CREATED BY"),
    ];
    table::render(&cols, &rows, WIDTH)
}

pub async fn token_ls(api: &Api, out: Out) -> Result<Exit, CtlError> {
    let (ts, raw) = api.get::<Vec<EnrollmentToken>>(&api::tokens()).await?;
    out.either(&raw, || tokens_table(&ts))?;
    Ok(Exit::Ok)
}

pub async fn token_rm(api: &Api, id: &str, out: Out) -> Result<Exit, CtlError> {
    let (t, raw) = api.get::<EnrollmentToken>(&api::delete_token(id)).await?;
    out.either(&raw, || {
        format!("deleted token {} (pool {})\n", t.token_id, t.pool_id)
    })?;
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn machine(id: &str, pool: Option<&str>, online: bool) -> Machine {
        serde_json::from_value(json!({
            "machine_id": id, "pool_id": pool, "online": online,
            "last_seen": "2026-12-01T10:22:33.123456Z", "agent_version": "0.1.0",
            "facts": null, "image": {"current_image_id": "img-with-a-rather-long-name-0001",
            "current_image_state": "READY", "pending_image_id": null,
            "pending_image_state": null, "pending_image_progress": null}
        }))
        .unwrap()
    }

    #[test]
    fn machine_filters_apply_on_the_client_too() {
        let m = machine("m1", Some("p"), true);
        assert!(machine_matches(&m, Some("p"), Some(true)));
        assert!(machine_matches(&m, None, None));
        assert!(!machine_matches(&m, Some("q"), None));
        assert!(!machine_matches(&m, None, Some(false)));
        assert!(!machine_matches(
            &machine("m2", None, true),
            Some("p"),
            None
        ));
    }

    #[test]
    fn tables_fit_80_columns() {
        let ms = vec![
            machine(
                "desktop-0001.example.internal",
                Some("instant-clone-pool-east"),
                true,
            ),
            machine("m2", None, false),
        ];
        let t = machines_table(&ms);
        assert!(t.lines().all(|l| l.chars().count() <= WIDTH), "{t}");
        assert!(t.contains("desktop-0001.example.internal"), "{t}");
        let p: PoolSummary = serde_json::from_value(json!({
            "pool_id": "instant-clone-pool-east", "machines": 1200, "online": 1187,
            "provisioning": {"operation": "SCHEDULE_PUSH_IMAGE",
              "current_image_id": "3f0c9a52-5b1e-4c1a-9d7e-0a4b2c6d8e10", "current_image_state": "READY",
              "pending_image_id": "9a0c9a52-5b1e-4c1a-9d7e-0a4b2c6d8e10", "pending_image_state": "PUBLISHING",
              "pending_image_progress": 40, "future_field": true}
        }))
        .unwrap();
        let t = pools_table(&[p]);
        assert!(t.lines().all(|l| l.chars().count() <= WIDTH), "{t}");
        assert!(t.contains("instant-clone-pool-east 1200"), "{t}");
        assert!(t.contains("SCHEDULE_"), "{t}");
    }
}
