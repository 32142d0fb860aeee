//! How long-running work reports progress: the pipeline calls a [`Progress`] with a stage, bytes
//! done and the total when known. The CLI draws bars from it; the REST service can stream it.

use serde::Serialize;

/// A step of packaging or transferring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Collecting the build context into a tar (bytes of context).
    Context,
    /// Docker building the image (no byte counts; log lines come as messages).
    Build,
    /// `docker save` streamed through the compressor to disk (uncompressed bytes read).
    Export,
    /// Re-hashing a stored package (bytes hashed).
    Verify,
    /// Streaming a package to a receiver (bytes sent).
    Upload,
    /// The receiver loading, starting and health-checking a deployment (no byte counts).
    Deploy,
}

impl Stage {
    /// Lower-case name, as shown to people and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Context => "context",
            Stage::Build => "build",
            Stage::Export => "export",
            Stage::Verify => "verify",
            Stage::Upload => "upload",
            Stage::Deploy => "deploy",
        }
    }
}

/// One progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressEvent<'a> {
    /// The stage reporting.
    pub stage: Stage,
    /// Bytes done so far in this stage.
    pub done: u64,
    /// Total bytes of this stage, when known (an estimate for `Export`).
    pub total: Option<u64>,
    /// A line for people (a build log line), when there is one.
    pub message: Option<&'a str>,
    /// Whether the stage has finished.
    pub finished: bool,
}

/// Receives progress reports. Implemented for any `Fn(ProgressEvent)`.
pub trait Progress: Send + Sync {
    /// Called whenever a stage starts, advances, logs a line or finishes.
    fn report(&self, event: ProgressEvent<'_>);
}

impl<F> Progress for F
where
    F: Fn(ProgressEvent<'_>) + Send + Sync,
{
    fn report(&self, event: ProgressEvent<'_>) {
        self(event)
    }
}

/// Discards every report.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn report(&self, _event: ProgressEvent<'_>) {}
}

/// Shorthands for the pipeline's calls.
pub(crate) trait ProgressExt: Progress {
    fn advance(&self, stage: Stage, done: u64, total: Option<u64>) {
        self.report(ProgressEvent {
            stage,
            done,
            total,
            message: None,
            finished: false,
        });
    }

    fn message(&self, stage: Stage, message: &str) {
        self.report(ProgressEvent {
            stage,
            done: 0,
            total: None,
            message: Some(message),
            finished: false,
        });
    }

    fn finish(&self, stage: Stage, done: u64) {
        self.report(ProgressEvent {
            stage,
            done,
            total: Some(done),
            message: None,
            finished: true,
        });
    }
}

impl<P: Progress + ?Sized> ProgressExt for P {}
