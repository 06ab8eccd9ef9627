//! Wire types: the agent protocol, the operator API, the status socket and the agent's on-disk
//! records. Only the types in this module derive `Serialize`/`Deserialize`; everything else
//! converts to and from them, so a change to any contract shows up as a change here.

pub mod agent;
pub mod api;
pub mod config;
pub mod ctl;
pub mod domain;
pub mod state;
pub mod status;
