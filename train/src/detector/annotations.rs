//! Box annotations for the detection head: COCO JSON, Pascal VOC XML, VisDrone-DET text.
//!
//! Everything becomes [`Annotated`] images with pixel boxes `(x0, y0, x1, y1)` and class
//! names; [`Dataset::classes`] fixes the class order (sorted names, or one class with
//! `single_class`). Errors name the file and what is wrong in it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One ground-truth box in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct GtBox {
    /// Left, top, right, bottom in pixels.
    pub xyxy: [f32; 4],
    /// Class name.
    pub class: String,
}

/// An image and its boxes.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotated {
    /// The image file.
    pub image: PathBuf,
    /// Its boxes (possibly none).
    pub boxes: Vec<GtBox>,
}

/// A set of annotated images with a fixed class order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    /// Images.
    pub images: Vec<Annotated>,
    /// Class names; the index is the detector's class id.
    pub classes: Vec<String>,
}

impl Dataset {
    /// Reads and merges annotation sources. `images_dir` resolves VOC/VisDrone image names
    /// (and COCO file names that are not found next to the JSON). With `single_class`, every
    /// box becomes class `single_class`.
    pub fn load(
        sources: &[PathBuf],
        images_dir: Option<&Path>,
        single_class: Option<&str>,
    ) -> Result<Self> {
        let mut images = Vec::new();
        for s in sources {
            images.extend(read_any(s, images_dir)?);
        }
        if let Some(name) = single_class {
            for a in &mut images {
                for b in &mut a.boxes {
                    b.class = name.to_string();
                }
            }
        }
        let classes: BTreeSet<String> =
            images.iter().flat_map(|a| a.boxes.iter().map(|b| b.class.clone())).collect();
        Ok(Self { images, classes: classes.into_iter().collect() })
    }

    /// Class id of a name.
    pub fn class_id(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|c| c == name)
    }
}

/// Reads one source: a `.json` (COCO), a `.xml` (VOC), a `.txt` (VisDrone-DET), or a folder
/// of `.xml`/`.txt` files.
pub fn read_any(path: &Path, images_dir: Option<&Path>) -> Result<Vec<Annotated>> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io("cannot list annotations", path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(ext(p).as_str(), "xml" | "txt"))
            .collect();
        entries.sort();
        let mut out = Vec::new();
        for e in entries {
            out.extend(read_any(&e, images_dir)?);
        }
        return Ok(out);
    }
    match ext(path).as_str() {
        "json" => read_coco(path, images_dir),
        "xml" => read_voc(path, images_dir).map(|a| vec![a]),
        "txt" => read_visdrone(path, images_dir).map(|a| vec![a]),
        other => Err(Error::malformed(
            "annotation",
            path,
            format!(
                "unknown extension `{other}` (expected .json COCO, .xml VOC, .txt VisDrone-DET)"
            ),
        )),
    }
}

fn ext(p: &Path) -> String {
    p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

/// Finds an image named `name` next to `anchor` or in `images_dir`, also trying the usual
/// raster extensions for the same stem (VOC files often name a `.tif` next to a `.png`).
fn find_image(name: &str, anchor: &Path, images_dir: Option<&Path>) -> Option<PathBuf> {
    let base = anchor.parent().unwrap_or(Path::new("."));
    let file = Path::new(name);
    let mut dirs = vec![base.to_path_buf(), base.join("images"), base.join("..").join("images")];
    if let Some(d) = images_dir {
        dirs.insert(0, d.to_path_buf());
    }
    for d in &dirs {
        for cand in [d.join(file), d.join(file.file_name().unwrap_or_default())] {
            if cand.is_file() {
                return Some(cand);
            }
            let stem = cand.with_extension("");
            for e in ["png", "jpg", "jpeg", "JPG", "PNG"] {
                let c = stem.with_extension(e);
                if c.is_file() {
                    return Some(c);
                }
            }
        }
    }
    None
}

fn missing_image(anchor: &Path, name: &str) -> Error {
    Error::malformed(
        "annotation",
        anchor,
        format!("image `{name}` not found next to the file, in images/ or in --images"),
    )
}

/// COCO detection JSON.
pub fn read_coco(path: &Path, images_dir: Option<&Path>) -> Result<Vec<Annotated>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    parse_coco(&text, path, images_dir)
}

/// Parses the text of [`read_coco`]'s file; `path` names it in errors and anchors the image
/// search.
pub fn parse_coco(text: &str, path: &Path, images_dir: Option<&Path>) -> Result<Vec<Annotated>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::malformed("coco json", path, e.to_string()))?;
    let bad = |what: String| Error::malformed("coco json", path, what);
    let cats: std::collections::BTreeMap<i64, String> = v["categories"]
        .as_array()
        .ok_or_else(|| bad("no `categories` array".into()))?
        .iter()
        .map(|c| {
            Ok((
                c["id"].as_i64().ok_or_else(|| bad("a category has no integer `id`".into()))?,
                c["name"].as_str().unwrap_or("object").to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for im in v["images"].as_array().ok_or_else(|| bad("no `images` array".into()))? {
        let id = im["id"].as_i64().ok_or_else(|| bad("an image has no integer `id`".into()))?;
        let name = im["file_name"]
            .as_str()
            .ok_or_else(|| bad(format!("image {id} has no `file_name`")))?;
        let image = find_image(name, path, images_dir).ok_or_else(|| missing_image(path, name))?;
        ids.push(id);
        out.push(Annotated { image, boxes: Vec::new() });
    }
    for (i, a) in v["annotations"]
        .as_array()
        .ok_or_else(|| bad("no `annotations` array".into()))?
        .iter()
        .enumerate()
    {
        let img = a["image_id"]
            .as_i64()
            .ok_or_else(|| bad(format!("annotations[{i}] has no integer `image_id`")))?;
        let slot = ids
            .iter()
            .position(|&x| x == img)
            .ok_or_else(|| bad(format!("annotations[{i}].image_id {img} is not in `images`")))?;
        let b: Vec<f64> = a["bbox"]
            .as_array()
            .map(|b| b.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        if b.len() != 4 || b[2] < 0.0 || b[3] < 0.0 || b.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!(
                "annotations[{i}].bbox must be 4 finite numbers [x, y, w >= 0, h >= 0]"
            )));
        }
        if a["iscrowd"].as_i64() == Some(1) {
            continue;
        }
        let cat = a["category_id"]
            .as_i64()
            .ok_or_else(|| bad(format!("annotations[{i}] has no `category_id`")))?;
        let class = cats.get(&cat).cloned().ok_or_else(|| {
            bad(format!("annotations[{i}].category_id {cat} is not in `categories`"))
        })?;
        let [x, y, w, h] = [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32];
        out[slot].boxes.push(GtBox { xyxy: [x, y, x + w, y + h], class });
    }
    Ok(out)
}

fn tag<'a>(s: &'a str, t: &str) -> Option<&'a str> {
    let a = s.find(&format!("<{t}>"))? + t.len() + 2;
    let b = s[a..].find(&format!("</{t}>"))? + a;
    Some(s[a..b].trim())
}

/// Pascal VOC XML (one image).
pub fn read_voc(path: &Path, images_dir: Option<&Path>) -> Result<Annotated> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    parse_voc(&text, path, images_dir)
}

/// Parses the text of [`read_voc`]'s file; `path` names it in errors and anchors the image
/// search.
pub fn parse_voc(text: &str, path: &Path, images_dir: Option<&Path>) -> Result<Annotated> {
    let name =
        tag(text, "filename").ok_or_else(|| Error::malformed("voc xml", path, "no <filename>"))?;
    let image = find_image(name, path, images_dir).ok_or_else(|| missing_image(path, name))?;
    let mut boxes = Vec::new();
    for (i, obj) in text.split("<object>").skip(1).enumerate() {
        let obj = &obj[..obj.find("</object>").unwrap_or(obj.len())];
        let class = tag(obj, "name").unwrap_or("object").to_string();
        let num = |t: &str| -> Result<f32> {
            tag(obj, t).and_then(|v| v.parse::<f32>().ok()).filter(|v| v.is_finite()).ok_or_else(
                || {
                    Error::malformed(
                        "voc xml",
                        path,
                        format!("object {i}: <{t}> missing or not a number"),
                    )
                },
            )
        };
        let b = [num("xmin")?, num("ymin")?, num("xmax")?, num("ymax")?];
        if b[2] < b[0] || b[3] < b[1] {
            return Err(Error::malformed(
                "voc xml",
                path,
                format!("object {i}: xmax < xmin or ymax < ymin"),
            ));
        }
        boxes.push(GtBox { xyxy: b, class });
    }
    Ok(Annotated { image, boxes })
}

/// VisDrone-DET text (one image, `left,top,width,height,score,category,truncation,occlusion`
/// per line). Ignored regions (category 0) and boxes with score 0 are skipped, as the
/// VisDrone evaluation does; the class name is the category number.
pub fn read_visdrone(path: &Path, images_dir: Option<&Path>) -> Result<Annotated> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    parse_visdrone(&text, path, images_dir)
}

/// Parses the text of [`read_visdrone`]'s file; `path` names it in errors and anchors the image
/// search.
pub fn parse_visdrone(text: &str, path: &Path, images_dir: Option<&Path>) -> Result<Annotated> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let image = find_image(&format!("{stem}.jpg"), path, images_dir)
        .ok_or_else(|| missing_image(path, &stem))?;
    let mut boxes = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<f32> = line
            .split(',')
            .map(|x| x.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::malformed(
                    "visdrone txt",
                    path,
                    format!("line {}: expected comma-separated numbers", i + 1),
                )
            })?;
        if f.len() < 6 || f[..4].iter().any(|v| !v.is_finite()) || f[2] < 0.0 || f[3] < 0.0 {
            return Err(Error::malformed(
                "visdrone txt",
                path,
                format!("line {}: expected left,top,width>=0,height>=0,score,category,...", i + 1),
            ));
        }
        if f[5] as i64 == 0 || f[4] == 0.0 {
            continue;
        }
        boxes.push(GtBox {
            xyxy: [f[0], f[1], f[0] + f[2], f[1] + f[3]],
            class: format!("{}", f[5] as i64),
        });
    }
    Ok(Annotated { image, boxes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/neon-aerial-trees")
    }

    #[test]
    fn the_three_formats_agree_on_osbs_029() {
        let d = data();
        let coco = read_coco(&d.join("trees.coco.json"), None).unwrap();
        let osbs = coco.iter().find(|a| a.image.ends_with("OSBS_029.png")).unwrap();
        let voc =
            read_voc(&d.join("annotations_voc/OSBS_029.xml"), Some(&d.join("images"))).unwrap();
        let vis = read_visdrone(
            &d.join("annotations_visdrone_det/OSBS_029.txt"),
            Some(&d.join("images")),
        )
        .unwrap();
        assert_eq!(osbs.boxes.len(), 61);
        assert_eq!(voc.boxes.len(), 61);
        assert_eq!(vis.boxes.len(), 61);
        assert!(voc.image.ends_with("OSBS_029.png"), "{:?}", voc.image);
        for (a, b) in osbs.boxes.iter().zip(&voc.boxes) {
            for k in 0..4 {
                assert!((a.xyxy[k] - b.xyxy[k]).abs() <= 1.0, "{:?} vs {:?}", a.xyxy, b.xyxy);
            }
        }
    }

    #[test]
    fn merged_sources_with_a_single_class() {
        let d = data();
        let ds = Dataset::load(
            &[d.join("trees.coco.json"), d.join("soap061_alive_dead.coco.json")],
            None,
            Some("tree"),
        )
        .unwrap();
        assert_eq!(ds.images.len(), 3);
        assert_eq!(ds.classes, vec!["tree".to_string()]);
        assert_eq!(ds.images.iter().map(|a| a.boxes.len()).sum::<usize>(), 340 + 37);
        let two = Dataset::load(&[d.join("soap061_alive_dead.coco.json")], None, None).unwrap();
        assert_eq!(two.classes, vec!["Alive".to_string(), "Dead".to_string()]);
    }

    #[test]
    fn malformed_files_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("flsl-ann-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = dir.join("bad.json");
        std::fs::write(&j, r#"{"images": [], "categories": [], "annotations": [{"image_id": 3, "bbox": [0,0,1,1]}]}"#).unwrap();
        let e = read_coco(&j, None).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("annotations[0].image_id 3"), "{e}");
        std::fs::write(&j, "{ not json").unwrap();
        assert!(read_coco(&j, None).unwrap_err().to_string().contains("bad.json"));
        let t = dir.join("x.txt");
        std::fs::write(&t, "1,2,three,4,1,1,0,0\n").unwrap();
        let e = read_any(&t, Some(&data().join("images"))).unwrap_err().to_string();
        assert!(e.contains("x.txt"), "{e}");
    }
}
