//! fieldhand: a fleet agent and its controller (code map below is filled in as modules land).

pub mod agent;
pub mod config;
pub mod controller;
pub mod exit;
pub mod daemon;
pub mod net;
pub mod pki;
pub mod proto;
pub mod sys;
pub mod tls;
