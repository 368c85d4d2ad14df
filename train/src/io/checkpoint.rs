//! Loading and saving model weights under the reference's parameter names.
//!
//! Sources: our safetensors files, the official code's `.pth` training checkpoints
//! (`student`/`teacher` dicts with `module.`/`backbone.`/`head.` prefixes) and plain state dicts.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::error::{Error, Result};
use crate::model::named::{self, Missing};
use crate::model::{FlslHead, FlslHeadConfig, Vit};
use crate::pth;
use crate::tensors::{self, TensorMap};

/// Which network of a training checkpoint to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The EMA teacher (the one the reference evaluates).
    Teacher,
    /// The student.
    Student,
}

impl Part {
    fn key(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
        }
    }
}

/// Reads a weights file as reference-named tensors (`.safetensors`, or a `torch.save` file).
///
/// For training checkpoints, `part` selects the network; the `module.` prefix is stripped.
pub fn read_weights(path: &Path, part: Part) -> Result<TensorMap> {
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f =
            std::fs::File::open(path).map_err(|e| Error::io("cannot open weights", path, e))?;
        let n = f.read(&mut head).map_err(|e| Error::io("cannot read weights", path, e))?;
        if n < 4 {
            return Err(Error::malformed("weights", path, format!("file is only {n} bytes long")));
        }
    }
    if &head == b"PK\x03\x04" {
        let file = pth::read_pth(path)?;
        Ok(pth::state_dict(&file, part.key()))
    } else {
        let map = tensors::read_safetensors(path)?;
        // Our training checkpoints store `student.*`/`teacher.*` in one file.
        let has_part = map.keys().any(|k| k.starts_with(&format!("{}.", part.key())));
        Ok(if has_part {
            map.into_iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&format!("{}.", part.key())).map(|s| (s.to_string(), v))
                })
                .collect()
        } else {
            map
        })
    }
}

/// Strips a `backbone.` prefix when the map holds a wrapped model (`backbone.*`/`head.*`).
fn backbone_view(map: &TensorMap) -> (TensorMap, &'static str) {
    if map.keys().any(|k| k.starts_with("backbone.")) {
        (map.clone(), "backbone.")
    } else {
        (map.clone(), "")
    }
}

/// Loads ViT weights into `vit`. `cls_token` may be absent (it is never used).
pub fn load_vit<B: Backend>(vit: Vit<B>, map: &TensorMap, file: &Path) -> Result<Vit<B>> {
    let (map, prefix) = backbone_view(map);
    let mut map = map;
    let cls = format!("{prefix}cls_token");
    map.entry(cls).or_insert_with(|| {
        let d = vit.embed_dim();
        tensors::HostTensor::f32(vec![1, 1, d], vec![0.0; d])
    });
    named::load_state_dict(vit, &map, prefix, file, Missing::Error)
}

/// A ViT backbone's architecture as its tensor shapes give it (what a weights file without
/// `config.json` says of itself; the head count is not among them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackboneShape {
    /// Width `D` (`patch_embed.proj.weight` is `[D, 3, p, p]`).
    pub dim: usize,
    /// Patch side `p`.
    pub patch: usize,
    /// Blocks (`blocks.{i}.attn.qkv.weight` counted).
    pub depth: usize,
    /// MLP width (`blocks.0.mlp.fc1.weight` rows).
    pub mlp_hidden: usize,
    /// Side of the square grid of `pos_embed`, the size the backbone was trained at.
    pub grid: usize,
    /// `pos_embed` has a class row in front of the grid's rows.
    pub class_row: bool,
}

/// Reads a [`BackboneShape`] from the backbone tensors under `prefix` (`backbone.` or empty).
/// Errors name the tensor and the file.
pub fn backbone_shape(map: &TensorMap, prefix: &str, file: &Path) -> Result<BackboneShape> {
    let shape = |k: &str| {
        map.get(&format!("{prefix}{k}"))
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::MissingTensor { name: format!("{prefix}{k}"), path: file.into() })
    };
    let pe = shape("patch_embed.proj.weight")?;
    if pe.len() != 4 || pe[1] != 3 || pe[2] != pe[3] {
        return Err(Error::ShapeMismatch {
            name: format!("{prefix}patch_embed.proj.weight"),
            path: file.into(),
            expected: vec![0, 3, 0, 0],
            found: pe,
        });
    }
    let (dim, patch) = (pe[0], pe[2]);
    let depth = (0..)
        .take_while(|i| map.contains_key(&format!("{prefix}blocks.{i}.attn.qkv.weight")))
        .count();
    if depth == 0 {
        return Err(Error::MissingTensor {
            name: format!("{prefix}blocks.0.attn.qkv.weight"),
            path: file.into(),
        });
    }
    let mlp_hidden = shape("blocks.0.mlp.fc1.weight")?[0];
    let pos = shape("pos_embed")?;
    let rows = pos.iter().product::<usize>() / dim.max(1);
    let square = |n: usize| {
        let g = (n as f64).sqrt().round() as usize;
        (g > 0 && g * g == n).then_some(g)
    };
    let (grid, class_row) = match (square(rows), square(rows.saturating_sub(1))) {
        (Some(g), _) => (g, false),
        (None, Some(g)) => (g, true),
        (None, None) => {
            return Err(Error::ShapeMismatch {
                name: format!("{prefix}pos_embed"),
                path: file.into(),
                expected: vec![1, 0, dim],
                found: pos,
            });
        }
    };
    Ok(BackboneShape { dim, patch, depth, mlp_hidden, grid, class_row })
}

/// A head's architecture from its tensor shapes under `prefix` (`head.` or empty): input and
/// hidden width from `mlp.0`, bottleneck and prototypes from `last_layer.weight_v`, layers by
/// counting `mlp.{0,2,4..}` (the reference's indices skip the GELUs).
pub fn head_config(
    map: &TensorMap,
    prefix: &str,
    norm_last_layer: bool,
    file: &Path,
) -> Result<FlslHeadConfig> {
    let shape = |k: &str| {
        map.get(&format!("{prefix}{k}"))
            .map(|t| t.shape.clone())
            .filter(|s| s.len() == 2)
            .ok_or_else(|| Error::MissingTensor { name: format!("{prefix}{k}"), path: file.into() })
    };
    let w0 = shape("mlp.0.weight")?;
    let v = shape("last_layer.weight_v")?;
    let nlayers =
        (0..).take_while(|i| map.contains_key(&format!("{prefix}mlp.{}.weight", 2 * i))).count();
    Ok(FlslHeadConfig::new(w0[1], v[0])
        .with_hidden_dim(w0[0])
        .with_bottleneck_dim(v[1])
        .with_nlayers(nlayers)
        .with_norm_last_layer(norm_last_layer))
}

/// Resolves a checkpoint argument to `(weights file, optional config.json)`.
///
/// Accepts a weights file, a checkpoint folder, a run's output folder (its
/// `checkpoints/latest`), or a `checkpoints` folder.
pub fn resolve_checkpoint(path: &Path, part: Part) -> Result<(PathBuf, Option<PathBuf>)> {
    if path.is_file() {
        let cfg = path.parent().map(|p| p.join("config.json")).filter(|c| c.is_file());
        return Ok((path.to_path_buf(), cfg));
    }
    let file = match part {
        Part::Teacher => "teacher.safetensors",
        Part::Student => "student.safetensors",
    };
    for dir in [path.to_path_buf(), path.join("latest"), path.join("checkpoints").join("latest")] {
        if dir.join(file).is_file() {
            let cfg = dir.join("config.json");
            return Ok((dir.join(file), cfg.is_file().then_some(cfg)));
        }
    }
    Err(Error::io(
        "no checkpoint (a weights file, or a folder with teacher.safetensors, latest/ or checkpoints/latest/)",
        path,
        std::io::Error::from(std::io::ErrorKind::NotFound),
    ))
}

/// Loads head weights into `head` (keys `head.*` or bare).
pub fn load_head<B: Backend>(
    head: FlslHead<B>,
    map: &TensorMap,
    file: &Path,
) -> Result<FlslHead<B>> {
    let prefix = if map.keys().any(|k| k.starts_with("head.")) { "head." } else { "" };
    named::load_state_dict(head, map, prefix, file, Missing::Error)
}
