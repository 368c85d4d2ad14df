//! Image-folder datasets and a multi-threaded, reproducible augmentation loader.
//!
//! [`ImageFolder::scan`] walks a folder recursively for JPEG/PNG files (optionally cutting
//! large aerial images into tiles). [`Loader`] decodes and augments on worker threads; every
//! sample's random stream is derived from `(seed, epoch, position)`, so batches do not depend
//! on thread timing, and an unreadable image is skipped with a warning naming it (never a
//! crash) and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{Tensor, TensorData, backend::Backend};
use image::RgbImage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::augment::{AugmentConfig, Sample, augment};
use crate::error::{Error, Result};
use crate::meanshift::TokenSelection;
use crate::step::View;

/// One training item: a file, or a tile of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Source file.
    pub path: PathBuf,
    /// `(x, y, w, h)` tile in pixels, or the whole image.
    pub tile: Option<(u32, u32, u32, u32)>,
}

/// A folder of images.
#[derive(Debug)]
pub struct ImageFolder {
    /// Items in a stable order.
    pub items: Vec<Item>,
    /// Files that could not be read while scanning, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    cache: Vec<OnceLock<Option<Arc<RgbImage>>>>,
    file_index: Vec<usize>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list image folder", dir, e))?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Scans `root` recursively. With `tile`, images larger than 1.5 tiles in a dimension are
    /// cut into a grid of about `tile`-pixel tiles (aerial orthophotos).
    pub fn scan(root: &Path, tile: Option<u32>) -> Result<Self> {
        Self::scan_excluding(root, tile, &[])
    }

    /// Like [`ImageFolder::scan`], leaving out files whose name is in `exclude`.
    pub fn scan_excluding(root: &Path, tile: Option<u32>, exclude: &[String]) -> Result<Self> {
        let mut files = Vec::new();
        walk(root, &mut files)?;
        files.retain(|p| {
            !p.file_name().is_some_and(|n| exclude.iter().any(|e| n.to_string_lossy() == *e))
        });
        Self::from_files(&files, tile)
    }

    /// Builds a dataset from explicit files.
    pub fn from_files(files: &[PathBuf], tile: Option<u32>) -> Result<Self> {
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        let mut file_index = Vec::new();
        let mut n_files = 0;
        for p in files {
            let dims = match image::image_dimensions(p) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("skipping unreadable image {}: {e}", p.display());
                    skipped.push((p.clone(), e.to_string()));
                    continue;
                }
            };
            let (w, h) = dims;
            match tile {
                Some(t) if t > 0 && (w as f32 > 1.5 * t as f32 || h as f32 > 1.5 * t as f32) => {
                    let nx = (w as f32 / t as f32).round().max(1.0) as u32;
                    let ny = (h as f32 / t as f32).round().max(1.0) as u32;
                    for iy in 0..ny {
                        for ix in 0..nx {
                            let (x0, x1) = (ix * w / nx, (ix + 1) * w / nx);
                            let (y0, y1) = (iy * h / ny, (iy + 1) * h / ny);
                            items.push(Item {
                                path: p.clone(),
                                tile: Some((x0, y0, x1 - x0, y1 - y0)),
                            });
                            file_index.push(n_files);
                        }
                    }
                }
                _ => {
                    items.push(Item { path: p.clone(), tile: None });
                    file_index.push(n_files);
                }
            }
            n_files += 1;
        }
        let cache = (0..n_files).map(|_| OnceLock::new()).collect();
        Ok(Self { items, skipped, cache, file_index })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there is no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Decodes item `i` (files are decoded once and kept when the dataset has at most 64 files).
    pub fn load(&self, i: usize) -> Result<RgbImage> {
        let item = self.items.get(i).ok_or_else(|| Error::Config {
            key: "dataset item".into(),
            reason: format!("{i} is out of range ({} items)", self.items.len()),
        })?;
        let bad = |reason: String| Error::malformed("image", &item.path, reason);
        let decode = || -> std::result::Result<RgbImage, String> {
            let img = flsl_runtime::preprocess::decode_image_file(&item.path)
                .map_err(|e| e.to_string())?;
            Ok(img.to_rgb8())
        };
        let full: Arc<RgbImage> = if self.cache.len() <= 64 {
            let slot = &self.cache[self.file_index[i]];
            match slot.get_or_init(|| decode().ok().map(Arc::new)) {
                Some(img) => img.clone(),
                None => {
                    return Err(bad(decode().err().unwrap_or_else(|| "cannot decode".into())));
                }
            }
        } else {
            Arc::new(decode().map_err(bad)?)
        };
        Ok(match item.tile {
            Some((x, y, w, h)) => {
                if x + w > full.width() || y + h > full.height() {
                    return Err(bad(format!(
                        "tile outside the image ({}x{})",
                        full.width(),
                        full.height()
                    )));
                }
                image::imageops::crop_imm(&*full, x, y, w, h).to_image()
            }
            None => (*full).clone(),
        })
    }
}

/// Writes `n` square PNGs of `side` pixels, `scene00.png`...: two-colour scenes (a disc on a
/// background) with colours and positions derived from the index. Data for tests and examples
/// that must train without a dataset.
pub fn write_synthetic_scenes(dir: &Path, n: usize, side: u32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let s = side as f32 / 48.0;
    for i in 0..n {
        let (cx, cy, r) = (
            (12.0 + (i * 7 % 24) as f32) * s,
            (14.0 + (i * 5 % 20) as f32) * s,
            (9.0 + (i % 4) as f32) * s,
        );
        let fg = [(40 + i * 37 % 200) as u8, (200 - i * 23 % 150) as u8, 60];
        let bg = [120, (90 + i * 11 % 100) as u8, (200 - i * 17 % 120) as u8];
        let img = RgbImage::from_fn(side, side, |x, y| {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            image::Rgb(if d < r { fg } else { bg })
        });
        let path = dir.join(format!("scene{i:02}.png"));
        img.save(&path).map_err(|e| Error::malformed("png", &path, e.to_string()))?;
    }
    Ok(())
}

/// The repository's embedded demo images.
pub fn default_data() -> PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../data/neon-aerial-trees/images")
}

/// A batch of augmented samples, teacher view first.
#[derive(Debug)]
pub struct Batch {
    /// Per sample, its views.
    pub samples: Vec<Sample>,
    /// Dataset positions of the samples.
    pub indices: Vec<usize>,
}

/// What the loader skipped during an epoch.
#[derive(Debug, Default, Clone)]
pub struct EpochStats {
    /// Items that could not be decoded (path and reason).
    pub skipped: Vec<(PathBuf, String)>,
}

/// The sample order of an epoch (a seeded shuffle).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// The random stream of one sample.
pub fn sample_rng(seed: u64, epoch: usize, position: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x5851_F42D_4C95_7F2D));
    rng.set_stream(((epoch as u64) << 32) | position as u64);
    rng
}

/// Multi-threaded augmentation of one epoch, yielding batches in a fixed order.
pub struct Loader {
    rx: mpsc::Receiver<(usize, std::result::Result<Sample, String>)>,
    pending: BTreeMap<usize, std::result::Result<Sample, String>>,
    next: usize,
    total: usize,
    batch_size: usize,
    order: Arc<Vec<usize>>,
    dataset: Arc<ImageFolder>,
    /// Skipped items so far.
    pub stats: EpochStats,
    consumed: Arc<AtomicUsize>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts `workers` threads augmenting the epoch's samples; `skip_batches` full batches
    /// are skipped (resume in the middle of an epoch).
    // The loader's settings, one argument each (a settings struct is issue 22's layout work).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dataset: Arc<ImageFolder>,
        cfg: AugmentConfig,
        patch_size: usize,
        batch_size: usize,
        epoch_len: usize,
        seed: u64,
        epoch: usize,
        workers: usize,
        skip_batches: usize,
    ) -> Self {
        let n = dataset.len();
        let order: Vec<usize> = if n == 0 {
            Vec::new()
        } else {
            // An epoch of `epoch_len` samples cycles through reshuffled passes over the items.
            let mut o = Vec::with_capacity(epoch_len);
            let mut pass = 0;
            while o.len() < epoch_len {
                o.extend(epoch_order(n, seed.wrapping_add(pass as u64 * 7919), epoch));
                pass += 1;
            }
            o.truncate(epoch_len);
            o
        };
        let order = Arc::new(order);
        let total = order.len();
        let start = (skip_batches * batch_size).min(total);
        let counter = Arc::new(AtomicUsize::new(start));
        let consumed = Arc::new(AtomicUsize::new(start));
        let prefetch = (batch_size * 3).max(8);
        let (tx, rx) = mpsc::channel();
        let cfg = Arc::new(cfg);
        let mut handles = Vec::new();
        for _ in 0..workers.max(1) {
            let (tx, counter, consumed, order, dataset, cfg) = (
                tx.clone(),
                counter.clone(),
                consumed.clone(),
                order.clone(),
                dataset.clone(),
                cfg.clone(),
            );
            handles.push(std::thread::spawn(move || {
                loop {
                    let pos = counter.fetch_add(1, Ordering::SeqCst);
                    if pos >= order.len() {
                        break;
                    }
                    // Bounded prefetch: do not run far ahead of the consumer.
                    while pos >= consumed.load(Ordering::SeqCst) + prefetch {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    let item = order[pos];
                    let mut rng = sample_rng(seed, epoch, pos);
                    let r = dataset
                        .load(item)
                        .map(|img| augment(&img, &cfg, patch_size, &mut rng))
                        .map_err(|e| e.to_string());
                    if tx.send((pos, r)).is_err() {
                        break;
                    }
                }
            }));
        }
        Self {
            rx,
            pending: BTreeMap::new(),
            next: start,
            total,
            batch_size,
            order,
            dataset,
            stats: EpochStats::default(),
            consumed,
            workers: handles,
        }
    }

    fn next_sample(&mut self) -> Option<(usize, Sample)> {
        while self.next < self.total {
            let pos = self.next;
            let r = loop {
                if let Some(r) = self.pending.remove(&pos) {
                    break r;
                }
                match self.rx.recv() {
                    Ok((p, r)) => {
                        self.pending.insert(p, r);
                    }
                    Err(_) => return None,
                }
            };
            self.next += 1;
            self.consumed.store(self.next, Ordering::SeqCst);
            let item = self.order[pos];
            match r {
                Ok(s) => return Some((item, s)),
                Err(why) => {
                    let path = self.dataset.items[item].path.clone();
                    tracing::warn!("skipping unreadable image {}: {why}", path.display());
                    self.stats.skipped.push((path, why));
                }
            }
        }
        None
    }
}

impl Iterator for Loader {
    type Item = Batch;

    /// The next full batch (an incomplete last batch is dropped, as `drop_last=True`).
    fn next(&mut self) -> Option<Batch> {
        let mut samples = Vec::with_capacity(self.batch_size);
        let mut indices = Vec::with_capacity(self.batch_size);
        while samples.len() < self.batch_size {
            let (i, s) = self.next_sample()?;
            samples.push(s);
            indices.push(i);
        }
        Some(Batch { samples, indices })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Let workers finish: they stop at the end of the order or when the channel closes.
        self.consumed.store(usize::MAX / 2, Ordering::SeqCst);
        let (_, rx) = mpsc::channel();
        drop(std::mem::replace(&mut self.rx, rx));
        for h in self.workers.drain(..) {
            // A worker that panicked has nothing left to clean up.
            let _ = h.join();
        }
    }
}

/// Shared counter of skipped files, for summaries across epochs.
pub type SkipLog = Arc<Mutex<Vec<(PathBuf, String)>>>;

/// Stacks one view of every sample into device tensors.
pub fn batch_views<B: Backend>(batch: &Batch, device: &B::Device) -> Result<Vec<View<B>>> {
    let first =
        batch.samples.first().ok_or(Error::Shape { op: "batch", reason: "empty batch".into() })?;
    let n_views = first.views.len();
    let bt = batch.samples.len();
    (0..n_views)
        .map(|v| {
            let size = first.views[v].size as usize;
            let mut pixels = Vec::with_capacity(bt * 3 * size * size);
            let mut masks = Vec::new();
            let mut crops = Vec::new();
            for s in &batch.samples {
                pixels.extend_from_slice(&s.views[v].pixels);
                if let Some(m) = &s.views[v].mask {
                    masks.extend_from_slice(m);
                }
                if let Some(c) = &s.views[v].crop {
                    crops.extend_from_slice(c);
                }
            }
            let images = Tensor::from_data(TensorData::new(pixels, [bt, 3, size, size]), device);
            let mask = if masks.is_empty() {
                None
            } else {
                Some(TokenSelection::from_mask(&masks, bt, masks.len() / bt)?)
            };
            let crops = (crops.len() == bt * 3 * size * size)
                .then(|| Tensor::from_data(TensorData::new(crops, [bt, 3, size, size]), device));
            Ok(View { images, mask, crops })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_with(n: usize, corrupt: &[usize]) -> (PathBuf, ImageFolder) {
        let dir = std::env::temp_dir().join(format!(
            "flsl-data-{}-{n}-{}",
            std::process::id(),
            corrupt.len()
        ));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for i in 0..n {
            let p = dir.join("sub").join(format!("img{i:02}.png"));
            if corrupt.contains(&i) {
                // A valid PNG header with a truncated body: the header reads, decoding fails.
                let img = RgbImage::from_pixel(40, 40, image::Rgb([9, 9, 9]));
                let mut bytes = Vec::new();
                img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
                    .unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            } else {
                RgbImage::from_fn(40, 40, |x, y| {
                    image::Rgb([(x * 6) as u8, (y * 6) as u8, i as u8])
                })
                .save(&p)
                .unwrap();
            }
        }
        std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
        let ds = ImageFolder::scan(&dir, None).unwrap();
        (dir, ds)
    }

    fn cfg() -> AugmentConfig {
        AugmentConfig {
            global_resize: 32,
            local_resize: 16,
            sampling_window_size_g: 2,
            sampling_window_size_l: 1,
            ..Default::default()
        }
    }

    #[test]
    fn corrupt_images_are_skipped_and_counted() {
        let (dir, ds) = folder_with(6, &[2]);
        assert_eq!(ds.len(), 6, "the header of the corrupt file still reads");
        let mut loader = Loader::new(Arc::new(ds), cfg(), 8, 2, 6, 1, 0, 2, 0);
        let batches: Vec<Batch> = loader.by_ref().collect();
        assert_eq!(batches.len(), 2, "5 good samples make 2 full batches of 2");
        assert_eq!(loader.stats.skipped.len(), 1);
        assert!(loader.stats.skipped[0].0.ends_with("img02.png"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn batches_do_not_depend_on_the_number_of_workers() {
        let (dir, ds) = folder_with(5, &[]);
        let ds = Arc::new(ds);
        let a: Vec<Batch> = Loader::new(ds.clone(), cfg(), 8, 2, 5, 3, 1, 1, 0).collect();
        let b: Vec<Batch> = Loader::new(ds.clone(), cfg(), 8, 2, 5, 3, 1, 3, 0).collect();
        assert_eq!(a.len(), 2);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.indices, y.indices);
            assert_eq!(x.samples[0].views[1].pixels, y.samples[0].views[1].pixels);
        }
        // Skipping one batch resumes exactly at the second.
        let c: Vec<Batch> = Loader::new(ds, cfg(), 8, 2, 5, 3, 1, 2, 1).collect();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].indices, a[1].indices);
        assert_eq!(c[0].samples[1].views[0].pixels, a[1].samples[1].views[0].pixels);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
