// Argument checks shared by every op, CPU kernels and CUDA bindings alike: shape, dtype, device and
// the layout a kernel assumes, checked before any raw pointer is taken, each error naming the op and
// the argument. A kernel that reads a tensor of the wrong length reads past its end (issue 17: a D of
// dim - 1 entries gave different outputs call after call), so every tensor, optional ones included,
// goes through `check_tensor` first. Kernels that copy an argument into their own layout (`.to(float)
// .contiguous()`) accept any strides for it and say so with Layout::kAnyStrides.
#pragma once

#include <torch/extension.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace longtrain {
namespace checks {

// Dtypes an argument may have.
enum class DTypes { kFloats, kFloat32, kInt64, kBool };
// What a kernel assumes of an argument's strides.
enum class Layout { kAnyStrides, kContiguous, kRowsContiguous };

inline bool dtype_allowed(at::ScalarType type, DTypes allowed) {
  switch (allowed) {
    case DTypes::kFloats: return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
    case DTypes::kFloat32: return type == at::kFloat;
    case DTypes::kInt64: return type == at::kLong;
    case DTypes::kBool: return type == at::kBool;
  }
  return false;
}

inline const char* dtype_names(DTypes allowed) {
  switch (allowed) {
    case DTypes::kFloats: return "float32, bfloat16 or float16";
    case DTypes::kFloat32: return "float32";
    case DTypes::kInt64: return "int64";
    case DTypes::kBool: return "bool";
  }
  return "";
}

inline std::string sizes_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// The device every argument of one call must be on: that of its first tensor, which must be of the
// kernel's device type (a CPU kernel reached with a tensor elsewhere, or a CUDA binding handed a CPU
// tensor, would read memory it cannot address).
struct Call {
  const char* op;
  at::Device device;
  Call(const char* op_name, const at::Tensor& first, const char* first_name, c10::DeviceType kernel_device)
      : op(op_name), device(first.defined() ? first.device() : at::Device(kernel_device)) {
    TORCH_CHECK(first.defined(), op, ": ", first_name, " must be a tensor, got an undefined one");
    TORCH_CHECK(device.type() == kernel_device, op, ": ", first_name, " must be on ", c10::DeviceTypeName(kernel_device),
                ", got ", device);
  }

  // x must be (shape) = sizes, of `dtypes`, on this call's device, with the layout the kernel assumes.
  // `shape` names the dimensions, e.g. "(batch, dim, seq)".
  void tensor(const at::Tensor& x, const char* name, const char* shape, at::IntArrayRef sizes, DTypes dtypes,
              Layout layout = Layout::kAnyStrides) const {
    TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got an undefined one");
    TORCH_CHECK(x.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got ",
                x.device());
    TORCH_CHECK(x.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
                x.layout());
    TORCH_CHECK(x.sizes() == sizes, op, ": ", name, " must have shape ", shape, " = ", sizes_string(sizes), ", got ",
                sizes_string(x.sizes()));
    TORCH_CHECK(dtype_allowed(x.scalar_type(), dtypes), op, ": ", name, " must be ", dtype_names(dtypes), ", got ",
                x.scalar_type());
    if (layout == Layout::kContiguous)
      TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", sizes_string(x.strides()));
    if (layout == Layout::kRowsContiguous && x.dim() == 2)  // rows (dim 0) apart, each row dense, none overlapping
      TORCH_CHECK(x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= x.size(1)), op, ": ", name,
                  " must have contiguous rows, none overlapping another (stride(1) == 1, stride(0) >= ", x.size(1),
                  "), got strides ", sizes_string(x.strides()));
  }

  // The same for an optional argument, when given.
  void optional(const std::optional<at::Tensor>& x, const char* name, const char* shape, at::IntArrayRef sizes,
                DTypes dtypes, Layout layout = Layout::kAnyStrides) const {
    if (present(x)) tensor(*x, name, shape, sizes, dtypes, layout);
  }

  // Only the rank of x, before its sizes are read to build the expected shapes of the others.
  void rank(const at::Tensor& x, const char* name, const char* shape, int64_t dims) const {
    TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got an undefined one");
    TORCH_CHECK(x.dim() == dims, op, ": ", name, " must have shape ", shape, ", got ", sizes_string(x.sizes()));
  }

  static bool present(const std::optional<at::Tensor>& x) { return x.has_value() && x->defined(); }
};

}  // namespace checks
}  // namespace longtrain
