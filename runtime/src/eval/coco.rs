//! COCO bounding-box evaluation, numerically identical to pycocotools' `COCOeval` with
//! `iouType="bbox"` (pycocotools 2.0.x `cocoeval.py`, `coco.py: loadRes`, `maskApi.c: bbIou`).
//!
//! What is replicated, step by step:
//!
//! - `loadRes`: detection `area = w * h`, detection ids `1..=n` in file order, `iscrowd = 0`;
//!   detections on an image the ground truth lacks are an error ([`EvalError::UnknownImage`];
//!   pycocotools asserts). Detections whose category is not a ground-truth category are dropped
//!   (pycocotools never loads them); [`CocoGt::unknown_category_count`] counts them.
//! - Params: `imgIds` = sorted unique ground-truth image ids, `catIds` = sorted unique ids of
//!   the ground truth's `categories`, IoU thresholds `np.linspace(.5, .95, 10)`, recall
//!   thresholds `np.linspace(0, 1, 101)`, `maxDets = [1, 10, 100]`, area ranges all / small /
//!   medium / large = `[0, 1e5²]`, `[0, 32²]`, `[32², 96²]`, `[96², 1e5²]` (inclusive on both
//!   ends), per-category evaluation (`useCats = 1`).
//! - `_prepare`: a ground-truth box is ignored iff it is a crowd region. The `ignore` field of an
//!   annotation is overwritten by `iscrowd` there, so it has no effect (kept in [`CocoGtAnn`]
//!   only to document that).
//! - `computeIoU`: detections sorted by score with `np.argsort(-score, kind="mergesort")`
//!   (stable), cut to 100; IoU of `[x, y, w, h]` boxes with plain areas (no `+1`); for a crowd
//!   region the union is the detection's area.
//! - `evaluateImg`: ground truth sorted so that ignored boxes (crowd, or `area` outside the
//!   range) come last, greedy matching per IoU threshold in detection order where a later
//!   ground truth with an equal IoU wins, crowd regions can absorb any number of detections,
//!   a detection matched to an ignored box is ignored, an unmatched detection whose area is
//!   outside the range is ignored. A match is recorded as the ground-truth `id`, so (as in
//!   pycocotools) a match to an annotation with `id == 0` counts as no match.
//! - `accumulate`: detections of all images concatenated in image-id order, each image's list
//!   cut to `maxDet`, stably sorted by score; `recall = tp[-1] / npig`, precision
//!   `tp / (tp + fp + eps)`, made monotone from the right, sampled with
//!   `np.searchsorted(rc, recThrs, side="left")` (thresholds beyond the last recall keep 0);
//!   categories without any non-ignored ground truth in the range stay `-1`.
//! - `summarize`: mean over entries `> -1` (numpy's pairwise summation, in numpy's element
//!   order, so the printed values round as pycocotools' do), or `-1` when there are none.
//!
//! All arithmetic is `f64`, as numpy's. One deliberate difference: an empty results array
//! is evaluated (every defined stat is 0) where pycocotools crashes on `anns[0]`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::EvalError;

/// Number of IoU thresholds (`np.linspace(.5, .95, 10)`).
const T: usize = 10;
/// Number of recall thresholds (`np.linspace(0, 1, 101)`).
const R: usize = 101;
/// `maxDets`.
const MAX_DETS: [usize; 3] = [1, 10, 100];
/// Area ranges all, small, medium, large.
const AREA_RNG: [[f64; 2]; 4] =
    [[0.0, 1e5 * 1e5], [0.0, 32.0 * 32.0], [32.0 * 32.0, 96.0 * 96.0], [96.0 * 96.0, 1e5 * 1e5]];
/// Labels of [`AREA_RNG`] as printed by `summarize()`.
const AREA_LBL: [&str; 4] = ["all", "small", "medium", "large"];
/// `np.spacing(1)`.
const EPS: f64 = f64::EPSILON;

/// `np.linspace(start, stop, num)` with numpy's arithmetic: `i * step + start`, last = stop.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    out[N - 1] = stop;
    out
}

/// The IoU thresholds `np.linspace(.5, .95, 10)`, bit for bit as numpy computes them.
pub fn iou_thresholds() -> [f64; T] {
    linspace::<T>(0.5, 0.95)
}

/// The recall thresholds `np.linspace(0, 1, 101)`, bit for bit as numpy computes them.
pub fn recall_thresholds() -> [f64; R] {
    linspace::<R>(0.0, 1.0)
}

/// One ground-truth annotation (`annotations[i]` of a COCO instances file).
#[derive(Debug, Clone, PartialEq)]
pub struct CocoGtAnn {
    /// Annotation `id`. Must be unique in the file.
    pub id: i64,
    /// `image_id`; must be one of [`CocoGt::images`].
    pub image_id: i64,
    /// `category_id`; must be one of [`CocoGt::categories`].
    pub category_id: i64,
    /// `bbox` = `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    /// `area` (the segment's area in COCO, not necessarily `w * h`): decides the
    /// small / medium / large range, as in pycocotools.
    pub area: f64,
    /// `iscrowd` (absent = false): a crowd region is ignored, matches any number of
    /// detections, and its IoU is intersection / detection area.
    pub iscrowd: bool,
    /// `ignore` (absent = false). pycocotools' `COCOeval._prepare` overwrites it with
    /// `iscrowd`, so it does not change any result, here as there.
    pub ignore: bool,
}

/// Ground truth of a COCO detection evaluation: the `images`, `categories` and
/// `annotations` of an instances file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CocoGt {
    /// Image ids (`images[i].id`), in file order; evaluation uses them sorted and unique.
    pub images: Vec<i64>,
    /// Category ids (`categories[i].id`), in file order; evaluation uses them sorted and
    /// unique. A category without annotations yields `-1` entries (it is left out of means).
    pub categories: Vec<i64>,
    /// Annotations in file order (the order breaks ties exactly as in pycocotools).
    pub annotations: Vec<CocoGtAnn>,
}

/// One detection of a COCO results file (`[{"image_id", "category_id", "bbox", "score"}]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoDet {
    /// `image_id`; must be an image of the ground truth.
    pub image_id: i64,
    /// `category_id`; detections of categories the ground truth lacks are dropped.
    pub category_id: i64,
    /// `bbox` = `[x, y, width, height]`; width and height must be >= 0.
    pub bbox: [f64; 4],
    /// Confidence; higher ranks first, ties keep file order.
    pub score: f64,
}

/// The 12 summary numbers of `COCOeval.summarize()` for bounding boxes, in its order.
/// A stat is `-1.0` where pycocotools prints `-1.000` (nothing to average, e.g. no large
/// ground-truth box anywhere).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoStats {
    /// AP @[IoU=0.50:0.95 | area=all | maxDets=100].
    pub ap: f64,
    /// AP @[IoU=0.50 | area=all | maxDets=100].
    pub ap50: f64,
    /// AP @[IoU=0.75 | area=all | maxDets=100].
    pub ap75: f64,
    /// AP @[IoU=0.50:0.95 | area=small | maxDets=100].
    pub ap_small: f64,
    /// AP @[IoU=0.50:0.95 | area=medium | maxDets=100].
    pub ap_medium: f64,
    /// AP @[IoU=0.50:0.95 | area=large | maxDets=100].
    pub ap_large: f64,
    /// AR @[IoU=0.50:0.95 | area=all | maxDets=1].
    pub ar1: f64,
    /// AR @[IoU=0.50:0.95 | area=all | maxDets=10].
    pub ar10: f64,
    /// AR @[IoU=0.50:0.95 | area=all | maxDets=100].
    pub ar100: f64,
    /// AR @[IoU=0.50:0.95 | area=small | maxDets=100].
    pub ar_small: f64,
    /// AR @[IoU=0.50:0.95 | area=medium | maxDets=100].
    pub ar_medium: f64,
    /// AR @[IoU=0.50:0.95 | area=large | maxDets=100].
    pub ar_large: f64,
}

/// What each of the 12 stats averages: (is AP, IoU threshold or all, area index, maxDets index).
const SUMMARY: [(bool, Option<f64>, usize, usize); 12] = [
    (true, None, 0, 2),
    (true, Some(0.5), 0, 2),
    (true, Some(0.75), 0, 2),
    (true, None, 1, 2),
    (true, None, 2, 2),
    (true, None, 3, 2),
    (false, None, 0, 0),
    (false, None, 0, 1),
    (false, None, 0, 2),
    (false, None, 1, 2),
    (false, None, 2, 2),
    (false, None, 3, 2),
];

impl CocoStats {
    /// The JSON keys of the stats, in pycocotools' order.
    pub const NAMES: [&'static str; 12] =
        ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];

    /// The stats as pycocotools' `COCOeval.stats` array.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    /// The inverse of [`to_array`](Self::to_array).
    pub fn from_array(s: [f64; 12]) -> Self {
        Self {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }

    /// One JSON object with the keys of [`NAMES`](Self::NAMES) in that order, e.g.
    /// `{"AP":0.5,"AP50":0.75,...,"ARl":-1.0}` (undefined stats are `-1.0`).
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (name, v)) in Self::NAMES.iter().zip(self.to_array()).enumerate() {
            if i > 0 {
                out.push(',');
            }
            // f64 stats are always finite here; serde_json writes the shortest round-trip form.
            let num = serde_json::to_string(&v).unwrap_or_else(|_| "null".to_owned());
            out.push_str(&format!("\"{name}\":{num}"));
        }
        out.push('}');
        out
    }
}

impl fmt::Display for CocoStats {
    /// The 12 lines of pycocotools' `summarize()`, e.g.
    /// ` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.372`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (&(ap, thr, a, m), v)) in SUMMARY.iter().zip(self.to_array()).enumerate() {
            let title = if ap { "Average Precision" } else { "Average Recall" };
            let kind = if ap { "(AP)" } else { "(AR)" };
            let iou = match thr {
                Some(t) => format!("{t:.2}"),
                None => "0.50:0.95".to_owned(),
            };
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                " {title:<18} {kind} @[ IoU={iou:<9} | area={:>6} | maxDets={:>3} ] = {v:.3}",
                AREA_LBL[a], MAX_DETS[m]
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// JSON parsing with errors naming the file and the field.

struct Ctx<'a> {
    path: Option<&'a Path>,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> EvalError {
        EvalError::Field {
            path: self.path.map(Path::to_path_buf),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn get<'v>(&self, obj: &'v Value, parent: &str, key: &str) -> Result<&'v Value, EvalError> {
        obj.get(key).ok_or_else(|| self.err(join(parent, key), "missing"))
    }

    fn id(&self, obj: &Value, parent: &str, key: &str) -> Result<i64, EvalError> {
        let v = self.get(obj, parent, key)?;
        as_id(v).ok_or_else(|| {
            self.err(join(parent, key), format!("expected an integer id, found {}", brief(v)))
        })
    }

    fn number(&self, obj: &Value, parent: &str, key: &str) -> Result<f64, EvalError> {
        let v = self.get(obj, parent, key)?;
        v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
            self.err(join(parent, key), format!("expected a finite number, found {}", brief(v)))
        })
    }

    fn flag(&self, obj: &Value, parent: &str, key: &str) -> Result<bool, EvalError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => match as_id(v) {
                Some(i) => Ok(i != 0),
                None => Err(self.err(
                    join(parent, key),
                    format!("expected 0, 1 or a boolean, found {}", brief(v)),
                )),
            },
        }
    }

    fn bbox(&self, obj: &Value, parent: &str) -> Result<[f64; 4], EvalError> {
        let field = join(parent, "bbox");
        let v = self.get(obj, parent, "bbox")?;
        let arr = v.as_array().filter(|a| a.len() == 4).ok_or_else(|| {
            self.err(&field, format!("expected [x, y, width, height], found {}", brief(v)))
        })?;
        let mut b = [0.0; 4];
        for (i, (slot, x)) in b.iter_mut().zip(arr).enumerate() {
            *slot = x.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                self.err(
                    format!("{field}[{i}]"),
                    format!("expected a finite number, found {}", brief(x)),
                )
            })?;
        }
        check_box(&b).map_err(|p| self.err(&field, p))?;
        Ok(b)
    }

    fn array<'v>(&self, obj: &'v Value, key: &str) -> Result<&'v Vec<Value>, EvalError> {
        let v = self.get(obj, "", key)?;
        v.as_array().ok_or_else(|| self.err(key, format!("expected an array, found {}", brief(v))))
    }
}

fn check_box(b: &[f64; 4]) -> Result<(), String> {
    if b.iter().any(|x| !x.is_finite()) {
        return Err(format!("non-finite value in {b:?}"));
    }
    if b[2] < 0.0 || b[3] < 0.0 {
        return Err(format!("negative width or height in [x, y, w, h] = {b:?}"));
    }
    Ok(())
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") }
}

/// An integer, or a float with an integral value (Python treats `1.0` and `1` as one key).
fn as_id(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

/// A short description of a JSON value for error messages.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 { format!("{}...", &s[..s.floor_char_boundary(57)]) } else { s }
}

fn read_json(path: &Path) -> Result<Value, EvalError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|source| EvalError::Json { path: path.to_path_buf(), source })
}

impl CocoGt {
    /// Reads a COCO instances JSON file (`images`, `annotations`, `categories`).
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        Self::from_value(&read_json(path)?, Some(path))
    }

    /// Parses a COCO instances JSON document; `path` only names the source in errors.
    pub fn from_value(doc: &Value, path: Option<&Path>) -> Result<Self, EvalError> {
        let cx = Ctx { path };
        if !doc.is_object() {
            return Err(cx.err(
                "",
                format!(
                    "expected a COCO object with images, annotations and categories, found {}",
                    brief(doc)
                ),
            ));
        }
        let images = cx
            .array(doc, "images")?
            .iter()
            .enumerate()
            .map(|(i, im)| cx.id(im, &format!("images[{i}]"), "id"))
            .collect::<Result<Vec<_>, _>>()?;
        let categories = cx
            .array(doc, "categories")?
            .iter()
            .enumerate()
            .map(|(i, c)| cx.id(c, &format!("categories[{i}]"), "id"))
            .collect::<Result<Vec<_>, _>>()?;
        let image_set: HashSet<i64> = images.iter().copied().collect();
        let cat_set: HashSet<i64> = categories.iter().copied().collect();
        let mut seen = HashMap::new();
        let mut annotations = Vec::new();
        for (i, a) in cx.array(doc, "annotations")?.iter().enumerate() {
            let p = format!("annotations[{i}]");
            let ann = CocoGtAnn {
                id: cx.id(a, &p, "id")?,
                image_id: cx.id(a, &p, "image_id")?,
                category_id: cx.id(a, &p, "category_id")?,
                bbox: cx.bbox(a, &p)?,
                area: cx.number(a, &p, "area")?,
                iscrowd: cx.flag(a, &p, "iscrowd")?,
                ignore: cx.flag(a, &p, "ignore")?,
            };
            if let Some(first) = seen.insert(ann.id, i) {
                return Err(cx.err(
                    join(&p, "id"),
                    format!("duplicate annotation id {} (also annotations[{first}])", ann.id),
                ));
            }
            if !image_set.contains(&ann.image_id) {
                return Err(cx.err(
                    join(&p, "image_id"),
                    format!("{} is not the id of any entry of `images`", ann.image_id),
                ));
            }
            if !cat_set.contains(&ann.category_id) {
                return Err(cx.err(
                    join(&p, "category_id"),
                    format!("{} is not the id of any entry of `categories`", ann.category_id),
                ));
            }
            annotations.push(ann);
        }
        Ok(Self { images, categories, annotations })
    }

    /// Checks the invariants that [`from_value`](Self::from_value) enforces, for a value
    /// built in code: unique annotation ids, known images and categories, valid boxes.
    pub fn validate(&self) -> Result<(), EvalError> {
        let cx = Ctx { path: None };
        let image_set: HashSet<i64> = self.images.iter().copied().collect();
        let cat_set: HashSet<i64> = self.categories.iter().copied().collect();
        let mut seen = HashSet::new();
        for (i, a) in self.annotations.iter().enumerate() {
            let p = format!("annotations[{i}]");
            check_box(&a.bbox).map_err(|e| cx.err(join(&p, "bbox"), e))?;
            if !a.area.is_finite() {
                return Err(cx.err(join(&p, "area"), "not finite"));
            }
            if !seen.insert(a.id) {
                return Err(cx.err(join(&p, "id"), format!("duplicate annotation id {}", a.id)));
            }
            if !image_set.contains(&a.image_id) {
                return Err(
                    cx.err(join(&p, "image_id"), format!("{} is not in `images`", a.image_id))
                );
            }
            if !cat_set.contains(&a.category_id) {
                return Err(cx.err(
                    join(&p, "category_id"),
                    format!("{} is not in `categories`", a.category_id),
                ));
            }
        }
        Ok(())
    }

    /// How many detections name a category that this ground truth lacks; pycocotools (and
    /// [`evaluate`]) silently leave them out, which usually means a label-mapping mistake.
    pub fn unknown_category_count(&self, dets: &[CocoDet]) -> usize {
        let cats: HashSet<i64> = self.categories.iter().copied().collect();
        dets.iter().filter(|d| !cats.contains(&d.category_id)).count()
    }
}

impl CocoDet {
    /// Reads a COCO results file: a JSON array of `{"image_id", "category_id", "bbox",
    /// "score"}` objects (other fields are ignored).
    pub fn load_all(path: &Path) -> Result<Vec<Self>, EvalError> {
        Self::from_value(&read_json(path)?, Some(path))
    }

    /// Parses a COCO results JSON document; `path` only names the source in errors.
    pub fn from_value(doc: &Value, path: Option<&Path>) -> Result<Vec<Self>, EvalError> {
        let cx = Ctx { path };
        let arr = doc.as_array().ok_or_else(|| {
            let what = if doc.get("annotations").is_some() {
                "an object with `annotations` (a ground-truth file?)".to_owned()
            } else {
                brief(doc)
            };
            cx.err(
                "",
                format!(
                    "expected a JSON array of detections (the COCO results format), found {what}"
                ),
            )
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, d)| {
                let p = format!("[{i}]");
                if !d.is_object() {
                    return Err(
                        cx.err(&p, format!("expected a detection object, found {}", brief(d)))
                    );
                }
                Ok(Self {
                    image_id: cx.id(d, &p, "image_id")?,
                    category_id: cx.id(d, &p, "category_id")?,
                    bbox: cx.bbox(d, &p)?,
                    score: cx.number(d, &p, "score")?,
                })
            })
            .collect()
    }
}

/// Evaluates a COCO results file against a COCO instances file, as
/// `COCOeval(COCO(gt), COCO(gt).loadRes(dt), "bbox")` followed by `evaluate()`,
/// `accumulate()` and `summarize()`.
pub fn evaluate_files(gt: &Path, dt: &Path) -> Result<CocoStats, EvalError> {
    let gt_data = CocoGt::load(gt)?;
    let dets = CocoDet::load_all(dt)?;
    evaluate_impl(&gt_data, &dets, Some(dt))
}

/// Evaluates detections against a ground truth exactly as pycocotools' `COCOeval` (bbox).
///
/// Fails on a detection whose image is not in the ground truth, and on data that breaks
/// [`CocoGt::validate`] or has a non-finite score or a negative box size.
pub fn evaluate(gt: &CocoGt, dets: &[CocoDet]) -> Result<CocoStats, EvalError> {
    gt.validate()?;
    evaluate_impl(gt, dets, None)
}

/// Per (image, category, area range) result of `evaluateImg`, with `maxDet = 100`.
struct EvalImg {
    /// Scores of the kept detections, sorted (stable) by descending score.
    scores: Vec<f64>,
    /// `[t * D + d]`: detection `d` matched a ground truth with nonzero id at threshold `t`.
    matched: Vec<bool>,
    /// `[t * D + d]`: detection ignored at threshold `t`.
    dt_ignore: Vec<bool>,
    /// Ground truth ignored (crowd or out of the area range).
    gt_ignore: Vec<bool>,
}

fn evaluate_impl(
    gt: &CocoGt,
    dets: &[CocoDet],
    dt_path: Option<&Path>,
) -> Result<CocoStats, EvalError> {
    let mut img_ids = gt.images.clone();
    img_ids.sort_unstable();
    img_ids.dedup();
    let mut cat_ids = gt.categories.clone();
    cat_ids.sort_unstable();
    cat_ids.dedup();
    let img_set: HashSet<i64> = img_ids.iter().copied().collect();
    let cat_set: HashSet<i64> = cat_ids.iter().copied().collect();

    for (i, d) in dets.iter().enumerate() {
        if !img_set.contains(&d.image_id) {
            return Err(EvalError::UnknownImage {
                path: dt_path.map(Path::to_path_buf),
                index: i,
                image_id: d.image_id,
            });
        }
        let field_err = |field: &str, problem: String| EvalError::Field {
            path: dt_path.map(PathBuf::from),
            field: format!("[{i}].{field}"),
            problem,
        };
        check_box(&d.bbox).map_err(|p| field_err("bbox", p))?;
        if !d.score.is_finite() {
            return Err(field_err("score", format!("not finite: {}", d.score)));
        }
    }

    // (image, category) -> indices into gt.annotations / dets, in file order.
    let mut groups: HashMap<(i64, i64), (Vec<usize>, Vec<usize>)> = HashMap::new();
    for (i, a) in gt.annotations.iter().enumerate() {
        if img_set.contains(&a.image_id) && cat_set.contains(&a.category_id) {
            groups.entry((a.image_id, a.category_id)).or_default().0.push(i);
        }
    }
    for (i, d) in dets.iter().enumerate() {
        if cat_set.contains(&d.category_id) {
            groups.entry((d.image_id, d.category_id)).or_default().1.push(i);
        }
    }

    let iou_thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    let (ni, nk, na, nm) = (img_ids.len(), cat_ids.len(), AREA_RNG.len(), MAX_DETS.len());
    let max_det = MAX_DETS[nm - 1];

    // eval_imgs[(k * na + a) * ni + i], as pycocotools' evalImgs list.
    let mut eval_imgs: Vec<Option<EvalImg>> = Vec::with_capacity(nk * na * ni);
    eval_imgs.resize_with(nk * na * ni, || None);
    for (k, &cat) in cat_ids.iter().enumerate() {
        for (i, &img) in img_ids.iter().enumerate() {
            let Some((g_idx, d_idx)) = groups.get(&(img, cat)) else {
                continue;
            };
            let g: Vec<&CocoGtAnn> = g_idx.iter().map(|&j| &gt.annotations[j]).collect();
            let mut d: Vec<(usize, &CocoDet)> = d_idx.iter().map(|&j| (j, &dets[j])).collect();
            // np.argsort(-score, kind="mergesort"): stable, descending score.
            d.sort_by(|a, b| desc(a.1.score, b.1.score));
            d.truncate(max_det);
            // ious[dt][gt], ground truth in file order (computeIoU).
            let ious: Vec<f64> = d
                .iter()
                .flat_map(|(_, dt)| {
                    g.iter().map(move |gt| bbox_iou(&dt.bbox, &gt.bbox, gt.iscrowd))
                })
                .collect();
            for (a, rng) in AREA_RNG.iter().enumerate() {
                eval_imgs[(k * na + a) * ni + i] =
                    Some(evaluate_img(&g, &d, &ious, rng, &iou_thrs));
            }
        }
    }

    // accumulate(): precision[t][r][k][a][m], recall[t][k][a][m].
    let p_at = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        (((t * R + r) * nk + k) * na + a) * nm + m
    };
    let r_at = |t: usize, k: usize, a: usize, m: usize| ((t * nk + k) * na + a) * nm + m;
    let mut precision = vec![-1.0f64; T * R * nk * na * nm];
    let mut recall = vec![-1.0f64; T * nk * na * nm];
    for k in 0..nk {
        for a in 0..na {
            let es: Vec<&EvalImg> =
                eval_imgs[(k * na + a) * ni..(k * na + a + 1) * ni].iter().flatten().collect();
            if es.is_empty() {
                continue;
            }
            let npig = es.iter().flat_map(|e| &e.gt_ignore).filter(|&&ig| !ig).count();
            for (m, &md) in MAX_DETS.iter().enumerate() {
                if npig == 0 {
                    continue;
                }
                // (score, image entry, detection index), concatenated in image order.
                let mut all: Vec<(f64, usize, usize)> = Vec::new();
                for (ei, e) in es.iter().enumerate() {
                    all.extend(e.scores.iter().take(md).enumerate().map(|(di, &s)| (s, ei, di)));
                }
                all.sort_by(|x, y| desc(x.0, y.0));
                let nd = all.len();
                let mut rc = vec![0.0f64; nd];
                let mut pr = vec![0.0f64; nd];
                for t in 0..T {
                    let (mut tp, mut fp) = (0u64, 0u64);
                    for (j, &(_, ei, di)) in all.iter().enumerate() {
                        let e = es[ei];
                        let nde = e.scores.len();
                        let ig = e.dt_ignore[t * nde + di];
                        if !ig {
                            if e.matched[t * nde + di] {
                                tp += 1;
                            } else {
                                fp += 1;
                            }
                        }
                        let (tpf, fpf) = (tp as f64, fp as f64);
                        rc[j] = tpf / npig as f64;
                        pr[j] = tpf / (fpf + tpf + EPS);
                    }
                    recall[r_at(t, k, a, m)] = if nd > 0 { rc[nd - 1] } else { 0.0 };
                    for j in (1..nd).rev() {
                        if pr[j] > pr[j - 1] {
                            pr[j - 1] = pr[j];
                        }
                    }
                    for (ri, &thr) in rec_thrs.iter().enumerate() {
                        // np.searchsorted(rc, thr, side="left"); an index past the end stops
                        // the fill (pycocotools' try/except), leaving zeros.
                        let pi = rc.partition_point(|&x| x < thr);
                        precision[p_at(t, ri, k, a, m)] = if pi < nd { pr[pi] } else { 0.0 };
                    }
                    // The remaining entries for thresholds past the last recall are 0, which
                    // the loop above already wrote (partition_point is monotone in thr).
                }
            }
        }
    }

    // summarize()
    let mut stats = [0.0f64; 12];
    for (s, &(ap, thr, a, m)) in stats.iter_mut().zip(SUMMARY.iter()) {
        let ts: Vec<usize> = match thr {
            // np.where(iouThr == p.iouThrs): exact float equality, as pycocotools.
            Some(v) => (0..T).filter(|&t| iou_thrs[t] == v).collect(),
            None => (0..T).collect(),
        };
        // s[s > -1] in numpy's C order: (t, r, k) for precision, (t, k) for recall.
        let mut vals = Vec::new();
        for &t in &ts {
            if ap {
                for r in 0..R {
                    vals.extend(
                        (0..nk).map(|k| precision[p_at(t, r, k, a, m)]).filter(|&v| v > -1.0),
                    );
                }
            } else {
                vals.extend((0..nk).map(|k| recall[r_at(t, k, a, m)]).filter(|&v| v > -1.0));
            }
        }
        // np.mean: numpy's pairwise sum divided by the count (bit-identical, so that values
        // on a rounding boundary print as pycocotools prints them).
        *s = if vals.is_empty() { -1.0 } else { pairwise_sum(&vals) / vals.len() as f64 };
    }
    Ok(CocoStats::from_array(stats))
}

/// Descending order for a stable sort, as `np.argsort(-score, kind="mergesort")`: scores are
/// finite (checked), and `0.0` and `-0.0` tie as in numpy (`total_cmp` would split them).
fn desc(a: f64, b: f64) -> std::cmp::Ordering {
    b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal)
}

/// numpy's `pairwise_sum` for float64 (`loops_utils.h.src`), which `np.sum` / `np.mean` use
/// on a contiguous 1-D array: 8 accumulators up to 128 elements, recursive halving above.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// `maskApi.c: bbIou` for one pair: plain areas, union = detection area for a crowd region.
fn bbox_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let da = d[2] * d[3];
    let u = if crowd { da } else { da + g[2] * g[3] - i };
    i / u
}

/// `COCOeval.evaluateImg` for one image, category and area range (`maxDet = 100`).
/// `g` is in file order, `d` sorted and cut; `ious[di * g.len() + gi]`.
fn evaluate_img(
    g: &[&CocoGtAnn],
    d: &[(usize, &CocoDet)],
    ious: &[f64],
    rng: &[f64; 2],
    iou_thrs: &[f64; T],
) -> EvalImg {
    let ng = g.len();
    let nd = d.len();
    let out_of_range = |area: f64| area < rng[0] || area > rng[1];
    // Ignored (crowd, or area outside the range) go last; stable.
    let ignore_orig: Vec<bool> = g.iter().map(|a| a.iscrowd || out_of_range(a.area)).collect();
    let mut order: Vec<usize> = (0..ng).collect();
    order.sort_by_key(|&j| ignore_orig[j]);
    let gt_ignore: Vec<bool> = order.iter().map(|&j| ignore_orig[j]).collect();
    let crowd: Vec<bool> = order.iter().map(|&j| g[j].iscrowd).collect();

    let mut matched = vec![false; T * nd];
    let mut dt_ignore = vec![false; T * nd];
    // gtm: the ground truth is taken (by a detection id, always >= 1) at threshold t.
    let mut gt_taken = vec![false; T * ng];
    if ng > 0 && nd > 0 {
        for (t, &thr) in iou_thrs.iter().enumerate() {
            for di in 0..nd {
                let mut iou = thr.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                for gi in 0..ng {
                    if gt_taken[t * ng + gi] && !crowd[gi] {
                        continue;
                    }
                    if let Some(mi) = m
                        && !gt_ignore[mi]
                        && gt_ignore[gi]
                    {
                        break;
                    }
                    let v = ious[di * ng + order[gi]];
                    if v < iou {
                        continue;
                    }
                    iou = v;
                    m = Some(gi);
                }
                let Some(mi) = m else { continue };
                dt_ignore[t * nd + di] = gt_ignore[mi];
                matched[t * nd + di] = g[order[mi]].id != 0;
                gt_taken[t * ng + mi] = true;
            }
        }
    }
    for (di, (_, det)) in d.iter().enumerate() {
        if out_of_range(det.bbox[2] * det.bbox[3]) {
            for t in 0..T {
                if !matched[t * nd + di] {
                    dt_ignore[t * nd + di] = true;
                }
            }
        }
    }
    EvalImg { scores: d.iter().map(|(_, det)| det.score).collect(), matched, dt_ignore, gt_ignore }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_numpy_bits() {
        // repr() of np.linspace(.5, .95, 10) and np.linspace(0, 1, 101) entries (numpy 2.x).
        let iou = iou_thresholds();
        assert_eq!(iou[5], 0.75);
        assert_eq!(iou[1], 0.55);
        assert_eq!(iou[3], 0.65);
        assert_eq!(iou[8], 0.8999999999999999);
        assert_eq!(iou[9], 0.95);
        let rec = recall_thresholds();
        assert_eq!(rec[7], 0.07);
        assert_eq!(rec[29], 0.29);
        assert_eq!(rec[57], 0.5700000000000001);
        assert_eq!(rec[100], 1.0);
    }

    #[test]
    fn crowd_iou_uses_detection_area() {
        let d = [0.0, 0.0, 10.0, 10.0];
        let g = [5.0, 0.0, 100.0, 100.0];
        assert_eq!(bbox_iou(&d, &g, true), 0.5);
        assert_eq!(bbox_iou(&d, &g, false), 50.0 / (100.0 + 10000.0 - 50.0));
        assert_eq!(bbox_iou(&[0.0, 0.0, 1.0, 1.0], &[1.0, 0.0, 1.0, 1.0], false), 0.0);
    }
}
