//! Reader for PyTorch `torch.save` checkpoints (the zip + pickle format, PyTorch >= 1.6).
//!
//! Why our own reader: burn-store's PyTorch reader ignores tensor strides, so a transposed view
//! (`w.t()` saved as is) or a view into a shared storage would load wrong values; the official
//! FLSL checkpoints and the `pth_probe` golden case contain exactly such tensors.
//! This module runs a small pickle virtual machine (no code execution: unknown globals become
//! inert values), resolves `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` calls and
//! gathers every tensor with its storage offset and strides honoured.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::tensors::{HostData, HostTensor, TensorMap, f16_to_f32, le_chunks};

/// A pickle value. Only what `torch.save` produces is modelled; everything else is inert.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(Rc<str>),
    /// Bytes.
    Bytes(Rc<[u8]>),
    /// A tuple.
    Tuple(Rc<Vec<Value>>),
    /// A list.
    List(Rc<Vec<Value>>),
    /// A dict (insertion order kept).
    Dict(Rc<Vec<(Value, Value)>>),
    /// A global reference `module.name`.
    Global(Rc<str>, Rc<str>),
    /// A storage reference from a persistent id.
    Storage(Rc<StorageRef>),
    /// A rebuilt tensor.
    Tensor(Rc<TensorRef>),
    /// Any other object: the callable and its arguments, plus state set by BUILD.
    Object(Rc<(Value, Value, Option<Value>)>),
    /// The MARK sentinel on the stack.
    Mark,
}

/// A storage named by a persistent id.
#[derive(Debug)]
pub struct StorageRef {
    key: String,
    dtype: &'static str,
}

/// A tensor as a view on a storage.
#[derive(Debug)]
pub struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn dtype_of_storage(name: &str) -> Option<&'static str> {
    Some(match name {
        "FloatStorage" => "F32",
        "DoubleStorage" => "F64",
        "HalfStorage" => "F16",
        "BFloat16Storage" => "BF16",
        "LongStorage" => "I64",
        "IntStorage" => "I32",
        "ShortStorage" => "I16",
        "CharStorage" => "I8",
        "ByteStorage" => "U8",
        "BoolStorage" => "U8",
        _ => return None,
    })
}

fn elem_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" | "I16" => 2,
        _ => 1,
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    path: &'a Path,
}

impl<'a> Vm<'a> {
    fn err(&self, r: impl Into<String>) -> Error {
        Error::malformed("pth", self.path, format!("pickle at byte {}: {}", self.pos, r.into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.err("length overflow"))?;
        let s = self.data.get(self.pos..end).ok_or_else(|| self.err("truncated pickle stream"))?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<String> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n =
            rest.iter().position(|&c| c == b'\n').ok_or_else(|| self.err("unterminated line"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let i = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_mut(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        let path = self.path;
        self.stack.last_mut().ok_or_else(|| {
            Error::malformed("pth", path, format!("pickle at byte {pos}: empty stack"))
        })
    }

    fn str_value(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(Rc::from(String::from_utf8_lossy(b).as_ref())))
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Rc::new(Vec::new()))),
                b']' => self.stack.push(Value::List(Rc::new(Vec::new()))),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.err("integer wider than 64 bits"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= i64::from(byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.str_value(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.str_value(n)?;
                    self.stack.push(v);
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.str_value(n)?;
                    self.stack.push(v);
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.str_value(n)?;
                    self.stack.push(v);
                }
                b'B' | b'C' => {
                    let n = if op == b'B' { self.u32()? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                b'q' => {
                    let k = u32::from(self.u8()?);
                    let v = self.top_mut()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()?;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { u32::from(self.u8()?) } else { self.u32()? };
                    let v = self
                        .memo
                        .get(&k)
                        .cloned()
                        .ok_or_else(|| self.err(format!("memo {k} unset")))?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack
                        .push(Value::Global(Rc::from(module.as_str()), Rc::from(name.as_str())));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow in TUPLEn"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(items)));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = items
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| (c[0].clone(), c[1].clone()))
                        .collect();
                    self.stack.push(Value::Dict(Rc::new(pairs)));
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top_mut()? {
                        Rc::make_mut(l).push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top_mut()? {
                        Rc::make_mut(l).extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        Rc::make_mut(d).push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top_mut()? {
                        let d = Rc::make_mut(d);
                        for c in items.chunks(2) {
                            if let [k, v] = c {
                                d.push((k.clone(), v.clone()));
                            }
                        }
                    }
                }
                0x8f => self.stack.push(Value::List(Rc::new(Vec::new()))), // EMPTY_SET
                0x90 => {
                    let items = self.pop_mark()?; // ADDITEMS
                    if let Value::List(l) = self.top_mut()? {
                        Rc::make_mut(l).extend(items);
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?; // FROZENSET
                    self.stack.push(Value::List(Rc::new(items)));
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    // NEWOBJ_EX: cls, args, kwargs
                    let _kw = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(Value::Object(Rc::new((cls, args, None))));
                }
                b'b' => {
                    let state = self.pop()?;
                    let top = self.top_mut()?;
                    match top {
                        Value::Object(o) => {
                            let (c, a, _) = (**o).clone();
                            *top = Value::Object(Rc::new((c, a, Some(state))));
                        }
                        Value::Dict(d) => {
                            if let Value::Dict(s) = state {
                                Rc::make_mut(d).extend(s.iter().cloned());
                            }
                        }
                        _ => {}
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top_mut()?.clone();
                    self.stack.push(v);
                }
                _ => return Err(self.err(format!("unsupported pickle opcode 0x{op:02x}"))),
            }
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = pid else {
            return Err(self.err("persistent id is not a tuple"));
        };
        match t.as_slice() {
            [Value::Str(kind), Value::Global(_, ty), Value::Str(key), _location, ..]
                if &**kind == "storage" =>
            {
                let dtype = dtype_of_storage(ty)
                    .ok_or_else(|| self.err(format!("unsupported storage type {ty}")))?;
                Ok(Value::Storage(Rc::new(StorageRef { key: key.to_string(), dtype })))
            }
            _ => {
                Err(self
                    .err("persistent id is not a ('storage', type, key, location, numel) tuple"))
            }
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> Result<Value> {
        let name = match &callable {
            Value::Global(m, n) => format!("{m}.{n}"),
            _ => String::new(),
        };
        let a = match &args {
            Value::Tuple(t) => t.clone(),
            _ => Rc::new(Vec::new()),
        };
        match name.as_str() {
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                let storage = match a.first() {
                    Some(Value::Storage(s)) => s.clone(),
                    _ => return Err(self.err("_rebuild_tensor without a storage")),
                };
                let int = |v: Option<&Value>| match v {
                    Some(Value::Int(i)) if *i >= 0 => Ok(*i as usize),
                    _ => Err(self.err("_rebuild_tensor: bad integer argument")),
                };
                let ints = |v: Option<&Value>| -> Result<Vec<usize>> {
                    match v {
                        Some(Value::Tuple(t)) => t.iter().map(|x| int(Some(x))).collect(),
                        _ => Err(self.err("_rebuild_tensor: size/stride is not a tuple")),
                    }
                };
                let offset = int(a.get(1))?;
                let shape = ints(a.get(2))?;
                let stride = ints(a.get(3))?;
                if shape.len() != stride.len() {
                    return Err(self.err("_rebuild_tensor: size and stride ranks differ"));
                }
                Ok(Value::Tensor(Rc::new(TensorRef { storage, offset, shape, stride })))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                a.first().cloned().ok_or_else(|| self.err("_rebuild_parameter without data"))
            }
            "collections.OrderedDict" => Ok(Value::Dict(Rc::new(Vec::new()))),
            _ => Ok(Value::Object(Rc::new((callable, args, None)))),
        }
    }
}

/// Everything read from a `.pth` file: the pickled object tree and the tensors found in it.
pub struct PthFile {
    /// Tensors by dotted path (`student.module.backbone.blocks.0.norm1.weight`, or `w` for a flat
    /// state dict).
    pub tensors: TensorMap,
    /// Non-tensor top-level scalars (`epoch`, ...), as text.
    pub scalars: Vec<(String, String)>,
}

/// Reads a `torch.save` zip checkpoint.
pub fn read_pth(path: &Path) -> Result<PthFile> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::io("cannot open checkpoint", path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        Error::malformed(
            "pth",
            path,
            format!("not a torch.save zip archive (truncated or legacy format?): {e}"),
        )
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    let pkl_name = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .cloned()
        .ok_or_else(|| Error::malformed("pth", path, "no data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| Error::malformed("pth", path, format!("archive entry `{name}`: {e}")))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| {
            Error::malformed("pth", path, format!("archive entry `{name}` is corrupt: {e}"))
        })?;
        Ok(buf)
    };
    let pkl = read_entry(&pkl_name)?;
    let root = Vm { data: &pkl, pos: 0, stack: Vec::new(), memo: HashMap::new(), path }.run()?;

    let mut found: Vec<(String, Rc<TensorRef>)> = Vec::new();
    let mut scalars = Vec::new();
    collect(&root, String::new(), &mut found, &mut scalars, 0);

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = TensorMap::new();
    for (name, t) in found {
        if !storages.contains_key(&t.storage.key) {
            let bytes = read_entry(&format!("{prefix}data/{}", t.storage.key))?;
            storages.insert(t.storage.key.clone(), bytes);
        }
        let raw = &storages[&t.storage.key];
        tensors.insert(name.clone(), materialise(&t, raw, path, &name)?);
    }
    Ok(PthFile { tensors, scalars })
}

fn collect(
    v: &Value,
    prefix: String,
    out: &mut Vec<(String, Rc<TensorRef>)>,
    scalars: &mut Vec<(String, String)>,
    depth: usize,
) {
    if depth > 64 {
        return;
    }
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match v {
        Value::Tensor(t) => out.push((prefix, t.clone())),
        Value::Dict(d) => {
            for (k, v) in d.iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                collect(v, join(&key), out, scalars, depth + 1);
            }
        }
        Value::List(l) | Value::Tuple(l) => {
            for (i, v) in l.iter().enumerate() {
                collect(v, join(&i.to_string()), out, scalars, depth + 1);
            }
        }
        Value::Int(i) if depth == 1 => scalars.push((prefix, i.to_string())),
        Value::Float(f) if depth == 1 => scalars.push((prefix, f.to_string())),
        _ => {}
    }
}

fn materialise(t: &TensorRef, raw: &[u8], path: &Path, name: &str) -> Result<HostTensor> {
    let es = elem_size(t.storage.dtype);
    let n_storage = raw.len() / es;
    let numel: usize = t.shape.iter().product();
    // Largest element index touched by this view.
    let max_index = t.offset
        + t.shape.iter().zip(&t.stride).map(|(&s, &st)| s.saturating_sub(1) * st).sum::<usize>();
    if numel > 0 && max_index >= n_storage {
        return Err(Error::malformed(
            "pth",
            path,
            format!(
                "tensor `{name}` reads element {max_index} of a storage of {n_storage} (truncated file?)"
            ),
        ));
    }
    // Element indices of the view in row-major order.
    let mut idx = Vec::with_capacity(numel);
    let rank = t.shape.len();
    let mut counter = vec![0usize; rank];
    for _ in 0..numel {
        idx.push(t.offset + counter.iter().zip(&t.stride).map(|(c, s)| c * s).sum::<usize>());
        for d in (0..rank).rev() {
            counter[d] += 1;
            if counter[d] < t.shape[d] {
                break;
            }
            counter[d] = 0;
        }
    }
    if rank == 0 {
        idx = vec![t.offset];
    }
    let gather =
        |es: usize| -> Vec<&[u8]> { idx.iter().map(|&i| &raw[i * es..(i + 1) * es]).collect() };
    let data = match t.storage.dtype {
        "F32" => HostData::F32(
            gather(4).iter().map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ),
        "F64" => HostData::F64(
            gather(8).iter().map(|b| le_chunks::<8, f64>(b, f64::from_le_bytes)[0]).collect(),
        ),
        "F16" => HostData::F32(
            gather(2).iter().map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        ),
        "BF16" => HostData::F32(
            gather(2)
                .iter()
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
        ),
        "I64" => HostData::I64(
            gather(8).iter().map(|b| le_chunks::<8, i64>(b, i64::from_le_bytes)[0]).collect(),
        ),
        "I32" => HostData::I64(
            gather(4)
                .iter()
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
        ),
        "I16" => HostData::I64(
            gather(2).iter().map(|b| i64::from(i16::from_le_bytes([b[0], b[1]]))).collect(),
        ),
        "I8" => HostData::I64(gather(1).iter().map(|b| i64::from(b[0] as i8)).collect()),
        _ => HostData::U8(gather(1).iter().map(|b| b[0]).collect()),
    };
    Ok(HostTensor { shape: t.shape.clone(), data })
}

/// Extracts a model state dict from a `.pth` file's tensors.
///
/// Accepts plain state dicts and training checkpoints: `which` picks `student` or `teacher`
/// (a training checkpoint's student keys carry `module.`), and the `module.` / `backbone.` /
/// `head.` prefixes are kept or stripped so that the result uses `backbone.*` / `head.*` names
/// when both parts are present, or bare ViT names otherwise.
pub fn state_dict(pth: &PthFile, which: &str) -> TensorMap {
    let has_part = pth.tensors.keys().any(|k| k.starts_with(&format!("{which}.")));
    let mut out = TensorMap::new();
    for (k, v) in &pth.tensors {
        let k = if has_part {
            match k.strip_prefix(&format!("{which}.")) {
                Some(rest) => rest,
                None => continue,
            }
        } else if pth.tensors.keys().any(|k| k.starts_with("student.") || k.starts_with("teacher."))
        {
            // A training checkpoint, but the requested part is absent.
            continue;
        } else {
            k.as_str()
        };
        let k = k.strip_prefix("module.").unwrap_or(k);
        out.insert(k.to_string(), v.clone());
    }
    out
}
