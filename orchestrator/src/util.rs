//! Small helpers of huskd's own: ids, locks.

use std::sync::Mutex;

/// A poisoned lock still holds usable data here (no invariant spans a
/// panic): take it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A random id: 25 lowercase base-36 characters, as Swarm's.
pub fn new_id() -> String {
    let mut b = [0u8; 25];
    // getrandom(2) does not fail for 25 bytes once the pool is ready.
    let _ = husk_runtime::util::getrandom(&mut b);
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    b.iter().map(|x| A[(*x as usize) % 36] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_swarm_shaped() {
        let a = new_id();
        assert_eq!(a.len(), 25);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, new_id());
    }
}
