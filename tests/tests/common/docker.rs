//! The real Docker engine in end-to-end tests: the connection (a test without it fails, never
//! skips), test images built `FROM scratch` with this machine's static busybox (no registry, no
//! pulls), and a guard that removes every container and image of a test, even when it fails.

use std::collections::HashMap;

use bollard::container::{ListContainersOptions, RemoveContainerOptions};
use bollard::image::{ListImagesOptions, RemoveImageOptions};
use bollard::Docker;

/// The engine, or a panic saying these tests need one.
pub async fn docker() -> Docker {
    match deploy_sender::connect_docker().await {
        Ok(d) => d,
        Err(e) => panic!(
            "these end-to-end tests need a running Docker engine (DOCKER_HOST or \
             /var/run/docker.sock), and it is not reachable: {e}"
        ),
    }
}

/// A unique name, `deploy-e2e-<uuid>`, for a test's containers and image repository. Dropped, it
/// removes every container whose name starts with it (set-aside ones too) and every image tagged
/// in its repository.
pub struct HostGuard {
    pub name: String,
}

impl HostGuard {
    pub fn new() -> Self {
        Self {
            name: format!("deploy-e2e-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// `<name>:<tag>`.
    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.name)
    }

    /// `(id, name)` of every container, running or not, whose name starts with this name.
    pub async fn containers(&self, docker: &Docker) -> Vec<(String, String)> {
        containers_named(docker, &self.name).await
    }

    /// `(tag, image id)` of every image tagged in this repository.
    pub async fn images(&self, docker: &Docker) -> Vec<(String, String)> {
        images_named(docker, &self.name).await
    }
}

async fn containers_named(docker: &Docker, prefix: &str) -> Vec<(String, String)> {
    let options = ListContainersOptions {
        all: true,
        filters: HashMap::from([("name".to_owned(), vec![prefix.to_owned()])]),
        ..Default::default()
    };
    let mut out: Vec<(String, String)> = docker
        .list_containers(Some(options))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| {
            let name = c.names?.first()?.trim_start_matches('/').to_owned();
            name.starts_with(prefix).then_some((c.id?, name))
        })
        .collect();
    out.sort();
    out
}

async fn images_named(docker: &Docker, repository: &str) -> Vec<(String, String)> {
    let options = ListImagesOptions::<String> {
        all: false,
        filters: HashMap::from([("reference".to_owned(), vec![repository.to_owned()])]),
        ..Default::default()
    };
    let mut out: Vec<(String, String)> = docker
        .list_images(Some(options))
        .await
        .expect("list images")
        .into_iter()
        .flat_map(|i| {
            let id = i.id.clone();
            i.repo_tags.into_iter().map(move |t| (t, id.clone()))
        })
        .filter(|(t, _)| t.starts_with(&format!("{repository}:")))
        .collect();
    out.sort();
    out
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // Drop cannot await and may run inside the test's runtime: clean up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(docker) = deploy_sender::connect_docker().await else {
                    return;
                };
                for (id, _) in containers_named(&docker, &name).await {
                    let options = RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    };
                    let _ = docker.remove_container(&id, Some(options)).await;
                }
                for (tag, _) in images_named(&docker, &name).await {
                    let options = RemoveImageOptions {
                        force: true,
                        noprune: false,
                    };
                    let _ = docker.remove_image(&tag, Some(options), None).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A build context: the static busybox, `www/index.html` holding `body`, and this Dockerfile with
/// a unique label after its `FROM` line, so that parallel tests never share build-cache images
/// (one test's cleanup must not delete an image another is building on).
pub fn busybox_context(dockerfile: &str, body: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy("/bin/busybox", dir.path().join("busybox")).expect("copy /bin/busybox");
    std::fs::create_dir(dir.path().join("www")).expect("www");
    std::fs::write(dir.path().join("www/index.html"), body).expect("index.html");
    let (from, rest) = dockerfile.split_once('\n').expect("a FROM line");
    let unique = format!("{from}\nLABEL deploy-e2e={}\n{rest}", uuid::Uuid::new_v4());
    std::fs::write(dir.path().join("Dockerfile"), unique).expect("Dockerfile");
    dir
}

/// busybox httpd on port 80 serving `/www`, healthy when `wget` gets `/` from `health_port`
/// (80 for a healthy image; a port nobody listens on for one that never becomes healthy).
pub fn httpd_dockerfile(health_port: u16) -> String {
    format!(
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         COPY www /www\n\
         EXPOSE 80\n\
         HEALTHCHECK --interval=1s --timeout=2s --retries=2 \
           CMD [\"/bin/busybox\", \"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:{health_port}/\"]\n\
         CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\n"
    )
}

/// The host port Docker published for `container`'s port 80/tcp.
pub async fn published_port(docker: &Docker, container: &str) -> u16 {
    let inspect = docker
        .inspect_container(container, None)
        .await
        .expect("inspect container");
    inspect
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|p| p.get("80/tcp").cloned().flatten())
        .and_then(|b| b.first().and_then(|b| b.host_port.clone()))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{container} publishes no host port for 80/tcp"))
}
