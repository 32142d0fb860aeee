//! One body-read deadline for every request: the body must keep coming (no more than
//! UPLOAD_IDLE_TIMEOUT_SECS between bytes) and be whole by UPLOAD_IDLE_TIMEOUT_SECS +
//! length / UPLOAD_MIN_RATE (its Content-Length, or MAX_PACKAGE_SIZE when it has none). Applied
//! as middleware to every route, so a handler cannot forget it; an upload's spool applies tighter
//! limits of its own inside this one.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::state::AppState;

/// The body stopped coming, or came too slowly.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyTimeout(String);

impl BodyTimeout {
    /// Whether `error` (or what it was caused by) is a [`BodyTimeout`]; its message if so.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<String> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
                return Some(timeout.0.clone());
            }
            current = e.source();
        }
        None
    }
}

/// Middleware: puts the deadline on the request's body.
pub async fn body_deadline(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let config = state.config();
    let idle = Duration::from_secs(config.upload_idle_timeout_secs.max(1));
    let length = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(config.max_package_size);
    let allowed = Duration::from_secs(length / config.upload_min_rate.max(1) + 1);
    let (parts, body) = request.into_parts();
    let timed = Timed {
        inner: body.into_data_stream(),
        idle,
        idle_timer: Box::pin(tokio::time::sleep(idle)),
        deadline: Box::pin(tokio::time::sleep(idle + allowed)),
        done: false,
    };
    next.run(Request::from_parts(parts, Body::from_stream(timed)))
        .await
}

struct Timed {
    inner: BodyDataStream,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    deadline: Pin<Box<Sleep>>,
    done: bool,
}

impl Stream for Timed {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let next = Instant::now() + self.idle;
                self.idle_timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(other) => {
                self.done = true;
                Poll::Ready(other)
            }
            Poll::Pending => {
                let why = if self.deadline.poll_unpin(cx).is_ready() {
                    "the request body came too slowly (slower than UPLOAD_MIN_RATE allows)"
                        .to_owned()
                } else if self.idle_timer.poll_unpin(cx).is_ready() {
                    format!(
                        "no request body bytes received for {} s (UPLOAD_IDLE_TIMEOUT_SECS)",
                        self.idle.as_secs()
                    )
                } else {
                    return Poll::Pending;
                };
                self.done = true;
                Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(why)))))
            }
        }
    }
}
