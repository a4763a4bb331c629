#!/usr/bin/env python3
"""The GCS XML API on loopback, for Berth's GCS backend tests.

Berth reaches Google Cloud Storage through object_store's GCS client, which speaks the XML API
(https://cloud.google.com/storage/docs/xml-api/overview): objects are PUT, GET, HEAD and DELETEd
at /BUCKET/OBJECT, copies are a PUT with `x-goog-copy-source`, large writes are XML multipart
uploads, listings are `GET /BUCKET?list-type=2`, and every request carries a self-signed JWT
made from the service account key. The GCS emulators on PyPI serve the JSON API and only a
sliver of the XML one, so this gateway speaks the XML API to the client and keeps every object
in fake-gcs-server (its PyPI wheel carries the server) through that server's JSON API.

What the gateway checks as GCS does, so that a test fails where GCS would refuse:
- every request's bearer token is an RS256 JWT signed by the service account's key (`--key`),
  issued by its client_email, not expired;
- a signed URL (`X-Goog-Algorithm=GOOG4-RSA-SHA256`) is checked against the key from its
  canonical request, with its date and expiry, as the V4 signing documentation describes; the
  host in it is `--signed-host` when given, since the gateway stands in for
  storage.googleapis.com (object_store signs for that host whatever its base URL);
- `x-goog-if-generation-match: 0` on a write or copy refuses with 412 when the object exists;
- a multipart upload completes only with the parts it was given, in ascending order, with their
  ETags.
Counts of what it served are at GET /_gateway/stats (JSON).
"""

import argparse
import base64
import datetime as dt
import email.utils
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

CHUNK = 1 << 20


class Gcs:
    """The emulator's JSON API, one connection per call."""

    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port

    def call(self, method, path, body=None, headers=None, length=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=600)
        h = dict(headers or {})
        if length is not None:
            h["Content-Length"] = str(length)
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in h.items():
            c.putheader(k, v)
        c.endheaders()
        if body is not None:
            if isinstance(body, bytes):
                c.send(body)
            else:
                for chunk in body:
                    c.send(chunk)
        return c, c.getresponse()

    def json(self, method, path, body=None, headers=None, length=None):
        c, r = self.call(method, path, body, headers, length)
        data = r.read()
        c.close()
        return r.status, (json.loads(data) if data and r.status < 300 else None)


def q(name):
    return urllib.parse.quote(name, safe="")


def http_date(rfc3339):
    t = dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return email.utils.format_datetime(t.astimezone(dt.timezone.utc), usegmt=True)


class State:
    def __init__(self, args):
        self.gcs = Gcs(args.backend)
        key = json.load(open(args.key))
        self.email = key["client_email"]
        self.public = serialization.load_pem_private_key(
            key["private_key"].encode(), password=None
        ).public_key()
        self.pem = self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.signed_host = args.signed_host
        self.parts_dir = tempfile.mkdtemp(prefix="gcs-gateway-")
        self.uploads = {}  # upload id -> (bucket, object)
        # Conditional writes check and act as one step under it; re-entrant, as counting
        # takes it too.
        self.lock = threading.RLock()
        self.stats = {}

    def count(self, what):
        with self.lock:
            self.stats[what] = self.stats.get(what, 0) + 1


class Refused(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State = None

    def log_message(self, fmt, *args):
        if os.environ.get("GCS_GATEWAY_LOG"):
            sys.stderr.write("gateway: " + (fmt % args) + "\n")

    # ---- plumbing -------------------------------------------------------------------------

    def read_exactly(self, left):
        """The next `left` bytes of the body, a chunk at a time."""
        while left:
            b = self.rfile.read(min(left, CHUNK))
            if not b:
                raise Refused(400, "IncompleteBody", "body ended early")
            left -= len(b)
            yield b

    def body_chunks(self):
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            yield from self.read_exactly(int(self.headers.get("Content-Length") or 0))
            return
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield from self.read_exactly(size)
            self.rfile.readline()

    def drain(self):
        for _ in self.body_chunks():
            pass

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.command == "HEAD" and "Content-Length" in (headers or {}):
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code, message):
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>%s</Code><Message>%s</Message></Error>"
            % (code, escape(message))
        ).encode()
        self.reply(status, body, {"Content-Type": "application/xml; charset=UTF-8"})

    def object_headers(self, meta):
        return {
            "ETag": '"%s"' % meta["etag"],
            "x-goog-generation": meta["generation"],
            "Last-Modified": http_date(meta["updated"]),
        }

    # ---- authentication -------------------------------------------------------------------

    def authenticate(self, url):
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if "X-Goog-Algorithm" in query:
            self.check_signed_url(url, query)
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise Refused(401, "AuthenticationRequired", "no bearer token")
        try:
            claims = jwt.decode(
                auth[7:], self.state.pem, algorithms=["RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as e:
            raise Refused(401, "InvalidAuthentication", "bad token: %s" % e)
        if claims.get("iss") != self.state.email:
            raise Refused(403, "AccessDenied", "token not issued by the service account")
        self.state.count("authenticated")

    def check_signed_url(self, url, query):
        one = {k: v[0] for k, v in query.items()}
        if self.command not in ("GET", "HEAD"):
            raise Refused(403, "AccessDenied", "signed URLs in these tests are for downloads")
        if one.get("X-Goog-Algorithm") != "GOOG4-RSA-SHA256":
            raise Refused(400, "InvalidArgument", "unknown signing algorithm")
        credential = one.get("X-Goog-Credential", "")
        email_, _, scope = credential.partition("/")
        if email_ != self.state.email:
            raise Refused(403, "AccessDenied", "signed by another account")
        when = dt.datetime.strptime(one.get("X-Goog-Date", ""), "%Y%m%dT%H%M%SZ").replace(
            tzinfo=dt.timezone.utc
        )
        expires = int(one.get("X-Goog-Expires", "0"))
        if not 1 <= expires <= 604800:
            raise Refused(400, "InvalidArgument", "X-Goog-Expires out of range")
        now = dt.datetime.now(dt.timezone.utc)
        if now > when + dt.timedelta(seconds=expires):
            raise Refused(400, "ExpiredToken", "the signed URL has expired")
        signed = one.get("X-Goog-SignedHeaders", "").split(";")
        canonical_query = "&".join(
            "%s=%s" % (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
            for k, v in sorted((k, v) for k, v in one.items() if k != "X-Goog-Signature")
        )
        seen = {"host": self.state.signed_host or self.headers.get("Host", "")}
        canonical_headers = "".join(
            "%s:%s\n" % (h, (seen.get(h) or self.headers.get(h) or "").strip()) for h in signed
        )
        canonical = "\n".join(
            [
                "GET",  # a HEAD on a URL signed for GET is allowed, as on GCS
                url.path,
                canonical_query,
                canonical_headers,
                ";".join(signed),
                "UNSIGNED-PAYLOAD",
            ]
        )
        to_sign = "\n".join(
            [
                "GOOG4-RSA-SHA256",
                one["X-Goog-Date"],
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        try:
            self.state.public.verify(
                bytes.fromhex(one.get("X-Goog-Signature", "")),
                to_sign.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:
            raise Refused(403, "SignatureDoesNotMatch", "signature does not match")
        self.state.count("signed_url")

    # ---- dispatch -------------------------------------------------------------------------

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        try:
            if url.path == "/_gateway/stats":
                with self.state.lock:
                    body = json.dumps(self.state.stats).encode()
                self.reply(200, body, {"Content-Type": "application/json"})
                return
            self.authenticate(url)
            bucket, _, name = url.path.lstrip("/").partition("/")
            bucket, name = urllib.parse.unquote(bucket), urllib.parse.unquote(name)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            one = {k: v[0] for k, v in query.items()}
            if not name:
                if self.command == "GET":
                    return self.list(bucket, one)
                raise Refused(405, "MethodNotAllowed", "bucket operations are not served")
            if self.command == "POST" and "uploads" in one:
                return self.initiate(bucket, name)
            if self.command == "PUT" and "uploadId" in one:
                return self.put_part(one["uploadId"], int(one["partNumber"]))
            if self.command == "POST" and "uploadId" in one:
                return self.complete(bucket, name, one["uploadId"])
            if self.command == "DELETE" and "uploadId" in one:
                return self.abort(one["uploadId"])
            if self.command == "PUT" and "x-goog-copy-source" in self.headers:
                return self.copy(bucket, name)
            if self.command == "PUT":
                return self.put(bucket, name)
            if self.command in ("GET", "HEAD"):
                return self.get(bucket, name, one)
            if self.command == "DELETE":
                return self.delete(bucket, name)
            raise Refused(405, "MethodNotAllowed", self.command)
        except Refused as e:
            self.close_connection = True
            self.error(e.status, e.code, e.message)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_any

    # ---- objects --------------------------------------------------------------------------

    def meta(self, bucket, name):
        status, meta = self.state.gcs.json("GET", "/storage/v1/b/%s/o/%s" % (q(bucket), q(name)))
        return meta if status == 200 else None

    def must_not_exist(self, bucket, name):
        if self.headers.get("x-goog-if-generation-match") == "0" and self.meta(bucket, name):
            self.state.count("precondition_failed")
            raise Refused(412, "PreconditionFailed", "the object exists")

    def upload(self, bucket, name, chunks, length):
        status, meta = self.state.gcs.json(
            "POST",
            "/upload/storage/v1/b/%s/o?uploadType=media&name=%s" % (q(bucket), q(name)),
            chunks,
            {"Content-Type": self.headers.get("Content-Type", "application/octet-stream")},
            length,
        )
        if status != 200:
            raise Refused(502, "InternalError", "emulator upload answered %d" % status)
        return meta

    def put(self, bucket, name):
        conditional = self.headers.get("x-goog-if-generation-match") == "0"
        if not conditional and "Content-Length" in self.headers:
            length = int(self.headers["Content-Length"])
            meta = self.upload(bucket, name, self.body_chunks(), length)
        else:
            # Spooled first: a chunked body's length is known only at its end, and a
            # conditional write checks and writes as one step under the lock.
            with tempfile.TemporaryFile(dir=self.state.parts_dir) as f:
                for b in self.body_chunks():
                    f.write(b)
                length = f.tell()
                with self.state.lock:
                    if conditional:
                        self.must_not_exist(bucket, name)
                    f.seek(0)
                    meta = self.upload(bucket, name, iter(lambda: f.read(CHUNK), b""), length)
        self.state.count("put")
        self.reply(200, b"", self.object_headers(meta))

    def copy(self, bucket, name):
        self.drain()
        source = urllib.parse.unquote(self.headers["x-goog-copy-source"]).lstrip("/")
        src_bucket, _, src_name = source.partition("/")
        with self.state.lock:
            self.must_not_exist(bucket, name)
            status, meta = self.state.gcs.json(
                "POST",
                "/storage/v1/b/%s/o/%s/copyTo/b/%s/o/%s"
                % (q(src_bucket), q(src_name), q(bucket), q(name)),
                b"",
                length=0,
            )
        if status == 404:
            raise Refused(404, "NoSuchKey", "copy source not found")
        if status != 200:
            raise Refused(502, "InternalError", "emulator copy answered %d" % status)
        self.state.count("copy")
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><CopyObjectResult><LastModified>%s"
            "</LastModified><ETag>\"%s\"</ETag></CopyObjectResult>" % (meta["updated"], meta["etag"])
        ).encode()
        self.reply(200, body, dict(self.object_headers(meta), **{"Content-Type": "application/xml"}))

    def get(self, bucket, name, one):
        self.drain()
        path = "/storage/v1/b/%s/o/%s?alt=media" % (q(bucket), q(name))
        if "generation" in one:
            path += "&generation=%s" % q(one["generation"])
        headers = {}
        if self.headers.get("Range"):
            headers["Range"] = self.headers["Range"]
        c, r = self.state.gcs.call("GET", path, headers=headers)
        try:
            if r.status == 404:
                r.read()
                raise Refused(404, "NoSuchKey", "The specified key does not exist.")
            if r.status == 416:
                r.read()
                raise Refused(416, "InvalidRange", "The requested range cannot be satisfied.")
            if r.status not in (200, 206):
                r.read()
                raise Refused(502, "InternalError", "emulator download answered %d" % r.status)
            self.send_response(r.status)
            for h in ("Content-Length", "Content-Range", "Content-Type", "ETag", "Last-Modified",
                      "x-goog-generation", "x-goog-hash", "Accept-Ranges"):
                v = r.getheader(h)
                if v is not None:
                    self.send_header(h, v)
            self.end_headers()
            self.state.count("head" if self.command == "HEAD" else "get")
            if self.command == "HEAD":
                return
            while True:
                b = r.read(CHUNK)
                if not b:
                    break
                self.wfile.write(b)
        finally:
            c.close()

    def delete(self, bucket, name):
        self.drain()
        status, _ = self.state.gcs.json("DELETE", "/storage/v1/b/%s/o/%s" % (q(bucket), q(name)))
        if status == 404:
            raise Refused(404, "NoSuchKey", "The specified key does not exist.")
        if status >= 300:
            raise Refused(502, "InternalError", "emulator delete answered %d" % status)
        self.state.count("delete")
        self.reply(204)

    def list(self, bucket, one):
        prefix = one.get("prefix", "")
        delimiter = one.get("delimiter")
        after = max(one.get("start-after", ""), one.get("continuation-token", ""))
        max_keys = min(int(one.get("max-keys", "1000")), 1000)
        names, token = [], None
        while True:
            path = "/storage/v1/b/%s/o?prefix=%s&maxResults=1000" % (q(bucket), q(prefix))
            if token:
                path += "&pageToken=%s" % q(token)
            status, page = self.state.gcs.json("GET", path)
            if status == 404:
                raise Refused(404, "NoSuchBucket", "The specified bucket does not exist.")
            if status != 200:
                raise Refused(502, "InternalError", "emulator list answered %d" % status)
            names.extend(page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                break
        names.sort(key=lambda m: m["name"])
        contents, prefixes, truncated, last = [], [], False, None
        for m in names:
            key = m["name"]
            if key <= after:
                continue
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    p = key[: cut + len(delimiter)]
                    if p not in prefixes and p > after:
                        if len(contents) + len(prefixes) == max_keys:
                            truncated = True
                            break
                        prefixes.append(p)
                        last = p
                    continue
            if len(contents) + len(prefixes) == max_keys:
                truncated = True
                break
            contents.append(m)
            last = key
        out = ["<?xml version='1.0' encoding='UTF-8'?><ListBucketResult>"]
        out.append("<Name>%s</Name><Prefix>%s</Prefix>" % (escape(bucket), escape(prefix)))
        out.append("<KeyCount>%d</KeyCount><MaxKeys>%d</MaxKeys>" % (len(contents) + len(prefixes), max_keys))
        out.append("<IsTruncated>%s</IsTruncated>" % ("true" if truncated else "false"))
        if truncated:
            out.append("<NextContinuationToken>%s</NextContinuationToken>" % escape(last))
        for m in contents:
            out.append(
                "<Contents><Key>%s</Key><Generation>%s</Generation><LastModified>%s</LastModified>"
                "<ETag>\"%s\"</ETag><Size>%s</Size></Contents>"
                % (escape(m["name"]), m["generation"], m["updated"], escape(m["etag"]), m["size"])
            )
        for p in prefixes:
            out.append("<CommonPrefixes><Prefix>%s</Prefix></CommonPrefixes>" % escape(p))
        out.append("</ListBucketResult>")
        self.state.count("list")
        self.reply(200, "".join(out).encode(), {"Content-Type": "application/xml"})

    # ---- multipart uploads ----------------------------------------------------------------

    def initiate(self, bucket, name):
        self.drain()
        upload = uuid.uuid4().hex
        os.mkdir(os.path.join(self.state.parts_dir, upload))
        with self.state.lock:
            self.state.uploads[upload] = (bucket, name)
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult><Bucket>%s"
            "</Bucket><Key>%s</Key><UploadId>%s</UploadId></InitiateMultipartUploadResult>"
            % (escape(bucket), escape(name), upload)
        ).encode()
        self.state.count("multipart_initiate")
        self.reply(200, body, {"Content-Type": "application/xml"})

    def upload_dir(self, upload):
        if upload not in self.state.uploads or not re.fullmatch(r"[0-9a-f]{32}", upload):
            raise Refused(404, "NoSuchUpload", "The specified multipart upload does not exist.")
        return os.path.join(self.state.parts_dir, upload)

    def put_part(self, upload, number):
        d = self.upload_dir(upload)
        if not 1 <= number <= 10000:
            raise Refused(400, "InvalidArgument", "part number out of range")
        h = hashlib.md5()
        tmp = os.path.join(d, "%05d.tmp-%s" % (number, uuid.uuid4().hex))
        with open(tmp, "wb") as f:
            for b in self.body_chunks():
                h.update(b)
                f.write(b)
        os.replace(tmp, os.path.join(d, "%05d" % number))
        with open(os.path.join(d, "%05d.etag" % number), "w") as f:
            f.write(h.hexdigest())
        self.state.count("multipart_part")
        self.reply(200, b"", {"ETag": '"%s"' % h.hexdigest()})

    def complete(self, bucket, name, upload):
        d = self.upload_dir(upload)
        doc = ET.fromstring(b"".join(self.body_chunks()))
        parts = [
            (int(p.findtext("PartNumber")), (p.findtext("ETag") or "").strip('"'))
            for p in doc.iter("Part")
        ]
        numbers = [n for n, _ in parts]
        if not parts or numbers != sorted(set(numbers)):
            raise Refused(400, "InvalidPartOrder", "parts must be listed once, ascending")
        files = []
        for n, etag in parts:
            f = os.path.join(d, "%05d" % n)
            try:
                stored = open(f + ".etag").read()
            except FileNotFoundError:
                raise Refused(400, "InvalidPart", "part %d was not uploaded" % n)
            if stored != etag:
                raise Refused(400, "InvalidPart", "part %d has another ETag" % n)
            files.append(f)
        length = sum(os.path.getsize(f) for f in files)

        def chunks():
            for f in files:
                with open(f, "rb") as src:
                    while True:
                        b = src.read(CHUNK)
                        if not b:
                            break
                        yield b

        meta = self.upload(bucket, name, chunks(), length)
        with self.state.lock:
            self.state.uploads.pop(upload, None)
        shutil.rmtree(d, ignore_errors=True)
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult><Bucket>%s"
            "</Bucket><Key>%s</Key><ETag>\"%s\"</ETag></CompleteMultipartUploadResult>"
            % (escape(bucket), escape(name), escape(meta["etag"]))
        ).encode()
        self.state.count("multipart_complete")
        self.reply(200, body, dict(self.object_headers(meta), **{"Content-Type": "application/xml"}))

    def abort(self, upload):
        self.drain()
        d = self.upload_dir(upload)
        with self.state.lock:
            self.state.uploads.pop(upload, None)
        shutil.rmtree(d, ignore_errors=True)
        self.state.count("multipart_abort")
        self.reply(204)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", required=True, help="fake-gcs-server's URL")
    p.add_argument("--key", required=True, help="the service account key file Berth uses")
    p.add_argument(
        "--signed-host",
        help="check signed URLs as if requests came to this host (the gateway stands in for "
        "storage.googleapis.com, the host object_store signs URLs for whatever its base URL)",
    )
    args = p.parse_args()
    # The test script stops the gateway with SIGTERM: exit through `finally`, so the parts
    # directory goes with it (the default action would leave one behind per run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Handler.state = State(args)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    finally:
        shutil.rmtree(Handler.state.parts_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
