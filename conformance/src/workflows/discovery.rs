//! Content discovery: tag listing with `n`/`last`, and the referrers API with `artifactType`
//! filtering (official suite, "Content Discovery").

use reqwest::Method;
use serde_json::{Value, json};

use crate::fixtures::{Blob, EMPTY_TYPE, OCI_INDEX, OCI_MANIFEST, image_manifest, index};
use crate::{CONFIG_TYPE, LAYER_TYPE, Runner};

const W: &str = "discovery";
const BAGEL: &str = "application/vnd.nhl.peanut.butter.bagel";
const FOOD: &str = "application/vnd.food.stand";

fn referrer_list(body: &Value) -> Result<Vec<Value>, String> {
    if body["mediaType"] != OCI_INDEX || body["schemaVersion"] != 2 {
        return Err(format!("not an OCI index: {body}"));
    }
    body["manifests"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("manifests is not an array: {body}"))
}

impl Runner {
    async fn referrers(
        &self,
        ns: &str,
        subject: &str,
        filter: Option<&str>,
    ) -> Result<(Vec<Value>, bool), String> {
        let q = filter
            .map(|f| format!("?artifactType={f}"))
            .unwrap_or_default();
        let r = self
            .send(Method::GET, &format!("/v2/{ns}/referrers/{subject}{q}"))
            .await?;
        r.expect(&[200])?;
        crate::expect_header(&r, "content-type", OCI_INDEX, true)?;
        let filtered = r
            .header("oci-filters-applied")
            .is_some_and(|v| v == "artifactType");
        Ok((referrer_list(&r.json()?)?, filtered))
    }

    pub(crate) async fn discovery(&mut self) {
        let ns = self.cfg.namespace.clone();
        let config = self.fx.config();
        let layer = self.fx.bytes(2048);
        let m2 = image_manifest(
            OCI_MANIFEST,
            (&config, CONFIG_TYPE),
            &[(&layer, LAYER_TYPE)],
            json!(null),
        );
        let r = async {
            self.push_blob(&ns, &config).await?;
            self.push_blob(&ns, &layer).await?;
            for t in ["test0", "test1", "test2", "test3"] {
                self.put_manifest(&ns, t, &m2, OCI_MANIFEST)
                    .await?
                    .expect(&[201])?;
            }
            Ok(())
        }
        .await;
        self.check(W, "setup: push an image under four tags", r);

        // Referrer setup: a subject image and five artifacts that point at it.
        let empty = Blob::new(&b"{}"[..]);
        let blob_a = self.fx.bytes(64);
        let blob_b = self.fx.bytes(64);
        let config4 = self.fx.config();
        let subject = image_manifest(
            OCI_MANIFEST,
            (&config4, CONFIG_TYPE),
            &[(&layer, LAYER_TYPE)],
            json!(null),
        );
        let missing_config = self.fx.config();
        let missing_subject = image_manifest(
            OCI_MANIFEST,
            (&missing_config, CONFIG_TYPE),
            &[],
            json!(null),
        );
        let sdesc = json!({ "mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.data.len() });
        let ann = |v: &str| json!({ "org.opencontainers.conformance.test": v });
        let ref_a1 = image_manifest(
            OCI_MANIFEST,
            (&empty, BAGEL),
            &[(&blob_a, LAYER_TYPE)],
            json!({ "subject": sdesc, "annotations": ann("A config") }),
        );
        let ref_a2 = image_manifest(
            OCI_MANIFEST,
            (&empty, EMPTY_TYPE),
            &[(&blob_a, LAYER_TYPE)],
            json!({ "artifactType": BAGEL, "subject": sdesc, "annotations": ann("A artifactType") }),
        );
        let ref_idx = index(
            OCI_INDEX,
            &[
                (&ref_a1, OCI_MANIFEST, Value::Null),
                (&ref_a2, OCI_MANIFEST, Value::Null),
            ],
            json!({ "artifactType": FOOD, "subject": sdesc, "annotations": ann("index") }),
        );
        let ref_b1 = image_manifest(
            OCI_MANIFEST,
            (&empty, FOOD),
            &[(&blob_b, LAYER_TYPE)],
            json!({ "subject": sdesc, "annotations": ann("B config") }),
        );
        let ref_b2 = image_manifest(
            OCI_MANIFEST,
            (&empty, EMPTY_TYPE),
            &[(&blob_b, LAYER_TYPE)],
            json!({ "artifactType": FOOD, "subject": sdesc, "annotations": ann("B artifactType") }),
        );
        let mdesc = json!({ "mediaType": OCI_MANIFEST, "digest": missing_subject.digest, "size": missing_subject.data.len() });
        let ref_dangling = image_manifest(
            OCI_MANIFEST,
            (&empty, EMPTY_TYPE),
            &[(&blob_a, LAYER_TYPE)],
            json!({ "artifactType": BAGEL, "subject": mdesc, "annotations": ann("dangling") }),
        );

        let r = async {
            for b in [&empty, &blob_a, &config4] {
                self.push_blob(&ns, b).await?;
            }
            Ok(())
        }
        .await;
        self.check(W, "setup: push artifact blobs", r);
        let mut pushes: Vec<(&str, &Blob, &str)> = vec![
            ("artifact typed by config", &ref_a1, OCI_MANIFEST),
            ("artifact typed by artifactType", &ref_a2, OCI_MANIFEST),
            ("index artifact", &ref_idx, OCI_INDEX),
        ];
        for (what, m, mt) in pushes.drain(..) {
            let r = self
                .put_manifest(&ns, &m.digest, m, mt)
                .await
                .and_then(|r| {
                    r.expect(&[201])?;
                    crate::expect_header(&r, "oci-subject", &subject.digest, true)
                });
            self.check(
                W,
                &format!("push {what} before its subject: 201 with OCI-Subject"),
                r,
            );
        }
        let r = async {
            self.put_manifest(&ns, "tagtest0", &subject, OCI_MANIFEST)
                .await?
                .expect(&[201])?;
            self.push_blob(&ns, &blob_b).await
        }
        .await;
        self.check(W, "setup: push the subject image", r);
        for (what, m, subj) in [
            ("artifact B typed by config", &ref_b1, &subject.digest),
            ("artifact B typed by artifactType", &ref_b2, &subject.digest),
            (
                "artifact with a missing subject",
                &ref_dangling,
                &missing_subject.digest,
            ),
        ] {
            let r = self
                .put_manifest(&ns, &m.digest, m, OCI_MANIFEST)
                .await
                .and_then(|r| {
                    r.expect(&[201])?;
                    crate::expect_header(&r, "oci-subject", subj, true)
                });
            self.check(W, &format!("push {what}: 201 with OCI-Subject"), r);
        }

        // Tag listing.
        let all = async {
            let r = self
                .send(Method::GET, &format!("/v2/{ns}/tags/list"))
                .await?;
            r.expect(&[200])?;
            let v = r.json()?;
            let tags: Vec<String> = v["tags"]
                .as_array()
                .ok_or_else(|| format!("tags is not an array: {v}"))?
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect();
            if v["name"] != ns.as_str() {
                return Err(format!("name is {}, expected {ns}", v["name"]));
            }
            for t in ["test0", "test1", "test2", "test3", "tagtest0"] {
                if !tags.iter().any(|x| x == t) {
                    return Err(format!("tag {t} missing from {tags:?}"));
                }
            }
            Ok(tags)
        }
        .await;
        self.check(
            W,
            "GET tags/list lists every pushed tag",
            all.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let tags = all.unwrap_or_default();
        let half = (tags.len() / 2).max(1);
        let r = async {
            let r = self
                .send(Method::GET, &format!("/v2/{ns}/tags/list?n={half}"))
                .await?;
            r.expect(&[200])?;
            let got = r.json()?["tags"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(usize::MAX);
            if got != half {
                return Err(format!("n={half} returned {got} tags"));
            }
            Ok(())
        }
        .await;
        self.check(W, "GET tags/list?n= returns exactly n tags", r);
        let r = async {
            let mut sorted = tags.clone();
            sorted.sort();
            let last = sorted.get(half - 1).cloned().unwrap_or_default();
            let r = self
                .send(
                    Method::GET,
                    &format!("/v2/{ns}/tags/list?n={half}&last={last}"),
                )
                .await?;
            r.expect(&[200])?;
            let got: Vec<String> = r.json()?["tags"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let want: Vec<String> = sorted.iter().skip(half).take(half).cloned().collect();
            if got != want {
                return Err(format!("after {last:?} got {got:?}, expected {want:?}"));
            }
            Ok(())
        }
        .await;
        self.check(W, "GET tags/list?n=&last= continues strictly after last", r);

        // Referrers.
        let unknown = self.fx.bytes(8).digest;
        let r = self
            .referrers(&ns, &unknown, None)
            .await
            .and_then(|(l, _)| {
                if l.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} entries for an unknown digest", l.len()))
                }
            });
        self.check(
            W,
            "referrers of an unknown digest: 200, an empty OCI index",
            r,
        );
        let r = self
            .referrers(&ns, &subject.digest, None)
            .await
            .and_then(|(l, _)| {
                let want = [&ref_a1, &ref_a2, &ref_idx, &ref_b1, &ref_b2];
                if l.len() != want.len() {
                    return Err(format!("{} entries, expected {}", l.len(), want.len()));
                }
                for w in want {
                    let e = l
                        .iter()
                        .find(|e| e["digest"] == w.digest.as_str())
                        .ok_or_else(|| format!("{} missing", w.digest))?;
                    if e["size"] != w.data.len() {
                        return Err(format!("{}: size {}", w.digest, e["size"]));
                    }
                    let a = e["annotations"].as_object().map(|a| a.len()).unwrap_or(0);
                    if a != 1 {
                        return Err(format!("{}: {a} annotations, expected exactly 1", w.digest));
                    }
                }
                let types: Vec<&str> = l
                    .iter()
                    .filter_map(|e| e["artifactType"].as_str())
                    .collect();
                if types.iter().filter(|t| **t == BAGEL).count() != 2
                    || types.iter().filter(|t| **t == FOOD).count() != 3
                {
                    return Err(format!("artifact types {types:?}"));
                }
                Ok(())
            });
        self.check(
            W,
            "referrers of an image list all five referrers with their annotations",
            r,
        );
        let r = self
            .referrers(&ns, &subject.digest, Some(BAGEL))
            .await
            .and_then(|(l, filtered)| {
                if !filtered {
                    return Err("no OCI-Filters-Applied: artifactType header".into());
                }
                if l.len() != 2 || l.iter().any(|e| e["artifactType"] != BAGEL) {
                    return Err(format!(
                        "{} entries after filtering, expected 2 of {BAGEL}",
                        l.len()
                    ));
                }
                Ok(())
            });
        self.check(W, "referrers filtered by artifactType", r);
        let r = self
            .referrers(&ns, &missing_subject.digest, None)
            .await
            .and_then(|(l, _)| {
                if l.len() == 1 && l[0]["digest"] == ref_dangling.digest.as_str() {
                    Ok(())
                } else {
                    Err(format!("expected only the dangling artifact, got {l:?}"))
                }
            });
        self.check(W, "referrers of a subject that was never pushed", r);

        for m in [
            &ref_a1,
            &ref_a2,
            &ref_idx,
            &ref_b1,
            &ref_b2,
            &ref_dangling,
            &subject,
            &m2,
        ] {
            let r = self
                .status(
                    Method::DELETE,
                    &format!("/v2/{ns}/manifests/{}", m.digest),
                    &[202, 404, 405],
                )
                .await;
            self.check(W, "teardown: delete manifest", r);
        }
        for b in [&config, &layer, &empty, &blob_a, &blob_b, &config4] {
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
