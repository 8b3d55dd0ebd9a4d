//! What an agent runs (gateway.md §3): for agent A of tenant T, exactly T's
//! enabled database sources assigned to A, plus — for agents of the default
//! tenant only — sources pinned to A in the gateway's config file.
//!
//! Also where run status comes back: chunk 0 of a run marks its source
//! running, a completed run marks it successful, a failed run report marks
//! it failed. Only the source's assigned agent, in its tenant, can move it.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

use super::config_payload::{render, FileSources, RenderedConfig};
use super::control::AgentKey;
use super::integrations::render_sources;
use super::secrets::CredentialKey;
use super::store::{SourceRef, SourceStatusUpdate, Store, StoreError};

pub(crate) struct Assignments {
    file: FileSources,
    database: Option<(Store, Arc<CredentialKey>)>,
    /// File sources belong to this tenant (id).
    default_tenant: String,
}

impl Assignments {
    pub fn new(
        file: FileSources,
        database: Option<(Store, Arc<CredentialKey>)>,
        default_tenant: String,
    ) -> Self {
        Self {
            file,
            database,
            default_tenant,
        }
    }

    pub fn file_sources(&self) -> &FileSources {
        &self.file
    }

    pub fn default_tenant(&self) -> &str {
        &self.default_tenant
    }

    /// The agent's config payload. Fails only when the database does (the
    /// caller answers with a `v0-unavailable` placeholder, which agents treat
    /// as transient).
    pub async fn render(&self, agent: &AgentKey) -> Result<RenderedConfig, StoreError> {
        let (mut sources, mut changed_at) = if agent.tenant == self.default_tenant {
            self.file.sources(&agent.agent_id)
        } else {
            (serde_json::Map::new(), self.file.started_at())
        };
        if let Some((store, key)) = &self.database {
            let rows = store
                .sources_for_agent(&agent.tenant, &agent.agent_id)
                .await?;
            changed_at = rows.iter().map(|r| r.updated_at).fold(changed_at, i64::max);
            let key = key.clone();
            // Opening credentials is CPU work; keep it off the async threads
            // together with the rows it needs.
            let rendered = tokio::task::spawn_blocking(move || render_sources(&rows, &key))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?;
            for (name, source) in rendered {
                if sources.insert(name.clone(), source).is_some() {
                    tracing::warn!(agent_id = %agent.agent_id, source = %name,
                        "a database source has the name of a config-file source; the database one is sent");
                }
            }
        }
        Ok(render(&agent.agent_id, &sources, changed_at))
    }

    /// Partitions other than its certificate's that the agent may write:
    /// those its sources set (gateway.md §1).
    pub async fn source_partitions(
        &self,
        agent: &AgentKey,
    ) -> Result<BTreeSet<String>, StoreError> {
        let mut partitions = if agent.tenant == self.default_tenant {
            self.file.source_partitions(&agent.agent_id)
        } else {
            BTreeSet::new()
        };
        if let Some((store, _)) = &self.database {
            partitions.extend(
                store
                    .sources_for_agent(&agent.tenant, &agent.agent_id)
                    .await?
                    .into_iter()
                    .map(|row| row.partition),
            );
        }
        Ok(partitions)
    }

    /// Records a status change of a source of `agent`; logs and carries on
    /// if it cannot (status is bookkeeping, never a reason to refuse data).
    pub async fn record_status(
        &self,
        agent: &AgentKey,
        which: SourceRef,
        update: SourceStatusUpdate,
    ) {
        let Some((store, _)) = &self.database else {
            return;
        };
        match store
            .update_source_status(&agent.tenant, &agent.agent_id, &which, update)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::debug!(agent_id = %agent.agent_id, source = ?which,
                "status for a source not assigned to this agent ignored"),
            Err(e) => tracing::warn!(agent_id = %agent.agent_id, "source status not saved: {e}"),
        }
    }
}

/// Status update from a run report (wire.md §6): `result` `success`,
/// `skipped` (a scheduled run the agent did not start because the previous
/// one still awaits delivery: no change) or anything else (failed).
pub(crate) fn report_status(report: &Value, run_id: String) -> Option<SourceStatusUpdate> {
    let text = |key: &str| report.get(key).and_then(Value::as_str).unwrap_or_default();
    match text("result") {
        "success" => Some(SourceStatusUpdate::Succeeded {
            run_id,
            devices: report
                .get("device_count")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }),
        "skipped" => None,
        result => {
            let error = match text("error") {
                "" => format!("run {result}"),
                e => e.to_owned(),
            };
            Some(SourceStatusUpdate::Failed { run_id, error })
        }
    }
}
