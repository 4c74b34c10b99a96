// Types shared by the shim's translation units (store.cpp, nccl.cpp). Not a public header.
#pragma once
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

struct umt_store {
  c10::intrusive_ptr<c10d::Store> store;     // the PrefixStore every key goes through
  c10::intrusive_ptr<c10d::TCPStore> tcp;  // the connection (or server) under it
};

char* umt_dup_error(const char* what);

// The exception's message for a user: c10 errors without their C++ backtrace (20 frames of
// libtorch internals that say nothing about a missing rank or a wrong address).
inline char* umt_exception_error(const std::exception& e) {
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) return umt_dup_error(c->what_without_backtrace());
  return umt_dup_error(e.what());
}

// Runs `body`; 0, or 1 with the exception's message in *err (freed by the caller with umt_free).
template <class F>
int umt_guard(char** err, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    *err = umt_exception_error(e);
    return 1;
  }
}
