//! Where accepted chunk parts go: the SQLite [`Store`], or — in validate-only
//! mode — an in-memory tracker that only counts (no device data is kept, only
//! which chunks of which runs arrived, so that runs still "complete").
//!
//! A [`StreamSession`] collects one StreamStatus call's parts; nothing it
//! staged becomes visible unless [`StreamSession::commit`] runs, and dropping
//! an uncommitted session discards its staged chunks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::ingest::ChunkPart;
use super::store::{CompletedRun, Staged, Store, StoreError, StreamOwner};

pub(crate) enum Sink {
    Store(Store),
    Memory(Arc<Mutex<MemoryRuns>>),
}

/// Validate-only bookkeeping: per open run, which chunks arrived with their
/// counts; finished runs are remembered so replays are not counted twice.
#[derive(Default)]
pub(crate) struct MemoryRuns {
    /// Keyed by (tenant, agent, run).
    open: HashMap<(String, String, String), OpenRun>,
    done: HashSet<(String, String, String)>,
}

struct OpenRun {
    total_chunks: u32,
    sync_service_id: Option<String>,
    /// chunk index → (accepted, rejected)
    chunks: BTreeMap<u32, (u64, u64)>,
}

/// A staged chunk that became permanent with its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredChunk {
    pub run_id: String,
    pub chunk_index: u32,
    pub total_chunks: u32,
    pub sync_service_id: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct CommitOutcome {
    pub stored: Vec<StoredChunk>,
    pub completed: Vec<CompletedRun>,
}

impl Sink {
    pub fn memory() -> Self {
        Sink::Memory(Arc::default())
    }

    pub fn store(&self) -> Option<Store> {
        match self {
            Sink::Store(store) => Some(store.clone()),
            Sink::Memory(_) => None,
        }
    }

    pub fn begin(&self, agent_id: &str, tenant: &str) -> StreamSession {
        StreamSession {
            target: match self {
                Sink::Store(store) => Target::Store(store.clone()),
                Sink::Memory(runs) => Target::Memory(runs.clone()),
            },
            owner: StreamOwner {
                agent_id: agent_id.to_owned(),
                tenant: tenant.to_owned(),
                // Random rather than a counter: ids stay unique across restarts
                // without coordination (only needed while a stream is open).
                stream_id: fastrand::i64(1..),
            },
            touched_runs: Vec::new(),
            stored: Vec::new(),
            memory_parts: Vec::new(),
            staged_anything: false,
            finished: false,
        }
    }
}

enum Target {
    Store(Store),
    Memory(Arc<Mutex<MemoryRuns>>),
}

/// One StreamStatus call's staging.
pub(crate) struct StreamSession {
    target: Target,
    owner: StreamOwner,
    touched_runs: Vec<String>,
    stored: Vec<StoredChunk>,
    /// Validate-only: parts (without devices) waiting for the commit.
    memory_parts: Vec<ChunkPart>,
    staged_anything: bool,
    finished: bool,
}

impl StreamSession {
    /// Whether parsed parts should carry their devices (not in validate-only).
    pub fn keeps_devices(&self) -> bool {
        matches!(self.target, Target::Store(_))
    }

    /// Stages the parts of one message. Returns how many updates were dropped
    /// because their chunk disagreed with the run's `total_chunks`.
    pub async fn stage(&mut self, parts: Vec<ChunkPart>) -> Result<u64, StoreError> {
        for part in &parts {
            if !self.touched_runs.contains(&part.run_id) {
                self.touched_runs.push(part.run_id.clone());
            }
        }
        match &self.target {
            Target::Memory(_) => {
                self.memory_parts.extend(parts);
                Ok(0)
            }
            Target::Store(store) => {
                let (store, owner) = (store.clone(), self.owner.clone());
                self.staged_anything = true;
                let (parts, outcome) = tokio::task::spawn_blocking(move || {
                    let outcome = store.stage_blocking(&owner, &parts);
                    (parts, outcome)
                })
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?;
                let mut dropped = 0;
                for (part, staged) in parts.iter().zip(outcome?) {
                    match staged {
                        Staged::New => self.stored.push(stored_chunk(part)),
                        Staged::Duplicate => {}
                        Staged::Inconsistent => {
                            tracing::warn!(agent_id = %self.owner.agent_id, run_id = %part.run_id,
                                chunk_index = part.chunk_index, "chunk disagrees with its run's total_chunks; dropped");
                            dropped += part.accepted;
                        }
                    }
                }
                Ok(dropped)
            }
        }
    }

    /// The stream was accepted: make its chunks permanent and complete runs.
    pub async fn commit(mut self) -> Result<CommitOutcome, StoreError> {
        self.finished = true;
        match &self.target {
            Target::Memory(runs) => {
                let mut runs = runs.lock().unwrap_or_else(|p| p.into_inner());
                Ok(runs.commit(
                    &self.owner.tenant,
                    &self.owner.agent_id,
                    std::mem::take(&mut self.memory_parts),
                ))
            }
            Target::Store(store) => {
                let (store, owner) = (store.clone(), self.owner.clone());
                let touched = std::mem::take(&mut self.touched_runs);
                let completed =
                    tokio::task::spawn_blocking(move || store.commit_blocking(&owner, &touched))
                        .await
                        .map_err(|e| StoreError::Task(e.to_string()))??;
                Ok(CommitOutcome {
                    stored: std::mem::take(&mut self.stored),
                    completed,
                })
            }
        }
    }
}

impl StreamSession {
    /// The stream was rejected: drop everything it staged, now.
    pub async fn abort(mut self) {
        self.finished = true;
        if let (Target::Store(store), true) = (&self.target, self.staged_anything) {
            let (store, stream_id) = (store.clone(), self.owner.stream_id);
            let result =
                tokio::task::spawn_blocking(move || store.discard_blocking(stream_id)).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not discard chunks of a rejected stream")
                }
                Err(e) => tracing::warn!(error = %e, "discard task failed"),
            }
        }
    }
}

impl Drop for StreamSession {
    /// An unfinished session (rejected stream, cancelled RPC) leaves nothing.
    fn drop(&mut self) {
        if self.finished || !self.staged_anything {
            return;
        }
        if let Target::Store(store) = &self.target {
            let (store, stream_id) = (store.clone(), self.owner.stream_id);
            let discard = move || {
                if let Err(e) = store.discard_blocking(stream_id) {
                    tracing::warn!(error = %e, "could not discard chunks of a rejected stream");
                }
            };
            // Without a runtime (process teardown) `Store::open` cleans up later.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn_blocking(discard);
            }
        }
    }
}

fn stored_chunk(part: &ChunkPart) -> StoredChunk {
    StoredChunk {
        run_id: part.run_id.clone(),
        chunk_index: part.chunk_index,
        total_chunks: part.total_chunks,
        sync_service_id: part.sync_service_id.clone(),
    }
}

impl MemoryRuns {
    fn commit(&mut self, tenant: &str, agent_id: &str, parts: Vec<ChunkPart>) -> CommitOutcome {
        let mut outcome = CommitOutcome::default();
        let mut touched = Vec::new();
        for part in parts {
            let key = (tenant.to_owned(), agent_id.to_owned(), part.run_id.clone());
            if self.done.contains(&key) {
                continue;
            }
            let run = self.open.entry(key.clone()).or_insert_with(|| OpenRun {
                total_chunks: part.total_chunks,
                sync_service_id: part.sync_service_id.clone(),
                chunks: BTreeMap::new(),
            });
            if run.total_chunks != part.total_chunks || run.chunks.contains_key(&part.chunk_index) {
                continue;
            }
            run.chunks
                .insert(part.chunk_index, (part.accepted, part.rejected));
            outcome.stored.push(stored_chunk(&part));
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        for key in touched {
            let complete = self
                .open
                .get(&key)
                .is_some_and(|run| run.chunks.len() as u64 >= u64::from(run.total_chunks));
            if !complete {
                continue;
            }
            if let Some(run) = self.open.remove(&key) {
                let (devices, rejected) = run
                    .chunks
                    .values()
                    .fold((0, 0), |(d, r), (a, b)| (d + a, r + b));
                outcome.completed.push(CompletedRun {
                    run_id: key.2.clone(),
                    devices,
                    rejected,
                    sync_service_id: run.sync_service_id,
                    reconciled: Default::default(),
                });
                self.done.insert(key);
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(run: &str, index: u32, total: u32, accepted: u64) -> ChunkPart {
        ChunkPart {
            run_id: run.into(),
            chunk_index: index,
            total_chunks: total,
            total_devices: 0,
            sync_service_id: None,
            accepted,
            rejected: 0,
            devices: Vec::new(),
        }
    }

    #[test]
    fn memory_runs_complete_once_and_ignore_retries() {
        let mut runs = MemoryRuns::default();
        let first = runs.commit("t", "a", vec![part("r", 0, 2, 5), part("r", 0, 2, 5)]);
        assert_eq!(first.stored.len(), 1);
        assert!(first.completed.is_empty());
        let second = runs.commit("t", "a", vec![part("r", 1, 2, 3)]);
        assert_eq!(
            second.completed,
            vec![CompletedRun {
                run_id: "r".into(),
                devices: 8,
                rejected: 0,
                sync_service_id: None,
                reconciled: Default::default(),
            }]
        );
        let replay = runs.commit("t", "a", vec![part("r", 0, 2, 5), part("r", 1, 2, 3)]);
        assert!(replay.stored.is_empty() && replay.completed.is_empty());
        // Same run id from another agent is another run.
        assert!(
            runs.commit("t", "b", vec![part("r", 0, 1, 1)])
                .completed
                .len()
                == 1
        );
    }
}
