//! The work commands: scripts (add, list, show), and the requests that start a task built
//! from their flags (`run`, `push-image`), with `rebuild`, whose answer has a code per
//! desktop. Starting and following the task is `tasks`.

use std::path::Path;
use std::str::FromStr;

use super::api::{self, Api};
use super::table::{self, cut, keep, opt, WIDTH};
use super::{CtlError, Format, Out};
use crate::exit::Exit;
use crate::proto::api::{CreateScript, PushImage, RebuildDesktops, RebuildResponse, ScriptCreated};
use crate::proto::ctl::{Amount, ScriptExecutionRequest, ScriptView};
use crate::proto::domain::{LogoffPolicy, PostFinish, PreStart, RebuildCode};

/// `run`'s flags, one field each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunArgs {
    pub pool: String,
    /// `--command`: an inline command (then `command_type`, default `sh`).
    pub command: Option<String>,
    pub command_type: Option<String>,
    pub script_ids: Vec<String>,
    pub gray_count: Option<Amount>,
    pub gray_desktops: Vec<String>,
    pub gray_fail_threshold: Option<u64>,
    pub max_concurrency: Option<Amount>,
    pub max_errors: Option<Amount>,
    pub pre_start: Option<PreStart>,
    pub post_finish: Option<PostFinish>,
    pub timeout_seconds: Option<u64>,
    pub logoff_policy: Option<LogoffPolicy>,
    pub logoff_timeout_seconds: Option<u64>,
}

impl RunArgs {
    /// The request body; the controller validates it (and names a wrong field).
    pub fn request(&self) -> ScriptExecutionRequest {
        let inline = self.command.is_some();
        ScriptExecutionRequest {
            script_ids: (!self.script_ids.is_empty()).then(|| self.script_ids.clone()),
            command_content: self.command.clone(),
            command_type: match &self.command_type {
                Some(t) => Some(t.clone()),
                None if inline => Some("sh".into()),
                None => None,
            },
            gray_count: self.gray_count,
            gray_desktop_ids: (!self.gray_desktops.is_empty()).then(|| self.gray_desktops.clone()),
            gray_fail_threshold: self.gray_fail_threshold,
            max_concurrency: self.max_concurrency,
            max_errors: self.max_errors,
            pre_start: self.pre_start,
            post_finish: self.post_finish,
            execution_timeout_seconds: self.timeout_seconds,
            logoff_policy: self.logoff_policy,
            logoff_timeout_seconds: self.logoff_timeout_seconds,
        }
    }
}

/// `--start-time`: RFC 3339, or epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime(pub i64);

impl FromStr for StartTime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(StartTime)
                .map_err(|_| format!("{s:?}: too large for epoch milliseconds"));
        }
        crate::sys::clock::parse_rfc3339(s)
            .map(|t| StartTime(crate::sys::clock::unix_ms(t)))
            .ok_or_else(|| {
                format!("{s:?} is neither RFC 3339 (2026-12-01T22:00:00Z) nor epoch milliseconds")
            })
    }
}

/// `push-image`'s flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushArgs {
    pub pool: String,
    pub image_id: String,
    pub start_time: Option<StartTime>,
    pub logoff_policy: Option<LogoffPolicy>,
    pub stop_on_first_error: Option<bool>,
    /// Non-empty: a selective push to these machines only.
    pub machine_ids: Vec<String>,
    pub cpus: Option<i64>,
    pub cores_per_socket: Option<i64>,
    pub ram_mb: Option<i64>,
    pub add_virtual_tpm: Option<bool>,
    pub timeout_seconds: Option<i64>,
}

impl PushArgs {
    pub fn request(&self) -> PushImage {
        let selective = !self.machine_ids.is_empty();
        PushImage {
            image_id: Some(self.image_id.clone()),
            start_time: self.start_time.map(|t| t.0),
            logoff_policy: self.logoff_policy.map(|p| p.as_str().to_string()),
            stop_on_first_error: self.stop_on_first_error,
            selective_push_image: selective.then_some(true),
            machine_ids: selective.then(|| self.machine_ids.clone()),
            compute_profile_num_cpus: self.cpus,
            compute_profile_num_cores_per_socket: self.cores_per_socket,
            compute_profile_ram_mb: self.ram_mb,
            add_virtual_tpm: self.add_virtual_tpm,
            timeout_seconds: self.timeout_seconds,
        }
    }
}

/// `--expires-in`: seconds, or a number with `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 3600, 90m, 24h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

pub async fn scripts_add(
    api: &Api,
    name: String,
    command_type: String,
    file: &Path,
    out: Out,
) -> Result<Exit, CtlError> {
    let content = std::fs::read_to_string(file).map_err(|source| CtlError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let req = CreateScript {
        name,
        command_type,
        content,
    };
    let (s, raw) = api.get::<ScriptCreated>(&api::create_script(&req)).await?;
    out.either(&raw, || {
        format!("script {} (sha256 {})\n", s.script_id, s.sha256)
    })?;
    Ok(Exit::Ok)
}

pub fn scripts_table(ss: &[ScriptView]) -> String {
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            vec![
                s.script_id.clone(),
                s.name.clone(),
                s.command_type.clone(),
                s.sha256.chars().take(12).collect(),
                opt(s.created_at.as_deref()),
            ]
        })
        .collect();
    let cols = [
        keep("SCRIPT"),
        cut("NAME"),
        keep("TYPE"),
        keep("SHA256"),
        cut("CREATED"),
    ];
    table::render(&cols, &rows, WIDTH)
}

pub async fn scripts_ls(api: &Api, out: Out) -> Result<Exit, CtlError> {
    let (ss, raw) = api.get::<Vec<ScriptView>>(&api::scripts()).await?;
    out.either(&raw, || scripts_table(&ss))?;
    Ok(Exit::Ok)
}

pub async fn scripts_show(api: &Api, id: &str, out: Out) -> Result<Exit, CtlError> {
    let (s, raw) = api.get::<ScriptView>(&api::script(id)).await?;
    out.either(&raw, || {
        let items = [
            ("script", s.script_id.clone()),
            ("name", s.name.clone()),
            ("type", s.command_type.clone()),
            ("sha256", s.sha256.clone()),
            ("created", opt(s.created_at.as_deref())),
        ];
        let mut t = table::pairs(&items, WIDTH);
        t.push_str("---\n");
        t.push_str(s.content.as_deref().unwrap_or(""));
        if !t.ends_with('\n') {
            t.push('\n');
        }
        t
    })?;
    Ok(Exit::Ok)
}

pub async fn rebuild(
    api: &Api,
    req: &RebuildDesktops,
    wait: bool,
    out: Out,
) -> Result<Exit, CtlError> {
    let (r, raw) = api.get::<RebuildResponse>(&api::rebuild(req)).await?;
    let started = r
        .rebuild_results
        .iter()
        .any(|x| x.code == RebuildCode::Success);
    let rows: Vec<Vec<String>> = r
        .rebuild_results
        .iter()
        .map(|x| {
            vec![
                x.desktop_id.clone(),
                x.code.to_string(),
                opt(x.message.as_deref()),
            ]
        })
        .collect();
    let results = table::render(
        &[keep("DESKTOP"), keep("CODE"), cut("MESSAGE")],
        &rows,
        WIDTH,
    );
    if !wait || !started || out.format == Format::Json {
        out.either(&raw, || format!("{results}task {}\n", r.request_id))?;
    } else {
        out.text(&results)?;
    }
    if !started {
        return Err(CtlError::Refused(
            "no desktop was rebuilt (see the codes above)".into(),
        ));
    }
    if !wait {
        return Ok(Exit::Ok);
    }
    if out.format == Format::Table {
        out.text(&format!("task {}\n", r.request_id))?;
    }
    super::tasks::finish(api, &r.request_id, out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_flags_become_the_request() {
        let args = RunArgs {
            pool: "p".into(),
            command: Some("systemctl restart foo".into()),
            gray_count: Some(Amount::Percent(10)),
            gray_desktops: vec!["a".into()],
            max_concurrency: Some(Amount::Count(5)),
            pre_start: Some(PreStart::Reboot),
            timeout_seconds: Some(30),
            logoff_policy: Some(LogoffPolicy::ForceLogoff),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(args.request()).unwrap(),
            json!({"command_content": "systemctl restart foo", "command_type": "sh",
                   "gray_count": "10%", "gray_desktop_ids": ["a"], "max_concurrency": 5,
                   "pre_start": "reboot", "execution_timeout_seconds": 30,
                   "logoff_policy": "FORCE_LOGOFF"})
        );
        let scripts = RunArgs {
            script_ids: vec!["s1".into(), "s2".into()],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(scripts.request()).unwrap(),
            json!({"script_ids": ["s1", "s2"]})
        );
    }

    #[test]
    fn push_flags_become_the_request() {
        let args = PushArgs {
            pool: "p".into(),
            image_id: "img".into(),
            start_time: Some("2026-12-01T22:00:00Z".parse().unwrap()),
            machine_ids: vec!["m1".into()],
            ..Default::default()
        };
        let r = args.request();
        assert_eq!(r.start_time, Some(1_796_162_400_000));
        assert_eq!(
            (r.selective_push_image, r.machine_ids),
            (Some(true), Some(vec!["m1".into()]))
        );
        assert_eq!(
            "1795900000000".parse::<StartTime>().unwrap().0,
            1_795_900_000_000
        );
        assert!("tomorrow".parse::<StartTime>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600"), Ok(3600));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
