//! What refers to payload blobs, for the blob store's garbage collection: the JSON documents
//! that may name a blob by its `sha256` (every registered image, each host's newest
//! desired-software commit, and the payloads of tasks and assignments still running).

use super::sql::params;

use super::{Ctx, StoreError, Tx};

impl Tx<'_> {
    /// `(sha256 of registered images, JSON documents that may name blobs)`.
    pub fn blob_referrers(&mut self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let what = "listing what refers to blobs";
        let mut images = Vec::new();
        {
            let mut st = self.tx.statement("SELECT sha256 FROM images").ctx(what)?;
            let rows = st.query_map(params![], |r| r.get(0)).ctx(what)?;
            for r in rows {
                images.push(r.ctx(what)?);
            }
        }
        let mut docs = Vec::new();
        for sql in [
            // Each host's desired document is its newest commit.
            "SELECT c.doc_json FROM software_commits c WHERE c.commit_no =
                (SELECT MAX(commit_no) FROM software_commits d WHERE d.machine_id = c.machine_id)",
            "SELECT scripts_json FROM tasks WHERE finished_ms IS NULL",
            "SELECT p.payload_json FROM assignment_payloads p JOIN task_machines tm
                ON tm.assignment_id = p.assignment_id
                WHERE tm.state IN ('PENDING', 'DISPATCHED', 'RUNNING')",
        ] {
            let mut st = self.tx.statement(sql).ctx(what)?;
            let rows = st.query_map(params![], |r| r.get(0)).ctx(what)?;
            for r in rows {
                docs.push(r.ctx(what)?);
            }
        }
        Ok((images, docs))
    }
}
