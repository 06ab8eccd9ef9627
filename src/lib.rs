//! fieldhand: a fleet agent (`fieldhand`), its controller (`fieldhand-controller`) and the
//! operator CLI (`fieldhandctl`) that run operator work on Linux desktops and hypervisor
//! hosts over mutual TLS, and report every result back exactly once.
//!
//! # Code map, in reading order
//!
//! - [`proto`]: every wire type (agent protocol, operator API, status socket, the agent's
//!   on-disk records, raw config files). Start here: it is the contract. `proto::domain`
//!   holds the closed vocabularies as enums that keep their wire text: task kinds, task,
//!   batch, machine and run states, power and logoff steps, seed 001's image states and
//!   pool operations, and the one `ErrorCode`. An assignment is one `Work` enum (scripts,
//!   software stage, image stage, apply, remove), flattened on the wire as in 0.1.0.
//!   `proto::api` is the operator API, by subject (`tasks`, `images`, `fleet`), all of it
//!   re-exported as `proto::api::*`. `proto::ctl` is the operator CLI's side: requests `api` has no type for yet, and
//!   lenient views (unknown fields ignored) of the listing routes.
//! - [`config`]: raw TOML (`deny_unknown_fields`) into validated configs; errors name the key.
//!   `config::ctl` resolves the CLI's connection settings: flag, else environment, else
//!   `ctl.toml`.
//! - [`pki`]: the fleet's root CA and the issuing CA the controller signs enrollments and
//!   renewals with, certificate issuance (a pool may be bound at issue time), CSRs, and
//!   [`pki::Identity`] (role + name) bound in each certificate as a URI SAN.
//! - [`tls`]: rustls server/client configs, and what a verified cert says
//!   ([`tls::CertInfo`]: identity, bound pool, serial, validity).
//! - [`net`]: the HTTPS client (its TLS swappable, for renewal; connections kept alive and
//!   reused while young) and the accept loop that hands
//!   each request to a handler with its peer (certificate, if any, and address), with time
//!   limits per stage and connection caps (per agent, in total, a reserve for operators).
//! - [`payload`]: the payload engine shared by staging and image pushes: resumable,
//!   verified downloads (`fetch`), ed25519 manifest signatures (`sign`), and hardened
//!   tar.gz extraction (`extract`; what an entry's path and a link's target may be is
//!   `entry_path`, a leaf of pure functions).
//! - [`sys`]: every side effect on the host: processes (`process`: script runs in their own
//!   process group and `cgroup` v2 group, or under the subreaper fallback; `child`: the
//!   quickstart's daemons), `power` commands, user `sessions`
//!   (logind or utmp), systemd `notify`, `clock`, `bootid`, host `facts`, crash-safe
//!   file writes (`fsutil`), the open-files limit the connection cap must fit (`fdlimit`).
//! - [`controller`]: `serve` and `run`, the `router` (the checks every request passes, and
//!   the route table `ROUTES`), the background `loops` (schedule, reaper, revocations, blob
//!   collection, pruning finished tasks past `task_retention_seconds`), the one error shape
//!   and body parser (`errors`, a leaf), global `settings` (and the pools' power limits), the
//!   operator API (`api`: scripts, executions, cancel; `views`: the task and machine views
//!   it answers with, whole, as counts, or a page of machines), its paged lists and pool views (`lists`: query strings, `limit`
//!   and the opaque cursors), the operators' `audit` trail (recorded in each action's own
//!   transaction), retry and resume (`rerun`), the agent protocol (`agent_api`), `progress` (the thin layer
//!   above the engine that lets image operations observe what changed a task), fleet
//!   `identity` (enrollment tokens, enroll and renew, operator moves,
//!   decommission and revocation, and the gate every agent request passes: revoked,
//!   decommissioned, two live sessions of one identity), the pure rollout rules
//!   (`rollout`: gray batches, waves of `max_concurrency`, the `max_errors` halt, the room the
//!   power limits leave), the `engine` that advances tasks (and holds machines with a power
//!   step back behind the power limits), `reports` (agent events applied once by their
//!   key, and the reaper for machines gone silent; both end assignments through `engine`),
//!   `rerun` (retry and resume of a finished or halted
//!   task), the `store` on SQLite or
//!   PostgreSQL (`sql`: one way to run a statement on either, values and placeholders;
//!   `migrate` steps for both; `rows` (what the store hands out, read back and checked);
//!   `tasks` (and dispatch), `delivery` (to agents, and results), `power` (the power
//!   limits' counts), `images`, `software`, `identity`, `audit` tables; `lists`: keyset pages of tasks, machines and scripts;
//!   `prune`: finished tasks removed a chunk at a time; `blobrefs`:
//!   what refers to blobs; `columns`: the domain enums stored as their wire text; `writer`:
//!   the one thread that owns the connection and commits waiting transactions together,
//!   each in its own savepoint, and runs what a transaction asked to do once it committed
//!   (`Tx::after_commit`); the same machinery in read mode is the reader (`Store::read`:
//!   read-only transactions on a connection of their own, no write lock); `pg`: the
//!   replicas' write lock, reconnecting, and the
//!   LISTEN/NOTIFY wake-ups between replicas), the blob store (`blobs`: bounded uploads, deletion, retention),
//!   desired software by commit (`software`), images (`images`: the `registry`, `push`
//!   with schedule/reschedule/cancel and unpublish, `pool_op` (the pool operation moved on
//!   from its tasks) and `views` (the provisioning status), as three ordinary tasks per
//!   push driven by one `pool_images` row), desktop
//!   `rebuild` (seed 003: per-desktop codes, one `image_rebuild` task whose assignments each
//!   carry their own image payload), the `quickstart`, and `ui`: the rollout page at `/ui/`
//!   (hand-written HTML, script and style sheet compiled into the binary).
//! - [`agent`]: `run` (start-up wiring), the `core` task owning the state and performing
//!   effects, the pure state machine (`machine::step`, which dispatches to one handler per
//!   event in `machine::handlers`; `machine::validate` refuses bad work before it is
//!   queued; `machine::bookkeeping` is what handlers share; a run's phase is kept as the
//!   on-disk `proto::state::PhaseRecord`), the `instance` id and `seal`,
//!   the durable state file and outbox (`store`), the machine's `identity` (enroll with a
//!   token, renew, re-enroll a cloned identity, the crash-safe key and certificate swap),
//!   the `executor` (dispatch by kind, and scripts), `runner` (the low-level run of one
//!   process: settings, reports, clean environment, its cgroup), `codes` (limits, image step numbers and
//!   `Failure`, the typed error every agent step returns: an `ErrorCode` and a message; a
//!   leaf), `layout` (the image directories and links), `stage`
//!   (software and image staging), `logoff` (logoff policies), `image` (the steps of an
//!   image apply: activate, health check, verify, undo; a rebuild's
//!   fresh slot and its data area moved aside until the commit), the `link` to
//!   the controller (long poll, heartbeat, events, progress), `failover` (which of the
//!   configured controller replicas is in use: the pure choice `Endpoints`, round robin
//!   when one cannot be reached, and `Controllers`, a client per replica), the jittered
//!   `backoff` of every retry loop (link, enrollment, renewal), and the local `status` socket.
//! - [`ctl`]: `fieldhandctl`, a thin client of the operator API: `api` (every request as a
//!   pure `Call`, then sent; listings followed by their cursor; a missing route says
//!   "upgrade it"), the commands (`fleet`, `work`, `tasks`), `watch` (a task followed to its
//!   end by its summary: bars on a terminal, a line per change otherwise) and `table` (80 columns).
//! - [`uiproxy`]: the loopback forwarder that lets a browser without the operator's
//!   certificate open the rollout page (plain HTTP on loopback, guarded by a one-time
//!   cookie, forwarded over mutual TLS).
//! - [`daemon`], [`exit`]: logging, shutdown signals and exit codes shared by the binaries;
//!   [`manpages`]: man pages and shell completions made from each binary's clap definition;
//!   [`metrics_text`]: the Prometheus text format from prometheus-client's OpenMetrics.
//!
//! Entry points: `src/bin/fieldhand.rs` (`agent`, `status`, `seal`),
//! `src/bin/fieldhand-controller.rs` (`serve`, `migrate`, `pki`, `quickstart`, `ui`) and
//! `src/bin/fieldhandctl.rs` (the operator CLI); each only parses arguments, loads config
//! and calls one `run`/`serve` (each also has a hidden `generate --dir D` for packaging).
//!
//! # Architecture invariants
//!
//! - Only `proto` derives `Serialize`/`Deserialize`; internal types convert to and from it.
//! - Kinds, states, policies and error codes are enums (`proto::domain`), and a match over
//!   one names every variant: no catch-all arm hides a new one (clippy's
//!   `wildcard_enum_match_arm`, denied in `Cargo.toml`).
//! - Errors are typed: one `thiserror` enum per module with its context, and inside the
//!   agent every failed step is a `Failure` (an `ErrorCode` and a message).
//! - Only `sys` spawns processes, reads the boot id or reads the wall clock (checked by
//!   `tests/it/tidy.rs`, and by clippy's `disallowed-methods` in `clippy.toml`).
//! - Identity comes only from the verified peer certificate, never from a request field; an
//!   agent certificate may only use `/agent/v1`, an operator certificate only `/v1`; a
//!   client without a certificate may only enroll; a revoked serial is refused on every
//!   route. The rollout page (`/ui/`) is the operator's, behind the same checks.
//! - What a machine belongs to is decided by the controller alone: its pool comes from its
//!   enrollment token, a pool bound in a hand-issued certificate, or an operator's move;
//!   nothing an agent sends changes it.
//! - One live agent per identity: an agent locks its `state_dir`; the controller hands an
//!   assignment to one session (`<instance_id>.<boot_id>`) and nothing new to an identity
//!   whose two sessions are live at once, so no assignment runs on two machines.
//! - A machine's private key is made on the machine and never leaves it; key and
//!   certificate are swapped as a pair that survives a crash.
//! - The controller's schema changes only through numbered migrations (`store::migrate`).
//! - Every change to the controller's state goes through `Store::tx` (one writer, group
//!   commit, on PostgreSQL the replicas' one write lock); `Store::read` runs only reads, on a
//!   read-only transaction the database itself keeps from writing.
//! - The agent's state machine is pure: `step(state, event, now) -> (state, effects)`; the
//!   core loop performs the effects in order, and persists the state (atomic write) before
//!   a script starts and before a result is handed to the outbox.
//! - Every result leaves the agent through the durable outbox under an idempotency key
//!   (`<assignment_id>:result`); the controller applies each key at most once, so retries
//!   and restarts on either side never double-count and never lose a result.
//! - An interrupted run is never re-run silently: on restart the agent kills the recorded
//!   process group (same boot only) and reports `AGENT_RESTARTED` once.
//! - A power step is persisted (phase + boot id) before its command runs; only a changed
//!   boot id proves a reboot, so an agent restart is never mistaken for one; at most
//!   `MAX_REBOOTS` reboots per assignment.
//! - When a script run ends, no process it started is left: its process group is stopped
//!   (SIGTERM, grace, SIGKILL), then its cgroup is killed whole, which no `setsid` or double
//!   fork escapes; the group exists before the process, so an agent restart kills it before
//!   anything else runs. Without cgroup v2, the agent is a subreaper and kills its
//!   descendants.
//! - An extraction writes at most its declared size (plus a stated tolerance), keeps the
//!   free-space reserve, follows no link out of its destination, and stops within a chunk
//!   when its run is stopped; the result is reported only after it has cleaned up.
//! - Every controller state change happens in one store transaction; the store is the only
//!   module that speaks SQL. A caller is answered only after its transaction's group commit
//!   is durable; a transaction that fails or panics rolls back alone.
//! - Every operator action is recorded (`controller::audit::record`: the operator from the
//!   verified certificate, the request without secrets) in the action's own transaction, so
//!   the two commit together; the journal hears of it only after the commit.
//! - Controller replicas share only the database (and `blob_dir`): on PostgreSQL every
//!   transaction group takes one advisory lock first, so the replicas' transactions apply
//!   one group at a time, with the same semantics as one controller on SQLite; a change
//!   that concerns a machine wakes its poll on whichever replica holds it (`NOTIFY`).
//! - A machine's ending (its result, or the reaper declaring it unreachable) costs O(1) in
//!   the size of its task: the task is re-planned only when that batch has no machine left
//!   at work (`engine::settle`); a paced task (waves, `max_errors`, a power limit) takes its
//!   next step from index counts, and a freed power slot finds the waiting tasks by index.
//! - No setting of any task dispatches more machines with a power step (reboot, shutdown)
//!   at once than the controller-wide and the pool's power limits allow; the limit covers
//!   the whole assignment, so it is conservative.
//! - A payload is used only after its size and sha256 (and, when configured, signature)
//!   are verified; an extracted tree or a staged commit appears in one rename, complete,
//!   or not at all.
//! - An interrupted staging run resumes after a restart (it installs nothing); an
//!   interrupted script run never re-runs.
//! - An image is switched in only after it is staged complete, and only through the
//!   `current` symlink (temp link + rename); `previous` stays until the health check in a
//!   new boot passed. Every image step is persisted before it runs; an interrupted
//!   activation is switched back, never left half-applied.
//! - A rebuild never reuses a slot and never deletes the old slot or the old data before
//!   the new image passed its health check; a rollback restores both.
//! - A push's apply task is held (never dispatched) until its start time has come and its
//!   image is `READY` on every targeted machine; a pool has one image operation at a time.
//! - Config is validated before any socket is bound.
//! - Every file starts with a `//!` line saying what it is for (checked by `tests/it/tidy.rs`).

pub mod agent;
pub mod config;
pub mod controller;
pub mod ctl;
pub mod daemon;
pub mod exit;
pub mod manpages;
pub mod metrics_text;
pub mod net;
pub mod payload;
pub mod pki;
pub mod proto;
pub mod sys;
pub mod tls;
pub mod uiproxy;
