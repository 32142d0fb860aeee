//! Faults in the middle of deployments, against the real `deploy-receiver` binary (a child
//! process) and the real Docker engine:
//!
//! - the receiver killed with SIGKILL at 25 points of deploys (upload, load, the stop, rename,
//!   create and start of containers, the health check, cleanup, rollback) and restarted on the
//!   same directories: one running container, a journal that agrees with Docker, no partial file;
//! - Docker's socket cut in the middle of an image load and between a container's create and its
//!   start. The cut is a real fault on a real connection to the real engine, not a mock: the
//!   receiver's `DOCKER_HOST` is a Unix-socket proxy in the test (`common::docker_proxy`) that forwards
//!   every byte to `/var/run/docker.sock` until it drops all its connections and stops accepting.
//!
//! Figures are printed on stderr: `cargo nextest run -p deploy-receiver --test faults --no-capture`.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::container::ListContainersOptions;
use bollard::Docker;
use common::docker_proxy::{DockerProxy, Rule};
use common::*;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::DeploymentSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Dockerfile lines for a container that shuts down like a real service, with `secs` of work
/// after SIGTERM. (busybox httpd as PID 1 ignores SIGTERM: every stop would wait out Docker's
/// 10 s timeout.)
fn graceful_stop(secs: f64) -> String {
    format!(
        r#"CMD ["/bin/busybox","sh","-c","trap '/bin/busybox sleep {secs}; exit 0' TERM; /bin/busybox httpd -f -p 80 -h /www & wait"]"#
    )
}

/// How long the SIGKILL test's containers take to stop.
const STOP_SECS: f64 = 1.0;

// ---------------------------------------------------------------------------------------------
// SIGKILL during deploys

/// What the deploy under test is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// The other healthy version: the deploy completes unless cut short.
    Healthy,
    /// A version whose health check always fails: the deploy rolls back.
    Failing,
}

/// When the receiver is killed.
#[derive(Clone, Copy, Debug)]
enum When {
    /// This fraction of an undisturbed deploy's duration after the request starts.
    After(f64),
    /// As soon as the test sees this (polling Docker and the journal's files every few ms).
    Seen(Sign),
}

/// What the test watches for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sign {
    /// The journal holds the new deployment: the package is stored, its load starts.
    Begun,
    /// The journal names the container to replace: its stop is asked for next.
    PreviousNamed,
    /// The old container is renamed aside.
    SetAside,
    /// A new container exists.
    Created,
    /// The new container runs.
    Started,
    /// Docker reports the new container healthy.
    Healthy,
    /// Docker reports it unhealthy (or it is already gone again).
    Unhealthy,
    /// The old container is gone: cleanup after a passed health check.
    OldRemoved,
    /// The new container is gone again: rollback, before the old one is back.
    NewRemoved,
    /// The old container has its name back: rollback, before it is started.
    RenamedBack,
}

/// A container of the deployment's name (or set aside from it), as `docker ps -a` lists it.
#[derive(Clone, Debug)]
struct Listed {
    id: String,
    name: String,
    state: String,
    status: String,
}

impl Listed {
    fn running(&self) -> bool {
        self.state == "running"
    }
}

/// Docker and the journal as the test sees them at one moment.
struct View {
    /// The deployment under test, as its journal file says (written atomically by the receiver).
    record: Option<DeploymentRecord>,
    /// The container that ran before the deploy.
    old: Option<Listed>,
    /// Any other container of the name.
    new: Option<Listed>,
    count: usize,
    running: usize,
}

async fn listed(docker: &Docker, name: &str) -> Vec<Listed> {
    let filters = HashMap::from([("name".to_owned(), vec![name.to_owned()])]);
    let all = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters,
            ..Default::default()
        }))
        .await
        .expect("docker ps");
    all.into_iter()
        .filter_map(|c| {
            let names = c.names.unwrap_or_default();
            let own = names
                .iter()
                .find(|n| *n == &format!("/{name}") || n.starts_with(&format!("/{name}.")))?;
            Some(Listed {
                id: c.id?,
                name: own.clone(),
                state: c.state.unwrap_or_default(),
                status: c.status.unwrap_or_default(),
            })
        })
        .collect()
}

/// Journal records on disk that are not in `known`.
fn new_records(journal: &Path, known: &HashSet<Uuid>) -> Vec<DeploymentRecord> {
    let Ok(entries) = std::fs::read_dir(journal) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id: Uuid = name.strip_suffix(".json")?.parse().ok()?;
            if known.contains(&id) {
                return None;
            }
            serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()
        })
        .collect()
}

async fn view(
    docker: &Docker,
    name: &str,
    old_id: &str,
    journal: &Path,
    known: &HashSet<Uuid>,
) -> View {
    let all = listed(docker, name).await;
    View {
        record: new_records(journal, known).into_iter().next(),
        old: all.iter().find(|c| c.id == old_id).cloned(),
        new: all.iter().find(|c| c.id != old_id).cloned(),
        count: all.len(),
        running: all.iter().filter(|c| c.running()).count(),
    }
}

/// Remembers what was seen before, for signs that are a change.
#[derive(Default)]
struct History {
    new_seen: bool,
    aside_seen: bool,
}

fn shows(sign: Sign, v: &View, h: &History, name: &str) -> bool {
    let aside = |c: &Listed| c.name.starts_with(&format!("/{name}.previous-"));
    let new_gone = h.new_seen && v.new.is_none();
    match sign {
        Sign::Begun => v.record.is_some(),
        Sign::PreviousNamed => v
            .record
            .as_ref()
            .is_some_and(|r| r.previous_container_id.is_some()),
        Sign::SetAside => v.old.as_ref().is_some_and(aside),
        Sign::Created => v.new.is_some(),
        Sign::Started => v.new.as_ref().is_some_and(Listed::running) || new_gone,
        Sign::Healthy => v
            .new
            .as_ref()
            .is_some_and(|c| c.status.contains("(healthy)")),
        Sign::Unhealthy => {
            v.new
                .as_ref()
                .is_some_and(|c| c.status.contains("(unhealthy)"))
                || new_gone
        }
        Sign::OldRemoved => v.record.is_some() && v.old.is_none(),
        Sign::NewRemoved => new_gone,
        Sign::RenamedBack => h.aside_seen && v.old.as_ref().is_some_and(|c| !aside(c)),
    }
}

/// Where the deploy was when the receiver died, from what it left (the receiver is dead, so
/// only Docker operations already asked for still move).
fn phase(v: &View, name: &str) -> &'static str {
    let Some(r) = &v.record else {
        return "upload";
    };
    if r.status != DeploymentStatus::InProgress {
        return "after finishing";
    }
    if r.image_id.is_none() {
        return "load";
    }
    let old_aside = v
        .old
        .as_ref()
        .is_some_and(|c| c.name.starts_with(&format!("/{name}.previous-")));
    match (&v.old, &v.new) {
        _ if r.previous_container_id.is_none() => "after load",
        (Some(old), None) if r.container_id.is_none() && !old_aside => {
            if old.running() {
                "stop"
            } else {
                "rename"
            }
        }
        (_, None) if r.container_id.is_none() => "create",
        (_, Some(new)) if !new.running() => "start",
        (_, Some(new)) if new.status.contains("(healthy)") => "cleanup",
        (_, Some(new)) if new.status.contains("(unhealthy)") => "rollback",
        (_, Some(_)) => "health check",
        (None, None) => "cleanup",
        (Some(_), None) => "rollback",
    }
}

/// The store after a restart: no temp file, every package whole with its manifest beside it.
fn assert_store_clean(packages: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(packages)
        .expect("package dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        if let Some(id) = name.strip_suffix(".pkg") {
            let manifest = deploy_protocol::PackageManifest::from_slice(
                &std::fs::read(packages.join(format!("{id}.manifest.json")))
                    .unwrap_or_else(|e| panic!("{name} has no manifest: {e}; store: {names:?}")),
            )
            .expect("manifest");
            let size = std::fs::metadata(packages.join(name)).expect("pkg").len();
            assert_eq!(size, manifest.package_size, "{name} is partial");
        } else if let Some(id) = name.strip_suffix(".manifest.json") {
            assert!(
                names.contains(&format!("{id}.pkg")),
                "manifest without package: {name}"
            );
        } else {
            panic!("temp or stray file in the store after the restart: {name}; store: {names:?}");
        }
    }
}

fn assert_journal_clean(journal: &Path) {
    for entry in std::fs::read_dir(journal)
        .expect("journal dir")
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".json"), "stray file in the journal: {name}");
    }
}

/// Every record of the journal, through the API, once none is IN_PROGRESS (start-up
/// reconciliation has run).
async fn settled_journal(daemon: &Daemon) -> Vec<DeploymentRecord> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = daemon.get("/deployments?limit=1000").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let records: Vec<DeploymentRecord> =
            serde_json::from_value(body["deployments"].clone()).expect("records");
        if records
            .iter()
            .all(|r| r.status != DeploymentStatus::InProgress)
        {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "still IN_PROGRESS 60 s after the restart: {records:#?}\nlog:\n{}",
            daemon.logs("").join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn label(c: &bollard::models::ContainerInspectResponse, key: &str) -> Option<String> {
    c.config.as_ref()?.labels.as_ref()?.get(key).cloned()
}

/// The three versions the SIGKILL test deploys, built and `docker save`d once.
struct Versions {
    a: String,
    b: String,
    failing: String,
    /// The page each version serves.
    pages: HashMap<String, &'static str>,
    /// Each version's uncompressed package.
    saved: HashMap<String, Vec<u8>>,
}

impl Versions {
    /// Healthy versions `a` and `b` and a `failing` one of `name`, each stopping in
    /// [`STOP_SECS`]: longer than a restart of the receiver takes, so a kill during a stop is
    /// still in it then.
    async fn build(docker: &Docker, cleanup: &mut Guard, name: &str) -> Self {
        let (a, b, failing) = (
            format!("{name}:a"),
            format!("{name}:b"),
            format!("{name}:failing"),
        );
        let stop = graceful_stop(STOP_SECS);
        build_image_with(docker, cleanup, &a, ImageSpec::healthy("a"), &stop).await;
        build_image_with(docker, cleanup, &b, ImageSpec::healthy("b"), &stop).await;
        build_image_with(docker, cleanup, &failing, ImageSpec::failing("f"), &stop).await;
        let pages = HashMap::from([(a.clone(), "a"), (b.clone(), "b"), (failing.clone(), "f")]);
        let mut saved = HashMap::new();
        for tag in [&a, &b, &failing] {
            saved.insert(tag.clone(), save_image(docker, tag).await);
        }
        Self {
            a,
            b,
            failing,
            pages,
            saved,
        }
    }

    /// The version a deploy of `target` brings when `current` runs.
    fn next(&self, target: Target, current: &str) -> &String {
        match target {
            Target::Failing => &self.failing,
            Target::Healthy if current == self.a => &self.b,
            Target::Healthy => &self.a,
        }
    }

    /// `POST /deployment/full` of `tag` to `daemon`.
    async fn deploy(
        &self,
        daemon: &Daemon,
        tag: &str,
        spec: &DeploymentSpec,
    ) -> (StatusCode, Value) {
        daemon.full(&[tag], self.saved[tag].clone(), spec).await
    }
}

/// How long undisturbed deploys take.
struct Undisturbed {
    healthy: Duration,
    failing: Duration,
}

/// Deploys version 1 (`a`), then one undisturbed deploy of each kind (`b`, then `failing`, which
/// rolls back to `b`), timed.
async fn deploy_v1_and_time_undisturbed_deploys(
    daemon: &Daemon,
    versions: &Versions,
    spec: &DeploymentSpec,
) -> Undisturbed {
    let (status, body) = versions.deploy(daemon, &versions.a, spec).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let started = Instant::now();
    let (status, body) = versions.deploy(daemon, &versions.b, spec).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let healthy = started.elapsed();
    let started = Instant::now();
    let (status, body) = versions.deploy(daemon, &versions.failing, spec).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(record(&body).status, DeploymentStatus::RolledBack);
    let failing = started.elapsed();
    Undisturbed { healthy, failing }
}

/// Where the receiver is killed: at fractions of an undisturbed deploy and at each sign a deploy
/// or its rollback shows.
fn kill_plan() -> Vec<(Target, When)> {
    let mut plan: Vec<(Target, When)> = Vec::new();
    for k in 0..=10 {
        plan.push((Target::Healthy, When::After(f64::from(k) / 10.0)));
    }
    for sign in [
        Sign::Begun,
        Sign::PreviousNamed,
        Sign::SetAside,
        Sign::Created,
        Sign::Started,
        Sign::Healthy,
        Sign::OldRemoved,
    ] {
        plan.push((Target::Healthy, When::Seen(sign)));
    }
    for fraction in [0.5, 0.7, 0.9] {
        plan.push((Target::Failing, When::After(fraction)));
    }
    for sign in [
        Sign::Started,
        Sign::Unhealthy,
        Sign::NewRemoved,
        Sign::RenamedBack,
    ] {
        plan.push((Target::Failing, When::Seen(sign)));
    }
    assert!(plan.len() >= 20);
    plan
}

/// What ran, and what the journal held, before a deploy under test.
struct Before {
    old_id: String,
    old_deployment: String,
    known: HashSet<Uuid>,
}

impl Before {
    async fn look(docker: &Docker, name: &str, journal: &Path) -> Self {
        let old = inspect(docker, name).await;
        Self {
            old_id: old.id.clone().expect("id"),
            old_deployment: label(&old, "io.deploy.deployment_id").expect("label"),
            known: new_records(journal, &HashSet::new())
                .iter()
                .map(|r| r.deployment_id)
                .collect(),
        }
    }
}

/// Waits, from `started`, until the kill point `when` of a deploy of `target` (or until the
/// request finished).
#[allow(clippy::too_many_arguments)]
async fn wait_for_kill_point(
    docker: &Docker,
    name: &str,
    journal: &Path,
    before: &Before,
    (target, when): (Target, When),
    undisturbed: &Undisturbed,
    started: Instant,
    request: &tokio::task::JoinHandle<reqwest::Result<(StatusCode, Value)>>,
) {
    match when {
        When::After(fraction) => {
            let whole = match target {
                Target::Healthy => undisturbed.healthy,
                Target::Failing => undisturbed.failing,
            };
            tokio::time::sleep_until((started + whole.mul_f64(fraction)).into()).await;
        }
        When::Seen(sign) => {
            let mut history = History::default();
            let deadline = started + Duration::from_secs(60);
            loop {
                let v = view(docker, name, &before.old_id, journal, &before.known).await;
                if shows(sign, &v, &history, name) || request.is_finished() {
                    break;
                }
                history.new_seen |= v.new.is_some();
                history.aside_seen |= v
                    .old
                    .as_ref()
                    .is_some_and(|c| c.name.starts_with(&format!("/{name}.previous-")));
                assert!(Instant::now() < deadline, "{sign:?} never seen");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    }
}

/// Exactly one container of the name, running, and what it runs agrees with the journal: it is
/// the newest SUCCEEDED deployment's. Returns the container and that deployment.
async fn assert_one_running_container_as_journalled<'r>(
    docker: &Docker,
    name: &str,
    records: &'r [DeploymentRecord],
    versions: &Versions,
    context: &str,
) -> (Listed, Uuid, &'r DeploymentRecord) {
    let containers = listed(docker, name).await;
    assert_eq!(containers.len(), 1, "{context}: {containers:?}");
    assert!(containers[0].running(), "{context}: {containers:?}");
    assert_eq!(containers[0].name, format!("/{name}"), "{context}");
    let running = inspect(docker, name).await;
    let running_deployment: Uuid = label(&running, "io.deploy.deployment_id")
        .expect("label")
        .parse()
        .expect("uuid");
    // Newest first.
    let newest_success = records
        .iter()
        .find(|r| r.container_name == name && r.status == DeploymentStatus::Succeeded)
        .expect("a succeeded deployment");
    assert_eq!(
        newest_success.deployment_id, running_deployment,
        "{context}: the newest SUCCEEDED deployment is the one running"
    );
    assert_eq!(newest_success.container_id, running.id, "{context}");
    if let Some(image_id) = &newest_success.image_id {
        assert_eq!(running.image.as_ref(), Some(image_id), "{context}");
    }
    assert_eq!(
        page(docker, name).await,
        versions.pages[&newest_success.image],
        "{context}"
    );
    (containers[0].clone(), running_deployment, newest_success)
}

/// The interrupted deployment (`attempt`, if it began) completed or was undone: counted in
/// `tally`.
fn assert_completed_or_undone(
    attempt: Option<&DeploymentRecord>,
    running: &Listed,
    running_deployment: Uuid,
    before: &Before,
    target: Target,
    tally: &mut Tally,
    context: &str,
) {
    match attempt {
        None => {
            tally.not_begun += 1;
            assert_eq!(
                running_deployment.to_string(),
                before.old_deployment,
                "{context}"
            );
        }
        Some(r) if r.deployment_id == running_deployment => {
            assert_eq!(r.status, DeploymentStatus::Succeeded, "{context}");
            assert_eq!(target, Target::Healthy, "{context}: a failing version runs");
            tally.completed += 1;
        }
        Some(r) => {
            assert_eq!(
                running_deployment.to_string(),
                before.old_deployment,
                "{context}"
            );
            assert_eq!(running.id, before.old_id, "{context}");
            match r.status {
                DeploymentStatus::RolledBack => tally.rolled_back += 1,
                DeploymentStatus::Failed => {
                    assert!(
                        r.previous_container_id.is_none() && r.container_id.is_none(),
                        "{context}: FAILED after touching containers: {r:#?}"
                    );
                    tally.failed_untouched += 1;
                }
                other => panic!("{context}: {other:?} {r:#?}"),
            }
        }
    }
}

/// And it stays so: a stop that Docker was still carrying out for the dead receiver has ended
/// [`STOP_SECS`] + 1 s after the kill, and `running` still runs alone.
async fn assert_still_one_running_after_stops_end(
    docker: &Docker,
    name: &str,
    killed: Instant,
    running: &Listed,
    context: &str,
) {
    tokio::time::sleep_until((killed + Duration::from_secs_f64(STOP_SECS + 1.0)).into()).await;
    let later = listed(docker, name).await;
    assert_eq!(
        later
            .iter()
            .map(|c| (&c.id, c.running()))
            .collect::<Vec<_>>(),
        [(&running.id, true)],
        "{context}: {STOP_SECS} s later: {later:?}"
    );
}

async fn assert_health_ok(daemon: &Daemon, context: &str) {
    let health = http()
        .get(format!("{}/health", daemon.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK, "{context}");
}

#[derive(Default)]
struct Tally {
    phases: Vec<&'static str>,
    completed: usize,
    rolled_back: usize,
    failed_untouched: usize,
    not_begun: usize,
    two_at_kill: usize,
    none_running_at_kill: usize,
    slowest_settle: Duration,
}

impl Tally {
    /// Prints the figures of `kills` kills.
    fn print(&self, kills: usize, undisturbed: &Undisturbed) {
        let mut by_phase: Vec<(&str, usize)> = Vec::new();
        for p in &self.phases {
            match by_phase.iter_mut().find(|(q, _)| q == p) {
                Some((_, n)) => *n += 1,
                None => by_phase.push((p, 1)),
            }
        }
        let points = by_phase
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "SIGKILL during deploys: {kills} kills at points {points}; outcomes: {} completed, {} \
             rolled back ({} restored the previous container, {} failed before touching a \
             container, {} killed before the deployment began), 0 with two containers, 0 with \
             none; at the kills {} had two containers and {} none running; undisturbed deploys \
             {:.1} s (healthy) and {:.1} s (rolled back); restart to settled journal at most \
             {:.1} s",
            self.completed,
            self.rolled_back + self.failed_untouched + self.not_begun,
            self.rolled_back,
            self.failed_untouched,
            self.not_begun,
            self.two_at_kill,
            self.none_running_at_kill,
            undisturbed.healthy.as_secs_f64(),
            undisturbed.failing.as_secs_f64(),
            self.slowest_settle.as_secs_f64(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_25_points_of_deploys_leaves_one_running_container_and_a_journal_that_agrees() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let versions = Versions::build(&docker, &mut cleanup, &name).await;
    let dir = temp_dir();
    let packages = dir.path().join("packages");
    let state = dir.path().join("state");
    let journal = state.join("deployments");
    let spec = web_spec(&name);
    let mut daemon = start_daemon(&packages, &state, &[]);
    let undisturbed = deploy_v1_and_time_undisturbed_deploys(&daemon, &versions, &spec).await;
    let mut current = versions.b.clone();

    let plan = kill_plan();
    let mut tally = Tally::default();
    for (i, (target, when)) in plan.iter().copied().enumerate() {
        // Start a deploy and kill the receiver at the planned point.
        let image = versions.next(target, &current).clone();
        let before = Before::look(&docker, &name, &journal).await;
        let api = Api::clone(&daemon);
        let (tag, package, deploy_spec) =
            (image.clone(), versions.saved[&image].clone(), spec.clone());
        let started = Instant::now();
        let request =
            tokio::spawn(async move { api.try_full(&[&tag], package, &deploy_spec).await });
        let point = (target, when);
        wait_for_kill_point(
            &docker,
            &name,
            &journal,
            &before,
            point,
            &undisturbed,
            started,
            &request,
        )
        .await;
        let kill_at = started.elapsed();
        daemon.sigkill();
        request.abort();
        let at_kill = view(&docker, &name, &before.old_id, &journal, &before.known).await;
        let phase = phase(&at_kill, &name);
        tally.phases.push(phase);
        tally.two_at_kill += usize::from(at_kill.count >= 2);
        tally.none_running_at_kill += usize::from(at_kill.running == 0);

        // Restart on the same directories; start-up reconciliation settles the deploy.
        let restarted = Instant::now();
        daemon = start_daemon(&packages, &state, &[]);
        let records = settled_journal(&daemon).await;
        let settle = restarted.elapsed();
        tally.slowest_settle = tally.slowest_settle.max(settle);
        let context = format!(
            "kill {i} ({target:?}, {when:?}) at {} ms, phase {phase}",
            kill_at.as_millis()
        );

        // One running container, the journal's; the interrupted deployment completed or undone.
        let (running, running_deployment, newest_success) =
            assert_one_running_container_as_journalled(
                &docker, &name, &records, &versions, &context,
            )
            .await;
        let attempt = records
            .iter()
            .find(|r| !before.known.contains(&r.deployment_id));
        assert_completed_or_undone(
            attempt,
            &running,
            running_deployment,
            &before,
            target,
            &mut tally,
            &context,
        );
        current = newest_success.image.clone();
        assert_still_one_running_after_stops_end(
            &docker,
            &name,
            started + kill_at,
            &running,
            &context,
        )
        .await;
        assert_store_clean(&packages);
        assert_journal_clean(&journal);
        assert_health_ok(&daemon, &context).await;
        eprintln!(
            "  kill {i:2}: {target:?} {when:?} at {} ms, phase {phase}: {} container(s), {} running at the kill -> {} (settled {} ms after the restart{})",
            kill_at.as_millis(),
            at_kill.count,
            at_kill.running,
            match attempt {
                None => "not begun".to_owned(),
                Some(r) => format!("{:?}", r.status),
            },
            settle.as_millis(),
            attempt
                .and_then(|r| r.stages.last())
                .and_then(|s| s.detail.as_deref())
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
        );
    }

    // And the restarted receiver deploys as before.
    let next = if current == versions.a {
        &versions.b
    } else {
        &versions.a
    };
    let (status, body) = versions.deploy(&daemon, next, &spec).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(page(&docker, &name).await, versions.pages[next]);

    tally.print(plan.len(), &undisturbed);
    drop(daemon);
}

// ---------------------------------------------------------------------------------------------
// Docker cut off mid-operation

/// `/health` answers 200 (degraded: Docker unreachable) while the engine is cut off.
async fn assert_serving_degraded(daemon: &Daemon) {
    let response = http()
        .get(format!("{}/health", daemon.base))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["docker_available"], json!(false), "{body}");
}

async fn deployment(daemon: &Daemon, id: Uuid) -> DeploymentRecord {
    let (status, body) = daemon.get(&format!("/deployments/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    record(&body)
}

/// Polls deployment `id` until it is no longer IN_PROGRESS (at most a minute: the receiver
/// settles it on its own once Docker answers again); answers it.
async fn settled(daemon: &Daemon, id: Uuid) -> DeploymentRecord {
    let since = Instant::now();
    loop {
        let r = deployment(daemon, id).await;
        if r.status != DeploymentStatus::InProgress {
            return r;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "still IN_PROGRESS a minute after Docker came back\nlog:\n{}",
            daemon.logs("").join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two healthy versions, the first deployed through the proxy; returns the second's tag and
/// package and the first one's container id.
async fn deployed_v1(
    docker: &Docker,
    cleanup: &mut Guard,
    daemon: &Daemon,
    name: &str,
) -> (String, Vec<u8>, String) {
    let (v1, v2) = (format!("{name}:v1"), format!("{name}:v2"));
    let stop = graceful_stop(0.5);
    build_image_with(docker, cleanup, &v1, ImageSpec::healthy("v1"), &stop).await;
    build_image_with(docker, cleanup, &v2, ImageSpec::healthy("v2"), &stop).await;
    let package = save_image(docker, &v2).await;
    // Not in the engine until a load of it goes through.
    docker
        .remove_image(&v2, None, None)
        .await
        .expect("remove v2");
    let (status, body) = daemon
        .full(&[&v1], save_image(docker, &v1).await, &web_spec(name))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let old = inspect(docker, name).await.id.expect("id");
    (v2, package, old)
}

/// A receiver child process whose `DOCKER_HOST` is a [`DockerProxy`] to the real engine.
struct Proxied {
    dir: tempfile::TempDir,
    proxy: DockerProxy,
    daemon: Daemon,
}

impl Proxied {
    fn start() -> Self {
        let dir = temp_dir();
        let proxy = DockerProxy::start(dir.path().join("docker.sock"));
        let daemon = start_daemon(
            &dir.path().join("packages"),
            &dir.path().join("state"),
            &[("DOCKER_HOST", proxy.docker_host())],
        );
        Self { dir, proxy, daemon }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_health_requests_asks_the_engine_once() {
    let Proxied {
        dir: _dir,
        proxy,
        daemon,
    } = Proxied::start();
    // Past the reuse of whatever the start-up wait for /health asked.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = proxy.versions_asked();
    let client = http();
    let answers = futures::future::join_all((0..50).map(|_| {
        let client = client.clone();
        let url = format!("{}/health", daemon.base);
        async move {
            let body: Value = client
                .get(url)
                .send()
                .await
                .expect("health")
                .json()
                .await
                .expect("json");
            body["docker_available"].clone()
        }
    }))
    .await;
    let asked = proxy.versions_asked() - before;
    eprintln!("figure: 50 concurrent /health requests asked the engine's /version {asked} time(s)");
    assert!(answers.iter().all(|a| *a == json!(true)), "{answers:?}");
    // One ping for all of them (and a version negotiation, when the client had none; one more
    // ping if the flood outlasts a second on a loaded machine), not one each.
    assert!(asked <= 4, "the engine was asked {asked} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cut_mid_load_is_503_docker_unavailable_changes_no_container_and_the_next_deploy_succeeds(
) {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let Proxied {
        dir: _dir,
        mut proxy,
        daemon,
    } = Proxied::start();
    let (v2, package, old) = deployed_v1(&docker, &mut cleanup, &daemon, &name).await;

    let half = package.len() as u64 / 2;
    proxy.arm(Rule::MidLoad(half));
    let started = Instant::now();
    let (status, body) = daemon.full(&[&v2], package.clone(), &web_spec(&name)).await;
    let answered = started.elapsed();
    let cut = proxy.cut_reason().expect("the proxy cut the load");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], json!("DOCKER_UNAVAILABLE"), "{body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains(&proxy.docker_host()), "{message}");
    let failed = record(&body);
    assert_eq!(failed.status, DeploymentStatus::Failed, "{body}");

    // Engine still cut off: the receiver serves, and no container changed.
    assert_serving_degraded(&daemon).await;
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        std::slice::from_ref(&old)
    );
    assert!(inspect(&docker, &name).await.state.and_then(|s| s.running) == Some(true));
    assert!(!image_exists(&docker, &v2).await, "nothing was loaded");
    assert_eq!(
        deployment(&daemon, failed.deployment_id).await.status,
        DeploymentStatus::Failed
    );

    // The engine is back: the stored package loads and deploys.
    proxy.restore();
    let package_id = failed.package_id.expect("package id");
    let (status, body) = daemon
        .post("/deployment/load", &json!({ "package_id": package_id }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut spec = web_spec(&name);
    spec.image = Some(v2.clone());
    let (status, body) = daemon
        .post(
            "/deployment/deploy",
            &json!({ "deployment": spec, "package_id": package_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    eprintln!(
        "Docker cut mid-load ({cut} of {} bytes): 503 DOCKER_UNAVAILABLE after {} ms (\"{message}\"), \
         record FAILED, the v1 container untouched and running, nothing loaded, /health 200 \
         (degraded); socket restored: the stored package loaded and deployed, 200",
        package.len(),
        answered.as_millis(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cut_between_create_and_start_is_503_and_rolled_back_once_docker_is_back() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let Proxied {
        dir: _dir,
        mut proxy,
        daemon,
    } = Proxied::start();
    let (v2, package, old) = deployed_v1(&docker, &mut cleanup, &daemon, &name).await;

    proxy.arm(Rule::BeforeStart);
    let started = Instant::now();
    let (status, body) = daemon.full(&[&v2], package.clone(), &web_spec(&name)).await;
    let answered = started.elapsed();
    let cut = proxy.cut_reason().expect("the proxy cut before the start");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], json!("DOCKER_UNAVAILABLE"), "{body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains(&proxy.docker_host()), "{message}");
    assert!(
        message.contains("rolls back as soon as Docker answers again"),
        "{message}"
    );
    let interrupted = record(&body);
    assert_eq!(interrupted.status, DeploymentStatus::InProgress, "{body}");

    // While the engine is away the receiver serves, and the deployment waits to be undone.
    assert_serving_degraded(&daemon).await;
    let left = listed(&docker, &name).await;
    assert_eq!(
        left.len(),
        2,
        "the old container set aside, the new one created: {left:?}"
    );
    assert_eq!(
        deployment(&daemon, interrupted.deployment_id).await.status,
        DeploymentStatus::InProgress
    );

    // The engine is back: the deployment is rolled back without another request.
    proxy.restore();
    let restored = Instant::now();
    let settled = settled(&daemon, interrupted.deployment_id).await;
    let converged = restored.elapsed();
    assert_eq!(settled.status, DeploymentStatus::RolledBack, "{settled:#?}");
    assert_eq!(
        settled.error.as_ref().map(|e| e.code),
        Some(deploy_protocol::ErrorCode::DockerUnavailable)
    );
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        std::slice::from_ref(&old)
    );
    assert_eq!(page(&docker, &name).await, "v1");

    // And the next deployment goes through.
    let (status, body) = daemon.full(&[&v2], package, &web_spec(&name)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    eprintln!(
        "Docker cut between create and start ({cut}): 503 DOCKER_UNAVAILABLE after {} ms \
         (\"{}; ...\"), deployment IN_PROGRESS while the engine was away, /health 200 \
         (degraded); socket restored: rolled back to the v1 container {:.1} s later without \
         another request; next deploy 200",
        answered.as_millis(),
        message.split("; ").next().unwrap_or_default(),
        converged.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cut_while_an_unhealthy_deployment_rolls_back_is_rolled_back_even_if_docker_then_calls_it_healthy(
) {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let Proxied {
        dir: _dir,
        mut proxy,
        daemon,
    } = Proxied::start();
    let (v2, package, old) = deployed_v1(&docker, &mut cleanup, &daemon, &name).await;

    // v2's own HEALTHCHECK passes, but the deployment's check probes a path httpd does not
    // serve: the receiver judges v2 unhealthy and rolls back, and Docker goes away just as the
    // rollback asks it to remove v2's container.
    let mut spec = web_spec(&name);
    spec.health_check.kind = deploy_protocol::HealthCheckKind::Http;
    spec.health_check.path = Some("/missing".into());
    spec.health_check.interval_secs = 0.2;
    spec.health_check.retries = 2;
    proxy.arm(Rule::BeforeRemove);
    let (status, body) = daemon.full(&[&v2], package, &spec).await;
    let cut = proxy
        .cut_reason()
        .expect("the proxy cut before the removal");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], json!("DOCKER_UNAVAILABLE"), "{body}");
    let interrupted = record(&body);
    assert_eq!(interrupted.status, DeploymentStatus::InProgress, "{body}");
    let new = interrupted.container_id.clone().expect("v2's container");

    // Docker, asked directly, comes to call v2's container healthy.
    let waited = Instant::now();
    loop {
        let state = docker
            .inspect_container(&new, None)
            .await
            .expect("v2's container is still there")
            .state;
        let health = state.and_then(|s| s.health).and_then(|h| h.status);
        if health == Some(bollard::models::HealthStatusEnum::HEALTHY) {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "v2's HEALTHCHECK never passed: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The engine is back: the deployment is still rolled back, as its failed check said.
    proxy.restore();
    let restored = Instant::now();
    let settled = settled(&daemon, interrupted.deployment_id).await;
    assert_eq!(settled.status, DeploymentStatus::RolledBack, "{settled:#?}");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        std::slice::from_ref(&old),
        "v1's container is back and v2's is gone"
    );
    assert_eq!(page(&docker, &name).await, "v1");
    eprintln!(
        "Docker cut during the rollback of an unhealthy v2 ({cut}), v2 then healthy by its own \
         HEALTHCHECK: rolled back to v1 {:.1} s after Docker came back",
        restored.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_stopped_before_a_deployment_docker_cut_is_restored_stopped() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let Proxied {
        dir: _dir,
        mut proxy,
        daemon,
    } = Proxied::start();
    let (v2, package, old) = deployed_v1(&docker, &mut cleanup, &daemon, &name).await;
    // The operator stopped the service before this deployment.
    docker
        .stop_container(&old, None)
        .await
        .expect("stop the v1 container");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    proxy.arm(Rule::BeforeStart);
    let (status, body) = daemon.full(&[&v2], package, &web_spec(&name)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let interrupted = record(&body);
    assert_eq!(interrupted.status, DeploymentStatus::InProgress, "{body}");

    proxy.restore();
    let settled = settled(&daemon, interrupted.deployment_id).await;
    assert_eq!(settled.status, DeploymentStatus::RolledBack, "{settled:#?}");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        std::slice::from_ref(&old),
        "v1's container is back under its name"
    );
    let state = inspect(&docker, &name).await.state.expect("state");
    assert_eq!(
        state.running,
        Some(false),
        "it stays stopped, as it was before the deployment: {state:?}"
    );
}
