//! libtorch's own distributed engine, c10d, from Rust: the rendezvous store (`c10d::TCPStore`
//! under a `c10d::PrefixStore`) and the NCCL process group (`c10d::ProcessGroupNCCL`), reached
//! through the C shim in `ffi/shim/` (declared in `crate::ffi`) that build.rs compiles against the torch wheel's headers.
//! c10d gives what a hand-written NCCL binding would not: collectives ordered on libtorch's
//! current CUDA stream, the timeout watchdog, communicator abort on a dead peer, and error
//! messages PyTorch users know. The store interoperates with Python's
//! `torch.distributed.TCPStore` and with torchrun's agent store.
use crate::error::{Error, Result};
use crate::ffi::*;
use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;
use tch::Tensor;

/// A listening socket on `host:port` for the store's server, or None to let c10d listen on
/// every interface (`host` unspecified, or not this machine's: said in a warning).
fn bind_store_listener(host: &str, port: u16) -> Option<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    if addr.ip().is_unspecified() {
        return None;
    }
    match std::net::TcpListener::bind(addr) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(%addr, "the store serves on every interface: binding its address failed ({e})");
            None
        }
    }
}

fn c_string(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Config(format!("{what} `{s}` contains a NUL byte")))
}

fn millis(d: Duration) -> c_int {
    d.as_millis().min(c_int::MAX as u128) as c_int
}

/// A connection to (or, on one process per job, the server of) a c10d TCPStore; every key is
/// prefixed. Thread-safe: c10d's store serializes its requests.
pub struct Store {
    raw: *mut RawStore,
    rank: usize,
    timeout: Duration,
    addr: String,
}

// SAFETY: c10d::TCPStore guards its socket with a mutex; the pointer is owned by this value.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Connects to the store at `host:port` (or serves it when `is_server`; port 0 picks a free
    /// one) with keys under `prefix`. Fails after `timeout` without a server, naming the address.
    pub fn connect(
        host: &str,
        port: u16,
        is_server: bool,
        world_size: usize,
        timeout: Duration,
        prefix: &str,
        rank: usize,
    ) -> Result<Store> {
        let (h, p) = (c_string(host, "host")?, c_string(prefix, "store prefix")?);
        // A server listens on `host`'s interface only (c10d alone would listen on all of them):
        // umtune binds the socket and the store takes it over. `0.0.0.0`, or a host that is not
        // an address of this machine, serves on all interfaces as before.
        let listener = match is_server {
            true => bind_store_listener(host, port),
            false => None,
        };
        use std::os::fd::IntoRawFd;
        let listen_fd = listener.map_or(-1, |l| l.into_raw_fd());
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C strings; the shim catches every exception.
        let raw = unsafe {
            umt_store_new(
                h.as_ptr(),
                c_int::from(port),
                c_int::from(is_server),
                world_size as c_int,
                millis(timeout),
                p.as_ptr(),
                listen_fd,
                &mut err,
            )
        };
        let addr = format!("{host}:{port}");
        if raw.is_null() {
            let role = if is_server { "serving" } else { "joining" };
            return Err(Error::Collective {
                rank,
                msg: format!("{role} the TCPStore at {addr}: {}", take_error(err)),
            });
        }
        Ok(Store {
            raw,
            rank,
            timeout,
            addr,
        })
    }

    /// The port the store listens on (the one picked when asked for port 0).
    pub fn port(&self) -> u16 {
        // SAFETY: `raw` is live.
        unsafe { umt_store_port(self.raw) as u16 }
    }

    fn fail(&self, what: String, err: *mut c_char) -> Error {
        Error::Collective {
            rank: self.rank,
            msg: format!("{what} (TCPStore at {}): {}", self.addr, take_error(err)),
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = c_string(key, "store key")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: `value` is valid for `len` bytes during the call.
        let rc =
            unsafe { umt_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len(), &mut err) };
        match rc {
            0 => Ok(()),
            _ => Err(self.fail(format!("setting `{key}`"), err)),
        }
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_within(key, self.timeout)
    }

    /// The value of `key`, waiting for it up to `timeout`.
    pub fn get_within(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let k = c_string(key, "store key")?;
        let (mut out, mut len, mut err) = (std::ptr::null_mut(), 0usize, std::ptr::null_mut());
        // SAFETY: the shim mallocs `out` (len bytes) on success; we copy and free it.
        let rc = unsafe {
            umt_store_get(
                self.raw,
                k.as_ptr(),
                millis(timeout),
                &mut out,
                &mut len,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(self.fail(
                format!("waiting {:.0} s for `{key}`", timeout.as_secs_f64()),
                err,
            ));
        }
        let value = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
        unsafe { umt_free(out.cast()) };
        Ok(value)
    }

    /// Adds `delta` to the integer at `key` (0 when absent) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = c_string(key, "store key")?;
        let (mut out, mut err) = (0i64, std::ptr::null_mut());
        // SAFETY: plain out-parameters.
        match unsafe { umt_store_add(self.raw, k.as_ptr(), delta, &mut out, &mut err) } {
            0 => Ok(out),
            _ => Err(self.fail(format!("adding to `{key}`"), err)),
        }
    }

    /// Whether `key` is set, without waiting.
    pub fn check(&self, key: &str) -> Result<bool> {
        let k = c_string(key, "store key")?;
        let (mut out, mut err) = (0, std::ptr::null_mut());
        // SAFETY: plain out-parameters.
        match unsafe { umt_store_check(self.raw, k.as_ptr(), &mut out, &mut err) } {
            0 => Ok(out != 0),
            _ => Err(self.fail(format!("checking `{key}`"), err)),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn raw(&self) -> *mut c_void {
        self.raw.cast()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once.
        unsafe { umt_store_free(self.raw) }
    }
}

/// Whether this build has the NCCL backend compiled in (build.rs found the CUDA headers).
pub fn nccl_compiled() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { umt_nccl_compiled() != 0 }
}

/// c10d's ProcessGroupNCCL: collectives on CUDA tensors of this process's device. A tensor
/// elsewhere (the trainer's stop signal, a string, a count on the CPU) travels through that device
/// and comes back where it was, as the CPU ring does the other way round.
pub struct NcclGroup {
    raw: *mut RawGroup,
    rank: usize,
    world_size: usize,
    device: tch::Device,
    // Keeps the store alive as long as the group uses it.
    _store: std::sync::Arc<Store>,
}

// SAFETY: ProcessGroupNCCL is thread-safe (c10d enqueues work under its own locks); owned pointer.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    pub fn new(
        store: std::sync::Arc<Store>,
        rank: usize,
        world_size: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<NcclGroup> {
        let prefix = c_string("nccl", "prefix")?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the store outlives the group (kept in `_store`).
        let raw = unsafe {
            umt_pg_nccl_new(
                store.raw().cast(),
                prefix.as_ptr(),
                rank as c_int,
                world_size as c_int,
                device as c_int,
                millis(timeout),
                &mut err,
            )
        };
        if raw.is_null() {
            return Err(Error::Collective {
                rank,
                msg: format!("creating the NCCL process group: {}", take_error(err)),
            });
        }
        Ok(NcclGroup {
            raw,
            rank,
            world_size,
            device: tch::Device::Cuda(device),
            _store: store,
        })
    }

    fn check(&self, what: &str, rc: c_int, err: *mut c_char) -> Result<()> {
        match rc {
            0 => Ok(()),
            _ => Err(Error::Collective {
                rank: self.rank,
                msg: format!("NCCL {what}: {}", take_error(err)),
            }),
        }
    }

    /// `t` as NCCL takes it: contiguous on this group's device (`t` itself when it already is).
    fn staged(&self, t: &Tensor) -> Tensor {
        if t.device() == self.device && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.to_device(self.device).contiguous()
        }
    }

    /// c10d's `alltoall_base` of `input` into `out` (both contiguous on this device) with rows
    /// per rank `out_splits` / `in_splits` (empty: equal splits).
    fn alltoall(
        &self,
        out: &Tensor,
        input: &Tensor,
        out_splits: &[i64],
        in_splits: &[i64],
    ) -> Result<()> {
        let (mut out, mut input) = (out.shallow_clone(), input.shallow_clone());
        let mut err = std::ptr::null_mut();
        // SAFETY: live contiguous device tensors; the split arrays hold `n` counts each, n being
        // the world size or 0, and outlive the call (the shim copies them).
        let rc = unsafe {
            umt_pg_alltoall(
                self.raw,
                out.as_mut_ptr(),
                input.as_mut_ptr(),
                out_splits.as_ptr(),
                in_splits.as_ptr(),
                out_splits.len() as c_int,
                &mut err,
            )
        };
        self.check("all-to-all", rc, err)
    }

    /// Runs an in-place collective on `t`, staged through the device when it lives elsewhere.
    fn in_place(&self, t: &mut Tensor, op: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
        let mut work = self.staged(t);
        op(&mut work)?;
        if work.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&work));
        }
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once (shuts the communicators down).
        unsafe { umt_pg_free(self.raw) }
    }
}

impl super::Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce(&self, t: &mut Tensor, op: super::ReduceOp) -> Result<()> {
        let code = match op {
            super::ReduceOp::Sum => 0,
            super::ReduceOp::Mean => 1,
        };
        self.in_place(t, |t| {
            let mut err = std::ptr::null_mut();
            // SAFETY: `t` is a live contiguous device tensor; the shim reduces it in place.
            let rc = unsafe { umt_pg_allreduce(self.raw, t.as_mut_ptr(), code, &mut err) };
            self.check("all-reduce", rc, err)
        })
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.in_place(t, |t| {
            let mut err = std::ptr::null_mut();
            // SAFETY: as above.
            let rc = unsafe { umt_pg_broadcast(self.raw, t.as_mut_ptr(), root as c_int, &mut err) };
            self.check("broadcast", rc, err)
        })
    }
    fn all_gather_same(&self, t: &Tensor) -> Result<Tensor> {
        let input = self.staged(t);
        let mut shape = input.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world_size as i64;
        let mut out = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        let mut input = super::collective::as_rows(&input);
        let mut err = std::ptr::null_mut();
        // SAFETY: `out` holds world_size copies of `input`'s shape, both contiguous, same dtype.
        let rc =
            unsafe { umt_pg_allgather(self.raw, out.as_mut_ptr(), input.as_mut_ptr(), &mut err) };
        self.check("all-gather", rc, err)?;
        Ok(out.to_device(t.device()))
    }

    fn all_to_all(&self, send: &[Tensor], recv_rows: Option<&[i64]>) -> Result<Vec<Tensor>> {
        super::collective::check_all_to_all(self.rank, self.world_size, send, recv_rows)?;
        let home = send[0].device();
        let in_splits: Vec<i64> = send.iter().map(|t| t.size()[0]).collect();
        let out_splits = match recv_rows {
            Some(rows) => rows.to_vec(),
            None => {
                // The counts first: an equal-split all-to-all of one count per rank.
                let counts = Tensor::from_slice(&in_splits).to_device(self.device);
                let got = Tensor::empty([self.world_size as i64], (tch::Kind::Int64, self.device));
                self.alltoall(&got, &counts, &[], &[])?;
                crate::host::i64s(&got)?
            }
        };
        let input = self.staged(&Tensor::cat(send, 0));
        let mut shape = send[0].size();
        shape[0] = out_splits.iter().sum();
        let out = Tensor::empty(shape.as_slice(), (input.kind(), self.device));
        self.alltoall(&out, &input, &out_splits, &in_splits)?;
        let out = out.to_device(home);
        let mut offset = 0;
        Ok(out_splits
            .iter()
            .map(|&n| {
                let part = out.narrow(0, offset, n);
                offset += n;
                part
            })
            .collect())
    }
}
