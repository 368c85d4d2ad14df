//! Reference-named access to a module's parameters.
//!
//! burn visits parameters with the field path (`blocks.0.attn.qkv.weight`); our field names
//! copy the reference's state-dict keys, so the path is the reference name, except for the
//! head's `mlp` list whose reference indices skip the GELUs (`mlp.1` here is `mlp.2` there).

use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::error::{Error, Result};
use crate::tensors::{HostTensor, TensorMap};

/// Turns a burn field path into the reference parameter name.
pub fn reference_name(path: &[String]) -> String {
    let mut out: Vec<String> = Vec::with_capacity(path.len());
    for (i, seg) in path.iter().enumerate() {
        let after_mlp = i > 0 && path[i - 1] == "mlp";
        match seg.parse::<usize>() {
            Ok(n) if after_mlp => out.push((2 * n).to_string()),
            _ => out.push(seg.clone()),
        }
    }
    out.join(".")
}

#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn name(&self) -> String {
        reference_name(&self.0)
    }
}

struct Collector {
    path: PathStack,
    out: Vec<(String, HostTensor, bool)>,
}

impl<B: Backend> ModuleVisitor<B> for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let trainable = t.is_require_grad();
        self.out.push((self.path.name(), HostTensor::from_tensor(t), trainable));
    }
}

/// Every float parameter as `(reference name, value, trainable)`, in module order.
pub fn named_parameters<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, HostTensor, bool)> {
    let mut c = Collector { path: PathStack::default(), out: Vec::new() };
    module.visit(&mut c);
    c.out
}

/// Every float parameter by reference name.
pub fn state_dict<B: Backend, M: Module<B>>(module: &M) -> TensorMap {
    named_parameters::<B, M>(module).into_iter().map(|(n, t, _)| (n, t)).collect()
}

/// How [`load_state_dict`] treats names absent from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Every parameter must be present.
    Error,
    /// Absent parameters keep their current value (e.g. `cls_token` in a file without it).
    Keep,
}

struct Loader<'a> {
    path: PathStack,
    src: &'a TensorMap,
    prefix: &'a str,
    file: &'a Path,
    missing: Missing,
    errors: Vec<Error>,
    loaded: usize,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = format!("{}{}", self.prefix, self.path.name());
        let (id, tensor, mapper) = param.consume();
        let Some(src) = self.src.get(&name) else {
            if self.missing == Missing::Error {
                self.errors.push(Error::MissingTensor { name, path: self.file.to_path_buf() });
            }
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let expected = tensor.dims().to_vec();
        // A 0-d or [1]-shaped source for a 1-element parameter is accepted as is.
        if src.shape != expected {
            self.errors.push(Error::ShapeMismatch {
                name,
                path: self.file.to_path_buf(),
                expected,
                found: src.shape.clone(),
            });
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let require_grad = tensor.is_require_grad();
        let device = tensor.device();
        let mut t = Tensor::<B, D>::from_data(TensorData::new(src.to_f32(), expected), &device);
        if require_grad {
            t = t.require_grad();
        }
        self.loaded += 1;
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Replaces the parameters of `module` by the tensors named `prefix + reference name` in `src`.
///
/// Errors name the tensor, the file and both shapes; on error the module is returned unchanged
/// in the `Err` path's absence (the caller's module is consumed, so build a fresh one to retry).
pub fn load_state_dict<B: Backend, M: Module<B>>(
    module: M,
    src: &TensorMap,
    prefix: &str,
    file: &Path,
    missing: Missing,
) -> Result<M> {
    let mut loader = Loader {
        path: PathStack::default(),
        src,
        prefix,
        file,
        missing,
        errors: Vec::new(),
        loaded: 0,
    };
    let module = module.map(&mut loader);
    match loader.errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(module),
    }
}
