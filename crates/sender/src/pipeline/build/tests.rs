//! Context collection: .dockerignore semantics and the Dockerfile confinement check.

use std::fs;

use super::*;

fn entries(tar: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar);
    let mut names: Vec<String> = archive
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .to_string_lossy()
                .into_owned()
        })
        .map(|n| n.trim_end_matches('/').to_owned())
        .collect();
    names.sort();
    names
}

fn context_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let path = dir.path().join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }
    dir
}

#[test]
fn dockerignore_patterns_are_anchored_at_the_context_root() {
    let dir = context_with(&[
        ("Dockerfile", "FROM scratch\n"),
        (
            ".dockerignore",
            "# comment\nsecret.txt\nlogs\n*.tmp\n!keep.tmp\nDockerfile\n",
        ),
        ("secret.txt", "x"),
        ("sub/secret.txt", "kept: the pattern is anchored"),
        ("logs/a.log", "x"),
        ("a.tmp", "x"),
        ("keep.tmp", "x"),
        ("app/main.sh", "x"),
    ]);
    let ctx = collect_context(dir.path(), &dir.path().join("Dockerfile")).expect("context");
    assert_eq!(ctx.dockerfile, "Dockerfile");
    assert_eq!(
        entries(&ctx.tar),
        [
            ".dockerignore",
            "Dockerfile",
            "app",
            "app/main.sh",
            "keep.tmp",
            "sub",
            "sub/secret.txt"
        ]
    );
}

#[test]
fn a_dockerfile_in_a_subdirectory_is_named_relative_to_the_context() {
    let dir = context_with(&[("docker/web.Dockerfile", "FROM scratch\n"), ("a", "x")]);
    let ctx =
        collect_context(dir.path(), &dir.path().join("docker/web.Dockerfile")).expect("context");
    assert_eq!(ctx.dockerfile, "docker/web.Dockerfile");
}

#[test]
fn a_dockerfile_outside_the_context_is_refused() {
    let outer = context_with(&[("Dockerfile", "FROM scratch\n"), ("ctx/a", "x")]);
    let context = outer.path().join("ctx");
    for dockerfile in [
        outer.path().join("Dockerfile"),
        context.join("../Dockerfile"),
    ] {
        let err = collect_context(&context, &dockerfile).expect_err("outside");
        assert_eq!(err.code(), deploy_protocol::ErrorCode::ValidationError);
        assert!(
            err.to_string().contains("outside the build context"),
            "{err}"
        );
    }
}

#[cfg(unix)]
#[test]
fn a_symlinked_dockerfile_pointing_outside_is_refused() {
    let outer = context_with(&[("Dockerfile", "FROM scratch\n"), ("ctx/a", "x")]);
    let context = outer.path().join("ctx");
    std::os::unix::fs::symlink(outer.path().join("Dockerfile"), context.join("Dockerfile"))
        .expect("symlink");
    let err = collect_context(&context, &context.join("Dockerfile")).expect_err("escapes");
    assert_eq!(err.code(), deploy_protocol::ErrorCode::ValidationError);
}

#[test]
fn a_missing_context_or_dockerfile_is_a_validation_error() {
    let dir = context_with(&[("a", "x")]);
    for (context, dockerfile) in [
        (dir.path().join("nope"), dir.path().join("a")),
        (dir.path().to_path_buf(), dir.path().join("Dockerfile")),
    ] {
        let err = collect_context(&context, &dockerfile).expect_err("missing");
        assert_eq!(err.code(), deploy_protocol::ErrorCode::ValidationError);
    }
}

#[test]
fn a_relative_dockerfile_path_is_relative_to_the_context_wherever_the_process_runs() {
    let dir = context_with(&[("docker/app.Dockerfile", "FROM scratch\n"), ("a", "a")]);
    // This process's current directory is the crate, not the context: the path still resolves.
    let built = collect_context(dir.path(), Path::new("docker/app.Dockerfile")).expect("collect");
    assert_eq!(built.dockerfile, "docker/app.Dockerfile");
    // A path that exists only relative to the current directory says which rule applies.
    let err = collect_context(dir.path(), Path::new("Cargo.toml")).expect_err("not in context");
    let message = err.to_string();
    assert!(
        message.contains("relative to the build context"),
        "{message}"
    );
    assert!(message.contains("current directory"), "{message}");
}

#[test]
fn a_file_larger_than_a_context_may_be_is_refused_before_it_is_read() {
    let dir = context_with(&[("Dockerfile", "FROM scratch\n")]);
    // Sparse: a terabyte on paper, nothing on disk. Read into memory, as the context was before
    // its size was checked, it would take the machine down long before the check came.
    let big = std::fs::File::create(dir.path().join("data.img")).expect("create");
    big.set_len(1 << 40).expect("a sparse terabyte");
    let Err(refused) = collect_context(dir.path(), Path::new("Dockerfile")) else {
        panic!("a terabyte of context was accepted");
    };
    assert!(
        refused.to_string().contains("build context exceeds"),
        "{refused}"
    );
}
