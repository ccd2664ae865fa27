//! The embedded job store (redb): every job as its encoded `Job` message, keyed by id, and the
//! idempotency keys. Each change is one committed write transaction, so a coordinator killed at
//! any point restarts with every job it acknowledged.

use std::path::Path;

use prost::Message;
use protodino_proto::v1::Job;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency_keys");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store: {0}")]
    Db(String),
    #[error("job store holds an undecodable record for {0}")]
    Corrupt(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(JOBS)?;
        tx.open_table(IDEMPOTENCY)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Insert or replace a job (one durable transaction).
    pub fn put(&self, job: &Job, idempotency_key: Option<&str>) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut jobs = tx.open_table(JOBS)?;
            jobs.insert(job.job_id.as_str(), job.encode_to_vec().as_slice())?;
            if let Some(key) = idempotency_key {
                tx.open_table(IDEMPOTENCY)?
                    .insert(key, job.job_id.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        match jobs.get(id)? {
            Some(v) => Job::decode(v.value())
                .map(Some)
                .map_err(|_| StoreError::Corrupt(id.into())),
            None => Ok(None),
        }
    }

    pub fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(IDEMPOTENCY)?;
        Ok(t.get(key)?.map(|v| v.value().to_string()))
    }

    /// All jobs in id order (ids sort by creation time).
    pub fn list(&self) -> Result<Vec<Job>, StoreError> {
        let tx = self.db.begin_read()?;
        let jobs = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in jobs.iter()? {
            let (k, v) = row?;
            out.push(Job::decode(v.value()).map_err(|_| StoreError::Corrupt(k.value().into()))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path).unwrap();
            let job = Job {
                job_id: "j1".into(),
                message: "hello".into(),
                ..Default::default()
            };
            s.put(&job, Some("key-1")).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get("j1").unwrap().unwrap().message, "hello");
        assert_eq!(
            s.by_idempotency_key("key-1").unwrap().as_deref(),
            Some("j1")
        );
        assert_eq!(s.list().unwrap().len(), 1);
        assert!(s.get("nope").unwrap().is_none());
    }
}
