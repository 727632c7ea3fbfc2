//! Property tests (proptest): the contract's codec reads back what it
//! writes, in JSON and in MessagePack, for every payload the agent sends or
//! receives; and the reference DB's content digest depends on the set of
//! references only, not on the order they arrived in, while any change to
//! one of them changes it. Case counts are kept small so the whole file
//! runs in seconds.

use std::collections::BTreeMap;

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use retail_agent::config::Encoding;
use retail_agent::fleet::operator::expected_digest;
use retail_agent::protocol::{
    self, AgentState, Bytes, CandidateOut, ClassifierOut, CropRequest, CropSource, ErrorReport,
    Item, ItemDecision, Metrics, ModelRef, Percentiles, RecognitionResult, RefDbState, RefUpdate,
    SignedUpdate, StageLatencies, Status, TimingUs, UpdateAck, UpdateOp, UpdateStatus, Will,
};
use retail_agent::refdb::{NewRef, RefDb, RefDbSettings, RefOp};
use retail_agent::vision::RawFormat;
use retail_testkit::digest::{embedding_bytes, KIND_EMBEDDING, KIND_IMAGE};
use serde::{de::DeserializeOwned, Serialize};

const ENCODINGS: [Encoding; 2] = [Encoding::Json, Encoding::Msgpack];
const FP: &str = "0123456789abcdef";
const DIM: usize = 4;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Encodes `value` and decodes it back, in `encoding`.
fn round_trip<T: Serialize + DeserializeOwned>(value: &T, encoding: Encoding) -> T {
    let bytes = protocol::encode(value, encoding);
    assert!(!bytes.is_empty(), "{encoding:?} encoding failed");
    protocol::decode(&bytes, encoding)
        .unwrap_or_else(|e| panic!("{encoding:?} does not read back: {e}"))
}

fn text() -> impl Strategy<Value = String> {
    // Any characters, escapes and multi-byte ones included.
    "\\PC{0,12}"
}

fn id() -> impl Strategy<Value = String> {
    "\\PC{1,12}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

/// Finite floats (the contract's scores and embeddings); JSON has no NaN.
fn finite32() -> impl Strategy<Value = f32> {
    prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO
}

fn finite64() -> impl Strategy<Value = f64> {
    prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO
}

// ---- CropRequest: what a client writes, the agent reads ----------------

/// A crop as a client writes it.
#[derive(Debug, Clone, Serialize)]
struct WireCrop {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<Bytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<WireRaw>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bbox: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Serialize)]
struct WireRaw {
    width: u32,
    height: u32,
    format: RawFormat,
    data: Bytes,
}

#[derive(Debug, Clone, Serialize)]
struct WireRequest {
    request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    camera_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame: Option<Bytes>,
    crops: Vec<WireCrop>,
}

fn raw_format() -> impl Strategy<Value = RawFormat> {
    prop_oneof![
        Just(RawFormat::Rgb8),
        Just(RawFormat::Bgr8),
        Just(RawFormat::Rgba8),
        Just(RawFormat::Gray8),
    ]
}

fn wire_crop() -> impl Strategy<Value = WireCrop> {
    let source = prop_oneof![
        bytes(64).prop_map(|b| (Some(Bytes(b)), None, None)),
        (any::<u32>(), any::<u32>(), raw_format(), bytes(32)).prop_map(
            |(width, height, format, d)| {
                let raw = WireRaw {
                    width,
                    height,
                    format,
                    data: Bytes(d),
                };
                (None, Some(raw), None)
            }
        ),
        vec(finite64(), 0..6).prop_map(|b| (None, None, Some(b))),
    ];
    (option::of(text()), source).prop_map(|(id, (image, raw, bbox))| WireCrop {
        id,
        image,
        raw,
        bbox,
    })
}

fn wire_request() -> impl Strategy<Value = WireRequest> {
    (
        "\\PC{1,40}",
        option::of(text()),
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        option::of(any::<u8>()),
        option::of(bytes(64).prop_map(Bytes)),
        vec(wire_crop(), 1..6),
    )
        .prop_map(
            |(request_id, camera_id, frame_id, ts_ms, top_k, frame, crops)| WireRequest {
                request_id,
                camera_id,
                frame_id,
                ts_ms,
                top_k,
                frame,
                crops,
            },
        )
}

/// Checks that the agent read `req` as the client wrote `wire`; when
/// `borrowed_from` is given (MessagePack), that every binary field the
/// agent reads points into that payload instead of into a copy.
fn assert_read_as_written(req: &CropRequest, wire: &WireRequest, borrowed_from: Option<&[u8]>) {
    let in_payload = |what: &str, bytes: &[u8]| {
        if let Some(payload) = borrowed_from {
            let range = payload.as_ptr_range();
            assert!(
                range.contains(&bytes.as_ptr()) || bytes.is_empty(),
                "{what} was copied out of the payload"
            );
        }
    };
    assert_eq!(req.request_id, wire.request_id);
    assert_eq!(req.camera_id, wire.camera_id);
    assert_eq!(req.frame_id, wire.frame_id);
    assert_eq!(req.ts_ms, wire.ts_ms);
    assert_eq!(req.top_k, wire.top_k);
    assert_eq!(
        req.frame.as_ref().map(|f| f.as_slice()),
        wire.frame.as_ref().map(|f| &f.0[..])
    );
    if let Some(frame) = &req.frame {
        in_payload("the frame", frame.as_slice());
    }
    assert_eq!(req.crops.len(), wire.crops.len());
    for (i, (got, sent)) in req.crops.iter().zip(&wire.crops).enumerate() {
        assert_eq!(got.id, sent.id, "crop {i}");
        assert_eq!(got.has_bbox(), sent.bbox.is_some(), "crop {i}");
        match got.source() {
            Ok(CropSource::Image(b)) => {
                assert_eq!(Some(b), sent.image.as_ref().map(|i| &i.0[..]));
                in_payload("an image", b);
            }
            Ok(CropSource::Raw(r)) => {
                let s = sent.raw.as_ref().expect("a raw crop was sent");
                assert_eq!(
                    (r.width, r.height, r.format, r.data.as_slice()),
                    (s.width, s.height, s.format, &s.data.0[..]),
                    "crop {i}"
                );
                in_payload("raw pixels", r.data.as_slice());
            }
            Ok(CropSource::Bbox(b)) => assert_eq!(Some(b), sent.bbox.as_deref(), "crop {i}"),
            Err(e) => panic!("crop {i} does not read back: {e}"),
        }
    }
}

// ---- What the agent sends ----------------------------------------------

fn model_ref() -> impl Strategy<Value = ModelRef> {
    (text(), "[0-9a-f]{16}").prop_map(|(id, fingerprint)| ModelRef { id, fingerprint })
}

fn item() -> impl Strategy<Value = Item> {
    let candidate =
        (text(), finite32(), text()).prop_map(|(label, similarity, ref_id)| CandidateOut {
            label: label.into(),
            similarity,
            ref_id: ref_id.into(),
        });
    let classifier =
        (text(), finite32()).prop_map(|(label, probability)| ClassifierOut { label, probability });
    let decision = prop_oneof![
        Just(ItemDecision::Match),
        Just(ItemDecision::Unknown),
        Just(ItemDecision::Error),
    ];
    (
        text(),
        decision,
        option::of(text()),
        option::of(finite32()),
        option::of(finite32()),
        option::of(vec(candidate, 0..4)),
        option::of(classifier),
        option::of(text()),
    )
        .prop_map(
            |(id, decision, label, similarity, distance, candidates, classifier, error)| Item {
                id,
                decision,
                label: label.map(Into::into),
                similarity,
                distance,
                candidates,
                classifier,
                error,
            },
        )
}

fn recognition_result() -> impl Strategy<Value = RecognitionResult> {
    let timing = any::<[u64; 5]>().prop_map(|[queue, decode, infer, search, total]| TimingUs {
        queue,
        decode,
        infer,
        search,
        total,
    });
    (
        (id(), option::of(text()), option::of(any::<u64>()), text()),
        (model_ref(), any::<u64>(), vec(item(), 0..4)),
        (timing, any::<u32>(), any::<u64>()),
    )
        .prop_map(
            |(
                (request_id, camera_id, frame_id, device_id),
                (model, refdb_version, items),
                (timing_us, batch_size, ts_ms),
            )| RecognitionResult {
                request_id,
                camera_id,
                frame_id,
                device_id,
                model,
                refdb_version,
                items,
                timing_us,
                batch_size,
                ts_ms,
            },
        )
}

fn error_report() -> impl Strategy<Value = ErrorReport> {
    (option::of(id()), text(), any::<u64>()).prop_map(|(request_id, reason, ts_ms)| ErrorReport {
        request_id,
        reason,
        ts_ms,
    })
}

fn status() -> impl Strategy<Value = Status> {
    let state = prop_oneof![Just(AgentState::Online), Just(AgentState::Offline)];
    let refdb = (any::<u64>(), "[0-9a-f]{64}", any::<u64>(), any::<u64>()).prop_map(
        |(version, digest, refs, labels)| RefDbState {
            version,
            digest,
            refs,
            labels,
        },
    );
    let reset =
        (text(), text(), any::<u64>()).prop_map(|(reason, moved_to, ts_ms)| protocol::RefDbReset {
            reason,
            moved_to,
            ts_ms,
        });
    (
        (state, text(), text(), text(), text()),
        (model_ref(), text(), refdb),
        (any::<u64>(), any::<u64>(), option::of(reset)),
    )
        .prop_map(
            |(
                (state, device_id, fleet, boot_id, agent_version),
                (model, execution_provider, refdb),
                (started_ms, ts_ms, refdb_reset),
            )| Status {
                state,
                device_id,
                fleet,
                boot_id,
                agent_version,
                model,
                execution_provider,
                refdb,
                started_ms,
                ts_ms,
                refdb_reset,
            },
        )
}

fn metrics() -> impl Strategy<Value = Metrics> {
    let p = any::<[u64; 4]>().prop_map(|[p50, p95, p99, max]| Percentiles { p50, p95, p99, max });
    let latency = (p.clone(), p.clone(), p.clone(), p.clone(), p).prop_map(
        |(total, queue, decode, infer, search)| StageLatencies {
            total,
            queue,
            decode,
            infer,
            search,
        },
    );
    (text(), any::<[u64; 8]>(), finite64(), finite64(), latency).prop_map(
        |(device_id, n, mean_batch, throughput_cps, latency_us)| Metrics {
            device_id,
            ts_ms: n[0],
            interval_ms: n[1],
            requests: n[2],
            crops: n[3],
            errors: n[4],
            dropped: n[5],
            queue_depth: n[6],
            batches: n[7],
            mean_batch,
            throughput_cps,
            latency_us,
        },
    )
}

// ---- Fleet messages ------------------------------------------------------

fn update_op() -> impl Strategy<Value = UpdateOp> {
    prop_oneof![
        (id(), id(), bytes(48)).prop_map(|(ref_id, label, image)| UpdateOp::Upsert {
            ref_id,
            label,
            image: Some(Bytes(image)),
            embedding: None,
            model_fingerprint: None,
        }),
        (id(), id(), vec(finite32(), 0..8), option::of(text())).prop_map(
            |(ref_id, label, embedding, model_fingerprint)| UpdateOp::Upsert {
                ref_id,
                label,
                image: None,
                embedding: Some(embedding),
                model_fingerprint,
            }
        ),
        id().prop_map(|ref_id| UpdateOp::Delete { ref_id }),
        id().prop_map(|label| UpdateOp::DeleteLabel { label }),
        Just(UpdateOp::Clear),
    ]
}

fn ref_update() -> impl Strategy<Value = RefUpdate> {
    (
        (id(), text(), option::of(text())),
        (option::of(any::<u64>()), any::<u64>(), any::<u64>()),
        (option::of(any::<u64>()), vec(update_op(), 0..6)),
    )
        .prop_map(
            |(
                (update_id, fleet, target),
                (base_version, version, issued_ms),
                (expires_ms, ops),
            )| {
                RefUpdate {
                    update_id,
                    fleet,
                    target,
                    base_version,
                    version,
                    issued_ms,
                    expires_ms,
                    ops,
                }
            },
        )
}

fn update_ack() -> impl Strategy<Value = UpdateAck> {
    let status = prop_oneof![
        Just(UpdateStatus::Applied),
        Just(UpdateStatus::Duplicate),
        Just(UpdateStatus::Rejected),
        Just(UpdateStatus::Expired),
        Just(UpdateStatus::Stale),
        Just(UpdateStatus::Gap),
    ];
    (
        option::of(id()),
        status,
        option::of(text()),
        any::<u64>(),
        "[0-9a-f]{64}",
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(update_id, status, reason, version, digest, refs, labels)| UpdateAck {
                update_id,
                status,
                reason,
                version,
                digest,
                refs,
                labels,
            },
        )
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn a_crop_request_is_read_as_the_client_wrote_it_in_both_encodings_and_msgpack_binary_is_not_copied(wire in wire_request()) {
        for encoding in ENCODINGS {
            let bytes = protocol::encode(&wire, encoding);
            prop_assert_eq!(protocol::detect_encoding(&bytes), Ok(encoding));
            let req: CropRequest = protocol::decode(&bytes, encoding)
                .map_err(|e| TestCaseError::fail(format!("{encoding:?}: {e}")))?;
            let borrowed_from = (encoding == Encoding::Msgpack).then_some(&bytes[..]);
            assert_read_as_written(&req, &wire, borrowed_from);
            // The id can be read from the payload alone, and from its
            // start when the rest is cut off.
            let valid_id = wire.request_id.len() <= protocol::MAX_REQUEST_ID;
            prop_assert_eq!(protocol::peek_request_id(&bytes), valid_id.then(|| wire.request_id.clone()));
        }
    }

    #[test]
    fn recognition_results_round_trip_in_both_encodings(result in recognition_result()) {
        for encoding in ENCODINGS {
            prop_assert_eq!(&round_trip(&result, encoding), &result);
        }
    }

    #[test]
    fn error_reports_status_and_metrics_round_trip_in_both_encodings(
        report in error_report(),
        status in status(),
        metrics in metrics(),
    ) {
        let will = Will {
            state: status.state,
            device_id: status.device_id.clone(),
            boot_id: status.boot_id.clone(),
        };
        for encoding in ENCODINGS {
            prop_assert_eq!(&round_trip(&report, encoding), &report);
            prop_assert_eq!(&round_trip(&status, encoding), &status);
            prop_assert_eq!(&round_trip(&metrics, encoding), &metrics);
            prop_assert_eq!(&round_trip(&will, encoding), &will);
        }
    }

    #[test]
    fn fleet_messages_round_trip_in_both_encodings(
        update in ref_update(),
        key_id in text(),
        sig in bytes(64),
        ack in update_ack(),
    ) {
        for encoding in ENCODINGS {
            prop_assert_eq!(&round_trip(&update, encoding), &update);
            prop_assert_eq!(&round_trip(&ack, encoding), &ack);
        }
        // The body travels as the operator signs it: MessagePack bytes
        // inside an envelope of either encoding.
        let body = rmp_serde::to_vec_named(&update).expect("an update encodes");
        let envelope = SignedUpdate { key_id, sig: Bytes(sig), body: Bytes(body) };
        for encoding in ENCODINGS {
            let back = round_trip(&envelope, encoding);
            prop_assert_eq!(&back, &envelope);
            let inner: RefUpdate = rmp_serde::from_slice(&back.body.0).expect("the body reads back");
            prop_assert_eq!(&inner, &update);
        }
    }
}

// ---- The reference DB's digest -----------------------------------------

/// A reference's content as the digest sees it.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Image(Vec<u8>),
    Embedding([f32; DIM]),
}

type Refs = BTreeMap<String, (String, Source)>;

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![
        vec(any::<u8>(), 1..24).prop_map(Source::Image),
        any::<[i8; DIM]>().prop_map(|v| Source::Embedding(v.map(|x| f32::from(x) / 8.0))),
    ]
}

/// 1 to 8 references with distinct ids (labels may repeat).
fn refs() -> impl Strategy<Value = Refs> {
    btree_map("[a-z0-9]{1,6}", ("[a-c]{1,2}", source()), 1..8)
}

fn upsert_op(ref_id: &str, label: &str, source: &Source) -> UpdateOp {
    let (image, embedding, model_fingerprint) = match source {
        Source::Image(b) => (Some(Bytes(b.clone())), None, None),
        Source::Embedding(v) => (None, Some(v.to_vec()), Some(FP.to_string())),
    };
    UpdateOp::Upsert {
        ref_id: ref_id.into(),
        label: label.into(),
        image,
        embedding,
        model_fingerprint,
    }
}

fn ref_op(ref_id: &str, label: &str, source: &Source) -> RefOp {
    RefOp::Upsert(match source {
        Source::Image(b) => {
            // The agent's own embedding of an image; not part of the digest.
            let v = vec![f32::from(b[0]) + 1.0, 0.5, 0.0, 1.0];
            NewRef::from_image(ref_id.into(), label.into(), b.clone(), v, FP)
        }
        Source::Embedding(v) => {
            NewRef::from_embedding(ref_id.into(), label.into(), v.to_vec(), FP.into())
        }
    })
}

/// The contract's digest of `refs`, from the oracle written out from its
/// text (PROTOCOL.md, UpdateAck) in `retail_testkit::digest`.
fn contract_digest(refs: &Refs) -> String {
    let sources = refs.iter().map(|(id, (label, source))| {
        let (kind, bytes) = match source {
            Source::Image(b) => (KIND_IMAGE, b.clone()),
            Source::Embedding(v) => (KIND_EMBEDDING, embedding_bytes(v)),
        };
        (id.as_str(), label.as_str(), kind, bytes)
    });
    retail_testkit::digest::contract_digest(sources)
}

/// The digest a real DB reports after the references are upserted in
/// `order`, split into updates of `chunk` ops.
fn db_digest(refs: &Refs, order: &[usize], chunk: usize) -> String {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let settings = RefDbSettings {
        dim: DIM,
        model_fingerprint: FP.into(),
        prototypes_per_class: 0,
        precision: retail_agent::refdb::index::Precision::F32,
        store_images: false,
        cache_mb: 1,
        remember_updates: 16,
    };
    let db = RefDb::open(dir.path(), settings).expect("a fresh DB opens");
    let entries: Vec<_> = refs.iter().collect();
    let ops: Vec<RefOp> = order
        .iter()
        .map(|&i| ref_op(entries[i].0, &entries[i].1 .0, &entries[i].1 .1))
        .collect();
    let mut meta = db.meta();
    for (n, part) in ops.chunks(chunk).enumerate() {
        meta = db
            .apply(part.to_vec(), n as u64 + 1, None)
            .expect("the update applies");
    }
    meta.digest
}

/// Two orders of `0..n`.
fn with_orders(refs: Refs) -> impl Strategy<Value = (Refs, Vec<usize>, Vec<usize>)> {
    let n = refs.len();
    let order = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
    (Just(refs), order.clone(), order)
}

/// A different reference in place of one: another label, source, kind or id.
fn changed(refs: &Refs, pick: usize, how: u8) -> Refs {
    let mut out = refs.clone();
    let id = refs
        .keys()
        .nth(pick % refs.len())
        .expect("refs are not empty")
        .clone();
    let (label, source) = out.remove(&id).expect("the picked id is there");
    match how % 4 {
        0 => {
            out.insert(id, (format!("{label}x"), source));
        }
        1 => {
            let other = match source {
                Source::Image(mut b) => {
                    b[0] ^= 1;
                    Source::Image(b)
                }
                Source::Embedding(mut v) => {
                    v[0] += 1.0;
                    Source::Embedding(v)
                }
            };
            out.insert(id, (label, other));
        }
        2 => {
            // The same bytes given as the other kind.
            let other = match source {
                Source::Image(_) => Source::Embedding([0.5, 0.25, 0.0, 1.0]),
                Source::Embedding(v) => {
                    Source::Image(v.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
            };
            out.insert(id, (label, other));
        }
        _ => {
            // Renamed to an id no other reference has (ids are [a-z0-9]).
            out.insert(format!("{id}_"), (label, source));
        }
    }
    out
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn the_expected_digest_depends_on_the_set_of_references_not_their_order(
        (refs, a, b) in refs().prop_flat_map(with_orders),
    ) {
        let ops = |order: &[usize]| -> Vec<UpdateOp> {
            let entries: Vec<_> = refs.iter().collect();
            order.iter().map(|&i| upsert_op(entries[i].0, &entries[i].1 .0, &entries[i].1 .1)).collect()
        };
        let expected = contract_digest(&refs);
        prop_assert_eq!(&expected_digest(&ops(&a)), &expected);
        prop_assert_eq!(&expected_digest(&ops(&b)), &expected);
    }

    #[test]
    fn changing_any_one_reference_changes_the_digest(
        refs in refs(),
        pick in any::<usize>(),
        how in any::<u8>(),
    ) {
        let other = changed(&refs, pick, how);
        prop_assert_ne!(contract_digest(&other), contract_digest(&refs));
        let ops = |r: &Refs| -> Vec<UpdateOp> {
            r.iter().map(|(id, (label, src))| upsert_op(id, label, src)).collect()
        };
        prop_assert_ne!(expected_digest(&ops(&other)), expected_digest(&ops(&refs)));
    }
}

proptest! {
    // Each case opens real sled DBs: few cases.
    #![proptest_config(config(32))]

    #[test]
    fn a_db_reports_the_same_digest_whatever_order_its_references_arrived_in(
        (refs, a, b) in refs().prop_flat_map(with_orders),
        chunk in 1usize..4,
        pick in any::<usize>(),
        how in any::<u8>(),
    ) {
        let expected = contract_digest(&refs);
        prop_assert_eq!(&db_digest(&refs, &a, refs.len()), &expected);
        prop_assert_eq!(&db_digest(&refs, &b, chunk), &expected);
        let other = changed(&refs, pick, how);
        let order: Vec<usize> = (0..other.len()).collect();
        prop_assert_ne!(db_digest(&other, &order, other.len()), expected);
    }
}
