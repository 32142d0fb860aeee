//! A Unix-socket proxy in front of the real Docker engine, to cut the engine off in the middle of
//! an operation: a real fault on real connections to the real engine, not a mock of it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The real engine.
const ENGINE_SOCKET: &str = "/var/run/docker.sock";

/// When the proxy cuts the engine off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Rule {
    /// Forward everything.
    #[default]
    Pass,
    /// Cut once this many bytes of a `docker load` request have gone through.
    MidLoad(u64),
    /// Cut when a container start is asked for after a container create, before the engine
    /// sees it.
    BeforeStart,
    /// Cut when a container removal is asked for after a container create, before the engine
    /// sees it.
    BeforeRemove,
}

#[derive(Default)]
struct Shared {
    rule: Rule,
    create_seen: bool,
    cut: Option<String>,
    /// `GET .../version` requests forwarded (the receiver's pings and version negotiations).
    versions: u64,
}

/// A Unix-socket proxy in front of the real engine, for the receiver's `DOCKER_HOST`: each
/// connection is forwarded to `/var/run/docker.sock`, byte for byte, until a [`Rule`] fires.
/// Then every connection is dropped and the socket stops accepting (connects are refused), as
/// when the engine goes away; [`DockerProxy::restore`] listens again.
pub struct DockerProxy {
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    token: CancellationToken,
}

impl DockerProxy {
    pub fn start(path: PathBuf) -> Self {
        let mut proxy = Self {
            path,
            shared: Arc::default(),
            token: CancellationToken::new(),
        };
        proxy.listen();
        proxy
    }

    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    fn listen(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind the proxy socket");
        self.token = CancellationToken::new();
        let (shared, token) = (self.shared.clone(), self.token.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // Dropping the listener: the socket file stays, connects are refused.
                    () = token.cancelled() => return,
                    accepted = listener.accept() => {
                        if let Ok((client, _)) = accepted {
                            tokio::spawn(forward(client, shared.clone(), token.clone()));
                        }
                    }
                }
            }
        });
    }

    pub fn arm(&self, rule: Rule) {
        let mut shared = self.shared.lock().expect("proxy");
        *shared = Shared {
            rule,
            versions: shared.versions,
            ..Shared::default()
        };
    }

    /// How many `GET .../version` requests reached the engine through the proxy.
    pub fn versions_asked(&self) -> u64 {
        self.shared.lock().expect("proxy").versions
    }

    /// Why the proxy cut, if it did.
    pub fn cut_reason(&self) -> Option<String> {
        self.shared.lock().expect("proxy").cut.clone()
    }

    pub fn restore(&mut self) {
        assert!(self.token.is_cancelled(), "the proxy was not cut");
        self.listen();
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// One client connection, forwarded to the engine until the proxy is cut.
async fn forward(client: UnixStream, shared: Arc<Mutex<Shared>>, token: CancellationToken) {
    let Ok(engine) = UnixStream::connect(ENGINE_SOCKET).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_engine, mut to_engine) = engine.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut conn = Connection::default();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (pass, cut) = conn.decide(&shared, &buf[..n]);
            if to_engine.write_all(&buf[..pass]).await.is_err() {
                return;
            }
            if let Some(why) = cut {
                shared.lock().expect("proxy").cut = Some(why);
                token.cancel();
                return;
            }
        }
    };
    let downstream = tokio::io::copy(&mut from_engine, &mut to_client);
    tokio::select! {
        () = token.cancelled() => {}
        () = upstream => {}
        _ = downstream => {}
    }
}

/// What one connection has carried so far.
#[derive(Default)]
struct Connection {
    tail: Vec<u8>,
    loading: bool,
    load_bytes: u64,
}

impl Connection {
    /// How much of `chunk` (client to engine) goes through, and whether to cut after it.
    fn decide(&mut self, shared: &Mutex<Shared>, chunk: &[u8]) -> (usize, Option<String>) {
        let mut hay = std::mem::take(&mut self.tail);
        hay.extend_from_slice(chunk);
        self.tail = hay[hay.len().saturating_sub(64)..].to_vec();
        let mut shared = shared.lock().expect("proxy");
        shared.versions += chunk
            .windows(b"/version HTTP/1.1".len())
            .filter(|w| *w == b"/version HTTP/1.1")
            .count() as u64;
        match shared.rule {
            Rule::Pass => (chunk.len(), None),
            Rule::MidLoad(limit) => {
                self.loading |= contains(&hay, b"/images/load");
                if !self.loading {
                    return (chunk.len(), None);
                }
                let before = self.load_bytes;
                self.load_bytes += chunk.len() as u64;
                if self.load_bytes < limit {
                    return (chunk.len(), None);
                }
                shared.rule = Rule::Pass;
                (
                    usize::try_from(limit - before).expect("fits"),
                    Some(format!("after {limit} bytes of the docker load request")),
                )
            }
            Rule::BeforeStart => {
                if shared.create_seen && chunk.starts_with(b"POST ") && contains(chunk, b"/start") {
                    shared.rule = Rule::Pass;
                    return (
                        0,
                        Some("before the start of the container just created".to_owned()),
                    );
                }
                shared.create_seen |= contains(&hay, b"/containers/create");
                (chunk.len(), None)
            }
            Rule::BeforeRemove => {
                if shared.create_seen
                    && chunk.starts_with(b"DELETE ")
                    && contains(chunk, b"/containers/")
                {
                    shared.rule = Rule::Pass;
                    return (
                        0,
                        Some("before the removal of the container just created".to_owned()),
                    );
                }
                shared.create_seen |= contains(&hay, b"/containers/create");
                (chunk.len(), None)
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
