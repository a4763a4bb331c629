//! Answers written on the connection itself, below the router: the ones Berth writes before
//! hyper sees a request (too many connections, plain HTTP on the TLS port), and the ones hyper
//! writes when it cannot parse one (`400` for a malformed request line or header, `414` for a
//! request line too long, `431` for headers too large).
//!
//! hyper answers parse errors itself, with a status and an empty body, and offers no hook. So
//! every connection's writes pass through [`OciAnswers`], which recognises that answer (a 400,
//! 414 or 431 with `content-length: 0` and no `content-type`, alone in its write: the router's
//! errors always carry a JSON body) and writes it again with an OCI error body saying what was
//! wrong. Everything else passes through untouched.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
            "the request's headers are larger than the server accepts (about 400 KiB)",
        ),
        _ => return None,
    };
    Some(answer(status, "UNSUPPORTED", message, ""))
}

/// A connection whose parse-error answers get OCI error bodies (see the module docs).
#[derive(Debug)]
pub struct OciAnswers<S> {
    inner: S,
    /// A replacement being written: its bytes, how many went out, and how many bytes of the
    /// caller's buffer it stands for (reported once all of it is out).
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> OciAnswers<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OciAnswers<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> OciAnswers<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for OciAnswers<S> {
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
        if self.pending.is_some() {
            ready!(self.drain(cx))?;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An acceptor that wraps what `inner` accepts (a TCP or a TLS stream) in [`OciAnswers`].
#[derive(Debug, Clone)]
pub struct OciAnswersAcceptor<A>(pub A);

impl<I, S, A> axum_server::accept::Accept<I, S> for OciAnswersAcceptor<A>
where
    A: axum_server::accept::Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = OciAnswers<A::Stream>;
    type Service = A::Service;
    type Future =
        futures_util::future::BoxFuture<'static, std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.0.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            Ok((OciAnswers::new(stream), service))
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
