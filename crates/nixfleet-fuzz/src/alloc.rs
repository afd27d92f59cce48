//! An allocator that counts: wraps the system allocator and tracks the bytes currently
//! allocated and their peak, so that a test can bound what one parse allocates.
//!
//! Each fuzz test binary installs it:
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: nixfleet_fuzz::alloc::CountingAlloc = nixfleet_fuzz::alloc::CountingAlloc;
//! ```
//!
//! The counters are process-wide, so measurements are only meaningful while nothing else
//! allocates: [`crate::run`] holds one lock per test binary for a whole property, and
//! [`measure`] is called only inside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// [`System`], counting. A reallocation counts as its change in size: the bytes the
/// program asked for, not the allocator's temporary copy.
pub struct CountingAlloc;

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Relaxed).wrapping_add(by);
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(by: usize) {
    CURRENT.fetch_sub(by, Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are only atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is the caller's to check.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Whether [`CountingAlloc`] is this binary's global allocator (a test that forgot to
/// install it would otherwise measure nothing and pass).
pub fn installed() -> bool {
    static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    const PROBE: usize = 1 << 20;
    for _ in 0..8 {
        if SEEN.load(Relaxed) {
            return true;
        }
        let before = CURRENT.load(Relaxed);
        let block = std::hint::black_box(vec![0u8; PROBE]);
        let during = CURRENT.load(Relaxed);
        drop(block);
        // Other threads may free memory meanwhile; they do not free a mebibyte at once.
        if during.wrapping_sub(before) >= PROBE / 2 && during.wrapping_sub(before) <= PROBE * 2 {
            SEEN.store(true, Relaxed);
        }
    }
    SEEN.load(Relaxed)
}

/// Runs `f` and returns its result with the peak number of bytes allocated above what
/// was allocated when it started (what it still holds when it returns included).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let result = f();
    let peak = PEAK.load(Relaxed);
    (result, peak.saturating_sub(base))
}

/// An allocation bound: `per_input_byte * input length + constant` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub per_input_byte: usize,
    pub constant: usize,
}

impl Bound {
    pub fn limit(&self, input_len: usize) -> usize {
        self.per_input_byte
            .saturating_mul(input_len)
            .saturating_add(self.constant)
    }

    /// Measures `f`, which parses `input_len` bytes, and fails the case if it allocated
    /// more than the bound at its peak.
    pub fn check<R>(
        &self,
        what: &str,
        input_len: usize,
        f: impl FnOnce() -> R,
    ) -> Result<R, proptest::test_runner::TestCaseError> {
        assert!(
            installed(),
            "install nixfleet_fuzz::alloc::CountingAlloc as this test binary's #[global_allocator]"
        );
        let (result, peak) = measure(f);
        let limit = self.limit(input_len);
        if peak > limit {
            return Err(proptest::test_runner::TestCaseError::fail(format!(
                "{what}: parsing {input_len} bytes allocated {peak} bytes at its peak, over the bound {} * {input_len} + {} = {limit}",
                self.per_input_byte, self.constant
            )));
        }
        Ok(result)
    }
}
