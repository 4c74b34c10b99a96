//! Views of tensors and element slices as the bytes the ring sends.
use tch::Tensor;

/// The `n` elements of a contiguous CPU tensor as a mutable slice.
///
/// # Safety
/// `t` must be contiguous, on the CPU, hold at least `n` elements of `T`'s layout, and nothing
/// else may access its storage while the slice lives.
#[allow(clippy::mut_from_ref)]
pub(super) unsafe fn slice_of<T>(t: &Tensor, n: usize) -> &mut [T] {
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr().cast::<T>(), n)
}

pub(super) fn as_bytes<T: Element>(x: &[T]) -> &[u8] {
    // SAFETY: plain-old-data element types, any bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

pub(super) fn as_bytes_mut<T: Element>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid f32/f64/i64 too.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// The chunk at `send` to read and the (different) chunk at `recv` to write, of one buffer.
pub(super) fn disjoint<T>(
    data: &mut [T],
    send: (usize, usize),
    recv: (usize, usize),
) -> (&[T], &mut [T]) {
    if send.1 <= recv.0 {
        let (lo, hi) = data.split_at_mut(recv.0);
        (&lo[send.0..send.1], &mut hi[..recv.1 - recv.0])
    } else {
        let (lo, hi) = data.split_at_mut(send.0);
        (&hi[..send.1 - send.0], &mut lo[recv.0..recv.1])
    }
}

/// The element types the ring reduces (little-endian, as on every platform libtorch runs on).
pub(super) trait Element: Copy + std::ops::AddAssign {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
    /// Adds the elements in `bytes` to `target` element by element.
    fn add_bytes(target: &mut [Self], bytes: &[u8]) {
        for (t, b) in target.iter_mut().zip(bytes.chunks_exact(Self::SIZE)) {
            *t += Self::from_le(b);
        }
    }
}
impl Element for f32 {
    const SIZE: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().unwrap())
    }
}
impl Element for f64 {
    const SIZE: usize = 8;
    fn from_le(b: &[u8]) -> Self {
        f64::from_le_bytes(b.try_into().unwrap())
    }
}
impl Element for i64 {
    const SIZE: usize = 8;
    fn from_le(b: &[u8]) -> Self {
        i64::from_le_bytes(b.try_into().unwrap())
    }
}
