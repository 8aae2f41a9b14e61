//! The CSV and Parquet decoders and the DMS file-name parser never panic,
//! whatever the bytes: real DMS samples and `testdata` objects, mutated
//! (truncated, bytes flipped, spliced with another object, a huge field,
//! invalid UTF-8, a field more or less, a range repeated), are decoded; each
//! must decode or fail with a decode error that names its object.
//!
//! Runs for `CDCFLOW_FUZZ_SECS` seconds (default 10; `make fuzz` runs it
//! longer) and prints how many inputs it tried. The seed of the mutations is
//! `CDCFLOW_FUZZ_SEED` (default: the clock, printed), so a failure can be
//! replayed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdcflow::config::{Column, CsvOptions, SqlType};
use cdcflow::decode::{self, DecodeSpec};
use cdcflow::error::Error;
use cdcflow::source::{ObjectName, SourceObject};

/// xorshift64*: small, deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if ObjectName::parse(&path.to_string_lossy()).is_some() {
            out.push(path);
        }
    }
}

/// Every DMS object of `testdata` (generated and real samples) and the fixtures.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    for dir in ["testdata/dms", "testdata/dms-samples", "tests/fixtures"] {
        files(&root.join(dir), &mut paths);
    }
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let key = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            (key, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn object(key: &str) -> SourceObject {
    SourceObject {
        key: key.to_string(),
        etag: String::new(),
        size: 0,
        last_modified: Default::default(),
        name: ObjectName::parse(key).expect("a DMS name"),
    }
}

/// The spec a pipeline would give: the orders columns for CSV (as the
/// example pipeline declares them), the object's own columns for Parquet.
fn spec(key: &str, original: &[u8]) -> DecodeSpec {
    let mut spec = DecodeSpec {
        columns: [
            ("id", SqlType::BigInt),
            ("customer", SqlType::Text),
            (
                "amount",
                SqlType::Decimal {
                    precision: 12,
                    scale: 2,
                },
            ),
            ("status", SqlType::Text),
            ("note", SqlType::Text),
            ("created_at", SqlType::TimestampTz),
        ]
        .into_iter()
        .map(|(name, sql_type)| Column {
            name: name.into(),
            sql_type,
            existing: None,
        })
        .collect(),
        op_name: "op".into(),
        commit_ts_name: "commit_ts".into(),
        timestamp_column: Some("dms_timestamp".into()),
        extra_columns: Vec::new(),
        include_op_for_full_load: false,
        csv: CsvOptions::default(),
        evolving: false,
    };
    if key.contains(".parquet") {
        spec.timestamp_column = None;
        spec.evolving = true;
        spec.columns =
            decode::parquet_columns(&object(key), Bytes::copy_from_slice(original), &spec)
                .unwrap_or_default();
    }
    spec
}

/// One mutation of `input` (`other` is another seed, for splices).
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let at = |rng: &mut Rng, len: usize| rng.below(len + 1);
    match rng.below(8) {
        0 => out.truncate(at(rng, input.len())),
        1 => {
            for _ in 0..=rng.below(8) {
                if !out.is_empty() {
                    let i = rng.below(out.len());
                    out[i] ^= 1 << rng.below(8);
                }
            }
        }
        2 => {
            let (from, len) = (rng.below(other.len()), rng.below(4096));
            let piece = &other[from.min(other.len())..(from + len).min(other.len())];
            let i = at(rng, out.len());
            out.splice(i..i, piece.iter().copied());
        }
        3 => {
            let i = at(rng, out.len());
            let huge = vec![b'x'; 1 << (10 + rng.below(11))];
            out.splice(i..i, huge);
        }
        4 => {
            let i = at(rng, out.len());
            out.splice(i..i, [0xff, 0xfe, 0xc3]);
        }
        5 => {
            // A field more or less: a delimiter added or removed.
            let i = at(rng, out.len());
            match out.iter().skip(i).position(|&b| b == b',') {
                Some(j) if rng.below(2) == 0 => {
                    out.remove(i + j);
                }
                _ => out.insert(i, b','),
            }
        }
        6 => {
            let (from, len) = (rng.below(out.len()), rng.below(1024));
            let piece: Vec<u8> = out[from.min(out.len())..(from + len).min(out.len())].to_vec();
            let i = at(rng, out.len());
            out.splice(i..i, piece);
        }
        _ => {
            // Overwrite a run with random bytes (corrupt pages, footers, headers).
            let i = rng.below(out.len());
            for b in out.iter_mut().skip(i).take(1 + rng.below(64)) {
                *b = rng.next() as u8;
            }
        }
    }
    out
}

thread_local! {
    /// Set while this thread decodes: panics inside (caught by the decoder's
    /// guard and turned into errors) are counted, not printed.
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics the decoders raised and their guard caught.
static CAUGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs (once) a panic hook that counts, instead of printing, the panics
/// raised while a thread decodes; every other panic prints as before.
fn quiet_decoder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if DECODING.with(|d| d.get()) {
                CAUGHT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                default(info);
            }
        }));
    });
}

/// Runs `decode` with its panics counted, not printed.
fn decoding<T>(decode: impl FnOnce() -> T) -> T {
    DECODING.with(|d| d.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    DECODING.with(|d| d.set(false));
    result.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Decodes `bytes` as object `key` both ways (whole and streamed); a panic
/// fails the test, and so does any error but a decode error naming `key`.
/// Returns whether it decoded.
fn check(key: &str, bytes: Vec<u8>, spec: &DecodeSpec, label: &str) -> bool {
    let mut decoded = true;
    let object = object(key);
    let whole = std::panic::catch_unwind(|| {
        decoding(|| decode::decode(&object, Bytes::from(bytes.clone()), spec))
    })
    .unwrap_or_else(|_| panic!("{label}: decode panicked"));
    let streamed = std::panic::catch_unwind(|| {
        decoding(|| {
            decode::decode_stream(
                &object,
                Box::new(std::io::Cursor::new(bytes)),
                spec,
                &mut |_| Ok(()),
            )
        })
    })
    .unwrap_or_else(|_| panic!("{label}: decode_stream panicked"));
    for result in [whole.map(|_| ()), streamed] {
        decoded &= result.is_ok();
        match result {
            Ok(()) => {}
            Err(Error::Decode { object, .. }) if object == key => {}
            // A Parquet object whose columns are found may hold more of them.
            Err(Error::NewColumns { object, .. }) if object == key => {}
            Err(other) => panic!("{label}: not a decode error of the object: {other}"),
        }
    }
    decoded
}

#[test]
fn decoders_and_the_name_parser_never_panic_on_mutated_dms_objects() {
    let secs: u64 = std::env::var("CDCFLOW_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = crate::support::seed_from("CDCFLOW_FUZZ_SEED");
    quiet_decoder_panics();
    let seeds = seeds();
    assert!(
        seeds.len() > 20,
        "the seed corpus is testdata: {}",
        seeds.len()
    );
    let specs: Vec<DecodeSpec> = seeds.iter().map(|(k, b)| decoding(|| spec(k, b))).collect();
    // The seeds themselves first (one of them made arrow panic before).
    for ((key, bytes), spec) in seeds.iter().zip(&specs) {
        check(key, bytes.clone(), spec, &format!("seed {key}"));
    }
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut tried, mut refused, mut names) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let i = rng.below(seeds.len());
        let (key, bytes) = &seeds[i];
        let other = &seeds[rng.below(seeds.len())].1;
        let mut input = mutate(&mut rng, bytes, other);
        if rng.below(4) == 0 {
            input = mutate(&mut rng, &input, other);
        }
        let label = format!("seed {seed}, input {tried} (a mutation of {key})");
        refused += u64::from(!check(key, input, &specs[i], &label));
        tried += 1;
        // The file-name parser, on a mutated key.
        let name = mutate(
            &mut rng,
            key.as_bytes(),
            b"20240501-101500123.csv.gz/LOAD0001",
        );
        let name = String::from_utf8_lossy(&name);
        let parsed =
            std::panic::catch_unwind(|| ObjectName::parse(&name).map(|n| n.order.cdc_time()));
        assert!(parsed.is_ok(), "the name parser panicked on {name:?}");
        names += 1;
    }
    println!(
        "fuzz: {tried} mutated objects ({refused} refused with a decode error; arrow or parquet \
         panicked {} times inside the decoders' guard) and {names} mutated names from {} seeds in \
         {secs} s (seed {seed}); no panic escaped",
        CAUGHT.load(std::sync::atomic::Ordering::Relaxed),
        seeds.len()
    );
}
