//! A `deploy-sender serve` killed (SIGKILL) in the middle of a REST rollout, and started again on
//! the same directories: the rollout is kept and shown INTERRUPTED, with the host it was
//! deploying to IN_PROGRESS, and `DELETE` undoes it: the host whose deployment had ended is
//! rolled back by its deployment id, the host whose deployment was still running when the sender
//! died is found in its receiver's journal, waited for and rolled back. Two cold hosts (extra
//! Docker engines in their own network namespaces), each with the real receiver binary; the
//! sender is the real binary too. What runs afterwards is read from each host's own engine.
//! The same for `deploy-sender deploy` to two hosts: SIGKILLed, its rollout is undone by
//! `deploy-sender rollouts undo`; told SIGTERM, it stops and undoes the rollout itself.

mod layers_common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_testkit::hosts::{main_bridge_exists, TestHost};
use layers_common::{cold_host, workspace_binary, Daemon, Images, SECRET};
use serde_json::{json, Value};

/// The real `deploy-sender serve` on 127.0.0.1:<ephemeral>, on `dir` (packages, layer cache and
/// state); SIGKILLed on drop.
struct Serve {
    child: Child,
    api: String,
}

impl Serve {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(workspace_binary("deploy-sender"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SENDER_BIND", "127.0.0.1:0")
            .env("PACKAGE_DIR", dir.join("packages"))
            .env("DEPLOY_HMAC_SECRET", SECRET)
            .env("DEPLOY_ZSTD_WORKERS", "2")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn deploy-sender serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("deploy-sender listening on ") {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("deploy-sender serve announced its address");
        Self {
            child,
            api: format!("{url}/api/v1"),
        }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the sender");
        let _ = self.child.wait();
    }

    /// One API call; every call carries the same `X-Correlation-Id`, as a CI job's calls would.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.api))
            .header("x-correlation-id", "ci-job-42");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("a sender answer");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Stores the local image `tag` as a package; answers its id.
    async fn package(&self, tag: &str) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/packages",
                Some(json!({"image": tag})),
            )
            .await;
        assert!(status == 200 || status == 201, "POST /packages: {body}");
        body["package_id"]
            .as_str()
            .expect("a package id")
            .to_owned()
    }

    /// Starts a rollout of `package` to `receivers`, one host per step, each host's container
    /// settling for `settle` seconds; answers its id.
    async fn roll_out(&self, package: &str, receivers: &[&str], name: &str, settle: f64) -> String {
        self.roll_out_with(package, receivers, name, settle, json!({}))
            .await
    }

    /// As [`Serve::roll_out`], with more fields of the request from `more`.
    async fn roll_out_with(
        &self,
        package: &str,
        receivers: &[&str],
        name: &str,
        settle: f64,
        more: Value,
    ) -> String {
        let mut request = json!({
            "package_id": package,
            "receivers": receivers,
            "deployment": {
                "container_name": name,
                "restart_policy": "no",
                "health_check": {"kind": "none", "settle_secs": settle},
            },
            "canary": 0,
            "batch": "1",
        });
        if let (Some(request), Some(more)) = (request.as_object_mut(), more.as_object()) {
            request.extend(more.clone());
        }
        let (status, body) = self
            .call(reqwest::Method::POST, "/rollouts", Some(request))
            .await;
        assert_eq!(status, 202, "POST /rollouts: {body}");
        body["rollout_id"]
            .as_str()
            .expect("a rollout id")
            .to_owned()
    }

    /// Polls the rollout until it is no longer RUNNING (3 min at most); its view.
    async fn ended(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(180), |v| {
            v["report"]["status"] != "RUNNING"
        })
        .await
    }

    /// `DELETE /rollouts/{id}`: the status and the body.
    async fn delete(&self, id: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, &format!("/rollouts/{id}"), None)
            .await
    }

    /// Polls the rollout until `done` holds for its view; panics after `limit`.
    async fn wait_for(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let view = self.get(&format!("/rollouts/{id}")).await;
            if done(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "waited {limit:?} in vain: {view:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The image id of the running container `name` on `host`, if one runs.
fn running_image(host: &TestHost, name: &str) -> Option<String> {
    let out = host
        .docker_cli()
        .args(["inspect", "-f", "{{.State.Running}} {{.Image}}", name])
        .output()
        .expect("docker inspect");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.strip_prefix("true ").map(str::to_owned)
}

/// Asserts that every host runs `name` from image `id` (`context` in the message).
fn all_run(hosts: &[TestHost], name: &str, id: &str, context: &Value) {
    for host in hosts {
        assert_eq!(
            running_image(host, name).as_deref(),
            Some(id),
            "{context:#}"
        );
    }
}

/// Two cold hosts (extra engines in their own network namespaces), each with the real receiver
/// binary; two versions of an app built on the main engine (removed on drop); a container name
/// of its own; the sender's directory.
struct TwoHosts {
    _images: Images,
    v1: String,
    v2: String,
    v1_id: String,
    v2_id: String,
    hosts: [TestHost; 2],
    receivers: Vec<Daemon>,
    name: String,
    dir: tempfile::TempDir,
}

impl TwoHosts {
    async fn start(labels: [&'static str; 2], name_prefix: &str) -> Self {
        let images = Images::default();
        let base = images.base(64 * 1024);
        let v1 = images.app(&base, 64 * 1024);
        let v2 = images.app(&base, 64 * 1024);
        let (v1_id, v2_id) = (images.id(&v1), images.id(&v2));
        let hosts = [cold_host(labels[0]).await, cold_host(labels[1]).await];
        let receivers = hosts
            .iter()
            .map(|h| Daemon::start(&h.docker_host()))
            .collect();
        let name = format!(
            "{name_prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            _images: images,
            v1,
            v2,
            v1_id,
            v2_id,
            hosts,
            receivers,
            name,
            dir: tempfile::tempdir().expect("sender dir"),
        }
    }
}

fn outcomes(view: &Value) -> Vec<&str> {
    view["report"]["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["outcome"].as_str().unwrap_or("?"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_the_sender_died_in_is_kept_interrupted_and_delete_rolls_back_what_it_moved() {
    let TwoHosts {
        _images,
        v1,
        v2,
        v1_id,
        v2_id,
        hosts,
        receivers,
        name,
        dir,
    } = TwoHosts::start(["rrs0", "rrs1"], "rollout-restart").await;
    let urls: Vec<&str> = receivers.iter().map(|r| r.url.as_str()).collect();

    // v1 everywhere, through the service.
    let sender = Serve::start(dir.path());
    let p1 = sender.package(&v1).await;
    let first = sender.roll_out(&p1, &urls, &name, 0.5).await;
    let done = sender.ended(&first).await;
    assert_eq!(done["report"]["status"], "COMPLETED", "{done:#}");
    all_run(&hosts, &name, &v1_id, &done);

    // v2, host by host, each container settling for 10 s: the sender dies while the second
    // host's new container settles (the first host is on v2 by then).
    let p2 = sender.package(&v2).await;
    let second = sender.roll_out(&p2, &urls, &name, 10.0).await;
    sender
        .wait_for(&second, Duration::from_secs(180), |v| {
            outcomes(v) == ["DEPLOYED", "IN_PROGRESS"]
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while running_image(&hosts[1], &name).as_deref() != Some(v2_id.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the second host never started v2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sender.kill();

    // Started again on the same directories: both rollouts are there, the second INTERRUPTED,
    // and ROLLOUT_FAILED told it.
    let sender = Serve::start(dir.path());
    let kept = sender.get(&format!("/rollouts/{first}")).await;
    assert_eq!(kept["report"]["status"], "COMPLETED", "{kept:#}");
    let interrupted = sender.get(&format!("/rollouts/{second}")).await;
    assert_eq!(
        interrupted["report"]["status"], "INTERRUPTED",
        "{interrupted:#}"
    );
    assert_eq!(interrupted["report"]["fleet"], "MIXED");
    assert_eq!(
        interrupted["correlation_id"],
        json!(format!("ci-job-42.rollout-{second}")),
        "the client's id, made the rollout's own"
    );
    assert_eq!(outcomes(&interrupted), ["DEPLOYED", "IN_PROGRESS"]);
    assert!(
        interrupted["report"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("sender stopped")),
        "{interrupted:#}"
    );
    let listed = sender.get("/rollouts?status=INTERRUPTED").await;
    let listed: Vec<&Value> = listed["rollouts"]
        .as_array()
        .expect("rollouts")
        .iter()
        .map(|v| &v["rollout_id"])
        .collect();
    assert_eq!(listed, [&json!(second)]);
    let all = sender.get("/rollouts").await;
    assert_eq!(
        all["rollouts"][0]["rollout_id"],
        json!(second),
        "newest first"
    );
    assert_eq!(all["rollouts"][1]["rollout_id"], json!(first));
    let outbox = sender.get("/events?limit=100").await;
    let failed: Vec<&Value> = outbox["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["event_type"] == "ROLLOUT_FAILED")
        .collect();
    assert_eq!(failed.len(), 1, "{outbox:#}");
    assert_eq!(failed[0]["payload"]["rollout_id"], json!(second));
    assert_eq!(
        failed[0]["payload"]["report"]["status"], "INTERRUPTED",
        "{outbox:#}"
    );

    // DELETE undoes it: the first host by its deployment id, the second once its receiver has
    // ended the deployment the dead sender left running.
    let (status, undoing) = sender.delete(&second).await;
    assert_eq!(status, 202, "{undoing:#}");
    assert_eq!(undoing["abort_requested"], true);
    let undone = sender.ended(&second).await;
    assert_eq!(undone["report"]["status"], "ABORTED", "{undone:#}");
    assert_eq!(undone["report"]["fleet"], "OLD_RELEASE", "{undone:#}");
    assert_eq!(
        outcomes(&undone),
        ["ROLLED_BACK", "ROLLED_BACK"],
        "{undone:#}"
    );
    all_run(&hosts, &name, &v1_id, &undone);
    let (status, again) = sender.delete(&second).await;
    assert_eq!(status, 409, "{again:#}");
    let outbox = sender.get("/events?limit=100").await;
    let last = outbox["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["event_type"] == "ROLLOUT_ROLLED_BACK")
        .expect("ROLLOUT_ROLLED_BACK for the undone rollout");
    assert_eq!(last["payload"]["rollout_id"], json!(second));

    // A host that misses its deadline (5 s) while its container settles for 15 s: its receiver
    // finishes the deployment anyway, so the stopped rollout finds it there and rolls it back
    // with the hosts it moved; the second host is never reached. Both end on v1.
    let late = sender
        .roll_out_with(&p2, &urls, &name, 15.0, json!({"host_timeout_secs": 5}))
        .await;
    let ended = sender.ended(&late).await;
    assert_eq!(ended["report"]["status"], "ROLLED_BACK", "{ended:#}");
    assert_eq!(
        outcomes(&ended),
        ["ROLLED_BACK", "NOT_REACHED"],
        "{ended:#}"
    );
    let late_host = &ended["report"]["hosts"][0];
    assert_eq!(late_host["error"]["code"], "TIMEOUT", "{ended:#}");
    assert!(late_host["deployment_id"].is_string(), "{ended:#}");
    let before = late_host["version_before"].as_str();
    assert!(
        before == Some(v1.as_str()) || before == Some(v1_id.as_str()),
        "{ended:#}"
    );
    assert_eq!(ended["report"]["fleet"], "OLD_RELEASE");
    all_run(&hosts, &name, &v1_id, &ended);

    // And a third start still shows the undone one as it ended.
    sender.kill();
    let sender = Serve::start(dir.path());
    let kept = sender.get(&format!("/rollouts/{second}")).await;
    assert_eq!(kept["report"]["status"], "ABORTED", "{kept:#}");
    drop(sender);

    drop(receivers);
    tokio::task::spawn_blocking(move || drop(hosts))
        .await
        .expect("hosts stopped");
    assert!(main_bridge_exists(), "the main engine's docker0 survives");
}

/// `deploy-sender deploy` of `tag` to `urls` (one host per step, containers settling for
/// `settle` s), the real binary, its state in `dir`.
fn cli_deploy(dir: &Path, tag: &str, urls: &[&str], name: &str, settle: f64) -> Child {
    Command::new(workspace_binary("deploy-sender"))
        .args([
            "deploy",
            "--image",
            tag,
            "--name",
            name,
            "--to",
            &urls.join(","),
        ])
        .args([
            "--batch",
            "1",
            "--health",
            "none",
            "--settle",
            &settle.to_string(),
        ])
        .args(["--restart", "no", "--correlation-id", "ci-job-43"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PACKAGE_DIR", dir.join("packages"))
        .env("DEPLOY_HMAC_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn deploy-sender deploy")
}

/// `deploy-sender rollouts ARGS --json` on `dir`: its exit code and JSON.
fn cli_rollouts(dir: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new(workspace_binary("deploy-sender"))
        .arg("rollouts")
        .args(args)
        .arg("--json")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PACKAGE_DIR", dir.join("packages"))
        .env("DEPLOY_HMAC_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .output()
        .expect("deploy-sender rollouts");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The CLI's rollout records in `dir`'s state directory.
fn cli_records(dir: &Path) -> Vec<Value> {
    let records = dir.join("packages/.state/cli-rollouts");
    let Ok(entries) = std::fs::read_dir(&records) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_rollout_killed_is_undone_by_rollouts_undo_and_one_told_sigterm_undoes_itself() {
    let TwoHosts {
        _images,
        v1,
        v2,
        v1_id,
        v2_id,
        hosts,
        receivers,
        name,
        dir,
    } = TwoHosts::start(["rrc0", "rrc1"], "rollout-cli").await;
    let urls: Vec<&str> = receivers.iter().map(|r| r.url.as_str()).collect();

    // v1 everywhere.
    let status = cli_deploy(dir.path(), &v1, &urls, &name, 0.5)
        .wait()
        .expect("the first rollout");
    assert_eq!(status.code(), Some(0), "v1 reached every host");
    all_run(&hosts, &name, &v1_id, &json!("after v1"));

    // v2, host by host, each container settling for 10 s: the command is SIGKILLed while the
    // second host's new container settles (the first host is on v2 by then).
    let mut second = cli_deploy(dir.path(), &v2, &urls, &name, 10.0);
    let id = second_host_settles(dir.path(), &hosts[1], &name, &v2_id).await;
    second.kill().expect("SIGKILL deploy-sender deploy");
    let _ = second.wait();

    // Its record says where it stopped; with no command holding it, it is INTERRUPTED.
    let (code, listed) = cli_rollouts(dir.path(), &["list"]);
    assert_eq!(code, 0, "{listed:#}");
    assert_eq!(
        listed[0]["rollout_id"],
        json!(id),
        "newest first: {listed:#}"
    );
    assert_eq!(listed[0]["report"]["status"], "INTERRUPTED", "{listed:#}");
    assert_eq!(listed[0]["report"]["fleet"], "MIXED");
    assert_eq!(listed[1]["report"]["status"], "COMPLETED");
    assert_eq!(
        listed[0]["correlation_id"],
        json!(format!("ci-job-43.rollout-{id}"))
    );

    // Undone: the first host by its deployment id, the second found in its receiver's journal
    // (waited for while it settled) and rolled back; exit 3, the fleet on the old release.
    let (code, report) = cli_rollouts(dir.path(), &["undo", &id]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(report["status"], "ABORTED", "{report:#}");
    assert_eq!(report["fleet"], "OLD_RELEASE");
    let outcomes: Vec<&str> = report["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["outcome"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(outcomes, ["ROLLED_BACK", "ROLLED_BACK"], "{report:#}");
    all_run(&hosts, &name, &v1_id, &report);

    // Undone once: a second undo is refused, and the record shows the end.
    let (code, refused) = cli_rollouts(dir.path(), &["undo", &id]);
    assert_eq!(code, 1, "{refused:#}");
    assert_eq!(refused["error"]["code"], "CONFLICT", "{refused:#}");
    let (_, listed) = cli_rollouts(dir.path(), &["list"]);
    assert_eq!(listed[0]["report"]["status"], "ABORTED", "{listed:#}");

    // SIGTERM (a CI job cancelled, a service manager stopping the command) at the same moment:
    // the command stops the rollout itself, rolls both hosts back and exits 3.
    let mut third = cli_deploy(dir.path(), &v2, &urls, &name, 10.0);
    let id = second_host_settles(dir.path(), &hosts[1], &name, &v2_id).await;
    let told = Command::new("kill")
        .args(["-TERM", &third.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(told.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = third.try_wait().expect("the command's status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the command did not end within 120 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(3), "stopped and undone: {status:?}");
    let record = cli_records(dir.path())
        .into_iter()
        .find(|r| r["rollout_id"] == json!(id))
        .expect("the record");
    assert_eq!(record["report"]["status"], "ABORTED", "{record:#}");
    assert_eq!(record["report"]["fleet"], "OLD_RELEASE", "{record:#}");
    assert_eq!(
        record["report"]["hosts"][0]["outcome"], "ROLLED_BACK",
        "{record:#}"
    );
    assert_eq!(
        record["report"]["hosts"][1]["outcome"], "ROLLED_BACK",
        "{record:#}"
    );
    all_run(&hosts, &name, &v1_id, &record);
    let (code, refused) = cli_rollouts(dir.path(), &["undo", &id]);
    assert_eq!(
        (code, refused["error"]["code"].as_str()),
        (1, Some("CONFLICT")),
        "nothing is left to undo: {refused:#}"
    );
}

/// Waits (at most 180 s) until the one RUNNING CLI rollout in `dir` has moved its first host
/// and `host`, its second, runs `name` from `image`, settling; answers the rollout's id.
async fn second_host_settles(dir: &Path, host: &TestHost, name: &str, image: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let running: Vec<Value> = cli_records(dir)
            .into_iter()
            .filter(|r| r["report"]["status"] == "RUNNING")
            .collect();
        if let [record] = running.as_slice() {
            if outcomes(record) == ["DEPLOYED", "IN_PROGRESS"]
                && running_image(host, name).as_deref() == Some(image)
            {
                return record["rollout_id"].as_str().expect("id").to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the second host never started the new release: {:#?}",
            cli_records(dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
