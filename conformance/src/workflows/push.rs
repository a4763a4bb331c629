//! Push: every way of uploading a blob, cross-repository mounts, manifest pushes (official
//! suite, "Push").

use reqwest::Method;
use serde_json::json;

use crate::fixtures::{OCI_MANIFEST, image_manifest};
use crate::{CONFIG_TYPE, LAYER_TYPE, Runner, location, with_digest};

const W: &str = "push";

impl Runner {
    pub(crate) async fn push(&mut self) {
        let ns = self.cfg.namespace.clone();
        let cross = self.cfg.crossmount_namespace.clone();
        let config = self.fx.config();
        let layer = self.fx.bytes(4096);
        let chunked = self.fx.bytes(42);
        let streamed = self.fx.bytes(1000);
        let single = self.fx.bytes(500);

        // Streamed: POST, one PATCH without Content-Range, empty PUT.
        let loc = self.start_upload(&ns).await;
        let patched = match loc {
            Ok(loc) => {
                let r = self
                    .client
                    .req(Method::PATCH, &loc)
                    .header("content-type", "application/octet-stream")
                    .body(streamed.data.clone())
                    .send()
                    .await
                    .and_then(|r| r.expect(&[202]).and_then(location));
                self.check(
                    W,
                    "streamed upload: PATCH without Content-Range is 202",
                    r.as_ref().map(|_| ()).map_err(Clone::clone),
                );
                r.ok()
            }
            Err(e) => {
                self.check(W, "streamed upload: POST is 202 with a Location", Err(e));
                None
            }
        };
        let r = match patched {
            Some(loc) => self
                .client
                .req(Method::PUT, &with_digest(&loc, &streamed.digest))
                .send()
                .await
                .and_then(|r| r.expect(&[201]).and_then(location).map(|_| ())),
            None => Err("no upload session".into()),
        };
        self.check(
            W,
            "streamed upload: empty PUT with digest is 201 with a Location",
            r,
        );

        let unknown = self.fx.bytes(16).digest;
        let r = self
            .status(Method::GET, &format!("/v2/{ns}/blobs/{unknown}"), &[404])
            .await;
        self.check(W, "GET unknown blob is 404", r);

        // Single POST with the body.
        let r = async {
            let r = self
                .client
                .req(
                    Method::POST,
                    &format!("/v2/{ns}/blobs/uploads/?digest={}", single.digest),
                )
                .header("content-type", "application/octet-stream")
                .body(single.data.clone())
                .send()
                .await?;
            r.expect(&[201, 202])?;
            location(&r)?;
            let want = if r.status.as_u16() == 201 { 200 } else { 404 };
            self.status(
                Method::GET,
                &format!("/v2/{ns}/blobs/{}", single.digest),
                &[want],
            )
            .await
        }
        .await;
        self.check(
            W,
            "single POST with digest is 201 (blob readable) or 202 (not stored)",
            r,
        );

        // POST then PUT with the body.
        for (what, b) in [("config", &config), ("layer", &layer)] {
            let r = async {
                self.push_blob(&ns, b).await?;
                self.get_exact(&format!("/v2/{ns}/blobs/{}", b.digest), &b.data)
                    .await
                    .map(|_| ())
            }
            .await;
            self.check(
                W,
                &format!("POST then PUT of the {what} is 201 and readable"),
                r,
            );
        }

        // Chunked, with an out-of-order chunk, a stale Location and a status check.
        let half = 22;
        let (first, second) = (chunked.data.slice(..half), chunked.data.slice(half..));
        let range2 = format!("{}-{}", half, chunked.data.len() - 1);
        let r = async {
            let loc = self.start_upload(&ns).await?;
            let r = self
                .client
                .req(Method::PATCH, &loc)
                .header("content-type", "application/octet-stream")
                .header("content-range", range2.clone())
                .body(second.clone())
                .send()
                .await?;
            r.expect(&[416]).map(|_| ())
        }
        .await;
        self.check(W, "chunked upload: a chunk out of order is 416", r);
        let session = self.start_upload(&ns).await;
        let after_first = match &session {
            Ok(loc) => {
                let r = self
                    .client
                    .req(Method::PATCH, loc)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", format!("0-{}", half - 1))
                    .body(first.clone())
                    .send()
                    .await
                    .and_then(|r| {
                        r.expect(&[202])?;
                        crate::expect_header(&r, "range", &format!("0-{}", half - 1), true)?;
                        location(&r)
                    });
                self.check(
                    W,
                    "chunked upload: first chunk is 202 with Range 0-21",
                    r.as_ref().map(|_| ()).map_err(Clone::clone),
                );
                r.ok()
            }
            Err(e) => {
                self.check(W, "chunked upload: POST is 202", Err(e.clone()));
                None
            }
        };
        let r = match &session {
            Ok(loc) => self
                .client
                .req(Method::PATCH, loc)
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("0-{}", half - 1))
                .body(first.clone())
                .send()
                .await
                .and_then(|r| r.expect(&[416]).map(|_| ())),
            Err(e) => Err(e.clone()),
        };
        self.check(
            W,
            "chunked upload: the same chunk again on the first Location is 416",
            r,
        );
        let status_loc = match &session {
            Ok(loc) => {
                let r = self.send(Method::GET, loc).await.and_then(|r| {
                    r.expect(&[204])?;
                    crate::expect_header(&r, "range", &format!("0-{}", half - 1), true)?;
                    location(&r)
                });
                self.check(
                    W,
                    "chunked upload: GET status is 204 with Range 0-21",
                    r.as_ref().map(|_| ()).map_err(Clone::clone),
                );
                r.ok().or(after_first)
            }
            Err(_) => None,
        };
        let final_loc = match status_loc {
            Some(loc) => {
                let r = self
                    .client
                    .req(Method::PATCH, &loc)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", range2.clone())
                    .body(second.clone())
                    .send()
                    .await
                    .and_then(|r| r.expect(&[202]).and_then(location));
                self.check(
                    W,
                    "chunked upload: second chunk is 202",
                    r.as_ref().map(|_| ()).map_err(Clone::clone),
                );
                r.ok()
            }
            None => None,
        };
        let r = match final_loc {
            Some(loc) => {
                async {
                    let r = self
                        .client
                        .req(Method::PUT, &with_digest(&loc, &chunked.digest))
                        .header("content-length", "0")
                        .send()
                        .await?;
                    r.expect(&[201])?;
                    location(&r)?;
                    self.get_exact(&format!("/v2/{ns}/blobs/{}", chunked.digest), &chunked.data)
                        .await
                        .map(|_| ())
                }
                .await
            }
            None => Err("no upload session".into()),
        };
        self.check(
            W,
            "chunked upload: closing PUT is 201 and the blob reads back",
            r,
        );

        // Cross-repository mounts.
        let r = async {
            let r = self
                .send(
                    Method::POST,
                    &format!("/v2/{cross}/blobs/uploads/?mount={unknown}"),
                )
                .await?;
            r.expect(&[202])?;
            location(&r).map(|_| ())
        }
        .await;
        self.check(
            W,
            "mount of an unknown blob without from is 202 with a Location",
            r,
        );
        let r = async {
            let r = self
                .send(
                    Method::POST,
                    &format!(
                        "/v2/{cross}/blobs/uploads/?mount={}&from={ns}",
                        layer.digest
                    ),
                )
                .await?;
            r.expect(&[201, 202])?;
            let loc = location(&r)?;
            let path = loc
                .find("/v2/")
                .map(|i| &loc[i..])
                .unwrap_or(&loc)
                .to_owned();
            if r.status.as_u16() == 201 {
                let want = format!("/v2/{cross}/blobs/{}", layer.digest);
                if path != want {
                    return Err(format!("Location {path:?}, expected {want:?}"));
                }
                self.get_exact(&loc, &layer.data).await.map(|_| ())
            } else if path.starts_with(&format!("/v2/{cross}/blobs/uploads/")) {
                Ok(())
            } else {
                Err(format!(
                    "202 with Location {path:?} outside /v2/{cross}/blobs/uploads/"
                ))
            }
        }
        .await;
        self.check(
            W,
            "mount from another repository is 201 (readable) or 202 (upload session)",
            r,
        );

        // Manifests.
        let r = self
            .status(
                Method::GET,
                &format!("/v2/{ns}/manifests/.INVALID_MANIFEST_NAME"),
                &[404],
            )
            .await;
        self.check(W, "GET manifest with an invalid reference is 404", r);
        let m = image_manifest(
            OCI_MANIFEST,
            (&config, CONFIG_TYPE),
            &[(&layer, LAYER_TYPE)],
            json!(null),
        );
        for t in ["test0", "test1", "test2", "test3"] {
            let r = self
                .put_manifest(&ns, t, &m, OCI_MANIFEST)
                .await
                .and_then(|r| r.expect(&[201]).and_then(location).map(|_| ()));
            self.check(
                W,
                &format!("PUT manifest as tag {t} is 201 with a Location"),
                r,
            );
        }
        let empty = image_manifest(
            OCI_MANIFEST,
            (&config, CONFIG_TYPE),
            &[],
            json!({ "mediaType": null }),
        );
        let r = self
            .put_manifest(&ns, "emptylayer", &empty, OCI_MANIFEST)
            .await
            .and_then(|r| r.expect(&[201]).and_then(location).map(|_| ()));
        self.check(
            W,
            "PUT manifest without layers and without mediaType is 201",
            r,
        );
        let r = self
            .get_exact(&format!("/v2/{ns}/manifests/{}", m.digest), &m.data)
            .await
            .map(|_| ());
        self.check(W, "GET pushed manifest by digest returns its bytes", r);

        for d in [&m.digest, &empty.digest] {
            let r = self
                .status(
                    Method::DELETE,
                    &format!("/v2/{ns}/manifests/{d}"),
                    &[202, 404, 405],
                )
                .await;
            self.check(W, "teardown: delete manifest", r);
        }
        for b in [&config, &layer, &chunked, &streamed, &single] {
            let r = self
                .status(
                    Method::DELETE,
                    &format!("/v2/{ns}/blobs/{}", b.digest),
                    &[202, 404, 405],
                )
                .await;
            self.check(W, "teardown: delete blob", r);
        }
    }
}
