//! Content management: deleting tags, manifests and blobs (official suite, "Content Management").

use reqwest::Method;
use serde_json::json;

use crate::fixtures::{OCI_MANIFEST, image_manifest};
use crate::{CONFIG_TYPE, LAYER_TYPE, Runner};

const W: &str = "management";

impl Runner {
    async fn tag_count(&self, ns: &str) -> Result<usize, String> {
        let r = self
            .send(Method::GET, &format!("/v2/{ns}/tags/list"))
            .await?;
        if r.status.as_u16() == 404 {
            return Ok(0);
        }
        r.expect(&[200])?;
        Ok(r.json()?["tags"].as_array().map(Vec::len).unwrap_or(0))
    }

    pub(crate) async fn management(&mut self) {
        let ns = self.cfg.namespace.clone();
        let config = self.fx.config();
        let layer = self.fx.bytes(1024);
        let m = image_manifest(
            OCI_MANIFEST,
            (&config, CONFIG_TYPE),
            &[(&layer, LAYER_TYPE)],
            json!(null),
        );
        let tag = format!("tagtest{}", self.fx.token());
        let other = format!("keep{}", self.fx.token());
        let r = async {
            self.push_blob(&ns, &config).await?;
            self.push_blob(&ns, &layer).await?;
            self.put_manifest(&ns, &tag, &m, OCI_MANIFEST)
                .await?
                .expect(&[201])?;
            self.put_manifest(&ns, &other, &m, OCI_MANIFEST)
                .await?
                .expect(&[201])?;
            Ok(())
        }
        .await;
        self.check(W, "setup: push an image under two tags", r);
        let before = self.tag_count(&ns).await;
        self.check(
            W,
            "GET tags/list before deleting",
            before.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let before = before.unwrap_or(0);

        let r = async {
            let r = self
                .send(Method::DELETE, &format!("/v2/{ns}/manifests/{tag}"))
                .await?;
            r.expect(&[202, 400, 405])?;
            if r.status.as_u16() == 400 && r.error_code().as_deref() != Some("UNSUPPORTED") {
                return Err(format!(
                    "400 with code {:?}, expected UNSUPPORTED",
                    r.error_code()
                ));
            }
            if r.status.as_u16() == 202 {
                self.status(Method::GET, &format!("/v2/{ns}/manifests/{tag}"), &[404])
                    .await?;
                self.status(Method::GET, &format!("/v2/{ns}/manifests/{other}"), &[200])
                    .await?;
                self.status(
                    Method::GET,
                    &format!("/v2/{ns}/manifests/{}", m.digest),
                    &[200],
                )
                .await?;
            }
            Ok(())
        }
        .await;
        self.check(
            W,
            "DELETE by tag removes only that tag (or is unsupported)",
            r,
        );
        let r = self
            .status(
                Method::DELETE,
                &format!("/v2/{ns}/manifests/{}", m.digest),
                &[202],
            )
            .await;
        self.check(W, "DELETE manifest by digest is 202", r);
        let r = self
            .status(
                Method::GET,
                &format!("/v2/{ns}/manifests/{}", m.digest),
                &[404],
            )
            .await;
        self.check(W, "GET deleted manifest is 404", r);
        let r = self
            .status(Method::GET, &format!("/v2/{ns}/manifests/{other}"), &[404])
            .await;
        self.check(W, "tags of a deleted manifest are gone", r);
        let r = self.tag_count(&ns).await.and_then(|after| {
            if after + 2 == before {
                Ok(())
            } else {
                Err(format!(
                    "{before} tags before, {after} after; expected 2 fewer"
                ))
            }
        });
        self.check(W, "GET tags/list after deleting lists fewer tags", r);
        for (what, b) in [("config", &config), ("layer", &layer)] {
            let r = async {
                let r = self
                    .send(Method::DELETE, &format!("/v2/{ns}/blobs/{}", b.digest))
                    .await?;
                r.expect(&[202, 404, 405])?;
                if r.status.as_u16() == 202 {
                    self.status(Method::GET, &format!("/v2/{ns}/blobs/{}", b.digest), &[404])
                        .await?;
                    self.status(
                        Method::HEAD,
                        &format!("/v2/{ns}/blobs/{}", b.digest),
                        &[404],
                    )
                    .await?;
                }
                Ok(())
            }
            .await;
            self.check(
                W,
                &format!("DELETE {what} blob; GET and HEAD are then 404"),
                r,
            );
        }
        let unknown = self.fx.bytes(8).digest;
        let r = self
            .status(
                Method::DELETE,
                &format!("/v2/{ns}/blobs/{unknown}"),
                &[404, 405],
            )
            .await;
        self.check(W, "DELETE of an unknown blob is 404", r);
        let r = self
            .status(
                Method::DELETE,
                &format!("/v2/{ns}/manifests/{unknown}"),
                &[404, 405],
            )
            .await;
        self.check(W, "DELETE of an unknown manifest is 404", r);
    }
}
