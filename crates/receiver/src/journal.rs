//! The deployment journal: one JSON file per deployment under `STATE_DIR/deployments/`, rewritten
//! atomically (temp file, fsync, rename, directory fsync) at start and at every status change, so
//! a receiver killed mid-deploy finds what it was doing when it starts again.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{ReceiverError, Result};

/// Prefix of files being written.
const TEMP_PREFIX: &str = ".tmp-";

/// Durable deployment records, cached in memory (records are small; the directory is the truth).
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    records: Arc<Mutex<HashMap<Uuid, DeploymentRecord>>>,
    leftovers: Arc<Mutex<Vec<Uuid>>>,
}

impl Journal {
    /// Opens (creating) `dir`, drops temp files of interrupted writes and reads every record.
    /// Unreadable records are logged and skipped rather than stopping the receiver.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        crate::store::private_dir(&dir)?;
        let mut records = HashMap::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<DeploymentRecord>(&b).map_err(|e| e.to_string())
            }) {
                Ok(record) => {
                    records.insert(record.deployment_id, record);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable deployment record")
                }
            }
        }
        let mut leftovers: Vec<&DeploymentRecord> = records
            .values()
            .filter(|r| r.status == DeploymentStatus::InProgress)
            .collect();
        leftovers.sort_by_cached_key(|r| started_at(r));
        let leftovers = leftovers.iter().map(|r| r.deployment_id).collect();
        Ok(Self {
            dir,
            records: Arc::new(Mutex::new(records)),
            leftovers: Arc::new(Mutex::new(leftovers)),
        })
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `record` durably and updates the cache. The cache shows the record even when the
    /// write fails (a full or failing disk): this run then answers what happened, not an older
    /// state (a deployment shown IN_PROGRESS for good, refused a rollback); the error says the
    /// record is not durable.
    pub async fn save(&self, record: &DeploymentRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| {
            ReceiverError::Internal(format!("serialising a deployment record: {e}"))
        })?;
        let dir = self.dir.clone();
        let id = record.deployment_id;
        let written = tokio::task::spawn_blocking(move || write_atomically(&dir, id, &bytes))
            .await
            .map_err(|e| ReceiverError::Internal(format!("journal writer failed: {e}")))
            .and_then(|written| Ok(written?));
        self.lock()?.insert(id, record.clone());
        written
    }

    /// One record.
    pub fn get(&self, id: Uuid) -> Result<Option<DeploymentRecord>> {
        Ok(self.lock()?.get(&id).cloned())
    }

    /// The newest `limit` records, newest first.
    pub fn list(&self, limit: usize) -> Result<Vec<DeploymentRecord>> {
        let mut all = self.all()?;
        all.truncate(limit);
        Ok(all)
    }

    /// Every record, newest first.
    pub fn all(&self) -> Result<Vec<DeploymentRecord>> {
        let mut all: Vec<DeploymentRecord> = self.lock()?.values().cloned().collect();
        all.sort_by_cached_key(|r| std::cmp::Reverse((started_at(r), r.deployment_id)));
        Ok(all)
    }

    /// Deletes the oldest finished records beyond the newest `keep_newest`, sparing those for
    /// which `spare` is true (and every record in progress). Returns how many were deleted.
    pub async fn prune(
        &self,
        keep_newest: usize,
        spare: impl Fn(&DeploymentRecord) -> bool,
    ) -> Result<usize> {
        let doomed: Vec<Uuid> = self
            .all()?
            .iter()
            .filter(|r| r.status != DeploymentStatus::InProgress && !spare(r))
            .skip(keep_newest)
            .map(|r| r.deployment_id)
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        let dir = self.dir.clone();
        let ids = doomed.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for id in ids {
                match fs::remove_file(dir.join(format!("{id}.json"))) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| ReceiverError::Internal(format!("journal pruning failed: {e}")))??;
        let mut records = self.lock()?;
        for id in &doomed {
            records.remove(id);
        }
        Ok(doomed.len())
    }

    /// Deployments that no request is carrying on, to be settled by reconciliation: those that
    /// were IN_PROGRESS when the journal was opened (a previous run of the receiver stopped in the
    /// middle of them), oldest first, then those [`Journal::leave`] added.
    pub fn leftovers(&self) -> Vec<Uuid> {
        self.leftovers
            .lock()
            .map(|l| l.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Adds a deployment of this run to the leftovers: its request gave up on it half done
    /// (Docker went away before its rollback was finished).
    pub fn leave(&self, id: Uuid) {
        let mut leftovers = self
            .leftovers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !leftovers.contains(&id) {
            leftovers.push(id);
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, DeploymentRecord>>> {
        self.records
            .lock()
            .map_err(|_| ReceiverError::Internal("deployment journal poisoned".into()))
    }
}

fn started_at(record: &DeploymentRecord) -> i128 {
    OffsetDateTime::parse(&record.started_at, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp_nanos)
        .unwrap_or(0)
}

fn write_atomically(dir: &Path, id: Uuid, bytes: &[u8]) -> std::io::Result<()> {
    let temp = dir.join(format!("{TEMP_PREFIX}{id}-{}", Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = crate::store::private_file(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, dir.join(format!("{id}.json")))?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Now, as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started_at: &str, status: DeploymentStatus) -> DeploymentRecord {
        DeploymentRecord {
            deployment_id: Uuid::new_v4(),
            status,
            container_name: "web".into(),
            image: "web:v1".into(),
            image_id: None,
            package_id: None,
            package_checksum: None,
            container_id: None,
            previous_container_id: None,
            correlation_id: None,
            started_at: started_at.into(),
            finished_at: None,
            stages: vec![],
            error: None,
            spec: None,
            rollback_of: None,
        }
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_the_spared_and_those_in_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        let mut ids = Vec::new();
        for (i, status) in [
            DeploymentStatus::Succeeded,
            DeploymentStatus::InProgress,
            DeploymentStatus::RolledBack,
            DeploymentStatus::Succeeded,
            DeploymentStatus::Failed,
            DeploymentStatus::Succeeded,
        ]
        .into_iter()
        .enumerate()
        {
            let r = record(&format!("2026-01-01T00:00:0{i}Z"), status);
            ids.push(r.deployment_id);
            journal.save(&r).await.expect("save");
        }
        // Spare the oldest; keep the 2 newest finished others; the one in progress stays.
        let spared = ids[0];
        let deleted = journal
            .prune(2, |r| r.deployment_id == spared)
            .await
            .expect("prune");
        assert_eq!(deleted, 2, "ids[2] and ids[3] go");
        let reopened = Journal::open(dir.path()).expect("reopen");
        let mut left: Vec<Uuid> = reopened
            .all()
            .expect("all")
            .iter()
            .map(|r| r.deployment_id)
            .collect();
        left.sort();
        let mut expected = vec![ids[0], ids[1], ids[4], ids[5]];
        expected.sort();
        assert_eq!(left, expected);
        assert_eq!(journal.all().expect("all").len(), 4, "the cache agrees");
    }

    #[tokio::test]
    async fn records_survive_reopening_and_list_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        let old = record("2025-01-01T00:00:00Z", DeploymentStatus::Succeeded);
        let mid = record("2025-01-01T00:00:00.5Z", DeploymentStatus::InProgress);
        let new = record("2025-01-02T00:00:00Z", DeploymentStatus::RolledBack);
        for r in [&mid, &new, &old] {
            journal.save(r).await.expect("save");
        }
        fs::write(dir.path().join(".tmp-leftover"), b"{").expect("write");
        fs::write(dir.path().join("garbage.json"), b"{").expect("write");
        let reopened = Journal::open(dir.path()).expect("reopen");
        let ids: Vec<_> = reopened
            .list(10)
            .expect("list")
            .into_iter()
            .map(|r| r.deployment_id)
            .collect();
        assert_eq!(
            ids,
            [new.deployment_id, mid.deployment_id, old.deployment_id]
        );
        assert_eq!(reopened.list(1).expect("list").len(), 1);
        assert_eq!(
            reopened.get(mid.deployment_id).expect("get"),
            Some(mid.clone())
        );
        assert_eq!(reopened.leftovers(), [mid.deployment_id]);
        assert!(
            journal.leftovers().is_empty(),
            "records written by this run are not leftovers"
        );
        journal.leave(new.deployment_id);
        journal.leave(new.deployment_id);
        assert_eq!(
            journal.leftovers(),
            [new.deployment_id],
            "unless their request left them"
        );
        assert!(!dir.path().join(".tmp-leftover").exists());
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_written_is_still_shown_as_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal_dir = dir.path().join("deployments");
        let journal = Journal::open(&journal_dir).expect("open");
        let mut r = record("2026-01-01T00:00:00Z", DeploymentStatus::InProgress);
        journal.save(&r).await.expect("save");
        // The directory is gone and a file stands in its place: every write fails, even as root.
        fs::remove_dir_all(&journal_dir).expect("remove the journal");
        fs::write(&journal_dir, b"not a directory").expect("a file in its place");
        r.status = DeploymentStatus::Succeeded;
        assert!(journal.save(&r).await.is_err(), "the write failed");
        assert_eq!(
            journal.get(r.deployment_id).expect("get").map(|r| r.status),
            Some(DeploymentStatus::Succeeded),
            "this run shows how the deployment ended"
        );
    }
}
