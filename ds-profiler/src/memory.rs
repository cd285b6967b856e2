//! Peak-memory helpers: an opt-in counting global allocator and Linux `VmHWM`/`VmRSS` readers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A global allocator that forwards to [`System`] and counts current and peak heap bytes.
///
/// Opt in from a binary:
/// ```ignore
/// #[global_allocator]
/// static ALLOC: ds_profiler::CountingAlloc = ds_profiler::CountingAlloc::new();
/// ```
#[derive(Debug)]
pub struct CountingAlloc {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl CountingAlloc {
    /// A counter at zero.
    pub const fn new() -> Self {
        Self {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Bytes currently allocated through this allocator.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Peak bytes since creation or the last [`reset_peak`](Self::reset_peak).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Sets the peak to the current value.
    pub fn reset_peak(&self) {
        self.peak.store(self.current(), Ordering::Relaxed);
    }

    fn add(&self, n: usize) {
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.current.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call forwards to `System` with the caller's layout unchanged; the counters are
// only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        self.sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.sub(layout.size());
            self.add(new_size);
        }
        p
    }
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Peak resident set size of this process in bytes (`VmHWM` in `/proc/self/status`);
/// `None` where unavailable (non-Linux).
pub fn vm_hwm_bytes() -> Option<u64> {
    proc_status_kb("VmHWM")
}

/// Memory the kernel says is available for new allocations (`MemAvailable` in
/// `/proc/meminfo`), in bytes; `None` where unavailable (non-Linux).
pub fn mem_available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Current resident set size in bytes (`VmRSS`); `None` where unavailable.
pub fn vm_rss_bytes() -> Option<u64> {
    proc_status_kb("VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_positive_and_below_the_total_on_linux() {
        if let (Some(a), Ok(info)) = (
            mem_available_bytes(),
            std::fs::read_to_string("/proc/meminfo"),
        ) {
            let total: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
                * 1024;
            assert!(a > 0 && a <= total, "{a} of {total}");
        }
    }

    #[test]
    fn counting_alloc_tracks_peak() {
        let a = CountingAlloc::new();
        let l = Layout::from_size_align(1024, 8).unwrap_or(Layout::new::<u8>());
        // SAFETY: valid non-zero layout; freed with the same layout.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null());
            assert_eq!(a.current(), 1024);
            a.dealloc(p, l);
        }
        assert_eq!(a.current(), 0);
        assert_eq!(a.peak(), 1024);
        a.reset_peak();
        assert_eq!(a.peak(), 0);
    }

    #[test]
    fn hwm_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(vm_hwm_bytes().is_some_and(|b| b > 0));
            assert!(vm_rss_bytes().is_some_and(|b| b > 0));
        }
    }
}
