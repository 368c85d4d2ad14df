//! Minimal `.npy` reading and writing for f32 arrays (the format of the reference's ONNX
//! inputs and outputs and of `flsl infer --npy`).
//!
//! Reads format versions 1-3 with dtype `<f4` (or `<f8`, converted to f32) in C order;
//! writes version 1, `<f4`, C order.

use crate::error::Invalid;
use std::path::Path;

use crate::error::ModelError;

/// An f32 array read from a `.npy` file: shape and row-major data.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// Row-major values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Reads a `.npy` file of dtype `<f4` or `<f8` in C order.
pub fn read_npy(path: &Path) -> Result<NpyArray, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        action: "reading",
        path: path.into(),
        source,
    })?;
    parse_npy(&bytes).map_err(|e| ModelError::Npy { path: path.into(), reason: e.reason })
}

/// The header of a `.npy` file: dtype descriptor, shape, element count and where the data
/// starts.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// The dtype descriptor (`<f4`, `<f8`, `|u1`, `<i8`, ...), quotes removed.
    pub descr: String,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// `shape`'s product (checked against overflow).
    pub count: usize,
    /// Offset of the first data byte.
    pub data_start: usize,
}

/// Parses and checks a `.npy` header (versions 1-3, C order); every length and product is
/// checked, so no header can make a reader index out of range or overflow.
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader, Invalid> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(Invalid::from("not an .npy file (bad magic)"));
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        _ => return Err(Invalid::from(format!("unsupported .npy version {major}"))),
    };
    let data_start = start.checked_add(header_len).ok_or("truncated header")?;
    let header = bytes.get(start..data_start).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    let shape = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    if fortran.starts_with("True") {
        return Err(Invalid::from("Fortran-ordered arrays are not supported"));
    }
    let shape_body = shape.strip_prefix('(').ok_or("shape is not a tuple")?;
    let shape_body = &shape_body[..shape_body.find(')').ok_or("malformed shape")?];
    let shape = shape_body
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad dimension `{s}`")))
        .collect::<Result<Vec<_>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"').to_string();
    Ok(NpyHeader { descr, shape, count, data_start })
}

/// Parses the bytes of a `.npy` file (see [`read_npy`]).
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray, Invalid> {
    let NpyHeader { descr, shape, count, data_start } = parse_header(bytes)?;
    let body = &bytes[data_start..];
    let data = match descr.as_str() {
        "<f4" => {
            let raw = count
                .checked_mul(4)
                .and_then(|n| body.get(..n))
                .ok_or("data shorter than the shape says")?;
            raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        "<f8" => {
            let raw = count
                .checked_mul(8)
                .and_then(|n| body.get(..n))
                .ok_or("data shorter than the shape says")?;
            raw.chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes(b.try_into().expect("chunks_exact(8) yields 8 bytes")) as f32
                })
                .collect()
        }
        other => {
            return Err(Invalid::from(format!("dtype {other} is not supported (only <f4, <f8)")));
        }
    };
    Ok(NpyArray { shape, data })
}

/// The text after `'key':` up to the next top-level comma of the header dict.
fn dict_value<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        return Some(&rest[..=rest.find(')')?]);
    }
    Some(&rest[..rest.find([',', '}']).unwrap_or(rest.len())])
}

/// Encodes an f32 array as `.npy` (version 1, `<f4`, C order).
pub fn encode_npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// Writes an f32 array as `.npy` (see [`encode_npy`]).
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), ModelError> {
    crate::fsio::write_atomic(path, &encode_npy(shape, data)).map_err(|source| ModelError::Io {
        action: "writing",
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for shape in [vec![2, 3], vec![4], vec![1, 2, 1, 2], vec![]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = encode_npy(&shape, &data);
            assert_eq!((bytes.len() - 4 * n) % 64, 0);
            assert_eq!(parse_npy(&bytes).unwrap(), NpyArray { shape, data });
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(parse_npy(b"hello").is_err());
        let mut bytes = encode_npy(&[3], &[1.0, 2.0, 3.0]);
        bytes.truncate(bytes.len() - 1);
        assert!(parse_npy(&bytes).is_err());
    }
}
