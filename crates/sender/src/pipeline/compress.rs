//! The write end of packaging: compressor -> BLAKE3 + byte count + size limit -> buffered temp
//! file. Bytes are hashed exactly as they reach the file, so the checksum is of the package as
//! stored and uploaded.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
use async_compression::zstd::CParameter;
use async_compression::Level;
use deploy_protocol::{Checksum, Compression};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use crate::SenderError;

/// Default gzip level: 1. Image layers are mostly already-compressed binaries, where level 6
/// gains a few percent at several times the CPU; gzip exists for compatibility, zstd for speed.
pub const DEFAULT_GZIP_LEVEL: i32 = 1;
/// Default zstd level: 3, zstd's own default (fast, and smaller than gzip -6).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How to compress a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompressionOptions {
    /// The algorithm.
    pub compression: Compression,
    /// Level: gzip 1-9 (default 1), zstd 1-19 (default 3); ignored for `none`.
    #[serde(default)]
    pub level: Option<i32>,
    /// zstd worker threads (0 = compress on the calling thread).
    #[serde(default = "default_zstd_workers")]
    pub zstd_workers: u32,
}

impl Default for CompressionOptions {
    fn default() -> Self {
        Self {
            compression: Compression::Zstd,
            level: None,
            zstd_workers: default_zstd_workers(),
        }
    }
}

/// zstd job size when compressing with workers: 2 MiB. zstd's own choice at level 3 is 8 MiB
/// (four windows), and a multi-threaded encoder holds input and output buffers for a few jobs
/// per worker: `bench/bench.py` measured a peak RSS of 66 MiB packaging a 100 MiB image with 2
/// workers and 116 MiB for incompressible data; 2 MiB jobs keep it near 5 MiB per worker, for
/// packages about 0.3 % larger (docs/PERFORMANCE.md).
pub const ZSTD_JOB_SIZE: u32 = 2 * 1024 * 1024;
/// Most zstd workers chosen by default, so that memory stays bounded on large hosts.
pub const MAX_DEFAULT_ZSTD_WORKERS: u32 = 4;

/// One zstd worker per available core, at most [`MAX_DEFAULT_ZSTD_WORKERS`].
pub fn default_zstd_workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(1))
        .unwrap_or(1)
        .min(MAX_DEFAULT_ZSTD_WORKERS)
}

impl CompressionOptions {
    /// The options every front door (CLI `package`, CLI `deploy`, REST) builds from what the
    /// user gave: `level` defaults per algorithm ([`effective_level`](Self::effective_level)),
    /// `zstd_workers` to [`default_zstd_workers`].
    pub fn new(compression: Compression, level: Option<i32>, zstd_workers: Option<u32>) -> Self {
        Self {
            compression,
            level,
            zstd_workers: zstd_workers.unwrap_or_else(default_zstd_workers),
        }
    }

    /// The level that will be used (`None` for no compression); refuses out-of-range levels.
    pub fn effective_level(&self) -> Result<Option<i32>, SenderError> {
        let (range, default) = match self.compression {
            Compression::None => return Ok(None),
            Compression::Gzip => (1..=9, DEFAULT_GZIP_LEVEL),
            Compression::Zstd => (1..=19, DEFAULT_ZSTD_LEVEL),
        };
        let level = self.level.unwrap_or(default);
        if !range.contains(&level) {
            return Err(SenderError::Validation(format!(
                "{} level {level} is out of range {}-{}",
                self.compression,
                range.start(),
                range.end()
            )));
        }
        Ok(Some(level))
    }
}

type FileWriter = BufWriter<tokio::fs::File>;

/// Hashes and counts what passes through to `inner`, refusing to grow past `limit`.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
    limit: u64,
    exceeded: bool,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for HashingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.written.saturating_add(buf.len() as u64) > this.limit {
            this.exceeded = true;
            return Poll::Ready(Err(io::Error::other("package size limit exceeded")));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.hasher.update(&buf[..n]);
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

enum Encoder {
    Gzip(GzipEncoder<HashingWriter<FileWriter>>),
    Zstd(ZstdEncoder<HashingWriter<FileWriter>>),
    Plain(HashingWriter<FileWriter>),
}

/// A package being written.
pub(crate) struct PackageSink {
    encoder: Encoder,
    limit: u64,
}

/// What a finished sink wrote.
pub(crate) struct SinkOutcome {
    /// BLAKE3 of the bytes in the file.
    pub checksum: Checksum,
    /// Bytes in the file.
    pub size: u64,
    /// The file, flushed (not yet synced).
    pub file: tokio::fs::File,
}

impl PackageSink {
    /// A sink writing `options`-compressed bytes to `file`, at most `limit` of them.
    pub fn new(
        file: tokio::fs::File,
        options: &CompressionOptions,
        limit: u64,
    ) -> Result<Self, SenderError> {
        let writer = HashingWriter {
            inner: BufWriter::with_capacity(1024 * 1024, file),
            hasher: blake3::Hasher::new(),
            written: 0,
            limit,
            exceeded: false,
        };
        let level = options.effective_level()?;
        let encoder = match (options.compression, level) {
            (Compression::Gzip, Some(l)) => {
                Encoder::Gzip(GzipEncoder::with_quality(writer, Level::Precise(l)))
            }
            (Compression::Zstd, Some(l)) => {
                let params: &[CParameter] = if options.zstd_workers > 0 {
                    &[
                        CParameter::nb_workers(options.zstd_workers),
                        CParameter::job_size(ZSTD_JOB_SIZE),
                    ]
                } else {
                    &[]
                };
                Encoder::Zstd(ZstdEncoder::with_quality_and_params(
                    writer,
                    Level::Precise(l),
                    params,
                ))
            }
            _ => Encoder::Plain(writer),
        };
        Ok(Self { encoder, limit })
    }

    fn hashing(&self) -> &HashingWriter<FileWriter> {
        match &self.encoder {
            Encoder::Gzip(e) => e.get_ref(),
            Encoder::Zstd(e) => e.get_ref(),
            Encoder::Plain(w) => w,
        }
    }

    fn map_error(&self, e: io::Error) -> SenderError {
        if self.hashing().exceeded {
            SenderError::PackageTooLarge { limit: self.limit }
        } else {
            SenderError::io("cannot write the package file", e)
        }
    }

    /// Compresses and writes one chunk of the uncompressed archive.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), SenderError> {
        let result = match &mut self.encoder {
            Encoder::Gzip(e) => e.write_all(chunk).await,
            Encoder::Zstd(e) => e.write_all(chunk).await,
            Encoder::Plain(w) => w.write_all(chunk).await,
        };
        result.map_err(|e| self.map_error(e))
    }

    /// Ends the compressed stream, flushes everything to the file and returns the totals.
    pub async fn finish(mut self) -> Result<SinkOutcome, SenderError> {
        let result = match &mut self.encoder {
            Encoder::Gzip(e) => e.shutdown().await,
            Encoder::Zstd(e) => e.shutdown().await,
            Encoder::Plain(w) => w.shutdown().await,
        };
        result.map_err(|e| self.map_error(e))?;
        let writer = match self.encoder {
            Encoder::Gzip(e) => e.into_inner(),
            Encoder::Zstd(e) => e.into_inner(),
            Encoder::Plain(w) => w,
        };
        Ok(SinkOutcome {
            checksum: Checksum::from_hasher(&writer.hasher),
            size: writer.written,
            file: writer.inner.into_inner(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sink_into(
        dir: &std::path::Path,
        options: CompressionOptions,
        limit: u64,
    ) -> (PackageSink, std::path::PathBuf) {
        let path = dir.join("out");
        let file = tokio::fs::File::create(&path).await.expect("create");
        (PackageSink::new(file, &options, limit).expect("sink"), path)
    }

    #[tokio::test]
    async fn checksum_and_size_are_of_the_bytes_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let options = CompressionOptions {
                compression,
                level: None,
                zstd_workers: 2,
            };
            let (mut sink, path) = sink_into(dir.path(), options, u64::MAX).await;
            for _ in 0..64 {
                sink.write(&[7u8; 16 * 1024]).await.expect("write");
            }
            let out = sink.finish().await.expect("finish");
            drop(out.file);
            let on_disk = std::fs::read(&path).expect("read");
            assert_eq!(out.size, on_disk.len() as u64, "{compression}");
            assert_eq!(out.checksum, Checksum::of(&on_disk), "{compression}");
            if compression != Compression::None {
                assert!(
                    on_disk.len() < 64 * 16 * 1024 / 10,
                    "{compression} compressed"
                );
            }
        }
    }

    #[tokio::test]
    async fn exceeding_the_limit_is_package_too_large() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = CompressionOptions {
            compression: Compression::None,
            level: None,
            zstd_workers: 0,
        };
        let (mut sink, _) = sink_into(dir.path(), options, 1000).await;
        sink.write(&[1u8; 600]).await.expect("under the limit");
        let err = sink.write(&[1u8; 600]).await.expect_err("over the limit");
        assert_eq!(err.code(), deploy_protocol::ErrorCode::PackageTooLarge);
    }

    #[tokio::test]
    async fn a_limit_hit_inside_the_compressor_is_still_package_too_large() {
        let dir = tempfile::tempdir().expect("tempdir");
        let noise: Vec<u8> = (0..256 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for (compression, workers) in [
            (Compression::Zstd, 2),
            (Compression::Zstd, 0),
            (Compression::Gzip, 0),
        ] {
            let options = CompressionOptions {
                compression,
                level: None,
                zstd_workers: workers,
            };
            let (mut sink, _) = sink_into(dir.path(), options, 1000).await;
            let result = match sink.write(&noise).await {
                Ok(()) => sink.finish().await.map(|_| ()),
                Err(e) => Err(e),
            };
            let err = result.expect_err("over the limit");
            assert_eq!(
                err.code(),
                deploy_protocol::ErrorCode::PackageTooLarge,
                "{compression}/{workers}: {err}"
            );
        }
    }

    #[test]
    fn levels_are_checked_per_algorithm() {
        let opts = |compression, level| CompressionOptions {
            compression,
            level,
            zstd_workers: 0,
        };
        assert_eq!(
            opts(Compression::Gzip, None).effective_level().ok(),
            Some(Some(DEFAULT_GZIP_LEVEL))
        );
        assert_eq!(
            opts(Compression::Zstd, Some(19)).effective_level().ok(),
            Some(Some(19))
        );
        assert_eq!(
            opts(Compression::None, Some(99)).effective_level().ok(),
            Some(None)
        );
        assert!(opts(Compression::Gzip, Some(10)).effective_level().is_err());
        assert!(opts(Compression::Zstd, Some(0)).effective_level().is_err());
    }
}
