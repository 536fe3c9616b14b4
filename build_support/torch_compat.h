// emafuse's compatibility layer for building tch 0.24's torch-sys against torch 2.12 to 2.15.
//
// torch-sys compiles C++ bindings generated for libtorch 2.11 (libtch/torch_api_generated.cpp).
// Later releases removed a few of the operators those bindings call. emafuse never calls them
// (it uses only torch-sys's hand-written entry points), but the bindings must compile, so this
// header is force-included into every C++ file of the build (`-include`, set by
// build_support/torch_build.py) and supplies each removed name for the releases that lack it:
//
//   removed in 2.13: Tensor::align_as, torch::align_tensors (named tensors)  -> raise
//   removed in 2.14: torch::cholesky, cholesky_out, qr, qr_out                 -> torch.linalg
//
// It is included before any torch header, so it cannot name torch's types: every definition is
// a template, instantiated where the bindings call it, and finds the torch.linalg operator by
// argument-dependent lookup in namespace at.
#pragma once

#ifndef EMAFUSE_TORCH_MINOR
#error "EMAFUSE_TORCH_MINOR is set by build_support/torch_build.py; build emafuse through it"
#endif

#include <stdexcept>
#include <string>

namespace emafuse_compat {
template <class T>
[[noreturn]] T removed(const char *what) {
    throw std::runtime_error(std::string(what) + " was removed from this torch release");
}
}  // namespace emafuse_compat

#if EMAFUSE_TORCH_MINOR >= 13
// The bindings call `self->align_as(*other)`, a member that 2.13 removed. A member cannot be
// added from outside, so the call is rewritten into a conditional expression of the same type
// that raises whichever branch runs. 2.13+'s headers never write `align_as(` themselves.
#define align_as(other) defined() ? emafuse_compat::removed<decltype(other)>("Tensor.align_as") \
                                  : emafuse_compat::removed<decltype(other)>("Tensor.align_as")
namespace torch {
template <class Tensors>
Tensors align_tensors(const Tensors &) {
    return emafuse_compat::removed<Tensors>("torch.align_tensors");
}
}  // namespace torch
#endif

#if EMAFUSE_TORCH_MINOR >= 14
namespace torch {
template <class Tensor>
auto cholesky(const Tensor &self, bool upper) {
    return linalg_cholesky(self, upper);
}
template <class Tensor>
auto cholesky_out(Tensor &out, const Tensor &self, bool upper) {
    return linalg_cholesky_out(out, self, upper);
}
template <class Tensor>
auto qr(const Tensor &self, bool some) {
    return linalg_qr(self, some ? "reduced" : "complete");
}
template <class Tensor>
auto qr_out(Tensor &q, Tensor &r, const Tensor &self, bool some) {
    return linalg_qr_out(q, r, self, some ? "reduced" : "complete");
}
}  // namespace torch
#endif
