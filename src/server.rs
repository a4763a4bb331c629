//! The accept loop and what drives each connection, below the router.
//!
//! # Idle connections hold no buffers
//! hyper gives every HTTP/1 connection a read buffer (8–16 KiB) and a write buffer for headers
//! (8 KiB), and keeps both for as long as the connection lives, so 10,000 kept-alive
//! connections that made one request each cost about 200 MiB. A plain-HTTP connection here
//! stays with hyper only while requests follow one another: once an answer is out and no
//! other request came for [`PARK_AFTER`], hyper is told to stop (the answer's head is written
//! by then, so it still says keep-alive) and hands the socket back with any bytes it had read
//! of a next request. The connection then waits on the bare socket, holding no buffer, and
//! starts a fresh hyper connection when bytes arrive. An idle connection is a socket, its
//! place in the connection gate and a small task (what hyper holds is boxed apart from it):
//! about 3 KiB of RSS measured, against about 20 with hyper's buffers. nginx treats its
//! kept-alive connections the same way.
//!
//! A connection is closed rather than kept when the client asked for that, when hyper ended it
//! on its own (a parse error, a broken connection) or when a request was answered before its
//! body was read to its end (what is left of it would read as the next request; that answer
//! says `connection: close`, so that no client reuses the connection). A connection idle for
//! `limits.header_timeout` is closed.
//!
//! On the TLS port hyper keeps the connection for its whole life: rustls holds its own buffers
//! there, which parking would not free, and bytes rustls has already decrypted are invisible
//! to a wait on the socket. A plain connection whose first bytes are HTTP/2's preface is served
//! whole by hyper's HTTP/1-or-2 builder (h2c with prior knowledge).
//!
//! # Shutdown
//! When the shutdown future resolves the listener closes; idle connections close at once and
//! each busy one finishes its request (hyper's graceful shutdown) for up to
//! [`DRAIN`](crate::DRAIN); what is still open then is closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum_server::accept::Accept;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::limits::{Gated, Limits};
use crate::wire::Conn;

/// How long a connection stays with hyper after an answer, for a next request that follows
/// at once (a client under load): stopping and starting hyper for every request of a busy
/// connection would cost more than the buffers it frees.
const PARK_AFTER: Duration = Duration::from_millis(5);

/// HTTP/2's connection preface: a plain connection starting with it speaks h2c.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What every connection task shares.
#[derive(Clone)]
pub(crate) struct Shared {
    router: axum::Router,
    header_timeout: Duration,
    max_header_size: usize,
    /// Cancelled when shutdown starts: stop between requests, finish the one in flight.
    stop: CancellationToken,
    /// Cancelled when the drain time is over: drop the connection whatever it is doing.
    force: CancellationToken,
}

impl Shared {
    fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(self.max_header_size);
        b
    }
}

/// Accepts connections from `listener` through `acceptor` and serves each with `drive` until
/// `shutdown` resolves; then drains as the module docs say.
pub(crate) async fn run<A, D, F>(
    listener: std::net::TcpListener,
    router: axum::Router,
    limits: &Limits,
    acceptor: A,
    drive: D,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    A: Accept<TcpStream, ()> + Clone + Send + Sync + 'static,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send,
    D: Fn(A::Stream, SocketAddr, Shared) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let shared = Shared {
        router,
        header_timeout: limits.header_timeout,
        max_header_size: limits.max_header_size,
        stop: CancellationToken::new(),
        force: CancellationToken::new(),
    };
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before it was taken: the
                    // listener itself is fine; give the table a moment.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let drive = drive.clone();
        let shared = shared.clone();
        tasks.spawn(async move {
            let accepted = tokio::select! {
                biased;
                () = shared.stop.cancelled() => return,
                a = acceptor.accept(tcp, ()) => a,
            };
            match accepted.map(|(io, _)| io) {
                Ok(io) => {
                    let force = shared.force.clone();
                    tokio::select! {
                        biased;
                        () = force.cancelled() => {}
                        () = drive(io, remote, shared) => {}
                    }
                }
                Err(e) => tracing::debug!(error = %e, %remote, "connection not accepted"),
            }
        });
    }
    drop(listener);
    tasks.close();
    shared.stop.cancel();
    if tokio::time::timeout(crate::DRAIN, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tasks.len(),
            "connections still busy after the drain time; closing them"
        );
        shared.force.cancel();
        tasks.wait().await;
    }
    Ok(())
}

/// Serves a plain connection, waiting between requests on the bare socket (see the module
/// docs).
pub(crate) async fn drive_plain(
    mut io: Conn<Gated<TcpStream>>,
    remote: SocketAddr,
    shared: Shared,
) {
    let mut first = true;
    loop {
        if !io.has_read_ahead() {
            let tcp = io.get_ref().get_ref();
            let readable = tokio::select! {
                biased;
                () = shared.stop.cancelled() => false,
                r = tokio::time::timeout(shared.header_timeout, tcp.readable()) => {
                    matches!(r, Ok(Ok(())))
                }
            };
            if !readable {
                break;
            }
            if first && speaks_h2c(tcp).await {
                // Boxed, as the burst below, to keep every connection's task small.
                Box::pin(drive_whole(io, remote, shared)).await;
                return;
            }
        }
        first = false;
        // Boxed: what hyper holds lives on the heap while it serves, and the task of an idle
        // connection stays small.
        let (back, keep) = Box::pin(serve_burst(io, remote, &shared)).await;
        io = back;
        if !keep {
            break;
        }
    }
    // Closing sends FIN and lingers (see `wire`), for a bounded time.
    let _ = io.shutdown().await;
}

/// Serves the requests that come on `io` back to back, until an answer is out and no request
/// followed for [`PARK_AFTER`]; the connection back, with what hyper read of a next request,
/// and whether it may wait for one.
async fn serve_burst(
    io: Conn<Gated<TcpStream>>,
    remote: SocketAddr,
    shared: &Shared,
) -> (Conn<Gated<TcpStream>>, bool) {
    let exchange = Arc::new(Exchange::default());
    let service = OneRequest {
        router: shared.router.clone(),
        remote,
        exchange: exchange.clone(),
    };
    let mut conn = shared.http1().serve_connection(TokioIo::new(io), service);
    // How many answers were out when hyper was told to stop; none may follow (its head
    // would say `connection: close`).
    let mut asked = None;
    let served = {
        let mut stopping = std::pin::pin!(shared.stop.cancelled());
        let mut quiet = std::pin::pin!(tokio::time::sleep(PARK_AFTER));
        // The answer count `quiet` was last set for.
        let mut armed = 0;
        std::future::poll_fn(|cx| {
            loop {
                let polled = conn.poll_without_shutdown(cx);
                if polled.is_ready() || asked.is_some() {
                    return polled;
                }
                // Stop between requests: an answer is out, no other request waits for one,
                // and none came for `PARK_AFTER`. The answer's head is written (hyper writes
                // it in the poll that takes the answer), so stopping adds no `connection:
                // close`; bytes of a next request come back in the parts. Poll again after:
                // an idle connection ends only when polled.
                let answered = exchange.answered.load(Ordering::Acquire);
                let between =
                    answered > 0 && answered == exchange.dispatched.load(Ordering::Acquire);
                if between && armed != answered {
                    quiet
                        .as_mut()
                        .reset(tokio::time::Instant::now() + PARK_AFTER);
                    armed = answered;
                }
                let park = between && quiet.as_mut().poll(cx).is_ready();
                if park || stopping.as_mut().poll(cx).is_ready() {
                    Pin::new(&mut conn).graceful_shutdown();
                    asked = Some(answered);
                    continue;
                }
                return Poll::Pending;
            }
        })
        .await
    };
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    let keep = served.is_ok()
        && asked == Some(exchange.answered.load(Ordering::Acquire))
        && exchange.keep_alive.load(Ordering::Acquire)
        && exchange.open_bodies.load(Ordering::Acquire) == 0
        && !shared.stop.is_cancelled();
    if let Err(e) = &served {
        tracing::debug!(error = %e, %remote, "connection ended");
    }
    if keep {
        io.put_back(parts.read_buf);
    }
    (io, keep)
}

/// Serves a connection for its whole life in one hyper connection (the TLS port, h2c).
pub(crate) async fn drive_whole<S>(io: S, remote: SocketAddr, shared: Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.header_timeout)
        .max_buf_size(shared.max_header_size);
    let service = hyper_util::service::TowerToHyperService::new(shared.router.clone().map_request(
        move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            req
        },
    ));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = conn.as_mut() => r,
        () = shared.stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, %remote, "connection ended");
    }
}

/// Whether a fresh connection's first bytes are (the start of) HTTP/2's preface.
async fn speaks_h2c(tcp: &TcpStream) -> bool {
    let mut head = [0u8; 4];
    match tcp.peek(&mut head).await {
        Ok(n) if n > 0 => H2_PREFACE.starts_with(&head[..n]),
        _ => false,
    }
}

/// What one hyper connection learned about the requests it served: one, or more when a
/// client pipelines (hyper takes the next request in the same poll that finishes an answer).
#[derive(Debug, Default)]
struct Exchange {
    /// Requests hyper handed to the router.
    dispatched: AtomicUsize,
    /// Answers the router gave (hyper writes each answer's head in the poll that takes it).
    answered: AtomicUsize,
    /// The client may send another request on this connection (its last request said so, and
    /// no answer said `connection: close`).
    keep_alive: AtomicBool,
    /// Requests whose body has not been read to its end: what is left of one would read as
    /// the next request.
    open_bodies: Arc<AtomicUsize>,
}

/// The router, for the requests of one hyper connection: adds the client's address, and records in an [`Exchange`]
/// what the connection needs to know to be kept.
struct OneRequest {
    router: axum::Router,
    remote: SocketAddr,
    exchange: Arc<Exchange>,
}

impl hyper::service::Service<http::Request<Incoming>> for OneRequest {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        self.exchange.dispatched.fetch_add(1, Ordering::AcqRel);
        let (mut parts, body) = req.into_parts();
        self.exchange
            .keep_alive
            .store(wants_keep_alive(&parts), Ordering::Release);
        parts.extensions.insert(ConnectInfo(self.remote));
        let body = Body::new(Tracked::new(body, self.exchange.open_bodies.clone()));
        let request = http::Request::from_parts(parts, body);
        let router = self.router.clone();
        let exchange = self.exchange.clone();
        Box::pin(async move {
            let mut response = router.oneshot(request).await?;
            if exchange.open_bodies.load(Ordering::Acquire) > 0 {
                // Answered before its body was read: what is left of the body would read as
                // the next request, so the connection ends here, and the answer says so. A
                // client that reused it (as after any keep-alive answer) would race the close
                // and lose the request it sent meanwhile.
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            if closes(response.headers()) {
                exchange.keep_alive.store(false, Ordering::Release);
            }
            exchange.answered.fetch_add(1, Ordering::AcqRel);
            Ok(response)
        })
    }
}

/// Whether `headers` carry `connection: close`.
fn closes(headers: &http::HeaderMap) -> bool {
    has_token(headers, "close")
}

fn has_token(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// HTTP/1.1 keeps a connection unless told `close`; HTTP/1.0 only when asked `keep-alive`.
fn wants_keep_alive(parts: &http::request::Parts) -> bool {
    match parts.version {
        http::Version::HTTP_11 => !closes(&parts.headers),
        http::Version::HTTP_10 => has_token(&parts.headers, "keep-alive"),
        _ => false,
    }
}

/// A request body that is counted in `open` until it has been read to its end.
struct Tracked {
    inner: Incoming,
    open: Option<Arc<AtomicUsize>>,
}

impl Tracked {
    fn new(inner: Incoming, open: Arc<AtomicUsize>) -> Self {
        if inner.is_end_stream() {
            return Self { inner, open: None };
        }
        open.fetch_add(1, Ordering::AcqRel);
        Self {
            inner,
            open: Some(open),
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            if let Some(open) = self.open.take() {
                open.fetch_sub(1, Ordering::AcqRel);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
