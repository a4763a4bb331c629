//! Bounds on what clients can hold, so that slow or hostile ones cannot exhaust the process:
//! connections (file descriptors), request bodies being written (memory, upload files), and
//! how long a client may leave a request half-sent.
//!
//! These are per process on purpose: each replica protects its own descriptors and memory.
//! Header and idle timeouts are hyper's (set where the server is built, in [`crate::serve`]);
//! this module holds the connection gate, the upload gate and the body read timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsSection;

/// Descriptors kept back from the connection budget for storage, the metadata database,
/// upstream connections and logs.
const RESERVED_FDS: u64 = 256;

/// The process's gates, shared by the accept loop and the handlers.
#[derive(Debug, Clone)]
pub struct Limits {
    connections: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
    /// See [`LimitsSection::body_timeout`].
    pub body_timeout: Duration,
    /// See [`LimitsSection::header_timeout`].
    pub header_timeout: Duration,
    /// See [`LimitsSection::max_header_size`].
    pub max_header_size: usize,
}

impl Limits {
    /// Gates sized from `section`, with the connection count lowered to what `open_files`
    /// (the process's open-file limit, when known) allows.
    pub fn new(section: &LimitsSection, open_files: Option<u64>) -> Self {
        let mut max_connections = section.max_connections;
        if let Some(n) = open_files {
            let fit = connections_that_fit(n, section.max_uploads);
            if fit < max_connections {
                tracing::warn!(
                    configured = max_connections,
                    open_file_limit = n,
                    serving = fit.max(1),
                    "limits.max_connections lowered to fit the open-file limit (raise `ulimit -n` to serve more)"
                );
                max_connections = fit.max(1);
            }
        }
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            uploads: Arc::new(Semaphore::new(section.max_uploads)),
            body_timeout: section.body_timeout,
            header_timeout: section.header_timeout,
            max_header_size: usize::try_from(section.max_header_size.as_u64())
                .unwrap_or(usize::MAX)
                .max(8192),
        }
    }

    /// A place for one more connection, if there is one.
    pub fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// A place for one more request body being written, if there is one.
    pub fn upload(&self) -> Option<OwnedSemaphorePermit> {
        self.uploads.clone().try_acquire_owned().ok()
    }
}

/// How many connections `open_files` descriptors serve: one each, one more for each upload
/// being written (a file; at most `max_uploads`, and never more than connections), and
/// [`RESERVED_FDS`] for the rest of the process.
fn connections_that_fit(open_files: u64, max_uploads: usize) -> usize {
    let budget = open_files.saturating_sub(RESERVED_FDS);
    let uploads = u64::try_from(max_uploads).unwrap_or(u64::MAX);
    let fit = budget.saturating_sub(uploads).max(budget / 2);
    usize::try_from(fit).unwrap_or(usize::MAX)
}

/// Raises the soft open-file limit to the hard one (as Go programs do at start) and returns
/// the limit in force, when the platform tells it.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "open-file limit not read");
            None
        }
    }
}

/// A connection that holds its place in the connection gate until it closes.
#[derive(Debug)]
pub struct Gated<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
}

impl<S> Gated<S> {
    /// `inner`, holding `permit` for as long as it lives.
    pub fn new(inner: S, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            _permit: permit,
        }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a plain-HTTP connection over the limit is told before it is closed (a TLS client is
/// closed without an answer: nothing can be said before the handshake).
fn busy_response() -> Vec<u8> {
    crate::wire::answer(
        "503 Service Unavailable",
        "TOOMANYREQUESTS",
        "too many connections; retry shortly",
        "retry-after: 1\r\n",
    )
}

/// The acceptor every connection passes: TCP_NODELAY (small answers leave at once instead of
/// waiting ~40 ms for the client's delayed ACK), then a place in the connection gate, or a
/// 503 and the door.
#[derive(Debug, Clone)]
pub struct GateAcceptor {
    limits: Limits,
    plain: bool,
}

impl GateAcceptor {
    /// The gate of `limits`; `plain` when the port speaks HTTP without TLS.
    pub fn new(limits: Limits, plain: bool) -> Self {
        Self { limits, plain }
    }
}

impl<S: Send + 'static> axum_server::accept::Accept<tokio::net::TcpStream, S> for GateAcceptor {
    type Stream = Gated<tokio::net::TcpStream>;
    type Service = S;
    type Future = futures_util::future::BoxFuture<'static, std::io::Result<(Self::Stream, S)>>;

    fn accept(&self, mut stream: tokio::net::TcpStream, service: S) -> Self::Future {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let permit = self.limits.connection();
        let plain = self.plain;
        Box::pin(async move {
            let Some(permit) = permit else {
                metrics::counter!("berth_connections_refused_total").increment(1);
                if plain {
                    // Best effort: the socket buffer of a fresh connection takes it whole.
                    let _ = stream.try_write(&busy_response());
                }
                return Err(std::io::Error::other(
                    "connection refused: limits.max_connections reached",
                ));
            };
            metrics::counter!("berth_connections_accepted_total").increment(1);
            if !plain {
                refuse_plain_http(&mut stream).await?;
            }
            Ok((Gated::new(stream, permit), service))
        })
    }
}

/// How long a client on the TLS port has to send its first byte.
const FIRST_BYTE: std::time::Duration = std::time::Duration::from_secs(10);

/// On the TLS port, a client speaking plain HTTP (its first byte is a letter, where a TLS
/// handshake starts with 0x16) is told so in plain HTTP and closed, instead of getting TLS
/// alert bytes it cannot read.
async fn refuse_plain_http(stream: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTE, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
            // Read what the request sent, so closing does not reset the answer away.
            let mut request = vec![0u8; 16 * 1024];
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                stream.read(&mut request),
            )
            .await;
            let answer = crate::wire::answer(
                "400 Bad Request",
                "UNSUPPORTED",
                "this port speaks HTTPS: use https://",
                "",
            );
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
            Err(std::io::Error::other("plain HTTP on the TLS port"))
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no TLS handshake",
        )),
    }
}

/// The body timed out: the client stopped sending.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing for {0:?} in the middle of the request body")]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] when the client sends nothing for `limit`
/// while the handler waits for more. The clock runs only while the handler is waiting, so a
/// handler slowed by storage is not blamed on the client.
pub struct IdleTimeoutBody {
    inner: Body,
    limit: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl IdleTimeoutBody {
    /// `inner`, bounded by `limit` between pieces.
    pub fn new(inner: Body, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: None,
            waiting: false,
        }
    }
}

impl HttpBody for IdleTimeoutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame);
        }
        if !this.waiting {
            this.waiting = true;
            let at = tokio::time::Instant::now() + this.limit;
            match &mut this.deadline {
                Some(d) => d.as_mut().reset(at),
                None => this.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        if let Some(d) = &mut this.deadline {
            ready!(d.as_mut().poll(cx));
            this.waiting = false;
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_the_descriptors_with_room_for_uploads() {
        // Plenty: every connection one descriptor, the uploads their files.
        assert_eq!(connections_that_fit(20_000, 512), 20_000 - 256 - 512);
        // Few: uploads could be on every connection, two descriptors each.
        assert_eq!(connections_that_fit(1024, 512), (1024 - 256) / 2);
        assert_eq!(connections_that_fit(100, 512), 0);
        let c = connections_that_fit(65_536, 4096);
        assert!(c + 4096.min(c) <= 65_536 - 256);
    }
}
