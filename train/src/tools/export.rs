//! `flsl export`: a checkpoint (ours or the official code's) -> a standard ONNX file.
//!
//! No burn here: weights are read as reference-named host tensors
//! ([`checkpoint::read_weights`]), the position table is resized for the export size with the
//! very function training uses ([`interpolate_pos_embed`], the reference's `+0.1` bicubic
//! rule), and the graph is written by `flsl_runtime::export` (tract's ONNX protobuf types),
//! so the file a drone runs never went through a training framework's exporter.
//!
//! Sources, in order of preference:
//! - a checkpoint folder of ours (`config.json` + `teacher.safetensors`; also `.../latest`
//!   or the run's output folder): the architecture comes from `config.json`;
//! - a weights file (`.safetensors` of ours, or the official code's `.pth` training checkpoint
//!   or state dict): the architecture is read from the tensor shapes; the head count, which
//!   shapes cannot tell, defaults to `D / 64` (ViT-Ti 3, ViT-S 6, ViT-B 12) or `--heads`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flsl_runtime::export::{HeadSpec, HostTensors, VitSpec};

use crate::checkpoint::{Part, backbone_shape, read_weights};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::vit::interpolate_pos_embed;
use crate::tensors::{TensorMap, write_atomic};

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Input height and width in pixels (multiples of the patch size).
    pub size: (usize, usize),
    /// Also export the FLSL head as `prototype_logits`.
    pub with_head: bool,
    /// Teacher (default, what the reference evaluates) or student.
    pub part: Part,
    /// Attention heads, when the source has no `config.json`.
    pub heads: Option<usize>,
    /// A detector folder (`flsl train-detector` output) whose head is appended as the
    /// `det_heatmap` and `det_boxes` outputs.
    pub detector: Option<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            size: (224, 224),
            with_head: false,
            part: Part::Teacher,
            heads: None,
            detector: None,
        }
    }
}

/// A backbone (+ head) ready for the exporter: host weights with bare backbone names
/// (`patch_embed.*`, `blocks.*`, `norm.*`) and `head.*`, the architecture, and the position
/// table for the export size.
#[derive(Debug, Clone)]
pub struct ExportSource {
    /// Weights by reference name.
    pub weights: HostTensors,
    /// Architecture and input size.
    pub spec: VitSpec,
    /// `[gh*gw, D]` position table for `spec`'s grid.
    pub pos_embed: Vec<f32>,
    /// Whether `head.*` tensors are present.
    pub has_head: bool,
    /// Where the weights came from.
    pub path: PathBuf,
}

pub use crate::checkpoint::resolve_checkpoint;

/// Reads a checkpoint and prepares it for [`export_onnx`].
pub fn load_source(checkpoint: &Path, opts: &ExportOptions) -> Result<ExportSource> {
    let (file, cfg_path) = resolve_checkpoint(checkpoint, opts.part)?;
    let raw = read_weights(&file, opts.part)?;
    // Backbone tensors lose their `backbone.` prefix; head tensors keep `head.`.
    let wrapped = raw.keys().any(|k| k.starts_with("backbone."));
    let mut map: TensorMap = BTreeMap::new();
    for (k, v) in raw {
        if let Some(rest) = k.strip_prefix("backbone.") {
            map.insert(rest.to_string(), v);
        } else if k.starts_with("head.") || !wrapped {
            map.insert(k, v);
        }
    }
    let shape = backbone_shape(&map, "", &file)?;
    let (d, p) = (shape.dim, shape.patch);
    let heads = match (&cfg_path, opts.heads) {
        (_, Some(h)) => h,
        (Some(c), None) => {
            let text = std::fs::read_to_string(c).map_err(|e| Error::io("cannot read", c, e))?;
            let cfg: TrainConfig = serde_json::from_str(&text)
                .map_err(|e| Error::malformed("json", c, e.to_string()))?;
            cfg.vit_config()?.num_heads
        }
        (None, None) => (d / 64).max(1),
    };
    if heads == 0 || d % heads != 0 {
        return Err(Error::Config {
            key: "heads".into(),
            reason: format!("{heads} heads do not divide the width {d}"),
        });
    }
    let (h, w) = opts.size;
    if h == 0 || w == 0 || h % p != 0 || w % p != 0 {
        return Err(Error::Config {
            key: "size".into(),
            reason: format!("{h}x{w} is not a positive multiple of the patch size {p}"),
        });
    }
    let spec = VitSpec::new(d, shape.depth, heads, p, shape.mlp_hidden, 1e-6, h, w);

    // Position table: drop a class row if the source has one, then resize as training does.
    let pos = map
        .get("pos_embed")
        .ok_or_else(|| Error::MissingTensor { name: "pos_embed".into(), path: file.clone() })?;
    let mut table = pos.to_f32();
    if shape.class_row {
        table.drain(..d);
    }
    let g = shape.grid;
    let (gh, gw) = spec.grid();
    // The reference keeps the table only for the same grid (`npatch == N and w == h`): a
    // 7x28 grid has the token count of 14x14 and still needs the resize.
    let pos_embed =
        if gh == g && gw == g { table } else { interpolate_pos_embed(&table, g, d, gh, gw) };

    let has_head = map.contains_key("head.mlp.0.weight");
    let weights: HostTensors = map
        .iter()
        .filter(|(k, _)| k.as_str() != "pos_embed")
        .map(|(k, v)| (k.clone(), (v.shape.clone(), v.to_f32())))
        .collect();
    Ok(ExportSource { weights, spec, pos_embed, has_head, path: file })
}

/// The ONNX bytes for a prepared source, optionally with a detection head's weights
/// (`det.*`, see `flsl_runtime::export_det`).
pub fn export_onnx(
    src: &ExportSource,
    with_head: bool,
    detector: Option<&HostTensors>,
) -> Result<Vec<u8>> {
    use prost::Message;
    if with_head && !src.has_head {
        return Err(Error::MissingTensor {
            name: "head.mlp.0.weight (asked for --with-head)".into(),
            path: src.path.clone(),
        });
    }
    let head = with_head.then(HeadSpec::default);
    let err = |e: flsl_runtime::export::ExportError| Error::runtime("onnx export", e);
    let mut proto = flsl_runtime::export::vit_model_proto(
        &src.weights,
        &src.spec,
        &src.pos_embed,
        head.as_ref(),
    )
    .map_err(err)?;
    if let Some(det) = detector {
        flsl_runtime::export_det::append_det_head(&mut proto, &src.spec, det).map_err(err)?;
    }
    Ok(proto.encode_to_vec())
}

/// The detection head of a `flsl train-detector` folder as exporter weights.
pub fn read_detector_weights(dir: &Path) -> Result<HostTensors> {
    let p = dir.join("det_head.safetensors");
    let map = crate::tensors::read_safetensors(&p)?;
    Ok(map.into_iter().map(|(k, v)| (k, (v.shape.clone(), v.to_f32()))).collect())
}

/// `flsl export`: reads `checkpoint`, writes `out` atomically, returns the prepared source.
pub fn export_checkpoint(
    checkpoint: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportSource> {
    let src = load_source(checkpoint, opts)?;
    let det = opts.detector.as_deref().map(read_detector_weights).transpose()?;
    let bytes = export_onnx(&src, opts.with_head, det.as_ref())?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create folder", dir, e))?;
    }
    write_atomic(out, &bytes)?;
    Ok(src)
}
