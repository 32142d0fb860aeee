//! Packaging: build an image (or take an existing one), then export, compress, hash and store it
//! in one streaming pass: `docker save` -> count -> compressor -> BLAKE3 -> temp file -> fsync ->
//! atomic rename, with its metadata beside it. Nothing uncompressed touches the disk, and no
//! whole image is held in memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use deploy_protocol::display::millis;
use deploy_protocol::manifest::{is_valid_container_name, is_valid_image_reference};
use deploy_protocol::{Compression, PackageManifest};
use futures::StreamExt;
use uuid::Uuid;

use super::build::{build_image, BuildSpec};
use super::compress::{CompressionOptions, PackageSink};
use super::docker::docker_error;
use super::progress::{Progress, ProgressExt, Stage};
use super::store::{
    compression_stats, hash_file, now_rfc3339, sync_dir, PackageInfo, PackageStore, TempLock,
};
use crate::SenderError;

/// Default largest package: 5 GiB.
pub const DEFAULT_MAX_PACKAGE_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Build it from a Dockerfile and context.
    Build(BuildSpec),
    /// Package an image already in the local engine: `name:tag` (`:latest` if omitted) or an id.
    /// An image packaged by id carries no tag.
    Existing(String),
}

impl ImageSource {
    /// The image reference: the tag to build, or the existing image.
    pub fn reference(&self) -> &str {
        match self {
            ImageSource::Build(spec) => &spec.tag,
            ImageSource::Existing(image) => image,
        }
    }
}

/// A packaging job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRequest {
    /// Where the image comes from.
    pub source: ImageSource,
    /// Container the package is meant for; defaults to the last path component of the image name.
    pub container_name: Option<String>,
    /// Package id; a new one by default.
    pub package_id: Option<Uuid>,
    /// How to compress.
    pub compression: CompressionOptions,
    /// Largest package accepted, in bytes (compressed size).
    pub max_package_size: u64,
}

impl PackageRequest {
    /// A request with default compression and size limit.
    pub fn new(source: ImageSource) -> Self {
        Self {
            source,
            container_name: None,
            package_id: None,
            compression: CompressionOptions::default(),
            max_package_size: DEFAULT_MAX_PACKAGE_SIZE,
        }
    }
}

/// Which front door a [`PackageParts`] came through: names the fields in its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontDoor {
    /// `deploy-sender deploy` / `package` flags.
    Cli,
    /// The REST API's JSON fields.
    Api,
}

impl FrontDoor {
    fn names(self) -> [&'static str; 5] {
        match self {
            FrontDoor::Cli => ["--image", "--context", "--dockerfile", "--tag", "--name"],
            FrontDoor::Api => [
                "`image`",
                "`build_context`",
                "`dockerfile_path`",
                "`image_tag`",
                "`container_name`",
            ],
        }
    }
}

/// What any front door (the CLI's flags, the REST body) says about a package, before it is
/// checked: [`PackageParts::request`] is the one place a [`PackageRequest`] is made from it, so
/// the CLI and the API share one rule for every default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageParts {
    /// An existing local image (`name:tag` or an id); excludes the build fields.
    pub image: Option<String>,
    /// Build context directory.
    pub context: Option<PathBuf>,
    /// Dockerfile, relative to the context unless absolute (default `Dockerfile`).
    pub dockerfile: Option<PathBuf>,
    /// Tag of the image to build: `name:tag`, or a bare `tag` named by `container_name`.
    pub tag: Option<String>,
    /// Build arguments.
    pub build_args: std::collections::BTreeMap<String, String>,
    /// The container the package is for (also names a built image without a `name:tag`).
    pub container_name: Option<String>,
    /// Package id (default: a new one when packaged).
    pub package_id: Option<Uuid>,
    /// Compression (default zstd).
    pub compression: Option<Compression>,
    /// Compression level (default per compression).
    pub level: Option<i32>,
    /// zstd worker threads (default one per core).
    pub zstd_workers: Option<u32>,
    /// Largest package accepted (default [`DEFAULT_MAX_PACKAGE_SIZE`]).
    pub max_package_size: Option<u64>,
}

impl PackageParts {
    /// Checks the parts and makes the request (`VALIDATION_ERROR` naming, in `door`'s words,
    /// what is wrong). The rule for a build's tag: `name:tag` (or `registry/name`) as given; a
    /// bare `tag` with a container name is `container_name:tag`; no tag with a container name
    /// is `container_name:latest`.
    pub fn request(self, door: FrontDoor) -> Result<PackageRequest, SenderError> {
        let [image_f, context_f, dockerfile_f, tag_f, name_f] = door.names();
        let building = self.context.is_some() || self.dockerfile.is_some();
        let source = match (self.image.filter(|i| !i.trim().is_empty()), building) {
            (Some(_), true) => {
                return Err(SenderError::Validation(format!(
                    "pass either {image_f} (an existing image) or {context_f} (and \
                     {dockerfile_f}, {tag_f}) to build one, not both"
                )))
            }
            (Some(image), false) => ImageSource::Existing(image),
            (None, _) => {
                let context = self.context.ok_or_else(|| {
                    SenderError::Validation(format!(
                        "nothing to package: pass {context_f} (and {dockerfile_f}, {tag_f}) to \
                         build an image, or {image_f} to package an existing one"
                    ))
                })?;
                let name = self.container_name.as_deref();
                let tag = match (self.tag.as_deref(), name) {
                    (Some(tag), _) if tag.contains(':') || tag.contains('/') => tag.to_owned(),
                    (Some(tag), Some(name)) => format!("{name}:{tag}"),
                    (None, Some(name)) => format!("{name}:latest"),
                    (Some(tag), None) => {
                        return Err(SenderError::Validation(format!(
                            "{tag_f} {tag:?} has no image name: use name:tag (e.g. \
                             myapp:{tag}), or give {name_f} to name the image"
                        )))
                    }
                    (None, None) => {
                        return Err(SenderError::Validation(format!(
                            "a build needs {tag_f} as name:tag (e.g. myapp:1.0.0), or {name_f} \
                             to name the image"
                        )))
                    }
                };
                if !is_valid_image_reference(&tag) {
                    return Err(SenderError::Validation(format!(
                        "{tag_f} {tag:?} is not an image tag: use name:tag with a lower-case \
                         name, e.g. myapp:1.0.0"
                    )));
                }
                ImageSource::Build(BuildSpec {
                    dockerfile: self
                        .dockerfile
                        .unwrap_or_else(|| PathBuf::from("Dockerfile")),
                    context,
                    build_args: self.build_args,
                    tag,
                })
            }
        };
        if let Some(name) = &self.container_name {
            if !is_valid_container_name(name) {
                return Err(SenderError::Validation(format!(
                    "{name_f} {name:?} is not a container name: letters, digits, `_`, `.` and \
                     `-`, starting with a letter or digit"
                )));
            }
        }
        let compression = CompressionOptions::new(
            self.compression.unwrap_or(Compression::Zstd),
            self.level,
            self.zstd_workers,
        );
        compression.effective_level()?;
        Ok(PackageRequest {
            source,
            container_name: self.container_name,
            package_id: self.package_id,
            compression,
            max_package_size: self.max_package_size.unwrap_or(DEFAULT_MAX_PACKAGE_SIZE),
        })
    }
}

/// Builds (if asked) and packages an image into `store`.
pub async fn package_image(
    docker: &Docker,
    store: &PackageStore,
    request: &PackageRequest,
    progress: &dyn Progress,
) -> Result<PackageInfo, SenderError> {
    let level = request.compression.effective_level()?;
    if let Some(name) = &request.container_name {
        if !is_valid_container_name(name) {
            return Err(SenderError::Validation(format!(
                "container name {name:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,127}}"
            )));
        }
    }
    let package_id = request.package_id.unwrap_or_else(Uuid::new_v4);
    if store.contains(package_id).await {
        return Err(SenderError::Conflict(format!(
            "package {package_id} already exists in {}",
            store.dir().display()
        )));
    }

    let (export_ref, build_duration) = match &request.source {
        ImageSource::Build(spec) => {
            let built = build_image(docker, spec, progress).await?;
            (built.tag, built.duration)
        }
        ImageSource::Existing(reference) => (reference.clone(), Duration::ZERO),
    };
    let image = resolve_image(docker, &export_ref).await?;
    let container_name = request
        .container_name
        .clone()
        .or_else(|| image.tags.first().map(|t| default_container_name(t)));
    // The same image packaged the same way is already stored: use it instead of exporting
    // again (unless the caller asked for a package id of its own).
    if request.package_id.is_none() {
        let same = store
            .find_same(
                &image.id,
                &image.tags,
                request.compression.compression,
                level,
                container_name.as_deref(),
            )
            .await?;
        if let Some(info) = same {
            tracing::info!(package_id = %info.package_id, image = %image.id, "reusing the stored package of the same image");
            progress.finish(Stage::Export, info.original_size);
            return Ok(info);
        }
    }

    let started = Instant::now();
    let exported = export_to_file(
        docker,
        store,
        &image,
        package_id,
        &request.compression,
        request.max_package_size,
        progress,
    )
    .await?;
    let (compression_ratio, compression_factor) =
        compression_stats(exported.original_size, exported.size);
    let info = PackageInfo {
        package_id,
        image_id: image.id,
        image_tags: image.tags,
        package_path: exported.path.to_string_lossy().into_owned(),
        package_size: exported.size,
        package_size_mb: exported.size as f64 / 1e6,
        original_size: exported.original_size,
        compression: request.compression.compression,
        compression_level: level,
        compression_ratio,
        compression_factor,
        package_checksum: exported.checksum,
        build_duration_ms: millis(build_duration),
        export_duration_ms: millis(started.elapsed()),
        created_at: now_rfc3339(),
        container_name,
    };
    if let Err(e) = store.write_metadata(&info).await {
        let _ = tokio::fs::remove_file(&exported.path).await;
        return Err(e);
    }
    // Recorded: the file is no longer the sweep's to judge.
    drop(exported.lock);
    tracing::info!(
        package_id = %package_id,
        size = info.package_size,
        original = info.original_size,
        "package stored"
    );
    Ok(info)
}

/// An image to export, as the engine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// What to ask `docker save` for.
    pub reference: String,
    /// Image id, `sha256:...`.
    pub id: String,
    /// The tags the archive will carry (none when exported by id).
    pub tags: Vec<String>,
    /// The image's uncompressed size, an estimate of the archive's size.
    pub size: Option<u64>,
}

/// Looks `reference` up in the engine: `NOT_FOUND` if it has no such image.
pub async fn resolve_image(docker: &Docker, reference: &str) -> Result<ResolvedImage, SenderError> {
    let reference = reference.trim();
    if reference.is_empty() {
        return Err(SenderError::Validation("empty image reference".into()));
    }
    // Checked before it goes into the engine's URL: a name with a trailing `/` or control
    // characters makes Docker answer a redirect, not an error.
    let is_id = |s: &str| {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        !hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if !is_id(reference) && !is_valid_image_reference(&with_default_tag(reference)) {
        return Err(SenderError::Validation(format!(
            "image reference {reference:?} is neither name[:tag] nor an image id (digests are \
             not supported)"
        )));
    }
    let inspected = docker.inspect_image(reference).await.map_err(|e| {
        match docker_error(&format!("image {reference}"), e) {
            SenderError::NotFound(_) => SenderError::NotFound(format!(
            "image {reference} is not in the local Docker engine: build it, or docker load it first"
        )),
            other => other,
        }
    })?;
    let id = inspected.id.ok_or_else(|| {
        SenderError::Internal(format!("Docker reported no id for image {reference}"))
    })?;
    // Docker cannot save an image without layers (`FROM scratch` with only metadata): it
    // answers 500 "empty export - not implemented".
    let layers = inspected.root_fs.as_ref().and_then(|r| r.layers.as_ref());
    if layers.is_none_or(Vec::is_empty) {
        return Err(SenderError::Validation(format!(
            "image {reference} has no layers (nothing but metadata on `scratch`): Docker cannot \
             export it; add a file to it"
        )));
    }
    let bare = |s: &str| s.trim_start_matches("sha256:").to_owned();
    let by_id = bare(reference).chars().all(|c| c.is_ascii_hexdigit())
        && bare(&id).starts_with(&bare(reference));
    let (reference, tags) = if by_id {
        (id.clone(), Vec::new())
    } else {
        let tagged = with_default_tag(reference);
        if !is_valid_image_reference(&tagged) {
            return Err(SenderError::Validation(format!(
                "image reference {reference:?} is not a valid name:tag (digests are not supported)"
            )));
        }
        (tagged.clone(), vec![tagged])
    };
    Ok(ResolvedImage {
        reference,
        id,
        tags,
        size: inspected.size.and_then(|s| u64::try_from(s).ok()),
    })
}

/// `name` -> `name:latest`; a reference that already has a tag is unchanged.
pub fn with_default_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') || reference.contains('@') {
        reference.to_owned()
    } else {
        format!("{reference}:latest")
    }
}

/// `registry:5000/team/web:v1` -> `web`.
pub fn default_container_name(tag: &str) -> String {
    let name = tag.rsplit_once(':').map_or(tag, |(n, _)| n);
    name.rsplit('/').next().unwrap_or(name).to_owned()
}

/// A package file written and renamed into place.
struct Exported {
    path: PathBuf,
    /// The writer's lock, held until the file's metadata is written (see `sweep_temp_files`).
    lock: Option<TempLock>,
    size: u64,
    original_size: u64,
    checksum: deploy_protocol::Checksum,
}

/// Removes the temp file unless the package was renamed into place.
struct TempGuard<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

async fn export_to_file(
    docker: &Docker,
    store: &PackageStore,
    image: &ResolvedImage,
    package_id: Uuid,
    compression: &CompressionOptions,
    limit: u64,
    progress: &dyn Progress,
) -> Result<Exported, SenderError> {
    let temp = store.temp_path(package_id);
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SenderError::Conflict(format!(
                "package {package_id} is being written by another job"
            )),
            _ => SenderError::io(format!("cannot create {}", temp.display()), e),
        })?;
    // Held until the file is renamed or removed: the store's sweep leaves it alone meanwhile.
    let lock = TempLock::try_acquire(&temp)
        .map_err(|e| SenderError::io(format!("cannot lock {}", temp.display()), e))?;
    let mut guard = TempGuard {
        path: &temp,
        armed: true,
    };
    let mut sink = PackageSink::new(file, compression, limit)?;
    let mut stream = docker.export_image(&image.reference);
    let mut original: u64 = 0;
    progress.advance(Stage::Export, 0, image.size);
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| docker_error(&format!("exporting {}", image.reference), e))?;
        original += chunk.len() as u64;
        sink.write(&chunk).await?;
        progress.advance(Stage::Export, original, image.size);
    }
    if original == 0 {
        return Err(SenderError::Internal(format!(
            "Docker exported nothing for {}",
            image.reference
        )));
    }
    let out = sink.finish().await?;
    out.file
        .sync_all()
        .await
        .map_err(|e| SenderError::io(format!("cannot sync {}", temp.display()), e))?;
    drop(out.file);
    let path = store.package_path(package_id, compression.compression);
    tokio::fs::rename(&temp, &path)
        .await
        .map_err(|e| SenderError::io(format!("cannot rename {} into place", temp.display()), e))?;
    guard.armed = false;
    sync_dir(store.dir())
        .await
        .map_err(|e| SenderError::io(format!("cannot sync {}", store.dir().display()), e))?;
    progress.finish(Stage::Export, original);
    Ok(Exported {
        path,
        size: out.size,
        original_size: original,
        checksum: out.checksum,
        lock,
    })
}

/// The compression a package file name implies: `.tar.gz`/`.tgz` gzip, `.tar.zst` zstd, `.tar` none.
pub fn compression_from_path(path: &Path) -> Option<Compression> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Compression::Gzip)
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Some(Compression::Zstd)
    } else if name.ends_with(".tar") {
        Some(Compression::None)
    } else {
        None
    }
}

/// A manifest for an arbitrary package file: hashes it and fills in the required fields.
pub async fn manifest_for_file(
    path: &Path,
    package_id: Option<Uuid>,
    compression: Compression,
    image_tags: Vec<String>,
) -> Result<PackageManifest, SenderError> {
    let (checksum, size) = hash_file(path).await?;
    if size == 0 {
        return Err(SenderError::Validation(format!(
            "package {} is empty",
            path.display()
        )));
    }
    let manifest = PackageManifest {
        package_id: package_id.unwrap_or_else(Uuid::new_v4),
        package_checksum: checksum,
        package_size: size,
        compression,
        image_id: None,
        image_tags,
        container_name: None,
        created_at: Some(now_rfc3339()),
        original_size: None,
        deployment: None,
    };
    manifest
        .validate()
        .map_err(|e| SenderError::Validation(e.to_string()))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packaging jobs run on spawned tasks: their futures must be `Send`.
    #[allow(dead_code)]
    fn package_future_is_send(docker: &Docker, store: &PackageStore, request: &PackageRequest) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&package_image(docker, store, request, &crate::NoProgress));
    }

    fn build(tag: Option<&str>, name: Option<&str>) -> PackageParts {
        PackageParts {
            context: Some(PathBuf::from("app")),
            tag: tag.map(str::to_owned),
            container_name: name.map(str::to_owned),
            ..PackageParts::default()
        }
    }

    fn built_tag(parts: PackageParts, door: FrontDoor) -> Result<String, String> {
        match parts.request(door) {
            Ok(request) => Ok(request.source.reference().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn one_tag_rule_for_every_front_door() {
        for door in [FrontDoor::Cli, FrontDoor::Api] {
            let tag = |t, n| built_tag(build(t, n), door);
            assert_eq!(tag(Some("web:1.0"), None), Ok("web:1.0".into()));
            assert_eq!(tag(Some("web:1.0"), Some("api")), Ok("web:1.0".into()));
            assert_eq!(tag(Some("1.0"), Some("api")), Ok("api:1.0".into()));
            assert_eq!(tag(None, Some("api")), Ok("api:latest".into()));
            assert!(tag(Some("1.0"), None).is_err());
            assert!(tag(None, None).is_err());
            assert!(tag(Some("Web:1.0"), None).is_err());
        }
    }

    #[test]
    fn errors_name_the_fields_of_the_front_door_used() {
        let cli = built_tag(build(Some("1.0"), None), FrontDoor::Cli).expect_err("no name");
        assert!(cli.contains("--tag") && cli.contains("--name"), "{cli}");
        let api = built_tag(build(Some("1.0"), None), FrontDoor::Api).expect_err("invalid");
        assert!(
            api.contains("`image_tag`") && api.contains("`container_name`"),
            "{api}"
        );
        let bad_name = built_tag(build(None, Some("-x")), FrontDoor::Api).expect_err("invalid");
        assert!(bad_name.contains("`container_name`"), "{bad_name}");
        let both = PackageParts {
            image: Some("web:1".into()),
            ..build(Some("web:2"), None)
        };
        assert!(built_tag(both, FrontDoor::Cli)
            .expect_err("both sources")
            .contains("not both"));
        let level = PackageParts {
            compression: Some(Compression::Gzip),
            level: Some(12),
            ..build(Some("web:2"), None)
        };
        assert!(built_tag(level, FrontDoor::Cli).is_err());
    }

    #[test]
    fn a_build_defaults_to_the_contexts_dockerfile() {
        let request = build(Some("web:1"), None)
            .request(FrontDoor::Cli)
            .expect("valid");
        match request.source {
            ImageSource::Build(spec) => assert_eq!(spec.dockerfile, PathBuf::from("Dockerfile")),
            other => panic!("{other:?}"),
        }
        assert_eq!(request.max_package_size, DEFAULT_MAX_PACKAGE_SIZE);
    }

    #[test]
    fn default_tag_and_container_name() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(
            with_default_tag("localhost:5000/web"),
            "localhost:5000/web:latest"
        );
        assert_eq!(with_default_tag("web:v1"), "web:v1");
        assert_eq!(default_container_name("localhost:5000/team/web:v1"), "web");
        assert_eq!(default_container_name("web:v1"), "web");
    }

    #[test]
    fn compression_is_guessed_from_the_extension() {
        assert_eq!(
            compression_from_path(Path::new("a.tar.gz")),
            Some(Compression::Gzip)
        );
        assert_eq!(
            compression_from_path(Path::new("a.TGZ")),
            Some(Compression::Gzip)
        );
        assert_eq!(
            compression_from_path(Path::new("a.tar.zst")),
            Some(Compression::Zstd)
        );
        assert_eq!(
            compression_from_path(Path::new("a.tar")),
            Some(Compression::None)
        );
        assert_eq!(compression_from_path(Path::new("a.zip")), None);
    }
}
