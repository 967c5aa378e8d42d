//! Port-I/O and MMIO dispatch: an address range maps to a device; accesses
//! nobody claims read as all ones and are otherwise ignored (as on a PC).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of its range.
/// Implementations must accept any offset and length: both come from the guest.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

#[derive(Default, Clone)]
pub struct Bus {
    // base -> (len, device)
    devices: BTreeMap<u64, (u64, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0
            || self
                .devices
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base)
        {
            return Err(Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (dlen, dev)) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must fall inside the device's range.
        (off.checked_add(len as u64)? <= *dlen).then_some((off, dev))
    }

    /// Returns false when no device claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                // A poisoned lock means a device thread panicked; keep serving
                // the guest with the state as it is rather than panicking too.
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.0.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, d) in data.iter().enumerate() {
                if let Some(x) = self.0.get_mut(offset as usize + i) {
                    *x = *d;
                }
            }
        }
    }

    #[test]
    fn dispatch_and_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![0; 8])));
        bus.insert(dev.clone(), 0x100, 8).unwrap();
        assert!(bus.insert(dev.clone(), 0x104, 8).is_err());
        assert!(bus.insert(dev.clone(), 0xfc, 8).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x108, 8).unwrap();
        assert!(bus.write(0x102, &[7, 8]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b, [7, 8]);
        // Straddling the end of a device, or nothing there: all ones.
        assert!(!bus.read(0x10f, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.read(0x50, &mut b));
    }
}
