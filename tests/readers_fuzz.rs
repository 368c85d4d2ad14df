//! A bounded fuzz run of every file reader, on the stable toolchain: seeded mutations (bit
//! flips, boundary integers, cut, inserted and repeated chunks, hostile text tokens) of a valid
//! file per reader, `FLSL_FUZZ_INPUTS` inputs each (default 100 000). Each input must be
//! answered with a value or an error — no panic, no abort — and the bytes live at once on the
//! reading thread must stay within the reader's stated bound (`readers::Reader::bound`),
//! measured by a counting global allocator. The two `.pth` files that used to abort the
//! process are regression cases. The same readers are cargo-fuzz targets in `fuzz/`.

mod readers;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use readers::Reader;

/// Counts the bytes live on each thread and their peak (frees from another thread make a
/// thread's count drift low, never high: the peak stays an upper bound of what it allocated).
struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn add(n: i64) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + n;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// const-initialised thread locals without destructors (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is passed on.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            add(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            add(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator with layout `l`.
        unsafe { System.dealloc(p, l) };
        add(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: as above.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            add(new as i64 - l.size() as i64);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated (above the live count at the start) while `f` runs on this thread.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    let peak = PEAK.with(Cell::get) - start;
    (r, peak.max(0) as u64)
}

thread_local! {
    /// Panics caught inside a reader (tract's graph analysis, turned into errors by
    /// `catch_unwind` in `flsl_runtime::onnx`) while this thread runs a fuzz loop.
    static CAUGHT: Cell<usize> = const { Cell::new(0) };
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// Counts panics of fuzz loops instead of printing them; any other panic (a failing test)
/// goes to the default hook.
fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if COUNTING.with(Cell::get) {
                CAUGHT.with(|c| c.set(c.get() + 1));
            } else {
                default(info);
            }
        }));
    });
}

fn inputs() -> usize {
    std::env::var("FLSL_FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

const BOUNDARY: [u64; 10] =
    [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 1 << 40, u64::MAX];
const TOKENS: [&str; 12] = [
    "[[[[[[[[[[[[[[[[[[[[[[[[",
    "{{{{{{{{{{{{{{{{",
    "-1",
    "1e309",
    "NaN",
    "99999999999999999999",
    "\u{0}",
    "\"",
    ",",
    "<object>",
    "-0",
    "18446744073709551616",
];

/// One to four mutations of `seed`.
fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] = BOUNDARY[rng.random_range(0..BOUNDARY.len())] as u8;
            }
            2 if len >= 8 => {
                let i = rng.random_range(0..=len - 8);
                let v = BOUNDARY[rng.random_range(0..BOUNDARY.len())];
                let w = if rng.random_bool(0.5) { 4 } else { 8 };
                b[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            3 if len > 1 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                b.drain(i..i + n);
            }
            4 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(i..i, junk);
            }
            5 if len > 1 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(256));
                let chunk = b[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                b.splice(at..at, chunk);
            }
            6 if len > 0 => b.truncate(rng.random_range(0..len)),
            _ => {
                let i = rng.random_range(0..=len);
                let t = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
                b.splice(i..i, t.iter().copied());
            }
        }
    }
    b
}

/// Runs `inputs()` mutations of `seeds` through `reader`; checks the seeds are accepted and
/// every input stays within the bound.
fn fuzz(reader_name: &str, seeds: &[Vec<u8>]) {
    let reader: Reader = readers::all()
        .into_iter()
        .find(|r| r.name == reader_name)
        .unwrap_or_else(|| panic!("no reader `{reader_name}`"));
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = (reader.read)(s) {
            panic!("{reader_name}: seed {i} is refused, the run would test nothing: {e}");
        }
    }
    let n = inputs();
    count_panics();
    CAUGHT.with(|c| c.set(0));
    let mut rng = ChaCha8Rng::seed_from_u64(0xF1A5 ^ reader_name.len() as u64);
    let (mut accepted, mut worst_ratio, mut worst_peak) = (0usize, 0f64, 0u64);
    let t0 = Instant::now();
    for i in 0..n {
        let input = mutate(&seeds[i % seeds.len()], &mut rng);
        COUNTING.with(|c| c.set(true));
        let (r, peak) = peak_of(|| (reader.read)(&input));
        COUNTING.with(|c| c.set(false));
        accepted += usize::from(r.is_ok());
        assert!(
            peak <= reader.bound(input.len()),
            "{reader_name}: input {i} ({} bytes) made the reader hold {peak} bytes, above its \
             bound {}",
            input.len(),
            reader.bound(input.len())
        );
        worst_peak = worst_peak.max(peak);
        worst_ratio = worst_ratio.max(peak as f64 / input.len().max(1) as f64);
    }
    let caught = CAUGHT.with(Cell::get);
    println!(
        "fuzz {reader_name}: {n} inputs, {accepted} accepted, {} refused with an error \
         ({caught} of them panics inside a dependency, caught), peak {worst_peak} bytes (worst \
         {worst_ratio:.1}x the input), {:.1} s",
        n - accepted,
        t0.elapsed().as_secs_f64()
    );
    // Our own readers never panic; only tract's graph analysis is fenced with catch_unwind.
    if reader_name != "onnx" {
        assert_eq!(caught, 0, "{reader_name}: panics were caught");
    }
}

fn file(rel: &str) -> Vec<u8> {
    let p = readers::repo().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const MICRO: &str = "tests/fixtures/reference/micro";

#[test]
fn fuzz_pth() {
    fuzz("pth", &[file(&format!("{MICRO}/pth_probe.pth"))]);
}

#[test]
fn fuzz_safetensors() {
    fuzz("safetensors", &[file(&format!("{MICRO}/vmr_prior.safetensors"))]);
}

fn npy_seeds() -> Vec<Vec<u8>> {
    vec![
        flsl_runtime::npy::encode_npy(&[2, 3], &[1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]),
        flsl_runtime::npy::encode_npy(&[4], &[0.5; 4]),
    ]
}

#[test]
fn fuzz_npy_train() {
    fuzz("npy_train", &npy_seeds());
}

#[test]
fn fuzz_npy_runtime() {
    fuzz("npy_runtime", &npy_seeds());
}

/// A micro ViT (1 block, width 8, 16x16 input, patch 8) exported by our exporter: a few KB.
fn onnx_seed() -> Vec<u8> {
    use flsl_runtime::export::{VitSpec, export_vit, random_vit_weights};
    let spec = VitSpec {
        embed_dim: 8,
        depth: 1,
        num_heads: 2,
        patch_size: 8,
        mlp_hidden: 16,
        layer_norm_eps: 1e-6,
        img_h: 16,
        img_w: 16,
    };
    let w = random_vit_weights(&spec, 3);
    let pos = w["pos_embed"].1.clone();
    export_vit(&w, &spec, &pos, None).unwrap()
}

#[test]
fn fuzz_onnx() {
    let seed = onnx_seed();
    // The whole load path (shape analysis, our substitutions, optimisation) on a smaller
    // share: it is 100x slower per input than the reader stage.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let full = (inputs() / 100).max(1);
    count_panics();
    CAUGHT.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    let mut loaded = 0;
    for _ in 0..full {
        let input = mutate(&seed, &mut rng);
        loaded += usize::from(
            flsl_runtime::onnx::OnnxModel::from_bytes(&input, Default::default()).is_ok(),
        );
    }
    COUNTING.with(|c| c.set(false));
    println!(
        "fuzz onnx (full load and optimisation): {full} inputs, {loaded} loaded, {} panics \
         inside tract caught",
        CAUGHT.with(Cell::get)
    );
    fuzz("onnx", &[seed]);
}

#[test]
fn fuzz_image() {
    let img =
        image::RgbImage::from_fn(16, 12, |x, y| image::Rgb([(x * 16) as u8, (y * 20) as u8, 90]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let mut jpg = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
    fuzz("image", &[png, jpg]);
}

#[test]
fn fuzz_coco() {
    fuzz("coco", &[file("data/neon-aerial-trees/soap061_alive_dead.coco.json")]);
}

#[test]
fn fuzz_coco_eval() {
    fuzz("coco_eval", &[file("data/neon-aerial-trees/soap061_alive_dead.coco.json")]);
}

#[test]
fn fuzz_voc() {
    fuzz("voc", &[file("data/neon-aerial-trees/annotations_voc/SOAP_061.xml")]);
}

#[test]
fn fuzz_visdrone() {
    fuzz("visdrone", &[file("data/neon-aerial-trees/annotations_visdrone_det/OSBS_029.txt")]);
}

#[test]
fn fuzz_train_config() {
    let tiny = toml::to_string(&flsl_train::config::TrainConfig::tiny()).unwrap();
    let paper = toml::to_string(&flsl_train::config::TrainConfig::default()).unwrap();
    fuzz("train_config", &[tiny.into_bytes(), paper.into_bytes()]);
}

#[test]
fn fuzz_bundle() {
    use flsl_runtime::onboard::bundle::{BundleConfig, FORMAT, InputConfig};
    let cfg = BundleConfig {
        format: FORMAT,
        input: InputConfig {
            height: 224,
            width: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        },
        outputs: vec!["features".into(), "heatmap".into()],
        classes: vec!["tree".into()],
        detection: Default::default(),
        threads: 2,
        link: Default::default(),
        mavlink: Default::default(),
    };
    fuzz("bundle_config", &[toml::to_string_pretty(&cfg).unwrap().into_bytes()]);
    let sums = format!("{}  model.onnx\n{}  onboard.toml\n", "ab".repeat(32), "0f".repeat(32));
    fuzz("bundle_sums", &[sums.into_bytes()]);
}

/// Builds a `torch.save`-layout zip around a pickle.
fn pth_with_pickle(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut out);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    out.into_inner()
}

/// `{'w': _rebuild_tensor_v2(storage('0', FloatStorage, 1 element), 0, shape, stride)}`.
fn tensor_pickle(shape: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'(', 0x8c, 1, b'w'];
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    // persistent id ('storage', torch.FloatStorage, '0', 'cpu', 1)
    p.extend_from_slice(b"(\x8c\x07storagectorch\nFloatStorage\n\x8c\x010\x8c\x03cpuK\x01tQ");
    p.extend_from_slice(b"K\x00"); // offset
    let ints = |p: &mut Vec<u8>, v: &[u64]| {
        p.push(b'(');
        for &x in v {
            p.push(0x8a);
            p.push(8);
            p.extend_from_slice(&x.to_le_bytes());
        }
        p.push(b't');
    };
    ints(&mut p, shape);
    ints(&mut p, stride);
    // requires_grad False, backward hooks None; close the args, REDUCE, SETITEMS, STOP.
    p.extend_from_slice(b"\x89NtRu.");
    p
}

#[test]
fn a_stride_0_view_with_a_huge_shape_is_an_error_not_an_abort() {
    let storage = 1.5f32.to_le_bytes();
    // 2^20 x 2^20 elements over one stored float, 48 bytes of pickle.
    let f = pth_with_pickle(&tensor_pickle(&[1 << 20, 1 << 20], &[0, 0]), &[("0", &storage)]);
    let (r, peak) = peak_of(|| readers::pth(&f));
    let e = r.expect_err("must be refused");
    assert!(e.contains("tensor `w`") && e.contains("elements over a storage of 1"), "{e}");
    assert!(peak < 8 * MIB_U, "held {peak} bytes");
    // A shape whose product overflows usize.
    let f = pth_with_pickle(&tensor_pickle(&[1 << 40, 1 << 40], &[0, 0]), &[("0", &storage)]);
    let e = readers::pth(&f).expect_err("must be refused");
    assert!(e.contains("overflows"), "{e}");
    // A legal broadcast view within the bound still loads.
    let f = pth_with_pickle(&tensor_pickle(&[4, 3], &[0, 0]), &[("0", &storage)]);
    let t = flsl_train::pth::parse_pth_bytes(&f, std::path::Path::new("b.pth")).unwrap();
    assert_eq!(t.tensors["w"].to_f32(), vec![1.5; 12]);
}

const MIB_U: u64 = 1 << 20;

#[test]
fn two_hundred_thousand_nested_lists_are_an_error_not_a_stack_overflow() {
    // PROTO 2, then `]` (EMPTY_LIST) and `a` (APPEND) nest each list in the previous one.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 200_000));
    p.extend(std::iter::repeat_n(b'a', 199_999));
    p.push(b'.');
    let f = pth_with_pickle(&p, &[]);
    // On a 1 MiB stack: the old reader overflowed the main thread's 8 MiB.
    let e = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || readers::pth(&f))
        .unwrap()
        .join()
        .expect("no stack overflow")
        .expect_err("must be refused");
    assert!(e.contains("nested deeper than 256"), "{e}");
    // MARK + LIST nesting too.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', 200_000));
    p.extend(std::iter::repeat_n(b'l', 200_000));
    p.push(b'.');
    let f = pth_with_pickle(&p, &[]);
    let e = readers::pth(&f).expect_err("must be refused");
    assert!(e.contains("nested deeper"), "{e}");
}

#[test]
fn an_archive_entry_larger_than_its_file_is_refused_before_reading() {
    // A deflated entry of 64 MiB of zeros (a zip bomb: 64 KiB on disk).
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut out);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(&vec![0u8; 64 << 20]).unwrap();
    z.finish().unwrap();
    let f = out.into_inner();
    let (r, peak) = peak_of(|| readers::pth(&f));
    let e = r.expect_err("must be refused");
    assert!(e.contains("more than the whole file"), "{e}");
    assert!(peak < 8 * MIB_U, "held {peak} bytes for a {} byte file", f.len());
}
