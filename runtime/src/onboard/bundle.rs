//! Model bundles: what `flsl bundle` writes on the host and `flsl-onboard --bundle` runs.
//!
//! A bundle is a folder of exactly three files:
//!
//! ```text
//! model.onnx      the (int8 or fp32) model
//! onboard.toml    input size and normalization, outputs, class names, thresholds, link settings
//! SHA256SUMS      `sha256sum` format (`<hex>  <file>`): `sha256sum -c SHA256SUMS` checks it too
//! ```
//!
//! [`Bundle::load`] verifies every checksum before it parses anything else, then parses
//! `onboard.toml` strictly (an unknown or missing field is named), and checks its values.

use crate::error::Invalid;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::OnboardError;
use super::mavlink::MavlinkConfig;
use crate::contract::{IMAGENET_MEAN, IMAGENET_STD};

/// The model file of a bundle.
pub const MODEL_FILE: &str = "model.onnx";
/// The settings file of a bundle.
pub const CONFIG_FILE: &str = "onboard.toml";
/// The checksum file of a bundle.
pub const SUMS_FILE: &str = "SHA256SUMS";
/// The bundle format this build reads and writes.
pub const FORMAT: u32 = 1;
/// Largest `onboard.toml` / `SHA256SUMS` read (bytes).
const MAX_TEXT: u64 = 1 << 20;

/// `onboard.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// Bundle format version ([`FORMAT`]).
    pub format: u32,
    /// Model input.
    pub input: InputConfig,
    /// The model's output names, in order (checked against the model when it loads).
    pub outputs: Vec<String>,
    /// Class names of the detection head, by class index (empty without one).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Post-process thresholds.
    pub detection: DetectionConfig,
    /// tract threads.
    #[serde(default = "one")]
    pub threads: usize,
    /// Link defaults (the command line overrides them).
    #[serde(default)]
    pub link: LinkConfig,
    /// MAVLink settings (ids, rate, gimbal); used with `--mavlink` or `mavlink.target`.
    #[serde(default)]
    pub mavlink: MavlinkConfig,
}

fn one() -> usize {
    1
}

/// `[input]` of `onboard.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Input height in pixels.
    pub height: usize,
    /// Input width in pixels.
    pub width: usize,
    /// Channel means (R, G, B) in `[0, 1]` units.
    #[serde(default = "imagenet_mean")]
    pub mean: [f32; 3],
    /// Channel standard deviations (R, G, B) in `[0, 1]` units.
    #[serde(default = "imagenet_std")]
    pub std: [f32; 3],
}

fn imagenet_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn imagenet_std() -> [f32; 3] {
    IMAGENET_STD
}

/// `[detection]` of `onboard.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionConfig {
    /// Least detection score.
    pub score_threshold: f32,
    /// k-means clusters when the model has no prototype logits.
    pub kmeans_k: usize,
    /// Mean-shift refinement of the features before clustering.
    pub meanshift: bool,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        Self { score_threshold: 0.3, kmeans_k: 8, meanshift: false }
    }
}

/// `[link]` of `onboard.toml`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Serial device for the wire frames (`/dev/ttyTHS1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Baud rate of the serial device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baud: Option<u32>,
    /// UDP address for the wire frames (`192.168.1.10:14600`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<String>,
}

/// A verified bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The folder.
    pub dir: PathBuf,
    /// Its `onboard.toml`.
    pub config: BundleConfig,
}

impl Bundle {
    /// The model file.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }

    /// Verifies the checksums of `dir`, then reads and checks `onboard.toml`.
    pub fn load(dir: &Path) -> Result<Self, OnboardError> {
        let bad = |reason: String| OnboardError::Bundle { dir: dir.to_path_buf(), reason };
        if !dir.is_dir() {
            return Err(bad(
                "no such folder (make one with `flsl bundle --model M.onnx --out DIR`)".into(),
            ));
        }
        let sums = read_text(dir, SUMS_FILE)?;
        let listed = parse_sums(&sums).map_err(bad)?;
        for need in [MODEL_FILE, CONFIG_FILE] {
            if !listed.iter().any(|(_, n)| n == need) {
                return Err(bad(format!("{SUMS_FILE} does not list {need}")));
            }
        }
        for (hex, name) in &listed {
            let got = sha256_file(&dir.join(name))?;
            if &got != hex {
                return Err(OnboardError::Checksum {
                    dir: dir.to_path_buf(),
                    file: name.clone(),
                    expected: hex.clone(),
                    got,
                });
            }
        }
        let text = read_text(dir, CONFIG_FILE)?;
        let config = BundleConfig::parse(&text).map_err(|e| bad(format!("{CONFIG_FILE}: {e}")))?;
        Ok(Self { dir: dir.to_path_buf(), config })
    }
}

/// Parses a `SHA256SUMS` file (`sha256sum` format): `(lowercase hex, file name)` per line, each
/// name a plain file of the bundle folder.
pub fn parse_sums(sums: &str) -> Result<Vec<(String, String)>, String> {
    let mut listed = Vec::new();
    for (i, line) in sums.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (hex, name) =
            line.split_once("  ").or_else(|| line.split_once(" *")).ok_or_else(|| {
                format!("{SUMS_FILE} line {}: expected `<sha256 hex>  <file>`", i + 1)
            })?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{SUMS_FILE} line {}: `{hex}` is not a SHA-256 in hex", i + 1));
        }
        if name.contains('/') || name.contains('\\') || name == ".." || name.is_empty() {
            return Err(format!(
                "{SUMS_FILE} line {}: `{name}` is not a file of the bundle folder",
                i + 1
            ));
        }
        listed.push((hex.to_ascii_lowercase(), name.to_string()));
    }
    Ok(listed)
}

impl BundleConfig {
    /// Parses and validates the text of `onboard.toml`.
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values (not only their types); the error names the field.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.format != FORMAT {
            return Err(Invalid::from(format!(
                "format = {}: this flsl-onboard reads format {FORMAT}",
                self.format
            )));
        }
        let i = &self.input;
        if i.height == 0 || i.width == 0 || i.height > 8192 || i.width > 8192 {
            return Err(Invalid::from(format!(
                "input.height x input.width = {} x {}: expected 1..=8192 each",
                i.height, i.width
            )));
        }
        if !i.mean.iter().all(|m| m.is_finite()) {
            return Err(Invalid::from(format!("input.mean = {:?}: not finite", i.mean)));
        }
        if !i.std.iter().all(|s| s.is_finite() && *s > 0.0) {
            return Err(Invalid::from(format!(
                "input.std = {:?}: expected finite values > 0",
                i.std
            )));
        }
        if self.outputs.is_empty() {
            return Err(Invalid::from(
                "outputs is empty: a model has at least its features output",
            ));
        }
        let d = &self.detection;
        if !(0.0..=1.0).contains(&d.score_threshold) {
            return Err(Invalid::from(format!(
                "detection.score_threshold = {}: expected 0..=1",
                d.score_threshold
            )));
        }
        if d.kmeans_k == 0 || d.kmeans_k > 64 {
            return Err(Invalid::from(format!(
                "detection.kmeans_k = {}: expected 1..=64",
                d.kmeans_k
            )));
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(Invalid::from(format!("threads = {}: expected 1..=256", self.threads)));
        }
        if self.link.baud == Some(0) {
            return Err(Invalid::from("link.baud = 0"));
        }
        self.mavlink.validate()
    }
}

fn read_text(dir: &Path, name: &str) -> Result<String, OnboardError> {
    let path = dir.join(name);
    let f = std::fs::File::open(&path).map_err(|e| OnboardError::Io {
        action: "reading",
        path: path.clone(),
        source: e,
    })?;
    let mut s = String::new();
    f.take(MAX_TEXT + 1).read_to_string(&mut s).map_err(|e| OnboardError::Io {
        action: "reading (as UTF-8 text)",
        path: path.clone(),
        source: e,
    })?;
    if s.len() as u64 > MAX_TEXT {
        return Err(OnboardError::Bundle {
            dir: dir.to_path_buf(),
            reason: format!("{name} is larger than {MAX_TEXT} bytes"),
        });
    }
    Ok(s)
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, OnboardError> {
    let mut f = std::fs::File::open(path).map_err(|e| OnboardError::Io {
        action: "reading",
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| OnboardError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `flsl bundle` settings.
#[cfg(feature = "tools")]
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// Class names of the detection head (default `class0`, `class1`, ...).
    pub classes: Vec<String>,
    /// Post-process settings.
    pub detection: DetectionConfig,
    /// tract threads on the companion computer.
    pub threads: usize,
    /// Link defaults.
    pub link: LinkConfig,
    /// Input size `(H, W)` for a model with a symbolic input size.
    pub input_size: Option<(usize, usize)>,
    /// MAVLink settings.
    pub mavlink: MavlinkConfig,
}

#[cfg(feature = "tools")]
impl Default for BundleOptions {
    fn default() -> Self {
        Self {
            classes: Vec::new(),
            detection: DetectionConfig::default(),
            threads: 1,
            link: LinkConfig::default(),
            input_size: None,
            mavlink: MavlinkConfig::default(),
        }
    }
}

/// Writes a bundle for `model` into `out` (host tooling): loads the model in tract (so a model
/// the onboard engine cannot run is refused here), records its input size and outputs, copies
/// it, writes `onboard.toml` and `SHA256SUMS` into a temporary folder beside `out`, and renames
/// that folder into place (an existing bundle at `out` is replaced only once the new one is
/// complete).
#[cfg(feature = "tools")]
pub fn write_bundle(
    model: &Path,
    out: &Path,
    opts: &BundleOptions,
) -> Result<Bundle, OnboardError> {
    use crate::contract::HEATMAP_NAME;
    use crate::onnx::{ModelOptions, OnnxModel};

    let mut mopts = ModelOptions::new();
    if let Some((h, w)) = opts.input_size {
        mopts = mopts.with_input_size(h, w);
    }
    let mut m = OnnxModel::load(model, mopts)?;
    let [_, _, height, width] = m.input_shape();
    let outputs = m.output_names().to_vec();
    let classes = if outputs.iter().any(|o| o == HEATMAP_NAME) {
        m.input_mut()?.fill(0.0);
        m.run()?;
        let c = m.output_f32(HEATMAP_NAME).map_or(0, |(s, _)| s.get(1).copied().unwrap_or(0));
        if opts.classes.is_empty() {
            (0..c).map(|i| format!("class{i}")).collect()
        } else if opts.classes.len() != c {
            return Err(OnboardError::Bundle {
                dir: out.to_path_buf(),
                reason: format!(
                    "{} class names given, the detection head of {} has {c} classes",
                    opts.classes.len(),
                    model.display()
                ),
            });
        } else {
            opts.classes.clone()
        }
    } else {
        opts.classes.clone()
    };
    let norm = m.options().normalization;
    let config = BundleConfig {
        format: FORMAT,
        input: InputConfig { height, width, mean: norm.mean, std: norm.std },
        outputs,
        classes,
        detection: opts.detection.clone(),
        threads: opts.threads,
        link: opts.link.clone(),
        mavlink: opts.mavlink.clone(),
    };
    config
        .validate()
        .map_err(|e| OnboardError::Bundle { dir: out.to_path_buf(), reason: e.reason })?;
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e| OnboardError::Io { action, path, source: e }
    };
    let name =
        out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "bundle".into());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    let result = (|| {
        std::fs::copy(model, tmp.join(MODEL_FILE))
            .map_err(io("copying the model to", &tmp.join(MODEL_FILE)))?;
        let text = format!(
            "# flsl-onboard bundle: written by `flsl bundle` from {}.\n# Checked by SHA256SUMS: edit, then run `sha256sum {MODEL_FILE} {CONFIG_FILE} > {SUMS_FILE}`.\n{}",
            model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            toml::to_string_pretty(&config).map_err(|e| OnboardError::Bundle {
                dir: out.to_path_buf(),
                reason: format!("serializing {CONFIG_FILE}: {e}")
            })?
        );
        std::fs::write(tmp.join(CONFIG_FILE), text)
            .map_err(io("writing", &tmp.join(CONFIG_FILE)))?;
        let mut sums = String::new();
        for f in [MODEL_FILE, CONFIG_FILE] {
            sums.push_str(&format!("{}  {f}\n", sha256_file(&tmp.join(f))?));
        }
        std::fs::write(tmp.join(SUMS_FILE), sums).map_err(io("writing", &tmp.join(SUMS_FILE)))?;
        for f in [MODEL_FILE, CONFIG_FILE, SUMS_FILE] {
            std::fs::File::open(tmp.join(f))
                .and_then(|f| f.sync_all())
                .map_err(io("syncing", &tmp.join(f)))?;
        }
        Bundle::load(&tmp)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Replace an existing bundle only now: move it aside, move the new one in, drop the old.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        if !out.join(SUMS_FILE).is_file()
            && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true)
        {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(OnboardError::Bundle {
                dir: out.to_path_buf(),
                reason: "exists and is not a bundle; refusing to replace it".into(),
            });
        }
        std::fs::rename(out, &old).map_err(io("moving the previous bundle aside from", out))?;
    }
    std::fs::rename(&tmp, out).map_err(io("moving the new bundle to", out))?;
    let _ = std::fs::remove_dir_all(&old);
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Bundle::load(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, config: &str, model: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(MODEL_FILE), model).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
        let sums = format!(
            "{}  {MODEL_FILE}\n{}  {CONFIG_FILE}\n",
            sha256_file(&dir.join(MODEL_FILE)).unwrap(),
            sha256_file(&dir.join(CONFIG_FILE)).unwrap()
        );
        std::fs::write(dir.join(SUMS_FILE), sums).unwrap();
    }

    const GOOD: &str = "format = 1\noutputs = [\"features\"]\nthreads = 2\n[input]\nheight = 64\nwidth = 96\n[detection]\nscore_threshold = 0.3\nkmeans_k = 8\nmeanshift = false\n[link]\nserial = \"/dev/ttyTHS1\"\nbaud = 921600\n";

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flsl-bundle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_good_bundle_loads_with_defaults_filled_in() {
        let d = tmp("good");
        write(&d, GOOD, b"onnx bytes");
        let b = Bundle::load(&d).unwrap();
        assert_eq!((b.config.input.height, b.config.input.width, b.config.threads), (64, 96, 2));
        assert_eq!(b.config.input.mean, IMAGENET_MEAN);
        assert_eq!(b.config.link.baud, Some(921_600));
        assert_eq!(b.model_path(), d.join(MODEL_FILE));
        assert_eq!(b.config.mavlink, MavlinkConfig::default());
        let with_mavlink = format!(
            "{GOOD}[mavlink]\ntarget = \"udpout:10.0.0.2:14550\"\ncomponent_id = 154\nrate_hz = 5.0\n[mavlink.gimbal]\n"
        );
        write(&d, &with_mavlink, b"onnx bytes");
        let m = Bundle::load(&d).unwrap().config.mavlink;
        assert_eq!(
            (m.target.as_deref(), m.system_id, m.component_id, m.rate_hz),
            (Some("udpout:10.0.0.2:14550"), 1, 154, 5.0)
        );
        assert_eq!(m.gimbal.unwrap().pan, crate::onboard::mavlink::GimbalAxis::pan());
    }

    #[test]
    fn corrupted_or_malformed_bundles_are_refused_with_the_file_or_field_named() {
        let d = tmp("bad");
        write(&d, GOOD, b"onnx bytes");
        std::fs::write(d.join(MODEL_FILE), b"onnx bytez").unwrap();
        let e = Bundle::load(&d).unwrap_err().to_string();
        assert!(e.contains("model.onnx does not match its SHA-256"), "{e}");

        write(&d, &GOOD.replace("kmeans_k = 8", "kmeans_k = 0"), b"m");
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("detection.kmeans_k = 0"));
        write(&d, &GOOD.replace("threads = 2", "threads = 2\ncolour = 1"), b"m");
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("colour"));
        write(&d, &GOOD.replace("height = 64\n", ""), b"m");
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("height"));
        write(&d, &format!("{GOOD}[mavlink]\ntarget = \"udpout:nowhere\"\n"), b"m");
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("mavlink.target"));
        write(&d, &format!("{GOOD}[mavlink]\nrate_hz = -1.0\n"), b"m");
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("mavlink.rate_hz"));
        write(&d, &GOOD.replace("format = 1", "format = 9"), b"m");
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("format = 9"));

        write(&d, GOOD, b"m");
        std::fs::write(d.join(SUMS_FILE), "abc  model.onnx\n").unwrap();
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("is not a SHA-256"));
        std::fs::write(d.join(SUMS_FILE), format!("{}  ../etc/passwd\n", "0".repeat(64))).unwrap();
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("not a file of the bundle"));
        std::fs::write(
            d.join(SUMS_FILE),
            format!("{}  {MODEL_FILE}\n", sha256_file(&d.join(MODEL_FILE)).unwrap()),
        )
        .unwrap();
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("does not list onboard.toml"));
        std::fs::remove_file(d.join(SUMS_FILE)).unwrap();
        assert!(Bundle::load(&d).unwrap_err().to_string().contains("SHA256SUMS"));
        assert!(Bundle::load(&d.join("nope")).unwrap_err().to_string().contains("no such folder"));
    }
}
