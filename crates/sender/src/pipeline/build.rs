//! Building an image through the Docker API: the context is collected into a tar honouring the
//! root `.dockerignore`, the Dockerfile must lie inside the context, and a failed build reports
//! the tail of its log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::image::BuildImageOptions;
use bollard::Docker;
use futures::StreamExt;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::docker::docker_error;
use super::progress::{Progress, ProgressExt, Stage};
use crate::SenderError;

/// How many build log lines a `BUILD_FAILED` error carries.
pub const LOG_TAIL_LINES: usize = 20;

/// Largest build context accepted. bollard 0.18 sends the context as one in-memory body, so the
/// tar is held in memory while it is sent; this bounds that memory.
pub const MAX_CONTEXT_SIZE: u64 = 512 * 1024 * 1024;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// The Dockerfile; relative paths are taken from the current directory. Must be inside `context`.
    pub dockerfile: PathBuf,
    /// The build context directory.
    pub context: PathBuf,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// The tag to give the image, `name:tag`.
    pub tag: String,
}

/// A built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// Image id, `sha256:...`.
    pub image_id: String,
    /// The tag it was given.
    pub tag: String,
    /// Time the build took (context collection included).
    pub duration: Duration,
}

/// A build context ready to send.
#[derive(Debug)]
pub struct BuildContext {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// The Dockerfile's path inside the context, `/`-separated.
    pub dockerfile: String,
}

/// Builds `spec` and returns the image id. Build log lines are reported as `Build` messages.
pub async fn build_image(
    docker: &Docker,
    spec: &BuildSpec,
    progress: &dyn Progress,
) -> Result<BuiltImage, SenderError> {
    if !deploy_protocol::manifest::is_valid_image_reference(&spec.tag) {
        return Err(SenderError::Validation(format!(
            "image tag {:?} is not a valid lower-case name:tag reference",
            spec.tag
        )));
    }
    let started = Instant::now();
    let (context, dockerfile) = (spec.context.clone(), spec.dockerfile.clone());
    let built = tokio::task::spawn_blocking(move || collect_context(&context, &dockerfile))
        .await
        .map_err(|e| SenderError::Internal(format!("context task failed: {e}")))??;
    progress.finish(Stage::Context, built.tar.len() as u64);

    let options = BuildImageOptions {
        dockerfile: built.dockerfile.clone(),
        t: spec.tag.clone(),
        rm: true,
        forcerm: true,
        buildargs: spec
            .build_args
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(built.tar.into()));
    let mut tail: VecDeque<String> = VecDeque::with_capacity(LOG_TAIL_LINES);
    let mut push = |line: &str, progress: &dyn Progress| {
        for line in line.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
            tracing::debug!(target: "deploy_sender::build", "{line}");
            progress.message(Stage::Build, line);
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        }
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(line) = info.stream.as_deref().or(info.status.as_deref()) {
                    push(line, progress);
                }
            }
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                push(&error, progress);
                return Err(SenderError::BuildFailed {
                    message: format!("building {} failed: {}", spec.tag, error.trim()),
                    log_tail: tail.into(),
                });
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            }) if status_code < 500 => {
                return Err(SenderError::BuildFailed {
                    message: format!("Docker refused to build {}: {message}", spec.tag),
                    log_tail: tail.into(),
                })
            }
            Err(e) => return Err(docker_error(&format!("building {}", spec.tag), e)),
        }
    }
    let image = docker
        .inspect_image(&spec.tag)
        .await
        .map_err(|e| docker_error(&format!("inspecting built image {}", spec.tag), e))?;
    let image_id = image.id.ok_or_else(|| {
        SenderError::Internal(format!(
            "Docker reported no id for built image {}",
            spec.tag
        ))
    })?;
    progress.finish(Stage::Build, 0);
    Ok(BuiltImage {
        image_id,
        tag: spec.tag.clone(),
        duration: started.elapsed(),
    })
}

/// Checks that `dockerfile` lies inside `context` and collects the context into a tar, leaving
/// out what the root `.dockerignore` excludes (the Dockerfile and `.dockerignore` are always sent,
/// as the Docker CLI does).
pub fn collect_context(context: &Path, dockerfile: &Path) -> Result<BuildContext, SenderError> {
    let root = context.canonicalize().map_err(|e| {
        SenderError::Validation(format!(
            "build context {} cannot be opened: {e}",
            context.display()
        ))
    })?;
    if !root.is_dir() {
        return Err(SenderError::Validation(format!(
            "build context {} is not a directory",
            context.display()
        )));
    }
    // One rule for the CLI's --dockerfile and the API's dockerfile_path: a relative path is
    // relative to the build context, as `docker build`'s default `PATH/Dockerfile` is.
    let given = dockerfile;
    let dockerfile = &if dockerfile.is_relative() {
        root.join(dockerfile)
    } else {
        dockerfile.to_path_buf()
    };
    let dockerfile_abs = dockerfile.canonicalize().map_err(|e| {
        let hint = if given.is_relative() && given.exists() {
            format!(
                "; a relative Dockerfile path is taken relative to the build context, and \
                 {} exists relative to the current directory: pass it relative to the context \
                 or as an absolute path",
                given.display()
            )
        } else if given.is_relative() {
            " (a relative Dockerfile path is taken relative to the build context)".to_owned()
        } else {
            String::new()
        };
        SenderError::Validation(format!(
            "Dockerfile {} cannot be opened: {e}{hint}",
            dockerfile.display()
        ))
    })?;
    let relative = dockerfile_abs
        .strip_prefix(&root)
        .map_err(|_| {
            SenderError::Validation(format!(
                "Dockerfile {} is outside the build context {}: move it into the context",
                dockerfile.display(),
                context.display()
            ))
        })?
        .to_path_buf();
    if !dockerfile_abs.is_file() {
        return Err(SenderError::Validation(format!(
            "Dockerfile {} is not a file",
            dockerfile.display()
        )));
    }
    let dockerfile_name = slash_path(&relative);

    let ignore = dockerignore(&root)?;
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut sent_dockerfile = false;
    let (filter, filter_root) = (ignore.clone(), root.clone());
    // Excluded directories are pruned here so the walk never descends into them; files are
    // judged in the loop, where the Dockerfile and .dockerignore are kept regardless.
    let walker = ignore::WalkBuilder::new(&root)
        .standard_filters(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(move |entry| {
            if !entry.file_type().is_some_and(|t| t.is_dir()) {
                return true;
            }
            match entry.path().strip_prefix(&filter_root) {
                Ok(rel) if rel != Path::new("") => !filter.matched(rel, true).is_ignore(),
                _ => true,
            }
        })
        .build();
    for entry in walker {
        let entry = entry
            .map_err(|e| SenderError::Validation(format!("cannot read build context: {e}")))?;
        let path = entry.path();
        let rel = match path.strip_prefix(&root) {
            Ok(rel) if rel != Path::new("") => rel,
            _ => continue,
        };
        let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
        let always = rel == relative || rel == Path::new(".dockerignore");
        if !always && ignore.matched(rel, is_dir).is_ignore() {
            continue;
        }
        sent_dockerfile |= rel == relative;
        // Judged before the file is read into memory: one huge file must not be.
        if entry.file_type().is_some_and(|t| t.is_file()) {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            check_size((builder.get_ref().len() as u64).saturating_add(size))?;
        }
        append(&mut builder, path, rel)?;
        check_size(builder.get_ref().len() as u64)?;
    }
    if !sent_dockerfile {
        append(&mut builder, &dockerfile_abs, &relative)?;
    }
    let tar = builder
        .into_inner()
        .map_err(|e| SenderError::io("cannot finish the build context tar", e))?;
    check_size(tar.len() as u64)?;
    Ok(BuildContext {
        tar,
        dockerfile: dockerfile_name,
    })
}

fn append(builder: &mut tar::Builder<Vec<u8>>, path: &Path, rel: &Path) -> Result<(), SenderError> {
    builder.append_path_with_name(path, rel).map_err(|e| {
        SenderError::io(
            format!("cannot add {} to the build context", path.display()),
            e,
        )
    })
}

fn check_size(size: u64) -> Result<(), SenderError> {
    if size > MAX_CONTEXT_SIZE {
        return Err(SenderError::Validation(format!(
            "build context exceeds {MAX_CONTEXT_SIZE} bytes: exclude what the image does not need \
             with a .dockerignore"
        )));
    }
    Ok(())
}

fn slash_path(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The root `.dockerignore` as a matcher. Docker's patterns are relative to the context root, so
/// each is anchored (`foo` excludes only `./foo`, unlike a `.gitignore`).
pub fn dockerignore(root: &Path) -> Result<Gitignore, SenderError> {
    let mut builder = GitignoreBuilder::new(root);
    let path = root.join(".dockerignore");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (negate, pattern) = match line.strip_prefix('!') {
                    Some(p) => ("!", p.trim()),
                    None => ("", line),
                };
                let pattern = pattern.trim_start_matches("./").trim_start_matches('/');
                let pattern = pattern.trim_end_matches('/');
                if pattern.is_empty() {
                    continue;
                }
                builder
                    .add_line(Some(path.clone()), &format!("{negate}/{pattern}"))
                    .map_err(|e| {
                        SenderError::Validation(format!(
                            "{}: bad pattern {line:?}: {e}",
                            path.display()
                        ))
                    })?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(SenderError::io(
                format!("cannot read {}", path.display()),
                e,
            ))
        }
    }
    builder
        .build()
        .map_err(|e| SenderError::Validation(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests;
