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
    /// A tuple, and its nesting depth.
    Tuple(Rc<Vec<Value>>, u32),
    /// A list, and its nesting depth.
    List(Rc<Vec<Value>>, u32),
    /// A dict (insertion order kept), and its nesting depth.
    Dict(Rc<Vec<(Value, Value)>>, u32),
    /// A global reference `module.name`.
    Global(Rc<str>, Rc<str>),
    /// A storage reference from a persistent id.
    Storage(Rc<StorageRef>),
    /// A rebuilt tensor.
    Tensor(Rc<TensorRef>),
    /// Any other object: the callable and its arguments, plus state set by BUILD; and its
    /// nesting depth.
    Object(Rc<(Value, Value, Option<Value>)>, u32),
    /// The MARK sentinel on the stack.
    Mark,
}

impl Value {
    /// Nesting depth: 0 for a leaf, 1 for an empty container.
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(_, d) | Value::List(_, d) | Value::Dict(_, d) | Value::Object(_, d) => *d,
            _ => 0,
        }
    }
}

/// How deep containers may nest in a pickle. `torch.save` state dicts and training checkpoints
/// nest fewer than 10 levels; the bound keeps every walk of the tree, and its drop, within a
/// small stack (a pickle of 200 000 nested lists overflowed it).
pub const MAX_DEPTH: u32 = 256;
/// What a file may make us hold, in bytes: [`OUTPUT_PER_INPUT_BYTE`] per byte of the file plus
/// [`OUTPUT_EXTRA`], counting tensor names and materialised tensors (memo references can make
/// a DAG whose tree is exponential in the pickle's size: a list holding the previous list twice,
/// 64 times over, or one tensor referenced a million times).
pub const OUTPUT_PER_INPUT_BYTE: u64 = 16;
/// See [`OUTPUT_PER_INPUT_BYTE`].
pub const OUTPUT_EXTRA: u64 = 1 << 20;
/// The largest tensor rank accepted.
const MAX_RANK: usize = 16;
/// A tensor view may read each storage element at most this many times (stride-0 broadcast
/// views are legal); with [`MAX_VIEW_EXTRA`] it bounds what a view materialises against what
/// the file holds.
pub const MAX_VIEW_EXPANSION: usize = 16;
/// Elements any view may materialise beyond [`MAX_VIEW_EXPANSION`] times its storage.
const MAX_VIEW_EXTRA: usize = 4096;

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

    /// The depth of a container holding `items`: one more than the deepest item. Fails above
    /// [`MAX_DEPTH`], so that no later walk (nor the drop of the tree) recurses without bound.
    fn depth_of(&self, items: &[Value]) -> Result<u32> {
        let d = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if d > MAX_DEPTH {
            return Err(self.err(format!("containers nested deeper than {MAX_DEPTH}")));
        }
        Ok(d)
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
                b'}' => self.stack.push(Value::Dict(Rc::new(Vec::new()), 1)),
                b']' => self.stack.push(Value::List(Rc::new(Vec::new()), 1)),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()), 1)),
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
                    let d = self.depth_of(&items)?;
                    self.stack.push(Value::Tuple(Rc::new(items), d));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow in TUPLEn"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let d = self.depth_of(&items)?;
                    self.stack.push(Value::Tuple(Rc::new(items), d));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let d = self.depth_of(&items)?;
                    self.stack.push(Value::List(Rc::new(items), d));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = items
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| (c[0].clone(), c[1].clone()))
                        .collect();
                    let d = self.depth_of(&items)?;
                    self.stack.push(Value::Dict(Rc::new(pairs), d));
                }
                b'a' => {
                    let v = self.pop()?;
                    let d = self.depth_of(std::slice::from_ref(&v))?;
                    if let Value::List(l, depth) = self.top_mut()? {
                        Rc::make_mut(l).push(v);
                        *depth = (*depth).max(d);
                    }
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS
                    let items = self.pop_mark()?;
                    let d = self.depth_of(&items)?;
                    if let Value::List(l, depth) = self.top_mut()? {
                        Rc::make_mut(l).extend(items);
                        *depth = (*depth).max(d);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.depth_of(&[k.clone(), v.clone()])?;
                    if let Value::Dict(m, depth) = self.top_mut()? {
                        Rc::make_mut(m).push((k, v));
                        *depth = (*depth).max(d);
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.depth_of(&items)?;
                    if let Value::Dict(m, depth) = self.top_mut()? {
                        let m = Rc::make_mut(m);
                        for c in items.chunks(2) {
                            if let [k, v] = c {
                                m.push((k.clone(), v.clone()));
                            }
                        }
                        *depth = (*depth).max(d);
                    }
                }
                0x8f => self.stack.push(Value::List(Rc::new(Vec::new()), 1)), // EMPTY_SET
                0x91 => {
                    let items = self.pop_mark()?; // FROZENSET
                    let d = self.depth_of(&items)?;
                    self.stack.push(Value::List(Rc::new(items), d));
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
                    let d = self.depth_of(&[cls.clone(), args.clone()])?;
                    self.stack.push(Value::Object(Rc::new((cls, args, None)), d));
                }
                b'b' => {
                    let state = self.pop()?;
                    let d = self.depth_of(std::slice::from_ref(&state))?;
                    let top = self.top_mut()?;
                    match top {
                        Value::Object(o, depth) => {
                            let (c, a, _) = (**o).clone();
                            *top = Value::Object(Rc::new((c, a, Some(state))), (*depth).max(d));
                        }
                        Value::Dict(m, depth) => {
                            if let Value::Dict(s, _) = state {
                                Rc::make_mut(m).extend(s.iter().cloned());
                                // The state's items are one level below the state: same depth.
                                *depth = (*depth).max(d - 1);
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
        let Value::Tuple(t, _) = pid else {
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
        let depth = self.depth_of(&[callable.clone(), args.clone()])?;
        let name = match &callable {
            Value::Global(m, n) => format!("{m}.{n}"),
            _ => String::new(),
        };
        let a = match &args {
            Value::Tuple(t, _) => t.clone(),
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
                        Some(Value::Tuple(t, _)) => {
                            if t.len() > MAX_RANK {
                                return Err(self.err(format!(
                                    "_rebuild_tensor: rank {} is above {MAX_RANK}",
                                    t.len()
                                )));
                            }
                            t.iter().map(|x| int(Some(x))).collect()
                        }
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
            "collections.OrderedDict" => Ok(Value::Dict(Rc::new(Vec::new()), 1)),
            _ => Ok(Value::Object(Rc::new((callable, args, None)), depth)),
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
///
/// Bounded by the file's size: an archive entry is read only if its declared size is at most
/// the archive's (`torch.save` stores entries uncompressed) and no more than declared is read;
/// a tensor view materialises at most [`MAX_VIEW_EXPANSION`] elements per storage element
/// (+4096); pickles nest at most [`MAX_DEPTH`] deep. Anything else is a [`Error::Malformed`]
/// naming the file.
pub fn read_pth(path: &Path) -> Result<PthFile> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::io("cannot open checkpoint", path, e))?;
    let file_len =
        file.metadata().map_err(|e| Error::io("cannot read the size of", path, e))?.len();
    parse_pth(std::io::BufReader::new(file), file_len, path)
}

/// Parses a `torch.save` archive from memory; `path` only names the source in errors.
pub fn parse_pth_bytes(bytes: &[u8], path: &Path) -> Result<PthFile> {
    parse_pth(std::io::Cursor::new(bytes), bytes.len() as u64, path)
}

fn parse_pth<R: Read + std::io::Seek>(reader: R, file_len: u64, path: &Path) -> Result<PthFile> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
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
        let f = zip
            .by_name(name)
            .map_err(|e| Error::malformed("pth", path, format!("archive entry `{name}`: {e}")))?;
        let size = f.size();
        if size > file_len {
            return Err(Error::malformed(
                "pth",
                path,
                format!(
                    "archive entry `{name}` declares {size} bytes, more than the whole file \
                     ({file_len} bytes; torch.save stores entries uncompressed)"
                ),
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        f.take(size).read_to_end(&mut buf).map_err(|e| {
            Error::malformed("pth", path, format!("archive entry `{name}` is corrupt: {e}"))
        })?;
        Ok(buf)
    };
    let pkl = read_entry(&pkl_name)?;
    let root = Vm { data: &pkl, pos: 0, stack: Vec::new(), memo: HashMap::new(), path }.run()?;

    let mut found: Vec<(String, Rc<TensorRef>)> = Vec::new();
    let mut scalars = Vec::new();
    let limit = file_len.saturating_mul(OUTPUT_PER_INPUT_BYTE).saturating_add(OUTPUT_EXTRA);
    let over = |what: &str| {
        Error::malformed(
            "pth",
            path,
            format!(
                "{what} would take more than {limit} bytes ({OUTPUT_PER_INPUT_BYTE}x the \
                 file's {file_len} bytes + 1 MiB): memo references repeat it too often"
            ),
        )
    };
    // Every visited node costs at least a byte; a name costs its length.
    let mut budget = limit;
    collect(&root, String::new(), &mut found, &mut scalars, 0, &mut budget);
    if budget == 0 {
        return Err(over("the pickle's object tree"));
    }

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = TensorMap::new();
    for (name, t) in found {
        if !storages.contains_key(&t.storage.key) {
            let bytes = read_entry(&format!("{prefix}data/{}", t.storage.key))?;
            storages.insert(t.storage.key.clone(), bytes);
        }
        let raw = &storages[&t.storage.key];
        let numel = check_view(&t, raw, path, &name)?;
        let cost = (numel as u64).saturating_mul(8);
        budget = budget.checked_sub(cost).ok_or_else(|| over(&format!("tensor `{name}`")))?;
        tensors.insert(name.clone(), materialise(&t, raw, numel));
    }
    Ok(PthFile { tensors, scalars })
}

fn collect(
    v: &Value,
    prefix: String,
    out: &mut Vec<(String, Rc<TensorRef>)>,
    scalars: &mut Vec<(String, String)>,
    depth: usize,
    budget: &mut u64,
) {
    // A node costs its name's length (at least 1); an exhausted budget stops the walk and is
    // reported by the caller.
    let cost = prefix.len().max(1) as u64;
    if *budget < cost {
        *budget = 0;
        return;
    }
    if depth > 64 {
        return; // no state dict nests this deep: not a tensor of ours
    }
    *budget -= cost;
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match v {
        Value::Tensor(t) => out.push((prefix, t.clone())),
        Value::Dict(d, _) => {
            for (k, v) in d.iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                collect(v, join(&key), out, scalars, depth + 1, budget);
            }
        }
        Value::List(l, _) | Value::Tuple(l, _) => {
            for (i, v) in l.iter().enumerate() {
                collect(v, join(&i.to_string()), out, scalars, depth + 1, budget);
            }
        }
        Value::Int(i) if depth == 1 => scalars.push((prefix, i.to_string())),
        Value::Float(f) if depth == 1 => scalars.push((prefix, f.to_string())),
        _ => {}
    }
}

/// Checks a view against its storage: shape product without overflow, at most
/// [`MAX_VIEW_EXPANSION`] elements per stored one (+[`MAX_VIEW_EXTRA`]), every index in range.
/// Returns the element count.
fn check_view(t: &TensorRef, raw: &[u8], path: &Path, name: &str) -> Result<usize> {
    let bad = |r: String| Error::malformed("pth", path, format!("tensor `{name}`: {r}"));
    let es = elem_size(t.storage.dtype);
    let n_storage = raw.len() / es;
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
    if numel > n_storage.saturating_mul(MAX_VIEW_EXPANSION).saturating_add(MAX_VIEW_EXTRA) {
        return Err(bad(format!(
            "shape {:?} has {numel} elements over a storage of {n_storage}: more than \
             {MAX_VIEW_EXPANSION}x (+{MAX_VIEW_EXTRA}) reuse of its elements",
            t.shape
        )));
    }
    // Largest element index touched by this view, computed without overflow.
    let reach = t.shape.iter().zip(&t.stride).try_fold(t.offset, |acc, (&s, &st)| {
        s.saturating_sub(1).checked_mul(st).and_then(|x| acc.checked_add(x))
    });
    match reach {
        _ if numel == 0 => {}
        Some(max_index) if max_index < n_storage => {}
        _ => {
            return Err(bad(format!(
                "the view (offset {}, shape {:?}, stride {:?}) reads past a storage of {n_storage} \
                 elements (truncated file?)",
                t.offset, t.shape, t.stride
            )));
        }
    }
    Ok(numel)
}

/// Gathers a view checked by [`check_view`] (`numel` elements) into a host tensor.
fn materialise(t: &TensorRef, raw: &[u8], numel: usize) -> HostTensor {
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
    HostTensor { shape: t.shape.clone(), data }
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
