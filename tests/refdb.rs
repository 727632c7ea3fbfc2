//! The reference DB through its public API on a real sled directory:
//! ordered all-or-nothing updates, durability, the contract's digest, and
//! references from another model.

use retail_agent::refdb::{NewRef, RefDb, RefDbError, RefDbSettings, RefOp, SourceKind};
use retail_testkit::digest::{contract_digest, embedding_bytes};

const FP: &str = "0123456789abcdef";

fn settings(dim: usize, fingerprint: &str, protos: usize) -> RefDbSettings {
    RefDbSettings {
        dim,
        model_fingerprint: fingerprint.into(),
        prototypes_per_class: protos,
        precision: Default::default(),
        store_images: true,
        remember_updates: 10_000,
        cache_mb: 4,
    }
}

fn emb(ref_id: &str, label: &str, v: &[f32]) -> RefOp {
    RefOp::Upsert(NewRef::from_embedding(
        ref_id.into(),
        label.into(),
        v.to_vec(),
        FP.into(),
    ))
}

fn img(ref_id: &str, label: &str, bytes: &[u8], v: &[f32]) -> RefOp {
    RefOp::Upsert(NewRef::from_image(
        ref_id.into(),
        label.into(),
        bytes.to_vec(),
        v.to_vec(),
        FP,
    ))
}

#[test]
fn ops_apply_in_order_and_the_digest_follows_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
    let meta = db
        .apply(
            vec![
                emb("b", "banana", &[0.0, 1.0, 0.0]),
                img("a", "apple", b"apple-jpeg", &[1.0, 0.0, 0.0]),
                emb("c", "cherry", &[0.0, 0.0, 1.0]),
                emb("c2", "cherry", &[0.0, 0.1, 1.0]),
                RefOp::DeleteLabel("cherry".into()),
                emb("c3", "cherry", &[0.0, 0.0, 2.0]),
                RefOp::Delete("nope".into()),
            ],
            7,
            Some("u-1"),
        )
        .unwrap();
    assert_eq!((meta.version, meta.refs, meta.labels), (7, 3, 3));
    let expected = contract_digest([
        ("a", "apple", 1, b"apple-jpeg".to_vec()),
        ("b", "banana", 2, embedding_bytes(&[0.0, 1.0, 0.0])),
        ("c3", "cherry", 2, embedding_bytes(&[0.0, 0.0, 2.0])),
    ]);
    assert_eq!(meta.digest, expected);
    assert!(db.was_applied("u-1").unwrap());
    let r = db.snapshot().index.search(&[0.0, 0.0, 1.0], 5, 0.5);
    assert_eq!(r.label.as_deref(), Some("cherry"));
    assert_eq!(&*r.candidates[0].ref_id, "c3");
}

#[test]
fn an_invalid_op_leaves_the_db_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
    let before = db
        .apply(vec![emb("a", "apple", &[1.0, 0.0, 0.0])], 1, None)
        .unwrap();
    let err = db
        .apply(
            vec![RefOp::Clear, emb("b", "banana", &[0.0, 1.0])],
            2,
            Some("u-2"),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RefDbError::Dimension {
                got: 2,
                expected: 3,
                ..
            }
        ),
        "{err}"
    );
    let other_model = RefOp::Upsert(NewRef::from_embedding(
        "x".into(),
        "x".into(),
        vec![1.0; 3],
        "ffffffffffffffff".into(),
    ));
    assert!(matches!(
        db.apply(vec![other_model], 2, None),
        Err(RefDbError::Fingerprint { .. })
    ));
    assert_eq!(db.meta(), before);
    assert!(
        !db.was_applied("u-2").unwrap(),
        "a failed update does not burn its id"
    );
}

#[test]
fn content_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let meta = {
        let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
        db.apply(
            vec![
                emb("a", "apple", &[1.0, 0.0, 0.0]),
                img("b", "banana", b"png", &[0.0, 1.0, 0.0]),
            ],
            4,
            Some("u-4"),
        )
        .unwrap()
    };
    let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
    assert_eq!(db.meta(), meta);
    assert!(db.was_applied("u-4").unwrap());
    assert_eq!(db.image("b").unwrap().as_deref(), Some(&b"png"[..]));
    let snap = db.snapshot();
    assert_eq!(snap.entries["b"].kind, SourceKind::Image);
    assert_eq!(
        snap.index.search(&[0.0, 1.0, 0.0], 1, 0.0).label.as_deref(),
        Some("banana")
    );
}

#[test]
fn references_from_another_model_are_kept_but_not_searched() {
    let dir = tempfile::tempdir().unwrap();
    let meta = {
        let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
        db.apply(vec![img("a", "apple", b"jpeg", &[1.0, 0.0, 0.0])], 1, None)
            .unwrap()
    };
    let db = RefDb::open(dir.path(), settings(3, "fedcba9876543210", 0)).unwrap();
    let snap = db.snapshot();
    assert_eq!(snap.meta.digest, meta.digest, "content is unchanged");
    assert_eq!(snap.stale().count(), 1);
    assert!(snap.index.is_empty());
    let r = snap.index.search(&[1.0, 0.0, 0.0], 5, 0.0);
    assert_eq!(
        (r.similarity, r.distance, r.candidates.len()),
        (-1.0, 2.0, 0)
    );
}

#[test]
fn usable_references_between_another_model_s_are_each_searched_under_their_own_label() {
    const OTHER: &str = "fedcba9876543210";
    let dir = tempfile::tempdir().unwrap();
    let with_model = |fp: &str, ops: Vec<(&str, &str, [f32; 3])>| {
        let db = RefDb::open(dir.path(), settings(3, fp, 0)).unwrap();
        let version = db.meta().version + 1;
        let ops = ops
            .into_iter()
            .map(|(id, label, v)| {
                RefOp::Upsert(NewRef::from_embedding(
                    id.into(),
                    label.into(),
                    v.to_vec(),
                    fp.into(),
                ))
            })
            .collect();
        db.apply(ops, version, None).unwrap();
    };
    // Stored in id order a, b, c, d: the other model's a and c sit between
    // this model's b and d.
    with_model(
        OTHER,
        vec![
            ("a", "apple", [1.0, 0.0, 0.0]),
            ("c", "cherry", [0.0, 0.0, 1.0]),
        ],
    );
    with_model(
        FP,
        vec![
            ("b", "banana", [0.0, 1.0, 0.0]),
            ("d", "date", [0.0, 0.6, 0.8]),
        ],
    );
    let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
    let label = |db: &RefDb, q: [f32; 3]| db.snapshot().index.search(&q, 1, 0.0).label;
    let snap = db.snapshot();
    assert_eq!(snap.stale().count(), 2);
    assert_eq!(snap.index.len(), 2);
    for (id, want) in [("b", "banana"), ("d", "date")] {
        let row = snap.entries[id].row.expect("searchable") as usize;
        assert_eq!(snap.index.rows()[row].ref_id.as_ref(), id);
        assert_eq!(
            snap.index.labels()[snap.index.rows()[row].label as usize].as_ref(),
            want
        );
    }
    assert_eq!(label(&db, [0.0, 1.0, 0.0]).as_deref(), Some("banana"));
    assert_eq!(label(&db, [0.0, 0.6, 0.8]).as_deref(), Some("date"));
    // An update keeps the rows it does not touch and adds its own.
    let version = db.meta().version + 1;
    db.apply(vec![emb("e", "egg", &[0.8, 0.6, 0.0])], version, None)
        .unwrap();
    assert_eq!(label(&db, [0.0, 1.0, 0.0]).as_deref(), Some("banana"));
    assert_eq!(label(&db, [0.0, 0.6, 0.8]).as_deref(), Some("date"));
    assert_eq!(label(&db, [0.8, 0.6, 0.0]).as_deref(), Some("egg"));
    assert_eq!(db.snapshot().stale().count(), 2);
}

#[test]
fn a_clear_then_upserts_is_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let db = RefDb::open(dir.path(), settings(2, FP, 2)).unwrap();
    db.apply(vec![emb("old", "old", &[1.0, 0.0])], 1, None)
        .unwrap();
    let meta = db
        .apply(
            vec![
                RefOp::Clear,
                emb("n1", "new", &[0.0, 1.0]),
                emb("n2", "new", &[0.1, 1.0]),
                emb("n3", "new", &[0.9, 1.0]),
            ],
            2,
            None,
        )
        .unwrap();
    assert_eq!((meta.refs, meta.labels), (3, 1));
    let snap = db.snapshot();
    assert_eq!(
        snap.index.searched_vectors(),
        2,
        "two prototypes for the label"
    );
    assert!(!snap.entries.contains_key("old"));
}

#[test]
fn references_with_a_stored_image_are_re_embedded_for_a_new_model() {
    let dir = tempfile::tempdir().unwrap();
    let meta = {
        let db = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
        db.apply(
            vec![
                img("a", "apple", b"apple-jpeg", &[1.0, 0.0, 0.0]),
                emb("b", "banana", &[0.0, 1.0, 0.0]),
            ],
            5,
            None,
        )
        .unwrap()
    };
    let new_model = "fedcba9876543210";
    let db = RefDb::open(dir.path(), settings(3, new_model, 0)).unwrap();
    assert_eq!(db.snapshot().stale().count(), 2);
    let mut seen = Vec::new();
    let (done, left) = db
        .reembed_stale(|image| {
            seen.push(image.to_vec());
            Ok(vec![0.0, 0.0, 1.0])
        })
        .unwrap();
    assert_eq!(
        (done, left),
        (1, 1),
        "the embedding-only reference has no image"
    );
    assert_eq!(seen, vec![b"apple-jpeg".to_vec()]);
    let snap = db.snapshot();
    assert_eq!(snap.meta, meta, "same content, digest and version");
    assert_eq!(snap.entries["a"].model_fingerprint, new_model);
    assert_eq!(
        snap.index.search(&[0.0, 0.0, 1.0], 1, 0.0).label.as_deref(),
        Some("apple")
    );
}

#[test]
fn remembered_update_ids_are_bounded_and_the_oldest_are_pruned_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(2, FP, 0);
    s.remember_updates = 16;
    let db = RefDb::open(dir.path(), s.clone()).unwrap();
    for v in 1..=100u64 {
        db.apply(
            vec![emb(&format!("r{v}"), "l", &[1.0, v as f32])],
            v,
            Some(&format!("u{v}")),
        )
        .unwrap();
        assert!(
            db.remembered_updates() <= 16 + 16 / 8,
            "{} ids remembered after {v} updates",
            db.remembered_updates()
        );
    }
    assert!(db.was_applied("u100").unwrap() && db.was_applied("u85").unwrap());
    assert!(!db.was_applied("u1").unwrap(), "the oldest ids are pruned");
    drop(db);
    let db = RefDb::open(dir.path(), s).unwrap();
    assert!(
        db.remembered_updates() <= 18,
        "the bound holds across a reopen"
    );
    assert!(db.was_applied("u100").unwrap());
}

#[test]
fn a_guarded_apply_writes_nothing_when_the_guard_refuses() {
    use retail_agent::refdb::LedgerView;
    let dir = tempfile::tempdir().unwrap();
    let db = RefDb::open(dir.path(), settings(2, FP, 0)).unwrap();
    db.apply(vec![emb("a", "l", &[1.0, 0.0])], 1, Some("u1"))
        .unwrap();
    let before = db.meta();
    let refused = db
        .apply_guarded(
            vec![RefOp::Clear],
            2,
            Some("u2"),
            |view: &dyn LedgerView| {
                assert_eq!(view.version(), 1);
                assert!(view.was_applied("u1"));
                Err("no")
            },
        )
        .unwrap();
    assert_eq!(refused, Err("no"));
    assert_eq!(db.meta(), before);
    assert!(!db.was_applied("u2").unwrap());
}

#[test]
fn a_db_that_opens_older_than_it_was_written_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let db = RefDb::open(dir.path(), settings(2, FP, 0)).unwrap();
    db.apply(vec![emb("a", "l", &[1.0, 0.0])], 1, None).unwrap();
    drop(db);
    // What sled does with a damaged log: it opens, without the data.
    let seal = std::fs::read(dir.path().join("retail-agent.seal")).unwrap();
    std::fs::remove_dir_all(dir.path()).unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("retail-agent.seal"), seal).unwrap();
    let err = RefDb::open(dir.path(), settings(2, FP, 0))
        .err()
        .expect("refused");
    assert!(err.is_corrupt(), "{err}");
    assert!(err.to_string().contains("lost data"), "{err}");
}

#[test]
fn a_db_open_in_another_handle_is_reported_in_use_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let _held = RefDb::open(dir.path(), settings(3, FP, 0)).unwrap();
    // sled locks with flock, which is per open file: a second open
    // conflicts even within one process, as `enroll` does with the daemon.
    let err = match RefDb::open(dir.path(), settings(3, FP, 0)) {
        Ok(_) => panic!("the DB opened twice"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            RefDbError::Store(retail_agent::refdb::StoreError::InUse { .. })
        ),
        "{err:?}"
    );
    assert!(!err.is_corrupt(), "a DB in use must never be moved aside");
    let text = err.to_string();
    assert!(
        text.contains("in use by another process")
            && text.contains("systemctl stop retail-agent")
            && text.contains("fleet push"),
        "{text}"
    );
}

/// `n` image references of about `kb` KiB each, after a Clear: a whole
/// new content, as `db import` and fleet snapshots send.
fn snapshot_ops(n: usize, kb: usize, round: u8) -> Vec<RefOp> {
    let mut ops = vec![RefOp::Clear];
    for i in 0..n {
        let bytes: Vec<u8> = (0..kb * 1024)
            .map(|j| (j as u8).wrapping_mul(31) ^ round ^ i as u8)
            .collect();
        let v = [1.0, (i as f32).sin(), round as f32];
        ops.push(img(&format!("p{i:03}"), &format!("l{}", i % 7), &bytes, &v));
    }
    ops
}

#[test]
fn replacing_the_whole_content_again_and_again_keeps_the_db_size_proportional() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refdb");
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    db.apply(snapshot_ops(40, 64, 0), 1, Some("u-1")).unwrap();
    let first = db.size_on_disk();
    for round in 1..=15u8 {
        let id = format!("u-{}", round as u64 + 1);
        let meta = db
            .apply(snapshot_ops(40, 64, round), round as u64 + 1, Some(&id))
            .unwrap();
        assert_eq!(meta.refs, 40);
    }
    let last = db.size_on_disk();
    eprintln!(
        "size on disk after 1 and 16 whole-content replacements: {} and {} KiB",
        first / 1024,
        last / 1024
    );
    assert!(
        last <= first + first / 2,
        "grew from {first} to {last} bytes"
    );
    // The ledger and the content survive the swaps, and a reopen.
    assert!(db.was_applied("u-1").unwrap());
    assert!(db.image("p039").unwrap().is_some());
    let meta = db.meta();
    drop(db);
    assert!(
        !dir.path().join("refdb.next").exists(),
        "nothing left beside it"
    );
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    assert_eq!(db.meta(), meta);
    assert!(db.was_applied("u-16").unwrap());
}

#[test]
fn a_replacement_interrupted_before_or_after_its_swap_leaves_a_whole_db() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refdb");
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    let meta = db.apply(snapshot_ops(5, 4, 0), 1, None).unwrap();
    drop(db);
    // What a crash mid-build leaves: a half-written DB beside the live one.
    let next = dir.path().join("refdb.next");
    std::fs::create_dir_all(&next).unwrap();
    std::fs::write(next.join("db"), b"half written").unwrap();
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    assert_eq!(db.meta(), meta, "the live DB is untouched");
    assert!(!next.exists(), "the leftover is removed at open");
}

#[test]
fn a_change_larger_than_the_free_space_is_refused_before_writing() {
    // A small tmpfs is a full disk we control (needs root, as these tests
    // run in CI; the failure says so otherwise).
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(status.success(), "mounting a 48 MiB tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let path = mnt.join("refdb");
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    let meta = db.apply(snapshot_ops(20, 64, 0), 1, Some("small")).unwrap();
    // 40 MiB of images do not fit with the margin: refused, nothing written.
    let mut big = vec![];
    for i in 0..40 {
        let bytes = vec![i as u8; 1024 * 1024];
        big.push(img(&format!("big{i}"), "big", &bytes, &[1.0, 0.0, 0.0]));
    }
    let err = db.apply(big, 2, Some("big")).unwrap_err().to_string();
    assert!(err.contains("not enough free space"), "{err}");
    assert_eq!(db.meta(), meta);
    let mut whole = snapshot_ops(0, 0, 0);
    for i in 0..40 {
        let bytes = vec![i as u8; 1024 * 1024];
        whole.push(img(&format!("big{i}"), "big", &bytes, &[1.0, 0.0, 0.0]));
    }
    let err = db.apply(whole, 2, Some("big")).unwrap_err().to_string();
    assert!(err.contains("not enough free space"), "{err}");
    assert_eq!(db.meta(), meta);
    // The DB still serves and still takes a change that fits.
    db.apply(snapshot_ops(20, 64, 1), 2, Some("fits")).unwrap();
    drop(db);
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    assert_eq!(db.meta().version, 2);
}

#[test]
fn an_unfinished_sled_snapshot_left_by_a_full_disk_does_not_stop_the_db_opening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refdb");
    let db = RefDb::open(&path, settings(3, FP, 0)).unwrap();
    let meta = db.apply(snapshot_ops(5, 4, 0), 1, None).unwrap();
    drop(db);
    // What sled leaves when the disk fills while it writes a snapshot.
    let leftover = path.join("snap.0000000000001234.generating");
    std::fs::write(&leftover, b"").unwrap();
    let db = RefDb::open(&path, settings(3, FP, 0)).expect("opens");
    assert_eq!(db.meta(), meta);
    assert!(!leftover.exists());
}
