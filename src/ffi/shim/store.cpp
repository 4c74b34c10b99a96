// A C ABI over libtorch's own rendezvous store, c10d::TCPStore wrapped in a c10d::PrefixStore,
// compiled by build.rs against the torch wheel's headers (the flags torch-sys compiles libtch
// with). Rust reaches c10d only through this file and nccl.cpp; see src/dist/c10d.rs.
// Every entry catches C++ exceptions and hands the message back through `err` (free it with
// umt_free); nothing throws across the boundary.
#include "shim.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <c10/util/Logging.h>

#include <cstring>

char* umt_dup_error(const char* what) { return strdup(what); }

extern "C" {

void umt_free(void* p) { free(p); }

// listen_fd >= 0 (a server): a socket the caller bound and listens on, which the store takes
// over (so it serves on the interface the caller chose rather than on all of them).
umt_store* umt_store_new(const char* host, int port, int is_server, int world, int timeout_ms,
                         const char* prefix, int listen_fd, char** err) {
  try {
    c10d::TCPStoreOptions o;
    if (is_server != 0 && listen_fd >= 0) o.masterListenFd = listen_fd;
    o.port = static_cast<uint16_t>(port);
    o.isServer = is_server != 0;
    if (o.isServer && world > 0) o.numWorkers = static_cast<size_t>(world);
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    // While it connects, c10d logs each retry with the exception's 20-frame C++ backtrace; the
    // caller reports the outcome in one line, so only fatal messages pass meanwhile.
    struct Quiet {
      int was = FLAGS_caffe2_log_level;
      Quiet() { FLAGS_caffe2_log_level = 3; }
      ~Quiet() { FLAGS_caffe2_log_level = was; }
    };
    auto tcp = [&] {
      Quiet quiet;
      return c10::make_intrusive<c10d::TCPStore>(host, o);
    }();
    auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
    return new umt_store{store, tcp};
  } catch (const std::exception& e) {
    *err = umt_exception_error(e);
    return nullptr;
  }
}

int umt_store_port(umt_store* s) { return static_cast<int>(s->tcp->getPort()); }

int umt_store_set(umt_store* s, const char* key, const uint8_t* value, size_t len, char** err) {
  return umt_guard(err, [&] { s->store->set(key, std::vector<uint8_t>(value, value + len)); });
}

int umt_store_get(umt_store* s, const char* key, int timeout_ms, uint8_t** out, size_t* len,
                  char** err) {
  return umt_guard(err, [&] {
    s->store->wait({key}, std::chrono::milliseconds(timeout_ms));
    std::vector<uint8_t> v = s->store->get(key);
    *len = v.size();
    *out = static_cast<uint8_t*>(malloc(v.size() > 0 ? v.size() : 1));
    if (!v.empty()) memcpy(*out, v.data(), v.size());
  });
}

int umt_store_add(umt_store* s, const char* key, int64_t delta, int64_t* out, char** err) {
  return umt_guard(err, [&] { *out = s->store->add(key, delta); });
}

int umt_store_check(umt_store* s, const char* key, int* out, char** err) {
  return umt_guard(err, [&] { *out = s->store->check({key}) ? 1 : 0; });
}

void umt_store_free(umt_store* s) { delete s; }

}  // extern "C"
