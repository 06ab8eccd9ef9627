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
