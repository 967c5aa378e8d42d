//! Legacy PC devices: the 8250 serial console and the i8042 controller (whose
//! reset line is how a `reboot=k` guest ends the VMM).

use std::io::Write;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Triggers an interrupt (or an exit) by writing to an EventFd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console goes.
pub enum ConsoleOut {
    Stdout,
    File(std::fs::File),
    Sink,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            // Unbuffered: the console must show what the guest printed even if
            // the VMM dies right after.
            ConsoleOut::Stdout => std::io::stdout().lock().write(buf),
            ConsoleOut::File(f) => f.write(buf),
            ConsoleOut::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ConsoleOut::Stdout => std::io::stdout().lock().flush(),
            ConsoleOut::File(f) => f.flush(),
            ConsoleOut::Sink => Ok(()),
        }
    }
}

pub struct SerialDevice {
    pub serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

/// The 8250's registers, for snapshots (vm-superio's SerialState, which has
/// no serde).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: EventFdTrigger, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    pub fn state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    pub fn from_state(
        s: &SerialSnapshot,
        irq: EventFdTrigger,
        out: ConsoleOut,
    ) -> Result<Self, String> {
        let r = s.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        };
        Ok(SerialDevice {
            serial: Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
                .map_err(|e| format!("serial state: {e:?}"))?,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A failed console write or interrupt has no one to report to but
            // the log; the guest goes on.
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

/// The i8042 at ports 0x60-0x64; offset 0 is the data port, 4 the command port.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && (offset == 0 || offset == 4) {
            data[0] = self.dev.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && (offset == 0 || offset == 4) {
            if let Err(e) = self.dev.write(offset as u8, data[0]) {
                tracing::warn!("i8042 reset signal failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_triggers_exit_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        // Odd sizes and offsets from the guest are ignored, not a panic.
        dev.write(2, &[0xfe]);
        dev.write(4, &[0xfe, 0]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn serial_writes_to_its_output() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let f = std::fs::File::create(&path).unwrap();
        let mut dev = SerialDevice::new(EventFdTrigger(evt), ConsoleOut::File(f));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        let mut big = [0u8; 4];
        dev.read(0, &mut big);
        dev.write(100, &[1]);
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
    }
}
