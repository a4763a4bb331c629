//! Kept-alive plain-HTTP connections, which wait between requests without hyper's buffers
//! (see `src/server.rs`): what they cost while idle, and that every request on them is still
//! answered, whatever the pauses, splits and pipelining around it. Raw sockets, so that what
//! is sent and when is exact; the server is a child process, so its memory can be read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sha2::Digest as _;

use crate::support::{Proc, spawn_berth_with};

/// One answer read off `s`: status, lower-cased head, body (by its `content-length`).
fn answer(s: &mut TcpStream, head_only: bool) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "connection ended inside an answer's head ({other:?}) after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an answer: {head:?}"));
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; if head_only { 0 } else { length }];
    s.read_exact(&mut body).expect("answer body");
    (status, head, body)
}

fn connect(p: &Proc) -> TcpStream {
    let s = TcpStream::connect(p.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s
}

const GET_V2: &[u8] = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";

fn rss_kib(p: &Proc) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", p.child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn idle_kept_alive_connections_hold_no_request_buffers() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    const N: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth_with(
        &dir.path().join("data"),
        Some("[limits]\nmax_connections = 4000\n"),
    );
    // Warm up: the router, the metadata connections and the runtime's threads are in place.
    for _ in 0..50 {
        let mut s = connect(&p);
        s.write_all(GET_V2).unwrap();
        assert_eq!(answer(&mut s, false).0, 200);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(&p);
    let mut idle = Vec::new();
    for _ in 0..N {
        let mut s = connect(&p);
        s.write_all(GET_V2).unwrap();
        assert_eq!(answer(&mut s, false).0, 200);
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let added = rss_kib(&p).saturating_sub(before);
    // hyper's buffers alone are 16–24 KiB a connection; a waiting socket and its task are
    // far under 8.
    assert!(
        added < N * 8,
        "{N} idle connections added {added} KiB ({} KiB each)",
        added / N
    );
    // Every one of them is still kept alive and answers its next request.
    for s in idle.iter_mut().step_by(50) {
        s.write_all(GET_V2).unwrap();
        assert_eq!(answer(s, false).0, 200);
    }
}

#[test]
fn requests_on_one_connection_are_answered_across_pauses_and_split_heads_and_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth_with(&dir.path().join("data"), None);
    let mut s = connect(&p);
    for pause in [0, 20, 400, 0] {
        s.write_all(GET_V2).unwrap();
        let (status, head, _) = answer(&mut s, false);
        assert_eq!(status, 200);
        assert!(!head.contains("connection: close"), "{head}");
        std::thread::sleep(Duration::from_millis(pause));
    }
    // A head in two parts, the second after the first has waited.
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"st: x\r\n\r\n").unwrap();
    assert_eq!(answer(&mut s, false).0, 200);
    // A blob pushed in one request whose body arrives in two parts, then read back.
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
    let head = format!(
        "POST /v2/keep/alive/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&blob[..70_000]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&blob[70_000..]).unwrap();
    let (status, head, _) = answer(&mut s, false);
    assert_eq!(status, 201, "{head}");
    let head_req = format!("HEAD /v2/keep/alive/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(head_req.as_bytes()).unwrap();
    let (status, head, _) = answer(&mut s, true);
    assert_eq!(status, 200);
    assert!(
        head.contains(&format!("content-length: {}", blob.len())),
        "{head}"
    );
    let get = format!("GET /v2/keep/alive/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(get.as_bytes()).unwrap();
    let (status, _, body) = answer(&mut s, false);
    assert_eq!((status, body == blob), (200, true));
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth_with(&dir.path().join("data"), None);
    let mut s = connect(&p);
    // Four requests in one write; the last asks to close.
    s.write_all(
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /v2/nothing/here/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, head, _) = answer(&mut s, false);
        seen.push((status, head.contains("connection: close")));
    }
    assert_eq!(
        seen,
        [(200, false), (404, false), (200, false), (200, true)],
        "answers in order; only the one asked to close says so"
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing after the last answer: {rest:?}");
}

#[test]
fn a_request_body_left_unread_is_never_read_as_a_request_and_its_answer_closes() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_berth_with(&dir.path().join("data"), None);
    let mut s = connect(&p);
    // The body of a PATCH to an upload that does not exist is itself a request: answered
    // without reading it, the connection must not go on to serve it, and must say it closes.
    let inner = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let head = format!(
        "PATCH /v2/a/blobs/uploads/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        inner.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(inner).unwrap();
    let (status, head, _) = answer(&mut s, false);
    assert_eq!(status, 404);
    // The answer says the connection ends, so that no client sends its next request on it.
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"),
        "the body was served as a request: {:?}",
        String::from_utf8_lossy(&rest)
    );
}
