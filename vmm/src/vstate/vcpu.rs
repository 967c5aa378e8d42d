//! A vCPU: configured for boot, then run on its own thread, dispatching port
//! I/O and MMIO exits to the buses until the guest stops or fails.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::regs::{self, BootProtocol, RegsError};
use crate::arch::{cpuid, cpuid::Refused};
use crate::cpu_template::CpuTemplate;
use crate::devices::bus::Bus;
use crate::devices::virtio::GuestMemoryMmap;
use crate::metrics::{inc, METRICS};
use crate::vstate::state::VcpuState;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("vCPU registers: {0}")]
    Regs(#[from] RegsError),
    #[error("CPUID: {0}")]
    Cpuid(String),
}

/// Why the VM stopped; the VMM's exit code follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset (i8042, triple fault) or shut down.
    GuestStop = 0,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN): a crashed guest kernel.
    TripleFault = 2,
    /// KVM could not run the guest (emulation failure, entry failure).
    KvmFailure = 3,
    /// A VMM-side error.
    VmmError = 1,
}

/// Shared by everything that can stop the VM: the first reason wins.
pub struct Stopper {
    pub evt: EventFd,
    reason: AtomicI32,
}

impl Stopper {
    pub fn new() -> std::io::Result<Self> {
        Ok(Stopper {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: AtomicI32::new(-1),
        })
    }

    pub fn stop(&self, reason: StopReason) {
        if matches!(reason, StopReason::TripleFault | StopReason::KvmFailure) {
            inc(&METRICS.vcpu.failures);
        }
        let _ = self
            .reason
            .compare_exchange(-1, reason as i32, Ordering::SeqCst, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("signalling VM stop: {e}");
        }
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.load(Ordering::SeqCst) {
            0 => Some(StopReason::GuestStop),
            1 => Some(StopReason::VmmError),
            2 => Some(StopReason::TripleFault),
            3 => Some(StopReason::KvmFailure),
            _ => None,
        }
    }
}

/// Pause/resume for all vCPUs: a pause request is seen at the top of each
/// vCPU's run loop; a signal (SIGRTMIN, no-op handler) kicks a vCPU out of
/// KVM_RUN so it gets there.
pub struct VcpuControl {
    /// (pause requested, vCPUs parked)
    state: std::sync::Mutex<(bool, usize)>,
    cv: std::sync::Condvar,
    /// Each vCPU's state, read by its own thread as it parks (KVM needs the
    /// vCPU out of KVM_RUN, and pending I/O completed, first).
    saved: std::sync::Mutex<std::collections::BTreeMap<u8, Result<VcpuState, String>>>,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: std::sync::Mutex::new((false, 0)),
            cv: std::sync::Condvar::new(),
            saved: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal; without one the signal
/// would kill the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl VcpuControl {
    /// `paused`: the vCPUs park as soon as they start.
    pub fn new(paused: bool) -> Self {
        let c = Self::default();
        c.lock().0 = paused;
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread between KVM_RUNs: parks while paused, after
    /// recording its state with `capture`.
    fn park_if_paused(&self, index: u8, capture: impl FnOnce() -> Result<VcpuState, String>) {
        if !self.lock().0 {
            return;
        }
        let state = capture();
        self.saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, state);
        let mut st = self.lock();
        if !st.0 {
            return;
        }
        st.1 += 1;
        self.cv.notify_all();
        while st.0 {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.1 -= 1;
        self.cv.notify_all();
    }

    /// Pauses `threads` vCPUs; `kick` signals them all. Fails if they do not
    /// all park within `timeout`.
    pub fn pause(
        &self,
        count: usize,
        kick: impl Fn(),
        timeout: std::time::Duration,
    ) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.lock();
        st.0 = true;
        while st.1 < count {
            drop(st);
            kick();
            st = self.lock();
            let now = std::time::Instant::now();
            if now >= deadline {
                st.0 = false;
                self.cv.notify_all();
                return Err(format!("only {} of {count} vCPUs paused", st.1));
            }
            let wait = (deadline - now).min(std::time::Duration::from_millis(10));
            st = self
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        let mut st = self.lock();
        st.0 = false;
        self.cv.notify_all();
    }

    pub fn paused(&self) -> bool {
        self.lock().0
    }

    /// The vCPUs' states as they parked; only meaningful while paused.
    pub fn saved_states(&self, count: usize) -> Result<Vec<VcpuState>, String> {
        let saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        (0..count)
            .map(|i| match saved.get(&(i as u8)) {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i} has not parked")),
            })
            .collect()
    }
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    /// The MSRs a snapshot saves (the host's KVM_GET_MSR_INDEX_LIST).
    pub msr_list: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Kvm("create_vcpu", e))?;
        Ok(Vcpu {
            index,
            fd,
            msr_list: Arc::new(Vec::new()),
        })
    }

    /// CPUID (normalised + template), then what the host refused, logged.
    pub fn configure_cpuid(
        &self,
        kvm: &Kvm,
        count: u8,
        template: &CpuTemplate,
    ) -> Result<Vec<Refused>, VcpuError> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VcpuError::Kvm("get_supported_cpuid", e))?;
        cpuid::normalize(&mut cpuid, self.index, count);
        let missing = cpuid::apply_template(&mut cpuid, template);
        if self.index == 0 {
            for (leaf, sub) in missing {
                tracing::warn!(
                    "CPU template names CPUID leaf {leaf:#x}.{sub}, which this host does not report"
                );
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Kvm("set_cpuid2", e))?;
        let got = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VcpuError::Kvm("get_cpuid2", e))?;
        Ok(cpuid::refused(&cpuid, &got))
    }

    pub fn configure_boot(
        &self,
        mem: &GuestMemoryMmap,
        template: &CpuTemplate,
        protocol: BootProtocol,
        entry: u64,
    ) -> Result<(), VcpuError> {
        regs::setup_msrs(&self.fd, template)?;
        if self.index == 0 {
            // Application processors start from INIT/SIPI sent by the guest.
            regs::setup_regs(&self.fd, protocol, entry)?;
            regs::setup_sregs(mem, &self.fd, protocol)?;
        }
        regs::setup_fpu(&self.fd)?;
        regs::setup_lapic(&self.fd)?;
        Ok(())
    }

    /// Reads this vCPU's state for a snapshot. A KVM_RUN with immediate_exit
    /// set first completes any port or MMIO access KVM still holds (its
    /// result would otherwise be lost), without running guest code.
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(VcpuError::Kvm("KVM_RUN (immediate exit)", e)),
        }
        VcpuState::save(&self.msr_list, &self.fd)
    }

    /// The registers that say where a guest died, for the log.
    pub fn dump_regs(&self) -> String {
        let r = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => return format!("registers unavailable: {e}"),
        };
        let mut s = format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
        if let Ok(sr) = self.fd.get_sregs() {
            s.push_str(&format!(
                " cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                sr.cs.selector, sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
            ));
        }
        s
    }

    /// Runs the vCPU until the VM stops. Only returns on a stop.
    pub fn run(
        mut self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        stopper: Arc<Stopper>,
        control: Arc<VcpuControl>,
    ) {
        loop {
            control.park_if_paused(self.index, || self.save_state().map_err(|e| e.to_string()));
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    tracing::error!("vCPU {}: KVM_RUN failed: {e}", self.index);
                    stopper.stop(StopReason::KvmFailure);
                    return;
                }
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    inc(&METRICS.vcpu.exits_io);
                    pio.read(u64::from(port), data);
                }
                VcpuExit::IoOut(port, data) => {
                    inc(&METRICS.vcpu.exits_io);
                    pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    inc(&METRICS.vcpu.exits_mmio);
                    mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    inc(&METRICS.vcpu.exits_mmio);
                    mmio.write(addr, data);
                }
                VcpuExit::Hlt => {
                    // With the in-kernel irqchip HLT is handled by KVM; if one
                    // reaches us the guest has nothing left to do.
                    tracing::info!("vCPU {}: guest halted", self.index);
                    stopper.stop(StopReason::GuestStop);
                    return;
                }
                VcpuExit::Shutdown => {
                    // A reboot=k guest resets through the i8042, so a
                    // shutdown exit is a triple fault: the guest crashed.
                    tracing::error!(
                        "vCPU {}: guest triple fault (KVM_EXIT_SHUTDOWN); {}",
                        self.index,
                        self.dump_regs()
                    );
                    stopper.stop(StopReason::TripleFault);
                    return;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    tracing::info!("vCPU {}: guest system event {kind}", self.index);
                    stopper.stop(StopReason::GuestStop);
                    return;
                }
                VcpuExit::InternalError => {
                    let regs = self.dump_regs();
                    let kvm_run = self.fd.get_kvm_run();
                    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the kernel
                    // filled the `internal` member of the exit union.
                    let suberror = unsafe { kvm_run.__bindgen_anon_1.internal.suberror };
                    tracing::error!(
                        "vCPU {}: KVM internal error, suberror {suberror}{}; on a nested/emulating \
                         KVM this usually means an instruction the emulator cannot run: check \
                         the host profile; {regs}",
                        self.index,
                        if suberror == 1 {
                            " (emulation failure)"
                        } else {
                            ""
                        },
                    );
                    stopper.stop(StopReason::KvmFailure);
                    return;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    tracing::error!(
                        "vCPU {}: KVM entry failed, hardware reason {reason:#x} on cpu {cpu}; {}",
                        self.index,
                        self.dump_regs()
                    );
                    stopper.stop(StopReason::KvmFailure);
                    return;
                }
                other => {
                    inc(&METRICS.vcpu.exits_other);
                    tracing::debug!("vCPU {}: unhandled exit {other:?}", self.index);
                }
            }
        }
    }
}
