//! The connection itself, below the router: answers Berth writes before hyper sees a request
//! (too many connections, plain HTTP on the TLS port), the answers hyper writes when it cannot
//! parse one, and how a connection is closed.
//!
//! Every connection is a [`Conn`], which does three things:
//! - hyper answers parse errors itself (`400` for a malformed request line or header, `414` for
//!   a request line too long, `431` for headers too large), with an empty body, and offers no
//!   hook. [`Conn`] recognises that answer (one of those statuses with `content-length: 0` and
//!   no `content-type`, alone in its write: the router's errors always carry a JSON body) and
//!   writes it again with an OCI error body saying what was wrong.
//! - A lingering close. When Berth answers before reading a request's whole body (a push
//!   refused up front with `429` or `507`, a write that failed mid-body), hyper closes the
//!   connection with the rest of the body unread, and the kernel answers the bytes the client
//!   is still sending with a reset, which can destroy the answer before the client reads it:
//!   a client that writes its whole body before reading (Python's http.client, many scripts)
//!   sees "broken pipe" instead of the error. So closing sends FIN first and then reads and
//!   discards what the client still sends, until it closes, for at most [`LINGER`] and
//!   [`LINGER_BYTES`].
//! - Bytes put back: a plain connection between two hyper connections (see `server`) hands
//!   what the last one read past its request back to [`Conn::put_back`], and they are read
//!   first.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest a closing connection keeps reading what the client still sends.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(3);
/// The most a closing connection reads and discards.
pub const LINGER_BYTES: u64 = 128 * 1024 * 1024;

/// A complete `connection: close` answer with an OCI error body.
pub fn answer(status: &str, code: &str, message: &str, extra_headers: &str) -> Vec<u8> {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra_headers}\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What hyper's bare answer to a parse error is replaced by, if `head` is one.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    // hyper's answer is a status line, `content-length: 0` and `date`: well under 256 bytes.
    if head.len() > 256 || !head.starts_with(b"HTTP/1.1 4") || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?.to_ascii_lowercase();
    if !text.contains("\r\ncontent-length: 0\r\n") || text.contains("\r\ncontent-type:") {
        return None;
    }
    let (status, message) = match &text[9..12] {
        "400" => (
            "400 Bad Request",
            "malformed HTTP request: the request line or a header could not be parsed",
        ),
        "414" => ("414 URI Too Long", "the request line is too long"),
        "431" => (
            "431 Request Header Fields Too Large",
            "the request's headers are larger than the server accepts (limits.max_header_size)",
        ),
        _ => return None,
    };
    Some(answer(status, "UNSUPPORTED", message, ""))
}

/// A connection with OCI bodies on hyper's parse-error answers and a lingering close (see the
/// module docs).
pub struct Conn<S> {
    inner: S,
    /// Bytes read off `inner` past the last request, put back to be read first (see
    /// [`Conn::put_back`]).
    ahead: bytes::Bytes,
    /// A replacement being written: its bytes, how many went out, and how many bytes of the
    /// caller's buffer it stands for (reported once all of it is out).
    pending: Option<(Vec<u8>, usize, usize)>,
    /// Once the write side is shut: until when, and how much more, to read and discard.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, u64)>,
}

impl<S> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("lingering", &self.linger.is_some())
            .finish()
    }
}

impl<S> Conn<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            ahead: bytes::Bytes::new(),
            pending: None,
            linger: None,
        }
    }

    /// Puts `bytes` (read past its request by the hyper connection that just ended) before
    /// what is still to be read.
    pub fn put_back(&mut self, bytes: bytes::Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.ahead = if self.ahead.is_empty() {
            bytes
        } else {
            let mut joined = Vec::with_capacity(bytes.len() + self.ahead.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.ahead);
            joined.into()
        };
    }

    /// Whether bytes put back wait to be read.
    pub fn has_read_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            let chunk = self.ahead.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Conn<S> {
    /// Writes the pending replacement out; `Ready` with the length it stands for when done.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        while let Some((bytes, written, stands_for)) = &mut self.pending {
            if *written == bytes.len() {
                let n = *stands_for;
                self.pending = None;
                return Poll::Ready(Ok(n));
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                self.pending = None;
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(0))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match replacement(buf) {
                Some(r) => this.pending = Some((r, 0, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        this.drain(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            let mut filled = bufs.iter().filter(|b| !b.is_empty());
            match (filled.next(), filled.next()) {
                (Some(only), None) if replacement(only).is_some() => {}
                _ => return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            }
        }
        let only = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.poll_write(cx, only)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.pending.is_some() {
            ready!(self.drain(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            if this.pending.is_some() {
                ready!(this.drain(cx))?;
            }
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), LINGER_BYTES));
        }
        let Some((deadline, left)) = &mut this.linger else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                // The client closed too, or the connection broke: done either way.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    *left = left.saturating_sub(buf.filled().len() as u64);
                    if *left == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// An acceptor that wraps what `inner` accepts (a TCP or a TLS stream) in a [`Conn`].
#[derive(Debug, Clone)]
pub struct ConnAcceptor<A>(pub A);

impl<I, S, A> axum_server::accept::Accept<I, S> for ConnAcceptor<A>
where
    A: axum_server::accept::Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Conn<A::Stream>;
    type Service = A::Service;
    type Future =
        futures_util::future::BoxFuture<'static, std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.0.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((Conn::new(stream), service))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_parse_error_answers_are_replaced() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 22:00:00 GMT\r\n\r\n";
        let r = String::from_utf8(replacement(hyper).unwrap()).unwrap();
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        assert!(r.contains("\"code\":\"UNSUPPORTED\""), "{r}");
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert!(replacement(bad).is_some());
        // The router's answers carry a type and a body; other statuses pass.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(replacement(ours).is_none());
        let ok = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert!(replacement(ok).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx";
        assert!(replacement(with_body).is_none());
    }
}
