//! Volatile access to guest-physical memory and MMIO (identity-mapped),
//! and the memory functions the compiler expects, since there is no libc.

use core::ptr::{read_volatile, write_volatile};

pub fn r32(a: usize) -> u32 {
    // SAFETY: `a` is identity-mapped guest RAM or MMIO; a bad address
    // faults this guest alone, which is the point of it.
    unsafe { read_volatile(a as *const u32) }
}

pub fn r8(a: usize) -> u8 {
    // SAFETY: as r32.
    unsafe { read_volatile(a as *const u8) }
}

pub fn r64(a: usize) -> u64 {
    // SAFETY: as r32.
    unsafe { read_volatile(a as *const u64) }
}

pub fn r16(a: usize) -> u16 {
    // SAFETY: as r32.
    unsafe { read_volatile(a as *const u16) }
}

pub fn w16(a: usize, v: u16) {
    // SAFETY: as r32.
    unsafe { write_volatile(a as *mut u16, v) }
}

pub fn w32(a: usize, v: u32) {
    // SAFETY: as r32.
    unsafe { write_volatile(a as *mut u32, v) }
}

pub fn w64(a: usize, v: u64) {
    // SAFETY: as r32.
    unsafe { write_volatile(a as *mut u64, v) }
}

// Byte loops with volatile stores, so the compiler does not turn them
// back into calls to themselves.

/// # Safety
/// As C's memcpy.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller's contract.
        unsafe { write_volatile(dst.add(i), *src.add(i)) };
    }
    dst
}

/// # Safety
/// As C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) < (src as usize) {
        for i in 0..n {
            // SAFETY: the caller's contract.
            unsafe { write_volatile(dst.add(i), *src.add(i)) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: the caller's contract.
            unsafe { write_volatile(dst.add(i), *src.add(i)) };
        }
    }
    dst
}

/// # Safety
/// As C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller's contract.
        unsafe { write_volatile(dst.add(i), c as u8) };
    }
    dst
}

/// # Safety
/// As C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { memcmp(a, b, n) }
}
