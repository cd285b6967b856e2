//! DeepSpeed's `csv_monitor`: one CSV file per event, named after the event with `/` replaced
//! by `_`, a header `step,<last path component>`, one `global_samples,value` row per record,
//! written by rank 0 (`deepspeed/monitor/csv_monitor.py`).

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
}
