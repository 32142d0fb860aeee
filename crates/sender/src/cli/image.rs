//! The image-source flags `deploy` and `package` share: a Dockerfile to build, or an existing
//! image; and `KEY=VALUE` parsing.

use std::path::PathBuf;

use clap::ArgGroup;

use crate::pipeline::{BuildSpec, ImageSource};
use crate::SenderError;

/// Where the image comes from: a Dockerfile to build, or an image already on the build host.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("image_source").required(true).args(["dockerfile", "image"])))]
pub(crate) struct ImageSourceArgs {
    /// Dockerfile to build: relative to --context unless absolute (as the API's
    /// `dockerfile_path`), and inside the context.
    #[arg(long, env = "DEPLOY_DOCKERFILE", requires_all = ["context", "tag"])]
    pub(crate) dockerfile: Option<PathBuf>,
    /// Build context directory (its root .dockerignore is honoured).
    #[arg(long, env = "DEPLOY_BUILD_CONTEXT", requires = "dockerfile")]
    pub(crate) context: Option<PathBuf>,
    /// Tag for the built image, `name:tag` (the image a receiver runs).
    #[arg(long, env = "DEPLOY_IMAGE_TAG", requires = "dockerfile")]
    pub(crate) tag: Option<String>,
    /// Build argument `KEY=VALUE` (repeatable).
    #[arg(long = "build-arg", env = "DEPLOY_BUILD_ARG", value_parser = parse_key_value, requires = "dockerfile")]
    pub(crate) build_args: Vec<(String, String)>,
    /// Use an existing local image instead of building: `name:tag` or an image id.
    #[arg(long, env = "DEPLOY_IMAGE")]
    pub(crate) image: Option<String>,
}

impl ImageSourceArgs {
    /// The library's description of the image source.
    pub(crate) fn source(&self) -> Result<ImageSource, SenderError> {
        match (&self.image, &self.dockerfile, &self.context, &self.tag) {
            (Some(image), ..) => Ok(ImageSource::Existing(image.clone())),
            (None, Some(dockerfile), Some(context), Some(tag)) => {
                if !deploy_protocol::manifest::is_valid_image_reference(tag) {
                    return Err(SenderError::Validation(format!(
                        "--tag {tag:?} is not an image tag: use name:tag with a lower-case name, \
                         e.g. myapp:1.0.0"
                    )));
                }
                Ok(ImageSource::Build(BuildSpec {
                    dockerfile: dockerfile.clone(),
                    context: context.clone(),
                    build_args: self.build_args.iter().cloned().collect(),
                    tag: tag.clone(),
                }))
            }
            _ => Err(SenderError::Validation(
                "pass --image REF, or --dockerfile, --context and --tag".into(),
            )),
        }
    }
}

/// Parses `KEY=VALUE` (the value may contain `=`).
pub(crate) fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
