//! Host-side tensors and their files: safetensors read/write with atomic writes.
//!
//! A [`HostTensor`] is a plain row-major buffer with a shape and a dtype.
//! It is what checkpoints, golden files and `.pth` imports produce before a tensor goes to a device.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData, backend::Backend};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};

/// The element buffer of a host tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// Bytes (bool masks).
    U8(Vec<u8>),
    /// 64-bit integers.
    I64(Vec<i64>),
}

/// A row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first (PyTorch order).
    pub shape: Vec<usize>,
    /// Elements.
    pub data: HostData,
}

impl HostTensor {
    /// A float32 tensor.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data: HostData::F32(data) }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The dtype name as safetensors spells it.
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            HostData::F32(_) => "F32",
            HostData::F64(_) => "F64",
            HostData::U8(_) => "U8",
            HostData::I64(_) => "I64",
        }
    }

    /// The elements as f32 (f64 is rounded, integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The elements as f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostData::F64(v) => v.clone(),
            HostData::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The elements as i64 (floats truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::F64(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            HostData::I64(v) => v.clone(),
        }
    }

    /// Moves this tensor to a device as float32. The rank must be `D`.
    pub fn to_device<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        let shape: Vec<usize> = if self.shape.len() == D {
            self.shape.clone()
        } else {
            // A 0-d tensor or a rank mismatch: callers check ranks; keep the element count.
            let mut s = vec![1; D];
            if let Some(last) = s.last_mut() {
                *last = self.numel();
            }
            s
        };
        Tensor::from_data(TensorData::new(self.to_f32(), shape), device)
    }

    /// Reads a float tensor back from a device.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>();
        let v = data.to_vec::<f32>().expect("data converted to f32 should read as f32");
        Self::f32(shape, v)
    }
}

/// An ordered set of named host tensors (one safetensors file, or one checkpoint).
pub type TensorMap = BTreeMap<String, HostTensor>;

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<TensorMap> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::io("cannot read safetensors file", path, e))?;
    parse_safetensors(&bytes, path)
}

/// Parses safetensors bytes; `path` only names the source in errors.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<TensorMap> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::malformed("safetensors", path, e.to_string()))?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => HostData::F32(le_chunks::<4, f32>(raw, f32::from_le_bytes)),
            Dtype::F64 => HostData::F64(le_chunks::<8, f64>(raw, f64::from_le_bytes)),
            Dtype::U8 | Dtype::BOOL => HostData::U8(raw.to_vec()),
            Dtype::I64 => HostData::I64(le_chunks::<8, i64>(raw, i64::from_le_bytes)),
            Dtype::I32 => HostData::I64(
                le_chunks::<4, i32>(raw, i32::from_le_bytes).into_iter().map(i64::from).collect(),
            ),
            Dtype::F16 => HostData::F32(
                le_chunks::<2, u16>(raw, u16::from_le_bytes).into_iter().map(f16_to_f32).collect(),
            ),
            Dtype::BF16 => HostData::F32(
                le_chunks::<2, u16>(raw, u16::from_le_bytes)
                    .into_iter()
                    .map(|b| f32::from_bits(u32::from(b) << 16))
                    .collect(),
            ),
            other => {
                return Err(Error::malformed(
                    "safetensors",
                    path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ));
            }
        };
        out.insert(name, HostTensor { shape, data });
    }
    Ok(out)
}

pub(crate) fn le_chunks<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// IEEE half to single precision.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = if exp == 0 {
        if mant == 0 {
            sign
        } else {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
    } else if exp == 31 {
        sign | 0x7f80_0000 | (mant << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (mant << 13)
    };
    f32::from_bits(bits)
}

/// Serialises tensors to safetensors bytes (with optional string metadata).
pub fn safetensors_bytes(
    tensors: &TensorMap,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match &t.data {
                HostData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::U8(v) => (Dtype::U8, v.clone()),
                HostData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        raw.iter()
            .map(|(n, d, s, b)| {
                TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| {
                    Error::Shape { op: "safetensors", reason: format!("tensor `{n}`: {e}") }
                })
            })
            .collect::<Result<_>>()?;
    let meta = metadata.clone().map(|m| m.into_iter().collect());
    let mut bytes = safetensors::serialize(views, meta)
        .map_err(|e| Error::Shape { op: "safetensors", reason: e.to_string() })?;
    if let Some(m) = metadata.filter(|m| m.len() > 1) {
        sort_metadata(&mut bytes, &m);
    }
    Ok(bytes)
}

/// The safetensors crate writes metadata from a `HashMap`, so its key order (and the file's
/// bytes) change from process to process. Rewrites the `__metadata__` object with its keys
/// sorted: the same pairs in the same compact JSON, so the same length, and equal tensors give
/// equal files (checksums, bit-exact comparisons of checkpoints).
fn sort_metadata(bytes: &mut [u8], metadata: &BTreeMap<String, String>) {
    let sorted = match serde_json::to_string(metadata) {
        Ok(s) => s,
        Err(_) => return,
    };
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))) else {
        return;
    };
    let end = (8 + n as usize).min(bytes.len());
    let key = b"\"__metadata__\":";
    let Some(at) = bytes[8..end].windows(key.len()).position(|w| w == key) else { return };
    let start = 8 + at + key.len();
    let span = start..start + sorted.len();
    // Only when the object there holds exactly these pairs (in some order) and has this length.
    let same = bytes
        .get(span.clone())
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, String>>(b).ok());
    if same.as_ref() == Some(metadata) {
        bytes[span].copy_from_slice(sorted.as_bytes());
    }
}

/// Writes tensors to a safetensors file atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &TensorMap,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors_bytes(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// Writes a file atomically: a temporary file in the same folder, fsync, then rename.
///
/// A crash at any point leaves either the old file or the new one, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    flsl_runtime::fsio::write_atomic(path, bytes).map_err(|e| Error::io("cannot write", path, e))
}

/// Flushes a folder's entries (a rename or a new file in it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    flsl_runtime::fsio::sync_dir(dir).map_err(|e| Error::io("cannot flush folder", dir, e))
}

/// Puts the complete folder `src` at `dst` in one atomic step and flushes the parent: a
/// reader (or a crash) sees the old `dst` or the new one, never none. An existing `dst` is
/// swapped with `src` (`renameat2(RENAME_EXCHANGE)`) and the old content, now at `src`, removed.
pub fn replace_dir(src: &Path, dst: &Path) -> Result<()> {
    let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if std::fs::symlink_metadata(dst).is_ok() {
        exchange(src, dst).map_err(|e| Error::io("cannot swap in", dst, e))?;
        sync_dir(parent)?;
        std::fs::remove_dir_all(src).map_err(|e| Error::io("cannot remove", src, e))?;
    } else {
        std::fs::rename(src, dst).map_err(|e| Error::io("cannot move into place", dst, e))?;
        sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD resolves them relative
    // to the working directory like std::fs does.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Without an atomic exchange: move the old folder aside, then the new one in (a crash between
/// the two renames leaves the old one aside, under `b`'s name plus `.old`).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let aside = b.with_extension("old");
    std::fs::rename(b, &aside)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&aside, a)
}

/// Reads a `.npy` file (little-endian f32/f64/u8/i64, C order).
pub fn read_npy(path: &Path) -> Result<HostTensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read npy file", path, e))?;
    parse_npy(&bytes, path)
}

/// Parses `.npy` bytes.
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<HostTensor> {
    let bad = |r: &str| Error::malformed("npy", path, r.to_string());
    let h = flsl_runtime::npy::parse_header(bytes).map_err(|e| bad(&e.reason))?;
    let (descr, shape, n) = (h.descr, h.shape, h.count);
    let size = match descr.as_str() {
        "<f4" => 4,
        "<f8" | "<i8" => 8,
        "|u1" | "|b1" => 1,
        other => return Err(bad(&format!("unsupported dtype {other}"))),
    };
    let body = &bytes[h.data_start..];
    let raw = n.checked_mul(size).and_then(|len| body.get(..len)).ok_or_else(|| {
        bad(&format!("{} data bytes for shape {shape:?} ({n} elements of {size})", body.len()))
    })?;
    let data = match size {
        4 => HostData::F32(le_chunks::<4, f32>(raw, f32::from_le_bytes)),
        8 if descr == "<f8" => HostData::F64(le_chunks::<8, f64>(raw, f64::from_le_bytes)),
        8 => HostData::I64(le_chunks::<8, i64>(raw, i64::from_le_bytes)),
        _ => HostData::U8(raw.to_vec()),
    };
    Ok(HostTensor { shape, data })
}

/// Serialises an f32 tensor as `.npy` bytes.
pub fn npy_bytes_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    flsl_runtime::npy::encode_npy(shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip() {
        let mut m = TensorMap::new();
        m.insert("a.weight".into(), HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]));
        m.insert("mask".into(), HostTensor { shape: vec![3], data: HostData::U8(vec![1, 0, 1]) });
        let dir = std::env::temp_dir().join(format!("flsl-st-{}", std::process::id()));
        let p = dir.join("x.safetensors");
        write_safetensors(&p, &m, None).unwrap();
        assert_eq!(read_safetensors(&p).unwrap(), m);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn equal_tensors_and_metadata_give_equal_bytes() {
        let mut m = TensorMap::new();
        m.insert("w".into(), HostTensor::f32(vec![2], vec![1., 2.]));
        let meta: BTreeMap<String, String> =
            (0..6).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let first = safetensors_bytes(&m, Some(meta.clone())).unwrap();
        for _ in 0..20 {
            // Each HashMap inside the safetensors crate gets its own random order.
            assert_eq!(safetensors_bytes(&m, Some(meta.clone())).unwrap(), first);
        }
        let st = SafeTensors::read_metadata(&first).unwrap().1;
        let back: BTreeMap<String, String> =
            st.metadata().clone().unwrap_or_default().into_iter().collect();
        assert_eq!(back, meta);
    }

    #[test]
    fn truncated_safetensors_is_an_error() {
        let mut m = TensorMap::new();
        m.insert("a".into(), HostTensor::f32(vec![4], vec![1.; 4]));
        let bytes = safetensors_bytes(&m, None).unwrap();
        let err =
            parse_safetensors(&bytes[..bytes.len() - 3], Path::new("t.safetensors")).unwrap_err();
        assert!(err.to_string().contains("t.safetensors"), "{err}");
    }

    #[test]
    fn npy_round_trip() {
        let b = npy_bytes_f32(&[2, 2], &[1.0, -2.0, 3.5, 4.0]);
        let t = parse_npy(&b, Path::new("x.npy")).unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.to_f32(), vec![1.0, -2.0, 3.5, 4.0]);
    }

    #[test]
    fn half_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
    }
}
