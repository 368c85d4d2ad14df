//! The mean-shift operator of FLSL (paper Sec. 3; reference `utils.flsl_meanshift`).
//!
//! `mode = softmax(temp * Q T^T) T`: queries `Q` are the tokens a sampling mask selects,
//! keys/values `T` are **all** tokens of the target; `temp` multiplies the dot products.
//! Intra-view: the target is the student view itself. Inter-view: the target is the teacher's
//! global view of the same image.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::error::{Error, Result};
use crate::model::layers::softmax_scaled;

/// Selected query tokens per row: `rows[b]` lists ascending token indices, every row the same
/// length `M` (one token per sampling window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSelection {
    /// Token indices per row.
    pub rows: Vec<Vec<usize>>,
    /// Tokens per row in the source (`Ns`).
    pub tokens: usize,
}

impl TokenSelection {
    /// From a boolean mask `[B, Ns]` (row-major, 1 = selected).
    pub fn from_mask(mask: &[u8], batch: usize, tokens: usize) -> Result<Self> {
        if mask.len() != batch * tokens {
            return Err(Error::Shape {
                op: "mask",
                reason: format!("{} entries for [{batch}, {tokens}]", mask.len()),
            });
        }
        let rows: Vec<Vec<usize>> = mask
            .chunks(tokens)
            .map(|r| r.iter().enumerate().filter(|(_, m)| **m != 0).map(|(i, _)| i).collect())
            .collect();
        Self::new(rows, tokens)
    }

    /// Checks that every row has the same non-zero count and indices in range.
    pub fn new(rows: Vec<Vec<usize>>, tokens: usize) -> Result<Self> {
        let m = rows.first().map_or(0, Vec::len);
        if m == 0 {
            return Err(Error::Shape { op: "mask", reason: "no token selected".into() });
        }
        for (b, r) in rows.iter().enumerate() {
            if r.len() != m {
                return Err(Error::Shape {
                    op: "mask",
                    reason: format!("row {b} selects {} tokens, row 0 selects {m}", r.len()),
                });
            }
            if r.iter().any(|&i| i >= tokens) {
                return Err(Error::Shape {
                    op: "mask",
                    reason: format!("row {b} selects a token >= {tokens}"),
                });
            }
        }
        Ok(Self { rows, tokens })
    }

    /// Rows `B`.
    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    /// Queries per row `M`.
    pub fn per_row(&self) -> usize {
        self.rows[0].len()
    }

    /// Concatenates selections of the same token count (view groups).
    pub fn concat(parts: &[&TokenSelection]) -> Result<Self> {
        let tokens = parts.first().map_or(0, |p| p.tokens);
        let rows = parts.iter().flat_map(|p| p.rows.iter().cloned()).collect();
        Self::new(rows, tokens)
    }

    /// Flat indices `b * Ns + n` into a `[B*Ns, C]` view.
    pub fn flat_indices<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        let idx: Vec<i64> = self
            .rows
            .iter()
            .enumerate()
            .flat_map(|(b, r)| r.iter().map(move |&n| (b * self.tokens + n) as i64))
            .collect();
        let n = idx.len();
        Tensor::from_data(TensorData::new(idx, [n]), device)
    }
}

/// Gathers the selected tokens: `src[mask].view(B, M, C)`.
pub fn select_tokens<B: Backend>(src: Tensor<B, 3>, sel: &TokenSelection) -> Tensor<B, 3> {
    let [b, n, c] = src.dims();
    let idx = sel.flat_indices::<B>(&src.device());
    src.reshape([b * n, c]).select(0, idx).reshape([b, sel.per_row(), c])
}

/// Attention of the selected queries over all target tokens, `softmax(Q T^T * temp)`.
///
/// # Shapes
/// `q: [B, M, C]`, `tgt: [B, Nt, C]` -> `[B, M, Nt]`.
pub fn attention<B: Backend>(q: Tensor<B, 3>, tgt: Tensor<B, 3>, temp: f64) -> Tensor<B, 3> {
    softmax_scaled(q.matmul(tgt.swap_dims(1, 2)), temp, 2)
}

/// Mean shift, returning `(src_sel, mode)`.
///
/// # Shapes
/// `src: [B, Ns, C]`, `tgt: [B, Nt, C]` -> `([B, M, C], [B, M, C])`.
pub fn meanshift<B: Backend>(
    src: Tensor<B, 3>,
    tgt: Tensor<B, 3>,
    sel: &TokenSelection,
    temp: f64,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let q = select_tokens(src, sel);
    let attn = attention(q.clone(), tgt.clone(), temp);
    (q, attn.matmul(tgt))
}

/// Multi-stage mean shift: the attention is mixed with a previous-stage map,
/// `a = mix * a + (1 - mix) * prev`, renormalised over keys (`flsl_meanshift(tgt_attn=..)`).
pub fn meanshift_mixed<B: Backend>(
    src: Tensor<B, 3>,
    tgt: Tensor<B, 3>,
    sel: &TokenSelection,
    temp: f64,
    prev_attn: Tensor<B, 3>,
    mixture: f64,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let q = select_tokens(src, sel);
    let attn = attention(q.clone(), tgt.clone(), temp) * mixture + prev_attn * (1.0 - mixture);
    let attn = attn.clone() / attn.sum_dim(2);
    (q, attn.matmul(tgt))
}

/// The previous-stage attention map (`utils.attention_map`): a sharpened, renormalised
/// version of the attention, `sigmoid(sharpness * (a - mean a))` over keys.
pub fn sharpened_attention_map<B: Backend>(
    src: Tensor<B, 3>,
    tgt: Tensor<B, 3>,
    sel: &TokenSelection,
    temp: f64,
    sharpness: f64,
) -> Tensor<B, 3> {
    let q = select_tokens(src, sel);
    let a = attention(q, tgt, temp);
    let mean = a.clone().mean_dim(2);
    let s = burn::tensor::activation::sigmoid((a - mean) * sharpness);
    s.clone() / s.sum_dim(2)
}

/// Repeats the teacher features once per student view: row `v*bt + i` is `enc_t[i]`
/// (`enc_t.unsqueeze(0).expand(b,-1,-1,-1).reshape(b*bt, N, C)`).
pub fn repeat_views<B: Backend>(enc_t: Tensor<B, 3>, views: usize) -> Tensor<B, 3> {
    let [bt, n, c] = enc_t.dims();
    enc_t.unsqueeze_dim::<4>(0).expand([views, bt, n, c]).reshape([views * bt, n, c])
}
