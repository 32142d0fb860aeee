//! The real Docker engine in tests: the connection (a test without it fails, never skips), and
//! the one cleanup guard that removes what a test created on it, even when the test fails.

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::{ListContainersOptions, RemoveContainerOptions};
use bollard::image::{ListImagesOptions, RemoveImageOptions};
use bollard::Docker;

/// The label every image built by [`crate::images`] carries: the guard's name.
pub const LABEL: &str = "deploy-testkit";

/// The engine (DOCKER_HOST or the default socket), or a panic saying the tests need one.
pub async fn docker() -> Docker {
    match connect().await {
        Ok(docker) => docker,
        Err(e) => panic!(
            "these tests need a running Docker engine (DOCKER_HOST or /var/run/docker.sock), \
             and it is not reachable: {e}"
        ),
    }
}

async fn connect() -> Result<Docker, String> {
    let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())
}

/// A unique name, `<prefix>-<uuid>`, for a test's containers and image repository. Dropped, it
/// removes every container whose name starts with it (set-aside `<name>.previous-…` ones too),
/// every image tagged in its repository or labelled [`LABEL`]`=<name>`, and every image handed to
/// [`remove_image`](Guard::remove_image).
#[derive(Debug)]
pub struct Guard {
    /// The unique name: use it for containers, and as the repository of images.
    pub name: String,
    images: Vec<String>,
}

impl Guard {
    /// A guard named `<prefix>-<uuid>` (put the branch or test file in the prefix).
    pub fn new(prefix: &str) -> Self {
        Self {
            name: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            images: Vec::new(),
        }
    }

    /// `<name>:<tag>`, an image reference the guard removes.
    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.name)
    }

    /// Removes `reference` too when dropped (an image named outside the guard's repository).
    pub fn remove_image(&mut self, reference: &str) {
        self.images.push(reference.to_owned());
    }

    /// `(id, name)` of every container, running or not, whose name starts with the guard's name.
    pub async fn containers(&self, docker: &Docker) -> Vec<(String, String)> {
        containers_named(docker, &self.name).await
    }

    /// `(tag, id)` of every image tagged in the guard's repository.
    pub async fn images(&self, docker: &Docker) -> Vec<(String, String)> {
        images_in(docker, &self.name).await
    }

    /// Ids of every image labelled with the guard's name (built by [`crate::images`]).
    pub async fn labelled_images(&self, docker: &Docker) -> Vec<String> {
        labelled(docker, &self.name).await
    }
}

/// `(id, name)` of every container, running or not, whose name starts with `prefix`.
pub async fn containers_named(docker: &Docker, prefix: &str) -> Vec<(String, String)> {
    let options = ListContainersOptions {
        all: true,
        filters: HashMap::from([("name".to_owned(), vec![prefix.to_owned()])]),
        ..Default::default()
    };
    let mut out: Vec<(String, String)> = docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| {
            let name = c.names?.first()?.trim_start_matches('/').to_owned();
            name.starts_with(prefix).then_some((c.id?, name))
        })
        .collect();
    out.sort();
    out
}

async fn images_in(docker: &Docker, repository: &str) -> Vec<(String, String)> {
    let options = ListImagesOptions::<String> {
        filters: HashMap::from([("reference".to_owned(), vec![repository.to_owned()])]),
        ..Default::default()
    };
    let mut out: Vec<(String, String)> = docker
        .list_images(Some(options))
        .await
        .unwrap_or_default()
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

async fn labelled(docker: &Docker, name: &str) -> Vec<String> {
    let options = ListImagesOptions::<String> {
        all: true,
        filters: HashMap::from([("label".to_owned(), vec![format!("{LABEL}={name}")])]),
        ..Default::default()
    };
    let mut ids: Vec<String> = docker
        .list_images(Some(options))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

impl Drop for Guard {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        let extra = std::mem::take(&mut self.images);
        // Drop cannot await and may run inside the test's runtime: clean up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(docker) = connect().await else {
                    return;
                };
                for (id, _) in containers_named(&docker, &name).await {
                    let options = RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    };
                    let _ = docker.remove_container(&id, Some(options)).await;
                }
                let tagged = images_in(&docker, &name).await.into_iter().map(|(t, _)| t);
                let labelled = labelled(&docker, &name).await;
                for image in tagged.chain(extra).chain(labelled) {
                    let options = RemoveImageOptions {
                        force: true,
                        noprune: false,
                    };
                    let _ = docker.remove_image(&image, Some(options), None).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
