//! DeepSpeed's `csv_monitor`: one CSV file per event, named after the event with `/` replaced
//! by `_`, a header `step,<last path component>`, one `global_samples,value` row per record,
//! written by rank 0 (`deepspeed/monitor/csv_monitor.py`); and DeepSpeed's `tensorboard`
//! monitor as real TensorBoard event files (TFRecord framing with masked CRC-32C around
//! hand-encoded `Event` protobufs carrying scalar `Summary` values).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::EngineError;

/// Writes `(event, value, global_samples)` records as DeepSpeed's CSV monitor does.
#[derive(Debug)]
pub struct CsvMonitor {
    dir: PathBuf,
    files: BTreeMap<String, BufWriter<File>>,
}

impl CsvMonitor {
    /// Files go to `<output_path>/<job_name>/` (`output_path` empty = the current directory).
    pub fn new(output_path: &str, job_name: &str) -> Result<Self, EngineError> {
        let base = if output_path.is_empty() {
            Path::new(".")
        } else {
            Path::new(output_path)
        };
        let dir = base.join(job_name);
        std::fs::create_dir_all(&dir).map_err(|e| {
            EngineError::Data(format!("csv_monitor: cannot create {}: {e}", dir.display()))
        })?;
        Ok(CsvMonitor {
            dir,
            files: BTreeMap::new(),
        })
    }

    /// The folder written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record.
    pub fn write_event(&mut self, name: &str, value: f64, step: u64) -> Result<(), EngineError> {
        let io = |p: &Path, e: std::io::Error| {
            EngineError::Data(format!("csv_monitor: cannot write {}: {e}", p.display()))
        };
        if !self.files.contains_key(name) {
            let path = self.dir.join(format!("{}.csv", name.replace('/', "_")));
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| io(&path, e))?;
            let mut w = BufWriter::new(f);
            let header = name.rsplit('/').next().unwrap_or(name);
            writeln!(w, "step,{header}").map_err(|e| io(&path, e))?;
            self.files.insert(name.to_string(), w);
        }
        let dir = self.dir.clone();
        if let Some(w) = self.files.get_mut(name) {
            writeln!(w, "{step},{value}").map_err(|e| io(&dir, e))?;
        }
        Ok(())
    }

    /// Flushes every file.
    pub fn flush(&mut self) -> Result<(), EngineError> {
        for w in self.files.values_mut() {
            w.flush()
                .map_err(|e| EngineError::Data(format!("csv_monitor: flush failed: {e}")))?;
        }
        Ok(())
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC: `((crc >> 15) | (crc << 17)) + 0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes a TensorFlow `Event` protobuf: `wall_time` (field 1, double), `step` (2, int64)
/// and either `file_version` (3, string) or a `Summary` (5) of one `Value` with `tag` (1) and
/// `simple_value` (2, float).
pub fn encode_event(wall_time: f64, step: i64, what: EventWhat<'_>) -> Vec<u8> {
    let mut e = Vec::with_capacity(64);
    e.push(0x09); // field 1, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(step as u64, &mut e);
    match what {
        EventWhat::FileVersion(v) => {
            e.push(0x1A); // field 3, length-delimited
            varint(v.len() as u64, &mut e);
            e.extend_from_slice(v.as_bytes());
        }
        EventWhat::Scalar(tag, value) => {
            let mut val = Vec::with_capacity(tag.len() + 8);
            val.push(0x0A); // Value.tag
            varint(tag.len() as u64, &mut val);
            val.extend_from_slice(tag.as_bytes());
            val.push(0x15); // Value.simple_value, 32-bit
            val.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::with_capacity(val.len() + 4);
            summary.push(0x0A); // Summary.value
            varint(val.len() as u64, &mut summary);
            summary.extend(val);
            e.push(0x2A); // field 5, length-delimited
            varint(summary.len() as u64, &mut e);
            e.extend(summary);
        }
    }
    e
}

/// What an [`encode_event`] event carries.
#[derive(Debug, Clone, Copy)]
pub enum EventWhat<'a> {
    /// The first record of a file: `brain.Event:2`.
    FileVersion(&'a str),
    /// One scalar summary value: (tag, value).
    Scalar(&'a str, f32),
}

/// Frames one record as TFRecord: length (u64 LE), masked CRC-32C of the length, the data,
/// masked CRC-32C of the data.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(data.len() + 16);
    let len = (data.len() as u64).to_le_bytes();
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    r
}

/// DeepSpeed's `tensorboard` monitor: scalar events in a TensorBoard event file
/// (`<output_path>/<job_name>/events.out.tfevents.<time>.<host>`), written by rank 0, with
/// DeepSpeed's tags (`Train/Samples/train_loss`, ...) and the global sample count as step.
#[derive(Debug)]
pub struct TensorBoardMonitor {
    path: PathBuf,
    file: BufWriter<File>,
}

impl TensorBoardMonitor {
    /// Creates the folder and the event file (`output_path` empty = `./runs`, DeepSpeed's
    /// default).
    pub fn new(output_path: &str, job_name: &str) -> Result<Self, EngineError> {
        let base = if output_path.is_empty() {
            Path::new("runs")
        } else {
            Path::new(output_path)
        };
        let dir = base.join(job_name);
        let io = |p: &Path, e: std::io::Error| {
            EngineError::Data(format!("tensorboard: cannot write {}: {e}", p.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now.as_secs(),
            std::process::id()
        ));
        let f = File::create(&path).map_err(|e| io(&path, e))?;
        let mut m = TensorBoardMonitor {
            path,
            file: BufWriter::new(f),
        };
        m.write(0, EventWhat::FileVersion("brain.Event:2"))?;
        Ok(m)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, step: u64, what: EventWhat<'_>) -> Result<(), EngineError> {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let rec = tfrecord(&encode_event(wall, step as i64, what));
        self.file.write_all(&rec).map_err(|e| {
            EngineError::Data(format!(
                "tensorboard: cannot write {}: {e}",
                self.path.display()
            ))
        })
    }

    /// Appends one scalar (`value` stored as f32, as TensorBoard's `simple_value`).
    pub fn write_event(&mut self, name: &str, value: f64, step: u64) -> Result<(), EngineError> {
        self.write(step, EventWhat::Scalar(name, value as f32))
    }

    /// Flushes the file.
    pub fn flush(&mut self) -> Result<(), EngineError> {
        self.file.flush().map_err(|e| {
            EngineError::Data(format!(
                "tensorboard: flush {} failed: {e}",
                self.path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepspeed_layout() {
        let dir = std::env::temp_dir().join(format!("ds-csv-{}", std::process::id()));
        let mut m = CsvMonitor::new(dir.to_str().unwrap(), "job").unwrap();
        m.write_event("Train/Samples/train_loss", 2.5, 16).unwrap();
        m.write_event("Train/Samples/train_loss", 2.25, 32).unwrap();
        m.write_event("Train/Samples/lr", 0.001, 16).unwrap();
        m.flush().unwrap();
        let loss = std::fs::read_to_string(dir.join("job/Train_Samples_train_loss.csv")).unwrap();
        assert_eq!(loss, "step,train_loss\n16,2.5\n32,2.25\n");
        let lr = std::fs::read_to_string(dir.join("job/Train_Samples_lr.csv")).unwrap();
        assert_eq!(lr, "step,lr\n16,0.001\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn crc32c_test_vectors() {
        // RFC 3720 appendix B.4 and the common check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    fn read_varint(b: &[u8], p: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let x = b[*p];
            *p += 1;
            v |= u64::from(x & 0x7F) << shift;
            if x & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    /// A minimal protobuf reader: (field, wire type, payload bytes or varint).
    fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut p = 0;
        while p < b.len() {
            let key = read_varint(b, &mut p);
            let body = match key & 7 {
                0 => read_varint(b, &mut p).to_le_bytes().to_vec(),
                1 => {
                    p += 8;
                    b[p - 8..p].to_vec()
                }
                2 => {
                    let n = read_varint(b, &mut p) as usize;
                    p += n;
                    b[p - n..p].to_vec()
                }
                5 => {
                    p += 4;
                    b[p - 4..p].to_vec()
                }
                w => panic!("wire type {w}"),
            };
            out.push((key >> 3, body));
        }
        out
    }

    #[test]
    fn tensorboard_event_file_decodes() {
        let dir = std::env::temp_dir().join(format!("ds-tb-{}", std::process::id()));
        let mut m = TensorBoardMonitor::new(dir.to_str().unwrap(), "job").unwrap();
        m.write_event("Train/Samples/train_loss", 2.5, 16).unwrap();
        m.write_event("Train/Samples/lr", 1e-3, 32).unwrap();
        m.flush().unwrap();
        let path = m.path().to_path_buf();
        assert!(path.starts_with(dir.join("job")));
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents."));
        let bytes = std::fs::read(&path).unwrap();
        let mut p = 0;
        let mut events = Vec::new();
        while p < bytes.len() {
            let len_b = &bytes[p..p + 8];
            let len = u64::from_le_bytes(len_b.try_into().unwrap()) as usize;
            let lcrc = u32::from_le_bytes(bytes[p + 8..p + 12].try_into().unwrap());
            assert_eq!(lcrc, masked_crc32c(len_b));
            let data = &bytes[p + 12..p + 12 + len];
            let dcrc = u32::from_le_bytes(bytes[p + 12 + len..p + 16 + len].try_into().unwrap());
            assert_eq!(dcrc, masked_crc32c(data));
            events.push(fields(data));
            p += 16 + len;
        }
        assert_eq!(p, bytes.len());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0][2], (3, b"brain.Event:2".to_vec()));
        let scalar = |e: &Vec<(u64, Vec<u8>)>| {
            assert_eq!(e[0].0, 1); // wall_time
            let step = u64::from_le_bytes(e[1].1.clone().try_into().unwrap());
            assert_eq!(e[2].0, 5); // summary
            let summary = fields(&e[2].1);
            let value = fields(&summary[0].1);
            let tag = String::from_utf8(value[0].1.clone()).unwrap();
            let v = f32::from_le_bytes(value[1].1.clone().try_into().unwrap());
            (step, tag, v)
        };
        assert_eq!(
            scalar(&events[1]),
            (16, "Train/Samples/train_loss".into(), 2.5)
        );
        assert_eq!(scalar(&events[2]), (32, "Train/Samples/lr".into(), 1e-3));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
