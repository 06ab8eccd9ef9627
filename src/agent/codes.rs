//! The agent's result codes and the step numbers of an image apply: a leaf that the state
//! machine, the script runner, the image steps and staging all name, so none of them has to
//! import another for a constant.

// Script runs.
pub const EXECUTION_TIMEOUT: &str = "EXECUTION_TIMEOUT";
pub const NON_ZERO_EXIT: &str = "NON_ZERO_EXIT";
pub const KILLED_BY_SIGNAL: &str = "KILLED_BY_SIGNAL";
pub const SPAWN_FAILED: &str = "SPAWN_FAILED";
pub const MEMORY_LIMIT_EXCEEDED: &str = "MEMORY_LIMIT_EXCEEDED";

// The state machine.
pub const AGENT_RESTARTED: &str = "AGENT_RESTARTED";
pub const INVALID_ASSIGNMENT: &str = "INVALID_ASSIGNMENT";
pub const REBOOT_NOT_OBSERVED: &str = "REBOOT_NOT_OBSERVED";
pub const REBOOT_LOOP: &str = "REBOOT_LOOP";
pub const POWER_COMMAND_FAILED: &str = "POWER_COMMAND_FAILED";
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

pub const IMAGE_NOT_STAGED: &str = "IMAGE_NOT_STAGED";
pub const IMAGE_ACTIVATE_FAILED: &str = "IMAGE_ACTIVATE_FAILED";
pub const IMAGE_HEALTH_CHECK_FAILED: &str = "IMAGE_HEALTH_CHECK_FAILED";
pub const IMAGE_IO_ERROR: &str = "IMAGE_IO_ERROR";
