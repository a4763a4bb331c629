//! The storage suite: what every metadata backend must do, checked through the [`Store`] over
//! an in-memory object store. SQLite runs it in this crate's tests; the server's integration
//! tests run it on PostgreSQL (feature `suite`). Each check gets a fresh registry
//! ([`Env`]): the races between garbage collection and pushes driven deterministically,
//! collection policies, leases across processes, uploads and pull times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::json;

use crate::blob::blob_key;
use crate::error::{Error, Result};
use crate::gc::{GcPolicy, GcReport};
use crate::manifests::PutManifest;
use crate::meta::{Metadata, now};
use crate::names::{Digest, Reference, RepoName};
use crate::store::Store;
use crate::uploads::Chunk;

const HOUR: i64 = 3600;

/// A fresh, empty registry for one check: an object store and two metadata handles onto the
/// same fresh database, as two processes sharing it (the server and `berth gc`, or two
/// replicas) would hold.
pub struct Env {
    /// Blob bytes.
    pub objects: Arc<dyn ObjectStore>,
    /// The first process's metadata.
    pub meta: Arc<dyn Metadata>,
    /// Another process's metadata, onto the same database.
    pub sibling: Arc<dyn Metadata>,
    /// Whatever keeps the database alive (a temporary directory, a database to drop).
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

/// Opens a fresh [`Env`] for each check.
pub type Open = dyn Fn() -> BoxFuture<'static, Env> + Send + Sync;

type Check = for<'a> fn(&'a Env) -> BoxFuture<'a, ()>;

struct T {
    s: Store,
    objects: Arc<dyn ObjectStore>,
    sibling: Arc<dyn Metadata>,
}

fn body(data: Vec<u8>) -> crate::ByteStream {
    futures_util::stream::once(async move { Ok(Bytes::from(data)) }).boxed()
}

impl T {
    fn new(env: &Env) -> Self {
        Self {
            s: Store::new(env.objects.clone(), env.meta.clone()),
            objects: env.objects.clone(),
            sibling: env.sibling.clone(),
        }
    }

    /// A store of another process over the same data.
    fn other(&self) -> Store {
        Store::new(self.objects.clone(), self.sibling.clone())
    }

    async fn blob(&self, repo: &str, data: &[u8]) -> Digest {
        let repo: RepoName = repo.parse().unwrap();
        let d = Digest::sha256(data);
        let up = self.s.start_upload(&repo).await.unwrap();
        self.s
            .finish_upload(&repo, &up.id, &d, Some(Chunk::new(body(data.to_vec()))))
            .await
            .unwrap();
        d
    }

    async fn image(
        &self,
        repo: &str,
        reference: &str,
        seed: &str,
        subject: Option<&Digest>,
    ) -> (Digest, Vec<Digest>) {
        let c = self.blob(repo, format!("config {seed}").as_bytes()).await;
        let l = self.blob(repo, format!("layer {seed}").as_bytes()).await;
        let mut m = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.to_string(), "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l.to_string(), "size": 1}],
        });
        if let Some(s) = subject {
            m["subject"] = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": s.to_string(), "size": 1});
        }
        let out = self
            .s
            .put_manifest(
                &repo.parse().unwrap(),
                &reference.parse().unwrap(),
                "application/vnd.oci.image.manifest.v1+json",
                Bytes::from(m.to_string()),
                &[],
            )
            .await
            .unwrap();
        (out.digest, vec![c, l])
    }

    async fn exists(&self, d: &Digest) -> bool {
        self.s.objects.head(&blob_key(d)).await.is_ok()
    }

    /// What a dry run must leave alone: the objects, what the repositories serve, and the
    /// pending garbage.
    async fn snapshot(&self, blobs: &[(&str, Digest)]) -> (usize, Vec<bool>, (u64, u64)) {
        let objects = self.s.objects.list(None).count().await;
        let mut served = Vec::new();
        for (repo, d) in blobs {
            let repo: RepoName = repo.parse().unwrap();
            served.push(
                self.s
                    .meta
                    .blob_in_repo(repo.as_str(), &d.to_string(), 0)
                    .await
                    .unwrap()
                    .is_some(),
            );
        }
        (
            objects,
            served,
            self.s.meta.pending_garbage().await.unwrap(),
        )
    }
}

fn policy() -> GcPolicy {
    GcPolicy {
        grace: Duration::from_secs(HOUR as u64),
        ..GcPolicy::default()
    }
}

async fn unreferenced_blobs_go_after_the_grace_period_and_referenced_ones_stay(env: &Env) {
    let t = T::new(env);
    let (_, live) = t.image("app", "v1", "live", None).await;
    let orphan = t.blob("app", b"pushed but never referenced").await;
    let (gone, gone_blobs) = t.image("app", "v2", "gone", None).await;
    t.s.delete_manifest(&"app".parse().unwrap(), &Reference::Digest(gone))
        .await
        .unwrap();

    let r = t.s.gc(&policy(), false).await.unwrap();
    assert_eq!(
        (r.blobs, r.objects_deleted),
        (0, 0),
        "inside the grace period: {r}"
    );
    assert_eq!(r.manifest_bodies, 1, "bodies need no grace: {r}");

    let r =
        t.s.gc_as_of(&policy(), false, now() + 2 * HOUR)
            .await
            .unwrap();
    assert_eq!(r.blobs, 3, "{r}");
    assert_eq!(r.objects_deleted, 3);
    for d in gone_blobs.iter().chain([&orphan]) {
        assert!(!t.exists(d).await, "{d} survived");
        assert!(t.s.stat_blob(&"app".parse().unwrap(), d).await.is_err());
    }
    for d in &live {
        assert!(t.exists(d).await, "{d} was collected");
    }
    // Nothing left to do.
    let r =
        t.s.gc_as_of(&policy(), false, now() + 4 * HOUR)
            .await
            .unwrap();
    assert_eq!(r, GcReport::default());
}

async fn dry_run_changes_nothing_and_reports_what_a_real_run_does(env: &Env) {
    let t = T::new(env);
    t.image("app", "v1", "live", None).await;
    t.blob("app", b"orphan one").await;
    t.blob("other", b"orphan two").await;
    let orphans = [
        ("app", Digest::sha256(b"orphan one")),
        ("other", Digest::sha256(b"orphan two")),
    ];
    let before = t.snapshot(&orphans).await;
    let later = now() + 2 * HOUR;
    let dry = t.s.gc_as_of(&policy(), true, later).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(t.snapshot(&orphans).await, before);
    assert_eq!(t.s.objects.list(None).count().await, 4);
    let real = t.s.gc_as_of(&policy(), false, later).await.unwrap();
    assert_eq!((dry.blobs, dry.blob_bytes), (real.blobs, real.blob_bytes));
    assert_eq!(real.blobs, 2);
}

async fn untagged_manifests_and_orphan_referrers_follow_the_policy(env: &Env) {
    let t = T::new(env);
    let repo: RepoName = "app".parse().unwrap();
    let (subject, _) = t.image("app", "v1", "subject", None).await;
    let (sig, _) = t.image("app", "sigtag", "sig", Some(&subject)).await;
    t.s.delete_manifest(&repo, &"sigtag".parse().unwrap())
        .await
        .unwrap(); // referrers are untagged
    let (old, _) = t.image("app", "v0", "old", None).await;
    t.image("app", "v0", "new", None).await; // moves v0: `old` is now untagged

    let p = GcPolicy {
        untagged_after: Some(Duration::from_secs(24 * HOUR as u64)),
        orphan_referrers: true,
        ..policy()
    };
    let r = t.s.gc_as_of(&p, false, now() + 2 * HOUR).await.unwrap();
    assert_eq!(r.manifests, 0, "too young: {r}");
    let r = t.s.gc_as_of(&p, false, now() + 25 * HOUR).await.unwrap();
    assert_eq!(r.manifests, 1, "{r}");
    assert!(
        t.s.get_manifest(&repo, &Reference::Digest(old))
            .await
            .is_err()
    );
    assert!(
        t.s.get_manifest(&repo, &Reference::Digest(sig.clone()))
            .await
            .is_ok(),
        "a live referrer was collected"
    );

    // Once the subject is gone, its referrer is an orphan.
    t.s.delete_manifest(&repo, &Reference::Digest(subject))
        .await
        .unwrap();
    let r = t.s.gc_as_of(&p, false, now() + 27 * HOUR).await.unwrap();
    assert_eq!(r.manifests, 1, "{r}");
    assert!(
        t.s.get_manifest(&repo, &Reference::Digest(sig))
            .await
            .is_err()
    );
}

async fn a_blob_swept_during_a_push_of_the_same_content_is_put_back(env: &Env) {
    let t = T::new(env);
    let repo: RepoName = "app".parse().unwrap();
    let data = b"content that is garbage and pushed again".to_vec();
    let d = t.blob("app", &data).await;
    t.s.delete_blob(&repo, &d).await.unwrap();
    // The new push places its object first ...
    let up = t.s.start_upload(&repo).await.unwrap();
    t.s.append_upload(
        &repo,
        &up.id,
        Chunk {
            body: body(data.clone()),
            start: None,
            len: None,
        },
    )
    .await
    .unwrap();
    // ... GC marks and sweeps the old copy before the push commits its row ...
    let r =
        t.s.gc_as_of(&policy(), false, now() + 2 * HOUR)
            .await
            .unwrap();
    assert_eq!(r.objects_deleted, 1);
    // ... and the commit finds the object gone and restores it.
    t.s.finish_upload(&repo, &up.id, &d, None).await.unwrap();
    assert!(t.exists(&d).await);
    let got =
        t.s.read_blob(&d, t.s.stat_blob(&repo, &d).await.unwrap(), None)
            .await
            .unwrap()
            .body
            .collect::<Vec<_>>()
            .await;
    let got: Vec<u8> = got.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
    assert_eq!(got, data);
}

async fn recently_read_blobs_are_kept(env: &Env) {
    let t = T::new(env);
    let repo: RepoName = "app".parse().unwrap();
    let d = t.blob("app", b"unreferenced but in use").await;
    // Age everything, then read the blob "now".
    age(&t.s).await;
    t.s.stat_blob(&repo, &d).await.unwrap(); // a HEAD
    let r = t.s.gc(&policy(), false).await.unwrap();
    assert_eq!(r.blobs, 0, "{r}");
    assert!(t.s.stat_blob(&repo, &d).await.is_ok());
}

async fn chunks_left_by_a_crash_are_swept_after_the_grace_period(env: &Env) {
    let t = T::new(env);
    let repo: RepoName = "app".parse().unwrap();
    let live = t.s.start_upload(&repo).await.unwrap();
    t.s.append_upload(
        &repo,
        &live.id,
        Chunk {
            body: body(b"in progress".to_vec()),
            start: None,
            len: None,
        },
    )
    .await
    .unwrap();
    // A chunk whose session row is gone, as after a crash between writing and committing.
    let orphan = crate::blob::upload_part_key("deadbeef", "00000000000000000000-x");
    t.s.objects
        .put(&orphan, Bytes::from_static(b"lost").into())
        .await
        .unwrap();
    let r = t.s.gc(&policy(), false).await.unwrap();
    assert_eq!(r.upload_leftovers, 0, "too young: {r}");
    let r =
        t.s.gc_as_of(&policy(), true, now() + 2 * HOUR)
            .await
            .unwrap();
    assert_eq!(r.upload_leftovers, 1, "{r}");
    assert!(t.s.objects.head(&orphan).await.is_ok(), "dry run deleted");
    let r =
        t.s.gc_as_of(&policy(), false, now() + 2 * HOUR)
            .await
            .unwrap();
    assert_eq!(r.upload_leftovers, 1, "{r}");
    assert!(t.s.objects.head(&orphan).await.is_err());
    assert_eq!(
        t.s.upload_status(&repo, &live.id).await.unwrap().size,
        11,
        "a live session lost data"
    );
    assert_eq!(
        t.s.objects
            .list(Some(&object_store::path::Path::from("uploads")))
            .count()
            .await,
        1
    );
}

// ---------------------------------------------------------------- races with pushes (issue 14)
//
// Each test sets up content that is garbage by every clock (an image pushed and deleted two
// hours ago), lets a client be told that some of it exists (201 for an upload or a mount, 200
// for a HEAD), runs a collection at that worst moment, and then pushes the manifest the client
// was about to push. A registry must never lose what it acknowledged.

impl T {
    /// Shifts every timestamp GC looks at two hours into the past.
    async fn age(&self) {
        age(&self.s).await;
    }

    fn repo(name: &str) -> RepoName {
        name.parse().unwrap()
    }

    /// Pushes the manifest `image` pushed earlier for `seed` again, to `repo:tag`.
    async fn push_manifest(&self, repo: &str, tag: &str, seed: &str) -> Result<PutManifest> {
        let c = Digest::sha256(format!("config {seed}").as_bytes());
        let l = Digest::sha256(format!("layer {seed}").as_bytes());
        let m = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.to_string(), "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l.to_string(), "size": 1}],
        });
        self.s
            .put_manifest(
                &Self::repo(repo),
                &tag.parse().unwrap(),
                "application/vnd.oci.image.manifest.v1+json",
                Bytes::from(m.to_string()),
                &[],
            )
            .await
    }

    /// An image pushed to `repo` and deleted, two hours ago: its blobs are still linked there.
    async fn deleted_image(&self, repo: &str, seed: &str) -> Vec<Digest> {
        let (m, blobs) = self.image(repo, "old", seed, None).await;
        self.s
            .delete_manifest(&Self::repo(repo), &Reference::Digest(m))
            .await
            .unwrap();
        self.age().await;
        blobs
    }
}

async fn age(s: &Store) {
    s.meta.age_for_tests(2 * HOUR).await.unwrap();
}

/// How a client puts bytes into a repository.
#[derive(Clone, Copy, Debug)]
enum Upload {
    /// `POST ?digest=` with the body.
    Monolithic,
    /// `POST`, then `PUT ?digest=` with the body.
    PostPut,
    /// `POST`, `PATCH`, `PATCH`, `PUT ?digest=`.
    Chunked,
}

impl T {
    async fn upload(&self, repo: &str, data: &[u8], how: Upload) -> Digest {
        let repo = Self::repo(repo);
        let d = Digest::sha256(data);
        let up = self.s.start_upload(&repo).await.unwrap();
        match how {
            Upload::Monolithic | Upload::PostPut => {
                self.s
                    .finish_upload(&repo, &up.id, &d, Some(Chunk::new(body(data.to_vec()))))
                    .await
                    .unwrap();
            }
            Upload::Chunked => {
                let (a, b) = data.split_at(data.len() / 2);
                self.s
                    .append_upload(
                        &repo,
                        &up.id,
                        Chunk {
                            body: body(a.to_vec()),
                            start: Some(0),
                            len: None,
                        },
                    )
                    .await
                    .unwrap();
                // The worst moment for a chunked upload: between chunks.
                self.s.gc(&policy(), false).await.unwrap();
                self.s
                    .append_upload(
                        &repo,
                        &up.id,
                        Chunk {
                            body: body(b.to_vec()),
                            start: Some(a.len() as u64),
                            len: None,
                        },
                    )
                    .await
                    .unwrap();
                self.s.finish_upload(&repo, &up.id, &d, None).await.unwrap();
            }
        }
        d
    }
}

async fn a_reupload_into_a_repository_that_still_links_the_blob_survives_gc(env: &Env) {
    for how in [Upload::Monolithic, Upload::PostPut, Upload::Chunked] {
        let t = T::new(env);
        t.deleted_image("x/app", "s").await;
        // The client pushes the same bytes again (201 each) ...
        t.upload("x/app", b"config s", how).await;
        t.upload("x/app", b"layer s", how).await;
        // ... GC runs before its manifest arrives ...
        let r = t.s.gc(&policy(), false).await.unwrap();
        assert_eq!(r.blobs, 0, "{how:?}: acknowledged blobs collected: {r}");
        // ... and the manifest push succeeds, with every blob readable.
        t.push_manifest("x/app", "v2", "s")
            .await
            .unwrap_or_else(|e| panic!("{how:?}: manifest push failed: {e}"));
        for d in [b"config s".as_slice(), b"layer s"].map(Digest::sha256) {
            assert!(t.exists(&d).await, "{how:?}: {d} lost");
        }
    }
}

async fn a_mount_into_a_repository_that_still_links_the_blob_survives_gc(env: &Env) {
    let t = T::new(env);
    t.deleted_image("q", "m").await; // q still links the blobs
    t.deleted_image("p", "m").await; // p lends them
    for d in [b"config m".as_slice(), b"layer m"].map(Digest::sha256) {
        let mounted =
            t.s.mount_blob(&T::repo("q"), &d, Some(&T::repo("p")))
                .await
                .unwrap();
        assert!(mounted);
    }
    let r = t.s.gc(&policy(), false).await.unwrap();
    assert_eq!(r.blobs, 0, "mounted blobs collected: {r}");
    t.push_manifest("q", "v1", "m").await.unwrap();
}

async fn a_blob_a_client_was_told_exists_survives_gc_from_another_process(env: &Env) {
    let t = T::new(env);
    t.deleted_image("x/app", "h").await;
    // docker HEADs each layer, hears 200 and skips the upload ...
    for d in [b"config h".as_slice(), b"layer h"].map(Digest::sha256) {
        t.s.stat_blob(&T::repo("x/app"), &d).await.unwrap();
    }
    // ... while `berth gc` (another process, or another replica) collects ...
    let other = t.other();
    let r = other.gc(&policy(), false).await.unwrap();
    assert_eq!(r.blobs, 0, "blobs just HEADed were collected: {r}");
    // ... and then the manifest arrives.
    t.push_manifest("x/app", "v2", "h").await.unwrap();
}

async fn an_untagged_manifest_a_client_was_told_exists_survives_gc_until_its_index_arrives(
    env: &Env,
) {
    let t = T::new(env);
    let repo = T::repo("multi");
    let (child, _) = t.image("multi", "tmp", "amd64", None).await;
    t.s.delete_manifest(&repo, &"tmp".parse().unwrap())
        .await
        .unwrap();
    t.age().await;
    let p = GcPolicy {
        untagged_after: Some(Duration::from_secs(HOUR as u64)),
        ..policy()
    };
    // buildx HEADs the platform manifest (200), skips it, and pushes the index.
    t.s.get_manifest(&repo, &Reference::Digest(child.clone()))
        .await
        .unwrap();
    let other = t.other();
    let r = other.gc(&p, false).await.unwrap();
    assert_eq!(r.manifests, 0, "a manifest just read was collected: {r}");
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": child.to_string(), "size": 1}],
    });
    t.s.put_manifest(
        &repo,
        &"v1".parse().unwrap(),
        "application/vnd.oci.image.index.v1+json",
        Bytes::from(index.to_string()),
        &[],
    )
    .await
    .unwrap();
}

async fn a_repushed_untagged_manifest_survives_gc_until_its_index_arrives(env: &Env) {
    let t = T::new(env);
    let repo = T::repo("multi");
    let (child, _) = t.image("multi", "tmp", "arm64", None).await;
    t.s.delete_manifest(&repo, &"tmp".parse().unwrap())
        .await
        .unwrap();
    t.age().await;
    let p = GcPolicy {
        untagged_after: Some(Duration::from_secs(HOUR as u64)),
        ..policy()
    };
    // The platform manifest is pushed again by digest (201: it is already there) ...
    let again = t.push_manifest("multi", &child.to_string(), "arm64").await;
    assert_eq!(again.unwrap().digest, child);
    // ... GC runs ...
    let r = t.s.gc(&p, false).await.unwrap();
    assert_eq!(r.manifests, 0, "a manifest just pushed was collected: {r}");
    assert!(
        t.s.get_manifest(&repo, &Reference::Digest(child))
            .await
            .is_ok()
    );
}

async fn one_collection_runs_at_a_time_across_processes(env: &Env) {
    let mut t = T::new(env);
    t.s.instance = "host-a 1 1 aaaa".into();
    let mut other = t.other();
    other.instance = "host-b 2 2 bbbb".into();
    t.s.take_lease("gc", Duration::from_secs(60)).await.unwrap();
    match other.gc(&policy(), false).await {
        Err(Error::Busy { holder, .. }) => assert_eq!(holder, "host-a 1 1 aaaa"),
        r => panic!("a second collection ran beside the first: {r:?}"),
    }
    t.s.release_lease("gc").await.unwrap();
    other.gc(&policy(), false).await.unwrap();
    // A lapsed lease (its holder died on another host) does not block anyone.
    t.s.take_lease("gc", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    other.gc(&policy(), false).await.unwrap();
}

async fn a_run_after_an_interrupted_sweep_reports_what_it_freed(env: &Env) {
    let t = T::new(env);
    t.deleted_image("x/app", "k").await;
    let orphan = t.blob("x/app", b"an orphan, 19 bytes").await;
    age(&t.s).await;
    // A run marks, then dies before its sweep (kill -9).
    let marked =
        t.s.meta
            .mark(&policy(), now(), "dead-run", false)
            .await
            .unwrap();
    assert_eq!(marked.blobs, 3);
    assert!(t.exists(&orphan).await);
    // The dry run and the next run both account for what the dead run left.
    let dry = t.s.gc(&policy(), true).await.unwrap();
    assert_eq!((dry.blobs, dry.resumed_blobs), (3, 3), "{dry}");
    let r = t.s.gc(&policy(), false).await.unwrap();
    assert_eq!(
        (r.blobs, r.blob_bytes, r.resumed_blobs, r.objects_deleted),
        (3, 7 + 8 + 19, 3, 3),
        "{r}"
    );
    assert!(
        r.to_string()
            .contains("3 of them marked by an interrupted run"),
        "{r}"
    );
    assert!(!t.exists(&orphan).await);
    // Every process sees the run, whoever ran it.
    let other = t.other();
    let last = other.last_gc_run().await.unwrap().expect("a recorded run");
    assert_eq!(last.report, r);
    assert_eq!(last.holder, t.s.instance);
}

async fn stale_uploads_expire_with_their_chunks(env: &Env) {
    let s = T::new(env).s;
    let repo: RepoName = "a".parse().unwrap();
    let up = s.start_upload(&repo).await.unwrap();
    s.append_upload(
        &repo,
        &up.id,
        Chunk {
            body: body(b"hello".to_vec()),
            start: None,
            len: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.expire_uploads(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    s.meta.age_for_tests(10).await.unwrap();
    assert_eq!(s.expire_uploads(Duration::from_secs(5)).await.unwrap(), 1);
    assert!(s.upload_status(&repo, &up.id).await.is_err());
    let left: Vec<_> = s.objects.list(None).collect().await;
    assert!(left.is_empty(), "{left:?}");
}

async fn pulls_are_written_in_batches(env: &Env) {
    let s = T::new(env).s;
    let repo: RepoName = "a".parse().unwrap();
    let m = bytes::Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
    );
    let out = s
        .put_manifest(
            &repo,
            &"t".parse().unwrap(),
            "application/vnd.oci.image.index.v1+json",
            m,
            &[],
        )
        .await
        .unwrap();
    s.record_manifest_pull(&repo, &out.digest);
    s.record_manifest_pull(&repo, &out.digest);
    assert_eq!(s.flush_access().await.unwrap(), 1);
    assert_eq!(s.flush_access().await.unwrap(), 0);
}

async fn an_upload_s_chunks_may_reach_different_processes(env: &Env) {
    let t = T::new(env);
    let other = t.other();
    let repo: RepoName = "spread".parse().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::sha256(&data);
    let up = t.s.start_upload(&repo).await.unwrap();
    let parts = [&data[..100_000], &data[100_000..200_000], &data[200_000..]];
    // The first chunk here, the second in the other process, the last here again.
    for (i, part) in parts.iter().enumerate() {
        let s = if i == 1 { &other } else { &t.s };
        let at = (i * 100_000) as u64;
        s.append_upload(
            &repo,
            &up.id,
            Chunk {
                body: body(part.to_vec()),
                start: Some(at),
                len: Some(part.len() as u64),
            },
        )
        .await
        .unwrap();
    }
    // A chunk that does not start where the session ends is refused in either process.
    let stale = other
        .append_upload(
            &repo,
            &up.id,
            Chunk {
                body: body(b"late".to_vec()),
                start: Some(100_000),
                len: Some(4),
            },
        )
        .await;
    assert!(
        matches!(stale, Err(Error::RangeInvalid { .. })),
        "{stale:?}"
    );
    other.finish_upload(&repo, &up.id, &d, None).await.unwrap();
    let read = t.s.stat_blob(&repo, &d).await.unwrap();
    assert_eq!(read, data.len() as u64);
}

async fn listings_are_in_byte_order(env: &Env) {
    let t = T::new(env);
    // Byte order, not a locale's: '-' < '.' < '/' < '_', upper case before lower.
    for repo in ["b/z", "a_z", "a/z", "a.z", "a-z"] {
        t.image(repo, "t", repo, None).await;
    }
    for tag in ["z", "_x", "Z9", "B"] {
        t.image("a/z", tag, tag, None).await;
    }
    let repo: RepoName = "a/z".parse().unwrap();
    let tags = t.s.list_tags(&repo, None, 10).await.unwrap().items;
    assert_eq!(tags, ["B", "Z9", "_x", "t", "z"]);
    let all = t.s.catalog(None, 10).await.unwrap().items;
    assert_eq!(all, ["a-z", "a.z", "a/z", "a_z", "b/z"]);
    let page = t.s.catalog(Some("a.z"), 1).await.unwrap();
    assert_eq!(
        (page.items.as_slice(), page.more),
        (&["a/z".to_owned()][..], true)
    );
}

async fn browsing_finds_repositories_and_reads_tags_without_counting_pulls(env: &Env) {
    let t = T::new(env);
    for repo in ["team/web", "team/api", "tools/webhook", "xay", "x_y"] {
        t.image(repo, "v1", repo, None).await;
    }
    let (d2, blobs) = t.image("team/web", "v2", "web 2", None).await;
    // Plain text: `%` and `_` are not patterns; the cursor and `n` page the matches.
    let found = t.s.find_repos("web", None, 10).await.unwrap();
    assert_eq!(found.items, ["team/web", "tools/webhook"]);
    assert!(
        t.s.find_repos("%", None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(t.s.find_repos("_", None, 10).await.unwrap().items, ["x_y"]);
    let first = t.s.find_repos("e", None, 1).await.unwrap();
    assert_eq!(
        (first.items.as_slice(), first.more),
        (&["team/api".to_owned()][..], true)
    );
    let next = t.s.find_repos("e", Some("team/api"), 5).await.unwrap();
    assert_eq!(next.items, ["team/web", "tools/webhook"]);

    let repo: RepoName = "team/web".parse().unwrap();
    assert_eq!(t.s.count_tags(&repo).await.unwrap(), 2);
    assert_eq!(
        t.s.count_tags(&"no/such".parse().unwrap()).await.unwrap(),
        0
    );
    let rows = t.s.tag_rows(&repo, Some("v1"), 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].tag.as_str(), rows[0].digest.clone()),
        ("v2", d2.to_string())
    );
    assert_eq!(rows[0].last_pulled, None);
    let m =
        t.s.peek_manifest(&repo, &"v2".parse().unwrap())
            .await
            .unwrap();
    assert_eq!(m.digest, d2);
    assert_eq!(rows[0].content, m.bytes.to_vec());
    // Peeking is no pull: the next flush writes nothing.
    t.s.flush_access().await.unwrap();
    let rows = t.s.tag_rows(&repo, Some("v1"), 10).await.unwrap();
    assert_eq!(rows[0].last_pulled, None);
    // A client's pull is shown.
    t.s.record_manifest_pull(&repo, &d2);
    t.s.flush_access().await.unwrap();
    let rows = t.s.tag_rows(&repo, Some("v1"), 10).await.unwrap();
    assert!(rows[0].last_pulled.is_some());
    // A config within the limit is read; a larger one, or one the repository lacks, is not.
    let config = t.s.peek_blob(&repo, &blobs[0], 1024).await.unwrap();
    assert_eq!(config.as_deref(), Some(&b"config web 2"[..]));
    assert_eq!(t.s.peek_blob(&repo, &blobs[0], 4).await.unwrap(), None);
    let other: RepoName = "team/api".parse().unwrap();
    assert_eq!(t.s.peek_blob(&other, &blobs[0], 1024).await.unwrap(), None);
    assert!(matches!(
        t.s.tag_rows(&"no/such".parse().unwrap(), None, 1).await,
        Err(Error::NameUnknown(_))
    ));
}

async fn a_cached_blob_is_stored_in_one_pass_and_a_wrong_one_leaves_nothing(env: &Env) {
    let t = T::new(env);
    let repo: RepoName = "cache.example/lib/app".parse().unwrap();
    let data = b"layer from an upstream".to_vec();
    let d = Digest::sha256(&data);
    // The fill says when its bytes matched, and only then.
    let watch = |told: &Arc<AtomicBool>| {
        let told = told.clone();
        crate::blob::FillWatch {
            landed: None,
            verified: Some(Box::new(move || told.store(true, Ordering::SeqCst))),
        }
    };
    let matched = Arc::new(AtomicBool::new(false));
    let size =
        t.s.put_cached_blob(&repo, &d, body(data.clone()), watch(&matched))
            .await
            .unwrap();
    assert!(
        matched.load(Ordering::SeqCst),
        "a matching fill was not said to match"
    );
    assert_eq!(size, data.len() as u64);
    assert_eq!(t.s.stat_blob(&repo, &d).await.unwrap(), size);
    assert_eq!(
        t.s.uploads_in_progress().await.unwrap(),
        0,
        "no session was opened"
    );
    // Bytes that do not match their digest: refused, nothing visible, no temporary left.
    let claimed = Digest::sha256(b"something else");
    let mismatched = Arc::new(AtomicBool::new(false));
    let wrong =
        t.s.put_cached_blob(&repo, &claimed, body(data), watch(&mismatched))
            .await;
    assert!(
        matches!(wrong, Err(Error::DigestMismatch { .. })),
        "{wrong:?}"
    );
    assert!(
        !mismatched.load(Ordering::SeqCst),
        "a wrong fill was said to match"
    );
    assert!(t.s.stat_blob(&repo, &claimed).await.is_err());
    let prefix = object_store::path::Path::from(crate::blob::UPLOADS);
    let left: Vec<_> = t.s.objects.list(Some(&prefix)).collect().await;
    assert!(left.is_empty(), "temporary objects left: {left:?}");
}

async fn confirmations_and_the_relay_secret_are_shared(env: &Env) {
    let t = T::new(env);
    assert_eq!(t.s.meta.confirmed_at("k").await.unwrap(), None);
    t.s.meta.confirm("k", 100).await.unwrap();
    assert_eq!(t.sibling.confirmed_at("k").await.unwrap(), Some(100));
    // A late writer with an older time does not move it back.
    t.sibling.confirm("k", 90).await.unwrap();
    assert_eq!(t.s.meta.confirmed_at("k").await.unwrap(), Some(100));
    let first = t.s.meta.shared_secret("one").await.unwrap();
    assert_eq!(first, "one");
    assert_eq!(t.sibling.shared_secret("two").await.unwrap(), "one");
}

/// Every check of the suite, by name.
const CHECKS: &[(&str, Check)] = &[
    (
        "unreferenced_blobs_go_after_the_grace_period_and_referenced_ones_stay",
        |e| unreferenced_blobs_go_after_the_grace_period_and_referenced_ones_stay(e).boxed(),
    ),
    (
        "dry_run_changes_nothing_and_reports_what_a_real_run_does",
        |e| dry_run_changes_nothing_and_reports_what_a_real_run_does(e).boxed(),
    ),
    (
        "untagged_manifests_and_orphan_referrers_follow_the_policy",
        |e| untagged_manifests_and_orphan_referrers_follow_the_policy(e).boxed(),
    ),
    (
        "a_blob_swept_during_a_push_of_the_same_content_is_put_back",
        |e| a_blob_swept_during_a_push_of_the_same_content_is_put_back(e).boxed(),
    ),
    ("recently_read_blobs_are_kept", |e| {
        recently_read_blobs_are_kept(e).boxed()
    }),
    (
        "chunks_left_by_a_crash_are_swept_after_the_grace_period",
        |e| chunks_left_by_a_crash_are_swept_after_the_grace_period(e).boxed(),
    ),
    (
        "a_reupload_into_a_repository_that_still_links_the_blob_survives_gc",
        |e| a_reupload_into_a_repository_that_still_links_the_blob_survives_gc(e).boxed(),
    ),
    (
        "a_mount_into_a_repository_that_still_links_the_blob_survives_gc",
        |e| a_mount_into_a_repository_that_still_links_the_blob_survives_gc(e).boxed(),
    ),
    (
        "a_blob_a_client_was_told_exists_survives_gc_from_another_process",
        |e| a_blob_a_client_was_told_exists_survives_gc_from_another_process(e).boxed(),
    ),
    (
        "an_untagged_manifest_a_client_was_told_exists_survives_gc_until_its_index_arrives",
        |e| {
            an_untagged_manifest_a_client_was_told_exists_survives_gc_until_its_index_arrives(e)
                .boxed()
        },
    ),
    (
        "a_repushed_untagged_manifest_survives_gc_until_its_index_arrives",
        |e| a_repushed_untagged_manifest_survives_gc_until_its_index_arrives(e).boxed(),
    ),
    ("one_collection_runs_at_a_time_across_processes", |e| {
        one_collection_runs_at_a_time_across_processes(e).boxed()
    }),
    (
        "a_run_after_an_interrupted_sweep_reports_what_it_freed",
        |e| a_run_after_an_interrupted_sweep_reports_what_it_freed(e).boxed(),
    ),
    ("stale_uploads_expire_with_their_chunks", |e| {
        stale_uploads_expire_with_their_chunks(e).boxed()
    }),
    ("pulls_are_written_in_batches", |e| {
        pulls_are_written_in_batches(e).boxed()
    }),
    ("an_upload_s_chunks_may_reach_different_processes", |e| {
        an_upload_s_chunks_may_reach_different_processes(e).boxed()
    }),
    ("listings_are_in_byte_order", |e| {
        listings_are_in_byte_order(e).boxed()
    }),
    (
        "a_cached_blob_is_stored_in_one_pass_and_a_wrong_one_leaves_nothing",
        |e| a_cached_blob_is_stored_in_one_pass_and_a_wrong_one_leaves_nothing(e).boxed(),
    ),
    (
        "browsing_finds_repositories_and_reads_tags_without_counting_pulls",
        |e| browsing_finds_repositories_and_reads_tags_without_counting_pulls(e).boxed(),
    ),
    ("confirmations_and_the_relay_secret_are_shared", |e| {
        confirmations_and_the_relay_secret_are_shared(e).boxed()
    }),
    (
        "a_blob_still_being_placed_cannot_be_mounted_or_linked",
        |e| a_blob_still_being_placed_cannot_be_mounted_or_linked(e).boxed(),
    ),
    ("fsck_finds_what_is_wrong_and_repairs_it_safely", |e| {
        fsck_finds_what_is_wrong_and_repairs_it_safely(e).boxed()
    }),
];

async fn fsck_finds_what_is_wrong_and_repairs_it_safely(env: &Env) {
    use crate::fsck::{BlobProblem, FsckOptions};
    let t = T::new(env);
    let opts = |repair| FsckOptions {
        verify_digests: true,
        repair,
        grace: Duration::ZERO,
        is_cache: Box::new(|name: &str| name.starts_with("cache/")),
        progress: None,
    };
    let (ma, a) = t.image("fsck/a", "v1", "a", None).await;
    let (_, b) = t.image("fsck/b", "v1", "b", None).await;
    // A cached manifest may name what was not fetched yet.
    let cached = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256(b"nope").to_string(), "size": 4},
        "layers": [],
    });
    t.s.put_cached_manifest(
        &"cache/x".parse().unwrap(),
        &"v1".parse().unwrap(),
        "application/vnd.oci.image.manifest.v1+json",
        Bytes::from(cached.to_string()),
    )
    .await
    .unwrap();
    let r = t.s.fsck(&opts(false)).await.unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!((r.blobs, r.verified), (4, 4));
    // Pushed a while ago (a repair leaves alone what was touched since the check began).
    age(&t.s).await;

    t.objects.delete(&blob_key(&a[1])).await.unwrap();
    t.objects
        .put(&blob_key(&b[1]), Bytes::from_static(b"LAYER b").into())
        .await
        .unwrap();
    let stray = Digest::sha256(b"stray");
    t.objects
        .put(&blob_key(&stray), Bytes::from_static(b"stray").into())
        .await
        .unwrap();
    let r = t.s.fsck(&opts(false)).await.unwrap();
    assert_eq!(r.bad_blobs.len(), 2, "{r}");
    assert!(
        r.bad_blobs
            .contains(&(a[1].to_string(), BlobProblem::Missing))
    );
    assert!(matches!(
        r.bad_blobs.iter().find(|(d, _)| *d == b[1].to_string()),
        Some((_, BlobProblem::Corrupt { .. }))
    ));
    assert_eq!(r.orphans, vec![(stray.to_string(), 5)]);
    assert_eq!(r.broken_images.len(), 2, "{r}");
    assert!(r.broken_images.iter().any(|i| i.repo == "fsck/a"
        && i.digest == ma.to_string()
        && i.tags == vec!["v1".to_owned()]));
    assert_eq!(r.unrepaired, 3);

    // A blob touched since the check began is left alone by a repair (here the corrupt one,
    // pushed again, which also heals it).
    let since = now();
    T {
        s: t.other(),
        objects: t.objects.clone(),
        sibling: env.meta.clone(),
    }
    .blob("fsck/b", b"layer b")
    .await;
    let kept = env
        .meta
        .drop_blobs(vec![b[1].to_string()], since)
        .await
        .unwrap();
    assert!(
        kept.is_empty(),
        "a blob a push just placed again is not dropped"
    );

    let r = t.s.fsck(&opts(true)).await.unwrap();
    assert_eq!(r.unrepaired, 0, "{r}");
    assert!(
        !env.meta.has_blob(&a[1].to_string()).await.unwrap(),
        "the missing blob's row went"
    );
    assert!(
        env.meta.has_blob(&stray.to_string()).await.unwrap(),
        "the orphan is recorded"
    );
    // The dropped blob's image now names a blob its repository lacks, until it is pushed again.
    let r = t.s.fsck(&opts(false)).await.unwrap();
    assert_eq!(r.dangling.len(), 1, "{r}");
    assert_eq!(r.dangling[0].child, a[1].to_string());
    t.blob("fsck/a", b"layer a").await;
    let r = t.s.fsck(&opts(false)).await.unwrap();
    assert!(r.is_clean(), "{r}");

    // A collection that marked a blob and was stopped before deleting its object left no
    // orphan: the object is garbage the next run frees.
    let marked = t.blob("fsck/gone", b"marked, not swept").await;
    t.s.delete_blob(&"fsck/gone".parse().unwrap(), &marked)
        .await
        .unwrap();
    let policy = crate::GcPolicy {
        grace: Duration::from_secs(60),
        ..crate::GcPolicy::default()
    };
    // Marked an hour and a half from now, when the unlinked blob is past its grace.
    let later = now() + 5400;
    let marked_now = env
        .meta
        .mark(&policy, later, "stopped-run", false)
        .await
        .unwrap();
    // (with it, the orphan that repair recorded above)
    assert!(marked_now.blobs >= 1, "{marked_now}");
    assert!(!env.meta.has_blob(&marked.to_string()).await.unwrap());
    let r = t.s.fsck(&opts(false)).await.unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.awaiting_sweep, marked_now.blobs, "{r}");
    t.s.gc(&policy, false).await.unwrap();
    let r = t.s.fsck(&opts(false)).await.unwrap();
    assert!(r.is_clean() && r.awaiting_sweep == 0, "{r}");
}

async fn a_blob_still_being_placed_cannot_be_mounted_or_linked(env: &Env) {
    let t = T::new(env);
    // Another upload of this content has recorded its row but not yet placed its object.
    let d = Digest::sha256(b"being placed");
    env.meta
        .reserve_blob(&d.to_string(), 12, now())
        .await
        .unwrap();
    assert!(
        !env.meta
            .mount_blob("m/x", &d.to_string(), None, now())
            .await
            .unwrap(),
        "an anonymous mount took a blob whose object is not there yet"
    );
    let (_, blobs) = t.image("m/cache", "v1", "c", None).await;
    assert!(
        !env.meta
            .link_cached_blob("m/cache", &d.to_string(), now())
            .await
            .unwrap()
    );
    // Once committed somewhere, both work.
    let placed = t.blob("m/src", b"being placed").await;
    assert_eq!(placed, d);
    assert!(
        env.meta
            .mount_blob("m/x", &d.to_string(), None, now())
            .await
            .unwrap()
    );
    assert!(!blobs.is_empty());
}

/// Runs every check, each on a fresh [`Env`] from `open`, printing a line per check; panics
/// at the end naming every check that failed.
pub async fn run(backend: &str, open: &Open) {
    let mut failed = Vec::new();
    for (name, check) in CHECKS {
        let env = open().await;
        let outcome = std::panic::AssertUnwindSafe(check(&env))
            .catch_unwind()
            .await;
        match outcome {
            Ok(()) => eprintln!("PASS {backend} {name}"),
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                eprintln!("FAIL {backend} {name}: {why}");
                failed.push(*name);
            }
        }
    }
    assert!(failed.is_empty(), "{backend}: failed checks: {failed:?}");
}

#[cfg(test)]
mod sqlite {
    use super::*;
    use crate::meta::sqlite::SqliteMeta;

    fn open() -> BoxFuture<'static, Env> {
        async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.db");
            let meta = Arc::new(SqliteMeta::open(&path).await.unwrap());
            let sibling = Arc::new(SqliteMeta::open(&path).await.unwrap());
            Env {
                objects: Arc::new(object_store::memory::InMemory::new()),
                meta,
                sibling,
                guard: Box::new(dir),
            }
        }
        .boxed()
    }

    #[tokio::test]
    async fn the_storage_suite_passes_on_sqlite() {
        run("sqlite", &open).await;
    }
}
