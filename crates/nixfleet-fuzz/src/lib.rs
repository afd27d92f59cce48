//! Bounded, reproducible fuzzing for nixfleet's tests: every parser that takes attacker
//! input is run on arbitrary bytes and on structure-aware mutations of valid inputs,
//! inside ordinary `cargo test` runs.
//!
//! - [`run`]: one property, a number of cases from `NIXFLEET_FUZZ_CASES` and a fixed RNG
//!   seed (`PROPTEST_RNG_SEED` overrides it), so a CI failure reproduces; no failure
//!   persistence files are written.
//! - [`json`]: mutations of JSON documents (members removed, inserted, duplicated and
//!   renamed, types swapped, huge numbers, long strings, deep nesting, log-injection
//!   strings, layout changes that keep the canonical form) and byte-level edits.
//! - [`der`]: the same for DER (certificates, CSRs): TLVs removed, duplicated, retagged,
//!   re-lengthed, deeply nested.
//! - [`alloc`]: a counting global allocator, to bound what one parse allocates.

pub mod alloc;
pub mod der;
pub mod json;

use std::sync::Mutex;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Environment variable: cases per property (each property multiplies it by a fixed
/// factor, for its cost). The default keeps every fuzz test of the workspace together
/// well under a minute in a debug build on two cores (about 14 s: trust 4.5, pki 5,
/// control plane over the wire 2.5, proto 1); raise it for a longer hunt
/// (`NIXFLEET_FUZZ_CASES=20000`).
pub const CASES_VAR: &str = "NIXFLEET_FUZZ_CASES";
pub const DEFAULT_CASES: u32 = 128;
/// The RNG seed unless `PROPTEST_RNG_SEED` names another: runs are reproducible.
pub const DEFAULT_SEED: u64 = 0x6e69_7866_6c65_6574;

/// Cases per property: `NIXFLEET_FUZZ_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The proptest configuration of every fuzz property: [`cases`] cases (times `scale`),
/// a fixed seed, no regression files (a failure reproduces from the seed; commit a case
/// as an ordinary test if it should stay), and shrinking bounded in time.
pub fn config(scale: u32) -> Config {
    let mut config = Config {
        cases: cases().saturating_mul(scale).max(1),
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 30_000,
        ..Config::default()
    };
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(DEFAULT_SEED);
    }
    config
}

/// Held for a whole property: the allocation counters are process-wide, so the
/// properties of one test binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds this binary's measurement lock: for a test that measures allocations outside
/// [`run`].
pub fn alone() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs property `name` over `strategy` ([`config`] with `scale`), alone in this binary;
/// panics with the minimal failing input and how to reproduce it.
pub fn run<S>(
    name: &str,
    scale: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let _alone = alone();
    let config = config(scale);
    let (cases, seed) = (config.cases, config.rng_seed);
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!(
            "fuzz property {name} failed ({cases} cases, seed {seed}); rerun with \
             {CASES_VAR}={} PROPTEST_RNG_SEED={seed}\n{e}",
            cases / scale.max(1)
        );
    }
}

/// Fails the case unless `cond` holds: `prop_assert!` for helpers outside a closure.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

/// Bytes that print as (lossy, escaped) text in a failure message instead of a column
/// of numbers.
#[derive(Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes b\"{}\"", self.0.len(), self.0.escape_ascii())
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Arbitrary bytes, `len` long.
pub fn bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(proptest::arbitrary::any::<u8>(), len).prop_map(Bytes)
}
