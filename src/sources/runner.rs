//! One run of a source, whatever its type, as the integration actor sees
//! it: a [`SourceRunner`] is built once per source (it owns the pooled HTTP
//! client, the cached Armis token, the Faker generator's churn state) and
//! [`SourceRunner::run`] stages one complete run or says why not.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

use super::armis::client::ArmisClient;
use super::faker::{FakerGenerator, FakerSettings};
use super::http::FetchError;
use super::netbox::client::NetboxClient;
use super::stager::StageOutput;
use super::{faker_stage, RunCounts};
use crate::config::bootstrap::SourceHttpPolicy;
use crate::config::sources::{SourceConfig, SourceKind};
use crate::device::UpdateContext;
use crate::upload::staging::RunWriter;

/// What one run needs besides the source's own state.
pub struct RunJob {
    pub update_ctx: UpdateContext,
    pub blacklist: Vec<IpNet>,
    pub writer: RunWriter,
    /// Set when the run is abandoned (deadline passed, source stopped).
    pub cancel: Arc<AtomicBool>,
}

/// A failed run: why, and what it had done (pages, retries) for the report.
#[derive(Debug)]
pub struct RunFailure {
    pub error: FetchError,
    pub counts: RunCounts,
}

impl RunFailure {
    pub fn new(error: FetchError, counts: RunCounts) -> Self {
        Self { error, counts }
    }
}

impl From<FetchError> for RunFailure {
    fn from(error: FetchError) -> Self {
        Self::new(error, RunCounts::default())
    }
}

/// The per-source state that outlives a run. Cheap to clone: HTTP clients
/// share their pool and token cache; the Faker generator is handed back
/// through [`RunOutcome::faker`].
#[derive(Clone)]
pub enum SourceRunner {
    Faker(Option<Box<FakerGenerator>>),
    Armis(ArmisClient),
    Netbox(NetboxClient),
}

/// A finished run, plus the Faker generator's state for the next one.
pub struct RunOutcome {
    pub output: StageOutput,
    pub faker: Option<Box<FakerGenerator>>,
}

impl SourceRunner {
    /// Builds the source's client. A configuration it cannot use (no
    /// endpoint, bad URL, bad Faker settings) is an error naming the field.
    pub fn new(config: &SourceConfig, policy: &SourceHttpPolicy) -> Result<Self, FetchError> {
        Ok(match config.kind {
            SourceKind::Faker => {
                let settings = FakerSettings::from_credentials(&config.credentials.0)
                    .map_err(FetchError::Config)?;
                SourceRunner::Faker(Some(Box::new(FakerGenerator::new(settings))))
            }
            SourceKind::Armis => SourceRunner::Armis(ArmisClient::new(config, policy.clone())?),
            SourceKind::Netbox => SourceRunner::Netbox(NetboxClient::new(config, policy.clone())?),
        })
    }

    /// Runs the source once into `job.writer`. The Faker work is blocking
    /// and goes to tokio's blocking pool; HTTP sources download on the
    /// calling task and stage on a blocking thread.
    pub async fn run(&self, job: RunJob, staging_dir: PathBuf) -> Result<RunOutcome, RunFailure> {
        match self {
            SourceRunner::Faker(generator) => {
                let generator = generator.clone();
                tokio::task::spawn_blocking(move || faker_run_blocking(generator, job, staging_dir))
                    .await
                    .map_err(|e| {
                        FetchError::Panicked(if e.is_panic() {
                            crate::actors::supervisor::panic_message(&*e.into_panic())
                        } else {
                            e.to_string()
                        })
                    })?
            }
            SourceRunner::Armis(client) => Ok(RunOutcome {
                output: client.run(job).await?,
                faker: None,
            }),
            SourceRunner::Netbox(client) => Ok(RunOutcome {
                output: client.run(job).await?,
                faker: None,
            }),
        }
    }

    /// Keeps the generator state a Faker run returned (churn carries over).
    pub fn keep(&mut self, outcome_faker: Option<Box<FakerGenerator>>) {
        if let (SourceRunner::Faker(slot), Some(generator)) = (self, outcome_faker) {
            *slot = Some(generator);
        }
    }
}

fn faker_run_blocking(
    generator: Option<Box<FakerGenerator>>,
    job: RunJob,
    staging_dir: PathBuf,
) -> Result<RunOutcome, RunFailure> {
    let Some(mut generator) = generator else {
        return Err(FetchError::Config("the Faker generator is missing".into()).into());
    };
    generator.next_run();
    let mut writer = job.writer;
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let staged = faker_stage(
        &generator,
        &job.update_ctx,
        &job.blacklist,
        &mut writer,
        workers,
        &|| job.cancel.load(Ordering::Relaxed),
    );
    let io = |e: std::io::Error| {
        FetchError::Staging(std::io::Error::new(
            e.kind(),
            format!("in {}: {e}", staging_dir.display()),
        ))
    };
    let counts = match staged {
        Ok(counts) => counts,
        Err(e) => {
            // A half-staged run is never delivered: remove it.
            let _ = writer.discard();
            return Err(if job.cancel.load(Ordering::Relaxed) {
                FetchError::Cancelled
            } else {
                io(e)
            }
            .into());
        }
    };
    let staged = writer.finish().map_err(io)?;
    Ok(RunOutcome {
        output: StageOutput {
            staged,
            counts,
            first_invalid: None,
        },
        faker: Some(generator),
    })
}
