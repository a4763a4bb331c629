//! Pull: reading blobs and manifests by digest and by tag (official suite, "Pull").

use reqwest::Method;

use crate::fixtures::{OCI_MANIFEST, image_manifest};
use crate::{CONFIG_TYPE, LAYER_TYPE, Runner, expect_header};

const W: &str = "pull";

impl Runner {
    pub(crate) async fn pull(&mut self) {
        let ns = self.cfg.namespace.clone();
        let c0 = self.fx.config();
        let c1 = self.fx.config();
        let layer = self.fx.bytes(4096);
        let m0 = image_manifest(
            OCI_MANIFEST,
            (&c0, CONFIG_TYPE),
            &[(&layer, LAYER_TYPE)],
            serde_json::Value::Null,
        );
        let m1 = image_manifest(
            OCI_MANIFEST,
            (&c1, CONFIG_TYPE),
            &[(&layer, LAYER_TYPE)],
            serde_json::Value::Null,
        );

        // Behind a pull-through cache the content goes to its upstream, and every check below
        // reads it through the cache.
        let seeded = match self.cfg.upstream.clone() {
            Some(u) => match crate::client::Client::new(&u.url, u.credentials.clone()) {
                Ok(c) => Some((std::mem::replace(&mut self.client, c), u.namespace)),
                Err(e) => {
                    self.check(W, "setup: upstream client", Err(e));
                    return;
                }
            },
            None => None,
        };
        let setup_ns = seeded.as_ref().map_or(ns.clone(), |(_, n)| n.clone());
        for (what, b) in [("config 0", &c0), ("config 1", &c1), ("layer", &layer)] {
            let r = self.push_blob(&setup_ns, b).await;
            self.check(W, &format!("setup: push {what}"), r);
        }
        let r = self
            .put_manifest(&setup_ns, "tagtest0", &m0, OCI_MANIFEST)
            .await
            .and_then(|r| r.expect(&[201]).map(|_| ()));
        self.check(W, "setup: push manifest 0 as tag tagtest0", r);
        let r = self
            .put_manifest(&setup_ns, &m1.digest, &m1, OCI_MANIFEST)
            .await
            .and_then(|r| r.expect(&[201]).map(|_| ()));
        self.check(W, "setup: push manifest 1 by digest", r);

        if let Some((client, _)) = seeded {
            self.client = client;
        }
        let unknown = self.fx.bytes(32).digest;
        let r = self
            .status(Method::HEAD, &format!("/v2/{ns}/blobs/{unknown}"), &[404])
            .await;
        self.check(W, "HEAD unknown blob is 404", r);
        let r = async {
            let r = self
                .send(Method::HEAD, &format!("/v2/{ns}/blobs/{}", c0.digest))
                .await?;
            r.expect(&[200])?;
            expect_header(&r, "docker-content-digest", &c0.digest, false)?;
            expect_header(&r, "content-length", &c0.data.len().to_string(), true)?;
            if !r.body.is_empty() {
                return Err("HEAD answered with a body".into());
            }
            Ok(())
        }
        .await;
        self.check(W, "HEAD blob is 200 with its digest and length", r);
        let r = self
            .status(Method::GET, &format!("/v2/{ns}/blobs/{unknown}"), &[404])
            .await;
        self.check(W, "GET unknown blob is 404", r);
        let r = self
            .get_exact(&format!("/v2/{ns}/blobs/{}", c0.digest), &c0.data)
            .await
            .map(|_| ());
        self.check(W, "GET blob returns its bytes", r);

        let r = self
            .status(
                Method::HEAD,
                &format!("/v2/{ns}/manifests/.INVALID_MANIFEST_NAME"),
                &[404],
            )
            .await;
        self.check(W, "HEAD manifest with an invalid reference is 404", r);
        for (what, reference, m) in [
            ("manifest 0 by digest", m0.digest.clone(), &m0),
            ("manifest 1 by digest", m1.digest.clone(), &m1),
            ("manifest by tag", "tagtest0".to_owned(), &m0),
        ] {
            let r = async {
                let r = self
                    .client
                    .req(Method::HEAD, &format!("/v2/{ns}/manifests/{reference}"))
                    .header("accept", OCI_MANIFEST)
                    .send()
                    .await?;
                r.expect(&[200])?;
                expect_header(&r, "docker-content-digest", &m.digest, false)?;
                Ok(())
            }
            .await;
            self.check(W, &format!("HEAD {what} is 200 with its digest"), r);
        }
        let r = self
            .status(
                Method::GET,
                &format!("/v2/{ns}/manifests/.INVALID_MANIFEST_NAME"),
                &[404],
            )
            .await;
        self.check(W, "GET manifest with an invalid reference is 404", r);
        for (what, reference, m) in [
            ("manifest 0 by digest", m0.digest.clone(), &m0),
            ("manifest 1 by digest", m1.digest.clone(), &m1),
            ("manifest by tag", "tagtest0".to_owned(), &m0),
        ] {
            let r = async {
                let r = self
                    .client
                    .req(Method::GET, &format!("/v2/{ns}/manifests/{reference}"))
                    .header("accept", OCI_MANIFEST)
                    .send()
                    .await?;
                r.expect(&[200])?;
                if r.body != m.data {
                    return Err("body differs from the pushed bytes".into());
                }
                expect_header(&r, "docker-content-digest", &m.digest, false)?;
                expect_header(&r, "content-type", OCI_MANIFEST, true)
            }
            .await;
            self.check(W, &format!("GET {what} returns the pushed bytes"), r);
        }
        let r = async {
            let r = self
                .send(
                    Method::GET,
                    &format!("/v2/{ns}/manifests/sha256:totallywrong"),
                )
                .await?;
            r.expect(&[400, 404])?;
            if r.status.as_u16() == 400 && r.error_code().is_none() {
                return Err("400 without an OCI error code".into());
            }
            Ok(())
        }
        .await;
        self.check(W, "GET manifest with an invalid digest is 400 or 404", r);

        for (what, d) in [("manifest 0", &m0.digest), ("manifest 1", &m1.digest)] {
            let r = self
                .status(
                    Method::DELETE,
                    &format!("/v2/{ns}/manifests/{d}"),
                    &[202, 405],
                )
                .await;
            self.check(W, &format!("teardown: delete {what}"), r);
        }
        for (what, d) in [
            ("config 0", &c0.digest),
            ("config 1", &c1.digest),
            ("layer", &layer.digest),
        ] {
            let r = self
                .status(
                    Method::DELETE,
                    &format!("/v2/{ns}/blobs/{d}"),
                    &[202, 404, 405],
                )
                .await;
            self.check(W, &format!("teardown: delete {what}"), r);
        }
    }
}
