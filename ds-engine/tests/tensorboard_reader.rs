//! The TensorBoard monitor's event files read back by maintained, independent code: the
//! TFRecord framing checked with the `crc32c` crate (masked as TensorFlow's
//! `tensorflow/core/lib/hash/crc32c.h` does), the records decoded by `prost` from the
//! messages of `tensorflow/core/util/event.proto` and `tensorflow/core/framework/summary.proto`
//! (only the fields the monitor writes).

use ds_engine::monitor::TensorBoardMonitor;
use prost::Message;

/// `tensorflow.Event` (fields 1, 2, 3 and 5).
#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` (tag and simple_value).
#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Splits a TFRecord file into its records, checking both CRCs of each.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        assert!(p + 12 <= bytes.len(), "truncated record header at {p}");
        let len_b = &bytes[p..p + 8];
        let len = u64::from_le_bytes(len_b.try_into().unwrap()) as usize;
        let lcrc = u32::from_le_bytes(bytes[p + 8..p + 12].try_into().unwrap());
        assert_eq!(lcrc, masked(len_b), "length CRC of the record at {p}");
        assert!(p + 16 + len <= bytes.len(), "truncated record at {p}");
        let data = &bytes[p + 12..p + 12 + len];
        let dcrc = u32::from_le_bytes(bytes[p + 12 + len..p + 16 + len].try_into().unwrap());
        assert_eq!(dcrc, masked(data), "data CRC of the record at {p}");
        out.push(data);
        p += 16 + len;
    }
    out
}

#[test]
fn event_file_reads_back_through_prost_and_crc32c() {
    let dir = std::env::temp_dir().join(format!("ds-tb-reader-{}", std::process::id()));
    let mut m = TensorBoardMonitor::new(dir.to_str().unwrap(), "run").unwrap();
    let written = [
        ("Train/Samples/train_loss", 2.5f64, 16u64),
        ("Train/Samples/lr", 1e-3, 32),
        ("Eval/Samples/val_loss", 1.234_567_8, 48),
        ("Train/Samples/loss_scale", 65536.0, 1 << 40),
    ];
    for (tag, v, step) in written {
        m.write_event(tag, v, step).unwrap();
    }
    m.flush().unwrap();
    let bytes = std::fs::read(m.path()).unwrap();
    let recs = records(&bytes);
    assert_eq!(recs.len(), 1 + written.len());
    let first = Event::decode(recs[0]).unwrap();
    assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
    assert!(
        first.wall_time > 1.6e9,
        "wall_time {} is not a Unix time",
        first.wall_time
    );
    for (rec, (tag, v, step)) in recs[1..].iter().zip(written) {
        let e = Event::decode(*rec).unwrap();
        assert_eq!(e.step, step as i64);
        assert!(e.wall_time >= first.wall_time);
        let s = e.summary.expect("a scalar event has a summary");
        assert_eq!(s.value.len(), 1);
        assert_eq!(s.value[0].tag, tag);
        assert_eq!(s.value[0].simple_value, Some(v as f32));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
