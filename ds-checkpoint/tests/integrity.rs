//! Checkpoint files that lie: an edited manifest, a safetensors header whose offsets overlap
//! or leave bytes unclaimed, a parameter whose offset was changed or whose entry was deleted,
//! a manifest whose file checksum disagrees with its block checksums, a corrupt byte that the
//! read path does not otherwise touch. Each is refused, naming the file and what is wrong.
//!
//! The tampering is done here with independent means (serde_json, crc32fast, the safetensors
//! layout as its specification defines it), not with the library's own writer.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use ds_checkpoint::*;
use serde_json::Value;

const SEAL: &[u8] = b"{\n  \"manifest_crc32\": \"";

/// Re-computes the manifest's checksum after an edit, by the documented rule: the CRC32 of
/// the file's bytes with the `manifest_crc32` line (the second line) removed, written as 8
/// lowercase hex digits on that line. (Simulates a writer that lies consistently.)
fn reseal(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let body: Vec<u8> = if bytes.starts_with(SEAL) {
        let mut b = b"{\n".to_vec();
        b.extend_from_slice(&bytes[SEAL.len() + 8 + 3..]);
        b
    } else {
        bytes
    };
    let crc = crc32fast::hash(&body);
    let mut out = format!("{{\n  \"manifest_crc32\": \"{crc:08x}\",\n").into_bytes();
    out.extend_from_slice(&body[2..]);
    std::fs::write(path, out).unwrap();
}

/// Parses the manifest, lets `f` edit it, writes it back (pretty, as the library does).
fn edit_manifest(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// A checkpoint of the 4 test parameters (53 elements) saved by `ws` ranks at ZeRO stage 2
/// (padded shards), with or without a model file; returns the tag directory and the store.
fn setup(name: &str, ws: usize, with_weights: bool) -> (PathBuf, PathBuf, FsCheckpointStore) {
    let root = tmp_dir(name);
    let store = FsCheckpointStore::new(&root).unwrap();
    let n = meta(1, 0, 1).numel();
    save_split(
        &store,
        "t",
        &meta(ws, 2, 5),
        &padded_ranges(n, ws),
        with_weights,
    )
    .unwrap();
    store.load(Some("t")).unwrap();
    (root.clone(), root.join("t"), store)
}

/// Splits a safetensors file into (header object, data section).
fn split_st(bytes: &[u8]) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Joins a header and a data section into a safetensors file (header padded to 8 bytes).
fn join_st(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Writes `bytes` as tag-directory file `name` and records its true size and checksums in the
/// manifest (whole-file CRC32 and one CRC32 per `BLOCK_BYTES` block), then reseals it: only
/// the content of the file itself is then wrong.
fn replace_file_consistently(tag_dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(tag_dir.join(name), bytes).unwrap();
    let blocks: Vec<u32> = bytes
        .chunks(BLOCK_BYTES as usize)
        .map(crc32fast::hash)
        .collect();
    let mf = tag_dir.join(MANIFEST_FILE);
    edit_manifest(&mf, |v| {
        let rec = &mut v["files"][name];
        rec["bytes"] = bytes.len().into();
        rec["crc32"] = crc32fast::hash(bytes).into();
        rec["block_bytes"] = BLOCK_BYTES.into();
        rec["block_crc32"] = blocks.into();
    });
    reseal(&mf);
}

fn load_err(store: &FsCheckpointStore) -> String {
    match store.load(Some("t")) {
        Ok(_) => panic!("the tampered checkpoint was loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_edited_manifest_byte_is_refused_naming_both_checksums() {
    let (root, tag, store) = setup("mbyte", 2, true);
    let mf = tag.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mf).unwrap();
    // One byte of the client state: still valid JSON, still a consistent checkpoint.
    assert!(text.contains("\"hello\""));
    let edited = text.replacen("\"hello\"", "\"hellO\"", 1);
    std::fs::write(&mf, &edited).unwrap();
    let e = load_err(&store);
    assert!(e.contains(&mf.display().to_string()), "{e}");
    // Both values: the one recorded in the file, and the CRC32 of its content (computed here).
    let recorded = &edited[SEAL.len()..SEAL.len() + 8];
    let mut body = b"{\n".to_vec();
    body.extend_from_slice(&edited.as_bytes()[SEAL.len() + 8 + 3..]);
    let actual = format!("{:08x}", crc32fast::hash(&body));
    assert_ne!(recorded, actual);
    assert!(e.contains(recorded) && e.contains(&actual), "{e}");
    // The same edit, resealed, loads: the checksum was the only thing wrong.
    reseal(&mf);
    let ck = store.load(Some("t")).unwrap();
    assert_eq!(ck.training().client_state["note"], "hellO");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_manifest_whose_checksum_line_was_removed_or_moved_is_refused() {
    let (root, tag, store) = setup("mline", 1, false);
    let mf = tag.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mf).unwrap();
    let line_end = text.find(",\n").unwrap() + 2;
    // Removed: a current-version manifest must carry its checksum.
    std::fs::write(&mf, format!("{{\n{}", &text[line_end..])).unwrap();
    let e = load_err(&store);
    assert!(
        e.contains("manifest_crc32") && e.contains("manifest.json"),
        "{e}"
    );
    // Moved (reformatted): the checksum covers the exact bytes, so it must be where it was.
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let crc = v.as_object_mut().unwrap().remove("manifest_crc32").unwrap();
    v["manifest_crc32"] = crc;
    std::fs::write(&mf, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = load_err(&store);
    assert!(e.contains("manifest_crc32"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn an_edited_param_offset_is_refused_naming_the_param() {
    for resealed in [false, true] {
        for with_weights in [false, true] {
            let (root, tag, store) = setup("offset", 2, with_weights);
            let mf = tag.join(MANIFEST_FILE);
            // params[2] is "h0.fc.weight" at offset 23; 24 makes it overlap "head.bias" while
            // the parameters still end at numel (53).
            edit_manifest(&mf, |v| {
                assert_eq!(v["meta"]["params"][2]["name"], "h0.fc.weight");
                assert_eq!(v["meta"]["params"][2]["offset"], 23);
                v["meta"]["params"][2]["offset"] = 24.into();
            });
            if resealed {
                reseal(&mf);
            }
            let e = load_err(&store);
            assert!(e.contains("\"h0.fc.weight\""), "{e}");
            assert!(e.contains("offset 24") && e.contains("23"), "{e}");
            std::fs::remove_dir_all(&root).ok();
        }
    }
}

#[test]
fn a_deleted_param_entry_is_refused() {
    // With a model file: the file still holds the tensor, so the message names it.
    let (root, tag, store) = setup("delparam", 2, true);
    let mf = tag.join(MANIFEST_FILE);
    edit_manifest(&mf, |v| {
        let removed = v["meta"]["params"].as_array_mut().unwrap().remove(1);
        assert_eq!(removed["name"], "h0.ln.bias");
    });
    reseal(&mf);
    let e = load_err(&store);
    assert!(e.contains("\"h0.ln.bias\""), "{e}");
    std::fs::remove_dir_all(&root).ok();

    // Without one: the hole in the flat space [20, 23) is named, with its neighbours.
    let (root, tag, store) = setup("delparam2", 2, false);
    let mf = tag.join(MANIFEST_FILE);
    edit_manifest(&mf, |v| {
        v["meta"]["params"].as_array_mut().unwrap().remove(1);
    });
    reseal(&mf);
    let e = load_err(&store);
    assert!(
        e.contains("[20, 23)") && e.contains("\"embed.weight\"") && e.contains("\"h0.fc.weight\""),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();

    // The last entry deleted (numel adjusted to match): the rank files hold elements that no
    // parameter has.
    let (root, tag, store) = setup("delparam3", 2, false);
    let mf = tag.join(MANIFEST_FILE);
    edit_manifest(&mf, |v| {
        v["meta"]["params"].as_array_mut().unwrap().remove(3);
        v["numel"] = 48.into();
    });
    reseal(&mf);
    let e = load_err(&store);
    assert!(e.contains("53") && e.contains("48"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_deleted_rank_record_is_refused_naming_the_uncovered_elements() {
    // Two ranks hold [0, 27) and [27, 53); drop rank 1 and pretend one rank saved.
    let (root, tag, store) = setup("delrank", 2, false);
    let mf = tag.join(MANIFEST_FILE);
    edit_manifest(&mf, |v| {
        v["meta"]["world_size"] = 1.into();
        v["ranks"].as_array_mut().unwrap().truncate(1);
        v["files"]
            .as_object_mut()
            .unwrap()
            .remove(&rank_file_name(1));
    });
    reseal(&mf);
    let e = load_err(&store);
    assert!(e.contains("[27, 53)") && e.contains("\"master\""), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn overlapping_data_offsets_are_refused() {
    let (root, tag, store) = setup("overlap", 1, false);
    let name = rank_file_name(0);
    let (mut header, data) = split_st(&std::fs::read(tag.join(&name)).unwrap());
    // exp_avg claims master's bytes: it would read back as the master weights.
    let master = header["master"]["data_offsets"].clone();
    assert_eq!(master, serde_json::json!([0, 212]));
    header["exp_avg"]["data_offsets"] = master;
    replace_file_consistently(&tag, &name, &join_st(&header, &data));
    let e = load_err(&store);
    assert!(e.contains(&name), "{e}");
    assert!(
        e.contains("\"exp_avg\"") && e.contains("\"master\"") && e.contains("overlap"),
        "{e}"
    );
    assert!(e.contains("[0, 212]"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn data_bytes_claimed_by_no_tensor_are_refused() {
    // A hole between two tensors.
    let (root, tag, store) = setup("hole", 1, false);
    let name = rank_file_name(0);
    let (mut header, data) = split_st(&std::fs::read(tag.join(&name)).unwrap());
    let mut shifted = data[..212].to_vec();
    shifted.extend_from_slice(&[0u8; 4]);
    shifted.extend_from_slice(&data[212..]);
    for t in ["exp_avg", "exp_avg_sq"] {
        let o = header[t]["data_offsets"].as_array().unwrap().clone();
        header[t]["data_offsets"] =
            serde_json::json!([o[0].as_u64().unwrap() + 4, o[1].as_u64().unwrap() + 4]);
    }
    replace_file_consistently(&tag, &name, &join_st(&header, &shifted));
    let e = load_err(&store);
    assert!(e.contains(&name) && e.contains("[212, 216)"), "{e}");
    std::fs::remove_dir_all(&root).ok();

    // Bytes after the last tensor.
    let (root, tag, store) = setup("trailing", 1, false);
    let mut bytes = std::fs::read(tag.join(&name)).unwrap();
    let data_len = split_st(&bytes).1.len();
    bytes.extend_from_slice(&[0u8; 8]);
    replace_file_consistently(&tag, &name, &bytes);
    let e = load_err(&store);
    assert!(
        e.contains(&name) && e.contains(&format!("[{data_len}, {})", data_len + 8)),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_whole_file_crc_that_disagrees_with_the_block_crcs_is_refused() {
    let (root, tag, store) = setup("wholecrc", 2, true);
    let mf = tag.join(MANIFEST_FILE);
    edit_manifest(&mf, |v| {
        let c = v["files"][MODEL_FILE]["crc32"].as_u64().unwrap();
        v["files"][MODEL_FILE]["crc32"] = (c ^ 1).into();
    });
    reseal(&mf);
    let e = load_err(&store);
    assert!(e.contains(MODEL_FILE) && e.contains("crc32"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn consolidate_verifies_every_file_even_what_it_does_not_copy() {
    // One rank file of 3 buffers of 700,000 f32 (8.4 MB, blocks of 4 MiB): the header's block
    // (checked at open) and the master weights (what consolidation copies) lie in blocks 0-1,
    // exp_avg_sq in blocks 1-2. A corrupt byte of exp_avg_sq in block 2 is not read by a plain
    // consolidation, but the checkpoint is corrupt: it is refused, naming the file.
    let root = tmp_dir("consol");
    let store = FsCheckpointStore::new(&root).unwrap();
    let n = 700_000;
    let m = CheckpointMeta {
        world_size: 1,
        zero_stage: 0,
        dtype: "fp32".into(),
        params: contiguous_params([("w", vec![n - 10]), ("b", vec![10])]),
        training: TrainingState::default(),
    };
    let whole = vec![0..n; 1];
    save_split(&store, "t", &m, &whole, true).unwrap();
    let name = rank_file_name(0);
    let path = root.join("t").join(&name);
    let mut bytes = std::fs::read(&path).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (header, _) = split_st(&bytes);
    let sq = header["exp_avg_sq"]["data_offsets"][0].as_u64().unwrap() as usize;
    let master_end = header["master"]["data_offsets"][1].as_u64().unwrap() as usize;
    let at = bytes.len() - 5;
    assert!(at > 8 + hlen + sq && at as u64 >= 2 * BLOCK_BYTES);
    assert!(((8 + hlen + master_end) as u64) < 2 * BLOCK_BYTES);
    bytes[at] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let out_dir = tmp_dir("consol-out");
    let out = out_dir.join("full.safetensors");
    // Opening reads only the header's block: it succeeds.
    let ck = store.load(Some("t")).unwrap();
    let e = match consolidate(&ck, &out, Dtype::F32) {
        Ok(_) => panic!("a corrupt checkpoint was consolidated"),
        Err(e) => e,
    };
    assert!(
        matches!(e, CheckpointError::ChecksumMismatch { ref path, ref region, .. }
            if path == &root.join("t").join(&name) && region.starts_with("block 2 ")),
        "{e}"
    );
    assert!(e.to_string().contains(&name), "{e}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&root).ok();
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn the_manifest_checksum_is_the_crc_of_the_rest_and_version_2_manifests_without_one_load() {
    let (root, tag, store) = setup("v2", 2, true);
    let mf = tag.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&mf).unwrap();
    assert!(text.as_bytes().starts_with(SEAL), "{text}");
    // The recorded value is the CRC32 of the file without its second line (computed here).
    let recorded = u32::from_str_radix(&text[SEAL.len()..SEAL.len() + 8], 16).unwrap();
    let mut body = b"{\n".to_vec();
    body.extend_from_slice(&text.as_bytes()[SEAL.len() + 8 + 3..]);
    assert_eq!(recorded, crc32fast::hash(&body));
    let ck = store.load(Some("t")).unwrap();
    assert_eq!(ck.manifest_checksum(), Some(recorded));
    assert_eq!(ck.manifest().format_version, FORMAT_VERSION);
    drop(ck);
    // As format version 2 wrote it: no checksum line. Accepted (nothing to check it against).
    edit_manifest(&mf, |v| {
        v["format_version"] = 2.into();
        assert!(v
            .as_object_mut()
            .unwrap()
            .remove(MANIFEST_CHECKSUM_FIELD)
            .is_some());
    });
    assert!(!std::fs::read_to_string(&mf)
        .unwrap()
        .contains(MANIFEST_CHECKSUM_FIELD));
    let ck = store.load(Some("t")).unwrap();
    assert_eq!(ck.manifest_checksum(), None);
    assert_eq!(
        ck.read_weight("head.bias").unwrap(),
        flat(53, 0)[48..53].to_vec()
    );
    drop(ck);
    // Its consistency is still checked.
    edit_manifest(&mf, |v| v["meta"]["params"][2]["offset"] = 24.into());
    let e = load_err(&store);
    assert!(
        e.contains("\"h0.fc.weight\"") && e.contains("offset 24"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}

/// (Already refused before this change; the message now names the offsets.)
#[test]
fn a_tensor_whose_byte_length_is_not_its_shape_times_its_dtype_is_refused() {
    let (root, tag, store) = setup("shape", 1, false);
    let name = rank_file_name(0);
    let (mut header, data) = split_st(&std::fs::read(tag.join(&name)).unwrap());
    header["master"]["shape"] = serde_json::json!([52]);
    replace_file_consistently(&tag, &name, &join_st(&header, &data));
    let e = load_err(&store);
    assert!(
        e.contains(&name)
            && e.contains("\"master\"")
            && e.contains("[0, 212]")
            && e.contains("208"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).ok();
}
