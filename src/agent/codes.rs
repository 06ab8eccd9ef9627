//! The agent's limits and the step numbers of an image apply: a leaf that the state machine,
//! the script runner, the image steps and staging all name, so none of them has to import
//! another for a constant. The result codes themselves are `proto::domain::ErrorCode`.

/// Reboots one assignment may request; the next request fails with `REBOOT_LOOP`.
pub const MAX_REBOOTS: u32 = 3;
/// The exit code by which a script says "succeeded, please reboot".
pub const EXIT_REBOOT: i32 = 194;

// Image applies: the steps the state machine resumes at, the hooks, the codes.
pub const ACTIVATE_STEP: usize = 0;
pub const HEALTH_STEP: usize = 1;
pub const VERIFY_STEP: usize = 2;
pub const UNDO_STEP: usize = 3;

pub const ACTIVATE_HOOK: &str = "activate";
pub const HEALTH_HOOK: &str = "health-check";

use crate::proto::domain::ErrorCode;

/// Why a step of the agent failed: a code for the controller and the operator's filters, and
/// a message naming what failed (path, url, ids). Every failure inside the agent is one of
/// these, never a bare string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub msg: String,
}

impl Failure {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Failure {
            code,
            msg: msg.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.msg)
    }
}
