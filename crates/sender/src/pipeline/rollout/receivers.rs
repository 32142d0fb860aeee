//! The rollout against real receivers: a host is deployed to as a release (protocol v2,
//! [`send_release`]: the layers were prepared once, each host receives only the blobs it lacks)
//! or, with `--full`, through [`deploy_package`](crate::pipeline::deploy_package) as one whole
//! package; it is rolled back with [`ReceiverClient::rollback`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::release::ImageStore;
use deploy_protocol::{DeploymentSpec, ErrorCode};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::journal::{running_image, settle_interrupted, QUERY_TIMEOUT};
use super::plan::Plan;
use super::report::{HostError, RolloutReport};
use super::run::{run, HostSlot, Moved, NotMoved, RolloutEvent, RolloutOptions};
use super::undo::{undo_interrupted, Settled, UndoOptions};
use crate::client::{ReceiverClient, RetryPolicy};
use crate::pipeline::{
    deploy_package, release_manifest, send_manifest, send_release, NoProgress, PackageInfo,
    PreparedImage, Progress, ProgressEvent, ReleaseAction, Stage,
};
use crate::SenderError;

/// What travels to each host.
#[derive(Debug, Clone)]
pub enum Payload {
    /// The image's layers, prepared (exported, compressed) once in the layer cache; the same
    /// blobs serve every host, and each host receives only those its engine and receiver lack.
    Layers(Arc<PreparedImage>),
    /// A stored v1 package, sent whole to every host's `/deployment/full` (`--full`, or an image
    /// no longer in the local engine).
    Package(Box<PackageInfo>),
}

impl Payload {
    /// The image id (`sha256:...`).
    pub fn image_id(&self) -> &str {
        match self {
            Payload::Layers(image) => &image.image_id,
            Payload::Package(package) => &package.image_id,
        }
    }

    /// Bytes a host that has none of it would receive: all distinct blobs, or the package.
    pub fn total_bytes(&self) -> u64 {
        match self {
            Payload::Layers(image) => image.total_blob_bytes(),
            Payload::Package(package) => package.package_size,
        }
    }
}

/// What to roll out: the image (as layers or a package) and the spec to run from it.
#[derive(Debug, Clone)]
pub struct Release {
    /// What travels.
    pub payload: Payload,
    /// What each receiver runs.
    pub spec: DeploymentSpec,
    /// Sent to every receiver (their logs, events and records carry it).
    pub correlation_id: Option<String>,
}

/// Rolls `release` out to `targets` with `options`; see [`run`].
pub async fn roll_out(
    receivers: &[ReceiverClient],
    release: &Release,
    options: &RolloutOptions,
    abort: CancellationToken,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> Result<RolloutReport, SenderError> {
    let hosts: Vec<String> = receivers
        .iter()
        .map(|r| r.target().base_url.to_string())
        .collect();
    // A host's deadline is kept here, so that a deployment that outlives it (its receiver
    // finishes it: it does not depend on the connection) can be looked up and, if it took
    // effect, rolled back with the moved hosts; the engine's own deadline is a backstop past it.
    let host_deadline = options.host_timeout;
    let preload = options.preload && matches!(release.payload, Payload::Layers(_));
    // Preloads start once every host of the first step has its bytes (or has ended): they would
    // share the sender's uplink with the step the rollout waits for.
    let first_step = Plan::new(hosts.len(), options.canary, options.batch)
        .ok()
        .and_then(|plan| plan.steps.into_iter().next())
        .map(|(_, members)| members)
        .unwrap_or_default();
    let first_sent = Arc::new(FirstStepSent::new(first_step));
    let options = &RolloutOptions {
        preload,
        preload_after: preload.then(|| first_sent.opened()),
        // Past everything a host's deployment may take here: the look-up of what it ran before
        // (outside its deadline), the deadline, the look-up of a late host.
        host_timeout: host_deadline
            .saturating_add(QUERY_TIMEOUT)
            .saturating_add(LATE_SETTLE)
            .saturating_add(Duration::from_secs(5)),
        ..options.clone()
    };
    let name = release.spec.container_name.as_str();
    let first_sent = &first_sent;
    let deploy = |i: usize, slot: HostSlot| async move {
        // However the host's deployment ends (or is given up at its deadline, before the
        // look-up of a late host), its bytes are no longer on the wire then.
        let _ended = SentOnDrop(first_sent, i);
        let receiver = &receivers[i];
        let before = running_image(receiver, name).await;
        // Counts the blob bytes put on the wire, also for an attempt given up at its deadline.
        let sent = Arc::new(UploadCounter {
            uploaded: Some((Arc::clone(first_sent), i)),
            ..UploadCounter::default()
        });
        let attempt = async {
            let _given_up = SentOnDrop(first_sent, i);
            match &release.payload {
                Payload::Layers(image) => {
                    deploy_layers(receiver, image, release, before.clone(), Arc::clone(&sent)).await
                }
                Payload::Package(package) => {
                    deploy_whole(receiver, package, release, before.clone()).await
                }
            }
        };
        match tokio::time::timeout(host_deadline, attempt).await {
            Ok(result) => result,
            Err(_) => {
                // The look-up of a late host sends nothing: the next host's transfer goes on.
                slot.release();
                Err(NotMoved {
                    bytes: sent.bytes(),
                    ..late(receiver, name, release, host_deadline, before).await
                })
            }
        }
    };
    // A preload sends and loads the release's layers; a whole package (`--full`) is not
    // preloaded (above): each host's deployment sends it, as without preload. Its deadline is
    // the host's own (the engine's is a backstop past it).
    let preload = |i: usize| async move {
        let sent = Arc::new(UploadCounter::default());
        let attempt = async {
            match &release.payload {
                Payload::Layers(image) => {
                    preload_layers(&receivers[i], image, release, Arc::clone(&sent)).await
                }
                Payload::Package(_) => Ok(0),
            }
        };
        tokio::time::timeout(host_deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(NotMoved {
                    error: HostError {
                        code: ErrorCode::Timeout,
                        message: format!(
                            "no answer to the preload within {} s",
                            host_deadline.as_secs()
                        ),
                    },
                    version_before: None,
                    bytes: sent.bytes(),
                    finished_late: None,
                    unknown: false,
                })
            })
    };
    let rollback = |i: usize, deployment: Uuid| async move {
        receivers[i]
            .rollback(deployment, release.correlation_id.as_deref())
            .await
            .map(|r| r.image)
            .map_err(|e| HostError {
                code: e.code(),
                message: e.to_string(),
            })
    };
    run(&hosts, options, deploy, preload, rollback, abort, on_event)
        .await
        .map_err(SenderError::Validation)
}

/// Undoes an interrupted rollout (`report`) on its real receivers: `clients[i]` is host `i`'s
/// (or why it cannot be asked). Each host the record cannot vouch for is looked up in its
/// receiver's journal by the rollout's `correlation_id` (waited for while its deployment runs,
/// for `host_timeout` plus [`LATE_SETTLE`], as a live rollout waits), then, with `rollback`,
/// every host on the new release is rolled back at once (each within `rollback_timeout`); see
/// [`undo_interrupted`].
pub async fn undo_on_receivers(
    report: RolloutReport,
    clients: &[Result<ReceiverClient, HostError>],
    container_name: &str,
    correlation_id: &str,
    (rollback, host_timeout, rollback_timeout): (bool, Duration, Duration),
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> RolloutReport {
    // Records written before a rollout had a correlation id of its own may share theirs with
    // other rollouts: a host such a record shows not reached is not looked up.
    let own_id = is_rollouts_own(correlation_id);
    let not_reached: Vec<bool> = report
        .hosts
        .iter()
        .map(|h| h.outcome == super::report::HostOutcome::NotReached)
        .collect();
    let not_reached = &not_reached;
    let settle = |i: usize| async move {
        if !own_id && not_reached.get(i).copied().unwrap_or(false) {
            return Ok(Settled::NotStarted);
        }
        match clients.get(i) {
            Some(Ok(client)) => settle_interrupted(client, container_name, correlation_id).await,
            Some(Err(e)) => Err(e.clone()),
            None => Err(unknown_host(i)),
        }
    };
    let rollback_one = |i: usize, deployment: Uuid| async move {
        let client = match clients.get(i) {
            Some(client) => client.as_ref().map_err(Clone::clone)?,
            None => return Err(unknown_host(i)),
        };
        client
            .rollback(deployment, Some(correlation_id))
            .await
            .map(|r| r.image)
            .map_err(|e| HostError {
                code: e.code(),
                message: e.to_string(),
            })
    };
    let options = UndoOptions {
        rollback,
        // As long as a live rollout waits for a host: its deadline, then the look-up of a
        // deployment that outlived it (which also leaves room to tell "never started" from a
        // receiver that does not answer).
        settle_timeout: host_timeout
            .max(Duration::from_secs(1))
            .saturating_add(LATE_SETTLE),
        rollback_timeout: rollback_timeout.max(Duration::from_secs(1)),
    };
    undo_interrupted(report, settle, rollback_one, options, on_event).await
}

fn unknown_host(i: usize) -> HostError {
    HostError {
        code: ErrorCode::InternalError,
        message: format!("host {i} has no receiver"),
    }
}

/// How long a host that missed its deadline is looked up on its receiver (its deployment waited
/// for while it still runs there).
pub const LATE_SETTLE: Duration = Duration::from_secs(60);

/// `<request's correlation id>.rollout-<id>` (the request's printable ASCII characters, cut to
/// fit the 128 a correlation id may have), or `rollout-<id>`: a rollout's own, so that its
/// deployments can be told from every other's in a receiver's journal. Always a valid
/// correlation id: a receiver replaces an invalid one with its own, and the rollout's
/// deployments could then not be found.
pub fn rollout_correlation_id(request: Option<&str>, id: Uuid) -> String {
    let own = format!("rollout-{id}");
    let room = 128 - own.len() - 1;
    let theirs: String = request
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(room)
        .collect();
    if theirs.is_empty() {
        own
    } else {
        format!("{theirs}.{own}")
    }
}

/// What tells receiver URLs apart: the parsed URL (host case, default port) without a trailing
/// `/`; the text as written when it is no URL (refused later, with its reason).
pub fn same_receiver(url: &str) -> String {
    let url = url.trim();
    reqwest::Url::parse(url)
        .map(|u| u.to_string())
        .as_deref()
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_owned()
}

/// Whether `correlation_id` is a rollout's own ([`rollout_correlation_id`]).
pub fn is_rollouts_own(correlation_id: &str) -> bool {
    correlation_id
        .rsplit_once("rollout-")
        .is_some_and(|(_, id)| Uuid::parse_str(id).is_ok())
}

/// A host whose deployment missed its `deadline`. Its receiver may finish it anyway: with a
/// correlation id of the rollout's own, the deployment is looked up there for up to
/// [`LATE_SETTLE`]; one that took effect is named (`finished_late`), to be rolled back with the
/// moved hosts when the rollout stops.
async fn late(
    receiver: &ReceiverClient,
    name: &str,
    release: &Release,
    deadline: Duration,
    version_before: Option<String>,
) -> NotMoved {
    let timed_out = |detail: String| HostError {
        code: ErrorCode::Timeout,
        message: format!("no answer within {} s{detail}", deadline.as_secs()),
    };
    let settled = match release.correlation_id.as_deref() {
        Some(id) if is_rollouts_own(id) => {
            tokio::time::timeout(LATE_SETTLE, settle_interrupted(receiver, name, id))
                .await
                .ok()
        }
        _ => None,
    };
    let unknown = matches!(settled, Some(Err(_)) | None);
    let (error, finished_late) = match settled {
        Some(Ok(Settled::Moved {
            deployment_id,
            version_after,
        })) => (
            timed_out(format!(
                "; its receiver finished the deployment afterwards: it runs {version_after}"
            )),
            Some((deployment_id, version_after)),
        ),
        Some(Ok(Settled::Failed(e))) => (
            timed_out(format!(
                "; then the deployment failed there ({}: {})",
                e.code, e.message
            )),
            None,
        ),
        Some(Ok(Settled::RolledBack(_) | Settled::NotStarted)) => (
            timed_out("; nothing of the release runs there".into()),
            None,
        ),
        Some(Err(_)) | None => (
            timed_out(": the receiver may have gone away; what the host runs is unknown".into()),
            None,
        ),
    };
    NotMoved {
        error,
        version_before,
        bytes: 0,
        finished_late,
        unknown,
    }
}

/// Deploys `image` to `receiver` as a release; the bytes are the blob bytes put on the wire,
/// counted as they are sent (also when the deployment then fails).
async fn deploy_layers(
    receiver: &ReceiverClient,
    image: &PreparedImage,
    release: &Release,
    before: Option<String>,
    sent: Arc<UploadCounter>,
) -> Result<Moved, NotMoved> {
    let policy = RetryPolicy::default();
    let calls = receiver.release_calls(release.correlation_id.as_deref(), &policy);
    let action = ReleaseAction::Deploy(Box::new(release.spec.clone()));
    let result = send_release(calls, image, &action, sent.clone()).await;
    let failed = |e: SenderError, bytes: u64, before: Option<String>| NotMoved {
        bytes,
        error: HostError {
            code: e.code(),
            message: e.to_string(),
        },
        version_before: before,
        finished_late: None,
        unknown: false,
    };
    match result {
        Ok(outcome) => match outcome.deployment {
            Some(record) => Ok(Moved {
                deployment_id: record.deployment_id,
                version_before: record.previous_container_id.as_ref().and(before),
                version_after: record.image,
                bytes: outcome.totals.bytes_sent,
            }),
            None => Err(failed(
                SenderError::Internal("the receiver answered a deploy without a record".into()),
                outcome.totals.bytes_sent,
                before,
            )),
        },
        Err(e) => Err(failed(e, sent.bytes(), before)),
    }
}

/// Sends `image` to `receiver` and loads it there (no container is touched); answers the blob
/// bytes sent. On a graph-driver engine the image is loaded by id, without its tags, so a host
/// the rollout then does not reach has no tag moved either, and keeps only an untagged image,
/// which `docker image prune` removes. (Docker's containerd store keeps no image loaded without a
/// name: there the tags are loaded too.) The deployment after it finds every layer present,
/// sends none of them again, and its load sets the tags.
async fn preload_layers(
    receiver: &ReceiverClient,
    image: &PreparedImage,
    release: &Release,
    sent: Arc<UploadCounter>,
) -> Result<u64, NotMoved> {
    let policy = RetryPolicy::default();
    let calls = receiver.release_calls(release.correlation_id.as_deref(), &policy);
    let failed = |e: SenderError, bytes: u64| NotMoved {
        bytes,
        error: HostError {
            code: e.code(),
            message: e.to_string(),
        },
        version_before: None,
        finished_late: None,
        unknown: false,
    };
    let mut manifest = release_manifest(image, &ReleaseAction::Load).map_err(|e| failed(e, 0))?;
    let store = calls
        .inventory(Vec::new())
        .await
        .map_err(|e| failed(e, 0))?
        .image_store;
    if store == ImageStore::Graphdriver {
        manifest.image_tags.clear();
    }
    match send_manifest(calls, image, manifest, &ReleaseAction::Load, sent.clone()).await {
        Ok(outcome) => Ok(outcome.totals.bytes_sent),
        Err(e) => Err(failed(e, sent.bytes())),
    }
}

/// Deploys the whole `package` to `receiver` (`/deployment/full`).
async fn deploy_whole(
    receiver: &ReceiverClient,
    package: &PackageInfo,
    release: &Release,
    before: Option<String>,
) -> Result<Moved, NotMoved> {
    match deploy_package(
        receiver,
        package,
        &release.spec,
        release.correlation_id.as_deref(),
        Arc::new(NoProgress),
    )
    .await
    {
        Ok((transfer, record)) => Ok(Moved {
            deployment_id: record.deployment_id,
            version_before: record.previous_container_id.as_ref().and(before),
            version_after: record.image,
            bytes: transfer.bytes,
        }),
        Err(e) => Err(NotMoved {
            // A record means the receiver got the whole package and ran the deployment.
            bytes: match &e {
                SenderError::Deployment(_) => package.package_size,
                _ => 0,
            },
            error: HostError {
                code: e.code(),
                message: e.to_string(),
            },
            version_before: before,
            finished_late: None,
            unknown: false,
        }),
    }
}

/// The upload bytes a release transfer reported, the most it reached; and, for a host of the
/// first step, the moment its upload ended.
#[derive(Debug, Default)]
struct UploadCounter {
    bytes: AtomicU64,
    uploaded: Option<(Arc<FirstStepSent>, usize)>,
}

impl UploadCounter {
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Which hosts of a rollout's first step still have bytes to send; opens its gate (see
/// [`RolloutOptions::preload_after`]) once none has.
#[derive(Debug)]
struct FirstStepSent {
    pending: std::sync::Mutex<std::collections::BTreeSet<usize>>,
    gate: tokio::sync::watch::Sender<bool>,
}

impl FirstStepSent {
    fn new(hosts: Vec<usize>) -> Self {
        let open = hosts.is_empty();
        Self {
            pending: std::sync::Mutex::new(hosts.into_iter().collect()),
            gate: tokio::sync::watch::Sender::new(open),
        }
    }

    /// The gate, open once every first-step host has sent its bytes.
    fn opened(&self) -> tokio::sync::watch::Receiver<bool> {
        self.gate.subscribe()
    }

    /// Host `index` has sent its bytes (or ended); any other host is ignored.
    fn sent(&self, index: usize) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.remove(&index) && pending.is_empty() {
            self.gate.send_replace(true);
        }
    }
}

/// Tells [`FirstStepSent`] that host `.1` has ended when dropped.
struct SentOnDrop<'a>(&'a FirstStepSent, usize);

impl Drop for SentOnDrop<'_> {
    fn drop(&mut self) {
        self.0.sent(self.1);
    }
}

impl Progress for UploadCounter {
    fn report(&self, event: ProgressEvent<'_>) {
        if event.stage == Stage::Upload && event.message.is_none() {
            self.bytes.fetch_max(event.done, Ordering::Relaxed);
            if event.finished {
                if let Some((first_sent, index)) = &self.uploaded {
                    first_sent.sent(*index);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preload_gate_opens_once_every_host_of_the_first_step_has_sent() {
        let first = FirstStepSent::new(vec![0, 1]);
        let gate = first.opened();
        first.sent(3);
        first.sent(0);
        assert!(!*gate.borrow(), "host 1 still sends");
        {
            let _ended = SentOnDrop(&first, 1);
        }
        assert!(*gate.borrow());
        first.sent(1);
        assert!(*gate.borrow(), "told twice, it stays open");
        assert!(*FirstStepSent::new(Vec::new()).opened().borrow());
    }

    #[test]
    fn a_first_step_hosts_finished_upload_opens_the_preload_gate_and_nothing_else_does() {
        use crate::pipeline::progress::ProgressExt as _;
        let first = Arc::new(FirstStepSent::new(vec![0]));
        let gate = first.opened();
        let counter = |index| UploadCounter {
            uploaded: Some((Arc::clone(&first), index)),
            ..UploadCounter::default()
        };
        let (canary, other) = (counter(0), counter(1));
        canary.advance(Stage::Upload, 10, Some(20));
        canary.message(Stage::Upload, "layer sent");
        canary.finish(Stage::Deploy, 0);
        other.finish(Stage::Upload, 5);
        assert!(
            !*gate.borrow(),
            "only the canary's own upload's end opens it"
        );
        assert_eq!(canary.bytes(), 10);
        canary.finish(Stage::Upload, 20);
        assert!(*gate.borrow());
        assert_eq!(canary.bytes(), 20);
    }
}
