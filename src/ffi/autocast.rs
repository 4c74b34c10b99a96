//! Automatic mixed precision (`torch.autocast`) around a forward pass: matmuls and attention run
//! in bf16 (or f16) on f32 weights, reductions and losses stay f32. Written here because tch's
//! `autocast` toggles CUDA autocast only and cannot choose its dtype (libtorch's default is f16);
//! these are libtorch's own `at::autocast` functions, bound by their C++ symbol names (their
//! arguments are one-byte enums and bools, passed as plain integers by the C ABI).
use tch::{Device, Kind};

mod ffi {
    extern "C" {
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device_type: i8) -> bool;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device_type: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device_type: i8) -> i8;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

// c10::DeviceType and c10::ScalarType values.
const CPU: i8 = 0;
const CUDA: i8 = 1;
const HALF: i8 = 5;
const BFLOAT16: i8 = 15;

/// Restores the previous autocast state when dropped (also when `f` panics).
struct Scope {
    device_type: i8,
    was_enabled: bool,
    previous_dtype: i8,
}

impl Drop for Scope {
    fn drop(&mut self) {
        // SAFETY: plain state setters of libtorch's thread-local autocast state.
        unsafe {
            if ffi::decrement_nesting() == 0 {
                ffi::clear_cache();
            }
            ffi::set_autocast_enabled(self.device_type, self.was_enabled);
            ffi::set_autocast_dtype(self.device_type, self.previous_dtype);
        }
    }
}

/// Runs `f` with autocast to `kind` (BFloat16 or Half) on `device`'s type; any other kind, or a
/// device other than CPU/CUDA, runs `f` as it is.
pub fn autocast<T>(device: Device, kind: Kind, f: impl FnOnce() -> T) -> T {
    let device_type = match device {
        Device::Cpu => CPU,
        Device::Cuda(_) => CUDA,
        _ => return f(),
    };
    let dtype = match kind {
        Kind::BFloat16 => BFLOAT16,
        Kind::Half => HALF,
        _ => return f(),
    };
    // SAFETY: as in `Scope::drop`.
    let _scope = unsafe {
        let scope = Scope {
            device_type,
            was_enabled: ffi::is_autocast_enabled(device_type),
            previous_dtype: ffi::get_autocast_dtype(device_type),
        };
        ffi::set_autocast_dtype(device_type, dtype);
        ffi::set_autocast_enabled(device_type, true);
        ffi::increment_nesting();
        scope
    };
    f()
}
