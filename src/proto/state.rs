//! The agent's on-disk records under `state_dir`. They are a contract with the agent version
//! that wrote them (an upgrade restarts the agent on the old files), so they live with the wire
//! types and only grow fields with `#[serde(default)]`.

use serde::{Deserialize, Serialize};

use super::agent::{AgentEvent, Assignment, ImageRecord};
use super::status::RecentResult;

/// `state_dir/state.json`, rewritten atomically before every irreversible step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    /// Accepted assignments waiting their turn, oldest first.
    #[serde(default)]
    pub queue: Vec<Assignment>,
    #[serde(default)]
    pub running: Option<RunningRecord>,
    /// Newest first.
    #[serde(default)]
    pub recent: Vec<RecentResult>,
    /// Ids of assignments this agent has accepted (bounded), so a re-delivered assignment is
    /// never run twice.
    #[serde(default)]
    pub seen: Vec<String>,
    /// The desired-software commit last staged completely.
    #[serde(default)]
    pub staged_commit: Option<String>,
    /// The images on this machine, as image assignments left them.
    #[serde(default)]
    pub image: ImageRecord,
}

/// `state_dir/payloads/partial/<sha256>.json`: how far a download got, so it can resume
/// after a restart. `offset` bytes of the `.part` file were fsynced before this was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDownload {
    pub sha256: String,
    pub size: u64,
    /// The server's validator (`ETag`), sent back as `If-Range`.
    pub etag: String,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRecord {
    pub assignment: Assignment,
    pub started_at: String,
    /// Process group of the running script, once it has been spawned.
    #[serde(default)]
    pub pgid: Option<i32>,
    /// Boot the process group belongs to: after a reboot the number means nothing.
    pub boot_id: String,
    #[serde(default)]
    pub cancel_requested: bool,
    /// Where a run with power steps is; absent for plain runs.
    #[serde(default)]
    pub phase: Option<PhaseRecord>,
    /// Reboots requested for this assignment so far (loop guard).
    #[serde(default)]
    pub reboots: u32,
    /// Output of the scripts so far, and the final result while a post-finish power step
    /// is pending.
    #[serde(default)]
    pub carry: Option<super::agent::RunResult>,
}

/// The durable phase of a run with power steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum PhaseRecord {
    /// Ending user sessions before `next`.
    Logoff {
        #[serde(with = "next_text")]
        next: Next,
    },
    /// Running scripts from index `from`.
    Scripts { from: usize },
    /// A power command ran in boot `boot_id`; `then` says what follows it.
    Power {
        kind: PowerKind,
        #[serde(with = "next_text")]
        then: Next,
        boot_id: String,
        /// When to give up waiting for the boot id to change (RFC 3339).
        deadline: String,
    },
}

/// A power step of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerKind {
    Reboot,
    /// Shut down (seed 002's `post_finish: stop`).
    Stop,
}

impl PowerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerKind::Reboot => "reboot",
            PowerKind::Stop => "stop",
        }
    }
}

impl From<super::domain::PostFinish> for PowerKind {
    fn from(p: super::domain::PostFinish) -> PowerKind {
        match p {
            super::domain::PostFinish::Reboot => PowerKind::Reboot,
            super::domain::PostFinish::Stop => PowerKind::Stop,
        }
    }
}

impl std::fmt::Display for PowerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a run does next. On disk it keeps the text of 0.1.0 (`scripts`, `scripts:<n>`,
/// `finish`, `reboot:<next>`, `stop:<next>`), so a state file of either version reads in
/// the other; text that is none of these is an error, never a guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Run the scripts (or image steps) from this index.
    Scripts(usize),
    /// A power step, then `then`.
    Power { kind: PowerKind, then: Box<Next> },
    /// Report the result.
    Finish,
}

impl Next {
    pub fn power(kind: PowerKind, then: Next) -> Next {
        Next::Power {
            kind,
            then: Box::new(then),
        }
    }

    pub fn parse(text: &str) -> Result<Next, String> {
        match text.split_once(':') {
            None if text == "finish" => Ok(Next::Finish),
            None if text == "scripts" => Ok(Next::Scripts(0)),
            Some(("scripts", n)) => n
                .parse()
                .map(Next::Scripts)
                .map_err(|_| format!("step {text:?}: {n:?} is not a script index")),
            Some(("reboot", rest)) => Ok(Next::power(PowerKind::Reboot, Next::parse(rest)?)),
            Some(("stop", rest)) => Ok(Next::power(PowerKind::Stop, Next::parse(rest)?)),
            _ => Err(format!(
                "{text:?} is not a step (scripts[:<n>], finish, reboot:…, stop:…)"
            )),
        }
    }
}

impl std::fmt::Display for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Next::Scripts(0) => f.write_str("scripts"),
            Next::Scripts(n) => write!(f, "scripts:{n}"),
            Next::Finish => f.write_str("finish"),
            Next::Power { kind, then } => write!(f, "{kind}:{then}"),
        }
    }
}

/// `Next` as its text on disk.
mod next_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Next;

    pub fn serialize<S: Serializer>(n: &Next, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Next, D::Error> {
        let text = String::deserialize(d)?;
        Next::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_keep_their_text_and_a_bad_one_is_an_error() {
        for text in [
            "scripts",
            "scripts:3",
            "finish",
            "reboot:finish",
            "stop:finish",
            "reboot:scripts:2",
        ] {
            assert_eq!(Next::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Next::parse("reboot:scripts:0").unwrap(),
            Next::power(PowerKind::Reboot, Next::Scripts(0))
        );
        for bad in ["", "scripts:x", "reboot", "nap:finish", "scripts:"] {
            assert!(Next::parse(bad).is_err(), "{bad:?} parsed");
        }
        let json = r#"{"phase":"logoff","next":"scripts:x"}"#;
        assert!(serde_json::from_str::<PhaseRecord>(json).is_err());
    }
}

/// `state_dir/outbox/<seq>.json`: one event waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub seq: u64,
    pub event: AgentEvent,
}
