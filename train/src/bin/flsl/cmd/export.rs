use std::process::ExitCode;

use flsl_train::checkpoint::Part;
use flsl_train::export::{ExportOptions, export_checkpoint};

use crate::args::ExportArgs;

pub fn run(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let size = super::parse_size(&a.size)?;
    let part = if a.student { Part::Student } else { Part::Teacher };
    let opts =
        ExportOptions { size, with_head: a.with_head, part, heads: a.heads, detector: a.detector };
    let s = export_checkpoint(&a.checkpoint, &a.out, &opts)?.spec;
    let (gh, gw) = s.grid();
    println!(
        "wrote {} ({} bytes): ViT D={} depth={} heads={} patch={} MLP {}, input image[1,3,{},{}] -> features[1,{},{}]{}",
        a.out.display(),
        std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0),
        s.embed_dim,
        s.depth,
        s.num_heads,
        s.patch_size,
        s.mlp_hidden,
        s.img_h,
        s.img_w,
        gh * gw,
        s.embed_dim,
        if a.with_head { ", prototype_logits" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
