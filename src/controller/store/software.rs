//! The store's desired-software tables (commits per host, the commit staged) and the
//! global settings.

use super::sql::{params, Optional};

use super::{Ctx, StoreError, Tx};

impl Tx<'_> {
    pub fn setting(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.tx
            .one(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading a setting")
    }

    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .ctx("saving a setting")?;
        Ok(())
    }

    /// Whether this transaction takes the round of the background job `key` at `now_ms`:
    /// yes when no replica took one within the last `gap_ms` (then this one is recorded).
    /// Transactions run one at a time (SQLite's writer, PostgreSQL's write lock), so of
    /// replicas racing for a round exactly one gets it, and a job that only needs doing once
    /// a second for the whole fleet (the reaper) is done once, not once per replica. A
    /// replica whose clock runs behind the others' mostly loses the race; once they stop,
    /// it takes the rounds again within `gap_ms` of their last one plus its lag.
    pub fn claim_round(&mut self, key: &str, now_ms: i64, gap_ms: i64) -> Result<bool, StoreError> {
        let last = self.setting(key)?.and_then(|v| v.parse::<i64>().ok());
        if last.is_some_and(|at| now_ms - at < gap_ms) {
            return Ok(false);
        }
        self.set_setting(key, &now_ms.to_string())?;
        Ok(true)
    }

    /// Stores a new desired-software document; returns its commit number (previous + 1).
    pub fn insert_commit(
        &mut self,
        machine_id: &str,
        doc_json: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let next: i64 = self
            .tx
            .one(
                "SELECT COALESCE(MAX(commit_no), 0) + 1 FROM software_commits WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get(0),
            )
            .ctx("numbering a commit")?;
        self.tx
            .exec(
                "INSERT INTO software_commits (machine_id, commit_no, doc_json, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![machine_id, next, doc_json, now_ms],
            )
            .ctx("saving a commit")?;
        Ok(next)
    }

    /// The newest commit of a machine: `(commit, doc_json)`.
    pub fn latest_commit(&mut self, machine_id: &str) -> Result<Option<(i64, String)>, StoreError> {
        self.tx
            .one(
                "SELECT commit_no, doc_json FROM software_commits WHERE machine_id = ?1
                 ORDER BY commit_no DESC LIMIT 1",
                params![machine_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .ctx("reading the latest commit")
    }

    pub fn commit_doc(
        &mut self,
        machine_id: &str,
        commit: i64,
    ) -> Result<Option<String>, StoreError> {
        self.tx
            .one(
                "SELECT doc_json FROM software_commits WHERE machine_id = ?1 AND commit_no = ?2",
                params![machine_id, commit],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading a commit")
    }

    pub fn set_staged_commit(&mut self, machine_id: &str, commit: i64) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO host_software (machine_id, staged_commit) VALUES (?1, ?2)
                 ON CONFLICT (machine_id) DO UPDATE SET staged_commit = excluded.staged_commit",
                params![machine_id, commit],
            )
            .ctx("saving the staged commit")?;
        Ok(())
    }

    pub fn staged_commit(&mut self, machine_id: &str) -> Result<Option<i64>, StoreError> {
        self.tx
            .one(
                "SELECT staged_commit FROM host_software WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading the staged commit")
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Database, Store};
    use super::*;

    #[tokio::test]
    async fn a_round_is_taken_once_per_gap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Database::Sqlite(dir.path().join("t.db"))).unwrap();
        let got = store
            .tx(|tx| {
                Ok::<_, StoreError>([
                    tx.claim_round("job", 10_000, 900)?,
                    // Another replica within the gap: not its round.
                    tx.claim_round("job", 10_500, 900)?,
                    tx.claim_round("job", 10_900, 900)?,
                    // A clock behind the last round: not its round either.
                    tx.claim_round("job", 9_000, 900)?,
                    // Another job has its own rounds.
                    tx.claim_round("other", 10_950, 900)?,
                    tx.claim_round("job", 11_799, 900)?,
                ])
            })
            .await
            .unwrap();
        assert_eq!(got, [true, false, true, false, true, false]);
    }
}
